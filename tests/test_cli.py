"""cli.py: flags from a dataclass, typed, finite, unabbreviated, with the nearest flag named on a typo; flag values
from a TOML file, checked the same way; writes that never go through a link, and the clearing of a killed
write's temporary files that leaves everything else alone."""

import importlib.util
import os
import re
from dataclasses import dataclass

import pytest

from cli import UserError, atomic_write, build_parser, flag, lock_directory, parse_flags, remove_temporaries
from conftest import INPUT_TXT, TINY, eval_records, run_main, snapshot, train_losses


@dataclass
class Example:
    max_iters: int = flag(10, "steps")
    learning_rate: float = flag(1e-3, "peak")
    compile: bool = flag(True, "compile")


def parse(*argv):
    return Example(**vars(build_parser(Example, "an example").parse_args(list(argv))))


def test_flags_parse_to_their_field_types():
    assert parse("--max_iters", "300_000", "--learning_rate", "6e-4", "--compile", "False") == Example(300000, 6e-4,
                                                                                                       False)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_a_float_flag_refuses_what_is_not_finite(value, capsys):
    with pytest.raises(SystemExit) as exit:
        parse(f"--learning_rate={value}")
    assert exit.value.code == 2
    assert "expected a finite number" in capsys.readouterr().err


def test_a_mistyped_flag_names_the_nearest_one(capsys):
    with pytest.raises(SystemExit):
        parse("--max_iter", "3")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "unrecognized arguments: --max_iter" in line and "did you mean --max_iters?" in line


@dataclass
class Renamed:
    init_from: str = flag("", "the model", other_names=("--model", "--checkpoint"))
    data: str = flag("", "a file")


@pytest.mark.parametrize("word, meant", [("--model", "--init_from"), ("--checkpoint=x.pt", "--init_from"),
                                         ("--modle", "--init_from"), ("--dat", "--data")])
def test_a_flag_spelled_as_another_script_spells_it_names_ours(word, meant, capsys):
    with pytest.raises(SystemExit):
        build_parser(Renamed, "an example").parse_args([word, "x"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"unrecognized arguments: {word}" in line and f"(did you mean {meant}?)" in line


def test_an_unknown_flag_is_never_sent_to_help(capsys):
    with pytest.raises(SystemExit):
        parse("--model", "gpt2")  # like --help, after the dashes
    assert "did you mean" not in capsys.readouterr().err


@pytest.mark.parametrize("script, args", [
    ("train_gpt2.py", ["--min_lr", "nan"]), ("train_gpt2.py", ["--weight_decay", "inf"]),
    ("train_gpt2.py", ["--grad_clip", "nan"]), ("sample.py", ["--temperature", "nan"]),
    ("hellaswag.py", ["--init_from", "gpt2", "--hellaswag_exampels", "3"]), ("fineweb.py", ["--shard_sise", "3"]),
])
def test_every_script_refuses_bad_flags_in_one_line(script, args):
    result = run_main(script, *args)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "expected a finite number" in line or "did you mean" in line


# -----------------------------------------------------------------------------
# --config FILE.toml: flag values from a file, the command line on top


def parse_with_file(tmp_path, text, *argv):
    (tmp_path / "run.toml").write_text(text)
    parser = build_parser(Example, "an example", config_file=True)
    args, given = parse_flags(parser, ["--config", str(tmp_path / "run.toml"), *argv])
    return Example(**vars(args)), given


def test_a_config_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    config, given = parse_with_file(tmp_path, "max_iters = 300\nlearning_rate = 2e-3\ncompile = false\n",
                                    "--max_iters", "5")
    assert config == Example(max_iters=5, learning_rate=2e-3, compile=False)
    assert given == {"max_iters", "learning_rate", "compile"}  # the file's flags count as given


def test_without_a_config_file_the_given_flags_are_the_command_lines(tmp_path):
    args, given = parse_flags(build_parser(Example, "an example", config_file=True), ["--compile=False"])
    assert Example(**vars(args)) == Example(compile=False) and given == {"compile"}


@pytest.mark.parametrize("text, message", [
    ("max_iter = 3\n", "unknown key 'max_iter' (did you mean max_iters?)"),
    ("batch = 3\n", "unknown key 'batch' (keys are the flag names without --, see --help)"),
    ("max_iters = 3.5\n", "max_iters = 3.5 should be an integer"),
    ("max_iters = true\n", "max_iters = True should be an integer"),
    ("compile = \"yes\"\n", "compile = 'yes' should be true or false"),
    ("learning_rate = \"fast\"\n", "learning_rate = 'fast' should be a number"),
    ("learning_rate = nan\n", "learning_rate = nan: expected a finite number, got 'nan'"),
])
def test_a_bad_key_or_value_in_a_config_file_is_refused_naming_it_and_the_file(tmp_path, text, message):
    with pytest.raises(UserError) as error:
        parse_with_file(tmp_path, text)
    assert str(error.value) == f"{tmp_path / 'run.toml'}: {message}"


def test_a_config_file_that_is_not_toml_or_not_there_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"run.toml is not valid TOML \(.*line 1"):
        parse_with_file(tmp_path, "max_iters: 3\n")
    (tmp_path / "latin1.toml").write_bytes(b'data = "caf\xe9.txt"\n')
    with pytest.raises(UserError, match="latin1.toml is not valid TOML"):
        parse_flags(build_parser(Example, "an example", config_file=True), ["--config", str(tmp_path / "latin1.toml")])
    with pytest.raises(UserError, match="--config nowhere.toml: No such file or directory: pass an existing TOML"):
        parse_flags(build_parser(Example, "an example", config_file=True), ["--config", "nowhere.toml"])


def test_the_lock_is_never_written_through_a_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / ".lock").symlink_to(outside)
    with pytest.raises(UserError, match=re.escape(f"{out_dir / '.lock'} is a symbolic link (to {outside})")):
        lock_directory(out_dir)
    assert outside.read_text() == "precious" and (out_dir / ".lock").is_symlink()
    (out_dir / ".lock").unlink()
    (out_dir / ".lock").symlink_to(tmp_path / "nowhere")  # dangling: nothing is made where it points
    with pytest.raises(UserError, match="is a symbolic link"):
        lock_directory(out_dir)
    assert not (tmp_path / "nowhere").exists()


def test_an_atomic_write_replaces_a_link_and_never_writes_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    (tmp_path / "file").symlink_to(outside)
    atomic_write(tmp_path / "file", lambda f: f.write(b"new"))
    assert outside.read_text() == "precious" and not (tmp_path / "file").is_symlink()
    assert (tmp_path / "file").read_text() == "new"


def test_only_a_killed_writes_own_temporary_files_are_removed(tmp_path):
    ours = [".metrics.jsonl.1234.0badcafe.tmp", ".iter-4-stopped.pt.99.12345678.tmp"]
    theirs = [".notes.tmp", ".metrics.jsonl.tmp", ".other.txt.1234.0badcafe.tmp", ".a.b.tmp"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    (tmp_path / ".x.tmp").mkdir()  # a folder of that shape is nobody's temporary file either
    (tmp_path / ".config.json.1.00000000.tmp").mkdir()
    remove_temporaries(tmp_path, lambda name: name in ("metrics.jsonl", "config.json") or name.endswith(".pt"))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(theirs + [".x.tmp", ".config.json.1.00000000.tmp"])
    assert os.listdir(tmp_path / ".x.tmp") == []


# -----------------------------------------------------------------------------
# Whole classes of bad input, each member in every script that takes it: one line, a non-zero exit, no traceback,
# and nothing of a run touched

LONG_NAME = "x" * 300  # past the 255 bytes of a name on every common file system
DEEP = "[" * 100_000 + "]" * 100_000  # brackets nested past Python's stack


def fill(args, tmp_path, values):
    """args with {name} replaced by values[name], and {toml:TEXT} by a preset file holding TEXT."""
    filled = []
    for arg in args:
        if arg.startswith("{toml:"):
            (tmp_path / "preset.toml").write_text(arg[6:-1] + "\n", encoding="utf-8")
            arg = str(tmp_path / "preset.toml")
        filled.append(arg.format(**values))
    return filled


def refused_in_one_line(script, args, tmp_path, trained_run, *expected):
    run_dir, _ = trained_run
    values = {"long": tmp_path / LONG_NAME, "checkpoint": run_dir / "best_val_loss.pt", "run": run_dir,
              "deep_path": tmp_path.joinpath(*["d" * 200] * 21), "tmp": tmp_path}
    before = snapshot(run_dir)
    result = run_main(script, *fill(args, tmp_path, values))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert any(text in line for text in expected), line
    assert snapshot(run_dir) == before
    return line


@pytest.mark.parametrize("script, args", [
    ("train_gpt2.py", ["--out_dir", "{long}"]),
    ("train_gpt2.py", ["--out_dir", "{deep_path}"]),  # short names, but past the system's whole path
    ("train_gpt2.py", ["--data", "{long}"]),
    ("train_gpt2.py", ["--init_from", "{long}"]),
    ("train_gpt2.py", ["--init_from", "{checkpoint}", "--export_hf", "{long}"]),
    ("train_gpt2.py", ["--hellaswag", "True", "--hellaswag_data", "{long}"]),
    ("train_gpt2.py", ["--config", "{long}"]),
    ("train_gpt2.py", ["--config", "{toml:out_dir = '/tmp/" + LONG_NAME + "'}"]),
    ("sample.py", ["--init_from", "{long}"]),
    ("sample.py", ["--init_from", "{checkpoint}", "--start", "FILE:{long}"]),
    ("plot.py", ["{long}"]),
    ("plot.py", ["{run}", "--out", "{long}/plot.png"]),
    ("bench.py", ["--data", "{long}"]),
    ("bench.py", ["--json_out", "{long}"]),
    ("hellaswag.py", ["--init_from", "{long}"]),
    ("hellaswag.py", ["--init_from", "gpt2", "--data", "{long}"]),
    ("hellaswag.py", ["--init_from", "gpt2", "--cache_dir", "{long}"]),
])
def test_a_path_too_long_for_the_file_system_is_one_line_in_every_script(script, args, tmp_path, trained_run):
    line = refused_in_one_line(script, args, tmp_path, trained_run, "File name too long")
    assert "xxx...xxx" in line or "ddd...ddd" in line  # the path named, its middle left out


def test_an_os_error_on_a_path_deep_in_a_run_is_one_line(tmp_path, trained_run):
    """A path no flag was checked for: the --data kept in a checkpoint, too long here (a run moved from a
    file system that takes longer names). The scripts' one place for OS errors says it."""
    from checkpoint import load_checkpoint, save_checkpoint
    checkpoint = load_checkpoint(trained_run[0] / "best_val_loss.pt")
    checkpoint["config"]["data"] = str(tmp_path / LONG_NAME)
    save_checkpoint(tmp_path / "moved.pt", checkpoint)
    line = refused_in_one_line("train_gpt2.py", ["--init_from", "{tmp}/moved.pt", "--out_dir", "{tmp}/branch"],
                               tmp_path, trained_run, "File name too long: pass a shorter path")
    assert line.startswith("error: ") and not (tmp_path / "branch").exists()


def test_an_os_error_naming_a_file_is_the_same_one_line_in_a_script_on_rank_0_and_on_every_rank(tmp_path, capsys):
    import errno
    from cli import os_errors_as_user_errors, run_command
    from device import Distributed, run_on_ranks
    missing = tmp_path / "missing.txt"
    expected = f"{missing}: No such file or directory: check the path, or pass another"
    with pytest.raises(UserError) as error:
        Distributed().on_rank0(lambda: missing.read_text(), "read a file")
    assert str(error.value) == expected
    for run in (run_command, lambda command: run_on_ranks(lambda join: command())):
        with pytest.raises(SystemExit) as exit_info:
            run(lambda: missing.read_text())
        assert exit_info.value.code == 1 and capsys.readouterr().err.strip() == f"error: {expected}"
    with pytest.raises(OSError) as unnamed:  # an error that names no file is no user's path: it goes on
        with os_errors_as_user_errors():
            raise OSError(errno.EIO, "input/output error")
    assert not isinstance(unnamed.value, UserError)


def test_an_out_dir_without_room_for_a_checkpoints_name_is_refused_before_training(tmp_path):
    """The folder can be made, but a checkpoint's name inside it would pass the system's limit on a whole path:
    refused before the first step, not at the first checkpoint."""
    out_dir = tmp_path.joinpath(*["d" * 200] * 19)
    out_dir = out_dir / ("e" * (os.pathconf(tmp_path, "PC_PATH_MAX") - 40 - len(str(out_dir))))
    result = run_main("train_gpt2.py", *TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("(File name too long): pass a shorter path")
    assert "step" not in result.stdout and not any(out_dir.iterdir())


def test_files_nested_past_pythons_stack_are_one_line_naming_the_file(tmp_path, trained_run):
    import hellaswag
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(DEEP)  # a transformers folder, as --init_from names one
    for script, args, expected in [
        ("train_gpt2.py", ["--config", "{toml:max_iters = " + DEEP + "}"], "preset.toml is not valid TOML (nested"),
        ("train_gpt2.py", ["--init_from", "{tmp}/hf"], "hf/config.json cannot be read (nested"),
        ("hellaswag.py", ["--init_from", "{tmp}/hf", "--data", "{tmp}/hellaswag.jsonl"], "hf/config.json cannot"),
    ]:
        (tmp_path / "hellaswag.jsonl").write_text('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}\n')
        refused_in_one_line(script, args, tmp_path, trained_run, expected)
    # a HellaSwag item: its line skipped, named with the file and line, the rest scored
    (tmp_path / "hellaswag.jsonl").write_text('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}\n'
                                              f'{{"ctx": {DEEP}}}\n')
    examples, problems = hellaswag.load_examples(str(tmp_path / "hellaswag.jsonl"))
    assert len(examples) == 1 and problems == [f"{tmp_path / 'hellaswag.jsonl'}:2: not JSON (nested too deeply to "
                                               "read (brackets or braces past Python's recursion limit)); line skipped"]


def test_a_metrics_line_nested_past_the_stack_is_dropped_on_resume_and_the_run_goes_on_exactly(tmp_path,
                                                                                               trained_run):
    run_dir, _ = trained_run
    out_dir = tmp_path / "out"
    common = [*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--eval_interval", "4", "--num_samples", "4"]
    assert run_main("train_gpt2.py", *common, "--max_iters", "4").returncode == 0
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(f'{{"step": 2, "x": {DEEP}}}\n')
    result = run_main("train_gpt2.py", *common, "--max_iters", "8", "--init_from", "resume")
    assert result.returncode == 0, result.stderr
    assert f"warning: {out_dir / 'metrics.jsonl'}: 1 damaged line(s) dropped" in result.stdout
    assert train_losses(out_dir) == train_losses(run_dir) and eval_records(out_dir) == eval_records(run_dir)
    # and plot.py draws the run around such a line, saying where it is
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(f'{{"step": 9, "x": {DEEP}}}\n')
    if importlib.util.find_spec("matplotlib"):
        plotted = run_main("plot.py", out_dir)
        assert plotted.returncode == 0 and "1 damaged line skipped (first: line" in plotted.stderr


@pytest.mark.parametrize("script, args", [
    ("train_gpt2.py", ["--vocab_size", "1e20"]),
    ("train_gpt2.py", ["--vocab_size", str(10**20)]),
    ("train_gpt2.py", ["--n_embd", str(10**20), "--n_head", "1"]),
    ("train_gpt2.py", ["--n_embd", "1" + "0" * 5000]),  # more digits than int() reads
    ("train_gpt2.py", ["--max_iters", "300.0"]),
    ("train_gpt2.py", ["--config", "{toml:n_embd = 100000000000000000000}"]),
    ("bench.py", ["--vocab_size", str(10**20)]),
    ("bench.py", ["--n_embd", "1e20"]),
    ("sample.py", ["--max_new_tokens", str(2**64)]),
    ("hellaswag.py", ["--init_from", "gpt2", "--batch_size", str(2**64)]),
])
def test_an_integer_flag_past_64_bits_or_a_float_is_one_line_before_anything_is_built(script, args, tmp_path,
                                                                                      trained_run):
    refused_in_one_line(script, args, tmp_path, trained_run, "past the largest integer a flag takes (2**63 - 1)",
                        "expected an integer, got")


@pytest.mark.parametrize("script, args", [
    ("train_gpt2.py", ["--profile_steps", "¹:²"]),
    ("train_gpt2.py", ["--config", "{toml:profile_steps = '1:²'}"]),
    ("train_gpt2.py", ["--config", "{toml:max_iters = ²}"]),
    ("train_gpt2.py", ["--max_iters", "²"]),
    ("train_gpt2.py", ["--max_time", "¹:00:00"]),
    ("bench.py", ["--profile_steps", "⁰:⁵"]),
    ("sample.py", ["--num_samples", "³"]),
    ("hellaswag.py", ["--init_from", "gpt2", "--batch_size", "²"]),
])
def test_superscript_digits_are_one_line_in_every_script(script, args, tmp_path, trained_run):
    refused_in_one_line(script, args, tmp_path, trained_run, "expected an integer, got", "is not A:B",
                        "is not a time", "is not valid TOML")


def test_the_decimal_digits_of_any_script_are_numbers():
    from settings import parse_step_range
    assert parse("--max_iters", "٣٠٠", "--learning_rate", "６e-4") == Example(300, 6e-4, True)
    assert parse("--max_iters", "１２") == Example(max_iters=12)
    assert parse_step_range("١:٣") == (1, 3)
