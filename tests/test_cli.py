"""cli.py: flags from a dataclass, typed, finite, unabbreviated, with the nearest flag named on a typo."""

from dataclasses import dataclass

import pytest

from cli import build_parser, flag
from conftest import run_script


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
    ("hellaswag.py", ["--model", "gpt2", "--limt", "3"]), ("fineweb.py", ["--shard_sise", "3"]),
])
def test_every_script_refuses_bad_flags_in_one_line(script, args):
    result = run_script(script, *args)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "expected a finite number" in line or "did you mean" in line
