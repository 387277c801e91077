"""
FineWeb-Edu -> token shards; and the one owner of the shard format and the tokenizer.

    python fineweb.py                                  # sample-10BT (~10B GPT-2 tokens) into ./edu_fineweb10B
    python fineweb.py --data_files 'my/*.parquet'      # local .parquet/.jsonl/.txt files instead of the Hub
    python fineweb.py --tokenizer my/tokenizer.json    # another tokenizer than GPT-2's
    python fineweb.py --max_tokens 300_000_000         # a quick subset

The top of the file is what the trainer and the tools import: the shard format, the tokenizer, and the
reading of the trainer's --data; importing it loads neither `datasets` nor a process pool. The rest is the job:
documents streamed through `datasets`, tokenized in a pool of processes with the end-of-text token in front of
each, and cut into shards of --shard_size tokens, the first --val_tokens the val split. manifest.json beside
the shards names the source, the tokenizer (the sha256 of its file), the settings, the local input files'
fingerprints, and where each shard ends in the stream: a rerun resumes there, byte-identical to an
uninterrupted run, and refuses changed inputs or settings rather than mix old and new (--restart True).
"""

import base64
import collections
import contextlib
import glob
import hashlib
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from cli import (UserError, atomic_write, build_parser, flag, lock_directory, parse_nested, remove_temporaries,
                 run_command)

# -----------------------------------------------------------------------------
# The shard format: llm.c's
#     header: 256 little-endian int32 = [MAGIC, version, n_tokens, 0, 0, ...]   (1024 bytes)
#     body:   n_tokens token ids, little-endian uint16 (version 1) or uint32 (version 2)
# Version 1 holds GPT-2's ids, version 2 those of a vocabulary past 65,536 ids, as llm.c's LLaMA 3 shards.

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}  # by version


def shard_version(n_vocab):
    """The shard version whose token ids hold a vocabulary of n_vocab ids."""
    return 1 if n_vocab <= 2**16 else 2


def write_shard(path, tokens, version=1):
    """Write tokens to path as a shard of the version given, atomically."""
    tokens, dtype = np.asarray(tokens), TOKEN_DTYPES[version]
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids must fit in {dtype.name} to be written to {path} as version {version}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, version, len(tokens))

    def write(f):
        f.write(header.tobytes())
        f.write(tokens.astype(dtype).tobytes())
    atomic_write(path, write)


def read_shard_header(path):
    """Check a shard's header against its size: its (token count, token dtype)."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise UserError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header; "
                        f"delete it and rerun `python fineweb.py`")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise UserError(f"{path}: not a token shard (magic {header[0]}, expected {MAGIC}); "
                        f"regenerate it with `python fineweb.py`")
    if header[1] not in TOKEN_DTYPES:
        raise UserError(f"{path}: shard version {header[1]}, this code reads versions 1 and 2; "
                        f"regenerate it with `python fineweb.py`")
    n_tokens, dtype = int(header[2]), TOKEN_DTYPES[int(header[1])]
    expected = HEADER_BYTES + n_tokens * dtype.itemsize
    if n_tokens <= 0 or size != expected:
        raise UserError(f"{path}: header says {n_tokens} tokens ({expected} bytes) but the file has {size} bytes; "
                        f"it is truncated or empty: delete it and rerun `python fineweb.py`")
    return n_tokens, dtype


def open_shard(path):
    """The shard's tokens as a read-only memmap: nothing is loaded until it is indexed."""
    n_tokens, dtype = read_shard_header(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def shard_valid(path, n_tokens):
    """Whether path is a readable shard of n_tokens tokens, by its header and size."""
    try:
        return read_shard_header(path)[0] == n_tokens
    except (OSError, UserError):
        return False


# The naming rule that tells the splits apart: a shard of split S is a .bin file with S in its name (the
# trainer reads every such file in its --data directory; shard_prefix keeps the words out of the prefix)
SPLITS = ("train", "val")


def shard_split(name):
    """"train" or "val" for a shard file's name, None for any other file."""
    if name.startswith(".") or not name.endswith(".bin"):
        return None
    return next((split for split in SPLITS if split in name), None)


def shard_files(directory, split):
    """The shards of one split in directory, sorted by name."""
    return sorted(p for p in Path(directory).iterdir() if shard_split(p.name) == split)


# -----------------------------------------------------------------------------
# The tokenizer: GPT-2's by default (tiktoken, from the vendored BPE ranks, so that it works offline), any
# tiktoken ranks file, or a Hugging Face `tokenizers` JSON file. It is known by what it is: the sha256 of the
# file's bytes, which manifest.json, config.json and every checkpoint record.

GPT2_TOKENIZER = Path(__file__).resolve().parent / "gpt2.tiktoken"
# GPT-2's pre-tokenizer pattern, as tiktoken's gpt2/r50k_base encoding defines it
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# a tokenizers JSON file's end-of-text token: the first of these that it has
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class Tokenizer:
    """A tokenizer as the repo uses it, whichever library runs it: encode(text) -> ids, with special tokens'
    names read as text (documents, HellaSwag); encode_prompt(text) -> ids, those names read as the tokens
    (a sample's prompt); decode(ids) -> text; text_bytes(ids), the bytes of text ids stand for (bits per
    byte); eot, the end-of-text id in front of every document; n_vocab, ids being 0 .. n_vocab - 1; and
    sha256, its identity, the hash of the file it was built from."""

    def __init__(self, name, content, path=None):
        self.name, self.content, self.path = name, content, path
        self.sha256 = hashlib.sha256(content).hexdigest()

    def record(self):
        """What manifest.json and config.json say of it."""
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "n_vocab": self.n_vocab,
                "eot": self.eot}

    def checkpoint_record(self):
        """What a checkpoint says of it: its file's content too, so that the checkpoint alone samples and
        exports (None for GPT-2's, which the repo holds)."""
        gpt2 = self.sha256 == load_tokenizer().sha256
        return {**self.record(), "content": None if gpt2 else self.content.decode("utf-8")}

    def text_bytes(self, ids):
        """How many bytes of UTF-8 text ids (an array) stand for, token by token, so that a character whose
        bytes two pieces of text share is counted once, whole: the sum of each token's bytes
        (byte_lengths). Tokens that stand for no text count none: the end-of-text token."""
        return int(self.byte_lengths[np.asarray(ids, dtype=np.int64)].sum())


class TiktokenTokenizer(Tokenizer):
    """A tiktoken ranks file (a base64 token and its rank a line, as gpt2.tiktoken): byte-level BPE of
    GPT-2's kind, text split by GPT-2's pattern, <|endoftext|> the id after the last rank."""

    def __init__(self, name, content, path=None):
        super().__init__(name, content, path)
        import tiktoken
        ranks = {}
        for line in content.splitlines():  # as tiktoken.load does, from bytes rather than a path or URL
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
        self.eot = max(ranks.values(), default=-1) + 1
        self.encoding = tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                          special_tokens={END_OF_TEXT[0]: self.eot})
        self.n_vocab = self.encoding.n_vocab
        self.encode = self.encoding.encode_ordinary  # the bound method itself: called once a document

    def encode_prompt(self, text):
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids):
        return self.encoding.decode(ids)

    @cached_property
    def byte_lengths(self):
        """Each id's bytes (the ranks' own; none for the end-of-text token, or an id a ranks file skips)."""
        lengths = np.zeros(self.n_vocab, dtype=np.int64)
        for i in range(self.n_vocab):
            with contextlib.suppress(KeyError):
                lengths[i] = len(self.encoding.decode_single_token_bytes(i))
        lengths[self.eot] = 0
        return lengths


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` JSON file, as Tokenizer.save writes it (tokenizer.json)."""

    def __init__(self, name, content, path=None):
        super().__init__(name, content, path)
        from tokenizers import Tokenizer as Backend
        self.backend = Backend.from_str(content.decode("utf-8"))
        ids = [self.backend.token_to_id(token) for token in END_OF_TEXT]
        if all(i is None for i in ids):
            raise ValueError(f"it has none of the end-of-text tokens {', '.join(END_OF_TEXT)}: train it with "
                             f"special_tokens=['{END_OF_TEXT[0]}']")
        self.eot = next(i for i in ids if i is not None)
        self.n_vocab = self.backend.get_vocab_size(with_added_tokens=True)
        self.backend.encode_special_tokens = True  # as tiktoken's encode_ordinary: "<|endoftext|>" is text

    def encode(self, text):
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text):
        self.backend.encode_special_tokens = False
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        finally:
            self.backend.encode_special_tokens = True

    def decode(self, ids):
        return self.backend.decode(ids, skip_special_tokens=False)

    def text_bytes(self, ids):
        """Bytes of text (Tokenizer.text_bytes): a byte-level tokenizer's token by token (byte_lengths), any
        other's (whose tokens are whole characters) as its decoded text's, but for the tokens that stand for
        no text: special ones (end-of-text) and the unknown token, whose text the ids do not keep (its name,
        "[UNK]" say, is no text of the data's)."""
        if self.byte_level:
            return super().text_bytes(ids)
        no_text = self.no_text
        return len(self.decode([i for i in np.asarray(ids).tolist() if i not in no_text]).encode("utf-8"))

    @cached_property
    def no_text(self):
        """The ids that stand for no text: special tokens, and the unknown token."""
        ids = {i for i, token in self.backend.get_added_tokens_decoder().items() if token.special}
        unknown = getattr(self.backend.model, "unk_token", None)
        return ids | ({self.backend.token_to_id(unknown)} - {None} if unknown else set())

    @cached_property
    def byte_level(self):
        """Whether its tokens spell bytes (GPT-2's kind: a ByteLevel decoder), not characters."""
        from tokenizers import decoders
        return isinstance(self.backend.decoder, decoders.ByteLevel)

    @cached_property
    def byte_lengths(self):
        """A byte-level tokenizer's bytes for each id: one a character of its token's name, each of which
        spells a byte in GPT-2's byte alphabet (an added token's name is its text: its UTF-8 bytes); none for
        the tokens that stand for no text."""
        from tokenizers import pre_tokenizers
        alphabet, no_text = set(pre_tokenizers.ByteLevel.alphabet()), self.no_text
        lengths = np.zeros(self.n_vocab, dtype=np.int64)
        for i in range(self.n_vocab):
            token = self.backend.id_to_token(i)
            if token is not None and i not in no_text:
                lengths[i] = len(token) if set(token) <= alphabet else len(token.encode("utf-8"))
        return lengths


@lru_cache(maxsize=8)
def make_tokenizer(name, content, path=None):
    """The tokenizer a file's content defines: a JSON object is a tokenizers file, anything else tiktoken ranks.
    Raises ValueError for content that is neither."""
    kind = HFTokenizer if content.lstrip().startswith(b"{") else TiktokenTokenizer
    try:
        return kind(name, content, path)
    except Exception as e:  # each library's parser raises types of its own: whatever it is, no tokenizer here
        raise ValueError(first_line(e)) from None


@lru_cache(maxsize=8)
def load_tokenizer(spec="gpt2"):
    """The tokenizer that --tokenizer names: gpt2 (GPT-2's), a tiktoken ranks file, or a tokenizers JSON file."""
    path = GPT2_TOKENIZER if spec == "gpt2" else Path(spec).resolve()
    try:
        content = path.read_bytes()
    except OSError as e:
        raise UserError(f"--tokenizer {spec} cannot be read ({e.strerror or e}): pass gpt2, a tiktoken ranks "
                        f"file or a tokenizers JSON file") from None
    try:  # the record names GPT-2's as --tokenizer does: where the repo is differs between machines
        return make_tokenizer(path.name, content, spec if spec == "gpt2" else str(path))
    except ValueError as e:
        raise UserError(f"--tokenizer {spec} is neither a tiktoken ranks file nor a tokenizers JSON file that "
                        f"works here ({e}): pass another") from None


def checkpoint_tokenizer(record, path):
    """The tokenizer of a checkpoint's record (checkpoint_record's; None in a checkpoint from before the
    tokenizer was recorded: GPT-2's); path names the checkpoint in errors."""
    if record is None or record.get("content") is None:
        tokenizer = load_tokenizer()
    else:
        try:
            tokenizer = make_tokenizer(record["name"], record["content"].encode("utf-8"))
        except ValueError as e:
            raise UserError(f"checkpoint {path}: its tokenizer cannot be built ({e}): it is damaged; use "
                            f"another checkpoint of the run") from None
    if record is not None and record["sha256"] != tokenizer.sha256:
        raise UserError(f"checkpoint {path}: its tokenizer is not the one it records (sha256 "
                        f"{record['sha256'][:12]}): it is damaged; use another checkpoint of the run")
    return tokenizer


def describe_tokenizer(record):
    """A tokenizer's record in a few words, for messages."""
    return f"{record.get('path') or record.get('name')} (sha256 {str(record.get('sha256'))[:12]})"


def check_vocab_size(vocab_size, model, tokenizer):
    """A model whose embedding has a row for every id of the tokenizer that its data is in."""
    if vocab_size < tokenizer.n_vocab:
        raise UserError(f"{model} has vocab_size={vocab_size}, fewer than the {tokenizer.n_vocab:,} token ids of "
                        f"its tokenizer {tokenizer.name}: pass a model of that tokenizer's vocabulary (a new run's "
                        f"--vocab_size follows its --tokenizer unless given)")


# -----------------------------------------------------------------------------
# Reading a split of the trainer's --data: shards (of the tokenizer their manifest.json names), or a text
# file tokenized on the fly

MANIFEST = "manifest.json"
# what manifests said of GPT-2's tokenizer before they recorded its sha256
LEGACY_TOKENIZERS = {"gpt2 (tiktoken), <|endoftext|> before each document": "gpt2"}


def read_json(path, fix):
    """The JSON object in path; a file that cannot be read or parsed, or holds no object, is refused with fix."""
    try:
        value = parse_nested(json.loads, Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({first_line(e)}): {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is damaged (not a JSON object): {fix}")
    return value


def manifest_tokenizer(manifest):
    """The record of the tokenizer a manifest names (an older fineweb.py's words for GPT-2's read as its
    record); None if it names none."""
    record = manifest.get("tokenizer")
    if isinstance(record, str) and record in LEGACY_TOKENIZERS:
        return load_tokenizer(LEGACY_TOKENIZERS[record]).record()
    return record if isinstance(record, dict) and isinstance(record.get("sha256"), str) else None


@lru_cache(maxsize=2)
def tokenize_text_file(path, tokenizer):
    """A whole text file's tokens, read once for both splits. A binary file (a token shard, say: its header
    holds zero bytes) or an empty one is refused."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"--data {path} cannot be read ({e.strerror or e}): fix its permissions or "
                        f"pass another file") from None
    if not raw.strip():
        raise UserError(f"--data {path} is empty: pass a text file with text in it, or a directory of shards")
    if b"\0" in raw:
        raise UserError(f"--data {path} is a binary file, not text (a token shard?): pass the directory that "
                        f"holds the shards (--data DIR), or a text file")
    tokens = tokenizer.encode(raw.decode("utf-8", errors="replace"))
    return np.array(tokens, dtype=TOKEN_DTYPES[shard_version(tokenizer.n_vocab)])


def load_token_sources(data, split, tokenizer):
    """[(name, tokens)] for one split: the shards of a directory, or 90/10 of a text file, which the
    tokenizer (the run's) tokenizes. Shards that manifest.json says are of another tokenizer are refused."""
    path = Path(data)
    if path.is_file():
        tokens = tokenize_text_file(str(path.resolve()), tokenizer)
        n_train = int(0.9 * len(tokens))
        part = tokens[:n_train] if split == "train" else tokens[n_train:]
        return [(f"{path.name}[{split}]", part)]
    if not path.is_dir():
        raise UserError(f"--data {data}: no such file or directory; make shards with `python fineweb.py` "
                        f"or pass a text file such as --data input.txt")
    check_shards_tokenizer(path, tokenizer)
    shards = shard_files(path, split)
    if not shards:
        raise UserError(f"no {split} shards (*{split}*.bin) in {data}/: run `python fineweb.py` to make them")
    for shard in shards:  # every name like a shard's is read as one
        if not shard.is_file():
            what = "a link to nothing" if shard.is_symlink() and not shard.exists() else "not a file"
            raise UserError(f"{shard} is named like a {split} shard but is {what}: remove it from {data}, or "
                            f"rerun `python fineweb.py`")
    return [(shard.name, open_shard(shard)) for shard in shards]  # an OSError names its file (cli.path_error)


def check_shards_tokenizer(directory, tokenizer):
    """Refuse shards whose manifest.json names another tokenizer. Shards without one are taken as the run's."""
    path = directory / MANIFEST
    if not path.is_file():
        return
    fix = f"delete it (the shards are then taken as {tokenizer.name}'s) or rerun `python fineweb.py`"
    record = manifest_tokenizer(read_json(path, fix))
    if record is None:
        raise UserError(f"{path} names no tokenizer: {fix}")
    if record["sha256"] != tokenizer.sha256:
        raise UserError(f"{directory} holds shards of the tokenizer {describe_tokenizer(record)} (its {MANIFEST} "
                        f"says), and this run's is {describe_tokenizer(tokenizer.record())}: pass --data made with "
                        f"this tokenizer (fineweb.py --tokenizer), or train a new run with --tokenizer "
                        f"{record.get('path')}")


def read_span(name, tokens, start, length, n_vocab):
    """tokens[start:start + length] as int64, checked on the way: a shard file that shrank since it was
    opened would crash the memmap read, and an id past the vocabulary would index past the embedding."""
    path = getattr(tokens, "filename", None)
    if path is not None and os.stat(path).st_size != HEADER_BYTES + tokens.nbytes:
        raise UserError(f"{path} changed size since the run began: restore it, or regenerate the data and "
                        f"start a new run")
    span = np.array(tokens[start:start + length], dtype=np.int64)
    if span.size and span.max() >= n_vocab:
        raise UserError(f"{name}: token id {span.max()} near offset {start} is outside the tokenizer's "
                        f"{n_vocab:,} ids: the shard is corrupt or from another tokenizer; regenerate it "
                        f"with `python fineweb.py`")
    return span


def check_unchanged(tokens):
    """A shard's header still says what it said when the run opened it."""
    path = getattr(tokens, "filename", None)
    if path is not None and not shard_valid(path, len(tokens)):
        raise UserError(f"{path} changed since the run began (its header or size differs): restore it, or "
                        f"regenerate the data and start a new run")


def fingerprint(tokens):
    """A digest of all of a token source, to tell data that changed under the same name and size on
    resume, wherever it changed. About 0.5 s for a 100M-token shard (blake2b, one core), which the
    trainer pays once per shard and process, in its loader's thread (train_gpt2.ShardLoader)."""
    digest = hashlib.blake2b(len(tokens).to_bytes(8, "little"), digest_size=8)
    data = np.ascontiguousarray(tokens)
    step = 1 << 24  # in pieces: hashlib lets other threads run while it hashes each
    for start in range(0, len(data), step):
        digest.update(memoryview(data[start:start + step]).cast("B"))
    return digest.hexdigest()


def sampled_fingerprint(tokens, samples=64, span=256):
    """The digest that checkpoints kept before fingerprint() read the whole source: all of a small one,
    else `samples` evenly spaced spans of `span` tokens. Such a checkpoint is checked against both."""
    if len(tokens) <= 4 * samples * span:
        return fingerprint(tokens)
    digest = hashlib.blake2b(len(tokens).to_bytes(8, "little"), digest_size=8)
    for start in np.linspace(0, len(tokens) - span, samples).astype(np.int64):
        digest.update(np.asarray(tokens[start:start + span]).tobytes())
    return digest.hexdigest()


# =============================================================================
# The job: documents in, shards out
# -----------------------------------------------------------------------------
# Its flags

MIN_SHARD_SIZE = 1024  # one GPT-2 context; below that the trainer could not take a single sequence from a shard
MAX_SHARD_SIZE = 2**31 - 1  # the header's int32 token count


@dataclass
class FineWebConfig:
    dataset: str = flag("HuggingFaceFW/fineweb-edu",
                        "Hugging Face dataset to stream (HuggingFaceFW/fineweb works too); it "
                        "also names the shards: edufineweb_*, fineweb_* (--data_files: local_*)")
    name: str = flag("sample-10BT", "the dataset's configuration: sample-10BT (~10B tokens), sample-100BT, "
                                    "sample-350BT or default (all of it)")
    data_files: str = flag("", "read these local files instead of the Hub: .parquet, .jsonl/.json or .txt (one "
                               "document per .txt file); paths or globs, separated by commas or given as separate "
                               "words (as an unquoted glob gives them); empty: the Hub")
    text_column: str = flag("text", "the column holding each document's text")
    tokenizer: str = flag("gpt2", "gpt2 (GPT-2's), a tiktoken ranks file (FILE.tiktoken) or a Hugging Face "
                                  "tokenizers JSON file (tokenizer.json); manifest.json records its sha256",
                          path=True)
    out_dir: str = flag("edu_fineweb10B", "where the shards and manifest.json are written", path=True)
    shard_size: int = flag(10**8, f"tokens per shard (2 bytes each; 4 past 65,536 token ids), at least "
                                  f"{MIN_SHARD_SIZE}; the trainer takes each batch from within one shard, so keep "
                                  f"it far above a batch")
    val_tokens: int = flag(None, "tokens in the val split, taken first from the stream; 0 for none. Unset: "
                                 "100000000 from the Hub; from --data_files a tenth of their tokens (as "
                                 "estimated from their sizes) up to that")
    max_tokens: int = flag(0, "stop after this many tokens, val included, for a quick subset; 0 for all")
    num_proc: int = flag(max(1, (os.cpu_count() or 1) // 2),
                         "tokenizer processes; the default is half this machine's cores")
    restart: bool = flag(False, "delete the shards and manifest.json that fineweb.py wrote in "
                                "--out_dir and tokenize afresh, as when the inputs or the settings "
                                "changed; other files stay")

    def validate(self):
        """Raise UserError naming the problem and the fix; called before any work is done. (--max_tokens
        against the val split: choose_val_tokens, which knows the split when --val_tokens is unset.)"""
        if not MIN_SHARD_SIZE <= self.shard_size <= MAX_SHARD_SIZE:
            raise UserError(f"--shard_size {self.shard_size} is out of range: pass {MIN_SHARD_SIZE} to "
                            f"{MAX_SHARD_SIZE} tokens (the default 100000000 makes 200 MB shards)")
        if self.val_tokens is not None and self.val_tokens < 0:
            raise UserError(f"--val_tokens must be 0 or more, got {self.val_tokens}")
        if self.max_tokens < 0:
            raise UserError(f"--max_tokens must be 0 (no limit) or more, got {self.max_tokens}")
        if self.num_proc < 1:
            raise UserError(f"--num_proc must be 1 or more, got {self.num_proc}")
        if not self.text_column:
            raise UserError("--text_column is empty: name the column that holds the text, such as text")


def parse_args(argv=None):
    argv = join_data_files(sys.argv[1:] if argv is None else list(argv))
    return FineWebConfig(**vars(build_parser(FineWebConfig, __doc__.strip().splitlines()[0]).parse_args(argv)))


def join_data_files(argv):
    """argv with the words that follow --data_files's value, up to the next flag, joined to it by commas: an
    unquoted glob reaches the script as one word per file, in the shell's order. The script takes no
    positional arguments, so those words were an error before; every other flag stays one value."""
    joined = []
    for word in argv:
        takes_more = joined and (joined[-1].startswith("--data_files=") or joined[-2:-1] == ["--data_files"])
        if takes_more and not word.startswith("-"):
            joined[-1] += "," + word
        else:
            joined.append(word)
    return joined


DEFAULT_VAL_TOKENS = 10**8
BYTES_PER_TOKEN = 4  # GPT-2 takes 3.3 bytes of Shakespeare a token, about 4.5 of English web text


def choose_val_tokens(config, files, builder):
    """--val_tokens; unset, 100M from the Hub, and from local files, which 100M would overrun unless they
    are big, a tenth of their tokens up to that, estimated from their sizes (so the same on a rerun)."""
    val = DEFAULT_VAL_TOKENS if config.val_tokens is None else config.val_tokens
    if config.val_tokens is None and files:
        tokens = estimated_tokens(files, builder, config.text_column)
        val = min(val, tokens // 10)
        print(f"val split: {val:,} tokens, a tenth of the ~{tokens:,} tokens estimated from the files' sizes "
              f"(pass --val_tokens N to choose)")
    if 0 < config.max_tokens <= val:
        raise UserError(f"--max_tokens {config.max_tokens} leaves nothing for training after --val_tokens "
                        f"{val}: raise --max_tokens or lower --val_tokens")
    return val


def estimated_tokens(files, builder, column):
    """Roughly the tokens in the local files at BYTES_PER_TOKEN: a parquet file's text column uncompressed
    (its footer says), any other file whole."""
    if builder != "parquet":
        return sum(os.path.getsize(path) for path in files) // BYTES_PER_TOKEN
    import pyarrow.parquet as pq
    size = 0
    for path in files:
        meta = pq.read_metadata(path)  # readable: check_has_documents read it
        for group in map(meta.row_group, range(meta.num_row_groups)):
            chunks = map(group.column, range(group.num_columns))
            size += sum(c.total_uncompressed_size for c in chunks if c.path_in_schema == column)
    return size // BYTES_PER_TOKEN


# -----------------------------------------------------------------------------
# The documents: streamed through `datasets` from the Hub or from local files, each local file a stream of
# its own, so that whatever fails while it is read is reported with its name

BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
BATCH_DOCS = 512  # documents per tokenizer task: ~2 MB of FineWeb text, a fraction of a second's work


def resolve_data_files(data_files):
    """The local files behind --data_files, sorted within each pattern so that the order (and so the shards)
    never depends on the file system, and the `datasets` builder that reads them. ([], None) for the Hub."""
    if not data_files:
        return [], None
    files = []
    for pattern in (p.strip() for p in data_files.split(",") if p.strip()):
        matches = [m for m in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) if os.path.isfile(m)]
        if not matches:
            raise UserError(f"--data_files {pattern}: no such file; check the path or glob")
        files += [m for m in matches if m not in files]
    kinds = {}
    for f in files:
        suffix = Path(f).suffix.lower()
        if suffix not in BUILDERS:
            raise UserError(f"--data_files: {f} is not a .parquet, .jsonl, .json or .txt file; convert it or "
                            f"leave it out")
        kinds.setdefault(BUILDERS[suffix], f)
    if len(kinds) > 1:
        raise UserError(f"--data_files mixes {' and '.join(kinds)} files ({', '.join(kinds.values())}): "
                        f"make the shards from one kind")
    return files, next(iter(kinds))


def check_has_documents(files, builder):
    """Refuse a file without documents before any work: `datasets` would fail on it with a message that does
    not name it (StopIteration for an empty .jsonl file, "BatchSize must be greater than 0" for a parquet file
    without rows), or make an empty .txt file an empty document. Reads a parquet file's footer and, of a .jsonl
    file, up to its first non-blank byte."""
    for path in files:
        problem = None
        if os.path.getsize(path) == 0:
            problem = "is empty (0 bytes)"
        elif builder == "json":
            with open(path, "rb") as f:
                if not any(block.strip() for block in iter(lambda: f.read(1 << 20), b"")):
                    problem = "holds only blank lines"
        elif builder == "parquet":
            import pyarrow.parquet as pq
            try:
                if pq.read_metadata(path).num_rows == 0:
                    problem = "is a parquet file without rows"
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                problem = f"is not a readable parquet file ({first_line(e)})"
        if problem:
            raise UserError(f"--data_files: {path} {problem}: leave it out (delete it if a glob picks it up) or "
                            f"replace it with a complete copy")


FINGERPRINT_WHOLE = 1 << 22  # files up to 4 MiB are hashed whole
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 64, 1 << 16  # larger ones: 4 MiB spread over the file


def input_record(path):
    """What tells whether a local file changed since its shards were made: its size, modification time and
    a cheap fingerprint of its content (blake2b of the whole file when small, else of evenly spaced blocks,
    the first and the last among them): a rerun over 20 GB reads megabytes."""
    stat = os.stat(path)
    digest = hashlib.blake2b(stat.st_size.to_bytes(8, "little"), digest_size=16)
    with open(path, "rb") as f:
        if stat.st_size <= FINGERPRINT_WHOLE:
            digest.update(f.read())
        else:
            for start in np.linspace(0, stat.st_size - FINGERPRINT_BLOCK, FINGERPRINT_BLOCKS).astype(np.int64):
                f.seek(int(start))
                digest.update(f.read(FINGERPRINT_BLOCK))
    return {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "fingerprint": digest.hexdigest()}


def describe_read_error(error, source, files, path=None):
    """One line for what reading the documents raised, naming the problem and the fix: a damaged local file
    (path), the local files, or the Hub, told apart by the exception types that `datasets` and the Hub's
    client export."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    reason = f"{type(error).__name__}: {first_line(error)}"
    if path is not None:
        if isinstance(error, UnicodeDecodeError):  # a .txt file
            return f"--data_files: {path} is not UTF-8 text: convert it to UTF-8 or leave it out, then rerun"
        return (f"--data_files: {path} cannot be read ({reason}): replace it with a sound copy or leave it "
                f"out, then rerun")
    if files:
        return f"cannot read {source} ({reason}): check the files"
    if isinstance(error, (DatasetNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)):
        return (f"{source} was not found on the Hugging Face Hub ({first_line(error)}); check --dataset and "
                f"--name, e.g. HuggingFaceFW/fineweb-edu with sample-10BT")
    if isinstance(error, HfHubHTTPError):
        return f"the Hugging Face Hub refused {source}: {first_line(error)}"
    if isinstance(error, OSError):  # the client's network errors, of whichever HTTP library, and offline mode's
        return (f"cannot reach the Hugging Face Hub to stream {source} ({first_line(error)}); check the network "
                f"connection and that HF_HUB_OFFLINE is unset, or download the dataset's parquet files on a "
                f"machine with network access and pass --data_files 'DIR/*.parquet'")
    return f"cannot read {source} ({reason})"


def load_stream(config, files, builder):
    """The IterableDataset of the documents, in a fixed order, and its source's name."""
    # `datasets` would import torch (2 s, and a bigger process) only to share an epoch counter with torch
    # DataLoader workers, which are not used here
    os.environ.setdefault("USE_TORCH", "0")
    import datasets
    import huggingface_hub
    datasets.disable_progress_bars()
    # its readers log an error before raising it, and the exception is reported here in one line
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    huggingface_hub.utils.logging.set_verbosity_error()  # retry warnings would bury the one-line error
    if files:
        source, path, options = f"--data_files {config.data_files}", builder, {"data_files": files}
        if builder == "text":
            options["sample_by"] = "document"  # a .txt file is one document, not one a line
    else:
        source, path, options = f"{config.dataset} ({config.name})", config.dataset, {"name": config.name or None}
        print(f"streaming {source} from the Hugging Face Hub")
    try:
        ds = datasets.load_dataset(path, split="train", streaming=True, **options)
    except Exception as e:  # whatever `datasets`, pyarrow or the Hub's client raise: described by its type
        raise UserError(describe_read_error(e, source, files)) from None
    if ds.features is not None:
        # before any document is read: pyarrow's parquet reader reads ahead in threads of its own, and one still
        # reading while the interpreter shuts down on the error aborts the process ("terminate called without an
        # active exception", exit status 134)
        check_text_column(ds.features.arrow_schema, source, config.text_column)
        ds = ds.select_columns([config.text_column])
    return ds.with_format("arrow"), source  # Arrow batches: no Python object per document in this process


def stream_batches(ds, files, source, column, skip):
    """The texts as Arrow string arrays of BATCH_DOCS documents (or a few more), less the first `skip`, which a
    resumed run has already written (skipping costs reading them, not tokenizing them). Each local file is read
    as the stream's shard of its own (as `datasets` shards local files: one a file), so that an error names it;
    a batch runs on from one file into the next."""
    import pyarrow as pa
    parts = ([(path, ds.shard(num_shards=len(files), index=i)) for i, path in enumerate(files)]
             if files and ds.n_shards == len(files) else [(None, ds)])
    chunks, size = [], 0  # the texts read and not yet handed on
    for path, part in parts:
        tables, first = iter(part.iter(batch_size=BATCH_DOCS)), 0  # first: the part's index of a table's first row
        while True:
            try:
                table = next(tables)
            except StopIteration:
                break
            except Exception as e:  # a damaged file (pyarrow's, json's or UTF-8's errors) or a failed download
                kept = "" if path else "; the shards written so far are kept: rerun the same command to resume"
                raise UserError(describe_read_error(e, source, files, path) + kept) from None
            check_text_column(table.schema, source, column)  # again, for a stream whose schema is read with it
            if table.num_rows > skip:
                texts = table.column(column).slice(skip)
                check_utf8(texts, path, source, first + skip)
                chunks, size = chunks + texts.chunks, size + len(texts)
            skip, first = max(0, skip - table.num_rows), first + table.num_rows
            if size >= BATCH_DOCS:
                yield pa.concat_arrays(chunks)  # a compact copy: a slice would carry its parent's buffers along
                chunks, size = [], 0
    if chunks:
        yield pa.concat_arrays(chunks)


def check_text_column(schema, source, column):
    """Refuse a --text_column that the Arrow schema lacks or that holds something other than strings."""
    import pyarrow as pa
    if column not in schema.names:
        raise UserError(f"{source} has no column {column!r}, only {schema.names}: pass --text_column NAME")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"column {column!r} of {source} holds {kind}, not text: pass --text_column NAME")


def check_utf8(texts, path, source, first):
    """Refuse texts (Arrow strings, documents `first` on of the local file path, or of the Hub's stream) that
    are not valid UTF-8, which pyarrow's JSON and parquet readers pass on unchecked and the tokenizer fails
    on."""
    import pyarrow as pa
    try:
        texts.validate(full=True)  # at ~10 GB/s, a few percent of the main process's time
        return
    except pa.ArrowInvalid:
        pass
    bad = first
    for i in range(len(texts)):
        try:
            texts[i].as_py()
        except UnicodeDecodeError:
            bad += i
            break
    if path is None:
        raise UserError(f"{source}: document {bad:,} (from 0) is not UTF-8 text: repair the data")
    raise UserError(f"--data_files: {path} holds text that is not UTF-8 (its document {bad:,}, from 0): repair "
                    f"or replace it, or leave it out, then rerun")


def open_documents(config, files, builder, skip):
    """(batches of texts, their source's name, its document count or None), the first batch already read so
    that a wrong column or an unreachable Hub is reported before any work starts."""
    ds, source = load_stream(config, files, builder)
    batches = stream_batches(ds, files, source, config.text_column, skip)
    first = next(batches, None)
    splits = ds.info.splits  # None for local files
    total = splits["train"].num_examples if splits and "train" in splits else None
    return itertools.chain([first] if first is not None else [], batches), source, total


# -----------------------------------------------------------------------------
# Tokenizing in processes: a ProcessPoolExecutor, which reports a worker that died (the OOM killer) as
# BrokenProcessPool, where build-nanogpt's multiprocessing.Pool waits forever for the task it held, and cannot
# even be terminated when the worker died holding the task queue's lock. (A worker killed in the moment that
# its result crosses the pipe still leaves the executor waiting for the rest of it: kill the run, and rerun.)

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def start_worker():
    """In each tokenizer process: Ctrl-C, which reaches the whole process group, is left to the main process
    (it stops the pool), and a kill ends the worker quietly. The worker ends when the main process dies,
    however it dies (kill -9, the OOM killer): left waiting for work, it would keep the out_dir lock it holds
    since the fork, and a rerun would be refused."""
    import multiprocessing.connection
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):  # not on Windows
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held back by submit, see there
    # ready once the main process and the workers forked after this one, which hold a copy, have exited
    sentinel = multiprocessing.parent_process().sentinel

    def exit_with_main_process():
        multiprocessing.connection.wait([sentinel])
        os._exit(1)
    threading.Thread(target=exit_with_main_process, daemon=True).start()


def submit(executor, *task):
    """executor.submit(*task) with Ctrl-C and kill held back until it returns: a worker that it starts is born
    with them held back, so that none reaches it before start_worker has set what they do there."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        return executor.submit(*task)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return executor.submit(*task)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def tokenize_batch(texts, tokenizer_spec):
    """In a tokenizer process: an Arrow array of texts -> (their tokens end to end, each with the end-of-text
    token in front; each one's count, (docs,) int64; the positions of the null texts, (nulls,) int64). A null
    text (a null, or a .jsonl row without the column) becomes an empty document, not none, so that the
    manifest's document index, from which a rerun resumes, stays the row's index; the main process warns.
    A few arrays each way keep the inter-process traffic to a few buffers per batch."""
    tokenizer = load_tokenizer(tokenizer_spec)  # built once a process (inherited from the main one, forked)
    encode, eot, tokens, lengths = tokenizer.encode, tokenizer.eot, [], []
    for text in texts.to_pylist():
        start = len(tokens)
        tokens.append(eot)
        tokens += encode(text or "")
        lengths.append(len(tokens) - start)
    nulls = (np.flatnonzero(texts.is_null().to_numpy(zero_copy_only=False)) if texts.null_count
             else np.empty(0, np.int64))
    dtype = TOKEN_DTYPES[shard_version(tokenizer.n_vocab)]
    return np.array(tokens, dtype=dtype), np.array(lengths, dtype=np.int64), nulls


def tokenized(batches, tokenizer_spec, num_proc):
    """tokenize_batch of each batch, in order, on num_proc processes (in this one for 1). At most two tasks per
    process wait for the consumer, so that a fast source does not fill the memory, as Pool.imap's would."""
    if num_proc == 1:
        yield from (tokenize_batch(texts, tokenizer_spec) for texts in batches)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    executor, pending = ProcessPoolExecutor(num_proc, initializer=start_worker), collections.deque()
    try:
        for texts in batches:
            pending.append(submit(executor, tokenize_batch, texts, tokenizer_spec))
            if len(pending) > 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise UserError("a tokenizer process died (out of memory?): lower --num_proc, then rerun the same "
                        "command to resume") from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)  # on an early stop, the running tasks finish first


# -----------------------------------------------------------------------------
# Cutting the token stream into shards


@dataclass(frozen=True)
class ShardPlan:
    """Shard i's name and size: the first val_tokens tokens go to val shards, the rest to train shards, all
    numbered in one sequence (val first) and all shard_size tokens except each split's last."""
    prefix: str
    shard_size: int
    val_tokens: int

    @property
    def val_shards(self):
        return -(-self.val_tokens // self.shard_size)

    def split(self, index):
        return "val" if index < self.val_shards else "train"

    def name(self, index):
        return f"{self.prefix}_{self.split(index)}_{index:06d}.bin"

    def size(self, index):
        """Shard index's tokens when the data does not run out first."""
        if index < self.val_shards:
            return min(self.shard_size, self.val_tokens - index * self.shard_size)
        return self.shard_size


SHARD_NAME = re.compile(r"[a-z0-9]+_(train|val)_[0-9]{6,}\.bin")  # ShardPlan.name's, any prefix


def shard_prefix(dataset, files):
    """local for local files (whatever --dataset says: they need not be FineWeb's); from the Hub,
    edufineweb for FineWeb-Edu, fineweb for FineWeb, else the dataset's name in letters, digits."""
    if files:
        return "local"
    base = dataset.rstrip("/").split("/")[-1].lower()
    prefix = "edufineweb" if base == "fineweb-edu" else re.sub(r"[^a-z0-9]", "", base)
    return "data" if not prefix or any(split in prefix for split in SPLITS) else prefix  # see shard_split


class ShardWriter:
    """Takes tokenized documents in stream order and writes each planned shard as soon as it is full.
    Keeps the stream position of the next token, (document index, tokens of it already written), which each
    shard's record stores as its "end" so that a rerun can start there."""

    def __init__(self, out_dir, plan, tokenizer, limit, records, on_shard, bar):
        self.out_dir, self.plan, self.limit = Path(out_dir), plan, limit
        self.eot, self.version = tokenizer.eot, shard_version(tokenizer.n_vocab)
        self.records, self.on_shard, self.bar = list(records), on_shard, bar
        self.document, self.token = self.records[-1]["end"] if self.records else (0, 0)
        self.written = sum(r["tokens"] for r in self.records)
        self.buffer = np.empty(plan.shard_size, dtype=TOKEN_DTYPES[self.version])
        self.start_shard()

    def start_shard(self):
        self.index, self.fill = len(self.records), 0
        self.target = min(self.plan.size(self.index), self.limit - self.written)
        self.bar.reset(total=self.target)
        self.bar.set_description(self.plan.name(self.index))

    @property
    def done(self):
        return self.target == 0  # --max_tokens reached

    def add(self, tokens, lengths):
        """Take the tokens (n,) of whole documents (their lengths (docs,)), the first being self.document."""
        ends = np.cumsum(lengths)
        first, p = self.document, self.token  # after a resume, the first document's head is in the last shard
        while p < len(tokens) and not self.done:
            n = min(self.target - self.fill, len(tokens) - p)
            self.buffer[self.fill:self.fill + n] = tokens[p:p + n]
            self.fill, p = self.fill + n, p + n
            self.bar.update(n)
            k = int(np.searchsorted(ends, p, side="right"))  # documents of this batch written whole
            self.document, self.token = first + k, p - (int(ends[k - 1]) if k else 0)
            if self.fill == self.target:
                self.flush()

    def flush(self):
        tokens = self.buffer[:self.fill]
        name = self.plan.name(self.index)
        try:
            write_shard(self.out_dir / name, tokens, self.version)
        except OSError as e:  # a full disk, most likely: sample-10BT takes ~20 GB
            raise UserError(f"cannot write {self.out_dir / name} ({e.strerror or e}): make room or pick another "
                            f"--out_dir, then rerun the same command to resume") from None
        self.records.append({"name": name, "split": self.plan.split(self.index), "tokens": int(self.fill),
                             "documents": int(np.count_nonzero(tokens == self.eot)),
                             "end": [self.document, self.token]})
        self.written += self.fill
        self.on_shard(self.records)
        self.start_shard()

    def finish(self):
        """Write the last, partly filled shard; the records of all shards."""
        if self.index < self.plan.val_shards:
            raise UserError(f"the data ran out after {self.written + self.fill} tokens, within the val split: "
                            f"lower --val_tokens (now {self.plan.val_tokens}) or give more data")
        if self.fill:
            self.flush()
        if not self.records:
            raise UserError("the data holds no documents: check --data_files or --dataset")
        return self.records


# -----------------------------------------------------------------------------
# The output directory and its manifest

SETTINGS = ("source", "text_column", "shard_size", "val_tokens", "shard_format")  # and the tokenizer's sha256


def settings_of(config, files, inputs, val_tokens, tokenizer):
    """What decides the shards' contents: a rerun resumes only into a directory made with the same.
    The inputs (input_record of each local file, None for the Hub) are compared by check_inputs."""
    source = ({"dataset": None, "name": None, "data_files": files} if files
              else {"dataset": config.dataset, "name": config.name, "data_files": None})
    return {"source": source, "text_column": config.text_column, "tokenizer": tokenizer.record(),
            "shard_size": config.shard_size, "val_tokens": val_tokens,
            "shard_format": [MAGIC, shard_version(tokenizer.n_vocab)], "inputs": inputs}


@contextlib.contextmanager
def locked_out_dir(out_dir):
    """Create out_dir and hold its lock (cli.DirectoryLock) while shards are written, clearing the temporary
    files a killed run left: two runs on one directory would delete each other's. A run that leaves nothing
    in a directory it created takes the directory away again."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file: pass a directory (it is created if missing)")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)  # an OSError names the path (cli.path_error)
    lock = lock_directory(out_dir, "fineweb.py")
    try:
        remove_temporaries(out_dir, lambda name: name == MANIFEST or SHARD_NAME.fullmatch(name))
        yield out_dir
    finally:
        if lock is not None:
            lock.release()
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()


# the fields and types of write_manifest's records (bool is no int here: type(value) is int)
SHARD_RECORD = {"name": str, "split": str, "tokens": int, "documents": int, "end": list}
INPUT_RECORD = {"path": str, "size": int, "mtime_ns": int, "fingerprint": str}


def is_record(value, fields):
    return isinstance(value, dict) and all(type(value.get(key)) is kind for key, kind in fields.items())


def read_manifest(out_dir):
    """The manifest of an earlier run into out_dir, None if there is none; one of another shape (damaged,
    edited) is refused. An older fineweb.py's name for GPT-2's tokenizer reads as its record."""
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path, restart_fix(out_dir))
    manifest["tokenizer"] = manifest_tokenizer(manifest)
    shards, inputs = manifest.get("shards"), manifest.get("inputs")
    if not (type(manifest.get("complete")) is bool and isinstance(manifest.get("source"), dict)
            and manifest["tokenizer"] is not None
            and isinstance(shards, list) and all(is_record(r, SHARD_RECORD) for r in shards)
            and all(len(r["end"]) == 2 and all(type(n) is int for n in r["end"]) for r in shards)
            and (inputs is None or isinstance(inputs, list) and all(is_record(r, INPUT_RECORD) for r in inputs))):
        raise UserError(f"{path} is damaged (not the manifest fineweb.py writes): {restart_fix(out_dir)}")
    return manifest


def restart_fix(out_dir):
    return f"pass --restart True to tokenize afresh (deletes the shards of {out_dir})"


def check_manifest(manifest, settings, out_dir):
    """Refuse the manifest of an earlier run made from other inputs, with another tokenizer or with other
    settings."""
    if manifest is None:
        return
    check_inputs(manifest, settings["inputs"], out_dir)  # first: it names the file that changed
    there, now = manifest["tokenizer"], settings["tokenizer"]
    if there["sha256"] != now["sha256"]:
        raise UserError(f"{out_dir} holds shards of the tokenizer {describe_tokenizer(there)}, not of --tokenizer "
                        f"{describe_tokenizer(now)}: pass --tokenizer {there.get('path')} or another --out_dir, or "
                        f"{restart_fix(out_dir)} with the new tokenizer")
    for key in SETTINGS:
        if manifest.get(key) != settings[key]:
            there, now = (json.dumps(v)[:100] for v in (manifest.get(key), settings[key]))  # file lists run long
            raise UserError(f"{out_dir} holds shards made with other settings ({key} {there} there, {now} now): "
                            f"pass the same flags or another --out_dir, or {restart_fix(out_dir)}")


INPUT_CHANGES = {"size": "size", "mtime_ns": "modification time", "fingerprint": "content"}


def check_inputs(manifest, inputs, out_dir):
    """Refuse a manifest whose local input files changed since (added, removed, other size, modification
    time or content): resuming would put shards of the new text after those of the old. A manifest without
    input records (an older fineweb.py's) cannot tell, so it is refused too. Shards from the Hub have no
    inputs: their dataset and configuration are settings."""
    before = manifest.get("inputs")
    if not inputs or (before is None and not manifest["source"].get("data_files")):
        return
    if before is None:
        raise UserError(f"{out_dir / MANIFEST} records no sizes or fingerprints of its input files "
                        f"(an older fineweb.py wrote it), so whether they changed is unknown: "
                        f"{restart_fix(out_dir)}")
    fix = f"restore the inputs, or {restart_fix(out_dir)}"
    before, now = ({r["path"]: r for r in records} for records in (before, inputs))
    added, removed = [p for p in now if p not in before], [p for p in before if p not in now]
    if added:
        raise UserError(f"--data_files: {added[0]} is not among the files that the shards in "
                        f"{out_dir} were made from: {fix}")
    if removed:
        raise UserError(f"--data_files: {removed[0]}, from which the shards in {out_dir} were "
                        f"made, is no longer among them: {fix}")
    for path, record in now.items():
        changed = [what for key, what in INPUT_CHANGES.items() if before[path][key] != record[key]]
        if changed:
            raise UserError(f"--data_files: {path} changed ({' and '.join(changed)}) since the "
                            f"shards in {out_dir} were made from it: {fix}")


def remove_our_files(out_dir, prefix):
    """--restart: delete the shards that fineweb.py wrote in out_dir (those its manifest lists, and those
    named as this run names its shards) and the manifest, and no other file; the manifest last, so that a
    restart killed half way is refused again by check_inputs. How many shards it deleted."""
    try:
        listed = {record["name"] for record in (read_manifest(out_dir) or {"shards": []})["shards"]}
    except UserError:  # damaged: its shards are known by this run's names alone
        listed = set()
    ours = lambda name: name in listed or re.fullmatch(rf"{prefix}_(train|val)_[0-9]{{6,}}\.bin", name)
    shards = [p for p in out_dir.iterdir() if SHARD_NAME.fullmatch(p.name) and ours(p.name) and p.is_file()]
    for path in shards:
        path.unlink()
    (out_dir / MANIFEST).unlink(missing_ok=True)
    return len(shards)


def resumable_records(manifest, out_dir, plan, limit):
    """The leading shards of an earlier run that need no work: full size, intact on disk, within the limit."""
    records, written = [], 0
    for i, record in enumerate(manifest["shards"] if manifest else []):
        written += record["tokens"]
        if (record["name"] != plan.name(i) or record["tokens"] != plan.size(i) or written > limit
                or not shard_valid(out_dir / record["name"], record["tokens"])):
            break
        records.append(record)
    return records


def write_manifest(out_dir, settings, records, max_tokens, complete):
    splits = {s: sum(r["tokens"] for r in records if r["split"] == s) for s in ("val", "train")}
    manifest = {**settings, "max_tokens": max_tokens, "complete": complete,
                "documents": sum(r["documents"] for r in records),
                "tokens": {**splits, "total": sum(splits.values())}, "shards": records}
    try:
        atomic_write(out_dir / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    except OSError as e:  # a full disk: the shards on disk are whole, and the last manifest names them
        raise UserError(f"cannot write {out_dir / MANIFEST} ({e.strerror or e}): make room or pick another "
                        f"--out_dir, then rerun the same command to resume") from None


def is_up_to_date(manifest, out_dir, max_tokens):
    return (manifest is not None and manifest["complete"] and manifest.get("max_tokens") == max_tokens
            and all(shard_valid(out_dir / r["name"], r["tokens"]) for r in manifest["shards"]))


# -----------------------------------------------------------------------------
# The run


def run(config):
    files, builder = resolve_data_files(config.data_files)
    check_has_documents(files, builder)
    inputs = [input_record(f) for f in files] if files else None
    tokenizer = load_tokenizer(config.tokenizer)
    val_tokens = choose_val_tokens(config, files, builder)
    prefix, limit = shard_prefix(config.dataset, files), config.max_tokens or sys.maxsize
    with locked_out_dir(config.out_dir) as out_dir:
        if config.restart:
            deleted = remove_our_files(out_dir, prefix)
            print(f"--restart: deleted {deleted} shards and any {MANIFEST} from "
                  f"{out_dir}; should this run stop, rerun it without --restart to resume")
        manifest = read_manifest(out_dir)
        settings = settings_of(config, files, inputs, val_tokens, tokenizer)
        check_manifest(manifest, settings, out_dir)
        if is_up_to_date(manifest, out_dir, config.max_tokens):
            tokens = sum(r["tokens"] for r in manifest["shards"])
            print(f"{out_dir} is complete ({len(manifest['shards'])} shards, {tokens:,} tokens): nothing to do")
            return
        plan = ShardPlan(prefix, config.shard_size, val_tokens)
        records = resumable_records(manifest, out_dir, plan, limit)
        skip = records[-1]["end"][0] if records else 0
        if records:
            print(f"resuming after {len(records)} shards already in {out_dir}, at document {skip:,}")
        start, tokens_before = time.perf_counter(), sum(r["tokens"] for r in records)
        batches, source, total_docs = open_documents(config, files, builder, skip)
        from tqdm import tqdm
        with tqdm(total=total_docs, initial=skip, unit="docs", desc="documents", position=0,
                  dynamic_ncols=True) as docs_bar, \
                tqdm(unit="tok", unit_scale=True, position=1, leave=False, dynamic_ncols=True) as shard_bar:
            save = lambda shards: write_manifest(out_dir, settings, shards, config.max_tokens, complete=False)
            writer = ShardWriter(out_dir, plan, tokenizer, limit, records, save, shard_bar)
            null_documents = write_shards(tokenized(batches, config.tokenizer, config.num_proc), writer, docs_bar)
            records = writer.finish()
        write_manifest(out_dir, settings, records, config.max_tokens, complete=True)
        elapsed = time.perf_counter() - start
    tokens, documents = sum(r["tokens"] for r in records), sum(r["documents"] for r in records)
    print(f"{out_dir}: {len(records)} shards, {tokens:,} tokens from {documents:,} documents of {source}")
    print(f"this run: {tokens - tokens_before:,} tokens in {elapsed:.1f} s, {(tokens - tokens_before) / elapsed:,.0f} "
          f"tokens/s with {config.num_proc} tokenizer process(es)")
    if null_documents:
        print(f"warning: {null_documents:,} documents had no text (null) in column {config.text_column!r}; they "
              f"were written as empty documents", file=sys.stderr)
    ours = {r["name"] for r in records}
    stray = [p.name for split in SPLITS for p in shard_files(out_dir, split) if p.name not in ours]
    if stray:  # an earlier run's with other flags, say, which the trainer would read with these
        print(f"warning: {out_dir} also holds {len(stray)} shard files this run did not make ({stray[0]}, ...), "
              f"which the trainer would read: delete them", file=sys.stderr)


def write_shards(results, writer, docs_bar):
    """Hand the tokenized batches to the writer until it is done or they run out; how many of the documents
    written had a null text (only those written: the last batch may run on past --max_tokens)."""
    null_documents = 0
    with contextlib.closing(results):  # closed early (done, or an error), it shuts the pool down: tokenized's finally
        for tokens, lengths, nulls in results:
            first = writer.document
            writer.add(tokens, lengths)
            null_documents += int(np.count_nonzero(nulls < writer.document - first))
            docs_bar.update(len(lengths))
            if writer.done:
                break
    return null_documents


def main(argv=None):
    def command():
        config = parse_args(argv)
        config.validate()
        try:
            run(config)
        except KeyboardInterrupt:  # Ctrl-C, or a kill: every shard under its final name is whole
            again = " without --restart" if config.restart else ""
            print(f"interrupted: no partial shard was left; rerun the same command{again} to resume",
                  file=sys.stderr)
            raise  # run_command exits with 130
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill cleans up like Ctrl-C
    try:
        run_command(command)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
