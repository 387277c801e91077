"""
Pre-train GPT-2 from scratch: the sharded token loader, the LR schedule, the DDP or FSDP loop, the run directory.

    python train_gpt2.py                                    # one GPU (or the CPU), FineWeb-Edu shards
    python train_gpt2.py --data input.txt --device cpu ...  # a text file, tokenized on the fly
    python train_gpt2.py --config config/shakespeare_cpu.toml  # flags from a file (the command line's win)
    torchrun --standalone --nproc_per_node 8 train_gpt2.py  # DDP on one node
    python train_gpt2.py --init_from resume                 # continue the run in --out_dir, with its own flags
    torchrun --standalone --nproc_per_node 8 train_gpt2.py --fsdp True --n_layer 48 --n_head 25 --n_embd 1600
    python train_gpt2.py --eval_only True --init_from out/best_val_loss.pt

Every flag is a field of TrainConfig below; `python train_gpt2.py --help` lists them with their defaults.
main() runs one of three programs: export (--export_hf), evaluate_only (--eval_only) or train. The model lives
in model.py (as nanoGPT keeps model.py beside train.py) and is re-exported here; the checkpoint format in
checkpoint.py. Importing this file only defines things: `from train_gpt2 import GPT, GPTConfig`.
"""

import dataclasses
import datetime
import functools
import hashlib
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import hellaswag
from checkpoint import (BEST_CHECKPOINT, CHECKPOINT_VERSION, checkpoint_name, load_start, optimizer_state_by_index,
                        optimizer_state_by_name, prune_checkpoints, save_best, save_checkpoint)
from cli import UserError, atomic_write, build_parser, flag, parse_flags, remove_temporaries
from device import available_memory, device_peak_flops, make_autocast, resolve_device, resolve_dtype
from fineweb import (EOT_TOKEN, VOCAB_SIZE, ShardError, check_open_shard, get_tokenizer, open_shard,
                     shard_files, shard_valid)
from model import GPT, GPTConfig, export_hf  # GPT, GPTConfig: also re-exported
from rundir import (TRACKER_PACKAGES, Plotter, RunLog, TensorBoardTracker, WandbTracker, check_run_files,
                    lock_out_dir, make_out_dir)

# -----------------------------------------------------------------------------
# Configuration: one dataclass, whose fields are the command-line flags (parser: cli.build_parser)


MAX_DDP_TIMEOUT = 24 * 3600
SAMPLE_PROMPT = "Hello, I'm a language model,"


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
    tensorboard: bool = flag(False, "also write metrics.jsonl's figures to out_dir/tensorboard/, for `tensorboard "
                                    "--logdir`; needs tensorboard")
    wandb_log: bool = flag(False, "also send metrics.jsonl's figures and the config to Weights & Biases (its files "
                                  "in out_dir/wandb/; WANDB_MODE=offline keeps them there); needs wandb")
    wandb_project: str = flag("gpt2-pretrain", "the wandb project of --wandb_log")
    wandb_run_name: str = flag("", "the wandb run's name ('': out_dir's folder name)")
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
    sample_prompt: str = flag(SAMPLE_PROMPT, "the prompt of the samples printed at each evaluation; empty starts "
                                             "a new document")
    num_samples: int = flag(4, "samples printed at each evaluation, 32 tokens each (0: none)")
    log_interval: int = flag(10, "print and record training figures every this many steps")
    keep_last: int = flag(3, "keep only the newest N iter-*.pt checkpoints, and best_val_loss.pt (0 keeps all)")
    max_bad_steps: int = flag(3, "stop after this many consecutive steps with a non-finite loss or gradient")
    ddp_timeout: int = flag(600, "seconds a rank waits in a collective for the others before giving up")
    backend: str = flag("auto", "torch.distributed backend: 'auto' (nccl on GPUs, gloo on the CPU), 'nccl', or "
                                "'gloo' (on GPUs it lets several processes share one, to try torchrun on one GPU)")
    fsdp: bool = flag(False, "shard the weights, gradients and AdamW state over the processes with FSDP2 instead of "
                             "keeping a full copy on each (DDP), for models past one GPU's memory; with one "
                             "process, a process group of one")
    # system
    device: str = flag("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'")
    dtype: str = flag("auto", "'auto' (bfloat16 on GPUs that have it, else float16 with a GradScaler; on the "
                              "CPU bfloat16 where it has bf16 instructions, else float32), 'bfloat16', "
                              "'float16' or 'float32'")
    compile: bool = flag(True, "torch.compile the model")
    loss_kernel: bool = flag(True, "on CUDA, the loss's softmax and its gradient in one Triton kernel "
                                   "(cross_entropy_kernel.py); False: plain torch, compiled with the model")
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
        for name in ["max_iters", "warmup_iters", "keep_last", "hellaswag_examples", "num_samples"]:
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
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be from 0 to 2**63 - 1, got {self.seed}")
        if self.ddp_timeout > MAX_DDP_TIMEOUT:
            raise UserError(f"--ddp_timeout {self.ddp_timeout} is more than a day ({MAX_DDP_TIMEOUT} s): a rank "
                            f"that waits that long has died; pass at most {MAX_DDP_TIMEOUT}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise UserError(f"--backend {self.backend!r} is not one of auto, nccl, gloo")
        if self.eval_only and self.init_from == "scratch":
            raise UserError("--eval_only True needs a checkpoint: pass --init_from resume or --init_from PATH")
        if self.export_hf and self.init_from == "scratch":
            raise UserError("--export_hf needs a model to export: pass --init_from CHECKPOINT (or resume, gpt2, ...)")
        if self.wandb_log and not self.wandb_project:
            raise UserError("--wandb_log True needs a project: pass --wandb_project NAME")


def parse_args(argv=None):
    """The config, and the names of the flags given explicitly: on the command line or in its --config file."""
    argv = sys.argv[1:] if argv is None else argv
    args, explicit = parse_flags(build_parser(TrainConfig, __doc__.strip().splitlines()[0], config_file=True), argv)
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
    shards = shard_files(path, split)
    if not shards:
        raise UserError(f"no {split} shards (*{split}*.bin) in {data}/: run `python fineweb.py` to make them")
    return [(shard.name, open_shard(shard)) for shard in shards]


def read_span(name, tokens, start, length, vocab_size=VOCAB_SIZE):
    """tokens[start:start + length] as int64, checked on the way: a shard file that shrank since it was
    opened would crash the memmap read, and an id past the vocabulary would index past the embedding."""
    check_open_shard(tokens)
    span = np.array(tokens[start:start + length], dtype=np.int64)
    if span.size and span.max() >= vocab_size:
        raise ShardError(f"{name}: token id {span.max()} near offset {start} is outside GPT-2's vocabulary of "
                         f"{vocab_size}: the shard is corrupt or from another tokenizer; regenerate it with "
                         f"`python fineweb.py`")
    return span


def check_unchanged(name, tokens):
    """A shard's header still says what it said when the run opened it."""
    path = getattr(tokens, "filename", None)
    if path is not None and not shard_valid(path, len(tokens)):
        raise ShardError(f"{path} changed since the run began (its header or size differs): restore it, or "
                         f"regenerate the data and start a new run")


def fingerprint(tokens, samples=64, span=256):
    """A cheap digest of a token source, to tell data that changed under the same name and size on resume:
    all of it when it is small, else `samples` evenly spaced spans of `span` tokens (a few reads a shard)."""
    digest = hashlib.blake2b(len(tokens).to_bytes(8, "little"), digest_size=8)
    if len(tokens) <= 4 * samples * span:
        digest.update(np.ascontiguousarray(tokens).tobytes())
    else:
        for start in np.linspace(0, len(tokens) - span, samples).astype(np.int64):
            digest.update(np.asarray(tokens[start:start + span]).tobytes())
    return digest.hexdigest()


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
        self.fingerprints = [fingerprint(tokens) for tokens in self.shards]
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
        micro_batch_tokens = self.B * self.T
        xs, ys = [], []
        for micro_step in range(self.micro_steps):
            start = self.position + (micro_step * self.world_size + self.rank) * micro_batch_tokens
            chunk = torch.from_numpy(read_span(self.names[index], self.shards[index], start, micro_batch_tokens + 1))
            xs.append(chunk[:-1].view(self.B, self.T))
            ys.append(chunk[1:].view(self.B, self.T))
        return torch.stack(xs), torch.stack(ys)

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle,
                "shards": [[name, len(tokens)] for name, tokens in zip(self.names, self.shards)],
                "fingerprints": self.fingerprints}

    def load_state_dict(self, state):
        """Continue where the state left off, reading the way its run read: a checkpoint of the sequential
        loader from before shuffling existed has no "shuffle" key, and goes on sequentially."""
        shards = [[name, len(tokens)] for name, tokens in zip(self.names, self.shards)]
        if [list(s) for s in state["shards"]] != shards:
            raise UserError("the train data differs from the checkpoint's (shard names or sizes changed): "
                            "resume with the same --data")
        if state.get("fingerprints", self.fingerprints) != self.fingerprints:  # older checkpoints have none
            changed = next(n for n, a, b in zip(self.names, state["fingerprints"], self.fingerprints) if a != b)
            raise UserError(f"the train data has the checkpoint's shard names and sizes but other contents ({changed} "
                            f"differs): restore the data the run trained on, or start a new run")
        self.seed, self.epoch = state["seed"], state["epoch"]
        self.shard, self.position = state["shard"], state["position"]
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


# -----------------------------------------------------------------------------
# Distributed set-up: one process is world_size 1, not a separate code path


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    control: object = None  # a Gloo group for host-side agreement (stop requests, failures), no device sync
    sharded: bool = False  # FSDP: each rank holds a shard of the weights, and every forward pass is a collective

    @property
    def is_master(self):
        return self.rank == 0

    def any(self, condition):
        """True on every rank when condition is true on any rank: how ranks agree to stop at the same step."""
        if self.world_size == 1:
            return bool(condition)
        tensor = torch.tensor([int(bool(condition))])
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.control)
        return bool(tensor.item())


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def setup_distributed(device, timeout_seconds=600, fsdp=False, backend="auto"):
    """Join the process group when launched by torchrun (NCCL on CUDA, Gloo on the CPU, unless backend names
    one). A collective that waits longer than the timeout (a rank died or hangs) raises instead of waiting
    forever. FSDP needs a process group even for one process: without torchrun, fsdp makes one of a single rank
    (its store in memory, so no port is opened), and `python train_gpt2.py --fsdp True` trains as torchrun with
    one process would."""
    present = [v for v in TORCHRUN_VARIABLES if v in os.environ]
    if not present and not fsdp:
        device = resolve_device(device)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)  # what Triton's kernels and stray allocations land on: --device cuda:1
        return Distributed(device=device)
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if present and missing:
        raise UserError(f"{present[0]} is set but {missing[0]} is not: launch distributed runs with "
                        f"`torchrun --nproc_per_node N train_gpt2.py ...`")
    rank, local_rank, world_size = (int(os.environ[v]) for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if present \
        else (0, 0, 1)
    device = resolve_device(device)
    if fsdp and device.split(":")[0] not in ("cuda", "cpu"):
        raise UserError(f"--fsdp True runs on CUDA GPUs or the CPU, not on {device}: pass --fsdp False")
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl" and not device.startswith("cuda"):
        raise UserError(f"--backend nccl needs CUDA GPUs, and this run is on {device}: pass --backend gloo")
    if backend == "gloo" and fsdp and device.startswith("cuda"):
        raise UserError("--fsdp True on GPUs needs --backend nccl (FSDP's collectives on CUDA tensors are not "
                        "Gloo's): pass --backend auto, or --fsdp False to try DDP on Gloo")
    if device.startswith("cuda") and present:
        gpus = torch.cuda.device_count()
        if local_rank >= gpus and backend == "nccl":
            raise UserError(f"LOCAL_RANK {local_rank} has no GPU of its own on this machine of {gpus}: launch at "
                            f"most {gpus} processes per node (--nproc_per_node {gpus}), or pass --backend gloo "
                            f"to let processes share GPUs (slow, for trying the distributed path)")
        device = f"cuda:{local_rank % gpus}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_seconds)
    if present:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return Distributed(rank, local_rank, world_size, device, control, sharded=fsdp)


def all_reduce_mean(tensor, world_size):
    """Mean over ranks. Gloo has no AVG reduction, so sum and divide."""
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size
    return tensor


# -----------------------------------------------------------------------------
# What a checkpoint carries besides the model: the RNG, and where the code came from


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
# A run from a checkpoint: its own settings, with the command line's on top

# what a command asks for, not what the run is: never taken from the checkpoint
COMMAND_FLAGS = ("init_from", "eval_only", "export_hf", "backend")  # this launch's, never the checkpoint's
ARCHITECTURE = ("block_size", "n_layer", "n_head", "n_embd")


def run_config(flags, explicit, checkpoint):
    """The config of a run that starts from a checkpoint: every flag at the checkpoint's value unless given on
    the command line, and out_dir the checkpoint's folder unless given. Returns (config, changes), changes
    being one line for each flag given whose value differs from the run's. Without a checkpoint (scratch,
    GPT-2 weights) the flags as given."""
    if checkpoint is None:
        return flags, []
    saved = checkpoint["config"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {name: value for name, value in saved.items() if name in fields and name not in COMMAND_FLAGS}
    values.update({name: getattr(flags, name) for name in fields if name in explicit or name in COMMAND_FLAGS})
    if "out_dir" not in explicit:
        values["out_dir"] = str(Path(checkpoint["path"]).parent)
    values.setdefault("shuffle", False)  # a run from before --shuffle existed read its data sequentially
    if "shuffle" in explicit and flags.shuffle != saved.get("shuffle", False):
        mode = "shuffled" if saved.get("shuffle", False) else "sequentially"
        raise UserError(f"the run of {checkpoint['path']} reads its data {mode}: --shuffle {flags.shuffle} cannot "
                        f"change that on resume; start a new run")
    try:
        config = TrainConfig(**values)
    except TypeError as e:
        raise UserError(f"checkpoint {checkpoint['path']} holds a malformed config ({e}): it is damaged") from None
    changes = [f"--{name}: {saved[name]} -> {getattr(config, name)} (command line)" for name in sorted(explicit)
               if name in saved and name not in COMMAND_FLAGS + ("out_dir",) and saved[name] != getattr(config, name)]
    return config, changes


def model_args_for(config, explicit, model=None):
    """The architecture: the flags' for a new model, the loaded model's otherwise, where a flag given
    explicitly must agree with it."""
    args = {k: getattr(config, k) for k in ARCHITECTURE}
    args["vocab_size"] = GPTConfig.vocab_size
    if model is None:
        return args
    loaded = dataclasses.asdict(model.config)
    for k, v in args.items():
        if k in explicit and loaded.get(k) != v:
            raise UserError(f"the checkpoint is of another architecture: it has {k}={loaded.get(k)} but "
                            f"--{k} {v} was given; drop the flag or pass another checkpoint")
    return loaded


def resume_warnings(saved, config, saved_world_size, world_size):
    """What a change of batch shape or data on resume costs, one warning each."""
    before = {**dataclasses.asdict(config), **saved}  # a flag the checkpoint lacks did not change
    now = dataclasses.asdict(config)
    sequences = lambda c, w: c["batch_size"] * c["gradient_accumulation_steps"] * w  # per optimizer step
    warnings = []
    if sequences(before, saved_world_size) != sequences(now, world_size):
        warnings.append(f"warning: the global batch changes from {sequences(before, saved_world_size)} to "
                        f"{sequences(now, world_size)} sequences per step: from here on the data order is not an "
                        f"uninterrupted run's, so the resume is not exact")
    if (before["batch_size"], before["eval_iters"]) != (config.batch_size, config.eval_iters):
        warnings.append("warning: --batch_size or --eval_iters changes the val batches: val losses from here on "
                        "do not compare exactly with the ones before")
    if before["data"] != config.data:
        warnings.append(f"warning: --data changes from {before['data']} to {config.data}: training goes on with "
                        f"the new data from its first batch, and the val batches change")
    return warnings


def new_model(model_args, seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**model_args))


BYTES_PER_PARAM = 16  # float32 weight, gradient and two AdamW moments


def check_model_fits(model_args, dist_info):
    """Refuse, before allocating it, a model that cannot fit: an allocation far past the memory either fails
    with a traceback or, on the CPU, summons the out-of-memory killer. Under FSDP a device holds 1/world_size
    of the state, but the host of rank 0 gathers the whole weights and AdamW state for every checkpoint."""
    C, L = model_args["n_embd"], model_args["n_layer"]
    n_params = 12 * L * C * C + (model_args["vocab_size"] + model_args["block_size"]) * C
    size, fsdp = f"a model of {n_params / 1e6:,.0f}M parameters needs about", dist_info.sharded
    needed = n_params * BYTES_PER_PARAM / (dist_info.world_size if fsdp else 1)
    free = available_memory(dist_info.device)
    if free is not None and needed > free:
        how = (f" per process (--fsdp True over {dist_info.world_size})" if fsdp else "")
        fix = "" if fsdp else ", or shard it over several processes with --fsdp True"
        raise UserError(f"{size} {needed / 2**30:,.1f} GiB for its weights, gradients and AdamW state{how}, more than "
                        f"the {free / 2**30:,.1f} GiB available on {dist_info.device}: choose a smaller --n_layer or "
                        f"--n_embd{fix}")
    # every rank checks its own host, so that all stop together rather than rank 0 alone
    needed, free = n_params * BYTES_PER_PARAM, available_memory("cpu")
    if fsdp and free is not None and needed > free:
        raise UserError(f"{size} {needed / 2**30:,.1f} GiB of host memory to gather its whole weights and AdamW "
                        f"state into a checkpoint on rank 0 (--fsdp True), more than the {free / 2**30:,.1f} GiB "
                        f"available: choose a smaller --n_layer or --n_embd, or run on hosts with more memory")


def check_fsdp_dtype(dist_info, dtype):
    if dist_info.sharded and dtype == "float16":
        raise UserError("--fsdp True trains in bfloat16 or float32, not float16 (its GradScaler is not set up for "
                        "sharded gradients): pass --dtype bfloat16 where the GPU has it, else --dtype float32")


# -----------------------------------------------------------------------------
# The run directory (rundir.py), shared by the ranks: rank 0 writes it, every rank agrees on what happened


def claim_out_dir(out_dir, dist_info, check=lambda: None):
    """Rank 0 creates out_dir, takes its lock and runs check() (which raises UserError) under it; every rank
    learns whether that worked, so that none goes on alone. Returns the lock (None on the other ranks)."""
    lock, error = None, None
    if dist_info.is_master:
        try:
            make_out_dir(out_dir)
            lock = lock_out_dir(out_dir)
            check()
        except (UserError, OSError) as e:
            error = e if isinstance(e, UserError) else UserError(f"cannot use --out_dir {out_dir} ({e.strerror or e}): "
                                                                 f"fix its permissions or pick another directory")
            if lock is not None:
                lock.release()
    if dist_info.any(error is not None):
        raise error or UserError(f"rank 0 could not use {out_dir}: see its message")
    return lock


def check_tracker_packages(config, dist_info):
    """Import the package of each tracker asked for, on rank 0 (the one that uses it): a missing one is
    refused in one line before any work, not found by the first record."""
    error = None
    if dist_info.is_master:
        for name, (module, package) in TRACKER_PACKAGES.items():
            if getattr(config, name) and error is None:
                try:
                    importlib.import_module(module)
                except ImportError:
                    error = UserError(f"--{name} True needs {package}: pip install {package}")
    if dist_info.any(error is not None):
        raise error or UserError("rank 0 could not load a tracker's package: see its message")


def start_trackers(config, trainer, log):
    """Rank 0's trackers, asked for by --wandb_log and --tensorboard, starting where the run starts: called
    after log.drop_after, so that a resumed run knows what metrics.jsonl keeps. Each joins log.trackers as it
    starts, so that log.close() closes it whatever fails after."""
    if config.wandb_log:  # first: it is the one that can fail (not logged in)
        wandb_tracker = WandbTracker(config, trainer.wandb_run_id)
        trainer.wandb_run_id = wandb_tracker.run_id
        log.trackers.append(wandb_tracker)
    if config.tensorboard:
        log.trackers.append(TensorBoardTracker(config.out_dir, trainer.iter_num, log.records_from(trainer.iter_num)))


def prepare_run_files(config, trainer, log, dist_info):
    """Rank 0 clears what a killed run left, cuts metrics.jsonl back to the checkpoint, starts the trackers and
    writes config.json; every rank learns whether that worked, so that none goes on alone."""
    error = None
    if dist_info.is_master:
        try:
            remove_temporaries(config.out_dir)  # a killed run's, safe under the lock
            log.drop_after(trainer.iter_num, trainer.evaluated_at_start)
            start_trackers(config, trainer, log)
            atomic_write(Path(config.out_dir) / "config.json",
                         lambda f: f.write(json.dumps(dataclasses.asdict(config), indent=2).encode()))
        except UserError as e:
            error = e
        except OSError as e:
            error = UserError(f"cannot write into --out_dir {config.out_dir} ({e.strerror or e}): fix its "
                              f"permissions or free disk space, then run the same command again")
    if dist_info.any(error is not None):
        raise error or UserError("rank 0 could not prepare --out_dir: see its message")


# -----------------------------------------------------------------------------
# Evaluation: the val loss over fixed batches, HellaSwag, samples

def load_hellaswag(config, dist_info, log):
    """The HellaSwag examples scored at every evaluation, or None: a run that cannot have them (no network,
    no file) says so once and trains on."""
    if not config.hellaswag:
        return None
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


class Evaluation:
    """What every evaluation scores: the fixed val batches (the same each time, so that losses compare) and
    the HellaSwag examples (None when off or unavailable). Built before the model, so that bad data fails
    before any work."""

    def __init__(self, config, block_size, dist_info, log):
        self.sources = load_token_sources(config.data, "val")
        self.positions = val_batch_positions(self.sources, config.batch_size, block_size, config.eval_iters)
        self.batch_size, self.block_size, self.dist_info = config.batch_size, block_size, dist_info
        self.hellaswag = load_hellaswag(config, dist_info, log)

    @torch.no_grad()
    def val_loss(self, model, autocast):
        """Mean loss over the fixed val batches; rank r takes batches r, r + world_size, ... Under FSDP each
        forward pass is a collective, so every rank makes as many: a rank with a batch fewer runs the first
        batch once more and does not count it."""
        d, B, T = self.dist_info, self.batch_size, self.block_size
        mine = self.positions[d.rank::d.world_size]
        passes = math.ceil(len(self.positions) / d.world_size) if d.sharded else len(mine)
        model.eval()
        loss_sum = torch.zeros(2, device=d.device)  # (sum of batch losses, batch count)
        for i in range(passes):
            source, start = mine[i] if i < len(mine) else self.positions[0]
            chunk = torch.from_numpy(read_span(*self.sources[source], start, B * T + 1))
            x, y = chunk[:-1].view(B, T).to(d.device), chunk[1:].view(B, T).to(d.device)
            with autocast:
                _, loss = model(x, y, return_logits=False)  # the chunked loss: no full logits in memory
            counted = torch.tensor(float(i < len(mine)), device=d.device)
            loss_sum += torch.stack([loss.float() * counted, counted])
        if d.world_size > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        model.train()
        return (loss_sum[0] / loss_sum[1]).item()

    def scores(self, model, autocast):
        """{val_loss, and hellaswag_acc_norm, hellaswag_acc, hellaswag_n when HellaSwag is on}, over all ranks."""
        d = self.dist_info
        scores = {"val_loss": self.val_loss(model, autocast)}
        if self.hellaswag:
            # hellaswag.py's own batch, whatever the training batch: the fastest measured, and its logits at the
            # endings (about 3,000 rows of the vocabulary) stay near a GB however large the micro-batch
            result = hellaswag.evaluate(model, self.hellaswag, d.device, hellaswag.BATCH_SIZE, self.block_size,
                                        autocast, d.rank, d.world_size, lockstep=d.sharded)
            scores.update(hellaswag_acc_norm=result["acc_norm"], hellaswag_acc=result["acc"],
                          hellaswag_n=result["n"])
        return scores


def describe_scores(scores, batches=None):
    text = f"val loss {scores['val_loss']:.4f}" + (f" over {batches} batches" if batches else "")
    if "hellaswag_n" in scores:
        text += f" | hellaswag acc_norm {scores['hellaswag_acc_norm']:.4f} ({scores['hellaswag_n']})"
    return text


def sample_text(model, device, autocast, seed, prompt=SAMPLE_PROMPT, num_samples=4, max_new_tokens=32):
    """num_samples continuations of prompt; an empty prompt starts a new document, as in training."""
    if num_samples == 0:
        return []
    enc = get_tokenizer()
    ids = enc.encode(prompt, allowed_special="all") or [EOT_TOKEN]
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    with autocast:
        out = model.generate(idx, max_new_tokens, top_k=50, vocab_limit=enc.n_vocab, generator=generator)
    model.train()
    return [enc.decode(row.tolist()) for row in out]


# -----------------------------------------------------------------------------
# Training: one optimizer step, the stop signal, the Trainer and its loop


def set_gradient_sync(model, sync):
    """Whether the next backward pass reduces the gradients over the ranks: DDP's flag (flipped rather than
    entering no_sync(), so the loop stays flat; set before the forward pass, where DDP reads it) or FSDP's."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = sync
    else:
        model.set_requires_gradient_sync(sync)  # FSDP2; a compiled model passes it on to the module it wraps


def train_step(model, optimizer, scaler, x, y, grad_clip, autocast, distributed):
    """One optimizer step over x, y of shape (micro_steps, B, T). Returns the mean loss and the gradient
    norm as device tensors, and whether the update was applied: a step whose loss or gradient norm is not
    finite is skipped. Reading that one flag is the step's one wait for the device. distributed: model is
    DDP or FSDP over several ranks."""
    micro_steps = x.size(0)
    loss_sum = torch.zeros((), device=x.device)
    for micro_step in range(micro_steps):
        if distributed:  # reduce the gradients on the last micro-step only
            set_gradient_sync(model, micro_step == micro_steps - 1)
        with autocast:
            _, loss = model(x[micro_step], y[micro_step], return_logits=False)
        loss = loss / micro_steps
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor of the ranks' partial norms
        grad_norm = grad_norm.full_tensor()
    finite = torch.isfinite(loss_sum)
    if not scaler.is_enabled():  # a GradScaler (float16) skips overflowing gradients itself, routinely
        finite &= torch.isfinite(grad_norm)
    if distributed:  # the loss is this rank's own: agree, so that every rank skips or none does
        finite = finite.float()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    applied = bool(finite.item())
    if applied:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, applied


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


def fsdp2():
    """FSDP2's fully_shard and MixedPrecisionPolicy: public in torch.distributed.fsdp from torch 2.6, in
    torch.distributed._composable.fsdp before."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def shard_model(model, device, dtype):
    """FSDP2 over every rank: each block is a group of its own, gathered whole just before it runs and freed
    after, and the root holds the rest (wte, which is also lm_head, wpe and ln_f), so the tied weight stays one
    parameter in one group. Each rank keeps its float32 shard of every weight, gradient and AdamW moment. With
    bfloat16 the gathered weights are bfloat16 and the gradients are reduced in float32 (autocast still runs
    layer norms, softmax and the loss in float32). The model may sit on the CPU: each shard is moved to device
    as it is cut, so the whole model never is."""
    from torch.distributed.device_mesh import init_device_mesh
    fully_shard, MixedPrecisionPolicy = fsdp2()
    mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()  # float32: the weights as they are
    if dtype == "bfloat16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def place_model(model, dist_info, dtype, loss_kernel=True):
    """The model on its device: whole, or under FSDP this rank's shards of it. On CUDA, float32 matmuls run as
    TF32 (training and evaluation alike, so that an evaluation repeats the one logged in training)."""
    model.loss_kernel = loss_kernel
    if dist_info.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dist_info.sharded:
        return shard_model(model, dist_info.device, dtype)
    return model.to(dist_info.device)


def full_state(model, optimizer, sharded):
    """(model state, optimizer state) in the checkpoint's form, that of one process's state_dict(): under FSDP
    gathered from every rank's shards into rank 0's CPU memory, one tensor at a time (a collective; the other
    ranks get empty dicts), with the optimizer's state keyed by position as optimizer.state_dict() keys it."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if not model_state:
        return {}, {}
    # gathered one name at a time, a tied weight comes back as copies: one tensor under all its names again,
    # as model.state_dict() gives it (and torch.save stores it once)
    first_name = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        model_state[name] = model_state[first_name.setdefault(id(param), name)]
    return model_state, optimizer_state_by_index(optimizer_state)


def load_optimizer_state(model, optimizer, state, sharded):
    """Load a checkpoint's optimizer state (keyed by position): under FSDP each rank keeps its shard of it."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    name_of = {id(param): name for name, param in model.named_parameters()}
    names = [name_of[id(param)] for group in optimizer.param_groups for param in group["params"]]
    # every rank has read the whole checkpoint, so each cuts its own shard: nothing is broadcast
    set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(state, names),
                             options=StateDictOptions(full_state_dict=True))


def compile_and_wrap(model, config, dist_info):
    """(forward_model, train_model): the model compiled if --compile (what evaluation calls), and that wrapped
    in DDP when there are several processes (what the training step calls). A sharded model (FSDP) is its own
    wrapper: both are the compiled model then."""
    ddp = dist_info.world_size > 1 and not dist_info.sharded
    if ddp and config.compile and torch_version() < (2, 6):
        # before 2.6, DDP's graph splitting refused the loss's autograd.Function (a higher-order op)
        torch._dynamo.config.optimize_ddp = False
    forward_model = torch.compile(model) if config.compile else model
    if not ddp:
        return forward_model, forward_model
    device_ids = [torch.device(dist_info.device).index] if dist_info.device.startswith("cuda") else None
    return forward_model, nn.parallel.DistributedDataParallel(forward_model, device_ids=device_ids)


def pause_clock(progress, seconds):
    """Take seconds off a tqdm bar's clock, so that its rate and ETA count training steps only: the step-0
    evaluation (HellaSwag above all) would otherwise make the first steps look hours long. tqdm's own unpause()
    moves the same two times, but from the last redraw, which can be a second of training before the pause."""
    if not progress.disable:
        progress.start_t += seconds
        progress.last_print_t += seconds


class Trainer:
    """What a run carries from step to step (model, optimizer, scaler, loader, step, tokens, best val loss):
    state_dict() is exactly what a checkpoint holds. The methods are the loop's phases.
    self.model is the GPT itself (its weights are the checkpoint's; under FSDP, sharded in place); self.forward_model
    is it compiled (with --compile), and self.train_model that under DDP (with several processes)."""

    def __init__(self, config, dist_info, model, log, *, loader, evaluation, checkpoint=None):
        self.config, self.dist_info, self.log = config, dist_info, log
        self.device = dist_info.device
        self.dtype = resolve_dtype(config.dtype, self.device)
        check_fsdp_dtype(dist_info, self.dtype)
        device_type = self.device.split(":")[0]
        self.model = place_model(model.train(), dist_info, self.dtype, config.loss_kernel)
        self.model.gradient_checkpointing = config.gradient_checkpointing
        self.forward_model, self.train_model = compile_and_wrap(self.model, config, dist_info)
        # made after sharding: under FSDP its moments are shards too
        self.optimizer = self.model.configure_optimizer(config.weight_decay, config.learning_rate, device_type)
        self.scaler = torch.amp.GradScaler(device_type, enabled=self.dtype == "float16")
        self.autocast = make_autocast(device_type, self.dtype)
        self.loader, self.evaluation = loader, evaluation
        self.iter_num, self.tokens_seen, self.best_val_loss = 0, 0, float("inf")
        self.bad_steps, self.skipped_steps, self.last_checkpoint = 0, 0, None
        self.wandb_run_id = None  # kept from run to run, so that a resumed run continues its wandb run
        self.plotter = Plotter(log) if config.plot and dist_info.is_master else None
        # a checkpoint written after an evaluation is not evaluated again; a stopped run's checkpoint is
        self.evaluated_at_start = checkpoint is not None and checkpoint.get("val_loss") is not None
        if checkpoint is not None:
            self.load_state_dict(checkpoint)
        self.batches = Prefetcher(loader, self.device)  # after the state is loaded: it reads on from there

    def state_dict(self):
        """The checkpoint, on rank 0; None on the other ranks. Every rank calls it: under FSDP the weights and
        the optimizer state are gathered from all of them."""
        model_state, optimizer_state = full_state(self.model, self.optimizer, self.dist_info.sharded)
        if not self.dist_info.is_master:
            return None
        return {
            "version": CHECKPOINT_VERSION, "model": model_state, "model_args": self.model_args,
            "optimizer": optimizer_state, "scaler": self.scaler.state_dict(), "iter_num": self.iter_num,
            "tokens": self.tokens_seen, "best_val_loss": self.best_val_loss, "skipped_steps": self.skipped_steps,
            "loader": self.batches.state_dict(), "rng": rng_state(), "config": dataclasses.asdict(self.config),
            "world_size": self.dist_info.world_size, "torch_version": str(torch.__version__),
            "git_commit": git_commit(), "wandb_run_id": self.wandb_run_id,
        }

    @property
    def model_args(self):
        return dataclasses.asdict(self.model.config)

    def load_state_dict(self, checkpoint):
        """Everything but the weights, which the model was built with. A new --data starts its loader afresh."""
        path = checkpoint.get("path")
        try:
            load_optimizer_state(self.model, self.optimizer, checkpoint["optimizer"], self.dist_info.sharded)
            if checkpoint["scaler"]:  # empty when the run trained without float16; the scaler starts fresh then
                self.scaler.load_state_dict(checkpoint["scaler"])
            if checkpoint["config"].get("data") == self.config.data:
                self.loader.load_state_dict(checkpoint["loader"])
            set_rng_state(checkpoint["rng"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"checkpoint {path} holds a malformed training state ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}): it is damaged; use another checkpoint "
                            f"of the run") from None
        self.iter_num, self.best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        self.wandb_run_id = checkpoint.get("wandb_run_id")  # None in checkpoints from before wandb
        # checkpoints from before token accounting: every step had the current global batch
        self.tokens_seen = checkpoint.get("tokens", self.iter_num * self.loader.tokens_per_step)
        self.last_checkpoint = path

    def save(self, name, val_loss=None, best=False):
        """Rank 0 writes the checkpoint, then every rank learns whether it worked: a failed write stops the
        run on all of them rather than let it train on without a safe point."""
        error = None
        checkpoint = self.state_dict()
        if self.dist_info.is_master:
            out_dir = Path(self.config.out_dir)
            path = out_dir / name
            checkpoint["val_loss"] = val_loss
            try:
                save_checkpoint(path, checkpoint)
                if best:
                    save_best(path, out_dir)
                self.last_checkpoint = path
                prune_checkpoints(out_dir, self.config.keep_last)
                self.log.print(f"saved {path}")
            except OSError as e:
                error = (f"could not write checkpoint {path} ({e.strerror or e}); the checkpoints already in "
                         f"{out_dir} are intact (latest: {self.last_checkpoint}); free disk space or "
                         f"fix permissions, then continue with --init_from resume")
        if self.dist_info.any(error is not None):
            raise RunStopped(f"error: {error or 'rank 0 could not write a checkpoint'}", code=1)

    def evaluate_and_save(self, step):
        start = time.perf_counter()
        scores = self.evaluation.scores(self.forward_model, self.autocast)  # ends in .item(): the device is done
        eval_seconds = time.perf_counter() - start
        self.log.print(f"step {step}: {describe_scores(scores)} | {eval_seconds:.1f} s")
        self.log.record(step=step, **scores, eval_seconds=round(eval_seconds, 3), tokens=self.tokens_seen)
        if self.dist_info.is_master or self.dist_info.sharded:  # under FSDP every rank takes part in each forward
            for text in sample_text(self.model, self.device, self.autocast, self.config.seed + step,
                                    self.config.sample_prompt, self.config.num_samples):
                self.log.print(f"  sample: {text!r}")
        if step > 0:  # step 0 is never checkpointed, so it never counts as the best
            improved = scores["val_loss"] < self.best_val_loss
            self.best_val_loss = min(self.best_val_loss, scores["val_loss"])
            self.save(checkpoint_name(step, scores["val_loss"]), scores["val_loss"], best=improved)
        if self.plotter:
            self.plotter.redraw()

    def optimizer_step(self, step):
        """Step number `step`: its learning rate, its batch, one update (or a skip, if not finite)."""
        config = self.config
        lr = get_lr(step, config.learning_rate, config.min_lr, config.warmup_iters, config.lr_decay_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.batches.next_batch()
        loss, grad_norm, applied = train_step(self.train_model, self.optimizer, self.scaler, x, y, config.grad_clip,
                                              self.autocast, self.dist_info.world_size > 1)
        self.iter_num = step + 1
        self.tokens_seen += self.loader.tokens_per_step
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

    def log_step(self, step, lr, loss, grad_norm, ms_per_step, model_flops_per_token, peak_flops):
        loss = all_reduce_mean(loss, self.dist_info.world_size).item()  # waits for the device
        tokens_per_sec = self.loader.tokens_per_step / (ms_per_step / 1000)
        mfu = estimate_mfu(model_flops_per_token, tokens_per_sec, peak_flops)
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        self.log.print(f"step {step:6d} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm.item():.3f} | "
                       f"{ms_per_step:.1f} ms | {tokens_per_sec:,.0f} tok/s | mfu {mfu_text}")
        self.log.record(step=step, train_loss=loss, lr=lr, grad_norm=grad_norm.item(), ms_per_step=ms_per_step,
                        tokens_per_sec=tokens_per_sec, mfu=mfu, tokens=self.tokens_seen)

    def train(self, stop):
        config, args = self.config, self.model_args
        model_flops_per_token = flops_per_token(self.model.num_params(), args["n_layer"], args["n_embd"],
                                                args["block_size"])
        peak_flops = device_peak_flops(self.device, self.dtype)
        first_step = self.iter_num
        interval_start, interval_steps = time.perf_counter(), 0
        from tqdm import tqdm
        # the bar is closed on the way out whatever happens, so that a message after it gets a line of its own
        with tqdm(total=config.max_iters, initial=first_step, desc="train", unit="step", dynamic_ncols=True,
                  mininterval=1.0, disable=not self.dist_info.is_master) as progress:
            for step in range(first_step, config.max_iters + 1):
                last_step = step == config.max_iters
                if (step % config.eval_interval == 0 or last_step) and not (self.evaluated_at_start
                                                                            and step == first_step):
                    eval_start = time.perf_counter()
                    self.evaluate_and_save(step)
                    interval_start, interval_steps = time.perf_counter(), 0  # evaluation is not training time
                    pause_clock(progress, interval_start - eval_start)  # nor is it in the bar's rate and ETA
                if last_step:
                    break
                lr, loss, grad_norm = self.optimizer_step(step)
                interval_steps += 1
                progress.update(1)
                if step % config.log_interval == 0 or step == config.max_iters - 1:
                    ms_per_step = 1000 * (time.perf_counter() - interval_start) / interval_steps
                    self.log_step(step, lr, loss, grad_norm, ms_per_step, model_flops_per_token, peak_flops)
                    interval_start, interval_steps = time.perf_counter(), 0
                if self.dist_info.any(stop.requested is not None):
                    name = signal.Signals(stop.requested or signal.SIGTERM).name
                    self.save(checkpoint_name(self.iter_num))
                    raise RunStopped(f"stopped by {name} after step {step}: saved {self.last_checkpoint}; continue "
                                     f"with --init_from resume", code=128 + (stop.requested or signal.SIGTERM))

    def summary(self, first_step, seconds):
        """What a finished run did and where everything it wrote is, a line each."""
        out_dir = Path(self.config.out_dir)
        best, metrics = out_dir / BEST_CHECKPOINT, out_dir / "metrics.jsonl"
        lines = [f"done: {self.iter_num:,} steps, {self.tokens_seen:,} tokens; "
                 f"{datetime.timedelta(seconds=round(seconds))} in this process, from step {first_step:,}"]
        row = lambda label, text: lines.append(f"  {label:<20} {text}")
        if best.exists():
            row(f"best val loss {self.best_val_loss:.4f}", best)
        if self.last_checkpoint is not None:
            row("latest checkpoint", f"{self.last_checkpoint}  (to train on: --init_from resume --max_iters N)")
        row("every figure", f"{metrics}  (python plot.py {metrics})")
        row("every flag", out_dir / "config.json")
        return lines

    def close(self):
        self.batches.close()
        if self.plotter:
            self.plotter.finish()


# -----------------------------------------------------------------------------
# The three programs: export, evaluate only, train


def export(config, dist_info):
    """--export_hf: a conversion, not a run; it reads no data and trains nothing."""
    if dist_info.is_master:
        model, checkpoint = load_start(config.init_from, config.out_dir)
        source = checkpoint["path"] if checkpoint else config.init_from
        print(f"exported {source} to {export_hf(model, config.export_hf)}")


def evaluate_only(config, explicit, dist_info, model, checkpoint):
    """--eval_only: the val loss (and HellaSwag) of the --init_from model, recorded in out_dir's metrics.jsonl
    (the checkpoint's own folder unless --out_dir is given)."""
    log = RunLog(config.out_dir, dist_info.is_master)
    model_args_for(config, explicit, model)
    evaluation = Evaluation(config, model.config.block_size, dist_info, log)
    dtype = resolve_dtype(config.dtype, dist_info.device)
    check_fsdp_dtype(dist_info, dtype)
    lock = claim_out_dir(config.out_dir, dist_info)  # its one line goes to a directory no trainer is writing
    try:
        model = place_model(model, dist_info, dtype, config.loss_kernel)
        forward_model = torch.compile(model) if config.compile else model
        scores = evaluation.scores(forward_model, make_autocast(dist_info.device.split(":")[0], dtype))
        source, step = (checkpoint["path"], checkpoint["iter_num"]) if checkpoint else (config.init_from, 0)
        log.print(f"{source}: step {step} {describe_scores(scores, len(evaluation.positions))}")
        log.record(step=step, **scores, eval_only=True, checkpoint=str(source))
    finally:
        if lock is not None:
            lock.release()


def train(config, explicit, changes, dist_info, model, checkpoint):
    """Training from scratch, from GPT-2 weights or from a checkpoint; one process or many."""
    log = RunLog(config.out_dir, dist_info.is_master)
    model_args = model_args_for(config, explicit, model)
    for change in changes:
        log.print(change)
    if checkpoint is not None:
        for warning in resume_warnings(checkpoint["config"], config, checkpoint.get("world_size", 1),
                                       dist_info.world_size):
            log.print(warning)
        if checkpoint["iter_num"] > config.max_iters:
            raise UserError(f"{checkpoint['path']} is at step {checkpoint['iter_num']}, past --max_iters "
                            f"{config.max_iters}: raise --max_iters to train on")
    # everything the user gave is checked before a model is built, a step taken or out_dir touched
    check_fsdp_dtype(dist_info, resolve_dtype(config.dtype, dist_info.device))
    check_tracker_packages(config, dist_info)
    evaluation = Evaluation(config, model_args["block_size"], dist_info, log)
    loader = ShardLoader(load_token_sources(config.data, "train"), config.batch_size, model_args["block_size"],
                         config.gradient_accumulation_steps, dist_info.rank, dist_info.world_size, config.seed,
                         config.shuffle)
    if model is None:
        check_model_fits(model_args, dist_info)
    continuing = checkpoint["path"] if checkpoint else None
    lock = claim_out_dir(config.out_dir, dist_info, check=lambda: check_run_files(config.out_dir, continuing))
    trainer, failed = None, True
    try:
        if model is None:
            model = new_model(model_args, config.seed)
        trainer = Trainer(config, dist_info, model, log, loader=loader, evaluation=evaluation, checkpoint=checkpoint)
        prepare_run_files(config, trainer, log, dist_info)
        log.print(f"GPT-2 {trainer.model.num_params(non_embedding=False) / 1e6:.2f}M parameters | "
                  f"{dist_info.world_size} process(es) on {dist_info.device} | {trainer.dtype} | "
                  f"{loader.tokens_per_step:,} tokens/step | torch {torch.__version__} | commit {git_commit()} | "
                  f"from step {trainer.iter_num}")
        first_step, started = trainer.iter_num, time.perf_counter()
        with StopSignal(verbose=dist_info.is_master) as stop:
            try:
                trainer.train(stop)
            except RunStopped as e:
                failed = e.code == 1  # a stop on a signal saved a checkpoint to resume from: not a failure
                raise
        failed = False
        for line in trainer.summary(first_step, time.perf_counter() - started):
            log.print(line)
    finally:
        if trainer is not None:
            trainer.close()
        log.close(failed)
        if lock is not None:
            lock.release()


# -----------------------------------------------------------------------------
# Entry point


def lost_contact(error):
    """An error from a collective whose peer died or timed out, as opposed to a bug."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    words = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "imed out", "NCCL error")
    return isinstance(error, RuntimeError) and any(w in str(error) for w in words)


def start(argv):
    """The config, and what --init_from names loaded: (config, explicit flags, changes, model, checkpoint)."""
    flags, explicit = parse_args(argv)
    if flags.export_hf or flags.init_from == "scratch":
        return flags, explicit, [], None, None
    model, checkpoint = load_start(flags.init_from, flags.out_dir)
    config, changes = run_config(flags, explicit, checkpoint)
    if checkpoint is None:  # GPT-2 weights: a new run, with the weights' architecture
        model_args_for(flags, explicit, model)
        config = dataclasses.replace(flags, **{k: getattr(model.config, k) for k in ARCHITECTURE})
    return config, explicit, changes, model, checkpoint


def main(argv=None):
    dist_info, code = None, 0
    try:
        config, explicit, changes, model, checkpoint = start(argv)
        config.validate()
        dist_info = setup_distributed(config.device, config.ddp_timeout, config.fsdp and not config.export_hf,
                                      config.backend)
        if config.export_hf:
            export(config, dist_info)
        elif config.eval_only:
            evaluate_only(config, explicit, dist_info, model, checkpoint)
        else:
            train(config, explicit, changes, dist_info, model, checkpoint)
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
