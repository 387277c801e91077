"""
Pre-train GPT-2 from scratch: the sharded token loader, the LR schedule, the DDP training loop, checkpoints.

    python train_gpt2.py                                    # one GPU (or the CPU), FineWeb-Edu shards
    python train_gpt2.py --data input.txt --device cpu ...  # a text file, tokenized on the fly
    torchrun --standalone --nproc_per_node 8 train_gpt2.py  # DDP on one node
    python train_gpt2.py --eval_only True --init_from out/best_val_loss.pt

Every flag is a field of TrainConfig below; `python train_gpt2.py --help` lists them with their defaults.
The model itself lives in model.py (as nanoGPT keeps model.py beside train.py) and is re-exported here.
Importing this file only defines things: `from train_gpt2 import GPT, GPTConfig`.
"""

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from fineweb import ShardError, atomic_write, build_parser, flag, get_tokenizer, open_shard, read_shard_header
from model import GPT, GPTConfig, UserError, export_hf, is_hf_model  # noqa: F401 (GPT, GPTConfig: re-exported)

# -----------------------------------------------------------------------------
# Configuration: one dataclass, whose fields are the command-line flags (parser: fineweb.build_parser)


@dataclass
class TrainConfig:
    # data and files
    data: str = flag("edu_fineweb10B", "directory of token shards (made by fineweb.py), or a text file such as "
                                       "input.txt, tokenized on the fly and split 90/10 into train/val")
    out_dir: str = flag("./out", "where checkpoints, config.json and metrics.jsonl are written")
    init_from: str = flag("scratch", "'scratch', 'resume' (the latest checkpoint in out_dir), a checkpoint path, or "
                                     "GPT-2 weights to fine-tune: gpt2, gpt2-medium, gpt2-large, gpt2-xl or a "
                                     "transformers folder (written by save_pretrained)")
    export_hf: str = flag("", "write the --init_from model to this folder in transformers' GPT-2 format and exit")
    plot: bool = flag(False, "redraw out_dir/plot.png (losses, HellaSwag) at every evaluation; needs matplotlib")
    # model
    block_size: int = flag(1024, "context length in tokens")
    n_layer: int = flag(12, "transformer blocks")
    n_head: int = flag(12, "attention heads per block")
    n_embd: int = flag(768, "width of the residual stream")
    # batch: tokens per optimizer step = batch_size * gradient_accumulation_steps * world_size * block_size
    batch_size: int = flag(8, "sequences per micro-step, per process")
    gradient_accumulation_steps: int = flag(5, "micro-steps per optimizer step, per process")
    # optimizer and schedule
    learning_rate: float = flag(6e-4, "peak learning rate, reached at the end of warmup")
    min_lr: float = flag(6e-5, "learning rate at the end of the cosine decay and after it")
    warmup_iters: int = flag(2000, "steps of linear warmup")
    lr_decay_iters: int = flag(600000, "step at which the cosine decay reaches min_lr")
    max_iters: int = flag(600000, "optimizer steps in the whole run")
    weight_decay: float = flag(0.1, "AdamW weight decay, applied to 2-D weights only")
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0 turns clipping off)")
    # evaluation and logging
    eval_interval: int = flag(2000, "evaluate, sample and checkpoint every this many steps")
    eval_iters: int = flag(200, "validation batches (of batch_size sequences) per evaluation")
    eval_only: bool = flag(False, "evaluate the checkpoint given by --init_from and exit")
    hellaswag: bool = flag(True, "score zero-shot HellaSwag at every evaluation (downloaded on first use)")
    hellaswag_examples: int = flag(0, "score only the first N HellaSwag examples (0: all 10,042 of val)")
    hellaswag_data: str = flag("val", "the HellaSwag split to download, or a local jsonl file in its format")
    log_interval: int = flag(10, "print and record training figures every this many steps")
    keep_last: int = flag(0, "keep only the newest N iter-*.pt checkpoints, and best_val_loss.pt (0 keeps all)")
    max_bad_steps: int = flag(3, "stop after this many consecutive steps with a non-finite loss or gradient")
    ddp_timeout: int = flag(600, "seconds a rank waits in a collective for the others before giving up")
    # system
    device: str = flag("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'")
    dtype: str = flag("auto", "'auto' (bfloat16 on GPUs that have it, else float16 with a GradScaler; on the "
                              "CPU bfloat16 where it has bf16 instructions, else float32), 'bfloat16', "
                              "'float16' or 'float32'")
    compile: bool = flag(True, "torch.compile the model")
    gradient_checkpointing: bool = flag(False, "recompute each block's activations in the backward pass")
    shuffle: bool = flag(True, "read each shard's windows of block_size + 1 tokens in a seeded random order, new "
                               "every epoch (False: front to back, as build-nanogpt); a resumed run reads the way "
                               "its checkpoint's run did")
    seed: int = flag(1337, "seeds the initialization, the shard and window order and the samples")

    def validate(self):
        """Raise UserError naming the problem and the fix; called before any work is done."""
        positive = ["block_size", "n_layer", "n_head", "n_embd", "batch_size", "gradient_accumulation_steps",
                    "eval_interval", "eval_iters", "log_interval", "lr_decay_iters", "max_bad_steps", "ddp_timeout"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        for name in ["max_iters", "warmup_iters", "keep_last", "hellaswag_examples"]:
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise UserError(f"--n_embd {self.n_embd} is not divisible by --n_head {self.n_head}: "
                            f"pick sizes where n_embd = n_head * head size")
        if self.learning_rate <= 0 or self.min_lr < 0 or self.min_lr > self.learning_rate:
            raise UserError(f"learning rates must satisfy 0 <= --min_lr <= --learning_rate and --learning_rate > 0, "
                            f"got --learning_rate {self.learning_rate} --min_lr {self.min_lr}")
        if self.lr_decay_iters < self.warmup_iters:
            raise UserError(f"--lr_decay_iters {self.lr_decay_iters} is less than --warmup_iters {self.warmup_iters}: "
                            f"the decay must end after the warmup")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError("--weight_decay and --grad_clip must be 0 or more")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"--dtype {self.dtype!r} is not one of auto, float32, bfloat16, float16")
        if self.eval_only and self.init_from == "scratch":
            raise UserError("--eval_only True needs a checkpoint: pass --init_from resume or --init_from PATH")
        if self.export_hf and self.init_from == "scratch":
            raise UserError("--export_hf needs a model to export: pass --init_from CHECKPOINT (or resume, gpt2, ...)")


def parse_args(argv=None):
    """The config, and the names of the flags given explicitly on the command line."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(TrainConfig, __doc__.strip().splitlines()[0]).parse_args(argv)
    explicit = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    return TrainConfig(**vars(args)), explicit


# -----------------------------------------------------------------------------
# Data: shards read through memmaps, each rank reading its own part of every global batch


@functools.lru_cache(maxsize=2)
def tokenize_text_file(path):
    """A whole text file as uint16 tokens (read once for both splits)."""
    tokens = get_tokenizer().encode_ordinary(Path(path).read_text(encoding="utf-8", errors="replace"))
    return np.array(tokens, dtype=np.uint16)


def load_token_sources(data, split):
    """[(name, tokens)] for one split: the shards of a directory, or 90/10 of a text file."""
    path = Path(data)
    if path.is_file():
        tokens = tokenize_text_file(str(path.resolve()))
        n_train = int(0.9 * len(tokens))
        part = tokens[:n_train] if split == "train" else tokens[n_train:]
        return [(f"{path.name}[{split}]", part)]
    if not path.is_dir():
        raise UserError(f"--data {data}: no such file or directory; make shards with `python fineweb.py` "
                        f"or pass a text file such as --data input.txt")
    names = sorted(p.name for p in path.iterdir() if split in p.name and p.suffix == ".bin"
                   and not p.name.startswith("."))
    if not names:
        raise UserError(f"no {split} shards (*{split}*.bin) in {data}/: run `python fineweb.py` to make them")
    return [(name, open_shard(path / name)) for name in names]


def read_span(name, tokens, start, length, vocab_size=50257):
    """tokens[start:start + length] as int64, checked on the way: a shard file that shrank since it was
    opened would crash the memmap read, and an id past the vocabulary would index past the embedding."""
    path = getattr(tokens, "filename", None)
    if path is not None and os.stat(path).st_size != tokens.offset + tokens.nbytes:
        raise ShardError(f"{path} changed size since the run began: restore it, or regenerate the data and "
                         f"start a new run")
    span = np.array(tokens[start:start + length], dtype=np.int64)
    if span.size and span.max() >= vocab_size:
        raise ShardError(f"{name}: token id {span.max()} near offset {start} is outside GPT-2's vocabulary of "
                         f"{vocab_size}: the shard is corrupt or from another tokenizer; regenerate it with "
                         f"`python fineweb.py`")
    return span


def check_unchanged(name, tokens):
    """A shard's header still says what it said when the run opened it."""
    path = getattr(tokens, "filename", None)
    if path is None:
        return
    try:
        unchanged = read_shard_header(path) == len(tokens)
    except (ShardError, OSError):
        unchanged = False
    if not unchanged:
        raise ShardError(f"{path} changed since the run began (its header or size differs): restore it, or "
                         f"regenerate the data and start a new run")


def window_order(n_windows, seed, epoch, shard_index):
    """The order in which one epoch reads a shard's windows: a permutation of range(n_windows), fixed by
    the seed, the epoch and the shard's index in the sorted shard list, and different for each."""
    return np.random.default_rng([seed, epoch, shard_index]).permutation(n_windows)


class ShardLoader:
    """Global batches of rows_per_step rows of block_size tokens, with targets one token on. Each epoch
    visits the shards in a seeded order, new every epoch, and reads a shard in one of two ways:

    - shuffle (the default): the shard is cut into (len - 1) // block_size windows of block_size + 1 tokens,
      starting at multiples of block_size (a window's last token is the next window's first: a target in one,
      an input in the other), and each step takes the next rows_per_step windows of a seeded permutation of
      them, new for every shard and epoch. So each epoch reads every window once, in batches of unrelated text,
      but for the last few of the permutation that do not fill a global batch (other windows every epoch);
    - sequential (shuffle=False, build-nanogpt's loader): each step takes the next
      rows_per_step * block_size + 1 consecutive tokens, so consecutive rows and steps read consecutive text.

    Either way `position` counts the tokens of the current shard used so far this epoch (with shuffle, the
    position // block_size windows of its permutation taken), a shard with less than one global batch left is
    left for the next, and row block (micro_step * world_size + rank) of each global batch is this rank's
    micro-batch: the batches depend only on the data, the seed, the mode and the global batch shape, not on how
    the global batch is split between ranks and micro-steps."""

    def __init__(self, sources, batch_size, block_size, micro_steps, rank=0, world_size=1, seed=0, shuffle=True):
        self.names = [name for name, _ in sources]
        self.shards = [tokens for _, tokens in sources]
        self.B, self.T, self.micro_steps = batch_size, block_size, micro_steps
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.rows_per_step = batch_size * micro_steps * world_size
        self.tokens_per_step = self.rows_per_step * block_size
        if not any(len(s) > self.tokens_per_step for s in self.shards):
            raise UserError(f"the train data ({max(map(len, self.shards))} tokens in the largest shard) is shorter "
                            f"than one global batch ({self.rows_per_step} rows x {block_size} tokens + 1): "
                            f"lower --batch_size, --gradient_accumulation_steps or --block_size")
        self.windows, self.windows_of = None, None
        self.epoch, self.shard, self.position = 0, 0, 0
        self.order = self.shard_order(0)
        self.skip_short_shards()

    def shard_order(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def skip_short_shards(self):
        """Move on, shard by shard and epoch by epoch, to the first place with a whole global batch left. With
        shuffle the test reads the same in windows: position // T + rows_per_step <= (len - 1) // T."""
        while self.position + self.tokens_per_step + 1 > len(self.shards[self.order[self.shard]]):
            self.shard, self.position = self.shard + 1, 0
            if self.shard == len(self.shards):
                self.epoch, self.shard = self.epoch + 1, 0
                self.order = self.shard_order(self.epoch)
            index = self.order[self.shard]
            check_unchanged(self.names[index], self.shards[index])

    def shard_windows(self):
        """The start offsets of the current shard's windows in this epoch's order, computed once per shard."""
        index = self.order[self.shard]
        if self.windows_of != (self.epoch, index):
            n_windows = (len(self.shards[index]) - 1) // self.T
            self.windows = window_order(n_windows, self.seed, self.epoch, index) * self.T
            self.windows_of = (self.epoch, index)
        return self.windows

    def next_batch(self):
        """This rank's inputs and targets for one optimizer step, each (micro_steps, B, T) int64."""
        x, y = self.shuffled_batch() if self.shuffle else self.sequential_batch()
        self.position += self.tokens_per_step
        self.skip_short_shards()
        return x, y

    def shuffled_batch(self):
        index = self.order[self.shard]
        first = self.position // self.T
        starts = self.shard_windows()[first:first + self.rows_per_step]  # the global batch's, (rows_per_step,)
        mine = starts.reshape(self.micro_steps, self.world_size, self.B)[:, self.rank].flatten()  # (micro_steps * B,)
        windows = [read_span(self.names[index], self.shards[index], start, self.T + 1) for start in mine]
        windows = np.stack(windows).reshape(self.micro_steps, self.B, self.T + 1)
        # numpy copies the inputs and targets out: torch's copy of these strided views went through its thread
        # pool and took 16 ms for GPT-2's default step on a busy 2-core CPU, numpy's 0.01 ms (BENCHMARKS.md)
        return torch.from_numpy(windows[..., :-1].copy()), torch.from_numpy(windows[..., 1:].copy())

    def sequential_batch(self):
        index = self.order[self.shard]
        rows = self.B * self.T
        xs, ys = [], []
        for micro_step in range(self.micro_steps):
            start = self.position + (micro_step * self.world_size + self.rank) * rows
            chunk = torch.from_numpy(read_span(self.names[index], self.shards[index], start, rows + 1))
            xs.append(chunk[:-1].view(self.B, self.T))
            ys.append(chunk[1:].view(self.B, self.T))
        return torch.stack(xs), torch.stack(ys)

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle,
                "shards": [[name, len(tokens)] for name, tokens in zip(self.names, self.shards)]}

    def load_state_dict(self, state):
        """Continue where the state left off, reading the way its run read: a checkpoint of the sequential
        loader from before shuffling existed has no "shuffle" key, and goes on sequentially."""
        shards = [[name, len(tokens)] for name, tokens in zip(self.names, self.shards)]
        if [list(s) for s in state["shards"]] != shards:
            raise UserError("the train data differs from the checkpoint's (shard names or sizes changed): "
                            "resume with the same --data")
        self.seed, self.epoch, self.shard, self.position = state["seed"], state["epoch"], state["shard"], state["position"]
        self.shuffle = state.get("shuffle", False)
        self.order = self.shard_order(self.epoch)
        self.skip_short_shards()


class Prefetcher:
    """Reads the next batch in a background thread while the current step runs, and copies it to the
    device from pinned memory without blocking. state_dict() is the loader's state after the batches
    handed out so far, not after the one being prefetched, so a checkpoint resumes at the right batch."""

    def __init__(self, loader, device):
        from concurrent.futures import ThreadPoolExecutor

        self.loader, self.device = loader, device
        self.pin = device.startswith("cuda")
        self.tokens_per_step = loader.tokens_per_step
        self.state = loader.state_dict()
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = self.pool.submit(self.fetch)

    def fetch(self):
        x, y = self.loader.next_batch()
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y, self.loader.state_dict()

    def next_batch(self):
        x, y, self.state = self.pending.result()
        self.pending = self.pool.submit(self.fetch)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self):
        return self.state

    def close(self):
        self.pool.shutdown(wait=True)


def val_batch_positions(sources, batch_size, block_size, eval_iters):
    """The fixed validation batches: [(source index, start)] of the first eval_iters consecutive
    batch_size * block_size + 1 token spans of the val data. The same at every evaluation."""
    span = batch_size * block_size
    positions = []
    for i, (_, tokens) in enumerate(sources):
        for start in range(0, len(tokens) - span, span):
            if len(positions) == eval_iters:
                return positions
            positions.append((i, start))
    if not positions:
        raise UserError(f"the val data ({sum(len(t) for _, t in sources)} tokens) is shorter than one batch "
                        f"({batch_size} x {block_size} tokens + 1): lower --batch_size or --block_size")
    return positions


# -----------------------------------------------------------------------------
# The learning-rate schedule and the throughput figures


def get_lr(step, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step >= lr_decay_iters:
        return min_lr
    progress = (step - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def flops_per_token(n_params, n_layer, n_embd, block_size):
    """Training FLOPs per token (forward and backward): 6 per parameter, plus attention's
    QK^T and AV products (PaLM paper, appendix B)."""
    return 6 * n_params + 12 * n_layer * n_embd * block_size


def estimate_mfu(flops_per_token, tokens_per_sec, peak_flops):
    """Model FLOPs utilization: the fraction of the device's peak that the training step achieves."""
    return flops_per_token * tokens_per_sec / peak_flops if peak_flops else None


GPU_PEAK_BF16_FLOPS = {  # dense tensor-core peak, by the name torch reports
    "H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12,
    "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12, "4090": 165e12,
    "3090": 71e12, "V100": 125e12, "B200": 2250e12,
}


def device_peak_flops(device, dtype):
    """A best estimate of the device's peak FLOP/s for dtype, or None when unknown."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_BF16_FLOPS.items() if k in name), None)
        return peak / 2 if peak and dtype == "float32" else peak  # float32 matmuls run as TF32
    if device == "cpu":
        flags = cpu_flags()
        per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 8  # float32 FMA lanes x 2 x 2 units
        if dtype == "bfloat16" and cpu_has_bf16():
            per_cycle *= 2  # the bf16 dot-product instructions do twice the multiply-adds
        return torch.get_num_threads() * 2.5e9 * per_cycle
    return None


def cpu_flags():
    """The CPU's instruction-set flags (Linux; elsewhere none are known)."""
    cpuinfo = Path("/proc/cpuinfo")
    return set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()


def cpu_has_bf16():
    """bfloat16 matmul instructions (AVX512-BF16 or AMX): there bf16 autocast trains faster than float32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


# -----------------------------------------------------------------------------
# Distributed set-up: one process is world_size 1, not a separate code path


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    control: object = None  # a Gloo group for host-side agreement (stop requests, failures), no device sync

    @property
    def is_master(self):
        return self.rank == 0

    def any(self, flag):
        """True on every rank when flag is true on any rank: how ranks agree to stop at the same step."""
        if self.world_size == 1:
            return bool(flag)
        tensor = torch.tensor([int(bool(flag))])
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.control)
        return bool(tensor.item())


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise UserError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use --device cpu")
    if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available here; use --device cpu")
    return device


def setup_distributed(device, timeout_seconds=600):
    """Join the process group when launched by torchrun (NCCL on CUDA, Gloo on the CPU). A collective
    that waits longer than the timeout (a rank died or hangs) raises instead of waiting forever."""
    present = [v for v in TORCHRUN_VARIABLES if v in os.environ]
    if not present:
        return Distributed(device=resolve_device(device))
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise UserError(f"{present[0]} is set but {missing[0]} is not: launch distributed runs with "
                        f"`torchrun --nproc_per_node N train_gpt2.py ...`")
    rank, local_rank, world_size = (int(os.environ[v]) for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = resolve_device(device)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_seconds)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if device.startswith("cuda") else None
    return Distributed(rank, local_rank, world_size, device, control)


def all_reduce_mean(tensor, world_size):
    """Mean over ranks. Gloo has no AVG reduction, so sum and divide."""
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size
    return tensor


def make_autocast(device_type, dtype):
    """Mixed precision by --dtype: matmuls in bfloat16/float16, reductions and the loss in float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def resolve_dtype(dtype, device):
    if device.startswith("cuda"):
        bf16 = torch.cuda.is_bf16_supported()
        if dtype == "auto":
            return "bfloat16" if bf16 else "float16"
        if dtype == "bfloat16" and not bf16:
            raise UserError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} does not support it; "
                            f"use --dtype float16")
        return dtype
    if dtype == "float16" and device == "cpu":
        raise UserError("--dtype float16 is not supported for training on the CPU; use float32 or bfloat16")
    if dtype == "auto":
        return "bfloat16" if device == "cpu" and cpu_has_bf16() else "float32"
    return dtype


# -----------------------------------------------------------------------------
# Checkpoints: one save/load pair, a format version inside, always written to a temporary file and renamed

CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("version", "model", "model_args", "optimizer", "scaler", "iter_num", "best_val_loss",
                   "loader", "rng", "config")


def save_checkpoint(path, checkpoint):
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: pass an existing file to --init_from")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}): "
                        f"use another one, such as best_val_loss.pt") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a checkpoint of this trainer: pass a file written by train_gpt2.py")
    if checkpoint["version"] != CHECKPOINT_VERSION:
        raise UserError(f"checkpoint {path} has format version {checkpoint['version']}, this code reads "
                        f"{CHECKPOINT_VERSION}")
    return checkpoint


def checkpoint_iter(path):
    """The step count in an iter-{iter}-....pt name, or -1 for any other name."""
    try:
        return int(Path(path).name.split("-")[1])
    except (IndexError, ValueError):
        return -1


def iter_checkpoints(out_dir):
    """out_dir's iter-*.pt checkpoints, oldest first. At the same step a stopped run's checkpoint comes before
    the evaluated one that the resumed run writes there."""
    def age(path):
        return checkpoint_iter(path), not path.name.endswith("-stopped.pt")
    return sorted((p for p in Path(out_dir).glob("iter-*.pt") if checkpoint_iter(p) >= 0), key=age)


def latest_checkpoint(out_dir):
    checkpoints = iter_checkpoints(out_dir)
    if not checkpoints:
        raise UserError(f"--init_from resume: no iter-*.pt checkpoint in {out_dir}; "
                        f"start with --init_from scratch or pass a checkpoint path")
    return checkpoints[-1]


def prune_checkpoints(out_dir, keep_last):
    """Delete all but the newest keep_last iter-*.pt files. Called only after the newest is safely on disk;
    best_val_loss.pt is a file of its own (a hard link or a copy), so it survives its iter file."""
    if keep_last > 0:
        for path in iter_checkpoints(out_dir)[:-keep_last]:
            path.unlink(missing_ok=True)


def remove_stale_temporaries(out_dir):
    """Temporary files of writes that a crash interrupted: never a checkpoint, safe to delete."""
    for path in Path(out_dir).glob(".*.tmp"):
        path.unlink(missing_ok=True)


def link_or_copy(source, target):
    """best_val_loss.pt as a hard link to the new iter checkpoint (no second write), swapped in atomically."""
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write(target, lambda f: f.write(Path(source).read_bytes()))


def rng_state():
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])  # resumed on fewer GPUs


def torch_version():
    return tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -----------------------------------------------------------------------------
# Loading a model for sampling, evaluation and export: checkpoints and transformers weights alike


def load_model(init_from, device="cpu"):
    """The GPT for --init_from (a checkpoint of this trainer, OpenAI's GPT-2 by name or a transformers
    folder) in eval mode on device: the one loader of sampling, evaluation and export."""
    if is_hf_model(init_from):
        model = GPT.from_pretrained(init_from)
    else:
        checkpoint = load_checkpoint(init_from)
        model = GPT(GPTConfig(**checkpoint["model_args"]))
        model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


def pretrained_model(config, explicit):
    """For --init_from gpt2 or a folder: the model and its architecture; an architecture flag given
    explicitly must agree with it, as with a checkpoint."""
    model = GPT.from_pretrained(config.init_from)
    return model, model_args_for(config, {"model_args": dataclasses.asdict(model.config)}, explicit)


# -----------------------------------------------------------------------------
# Training: evaluation, sampling, one optimizer step, and the loop

SAMPLE_PROMPT = "Hello, I'm a language model,"


@torch.no_grad()
def evaluate(model, val_sources, positions, batch_size, block_size, device, autocast, rank=0, world_size=1):
    """Mean loss over the fixed val batches; rank r takes batches r, r + world_size, ..."""
    model.eval()
    loss_sum = torch.zeros(2, device=device)  # (sum of batch losses, batch count)
    for source, start in positions[rank::world_size]:
        chunk = torch.from_numpy(read_span(*val_sources[source], start, batch_size * block_size + 1))
        x = chunk[:-1].view(batch_size, block_size).to(device)
        y = chunk[1:].view(batch_size, block_size).to(device)
        with autocast:
            _, loss = model(x, y, return_logits=False)  # the chunked loss: no full logits in memory
        loss_sum += torch.stack([loss.float(), torch.ones((), device=device)])
    if world_size > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    model.train()
    return (loss_sum[0] / loss_sum[1]).item()


def sample_text(model, device, autocast, seed, num_samples=4, max_new_tokens=32):
    enc = get_tokenizer()
    idx = torch.tensor([enc.encode(SAMPLE_PROMPT)] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    with autocast:
        out = model.generate(idx, max_new_tokens, top_k=50, vocab_limit=enc.n_vocab, generator=generator)
    model.train()
    return [enc.decode(row.tolist()) for row in out]


def train_step(model, optimizer, scaler, x, y, grad_clip, autocast, ddp, fused_loss=True, naive=False):
    """One optimizer step over x, y of shape (micro_steps, B, T). Returns the mean loss and the gradient
    norm as device tensors, and whether the update was applied: a step whose loss or gradient norm is not
    finite is skipped. Reading that one flag is the step's only wait for the device.
    naive=True is the straightforward step that bench.py compares against: full float32 logits into
    F.cross_entropy and the loss read back to the host on every micro-step."""
    micro_steps = x.size(0)
    loss_sum = torch.zeros((), device=x.device)
    for micro_step in range(micro_steps):
        if ddp:
            # sync gradients on the last micro-step only; set before the forward pass, where DDP reads it
            model.require_backward_grad_sync = micro_step == micro_steps - 1
        with autocast:
            _, loss = model(x[micro_step], y[micro_step], return_logits=naive or not fused_loss)
        loss = loss / micro_steps
        if naive:
            loss_sum += loss.item()
        else:
            loss_sum += loss.detach()
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    finite = torch.isfinite(loss_sum)
    if not scaler.is_enabled():  # a GradScaler (float16) skips overflowing gradients itself, routinely
        finite &= torch.isfinite(grad_norm)
    if ddp:  # the loss is this rank's own: agree, so that every rank skips or none does
        finite = finite.float()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    applied = bool(finite.item())
    if applied:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, applied


class RunLog:
    """Rank 0's output: printed lines (kept clear of the progress bar) and metrics.jsonl."""

    def __init__(self, out_dir, enabled):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled

    def print(self, text):
        if self.enabled:
            from tqdm import tqdm
            tqdm.write(text)

    def record(self, **metrics):
        if self.enabled:
            metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")

    def drop_after(self, iter_num, evaluated):
        """Forget what an interrupted run logged past the point this run starts from (its checkpoint, or
        step 0): this run logs it again, so the file reads as if the run had never been interrupted."""
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)

        def before(line):  # a run does not redo the evaluation its checkpoint was saved after
            try:
                record = json.loads(line)
            except ValueError:
                return False  # the end of a line a kill cut short
            return record["step"] < iter_num or (evaluated and record["step"] == iter_num and "val_loss" in record)
        kept = [line for line in lines if before(line)]
        if len(kept) != len(lines):
            atomic_write(self.path, lambda f: f.write("".join(kept).encode()))


def prepare_out_dir(out_dir, new_run):
    """Create out_dir and prove it writable; refuse to start a new run over an old one's checkpoints."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"--out_dir {out_dir} cannot be written ({e.strerror}): pick a writable directory") from None
    if new_run and any(path.glob("iter-*.pt")):
        raise UserError(f"{out_dir} already holds checkpoints of a run: continue it with --init_from resume, "
                        f"or pass another --out_dir")


def build_model(model_args, checkpoint, seed):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**model_args))
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    return model


def model_args_for(config, checkpoint, explicit):
    """The architecture: from the flags for a new run, from the checkpoint otherwise, where a flag given
    explicitly must agree with it."""
    args = {k: getattr(config, k) for k in ("block_size", "n_layer", "n_head", "n_embd")}
    args["vocab_size"] = GPTConfig.vocab_size
    if checkpoint is None:
        return args
    saved = checkpoint["model_args"]
    for k, v in args.items():
        if k in explicit and saved.get(k) != v:
            raise UserError(f"the checkpoint is of another architecture: it has {k}={saved.get(k)} but "
                            f"--{k} {v} was given; drop the flag or pass another checkpoint")
    return dict(saved)


def load_hellaswag(config, dist_info, log):
    """The HellaSwag examples scored at every evaluation, or None: a run that cannot have them (no network,
    no file) says so once and trains on."""
    if not config.hellaswag:
        return None
    import hellaswag
    examples, problems, error = None, [], None
    try:
        examples, problems = hellaswag.load_examples(config.hellaswag_data, limit=config.hellaswag_examples or None)
        if not examples:
            error = f"no example in {config.hellaswag_data} can be scored"
    except hellaswag.HellaSwagError as e:
        error = str(e)
    if dist_info.any(error is not None):  # every rank scores its share, or none does
        log.print(f"warning: HellaSwag is off for this run: {error or 'another rank could not load it'}; "
                  f"pass --hellaswag_data FILE, or --hellaswag False")
        return None
    for problem in problems[:5]:
        log.print(f"warning: {problem}")
    return examples


def score_hellaswag(examples, model, config, dist_info, model_args, autocast):
    """{hellaswag_acc_norm, hellaswag_acc, hellaswag_n}, counted over all ranks; {} when HellaSwag is off."""
    if not examples:
        return {}
    import hellaswag
    result = hellaswag.evaluate(model, examples, dist_info.device, config.batch_size, model_args["block_size"],
                                autocast, dist_info.rank, dist_info.world_size)
    return {"hellaswag_acc_norm": result["acc_norm"], "hellaswag_acc": result["acc"], "hellaswag_n": result["n"]}


def describe_hellaswag(scores):
    return f" | hellaswag acc_norm {scores['hellaswag_acc_norm']:.4f} ({scores['hellaswag_n']})" if scores else ""


class RunStopped(Exception):
    """The run stopped early on purpose (a signal, repeated non-finite steps, a failed checkpoint write):
    the message says why and how to continue; code is the exit status."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class StopSignal:
    """SIGINT or SIGTERM asks the run to save a checkpoint at the end of the current step and exit.
    A second SIGINT (Ctrl-C again) stops at once; a SIGTERM after the first request is absorbed, since a
    launcher may send one on top of the signal it passes on. Under torchrun, the step and the checkpoint
    write must fit in its shutdown grace (30 s by default) before it kills the workers."""

    def __init__(self, verbose):
        self.verbose = verbose
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
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
                  f"(Ctrl-C again stops at once)", file=sys.stderr, flush=True)


class Trainer:
    """What a run carries from step to step (model, optimizer, scaler, loader, step, best val loss):
    state_dict() is exactly what a checkpoint holds. The methods are the loop's phases."""

    def __init__(self, config, dist_info, raw_model, model_args, loader, val_sources, positions, log, dtype):
        self.config, self.dist, self.log, self.dtype = config, dist_info, log, dtype
        self.device = dist_info.device
        device_type = self.device.split(":")[0]
        self.raw_model, self.model_args = raw_model, model_args
        self.ddp = dist_info.world_size > 1
        if self.ddp and config.compile and torch_version() < (2, 6):
            # before 2.6, DDP's graph splitting refused the loss's autograd.Function (a higher-order op)
            torch._dynamo.config.optimize_ddp = False
        self.model = torch.compile(raw_model) if config.compile else raw_model
        self.train_model = self.model
        if self.ddp:
            device_ids = [dist_info.local_rank] if device_type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.optimizer = raw_model.configure_optimizer(config.weight_decay, config.learning_rate, device_type)
        self.scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
        self.autocast = make_autocast(device_type, dtype)
        self.loader, self.val_sources, self.positions = loader, val_sources, positions
        self.iter_num, self.best_val_loss, self.bad_steps, self.skipped_steps = 0, float("inf"), 0, 0
        self.last_checkpoint = None
        self.hellaswag = load_hellaswag(config, dist_info, log)

    def state_dict(self):
        return {
            "version": CHECKPOINT_VERSION, "model": self.raw_model.state_dict(), "model_args": self.model_args,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "iter_num": self.iter_num,
            "best_val_loss": self.best_val_loss, "skipped_steps": self.skipped_steps,
            "loader": self.loader.state_dict(), "rng": rng_state(), "config": dataclasses.asdict(self.config),
            "torch_version": str(torch.__version__), "git_commit": git_commit(),
        }

    def load_state_dict(self, checkpoint):
        self.raw_model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty when the run trained without float16; the scaler starts fresh then
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.loader.load_state_dict(checkpoint["loader"])
        set_rng_state(checkpoint["rng"])
        self.iter_num, self.best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        self.skipped_steps = checkpoint.get("skipped_steps", 0)

    def evaluate(self):
        return evaluate(self.model, self.val_sources, self.positions, self.config.batch_size,
                        self.model_args["block_size"], self.device, self.autocast, self.dist.rank,
                        self.dist.world_size)

    def save(self, name, val_loss=None, best=False):
        """Rank 0 writes the checkpoint, then every rank learns whether it worked: a failed write stops the
        run on all of them rather than let it train on without a safe point."""
        error = None
        if self.dist.is_master:
            path = Path(self.config.out_dir) / name
            checkpoint = self.state_dict()
            checkpoint["val_loss"] = val_loss
            try:
                save_checkpoint(path, checkpoint)
                if best:
                    link_or_copy(path, Path(self.config.out_dir) / "best_val_loss.pt")
                self.last_checkpoint = path
                prune_checkpoints(self.config.out_dir, self.config.keep_last)
                self.log.print(f"saved {path}")
            except OSError as e:
                error = (f"could not write checkpoint {path} ({e.strerror or e}); the checkpoints already in "
                         f"{self.config.out_dir} are intact (latest: {self.last_checkpoint}); free disk space or "
                         f"fix permissions, then continue with --init_from resume")
        if self.dist.any(error is not None):
            raise RunStopped(f"error: {error or 'rank 0 could not write a checkpoint'}", code=1)

    def evaluate_and_save(self, step):
        val_loss = self.evaluate()
        scores = score_hellaswag(self.hellaswag, self.model, self.config, self.dist, self.model_args, self.autocast)
        self.log.print(f"step {step}: val loss {val_loss:.4f}{describe_hellaswag(scores)}")
        self.log.record(step=step, val_loss=val_loss, **scores, tokens=step * self.loader.tokens_per_step)
        if self.dist.is_master:
            for text in sample_text(self.raw_model, self.device, self.autocast, self.config.seed + step):
                self.log.print(f"  sample: {text!r}")
        improved = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)
        if step > 0:
            self.save(f"iter-{step}-loss-{val_loss:.4f}.pt", val_loss, best=improved)
        if self.config.plot and self.dist.is_master:
            from plot import plot_during_training  # matplotlib is optional: without it, a warning
            plot_during_training(self.log.path, Path(self.config.out_dir) / "plot.png")

    def step(self, step):
        config = self.config
        lr = get_lr(step, config.learning_rate, config.min_lr, config.warmup_iters, config.lr_decay_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.loader.next_batch()
        loss, grad_norm, applied = train_step(self.train_model, self.optimizer, self.scaler, x, y, config.grad_clip,
                                              self.autocast, self.ddp)
        self.iter_num = step + 1
        if applied:
            self.bad_steps = 0
            return lr, loss, grad_norm
        self.bad_steps += 1
        self.skipped_steps += 1
        self.log.print(f"step {step}: non-finite loss or gradient norm, update skipped ({self.bad_steps} in a row)")
        self.log.record(step=step, skipped=True, lr=lr)
        if self.bad_steps >= config.max_bad_steps:
            raise RunStopped(f"error: stopped at step {step}: {self.bad_steps} steps in a row had a non-finite loss "
                             f"or gradient norm; the last good checkpoint is {self.last_checkpoint or 'none yet'}: "
                             f"continue from it with a lower --learning_rate", code=1)
        return lr, loss, grad_norm

    def log_step(self, step, lr, loss, grad_norm, ms_per_step, model_flops, peak_flops):
        loss = all_reduce_mean(loss, self.dist.world_size).item()  # the device is waited for here only
        tokens_per_sec = self.loader.tokens_per_step / (ms_per_step / 1000)
        mfu = estimate_mfu(model_flops, tokens_per_sec, peak_flops)
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        self.log.print(f"step {step:6d} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm.item():.3f} | "
                       f"{ms_per_step:.1f} ms | {tokens_per_sec:,.0f} tok/s | mfu {mfu_text}")
        self.log.record(step=step, train_loss=loss, lr=lr, grad_norm=grad_norm.item(), ms_per_step=ms_per_step,
                        tokens_per_sec=tokens_per_sec, mfu=mfu, tokens=(step + 1) * self.loader.tokens_per_step)

    def train(self, stop, evaluated):
        config = self.config
        model_flops = flops_per_token(self.raw_model.num_params(), self.model_args["n_layer"],
                                      self.model_args["n_embd"], self.model_args["block_size"])
        peak_flops = device_peak_flops(self.device, self.dtype)
        first_step = self.iter_num
        interval_start, interval_steps = time.perf_counter(), 0
        from tqdm import tqdm
        # the bar is closed on the way out whatever happens, so that a message after it gets a line of its own
        with tqdm(total=config.max_iters, initial=first_step, desc="train", unit="step", dynamic_ncols=True,
                  mininterval=1.0, disable=not self.dist.is_master) as progress:
            for step in range(first_step, config.max_iters + 1):
                last_step = step == config.max_iters
                if (step % config.eval_interval == 0 or last_step) and not (evaluated and step == first_step):
                    self.evaluate_and_save(step)
                    interval_start, interval_steps = time.perf_counter(), 0  # evaluation is not training time
                if last_step:
                    break
                lr, loss, grad_norm = self.step(step)
                interval_steps += 1
                progress.update(1)
                if step % config.log_interval == 0 or step == config.max_iters - 1:
                    ms_per_step = 1000 * (time.perf_counter() - interval_start) / interval_steps
                    self.log_step(step, lr, loss, grad_norm, ms_per_step, model_flops, peak_flops)
                    interval_start, interval_steps = time.perf_counter(), 0
                if self.dist.any(stop.requested is not None):
                    name = signal.Signals(stop.requested or signal.SIGTERM).name
                    self.save(f"iter-{self.iter_num}-stopped.pt")
                    raise RunStopped(f"stopped by {name} after step {step}: saved {self.last_checkpoint}; continue "
                                     f"with --init_from resume", code=128 + (stop.requested or signal.SIGTERM))


def evaluate_checkpoint(config, dist_info, raw_model, model_args, checkpoint_path, iter_num, val_sources, positions,
                        log, dtype):
    model = torch.compile(raw_model) if config.compile else raw_model
    autocast = make_autocast(dist_info.device.split(":")[0], dtype)
    val_loss = evaluate(model, val_sources, positions, config.batch_size, model_args["block_size"], dist_info.device,
                        autocast, dist_info.rank, dist_info.world_size)
    scores = score_hellaswag(load_hellaswag(config, dist_info, log), model, config, dist_info, model_args, autocast)
    log.print(f"{checkpoint_path}: step {iter_num} val loss {val_loss:.4f} over {len(positions)} batches"
              f"{describe_hellaswag(scores)}")
    log.record(step=iter_num, val_loss=val_loss, **scores, eval_only=True, checkpoint=str(checkpoint_path))


def run(config, explicit, dist_info):
    log = RunLog(config.out_dir, dist_info.is_master)
    device = dist_info.device
    dtype = resolve_dtype(config.dtype, device)

    if config.export_hf:  # a conversion, not a run: it reads no data and trains nothing
        if dist_info.is_master:
            init_from = latest_checkpoint(config.out_dir) if config.init_from == "resume" else config.init_from
            log.print(f"exported {init_from} to {export_hf(load_model(init_from), config.export_hf)}")
        return

    # everything the user gave is checked here, before a model is built or a step taken
    checkpoint_path = None
    pretrained, pretrained_args = pretrained_model(config, explicit) if is_hf_model(config.init_from) else (None, None)
    if config.init_from == "resume":
        checkpoint_path = latest_checkpoint(config.out_dir)
    elif config.init_from != "scratch" and pretrained is None:
        checkpoint_path = config.init_from
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path else None
    model_args = pretrained_args or model_args_for(config, checkpoint, explicit)
    val_sources = load_token_sources(config.data, "val")
    positions = val_batch_positions(val_sources, config.batch_size, model_args["block_size"], config.eval_iters)
    loader = None
    if not config.eval_only:
        loader = ShardLoader(load_token_sources(config.data, "train"), config.batch_size, model_args["block_size"],
                             config.gradient_accumulation_steps, dist_info.rank, dist_info.world_size, config.seed,
                             config.shuffle)
    prepare_out_dir(config.out_dir, new_run=checkpoint is None and not config.eval_only)
    if checkpoint and not config.eval_only and checkpoint["iter_num"] > config.max_iters:
        raise UserError(f"{checkpoint_path} is at step {checkpoint['iter_num']}, past --max_iters {config.max_iters}: "
                        f"raise --max_iters to train on")

    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    raw_model = (pretrained if pretrained is not None else build_model(model_args, checkpoint, config.seed)).to(device)
    raw_model.gradient_checkpointing = config.gradient_checkpointing
    if config.eval_only:
        evaluate_checkpoint(config, dist_info, raw_model, model_args, checkpoint_path or config.init_from,
                            checkpoint["iter_num"] if checkpoint else 0, val_sources, positions, log, dtype)
        return

    trainer = Trainer(config, dist_info, raw_model, model_args, loader, val_sources, positions, log, dtype)
    # a checkpoint written after an evaluation is not evaluated again; a stopped run's checkpoint is
    evaluated = checkpoint is not None and checkpoint.get("val_loss") is not None
    if checkpoint:
        trainer.load_state_dict(checkpoint)
        config.shuffle = loader.shuffle  # the loader reads the way the checkpoint's run read: config.json says so
        trainer.last_checkpoint = checkpoint_path
        del checkpoint  # the model and optimizer hold their own copies now
    trainer.loader = Prefetcher(loader, device)
    if dist_info.is_master:
        remove_stale_temporaries(config.out_dir)
        log.drop_after(trainer.iter_num, evaluated)
        atomic_write(Path(config.out_dir) / "config.json",
                     lambda f: f.write(json.dumps(dataclasses.asdict(config), indent=2).encode()))
    log.print(f"GPT-2 {raw_model.num_params(non_embedding=False) / 1e6:.2f}M parameters | {dist_info.world_size} "
              f"process(es) on {device} | {dtype} | {loader.tokens_per_step:,} tokens/step | torch "
              f"{torch.__version__} | commit {git_commit()} | from step {trainer.iter_num}")
    try:
        with StopSignal(verbose=dist_info.is_master) as stop:
            trainer.train(stop, evaluated)
    finally:
        trainer.loader.close()


# -----------------------------------------------------------------------------
# Entry point


def lost_contact(error):
    """An error from a collective whose peer died or timed out, as opposed to a bug."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    words = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "imed out", "NCCL error")
    return isinstance(error, RuntimeError) and any(w in str(error) for w in words)


def main(argv=None):
    dist_info, code = None, 0
    try:
        config, explicit = parse_args(argv)
        config.validate()
        dist_info = setup_distributed(config.device, config.ddp_timeout)
        run(config, explicit, dist_info)
    except (UserError, ShardError) as e:  # a rank's own data can fail it alone: every rank says why
        code, message = 1, f"error: {e}"
        if dist_info is not None and not dist_info.is_master:
            print(f"rank {dist_info.rank}: {message}", file=sys.stderr, flush=True)
    except RunStopped as e:
        code, message = e.code, str(e)
    except KeyboardInterrupt:
        code, message = 130, "error: interrupted: stopped at once; the checkpoints on disk are intact"
    except Exception as e:
        if dist_info is None or dist_info.world_size == 1 or not lost_contact(e):
            raise
        # a peer is gone: tearing the group down could wait on it, so leave without
        print(f"error: rank {dist_info.rank} lost contact with the other processes ({str(e).splitlines()[0]}): "
              f"see their output; continue with --init_from resume", file=sys.stderr, flush=True)
        os._exit(1)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if code:
        if dist_info is None or dist_info.is_master:
            print(message, file=sys.stderr, flush=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
