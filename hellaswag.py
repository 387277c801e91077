"""
HellaSwag, zero-shot: which of four endings does the model find most likely after the context?

    python hellaswag.py --init_from gpt2                          # OpenAI's GPT-2, through transformers
    python hellaswag.py --init_from gpt2-xl --data hellaswag_val.jsonl --hellaswag_examples 1000
    python train_gpt2.py --eval_only True --init_from out/best_val_loss.pt  # a checkpoint of the trainer

On its own it scores transformers' GPT2LMHeadModel, as build-nanogpt's does: OpenAI's weights or a folder
(save_pretrained, or the trainer's --export_hf), in the folder's own tokenizer (GPT-2's without one). A
checkpoint of the trainer is scored by the trainer's own model and tokenizer, with --eval_only, which runs
this file's evaluate. The split is downloaded
from the HellaSwag repository into --cache_dir on first use; without a network, pass a local copy with --data.
Each ending is scored by the model's loss on its tokens after the context: `acc` picks the ending with the
lowest total loss (the highest log-likelihood), `acc_norm` the lowest mean loss per token (it does not favour
short endings). build-nanogpt reports acc 0.2859, acc_norm 0.2955 for GPT-2 124M on val, scored the same way.

The trainer calls it on every rank at each evaluation, with its GPT as its forward passes call it
(compiled, under DDP with several processes):

    examples = hellaswag.load_for_training(config, dist_info, log)  # once; None when unavailable
    result = hellaswag.evaluate(model, examples, batch_size, block_size, autocast, dist_info,
                                by_position=True, tokenizer=tokenizer)  # logits at the endings alone
    result["acc_norm"], result["acc"], result["n"]                  # the same on every rank (summed)

load_for_training turns the UserError of a split it cannot have into a warning: a run without HellaSwag
trains on. Ranks
may download the split at the same time: each writes its own temporary file and renames it into place.
Importing this file only defines things.
"""

import http.client
import json
import math
import shutil
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError, atomic_write, build_parser, flag, parse_nested, run_command
from device import Distributed, check_dtype, make_autocast, resolve_device, resolve_dtype, warn_if_cpu_busy
from hf_convert import is_hf_model, load_hf_gpt2, model_tokenizer, quiet_hf_logs

# -----------------------------------------------------------------------------
# The data: the split files, downloaded once and cached, read line by line

SPLITS = ("train", "val", "test")
URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
DEFAULT_CACHE_DIR = "~/.cache/hellaswag"
BATCH_SIZE = 32  # examples per forward pass: 2,092 examples/s on an H100 against 1,988 at 64 (BENCHMARKS.md)


def download(url, path, flag):
    """Fetch url into path. Written to a temporary file and renamed when complete, so an interrupted
    download leaves nothing behind to be mistaken for the data."""
    def write(f):
        with urllib.request.urlopen(url, timeout=60) as response:
            expected = response.headers.get("Content-Length")
            shutil.copyfileobj(response, f)
            if expected is not None and f.tell() != int(expected):
                raise http.client.IncompleteRead(b"", int(expected) - f.tell())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or repr(e)
        # no flag named here: each script that loads HellaSwag adds its own (--data, --hellaswag_data)
        raise UserError(f"cannot download {path.name} from {url} ({reason}); without a network, put a copy at "
                        f"{path}, or pass a local copy: {flag} path/to/{path.name}") from None


def split_path(split, cache_dir=None, flag="--data"):
    """The cached file of a split, downloaded on first use. flag: the script's flag for a local copy."""
    path = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / f"hellaswag_{split}.jsonl"
    if not path.is_file():
        download(URL.format(split=split), path, flag)
    return path


def parse_example(line):
    """One jsonl line as an example dict with ctx, 4 endings and an int label; ValueError saying what is wrong."""
    try:
        example = parse_nested(json.loads, line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # nested past Python's stack
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(example, dict):
        raise ValueError(f"not a JSON object but {type(example).__name__}")
    missing = [key for key in ("ctx", "endings", "label") if key not in example]
    if missing:
        raise ValueError(f"no {', '.join(map(repr, missing))} field")
    ctx, endings, label = example["ctx"], example["endings"], example["label"]
    if not isinstance(ctx, str) or not ctx.strip():
        raise ValueError("'ctx' is not a non-empty string")  # an empty context leaves the first token unpredicted
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        raise ValueError(f"'endings' is not a list of 4 strings: {json.dumps(endings)[:80]}")
    if not any(ending.strip() for ending in endings):
        # scored, they would compare whitespace alone; identical ones tie, the tie goes to ending 0, and that
        # counts as correct whenever the label is 0
        raise ValueError("'endings' are all empty")
    if isinstance(label, str) and label.isdecimal():  # the digits int() reads (not superscripts)
        label = int(label)  # the copy on the Hugging Face hub stores labels as strings
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < 4:
        raise ValueError(f"'label' is {label!r}, not 0, 1, 2 or 3")
    return {**example, "label": label}


def load_examples(source, cache_dir=None, limit=None, flag="--data"):
    """HellaSwag examples from a split name ("train", "val", "test"; downloaded into cache_dir, by default
    ~/.cache/hellaswag, on first use) or the path of a jsonl file in the same format. Returns
    (examples, problems): the first `limit` (None: all) well-formed examples as dicts with ctx, endings and
    an int label, and a message for every line skipped, naming the file and the line number. flag: the
    script's flag for a local copy, named in the error when the split cannot be downloaded."""
    path = split_path(source, cache_dir, flag) if source in SPLITS else Path(source)
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass a HellaSwag jsonl file or one of the splits "
                             f"{', '.join(SPLITS)}")
    examples, problems = [], []
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if limit is not None and len(examples) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    examples.append(parse_example(line.decode("utf-8")))
                except ValueError as e:  # UnicodeDecodeError is one too
                    problems.append(f"{path}:{number}: {e}; line skipped")
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror}); pass a readable file") from None
    return examples, problems


# -----------------------------------------------------------------------------
# Rendering: one example as four rows of tokens, and the mask of the tokens that are scored


def render_examples(examples, tokenizer, max_tokens=None):
    """Each example as the model sees it, a (tokens, mask, label) triple:
    - tokens (4, N) long: row i is encode(ctx) + encode(" " + endings[i]), zero-padded on the right to the longest
    - mask (4, N) bool: True on the ending's tokens, whose likelihood is scored
    - label: the index of the correct ending
    The space goes with the ending because GPT-2's tokenizer (a byte-level BPE) folds a word's leading space into
    its token. A
    row longer than max_tokens keeps its last max_tokens tokens: the context's start goes first, then the
    ending's, so as much of the ending as fits is scored. numpy builds the rows, a few times faster than a
    tensor each."""
    # one at a time: tiktoken's encode_ordinary_batch was 6 times slower for these short texts
    encoded = [tokenizer.encode(text) for example in examples
               for text in [example["ctx"], *(" " + ending for ending in example["endings"])]]
    keep = slice(-max_tokens, None) if max_tokens else slice(None)
    rendered = []
    for i, example in enumerate(examples):
        ctx_tokens, *endings = encoded[5 * i:5 * i + 5]
        rows = [(ctx_tokens + end_tokens)[keep] for end_tokens in endings]
        masks = [([False] * len(ctx_tokens) + [True] * len(end_tokens))[keep] for end_tokens in endings]
        width = max(len(row) for row in rows)
        tokens = np.zeros((4, width), dtype=np.int64)
        mask = np.zeros((4, width), dtype=bool)
        for j, (row, row_mask) in enumerate(zip(rows, masks)):
            tokens[j, :len(row)] = row
            mask[j, :len(row)] = row_mask
        rendered.append((torch.from_numpy(tokens), torch.from_numpy(mask), int(example["label"])))
    return rendered


def padded_length(n, block_size, shortest=32):
    """n rounded up to the next of 32, 48, 64, 96, 128, 192, ... (the powers of two and 1.5 times them), at
    most block_size: a compiled model sees a handful of sequence lengths (64, 96 and 128 for most of
    HellaSwag) instead of one per batch, and padding costs 20% more compute for HellaSwag's lengths, where
    powers of two alone cost 50%."""
    length = shortest
    while length < n:
        length = length * 3 // 2 if length & (length - 1) == 0 else length * 4 // 3
    return min(block_size, length)


def collate(rendered, batch_size, block_size):
    """Inputs, targets and the mask of scored targets for one forward pass, each (4 * batch_size, T), from
    up to batch_size rendered (tokens, mask) pairs. The row count is fixed and T is bucketed, so a compiled
    model is not recompiled for every batch; the rows past the examples given are dummies, never scored.
    Inputs drop each row's last token, which is only ever a target."""
    T = padded_length(max(tokens.size(1) for tokens, _ in rendered) - 1, block_size)
    x = torch.zeros((4 * batch_size, T), dtype=torch.long)
    y = torch.zeros((4 * batch_size, T), dtype=torch.long)
    scored = torch.zeros((4 * batch_size, T), dtype=torch.bool)
    for i, (tokens, mask) in enumerate(rendered):
        n = tokens.size(1) - 1
        x[4 * i:4 * i + 4, :n] = tokens[:, :-1]
        y[4 * i:4 * i + 4, :n] = tokens[:, 1:]
        scored[4 * i:4 * i + 4, :n] = mask[:, 1:]
    return x, y, scored


# -----------------------------------------------------------------------------
# Scoring: per-token losses, the most likely ending, and the accuracy over a rank's share


def predict(losses, mask):
    """The most likely ending by both rules, from per-token losses (..., 4, T) and the mask of the tokens
    that count (..., 4, T): by total loss (acc) and by mean loss per token (acc_norm). Returns
    (pred_sum, pred_norm), index tensors of shape (...); ties go to the lower index."""
    total = torch.where(mask.bool(), losses, 0.0).sum(-1)
    mean = total / mask.sum(-1).clamp(min=1)  # clamp: dummy rows have no scored tokens
    return total.argmin(-1), mean.argmin(-1)


def logits_of(output):
    """Logits from a model's output: this repo's GPT returns (logits, loss), a transformers model an object
    with .logits, a plain callable the tensor itself."""
    if isinstance(output, (tuple, list)):
        return output[0]
    return getattr(output, "logits", output)


def token_losses(model, x, y, scored, autocast, vocab_limit, positions=None):
    """Cross-entropy, in float32, of every scored target token, 0 elsewhere: (R, T). Logits at or past
    vocab_limit (the padding of the vocabulary) are dropped, so they take no probability mass. positions:
    the scored positions as an index into the flattened (R * T), for a model that takes them
    (model(x, positions=...), as the trainer's GPT does), which then computes its logits there alone."""
    with autocast:
        if positions is not None:
            picked = model(x, positions=positions)[0]  # (K, V): only the K scored positions
        else:
            picked = logits_of(model(x))[scored]  # (R, T, V), then the K scored positions
    picked = picked[:, :vocab_limit].float()
    losses = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    if positions is not None:  # an index, not a mask: nothing waits for the device to count the True entries
        losses.view(-1)[positions] = F.cross_entropy(picked, y.view(-1)[positions], reduction="none")
    else:
        losses[scored] = F.cross_entropy(picked, y[scored], reduction="none")
    return losses


@torch.no_grad()
def score_examples(model, examples, device="cpu", batch_size=16, block_size=1024, autocast=None,
                   vocab_limit=None, progress=False, passes=0, by_position=False, *, tokenizer):
    """(pred_sum, pred_norm) of each example, in the order given: a (len(examples), 2) long tensor.
    Examples go through the model longest first, batch_size at a time, so each batch pads little and the
    longest (the most memory) comes first. passes: call the model at least this many times, the calls past
    the examples on a batch of padding whose output is dropped (FSDP's lockstep: Distributed.forward_passes).
    by_position: the model computes logits at given positions alone (model(x, positions=...), the trainer's
    GPT): the endings are about a quarter of HellaSwag's tokens, the output layer a third of GPT-2 124M's
    matmul FLOPs. tokenizer: the model's; vocab_limit: its vocabulary, unless given."""
    vocab_limit = vocab_limit or tokenizer.n_vocab
    rendered = [(tokens, mask) for tokens, mask, _ in render_examples(examples, tokenizer, block_size + 1)]
    order = sorted(range(len(rendered)), key=lambda i: -rendered[i][0].size(1))
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    from tqdm import tqdm
    bar = tqdm(total=len(order), desc="hellaswag", unit="ex", dynamic_ncols=True, disable=not progress)
    # the loop never waits for the GPU (pinned copies, index tensors, results gathered at the end), so the next
    # batch is prepared while the last one runs
    to_device = ((lambda t: t.pin_memory().to(device, non_blocking=True)) if torch.device(device).type == "cuda"
                 else (lambda t: t.to(device)))
    batch_predictions = []
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            x, y, scored = collate([rendered[i] for i in batch], batch_size, block_size)
            positions = to_device(scored.view(-1).nonzero().squeeze(1)) if by_position else None
            x, y, scored = (to_device(t) for t in (x, y, scored))
            losses = token_losses(model, x, y, scored, autocast or nullcontext(), vocab_limit, positions)
            pred_sum, pred_norm = predict(losses.view(batch_size, 4, -1), scored.view(batch_size, 4, -1))
            batch_predictions.append(torch.stack((pred_sum, pred_norm), 1)[:len(batch)])
            bar.update(len(batch))
        for _ in range(passes - math.ceil(len(order) / batch_size)):
            padding = torch.zeros((4 * batch_size, padded_length(1, block_size)), dtype=torch.long, device=device)
            with autocast or nullcontext():  # logits nowhere, where the model allows it: they are dropped
                model(padding, positions=padding.new_zeros(0)) if by_position else model(padding)
    finally:
        bar.close()
        if was_training:
            model.train()
    predictions = torch.zeros((len(examples), 2), dtype=torch.long)
    if batch_predictions:
        predictions[torch.tensor(order)] = torch.cat(batch_predictions).cpu()
    return predictions


def evaluate(model, examples, batch_size=16, block_size=1024, autocast=None, dist_info=None,
             vocab_limit=None, progress=False, by_position=False, *, tokenizer):
    """Zero-shot HellaSwag accuracy: {"acc", "acc_norm", "n", "correct", "correct_norm"}.

    model maps tokens (B, T) to logits (B, T, V): a callable returning them, or a (logits, loss) tuple (the
    trainer's GPT, compiled or not), or an object with .logits (transformers). It sees (4 * batch_size, T)
    inputs, T one of a few lengths up to block_size. autocast is a context manager to run it under (e.g.
    torch.autocast("cuda", torch.bfloat16)), or None; losses are computed in float32 either way.
    dist_info (device.Distributed; by default one process on the CPU) says the device and the ranks: rank r
    scores examples[r::world_size], as many forward passes as dist_info.forward_passes says, and with a
    process group the counts are summed over the ranks, so every rank returns the figures for all examples.
    The model is put in eval mode and back in train mode if it was. by_position, tokenizer: see score_examples."""
    d = dist_info or Distributed()
    share = examples[d.rank::d.world_size]
    passes = d.forward_passes(len(examples), batch_size)
    predictions = score_examples(model, share, d.device, batch_size, block_size, autocast, vocab_limit,
                                 progress and d.is_master, passes, by_position, tokenizer=tokenizer)
    labels = torch.tensor([int(example["label"]) for example in share], dtype=torch.long)
    counts = torch.stack([(predictions[:, 0] == labels).sum(), (predictions[:, 1] == labels).sum(),
                          torch.tensor(len(share))]).to(d.device)
    correct, correct_norm, n = d.sum(counts).tolist()
    return {"acc": correct / max(n, 1), "acc_norm": correct_norm / max(n, 1), "n": n,
            "correct": correct, "correct_norm": correct_norm}


def load_for_training(config, dist_info, log):
    """The HellaSwag examples scored at every evaluation, or None: a run that cannot have them (no network,
    no file) says so once and trains on."""
    if not config.hellaswag:
        return None
    examples, problems, error = None, [], None
    try:
        examples, problems = load_examples(config.hellaswag_data, flag="--hellaswag_data",
                                                     limit=config.hellaswag_examples or None)
        if not examples:
            error = (f"no example in {config.hellaswag_data} can be scored: pass a file in HellaSwag's format "
                     f"with --hellaswag_data")
    except UserError as e:
        error = str(e)  # it names its fix: a local copy through --hellaswag_data
    if dist_info.any(error is not None):  # every rank scores its share, or none does
        error = error or "another rank could not load it (see its message): pass --hellaswag_data FILE"
        log.print(f"warning: HellaSwag is off for this run: {error}; or turn it off with --hellaswag False")
        return None
    for problem in problems[:5]:
        log.print(f"warning: {problem}")
    return examples


# -----------------------------------------------------------------------------
# The command line: one dataclass whose fields are the flags


@dataclass
class HellaSwagConfig:
    init_from: str = flag("", "the model to score, in transformers' format: gpt2, gpt2-medium, gpt2-large, "
                              "gpt2-xl, or a transformers folder (save_pretrained)",
                          other_names=("--model", "--model_type", "-m", "--checkpoint"),  # build-nanogpt's -m
                          path=True)
    split: str = flag("val", "the split to score, downloaded into --cache_dir on first use: train, val or test "
                             "(test has no labels)")
    data: str = flag("", "a local HellaSwag jsonl file, scored instead of --split", path=True)
    cache_dir: str = flag(DEFAULT_CACHE_DIR, "where downloaded splits are kept", path=True)
    hellaswag_examples: int = flag(0, "score only the first N examples (0: all)", other_names=("--limit",))
    batch_size: int = flag(BATCH_SIZE, "examples per forward pass, four rows each")
    device: str = flag("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'")
    dtype: str = flag("auto", "'auto' (as train_gpt2.py's), 'float32', 'bfloat16' or 'float16'")
    compile: bool = flag(False, "torch.compile the model (pays off on a GPU, for a whole split)")

    def validate(self):
        """Raise UserError naming the problem and the fix; called before any work is done."""
        if not self.init_from:
            raise UserError("pass the model to score: --init_from gpt2 (or a transformers folder)")
        if self.split not in SPLITS:
            raise UserError(f"--split {self.split!r} is not one of {', '.join(SPLITS)}; "
                                 f"pass a local file with --data")
        if self.hellaswag_examples < 0 or self.batch_size <= 0:
            raise UserError("--hellaswag_examples must be 0 or more and --batch_size positive")
        check_dtype(self.dtype)


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(HellaSwagConfig, __doc__.strip().splitlines()[0]).parse_args(argv)
    return HellaSwagConfig(**vars(args))


def report_problems(problems, shown=10):
    for problem in problems[:shown]:
        print(f"warning: {problem}", file=sys.stderr)
    if len(problems) > shown:
        print(f"warning: ... and {len(problems) - shown} more lines skipped", file=sys.stderr)


def checkpoint_advice(path):
    return (f"--init_from {path}: this scores transformers' models; a checkpoint of train_gpt2.py is scored by "
            f"the trainer's own model: python train_gpt2.py --eval_only True --init_from {path} (val loss and "
            f"HellaSwag; --hellaswag_data FILE for a local file)")


def run(config):
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    warn_if_cpu_busy(device)
    source = config.data or config.split
    examples, problems = load_examples(source, config.cache_dir, config.hellaswag_examples or None)
    report_problems(problems)
    if not examples:
        raise UserError(f"no example of {source} can be scored ({len(problems)} lines skipped); "
                        f"pass a file in HellaSwag's format, with labels")
    if not is_hf_model(config.init_from):
        raise UserError(checkpoint_advice(config.init_from) if Path(config.init_from).is_file() else
                        f"--init_from {config.init_from} cannot be loaded: pass gpt2, gpt2-medium, gpt2-large "
                        f"or gpt2-xl (with a network), or a folder saved by save_pretrained")
    tokenizer = model_tokenizer(config.init_from)
    with quiet_hf_logs():
        model = load_hf_gpt2(config.init_from, tokenizer).eval().to(device)
    block_size = model.config.n_positions
    if config.compile:
        model = torch.compile(model)
    start = time.perf_counter()
    batch_size = min(config.batch_size, len(examples))  # the rows past the examples would be padding
    result = evaluate(model, examples, batch_size, block_size, make_autocast(device.split(":")[0], dtype),
                      Distributed(device=device), progress=True, tokenizer=tokenizer)
    seconds = time.perf_counter() - start  # evaluate's final .tolist() has waited for the device
    print(f"acc {result['acc']:.4f} | acc_norm {result['acc_norm']:.4f} | n {result['n']} | "
          f"{config.init_from} on {source}, {dtype} on {device} | "
          f"{seconds:.1f} s, {result['n'] / seconds:.1f} examples/s")


def main(argv=None):
    def command():
        config = parse_args(argv)
        config.validate()
        run(config)
    run_command(command)


if __name__ == "__main__":
    main()
