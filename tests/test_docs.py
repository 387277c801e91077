"""README.md and docs/*.md: every command they show runs as shown. Each command of a fenced bash block names a
script of the repo that exists and passes only flags of that script, as its own parser reads them (a --config file
included); the commands of the CPU quick start's run run for real, in this process, on tiny settings. The README's
set-up and test lines are the ones CI runs, and every link between the documents finds its file and heading."""

import re
import shlex

import pytest

import bench
import fineweb
import hellaswag
import plot
import sample
import train_gpt2
from cli import build_parser
from conftest import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
OPERATORS = {"&&", "||", ";", "|"}


def fenced_blocks(text, language=None):
    """The contents of the fenced code blocks of a markdown text, of one language or all."""
    blocks = re.findall(r"^ *```([\w-]*)\n(.*?)^ *```", text, flags=re.S | re.M)
    return [body for lang, body in blocks if language is None or lang == language]


def without_comment(line):
    """The line up to a # that starts a word outside quotes, as bash reads it."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def commands(block):
    """Each command of a bash block as its words: lines joined at a trailing backslash, comments dropped,
    split at && || ; |, leading VAR=value words dropped."""
    for line in re.sub(r"\\\n", " ", block).splitlines():
        lex = shlex.shlex(without_comment(line), posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        command = []
        for word in [*lex, ";"]:
            if word in OPERATORS:
                while command and re.fullmatch(r"[A-Za-z_]\w*=\S*", command[0]):
                    command.pop(0)
                if command:
                    yield command
                command = []
            else:
                command.append(word)


def documented_commands():
    return [(path.relative_to(REPO), words) for path in DOCUMENTS
            for block in fenced_blocks(path.read_text(), "bash") for words in commands(block)]


def script_of(words):
    """(the repo's script a command runs, its arguments), or None for another program (pip, lm_eval, python -c)."""
    if words[0] in ("python", "python3") and len(words) > 1 and not words[1].startswith("-"):
        return words[1], words[2:]
    if words[0] == "torchrun":
        scripts = [i for i, word in enumerate(words) if word.endswith(".py")]
        assert scripts, f"torchrun runs no script: {shlex.join(words)}"
        return words[scripts[0]], words[scripts[0] + 1:]
    if words[0] == "bash" or words[0].startswith(("./", ".ci/")):
        script = words[1] if words[0] == "bash" else words[0]
        return script, None
    return None


PARSERS = {
    "train_gpt2.py": lambda argv: train_gpt2.parse_args(argv),
    "bench.py": bench.parse_args,
    "fineweb.py": fineweb.parse_args,
    "hellaswag.py": hellaswag.parse_args,
    "sample.py": lambda argv: build_parser(sample.SampleConfig, "").parse_args(argv),
    "plot.py": lambda argv: plot.build_parser().parse_args(argv),
}


def test_the_documents_show_commands():
    scripts = {script_of(words)[0] for _, words in documented_commands() if script_of(words)}
    assert {"train_gpt2.py", "fineweb.py", "sample.py", "plot.py", "hellaswag.py", "bench.py"} <= scripts


@pytest.mark.parametrize("document, words", documented_commands(),
                         ids=lambda x: shlex.join(x)[:80] if isinstance(x, list) else str(x))
def test_a_command_names_a_script_that_exists_and_its_flags(document, words, monkeypatch, capsys):
    found = script_of(words)
    if words[:3] == ["python", "-m", "pytest"]:
        assert all((REPO / word).exists() for word in words[3:] if not word.startswith("-")), words
        return
    if found is None:
        return
    script, argv = found
    assert (REPO / script).is_file(), f"{document}: {script} does not exist"
    if argv is None or "--help" in argv or "-h" in argv:
        return
    assert script in PARSERS, f"{document}: no parser known for {script}"
    monkeypatch.chdir(REPO)  # a --config path is the repo's
    try:
        PARSERS[script]([word for word in argv if word != "..."])
    except SystemExit:
        pytest.fail(f"{document}: {shlex.join(words)}\n{capsys.readouterr().err}")


def block_after(text, heading):
    section = text.split(f"\n{heading}\n", 1)[1]
    return fenced_blocks(section, "bash")[0]


def test_the_readmes_set_up_and_test_lines_are_the_ones_ci_runs():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text().splitlines()
    set_up = [line for line in block_after(readme, "## Quick start").splitlines()
              if line.startswith(("python3 -m venv", "pip install"))]
    tests = block_after(readme, "### Tests").strip().splitlines()
    assert len(set_up) == 2 and len(tests) == 2
    assert [line for line in ci if line in set_up + tests] == set_up + tests  # all of them, in this order


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_link_between_the_documents_finds_its_file_and_heading():
    for path in DOCUMENTS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            assert linked.exists(), f"{path.name}: {target}: no such file"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", linked.read_text(), flags=re.S),
                                      flags=re.M)
                assert anchor in {slug(h) for h in headings}, f"{path.name}: {target}: no such heading"


# -----------------------------------------------------------------------------
# The commands of the quick start's run, run for real on tiny settings

FRESH = ["--max_iters", "2", "--eval_iters", "1", "--batch_size", "1", "--num_samples", "1"]
TINY = {"resume": ["--max_iters", "3"], "sample.py": ["--num_samples", "1", "--max_new_tokens", "4"]}


def runs_on_the_cpu(words):
    """A command of the quick start's run (its config, its out-shakespeare/, or sample.py's default, which is its
    checkpoint), on the CPU, run by python. Not the export: it takes seconds to rebuild the tokenizer's files, and
    tests/test_hf_convert.py runs it."""
    found = script_of(words)
    if words[0] not in ("python", "python3") or found is None or found[0] not in PARSERS:
        return False
    quick_start = any("shakespeare_cpu.toml" in word or "out-shakespeare" in word for word in words)
    quick_start |= found[0] == "sample.py" and "--init_from" not in words
    return quick_start and "cuda" not in " ".join(words) and "--help" not in words and "--export_hf" not in words


def is_fresh_run(words):
    return script_of(words)[0] == "train_gpt2.py" and "--init_from" not in words


def tiny(words, fresh_runs):
    """The command's arguments on tiny settings; a fresh run after the first in an out_dir of its own, since the
    first writes the out-shakespeare/ that the other commands read."""
    script, argv = script_of(words)
    if is_fresh_run(words):
        return argv + FRESH + ([] if fresh_runs == 0 else ["--out_dir", f"fresh-{fresh_runs}"])
    if script == "train_gpt2.py" and argv[argv.index("--init_from") + 1] == "resume":
        return argv + TINY["resume"]
    return argv + TINY.get(script, [])


def test_the_quick_starts_commands_run(tmp_path, monkeypatch, capsys):
    import train_gpt2
    mains = {"train_gpt2.py": train_gpt2.main, "sample.py": sample.main, "plot.py": plot.main}
    for name in ("config", "input.txt"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    runs = []
    for document, words in documented_commands():
        if runs_on_the_cpu(words) and words not in [w for _, w in runs]:
            runs.append((document, words))
    runs.sort(key=lambda run: not is_fresh_run(run[1]))  # the fresh runs first, each kind in the documents' order
    assert runs and is_fresh_run(runs[0][1]), "no quick start found"
    fresh_runs = 0
    for document, words in runs:
        argv = tiny(words, fresh_runs)
        fresh_runs += is_fresh_run(words)
        try:
            mains[script_of(words)[0]](argv)
        except SystemExit as e:
            if e.code:
                pytest.fail(f"{document}: {shlex.join(words)} exited with {e.code}\n{capsys.readouterr().err}")
    assert (tmp_path / "out-shakespeare" / "best_val_loss.pt").is_file()
    assert (tmp_path / "out-shakespeare" / "plot.png").is_file()
