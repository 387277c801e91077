"""
Pre-train GPT-2 from scratch: the model, the sharded token loader, the LR schedule and the training loop.

    python train_gpt2.py                                    # one GPU (or the CPU), FineWeb-Edu shards
    python train_gpt2.py --data input.txt --device cpu ...  # a text file, tokenized on the fly
    torchrun --standalone --nproc_per_node 8 train_gpt2.py  # DDP on one node
    python train_gpt2.py --eval_only True --init_from out/best_val_loss.pt

Every flag is a field of TrainConfig below; `python train_gpt2.py --help` lists them with their defaults.
Importing this file only defines things: `from train_gpt2 import GPT, GPTConfig`.
"""

import contextlib
import dataclasses
import json
import math
import os
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
import torch.nn.functional as F

from fineweb import ShardError, atomic_write, build_parser, flag, get_tokenizer, open_shard

# -----------------------------------------------------------------------------
# Configuration: one dataclass, whose fields are the command-line flags


class UserError(ValueError):
    """Bad input from the user: main() prints the message (which names the fix) and exits non-zero."""


@dataclass
class TrainConfig:
    # data and files
    data: str = flag("edu_fineweb10B", "directory of token shards (made by fineweb.py), or a text file such as "
                                       "input.txt, tokenized on the fly and split 90/10 into train/val")
    out_dir: str = flag("./out", "where checkpoints, config.json and metrics.jsonl are written")
    init_from: str = flag("scratch", "'scratch', 'resume' (the latest checkpoint in out_dir) or a checkpoint path")
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
    log_interval: int = flag(10, "print and record training figures every this many steps")
    # system
    device: str = flag("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'")
    dtype: str = flag("auto", "'auto' (bfloat16 on GPUs that have it, else float16 with a GradScaler; "
                              "float32 on the CPU), 'bfloat16', 'float16' or 'float32'")
    compile: bool = flag(True, "torch.compile the model")
    gradient_checkpointing: bool = flag(False, "recompute each block's activations in the backward pass")
    seed: int = flag(1337, "seeds the initialization, the shard order and the samples")

    def validate(self):
        """Raise UserError naming the problem and the fix; called before any work is done."""
        positive = ["block_size", "n_layer", "n_head", "n_embd", "batch_size", "gradient_accumulation_steps",
                    "eval_interval", "eval_iters", "log_interval", "lr_decay_iters"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        for name in ["max_iters", "warmup_iters"]:
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


def parse_args(argv=None):
    """The config, and the names of the flags given explicitly on the command line."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(TrainConfig, __doc__.strip().splitlines()[0]).parse_args(argv)
    explicit = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    return TrainConfig(**vars(args)), explicit


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
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
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
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
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

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than the block size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
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
        """Append max_new_tokens sampled tokens to idx (B, T). Ids at or past vocab_limit (the padding of
        the vocabulary) are never sampled."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :vocab_limit].float() / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


# -----------------------------------------------------------------------------
# Data: shards read through memmaps, each rank reading its own part of every global batch


def load_token_sources(data, split):
    """[(name, tokens)] for one split: the shards of a directory, or 90/10 of a text file."""
    path = Path(data)
    if path.is_file():
        tokens = get_tokenizer().encode_ordinary(path.read_text(encoding="utf-8", errors="replace"))
        tokens = np.array(tokens, dtype=np.uint16)
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


class DataLoader:
    """Global batches of consecutive tokens: each optimizer step takes the next
    rows_per_step * block_size + 1 tokens of the current shard, so the batches depend only on the data,
    the seed and the global batch shape. Row block (micro_step * world_size + rank) of each global batch is
    this rank's micro-batch for that micro-step. Shards are visited in a shuffled order, new every epoch."""

    def __init__(self, sources, batch_size, block_size, micro_steps, rank=0, world_size=1, seed=0):
        self.names = [name for name, _ in sources]
        self.shards = [tokens for _, tokens in sources]
        self.B, self.T, self.micro_steps = batch_size, block_size, micro_steps
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.rows_per_step = batch_size * micro_steps * world_size
        self.tokens_per_step = self.rows_per_step * block_size
        if not any(len(s) > self.tokens_per_step for s in self.shards):
            raise UserError(f"the train data ({max(map(len, self.shards))} tokens in the largest shard) is shorter "
                            f"than one global batch ({self.rows_per_step} rows x {block_size} tokens + 1): "
                            f"lower --batch_size, --gradient_accumulation_steps or --block_size")
        self.epoch, self.shard, self.position = 0, 0, 0
        self.order = self.shard_order(0)
        self.skip_short_shards()

    def shard_order(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def skip_short_shards(self):
        while self.position + self.tokens_per_step + 1 > len(self.shards[self.order[self.shard]]):
            self.shard, self.position = self.shard + 1, 0
            if self.shard == len(self.shards):
                self.epoch, self.shard = self.epoch + 1, 0
                self.order = self.shard_order(self.epoch)

    def next_batch(self):
        """This rank's inputs and targets for one optimizer step, each (micro_steps, B, T) int64."""
        tokens = self.shards[self.order[self.shard]]
        rows = self.B * self.T
        xs, ys = [], []
        for micro_step in range(self.micro_steps):
            start = self.position + (micro_step * self.world_size + self.rank) * rows
            chunk = torch.from_numpy(np.array(tokens[start:start + rows + 1], dtype=np.int64))
            xs.append(chunk[:-1].view(self.B, self.T))
            ys.append(chunk[1:].view(self.B, self.T))
        self.position += self.tokens_per_step
        self.skip_short_shards()
        return torch.stack(xs), torch.stack(ys)

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "position": self.position, "seed": self.seed,
                "shards": [[name, len(tokens)] for name, tokens in zip(self.names, self.shards)]}

    def load_state_dict(self, state):
        shards = [[name, len(tokens)] for name, tokens in zip(self.names, self.shards)]
        if [list(s) for s in state["shards"]] != shards:
            raise UserError("the train data differs from the checkpoint's (shard names or sizes changed): "
                            "resume with the same --data")
        self.seed, self.epoch, self.shard, self.position = state["seed"], state["epoch"], state["shard"], state["position"]
        self.order = self.shard_order(self.epoch)
        self.skip_short_shards()


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
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 8  # float32 FMA lanes x 2 x 2 units
        return torch.get_num_threads() * 2.5e9 * per_cycle
    return None


# -----------------------------------------------------------------------------
# Distributed set-up: one process is world_size 1, not a separate code path


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_master(self):
        return self.rank == 0


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use --device cpu")
    if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available here; use --device cpu")
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return device


def setup_distributed(device):
    """Join the process group when launched by torchrun (NCCL on CUDA, Gloo on the CPU)."""
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
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Distributed(rank, local_rank, world_size, device)


def all_reduce_mean(tensor, world_size):
    """Mean over ranks. Gloo has no AVG reduction, so sum and divide."""
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size
    return tensor


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
    return "float32" if dtype == "auto" else dtype


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


def latest_checkpoint(out_dir):
    """The iter-*.pt checkpoint in out_dir with the most steps behind it."""
    def iter_of(p):
        try:
            return int(p.name.split("-")[1])
        except (IndexError, ValueError):
            return -1
    candidates = [p for p in Path(out_dir).glob("iter-*.pt") if iter_of(p) >= 0]
    if not candidates:
        raise UserError(f"--init_from resume: no iter-*.pt checkpoint in {out_dir}; "
                        f"start with --init_from scratch or pass a checkpoint path")
    return max(candidates, key=iter_of)


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
        torch.cuda.set_rng_state_all(state["cuda"])


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -----------------------------------------------------------------------------
# Training: evaluation, sampling, one optimizer step, and the loop

SAMPLE_PROMPT = "Hello, I'm a language model,"


@torch.no_grad()
def evaluate(model, val_sources, positions, batch_size, block_size, device, autocast, rank=0, world_size=1):
    """Mean loss over the fixed val batches; rank r takes batches r, r + world_size, ..."""
    model.eval()
    loss_sum = torch.zeros(2, device=device)  # (sum of batch losses, batch count)
    for source, start in positions[rank::world_size]:
        tokens = val_sources[source][1]
        chunk = torch.from_numpy(np.array(tokens[start:start + batch_size * block_size + 1], dtype=np.int64))
        x = chunk[:-1].view(batch_size, block_size).to(device)
        y = chunk[1:].view(batch_size, block_size).to(device)
        with autocast:
            _, loss = model(x, y)
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


def train_step(model, optimizer, scaler, x, y, grad_clip, autocast, ddp):
    """One optimizer step over x, y of shape (micro_steps, B, T). Returns the mean loss and the gradient
    norm as device tensors, so nothing waits for the device unless the caller reads them."""
    micro_steps = x.size(0)
    loss_sum = torch.zeros((), device=x.device)
    for micro_step in range(micro_steps):
        if ddp:
            # sync gradients on the last micro-step only; set before the forward pass, where DDP reads it
            model.require_backward_grad_sync = micro_step == micro_steps - 1
        with autocast:
            _, loss = model(x[micro_step], y[micro_step])
        loss = loss / micro_steps
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


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
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")


def prepare_out_dir(out_dir, init_from, eval_only):
    """Create out_dir and prove it writable; refuse to start a new run over an old one's checkpoints."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"--out_dir {out_dir} cannot be written ({e.strerror}): pick a writable directory") from None
    if init_from == "scratch" and not eval_only and any(path.glob("iter-*.pt")):
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


def run(config, explicit, dist_info):
    log = RunLog(config.out_dir, dist_info.is_master)
    device = dist_info.device
    device_type = device.split(":")[0]
    dtype = resolve_dtype(config.dtype, device)
    prepare_out_dir(config.out_dir, config.init_from, config.eval_only)

    # everything the user gave is checked here, before a model is built or a step taken
    checkpoint_path = None
    if config.init_from == "resume":
        checkpoint_path = latest_checkpoint(config.out_dir)
    elif config.init_from != "scratch":
        checkpoint_path = config.init_from
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path else None
    model_args = model_args_for(config, checkpoint, explicit)
    block_size = model_args["block_size"]
    val_sources = load_token_sources(config.data, "val")
    positions = val_batch_positions(val_sources, config.batch_size, block_size, config.eval_iters)
    loader = None
    if not config.eval_only:
        loader = DataLoader(load_token_sources(config.data, "train"), config.batch_size, block_size,
                            config.gradient_accumulation_steps, dist_info.rank, dist_info.world_size, config.seed)

    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = (torch.autocast(device_type=device_type, dtype=ptdtype) if dtype != "float32"
                else contextlib.nullcontext())
    raw_model = build_model(model_args, checkpoint, config.seed).to(device)
    raw_model.gradient_checkpointing = config.gradient_checkpointing
    model = torch.compile(raw_model) if config.compile else raw_model
    iter_num = checkpoint["iter_num"] if checkpoint else 0

    if config.eval_only:
        val_loss = evaluate(model, val_sources, positions, config.batch_size, block_size, device, autocast,
                            dist_info.rank, dist_info.world_size)
        log.print(f"{checkpoint_path}: step {iter_num} val loss {val_loss:.4f} over {len(positions)} batches")
        log.record(step=iter_num, val_loss=val_loss, eval_only=True, checkpoint=str(checkpoint_path))
        return

    optimizer = raw_model.configure_optimizer(config.weight_decay, config.learning_rate, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    best_val_loss = float("inf")
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        loader.load_state_dict(checkpoint["loader"])
        set_rng_state(checkpoint["rng"])
        best_val_loss = checkpoint["best_val_loss"]
        del checkpoint  # the model and optimizer hold their own copies now
    ddp = dist_info.world_size > 1
    train_model = (nn.parallel.DistributedDataParallel(model, device_ids=[dist_info.local_rank] if device_type == "cuda"
                                                       else None) if ddp else model)

    tokens_per_step = loader.tokens_per_step
    model_flops = flops_per_token(raw_model.num_params(), model_args["n_layer"], model_args["n_embd"], block_size)
    peak_flops = device_peak_flops(device, dtype)
    if dist_info.is_master:
        atomic_write(Path(config.out_dir) / "config.json",
                     lambda f: f.write(json.dumps(dataclasses.asdict(config), indent=2).encode()))
    log.print(f"GPT-2 {raw_model.num_params(non_embedding=False) / 1e6:.2f}M parameters | {dist_info.world_size} "
              f"process(es) on {device} | {dtype} | {tokens_per_step:,} tokens/step | torch {torch.__version__} "
              f"| commit {git_commit()} | from step {iter_num}")

    from tqdm import tqdm
    progress = tqdm(total=config.max_iters, initial=iter_num, desc="train", unit="step", dynamic_ncols=True,
                    disable=not dist_info.is_master)
    resumed_at = iter_num if config.init_from != "scratch" else None
    interval_start, interval_steps = time.perf_counter(), 0
    for step in range(iter_num, config.max_iters + 1):
        last_step = step == config.max_iters
        if (step % config.eval_interval == 0 or last_step) and step != resumed_at:
            val_loss = evaluate(model, val_sources, positions, config.batch_size, block_size, device, autocast,
                                dist_info.rank, dist_info.world_size)
            log.print(f"step {step}: val loss {val_loss:.4f}")
            log.record(step=step, val_loss=val_loss, tokens=step * tokens_per_step)
            if dist_info.is_master:
                for text in sample_text(raw_model, device, autocast, config.seed + step):
                    log.print(f"  sample: {text!r}")
                if step > 0:
                    checkpoint = {
                        "version": CHECKPOINT_VERSION, "model": raw_model.state_dict(), "model_args": model_args,
                        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter_num": step,
                        "best_val_loss": min(best_val_loss, val_loss), "val_loss": val_loss,
                        "loader": loader.state_dict(), "rng": rng_state(), "config": dataclasses.asdict(config),
                        "torch_version": torch.__version__, "git_commit": git_commit(),
                    }
                    path = Path(config.out_dir) / f"iter-{step}-loss-{val_loss:.4f}.pt"
                    save_checkpoint(path, checkpoint)
                    if val_loss < best_val_loss:
                        link_or_copy(path, Path(config.out_dir) / "best_val_loss.pt")
                    log.print(f"saved {path}")
            best_val_loss = min(best_val_loss, val_loss)
            interval_start, interval_steps = time.perf_counter(), 0  # evaluation is not training time
        if last_step:
            break

        lr = get_lr(step, config.learning_rate, config.min_lr, config.warmup_iters, config.lr_decay_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        loss, grad_norm = train_step(train_model, optimizer, scaler, x, y, config.grad_clip, autocast, ddp)
        interval_steps += 1
        progress.update(1)

        if step % config.log_interval == 0 or step == config.max_iters - 1:
            loss = all_reduce_mean(loss, dist_info.world_size).item()  # .item() waits for the device
            elapsed = time.perf_counter() - interval_start
            ms_per_step = 1000 * elapsed / interval_steps
            tokens_per_sec = tokens_per_step * interval_steps / elapsed
            mfu = estimate_mfu(model_flops, tokens_per_sec, peak_flops)
            mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
            log.print(f"step {step:6d} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm.item():.3f} | "
                      f"{ms_per_step:.1f} ms | {tokens_per_sec:,.0f} tok/s | mfu {mfu_text}")
            log.record(step=step, train_loss=loss, lr=lr, grad_norm=grad_norm.item(), ms_per_step=ms_per_step,
                       tokens_per_sec=tokens_per_sec, mfu=mfu, tokens=(step + 1) * tokens_per_step)
            interval_start, interval_steps = time.perf_counter(), 0
    progress.close()


# -----------------------------------------------------------------------------
# Entry point


def main(argv=None):
    dist_info = None
    try:
        config, explicit = parse_args(argv)
        config.validate()
        dist_info = setup_distributed(config.device)
        run(config, explicit, dist_info)
    except (UserError, ShardError) as e:
        if dist_info is None or dist_info.is_master:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
