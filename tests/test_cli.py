"""cli.py: flags from a dataclass, typed, finite, unabbreviated, with the nearest flag named on a typo; flag values
from a TOML file, checked the same way; writes that never go through a link, and the clearing of a killed
write's temporary files that leaves everything else alone."""

import os
import re
from dataclasses import dataclass

import pytest

from cli import UserError, atomic_write, build_parser, flag, lock_directory, parse_flags, remove_temporaries
from conftest import run_main


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
