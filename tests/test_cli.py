"""cli.py: flags from a dataclass, typed, finite, unabbreviated, with the nearest flag named on a typo; flag values
from a TOML file, checked the same way."""

from dataclasses import dataclass

import pytest

from cli import UserError, build_parser, flag, parse_flags
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
