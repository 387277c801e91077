"""
What every script here shares as a command-line program: the one-line error type, flags built from a config
dataclass, files written whole or not at all, the lock that keeps one writer on a directory, and the stop
signal. Nobody's format and no script's logic: the scripts import these directly.

    from cli import UserError, atomic_write, build_parser, flag

    @dataclass
    class Config:
        steps: int = flag(10, "how many steps")          # becomes --steps, its help shown by --help
    config = Config(**vars(build_parser(Config, "what the script does").parse_args()))

A script whose parser is built with config_file=True also takes --config FILE.toml, flag values in a file, and
parses with parse_flags, which says which flags were given (in the file or on the command line). A field made with
flag(..., path=True) is a path: its parser refuses one that the system cannot take (a name too long). No string
flag takes a NUL character (parse_text), whether from the command line, a TOML file or a checkpoint.
"""

import argparse
import contextlib
import dataclasses
import difflib
import errno
import math
import os
import re
import secrets
import signal
import socket
import stat
import sys
from pathlib import Path

# -----------------------------------------------------------------------------
# The one-line error


class UserError(ValueError):
    """What stops a script with a message instead of a traceback: bad input (the message names the fix) or a
    run stopped on purpose (a signal, a failed write: the message says how to continue). main() prints it and
    exits with code."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def run_command(command):
    """Run a script's command(): a UserError ends it with its one line on stderr and its exit code, an
    OSError on a path with path_error's line (os_errors_as_user_errors), Ctrl-C with status 130."""
    try:
        with os_errors_as_user_errors():
            command()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:
        sys.exit(130)


# -----------------------------------------------------------------------------
# What the user hands a script: paths the system may refuse, files nested past Python's stack


def shown_path(path, limit=160):
    """A path as a message names it: whole, or where it is longer than limit its two ends around an ellipsis."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:100]}...{text[-40:]} ({len(text):,} characters)"


def path_error(error):
    """The one line for an OSError on a path (a name longer than the file system takes, a folder that is
    a file, no permission): the path, what the system said, and the fix; None for an error that names no
    path (os_errors_as_user_errors raises it)."""
    if not isinstance(error, OSError) or error.filename is None:
        return None
    fix = "pass a shorter path" if error.errno == errno.ENAMETOOLONG else "check the path, or pass another"
    return UserError(f"{shown_path(os.fsdecode(error.filename))}: {error.strerror or error}: {fix}")


@contextlib.contextmanager
def os_errors_as_user_errors():
    """An OSError that names a file, raised inside, becomes path_error's UserError: the one line for it in
    every script (run_command), on every rank (device.run_on_ranks) and for what rank 0 does alone
    (Distributed.on_rank0). One that names no file goes on as it is.

    Any file named, not only the paths the flags gave: every file a script opens is one its user named or
    one inside a folder they named (--out_dir, --data, --cache_dir, the Hugging Face cache) or the repo's
    own, so the path and the system's words are what to fix. Telling them apart here would need every
    script's flags passed down, and would still miss paths that differ from the flag's spelling (resolved,
    joined to a folder, a link's target)."""
    try:
        yield
    except OSError as e:
        error = path_error(e)
        if error is None:
            raise
        raise error from None


def parse_text(text):
    """A string flag's value: any text but one holding a NUL character, which no path can hold (the system
    ends a path at it) and no other flag's text needs. A command line cannot pass one, but a TOML file, a
    checkpoint's config or a config built in code can: each is refused with this line (settings.check_types
    asks it too)."""
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"{shown_path(repr(text))} holds a NUL character, which no flag "
                                         "takes: remove it")
    return text


def parse_path(text):
    """A path flag's value, checked before any work: one that no file can ever have (a NUL character, a
    name or a whole path longer than the file system allows, a loop of links) is refused. Any other is
    taken, existing or not: the script says what it needs there, and path_error catches the rest."""
    try:
        os.stat(parse_text(text))
    except OSError as e:
        if e.errno in (errno.ENAMETOOLONG, errno.ELOOP):
            raise argparse.ArgumentTypeError(str(path_error(e))) from None
    return text


def parse_nested(parse, text):
    """parse(text), json.loads or tomllib.loads, where text may nest deeper than Python's stack
    ([[[[... 100,000 levels): a RecursionError becomes the ValueError that every other malformed text
    raises, which each reader turns into its one line naming the file."""
    try:
        return parse(text)
    except RecursionError:
        raise ValueError("nested too deeply to read (brackets or braces past Python's recursion "
                         "limit)") from None


# -----------------------------------------------------------------------------
# Flags from a dataclass: each field is a flag, its help in the field's metadata


def flag(default, help, other_names=(), path=False):
    """A dataclass field that build_parser makes a flag. other_names: how other scripts spell it (build-nanogpt's
    --model_type for --init_from, say); not accepted, but an unknown flag among them is pointed to this one.
    path: the value is a path, checked by parse_path."""
    return dataclasses.field(default=default, metadata={"help": help, "other_names": other_names, "path": path})


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


INT64 = 2**63  # torch's sizes, counts and seeds are 64-bit


def parse_int(text):
    """An integer: what int() reads (underscores, and every script's decimal digits: '٣' is 3, '１２' is 12;
    not superscripts, which int() refuses), within the 64-bit range that torch takes. A float ('1e20',
    '300.0') is refused, not rounded."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None and text.strip().lstrip("+-").replace("_", "").isdecimal():
        value = INT64  # more digits than int() reads: far past the range
    if value is None:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if not -INT64 <= value < INT64:
        raise argparse.ArgumentTypeError(f"{shown_path(text, 40)} is past the largest integer a flag takes "
                                         "(2**63 - 1)")
    return value


PARSERS = {"bool": parse_bool, "int": parse_int, "float": parse_float, "str": parse_text,
           bool: parse_bool, int: parse_int, float: parse_float, str: parse_text}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, and whose unknown flags name the flag meant: the one another script
    spells that way (other_names, {"--model": "--init_from"}), else the nearest real one."""

    other_names = {}

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            for word in message.split(":", 1)[1].split():
                meant = self.flag_meant(word.split("=")[0]) if word.startswith("-") else None
                if meant:
                    message = f"{message} (did you mean {meant}?)"
                    break
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def flag_meant(self, unknown):
        # names compared without their dashes, which would make --model look like --help; --help is no guess
        known = {option.lstrip("-"): option for action in self._actions for option in action.option_strings
                 if option.startswith("--") and option != "--help"}
        known.update({name.lstrip("-"): option for name, option in self.other_names.items()})
        nearest = difflib.get_close_matches(unknown.lstrip("-"), list(known), n=1, cutoff=0.6)
        return known[nearest[0]] if nearest else None


def build_parser(config_class, description, config_file=False):
    """An argparse parser with one --flag per dataclass field, its default and help shown by --help; with
    config_file, also --config FILE.toml (read by parse_flags)."""
    # no abbreviations: a mistyped --learning_rat must be an error, not silently --learning_rate
    parser = OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           allow_abbrev=False)
    if config_file:
        parser.add_argument("--config", default=None, metavar="FILE.toml",
                            help="a TOML file of flag values (keys are the flag names); flags on the command line "
                                 "override it")
    parser.config_file = config_file
    parser.other_names = {name: f"--{f.name}" for f in dataclasses.fields(config_class)
                          for name in f.metadata.get("other_names", ())}
    for f in dataclasses.fields(config_class):
        kind = parse_path if f.metadata.get("path") else PARSERS.get(f.type, f.type)
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata.get("help", ""),
                            metavar=f.name.upper() if kind is not parse_bool else "{True,False}")
    return parser


def parse_flags(parser, argv):
    """(namespace of the flag values, names of the flags given) for argv, where --config FILE.toml gives flag
    values that the rest of the command line overrides. Flags from the file count as given: they are as much
    the user's choice as the ones typed. The namespace holds the flags only, not --config."""
    args = parser.parse_args(argv)  # the command line alone first: its errors (and --help) come before the file's
    words = []
    if parser.config_file:
        words = config_file_words(args.config, parser) if args.config is not None else []
        args = parser.parse_args(words + list(argv))  # argparse keeps a flag's last value: the command line's
        del args.config
    given = {word[2:].split("=")[0] for word in words + list(argv) if word.startswith("--")}
    return args, given - {"config"}


# what a TOML value must be for each flag type, and how to say it
TOML_TYPES = {parse_bool: ((bool,), "true or false"), parse_int: ((int,), "an integer"),
              parse_float: ((int, float), "a number"), parse_text: ((str,), "a string in quotes")}


def read_toml(path):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as a package (requirements.txt installs it)
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return parse_nested(tomllib.loads, f.read().decode())  # TOML is UTF-8
    except OSError as e:
        raise UserError(f"--config {shown_path(path)}: {e.strerror or e}: pass an existing TOML file") from None
    except ValueError as e:  # not TOML, not UTF-8, or nested past the stack
        raise UserError(f"--config {path} is not valid TOML ({e}): fix the file") from None


def config_file_words(path, parser):
    """A TOML file of flag values as command-line words (["--max_iters=300", ...]), each value checked as the
    command line checks it, so that a bad one is refused naming its key and file."""
    flags = {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}
    flags.pop("config", None)
    words = []
    for key, value in read_toml(path).items():
        if key not in flags:
            nearest = difflib.get_close_matches(key, list(flags), n=1, cutoff=0.6)
            hint = f"did you mean {nearest[0]}?" if nearest else "keys are the flag names without --, see --help"
            raise UserError(f"{path}: unknown key {key!r} ({hint})")
        kinds, expected = TOML_TYPES.get(flags[key].type, ((str,), "a string in quotes"))
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            raise UserError(f"{path}: {key} = {value!r} should be {expected}")
        text = str(value)  # True, 300, 0.0006 (a float's str reads back as the same float), or the string
        try:
            flags[key].type(text)
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise UserError(f"{path}: {key} = {value!r}: {e}") from None
        words.append(f"--{key}={text}")  # one word: a string value that starts with - stays a value
    return words


# -----------------------------------------------------------------------------
# Atomic writes: a reader sees the old file or the complete new one, never a partial one


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call write(file) on a temporary file beside path, then rename it into place. Used for shards,
    checkpoints, manifests and logs alike. The temporary name is chosen before the file is created, so that
    an interrupt at any instant leaves no temporary file behind. Nothing is written through a link: the
    temporary file is new (O_EXCL), and the rename replaces a link at path, never its target."""
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


TEMPORARY = re.compile(r"\.(.+)\.[0-9]+\.[0-9a-f]{8}\.tmp")  # atomic_write's name for a file in the making


def remove_temporaries(directory, ours):
    """Delete the temporary files that atomic_write left in directory when a process was killed mid-write,
    for the files that ours(name) says the caller writes; a user's file or folder of another name stays.
    Only for a directory this process holds the lock of: another writer's file would be mid-write."""
    for path in Path(directory).iterdir():
        match = TEMPORARY.fullmatch(path.name)
        if match and ours(match[1]) and stat.S_ISREG(path.lstat().st_mode):
            path.unlink(missing_ok=True)


NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 where the system has none (Windows)


def refuse_links(directory, names):
    """A UserError naming the first of directory's names that is a symbolic link: the caller writes those
    files itself, and writing through a link would change a file elsewhere."""
    for name in names:
        path = Path(directory) / name
        if path.is_symlink():
            raise link_refused(path)


def link_refused(path):
    return UserError(f"{path} is a symbolic link (to {os.readlink(path)}): this program writes that file itself, "
                     f"never through a link; remove the link, then run again")


# -----------------------------------------------------------------------------
# One writer per directory


class DirectoryLock:
    """directory/.lock, held while a process writes the directory, naming its holder: a second writer is
    refused and told who holds it. The kernel drops the lock when the process ends, however it ends, so a
    killed run never leaves a stale lock (only the file, which the next writer takes over). release() deletes
    the file while still holding it; a writer that opened the file just before then finds, once it has the
    lock, that the path names another file, and tries again."""

    def __init__(self, directory, writer="process"):
        import fcntl
        self.path = Path(directory) / ".lock"
        while True:
            try:  # never through a link: the file is truncated and written below
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | NO_FOLLOW, 0o666)
            except OSError:
                if self.path.is_symlink():
                    raise link_refused(self.path) from None
                raise
            self.file = os.fdopen(fd, "r+")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.seek(0)
                holder = self.file.read().strip() or "another process"
                self.file.close()
                raise UserError(f"{directory} is in use by another {writer} ({holder}): wait for it to end, or "
                                f"pass another --out_dir") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            self.file.close()  # released and deleted by its holder meanwhile: take the new one
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self):
        """Give the directory up; a directory that can no longer be written keeps its lock file."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        self.file.close()


def lock_directory(directory, writer="process"):
    """A DirectoryLock on directory; None where the system has no flock (Windows), which then runs unlocked."""
    try:
        return DirectoryLock(directory, writer)
    except ImportError:
        return None


# -----------------------------------------------------------------------------
# The stop signal


class StopSignal:
    """SIGINT or SIGTERM asks a long run to stop at the next safe point (the trainer: the end of the step,
    after a checkpoint). A second SIGINT (Ctrl-C again) stops at once; a SIGTERM after the first request is
    absorbed, since a launcher may send one on top of the signal it passes on."""

    def __init__(self, verbose, what="saving a checkpoint at the end of this step"):
        self.verbose, self.what = verbose, what
        self.requested = None

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.requested is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = signum
        if self.verbose:
            print(f"\n{signal.Signals(signum).name}: {self.what} (Ctrl-C again stops at once)", file=sys.stderr,
                  flush=True)
