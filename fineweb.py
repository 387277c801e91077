"""
FineWeb-Edu -> GPT-2 token shards, and the one owner of the shard format and the tokenizer.

    python fineweb.py                                  # sample-10BT into ./edu_fineweb10B
    python fineweb.py --data_files 'my/*.parquet'      # local files instead of the hub

The trainer (train_gpt2.py) imports the shard format and the tokenizer from here, so there is exactly one
place that knows how a shard looks on disk.

Shard format (the same as llm.c's, so shards are interchangeable with it):
    header: 256 little-endian int32 = [MAGIC, VERSION, n_tokens, 0, 0, ...]   (1024 bytes)
    body:   n_tokens little-endian uint16 token ids
"""

import argparse
import base64
import dataclasses
import os
import tempfile
from dataclasses import field
from functools import lru_cache
from pathlib import Path

import numpy as np

# -----------------------------------------------------------------------------
# The shard format

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")  # GPT-2's 50,257 ids fit in uint16


class ShardError(ValueError):
    """A shard that cannot be read: the message names the file and the fix."""


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call write(file) on a temporary file beside path, then rename it into place: readers see the old
    file or the complete new one, never a partial one. Used for shards and checkpoints alike."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from other users
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_shard(path, tokens):
    """Write tokens to path as a shard, atomically."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"token ids must fit in uint16 to be written to {path}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, len(tokens))

    def write(f):
        f.write(header.tobytes())
        f.write(tokens.astype(TOKEN_DTYPE).tobytes())
    atomic_write(path, write)


def read_shard_header(path):
    """Check a shard's header against its size and return its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header; "
                         f"delete it and rerun `python fineweb.py`")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: not a token shard (magic {header[0]}, expected {MAGIC}); "
                         f"regenerate it with `python fineweb.py`")
    if header[1] != VERSION:
        raise ShardError(f"{path}: shard version {header[1]}, this code reads version {VERSION}; "
                         f"regenerate it with `python fineweb.py`")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + n_tokens * TOKEN_DTYPE.itemsize
    if n_tokens <= 0 or size != expected:
        raise ShardError(f"{path}: header says {n_tokens} tokens ({expected} bytes) but the file has {size} bytes; "
                         f"it is truncated or empty: delete it and rerun `python fineweb.py`")
    return n_tokens


def open_shard(path):
    """The shard's tokens as a read-only memmap: nothing is loaded until it is indexed."""
    n_tokens = read_shard_header(path)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


# -----------------------------------------------------------------------------
# The tokenizer: tiktoken's GPT-2 encoding, built from the vendored BPE ranks so it works offline

TOKENIZER_FILE = Path(__file__).resolve().parent / "gpt2.tiktoken"
# GPT-2's pre-tokenizer pattern, as tiktoken's gpt2/r50k_base encoding defines it
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT_TOKEN = 50256


@lru_cache(maxsize=1)
def get_tokenizer():
    import tiktoken

    ranks = {}
    for line in TOKENIZER_FILE.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_TOKEN}, explicit_n_vocab=50257)


def tokenize_document(text):
    """One document as uint16 tokens, with the <|endoftext|> that separates documents in front."""
    tokens = [EOT_TOKEN]
    tokens.extend(get_tokenizer().encode_ordinary(text))
    return np.array(tokens, dtype=TOKEN_DTYPE)


# -----------------------------------------------------------------------------
# Command-line flags from a dataclass, shared with train_gpt2.py: each field is a flag, its help in metadata


def flag(default, help):
    return field(default=default, metadata={"help": help})


def parse_bool(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(config_class, description):
    """An argparse parser with one --flag per dataclass field, its default and help shown by --help."""
    parser = OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(config_class):
        kind = parse_bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(f.type, f.type)
        parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata.get("help", ""),
                            metavar=f.name.upper() if kind is not parse_bool else "{True,False}")
    return parser
