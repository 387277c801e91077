"""
What every script here shares as a command-line program: the one-line error type, flags built from a config
dataclass, and files written whole or not at all. Nobody's format and no script's logic: the scripts import
these directly.

    from cli import UserError, atomic_write, build_parser, flag

    @dataclass
    class Config:
        steps: int = flag(10, "how many steps")          # becomes --steps, its help shown by --help
    config = Config(**vars(build_parser(Config, "what the script does").parse_args()))
"""

import argparse
import dataclasses
import difflib
import math
import os
import secrets
from pathlib import Path

# -----------------------------------------------------------------------------
# The one-line error


class UserError(ValueError):
    """Bad input from the user: every script's main() prints the message (which names the fix) and exits
    non-zero, without a traceback."""


# -----------------------------------------------------------------------------
# Flags from a dataclass: each field is a flag, its help in the field's metadata


def flag(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


def parse_bool(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def parse_float(text):
    """A finite float: NaN or infinity in a learning rate or a clip value would poison the run silently."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


PARSERS = {"bool": parse_bool, "int": int, "float": parse_float, "str": str,
           bool: parse_bool, int: int, float: parse_float, str: str}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, and whose unknown flags name the nearest real one."""

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            known = [option for action in self._actions for option in action.option_strings]
            for word in message.split(":", 1)[1].split():
                nearest = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
                if word.startswith("--") and nearest:
                    message = f"{message} (did you mean {nearest[0]}?)"
                    break
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(config_class, description):
    """An argparse parser with one --flag per dataclass field, its default and help shown by --help."""
    # no abbreviations: a mistyped --learning_rat must be an error, not silently --learning_rate
    parser = OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           allow_abbrev=False)
    for f in dataclasses.fields(config_class):
        kind = PARSERS.get(f.type, f.type)
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata.get("help", ""),
                            metavar=f.name.upper() if kind is not parse_bool else "{True,False}")
    return parser


# -----------------------------------------------------------------------------
# Atomic writes: a reader sees the old file or the complete new one, never a partial one


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call write(file) on a temporary file beside path, then rename it into place. Used for shards,
    checkpoints, manifests and logs alike. The temporary name is chosen before the file is created, so that
    an interrupt at any instant leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # less the umask, as any new file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
