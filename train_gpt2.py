"""
Pre-train GPT-2 from scratch: the model, the sharded token loader, the cosine LR schedule, the DDP/FSDP loop.

    python train_gpt2.py                                       # one GPU (or the CPU), FineWeb-Edu shards
    python train_gpt2.py --config config/shakespeare_cpu.toml  # flags from a file (the command line wins)
    torchrun --standalone --nproc_per_node 8 train_gpt2.py     # DDP on one node (--fsdp True: FSDP)
    python train_gpt2.py --init_from resume                    # continue the run in --out_dir
    python train_gpt2.py --eval_only True --init_from out/best_val_loss.pt

Every flag is a field of settings.TrainConfig (`--help` lists them). This file reads top to bottom: the
model, the data, the schedule, the distributed set-up, evaluation, the training step and loop, and main(),
which runs one of three programs: export (--export_hf), evaluate_only (--eval_only) or train. What is not
that core lives in files named for it: settings.py, checkpoint.py, rundir.py, device.py, hf_convert.py,
cross_entropy_kernel.py. Importing this file only defines things: `from train_gpt2 import GPT, GPTConfig`.
"""

import dataclasses
import datetime
import functools
import hashlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import hellaswag
import rundir
from checkpoint import (BEST_CHECKPOINT, FullModelState, FullOptimizerState, Progress, RNGState,
                        checkpoint_name, checkpoint_path, evaluated_checkpoint, load_checkpoint,
                        make_checkpoint, prune_checkpoints, restore, save_best, save_checkpoint)
from cli import StopSignal, UserError
from cross_entropy_kernel import output_layer_loss
from device import (Distributed, available_memory, device_peak_flops, make_autocast, resolve_device,
                    resolve_dtype)
from fineweb import (EOT_TOKEN, VOCAB_SIZE, check_open_shard, get_tokenizer, open_shard, shard_files,
                     shard_valid)
from hf_convert import export_hf, is_hf_model, load_gpt2_weights
from rundir import Plotter, RunLog
from sampling import generate_tokens
from settings import (ARCHITECTURE, TrainConfig, check_architecture, parse_args, resume_warnings,
                      run_config, with_absolute_paths)

# -----------------------------------------------------------------------------
# The model: GPT-2 as in the paper and OpenAI's code


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50,257 padded up to a multiple of 64 so the matmuls run faster
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True  # scaled at init, see GPT._init_weights

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    takes_positions = True  # forward(idx, positions=...) gives logits there alone (hellaswag.py asks)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.loss_kernel = True  # the loss's softmax through the Triton kernel, where it runs
        self.loss_workspace = {}  # the CPU loss's logits buffer, kept between steps
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std *= (2 * self.config.n_layer) ** -0.5  # two residual additions per block
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, return_logits=True, positions=None):
        """(logits, loss). return_logits=False: the training step's loss, chunk by chunk, never holding the
        (B, T, vocab_size) logits (None in their place). positions: a (K,) index into the B * T flattened
        positions; the (K, vocab_size) logits there alone, no loss (an evaluation of a few tokens a row)."""
        B, T = idx.size()
        if positions is not None and targets is not None:
            raise ValueError("positions gives logits without a loss: pass targets or positions, not both")
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than the block size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None and not return_logits:
            return None, output_layer_loss(x.view(B * T, -1), self.lm_head.weight, targets.view(-1),
                                           self.loss_workspace, self.loss_kernel)
        if positions is not None:
            return self.lm_head(x.view(B * T, -1)[positions]), None
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def num_params(self, non_embedding=True):
        """Parameters, counted once despite the tying; the position table is left out by default since it
        costs no FLOPs (the token table does: it is also the output layer)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def configure_optimizer(self, weight_decay, learning_rate, device_type):
        """AdamW with decay on the 2-D weights (matmuls, embeddings) only, fused where the device has it."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        try:
            return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                     fused=device_type in ("cuda", "cpu"))
        except (RuntimeError, TypeError):  # this device or torch has no fused AdamW
            return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_limit=None, generator=None):
        """idx (B, T) and max_new_tokens sampled tokens after it; ids at or past vocab_limit (the padding
        of the vocabulary) are never sampled."""
        new = generate_tokens(lambda context: self(context)[0], idx, max_new_tokens, self.config.block_size,
                              temperature, top_k, vocab_limit, generator)
        return torch.cat([idx, *new], dim=1)

    @classmethod
    def from_pretrained(cls, name_or_path):
        """GPT-2 weights from transformers: OpenAI's ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', from the
        Hugging Face hub or its cache) or a folder written by save_pretrained."""
        model_args, state = load_gpt2_weights(name_or_path)
        model = cls(GPTConfig(**model_args))
        model.load_state_dict(state)
        return model


# -----------------------------------------------------------------------------
# The data: shards read through memmaps, each rank reading its own part of every global batch


@functools.lru_cache(maxsize=2)
def tokenize_text_file(path):
    """A whole text file as uint16 tokens, read once for both splits. A binary file (a token shard, say:
    its header holds zero bytes) or an empty one is refused."""
    raw = Path(path).read_bytes()
    if not raw.strip():
        raise UserError(f"--data {path} is empty: pass a text file with text in it, or a directory of shards")
    if b"\0" in raw:
        raise UserError(f"--data {path} is a binary file, not text (a token shard?): pass the directory that "
                        f"holds the shards (--data DIR), or a text file")
    tokens = get_tokenizer().encode_ordinary(raw.decode("utf-8", errors="replace"))
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
        raise UserError(f"{name}: token id {span.max()} near offset {start} is outside GPT-2's vocabulary "
                        f"of {vocab_size}: the shard is corrupt or from another tokenizer; regenerate it "
                        f"with `python fineweb.py`")
    return span


def check_unchanged(tokens):
    """A shard's header still says what it said when the run opened it."""
    path = getattr(tokens, "filename", None)
    if path is not None and not shard_valid(path, len(tokens)):
        raise UserError(f"{path} changed since the run began (its header or size differs): restore it, or "
                        f"regenerate the data and start a new run")


def fingerprint(tokens, samples=64, span=256):
    """A cheap digest of a token source, to tell data that changed under the same name and size on
    resume: all of it when it is small, else `samples` evenly spaced spans of `span` tokens."""
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

    - shuffle (the default): the shard is cut into (len - 1) // block_size windows of block_size + 1
      tokens, starting at multiples of block_size (a window's last token is the next one's first), and each
      step takes the next rows_per_step windows of a seeded permutation of them, new for every shard and
      epoch: every window once an epoch, in batches of unrelated text, but for the last few of the
      permutation that do not fill a global batch;
    - sequential (build-nanogpt's loader): each step takes the next rows_per_step * block_size + 1
      consecutive tokens.

    `position` counts the tokens of the current shard used so far this epoch, a shard with less than one
    global batch left is left for the next, and row block (micro_step * world_size + rank) of each global
    batch is this rank's micro-batch: the batches depend only on the data, the seed, the mode and the global
    batch shape, not on how the global batch is split between ranks and micro-steps."""

    def __init__(self, sources, batch_size, block_size, micro_steps, rank=0, world_size=1, seed=0,
                 shuffle=True):
        self.names = [name for name, _ in sources]
        self.shards = [tokens for _, tokens in sources]
        self.B, self.T, self.micro_steps = batch_size, block_size, micro_steps
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.rows_per_step = batch_size * micro_steps * world_size
        self.tokens_per_step = self.rows_per_step * block_size
        if not any(len(s) > self.tokens_per_step for s in self.shards):
            raise UserError(f"the train data ({max(map(len, self.shards))} tokens in the largest shard) is "
                            f"shorter than one global batch ({self.rows_per_step} rows x {block_size} tokens "
                            f"+ 1): lower --batch_size, --gradient_accumulation_steps or --block_size")
        self.windows, self.windows_of = None, None
        self.fingerprints = [fingerprint(tokens) for tokens in self.shards]
        self.epoch, self.shard, self.position = 0, 0, 0
        self.order = self.shard_order(0)
        self.skip_short_shards()

    def shard_order(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def skip_short_shards(self):
        """Move on, shard by shard and epoch by epoch, to the first place with a whole global batch left.
        With shuffle the test reads the same in windows: position // T + rows_per_step <= (len - 1) // T."""
        while self.position + self.tokens_per_step + 1 > len(self.shards[self.order[self.shard]]):
            self.shard, self.position = self.shard + 1, 0
            if self.shard == len(self.shards):
                self.epoch, self.shard = self.epoch + 1, 0
                self.order = self.shard_order(self.epoch)
            check_unchanged(self.shards[self.order[self.shard]])

    def shard_windows(self):
        """The start offsets of the current shard's windows in this epoch's order, computed once a shard."""
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
        starts = self.shard_windows()[first:first + self.rows_per_step]  # the global batch's
        mine = starts.reshape(self.micro_steps, self.world_size, self.B)[:, self.rank].flatten()
        windows = [read_span(self.names[index], self.shards[index], start, self.T + 1) for start in mine]
        windows = np.stack(windows).reshape(self.micro_steps, self.B, self.T + 1)
        # numpy copies the inputs and targets out: torch's copy of these strided views went through its
        # thread pool, a thousand times slower on a busy CPU (BENCHMARKS.md)
        return torch.from_numpy(windows[..., :-1].copy()), torch.from_numpy(windows[..., 1:].copy())

    def sequential_batch(self):
        index = self.order[self.shard]
        micro_batch_tokens = self.B * self.T
        xs, ys = [], []
        for micro_step in range(self.micro_steps):
            start = self.position + (micro_step * self.world_size + self.rank) * micro_batch_tokens
            span = read_span(self.names[index], self.shards[index], start, micro_batch_tokens + 1)
            chunk = torch.from_numpy(span)
            xs.append(chunk[:-1].view(self.B, self.T))
            ys.append(chunk[1:].view(self.B, self.T))
        return torch.stack(xs), torch.stack(ys)

    def shard_sizes(self):
        return [[name, len(tokens)] for name, tokens in zip(self.names, self.shards)]

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "shards": self.shard_sizes(), "fingerprints": self.fingerprints}

    def load_state_dict(self, state):
        """Continue where the state left off, reading the way its run read. Fingerprints are None in
        checkpoints from before they were kept."""
        if [list(s) for s in state["shards"]] != self.shard_sizes():
            raise UserError("the train data differs from the checkpoint's (shard names or sizes changed): "
                            "resume with the same --data")
        if state["fingerprints"] not in (None, self.fingerprints):
            changed = next(n for n, a, b in zip(self.names, state["fingerprints"], self.fingerprints)
                           if a != b)
            raise UserError(f"the train data has the checkpoint's shard names and sizes but other contents "
                            f"({changed} differs): restore the data the run trained on, or start a new run")
        self.seed, self.epoch, self.shuffle = state["seed"], state["epoch"], state["shuffle"]
        self.shard, self.position = state["shard"], state["position"]
        self.order = self.shard_order(self.epoch)
        self.skip_short_shards()


class Prefetcher:
    """A loader that reads the next batch in a background thread while the current step runs, and copies it
    to the device from pinned memory without blocking. state_dict() is the loader's state after the batches
    handed out so far, not after the one being prefetched, so a checkpoint resumes at the right batch."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device
        self.pin = device.startswith("cuda")
        self.tokens_per_step = loader.tokens_per_step
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.start()

    def start(self):
        self.state = self.loader.state_dict()
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

    def load_state_dict(self, state):
        self.pending.result()  # the batch read ahead from the old state is dropped
        self.loader.load_state_dict(state)
        self.start()

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
        raise UserError(f"the val data ({sum(len(t) for _, t in sources)} tokens) is shorter than one "
                        f"batch ({batch_size} x {block_size} tokens + 1): lower --batch_size or "
                        f"--block_size")
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
# The distributed set-up: DDP or FSDP over torchrun's processes; one process is world_size 1

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def setup_distributed(device, timeout_seconds=600, fsdp=False, backend="auto"):
    """Join the process group when launched by torchrun (NCCL on CUDA, Gloo on the CPU, unless backend
    names one). A collective that waits past the timeout (a rank died or hangs) raises instead of waiting
    forever. FSDP needs a process group even for one process: without torchrun, fsdp makes one of a single
    rank (its store in memory, so no port is opened)."""
    present = [v for v in TORCHRUN_VARIABLES if v in os.environ]
    device = resolve_device(device)
    if not present and not fsdp:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)  # where Triton's kernels and stray allocations land: cuda:1
        return Distributed(device=device)
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if present and missing:
        raise UserError(f"{present[0]} is set but {missing[0]} is not: launch distributed runs with "
                        f"`torchrun --nproc_per_node N train_gpt2.py ...`")
    rank, local_rank, world_size = ((int(os.environ[v]) for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
                                    if present else (0, 0, 1))
    if fsdp and device.split(":")[0] not in ("cuda", "cpu"):
        raise UserError(f"--fsdp True runs on CUDA GPUs or the CPU, not on {device}: pass --fsdp False")
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl" and not device.startswith("cuda"):
        raise UserError(f"--backend nccl needs CUDA GPUs, and this run is on {device}: pass --backend gloo")
    if backend == "gloo" and fsdp and device.startswith("cuda"):
        raise UserError("--fsdp True on GPUs needs --backend nccl (FSDP's collectives on CUDA tensors are "
                        "not Gloo's): pass --backend auto, or --fsdp False to try DDP on Gloo")
    if device.startswith("cuda") and present:
        gpus = torch.cuda.device_count()
        if local_rank >= gpus and backend == "nccl":
            raise UserError(f"LOCAL_RANK {local_rank} has no GPU of its own on this machine of {gpus}: "
                            f"launch at most {gpus} processes per node (--nproc_per_node {gpus}), or pass "
                            f"--backend gloo to let processes share GPUs (slow, for trying the path)")
        device = f"cuda:{local_rank % gpus}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_seconds)
    if present:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return Distributed(rank, local_rank, world_size, device, control, sharded=fsdp)


def lost_contact(error):
    """An error from a collective whose peer died or timed out, as opposed to a bug."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    words = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "imed out", "NCCL error")
    return isinstance(error, RuntimeError) and any(w in str(error) for w in words)


BYTES_PER_PARAM = 16  # float32 weight, gradient and two AdamW moments


def check_model_fits(model_args, dist_info):
    """Refuse, before allocating it, a model that cannot fit: an allocation far past the memory fails with a
    traceback or, on the CPU, summons the out-of-memory killer. Under FSDP a device holds 1/world_size of
    the state, but the host of rank 0 gathers the whole weights and AdamW state for every checkpoint."""
    C, L = model_args["n_embd"], model_args["n_layer"]
    n_params = 12 * L * C * C + (model_args["vocab_size"] + model_args["block_size"]) * C
    size, fsdp = f"a model of {n_params / 1e6:,.0f}M parameters needs about", dist_info.sharded
    needed = n_params * BYTES_PER_PARAM / (dist_info.world_size if fsdp else 1)
    free = available_memory(dist_info.device)
    if free is not None and needed > free:
        how = f" per process (--fsdp True over {dist_info.world_size})" if fsdp else ""
        fix = "" if fsdp else ", or shard it over several processes with --fsdp True"
        raise UserError(f"{size} {needed / 2**30:,.1f} GiB for its weights, gradients and AdamW state{how}, "
                        f"more than the {free / 2**30:,.1f} GiB available on {dist_info.device}: choose a "
                        f"smaller --n_layer or --n_embd{fix}")
    # every rank checks its own host, so that all stop together rather than rank 0 alone
    needed, free = n_params * BYTES_PER_PARAM, available_memory("cpu")
    if fsdp and free is not None and needed > free:
        raise UserError(f"{size} {needed / 2**30:,.1f} GiB of host memory to gather its whole weights and "
                        f"AdamW state into a checkpoint on rank 0 (--fsdp True), more than the "
                        f"{free / 2**30:,.1f} GiB available: choose a smaller --n_layer or --n_embd, or "
                        f"run on hosts with more memory")


def shard_model(model, device, dtype):
    """FSDP2 over every rank: each block is a group of its own, gathered whole just before it runs and
    freed after, and the root holds the rest (wte, which is also lm_head, wpe and ln_f), so the tied weight
    stays one parameter. Each rank keeps its float32 shard of every weight, gradient and AdamW moment; with
    bfloat16 the gathered weights are bfloat16 and the gradients reduced in float32. Each shard is moved to
    device as it is cut, so the whole model never is."""
    try:  # public in torch.distributed.fsdp from torch 2.6
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()  # float32: the weights as they are
    if dtype == "bfloat16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def place_model(model, dist_info, dtype, loss_kernel=True):
    """The model on its device: whole, or under FSDP this rank's shards of it. On CUDA, float32 matmuls run
    as TF32 (training and evaluation alike, so that an evaluation repeats the one logged in training)."""
    model.loss_kernel = loss_kernel
    if dist_info.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dist_info.sharded:
        return shard_model(model, dist_info.device, dtype)
    return model.to(dist_info.device)


def wrap_model(model, compile, dist_info):
    """What every forward pass calls: the model compiled if asked, and that wrapped in DDP when there are
    several processes (a sharded model, FSDP, is its own wrapper). Evaluation calls it too: DDP's forward
    pass without gradients is no collective, for a model without buffers."""
    ddp = dist_info.world_size > 1 and not dist_info.sharded
    version = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    if ddp and compile and version < (2, 6):
        # before 2.6, DDP's graph splitting refused the loss's autograd.Function (a higher-order op)
        torch._dynamo.config.optimize_ddp = False
    compiled = torch.compile(model) if compile else model
    if not ddp:
        return compiled
    device_ids = [torch.device(dist_info.device).index] if dist_info.device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(compiled, device_ids=device_ids)


def set_gradient_sync(model, sync):
    """Whether the next backward pass reduces the gradients over the ranks: DDP's flag (flipped rather than
    entering no_sync(), so the loop stays flat; set before the forward pass, where DDP reads it) or FSDP's."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = sync
    else:
        model.set_requires_gradient_sync(sync)  # FSDP2; a compiled model passes it on to the module it wraps


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -----------------------------------------------------------------------------
# Evaluation: the val loss over fixed batches, HellaSwag, samples


def load_hellaswag(config, dist_info, log):
    """The HellaSwag examples scored at every evaluation, or None: a run that cannot have them (no network,
    no file) says so once and trains on."""
    if not config.hellaswag:
        return None
    examples, problems, error = None, [], None
    try:
        examples, problems = hellaswag.load_examples(config.hellaswag_data, flag="--hellaswag_data",
                                                     limit=config.hellaswag_examples or None)
        if not examples:
            error = f"no example in {config.hellaswag_data} can be scored"
    except UserError as e:
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
        """Mean loss over the fixed val batches; rank r takes batches r, r + world_size, ... (a lockstep
        pass past its share, under FSDP, runs the first batch again and is not counted)."""
        d, B, T = self.dist_info, self.batch_size, self.block_size
        mine = self.positions[d.rank::d.world_size]
        model.eval()
        loss_sum = torch.zeros(2, device=d.device)  # (sum of batch losses, batch count)
        for i in range(d.forward_passes(len(self.positions))):
            source, start = mine[i] if i < len(mine) else self.positions[0]
            chunk = torch.from_numpy(read_span(*self.sources[source], start, B * T + 1))
            x, y = chunk[:-1].view(B, T).to(d.device), chunk[1:].view(B, T).to(d.device)
            with autocast:
                _, loss = model(x, y, return_logits=False)  # the chunked loss: no full logits in memory
            counted = torch.tensor(float(i < len(mine)), device=d.device)
            loss_sum += torch.stack([loss.float() * counted, counted])
        model.train()
        loss_sum = d.sum(loss_sum)
        return (loss_sum[0] / loss_sum[1]).item()

    def scores(self, model, autocast):
        """{val_loss, and hellaswag_acc_norm, hellaswag_acc, hellaswag_n when HellaSwag is on}, over all ranks."""
        scores = {"val_loss": self.val_loss(model, autocast)}
        if self.hellaswag:
            # hellaswag.py's own batch, whatever the training batch: its logits at the endings stay near a
            # GB however large the micro-batch
            result = hellaswag.evaluate(model, self.hellaswag, hellaswag.BATCH_SIZE, self.block_size, autocast,
                                        self.dist_info)
            scores.update(hellaswag_acc_norm=result["acc_norm"], hellaswag_acc=result["acc"],
                          hellaswag_n=result["n"])
        return scores


def describe_scores(scores, batches=None):
    text = f"val loss {scores['val_loss']:.4f}" + (f" over {batches} batches" if batches else "")
    if "hellaswag_n" in scores:
        text += f" | hellaswag acc_norm {scores['hellaswag_acc_norm']:.4f} ({scores['hellaswag_n']})"
    return text


def sample_text(model, dist_info, autocast, seed, prompt, num_samples=4, max_new_tokens=32):
    """num_samples continuations of prompt from rank 0 (from every rank under FSDP, whose forward passes
    every rank makes: the same text); an empty prompt starts a new document, as in training."""
    if dist_info.forward_passes(int(num_samples > 0)) == 0:
        return []
    enc = get_tokenizer()
    ids = enc.encode(prompt, allowed_special="all") or [EOT_TOKEN]
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dist_info.device)
    generator = torch.Generator(device=dist_info.device).manual_seed(seed)
    model.eval()
    with autocast:
        out = model.generate(idx, max_new_tokens, top_k=50, vocab_limit=enc.n_vocab, generator=generator)
    model.train()
    return [enc.decode(row.tolist()) for row in out]


# -----------------------------------------------------------------------------
# Training: the Trainer holds a run's state, its train_step is one optimizer step, its loop the run


class Trainer:
    """What a run carries from step to step: the model (the GPT, sharded in place under FSDP) and `wrapped`,
    what its forward passes call (compiled, under DDP); the optimizer, the GradScaler, the batches and the
    counters (progress). Its checkpoint is those parts' states (checkpoint.make_checkpoint)."""

    def __init__(self, config, dist_info, model, log, *, loader, evaluation, checkpoint=None):
        self.config, self.dist_info, self.log = config, dist_info, log
        self.device = dist_info.device
        self.dtype = resolve_dtype(config.dtype, self.device, dist_info.sharded)
        device_type = self.device.split(":")[0]
        self.model = place_model(model.train(), dist_info, self.dtype, config.loss_kernel)
        self.model.gradient_checkpointing = config.gradient_checkpointing
        self.wrapped = wrap_model(self.model, config.compile, dist_info)
        # made after sharding: under FSDP its moments are shards too
        self.optimizer = self.model.configure_optimizer(config.weight_decay, config.learning_rate, device_type)
        self.scaler = torch.amp.GradScaler(device_type, enabled=self.dtype == "float16")
        self.autocast = make_autocast(device_type, self.dtype)
        self.batches = Prefetcher(loader, self.device)
        self.evaluation, self.progress = evaluation, Progress()
        self.bad_steps, self.last_checkpoint, self.best_pending = 0, None, False
        self.plotter = Plotter(log) if config.plot and dist_info.is_master else None
        # a checkpoint written after an evaluation is not evaluated again; a stopped run's checkpoint is
        self.evaluated_at_start = checkpoint is not None and checkpoint["val_loss"] is not None
        if checkpoint is not None:
            parts = self.parts()
            del parts["model"]  # the model was built with the checkpoint's weights
            if not same_data(checkpoint["config"]["data"], config.data):
                del parts["loader"]  # new data: its loader starts afresh
            restore(checkpoint, parts)
            self.last_checkpoint = checkpoint["path"]

    def parts(self):
        """The parts of a checkpoint, each with state_dict() and load_state_dict()."""
        return {"model": FullModelState(self.model, self.dist_info.sharded),
                "optimizer": FullOptimizerState(self.model, self.optimizer, self.dist_info.sharded),
                "scaler": self.scaler, "loader": self.batches, "rng": RNGState(), "progress": self.progress}

    def train_step(self, step):
        """Optimizer step number `step`: its learning rate and batch, the forward and backward passes of its
        micro-steps, and one update, skipped if the loss or gradient norm is not finite (reading that one
        flag is the step's one wait for the device). Returns (lr, mean loss, gradient norm), as tensors."""
        c, d = self.config, self.dist_info
        lr = get_lr(step, c.learning_rate, c.min_lr, c.warmup_iters, c.lr_decay_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.batches.next_batch()  # (micro_steps, B, T)
        micro_steps = x.size(0)
        loss_sum = torch.zeros((), device=x.device)
        for micro_step in range(micro_steps):
            if d.world_size > 1:  # reduce the gradients on the last micro-step only
                set_gradient_sync(self.wrapped, micro_step == micro_steps - 1)
            with self.autocast:
                _, loss = self.wrapped(x[micro_step], y[micro_step], return_logits=False)
            loss = loss / micro_steps
            loss_sum += loss.detach()
            self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor of the ranks' partial norms
            grad_norm = grad_norm.full_tensor()
        finite = torch.isfinite(loss_sum)
        if not self.scaler.is_enabled():  # a GradScaler (float16) skips overflowing gradients itself
            finite &= torch.isfinite(grad_norm)
        applied = not d.any(not finite.item())  # the loss is this rank's own: all skip, or none does
        if applied:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.iter_num = step + 1
        self.progress.tokens += self.batches.tokens_per_step
        self.count_bad_steps(step, lr, applied)
        return lr, loss_sum, grad_norm

    def count_bad_steps(self, step, lr, applied):
        """A skipped step is logged; max_bad_steps in a row stop the run."""
        if applied:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self.progress.skipped_steps += 1
        self.log.print(f"step {step}: non-finite loss or gradient norm, update skipped ({self.bad_steps} in a "
                       f"row)")
        self.log.record(step=step, skipped=True, lr=lr)
        if self.bad_steps >= self.config.max_bad_steps:
            raise UserError(f"stopped at step {step}: {self.bad_steps} steps in a row had a non-finite "
                            f"loss or gradient norm; the last good checkpoint is "
                            f"{self.last_checkpoint or 'none yet'}: continue from it with a lower "
                            f"--learning_rate", code=1)

    def save(self, step, val_loss=None):
        """Rank 0 writes the checkpoint of `step` (and the best copy, if val_loss is the best), then every
        rank learns whether that worked: a failed write stops the run on all of them."""
        if val_loss is not None and val_loss < self.progress.best_val_loss:
            self.progress.best_val_loss, self.progress.best_step = val_loss, step
            self.best_pending = True
        checkpoint = make_checkpoint(self.parts(), model_args=dataclasses.asdict(self.model.config),
                                     config=dataclasses.asdict(self.config), val_loss=val_loss,
                                     world_size=self.dist_info.world_size,
                                     torch_version=str(torch.__version__), git_commit=git_commit())
        self.dist_info.on_rank0(lambda: self.write(checkpoint, checkpoint_name(step, val_loss)),
                                "write a checkpoint")

    def write(self, checkpoint, name):
        out_dir = Path(self.config.out_dir)
        path = out_dir / name
        try:
            save_checkpoint(path, checkpoint)
        except OSError as e:
            raise UserError(f"could not write checkpoint {path} ({e.strerror or e}); the checkpoints already "
                            f"in {out_dir} are intact (latest: {self.last_checkpoint}); free disk space or "
                            f"fix permissions, then continue with --init_from resume") from None
        self.last_checkpoint = path
        self.log.print(f"saved {path}")
        best = evaluated_checkpoint(out_dir, self.progress.best_step) if self.best_pending else None
        if best is not None:
            try:
                save_best(best, out_dir)
                self.best_pending = False
            except OSError as e:
                raise UserError(f"wrote {path}, but not its copy {out_dir / BEST_CHECKPOINT} ({e.strerror or e}): "
                                f"{best.name} holds the best weights and is kept until the copy is written; "
                                f"free disk space, then continue with --init_from resume") from None
        prune_checkpoints(out_dir, self.config.keep_last, keep=best if self.best_pending else None)

    def evaluate_and_save(self, step):
        start = time.perf_counter()
        scores = self.evaluation.scores(self.wrapped, self.autocast)  # ends in .item(): the device is done
        eval_seconds = time.perf_counter() - start
        self.log.print(f"step {step}: {describe_scores(scores)} | {eval_seconds:.1f} s")
        self.log.record(step=step, **scores, eval_seconds=round(eval_seconds, 3), tokens=self.progress.tokens)
        for text in sample_text(self.model, self.dist_info, self.autocast, self.config.seed + step,
                                self.config.sample_prompt, self.config.num_samples):
            self.log.print(f"  sample: {text!r}")
        if step > 0:  # step 0 is never checkpointed, so it never counts as the best
            self.save(step, scores["val_loss"])
        if self.plotter:
            self.plotter.redraw()

    def log_step(self, step, lr, loss, grad_norm, ms_per_step, model_flops_per_token, peak_flops):
        loss = (self.dist_info.sum(loss.clone()) / self.dist_info.world_size).item()  # waits for the device
        tokens_per_sec = self.batches.tokens_per_step / (ms_per_step / 1000)
        mfu = estimate_mfu(model_flops_per_token, tokens_per_sec, peak_flops)
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        self.log.print(f"step {step:6d} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm.item():.3f} | "
                       f"{ms_per_step:.1f} ms | {tokens_per_sec:,.0f} tok/s | mfu {mfu_text}")
        self.log.record(step=step, train_loss=loss, lr=lr, grad_norm=grad_norm.item(), ms_per_step=ms_per_step,
                        tokens_per_sec=tokens_per_sec, mfu=mfu, tokens=self.progress.tokens)

    def loop(self, stop):
        """Train from the current step to max_iters: evaluate (and checkpoint) every eval_interval steps and
        at the end, log every log_interval steps, and stop with a checkpoint when a signal asks."""
        config, args = self.config, self.model.config
        model_flops_per_token = flops_per_token(self.model.num_params(), args.n_layer, args.n_embd,
                                                args.block_size)
        peak_flops = device_peak_flops(self.device, self.dtype)
        first_step = self.progress.iter_num
        interval_start, interval_steps = time.perf_counter(), 0
        from tqdm import tqdm
        # closed on the way out whatever happens, so that a message after it gets a line of its own
        with tqdm(total=config.max_iters, initial=first_step, desc="train", unit="step", dynamic_ncols=True,
                  mininterval=1.0, disable=not self.dist_info.is_master) as progress:
            for step in range(first_step, config.max_iters + 1):
                last_step = step == config.max_iters
                evaluated = self.evaluated_at_start and step == first_step
                if (step % config.eval_interval == 0 or last_step) and not evaluated:
                    eval_start = time.perf_counter()
                    self.evaluate_and_save(step)
                    interval_start, interval_steps = time.perf_counter(), 0  # evaluation is not training
                    pause_clock(progress, interval_start - eval_start)  # nor in the bar's rate and ETA
                if last_step:
                    break
                lr, loss, grad_norm = self.train_step(step)
                interval_steps += 1
                progress.update(1)
                if step % config.log_interval == 0 or step == config.max_iters - 1:
                    ms_per_step = 1000 * (time.perf_counter() - interval_start) / interval_steps
                    self.log_step(step, lr, loss, grad_norm, ms_per_step, model_flops_per_token, peak_flops)
                    interval_start, interval_steps = time.perf_counter(), 0
                if self.dist_info.any(stop.requested is not None):
                    signum = stop.requested or signal.SIGTERM
                    self.save(self.progress.iter_num)
                    raise UserError(f"stopped by {signal.Signals(signum).name} after step {step}: saved "
                                    f"{self.last_checkpoint}; continue with --init_from resume",
                                    code=128 + signum)

    def close(self):
        self.batches.close()
        if self.plotter:
            self.plotter.finish()


def pause_clock(progress, seconds):
    """Take seconds off a tqdm bar's clock, so that its rate and ETA count training steps only. tqdm's own
    unpause() moves the same two times, but from the last redraw, up to a second of training before."""
    if not progress.disable:
        progress.start_t += seconds
        progress.last_print_t += seconds


def same_data(a, b):
    return a == b or Path(a).resolve() == Path(b).resolve()


# -----------------------------------------------------------------------------
# The three programs: export, evaluate only, train


def load_start(init_from, out_dir):
    """(model, checkpoint) for --init_from: a checkpoint of this trainer (a path, or `resume` for the latest
    in out_dir; its weights built into a GPT, removed from the dict) or GPT-2 weights (checkpoint None)."""
    if init_from != "resume" and is_hf_model(init_from):
        return GPT.from_pretrained(init_from).eval(), None
    checkpoint = load_checkpoint(checkpoint_path(init_from, out_dir))
    try:
        model = GPT(GPTConfig(**checkpoint["model_args"]))
    except TypeError as e:
        raise UserError(f"checkpoint {checkpoint['path']} has an unknown architecture ({e}): it is damaged or "
                        f"from another program") from None
    try:
        model.load_state_dict(checkpoint.pop("model"))
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        lines = str(e).strip().splitlines()
        reason = " ".join(line.strip() for line in lines[1:3]) if len(lines) > 1 else (lines or [""])[0]
        raise UserError(f"checkpoint {checkpoint['path']} does not match its own architecture ({reason}): it "
                        f"is damaged; use another checkpoint of the run") from None
    return model.eval(), checkpoint


def export(config, dist_info):
    """--export_hf: a conversion, not a run; it reads no data and trains nothing."""
    def convert():
        model, checkpoint = load_start(config.init_from, config.out_dir)
        source = checkpoint["path"] if checkpoint else config.init_from
        path = export_hf(dataclasses.asdict(model.config), model.state_dict(), config.export_hf)
        print(f"exported {source} to {path}")
    dist_info.on_rank0(convert, "export the model")


def evaluate_only(config, dist_info, model, checkpoint):
    """--eval_only: the val loss (and HellaSwag) of the --init_from model, recorded in out_dir's
    metrics.jsonl (the checkpoint's own folder unless --out_dir is given)."""
    log = RunLog(config.out_dir, dist_info.is_master)
    evaluation = Evaluation(config, model.config.block_size, dist_info, log)
    dtype = resolve_dtype(config.dtype, dist_info.device, dist_info.sharded)
    # its one line goes to a directory no trainer is writing
    lock = dist_info.on_rank0(lambda: rundir.claim_out_dir(config.out_dir), "use --out_dir")
    try:
        model = place_model(model, dist_info, dtype, config.loss_kernel)
        forward = torch.compile(model) if config.compile else model
        scores = evaluation.scores(forward, make_autocast(dist_info.device.split(":")[0], dtype))
        source, step = ((checkpoint["path"], checkpoint["progress"]["iter_num"]) if checkpoint
                        else (config.init_from, 0))
        log.print(f"{source}: step {step} {describe_scores(scores, len(evaluation.positions))}")
        log.record(step=step, **scores, eval_only=True, checkpoint=str(source))
    finally:
        if lock is not None:
            lock.release()


def train(config, changes, dist_info, model, checkpoint):
    """Training from scratch, from GPT-2 weights or from a checkpoint; one process or many."""
    log = RunLog(config.out_dir, dist_info.is_master)
    model_args = dataclasses.asdict(model.config) if model is not None else new_model_args(config)
    for line in changes + (resume_warnings(checkpoint["config"], config, checkpoint["world_size"],
                                           dist_info.world_size) if checkpoint else []):
        log.print(line)
    if checkpoint is not None and checkpoint["progress"]["iter_num"] > config.max_iters:
        raise UserError(f"{checkpoint['path']} is at step {checkpoint['progress']['iter_num']}, past "
                        f"--max_iters {config.max_iters}: raise --max_iters to train on")
    # everything the user gave is checked before a model is built, a step taken or out_dir touched
    resolve_dtype(config.dtype, dist_info.device, dist_info.sharded)
    dist_info.on_rank0(lambda: rundir.check_tracker_packages(config), "load a tracker's package")
    evaluation = Evaluation(config, model_args["block_size"], dist_info, log)
    loader = ShardLoader(load_token_sources(config.data, "train"), config.batch_size,
                         model_args["block_size"], config.gradient_accumulation_steps, dist_info.rank,
                         dist_info.world_size, config.seed, config.shuffle)
    if model is None:
        check_model_fits(model_args, dist_info)
    continuing = checkpoint["path"] if checkpoint else None
    check = lambda: rundir.check_run_files(config.out_dir, continuing)
    lock = dist_info.on_rank0(lambda: rundir.claim_out_dir(config.out_dir, check), "use --out_dir")
    trainer, failed = None, True
    try:
        if model is None:
            torch.manual_seed(config.seed)
            model = GPT(GPTConfig(**model_args))
        trainer = Trainer(config, dist_info, model, log, loader=loader, evaluation=evaluation,
                          checkpoint=checkpoint)
        dist_info.on_rank0(lambda: rundir.prepare_run_files(config, trainer.progress,
                                                            trainer.evaluated_at_start, log),
                           "prepare --out_dir")
        first_step, started = trainer.progress.iter_num, time.perf_counter()
        log.print(f"GPT-2 {trainer.model.num_params(non_embedding=False) / 1e6:.2f}M parameters | "
                  f"{dist_info.world_size} process(es) on {dist_info.device} | {trainer.dtype} | "
                  f"{loader.tokens_per_step:,} tokens/step | torch {torch.__version__} | commit "
                  f"{git_commit()} | from step {first_step}")
        with StopSignal(verbose=dist_info.is_master) as stop:
            try:
                trainer.loop(stop)
            except UserError as e:
                failed = e.code == 1  # a stop on a signal saved a checkpoint to resume from
                raise
        failed = False
        for line in rundir.summary(config.out_dir, trainer.progress, trainer.last_checkpoint, first_step,
                                   time.perf_counter() - started):
            log.print(line)
    finally:
        if trainer is not None:
            trainer.close()
        log.close(failed)
        if lock is not None:
            lock.release()


def new_model_args(config):
    return {**{name: getattr(config, name) for name in ARCHITECTURE}, "vocab_size": GPTConfig.vocab_size}


# -----------------------------------------------------------------------------
# Entry point


def start(argv):
    """The config, and what --init_from names loaded: (config, changes, model, checkpoint)."""
    flags, explicit = parse_args(argv)
    if flags.export_hf or flags.init_from == "scratch":
        return with_absolute_paths(flags), [], None, None
    model, checkpoint = load_start(flags.init_from, flags.out_dir)
    model_args = dataclasses.asdict(model.config)
    check_architecture(explicit, flags, model_args)
    if checkpoint is None:  # GPT-2 weights: a new run, with the weights' architecture
        config = dataclasses.replace(flags, **{name: model_args[name] for name in ARCHITECTURE})
        return with_absolute_paths(config), [], model, None
    config, changes = run_config(flags, explicit, checkpoint)
    return config, changes, model, checkpoint


def main(argv=None):
    dist_info, code = None, 0
    try:
        config, changes, model, checkpoint = start(argv)
        config.validate()
        dist_info = setup_distributed(config.device, config.ddp_timeout,
                                      config.fsdp and not config.export_hf, config.backend)
        if config.export_hf:
            export(config, dist_info)
        elif config.eval_only:
            evaluate_only(config, dist_info, model, checkpoint)
        else:
            train(config, changes, dist_info, model, checkpoint)
    except UserError as e:
        code, message = e.code, f"error: {e}" if e.code == 1 else str(e)
        if code == 1 and dist_info is not None and not dist_info.is_master:  # a rank's own data can fail it
            print(f"rank {dist_info.rank}: {message}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        code, message = 130, "error: interrupted: stopped at once; the checkpoints on disk are intact"
    except Exception as e:
        if dist_info is None or dist_info.world_size == 1 or not lost_contact(e):
            raise
        # a peer is gone: tearing the group down could wait on it, so leave without
        print(f"error: rank {dist_info.rank} lost contact with the other processes "
              f"({str(e).splitlines()[0]}): see their output; continue with --init_from resume",
              file=sys.stderr, flush=True)
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
