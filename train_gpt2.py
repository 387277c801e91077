"""
Pre-train GPT-2: the model, the sharded token loader, the cosine LR schedule, the DDP/FSDP loop.

    python train_gpt2.py                                    # one GPU (or the CPU), FineWeb-Edu
    python train_gpt2.py --config config/shakespeare_cpu.toml  # flags from a file
    torchrun --standalone --nproc_per_node 8 train_gpt2.py  # DDP on one node (--fsdp True: FSDP)
    python train_gpt2.py --init_from resume                 # continue the run in --out_dir
    python train_gpt2.py --eval_only True --init_from out/best_val_loss.pt

Every flag is a field of TrainConfig (`--help` lists them). The file reads top to bottom: the
model (GPT-2, and the speedruns' changes as options, each off by default), the data, the schedule,
the optimizers' state for the model, the Trainer (its train_step is one optimizer step, its loop
the run) and main(), which runs export (--export_hf), evaluate_only (--eval_only) or train on every
rank. The rest, the optimizers (optimizers.py) and the model's placement on the ranks (device.py)
among it, lives in files named for it (docs/code.md). Importing this file only defines things:
`from train_gpt2 import GPT, GPTConfig`.
"""

import dataclasses
import math
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import rundir
from checkpoint import (FullModelState, OptimizerStates, Progress, RNGState, RunCheckpoints,
                        build_checkpoint_model, checkpoint_name, checkpoint_path, damaged_weights,
                        git_commit, load_checkpoint, make_checkpoint, restore, unsound_tensor)
from cli import StopSignal, UserError, flag
from cross_entropy_kernel import OutputLayerLoss
from device import (Prefetcher, check_model_fits, device_peak_flops,
                    make_autocast, place_model,
                    resolve_dtype, run_on_ranks, set_gradient_sync, wrap_model)
from evaluation import Evaluation, bits_per_byte, evaluate_only
from fineweb import (check_unchanged, check_vocab_size, checkpoint_tokenizer, describe_tokenizer,
                     fingerprint, load_token_sources, load_tokenizer, read_span,
                     sampled_fingerprint)
from guards import RESUMABLE_EXIT, SpikeGuard, StepProfiler, TimeBudget, choose_micro_batch
from hf_convert import export_model, is_hf_model, load_gpt2_weights, model_tokenizer
from optimizers import (AdafactorFlags, MuonFlags, check_optimizer, make_optimizers,
                        optimizer_state_bytes, stepped_on_meta, unused_flag_warnings)
from rundir import Plotter, RunLog, describe_target, pause_clock, target_notes, target_reached
from sampling import generate_tokens
from settings import (TrainSettings, check_architecture, parse_config, parse_duration,
                      parse_step_range, resume_warnings, run_config, same_path, with_absolute_paths)

# -----------------------------------------------------------------------------
# The model: GPT-2 as in the paper and OpenAI's code, and the speedruns' changes to it as options

POSITIONS, NORMS, MLPS = ("learned", "rotary"), ("layernorm", "rmsnorm"), ("gelu", "relu2", "swiglu")
ROLES = ("tables", "head", "matrices", "gains_and_biases")  # of the parameters, GPT.param_groups
GPT2_SHAPE = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")  # the rest are options


# The most each dimension of GPTConfig may be, checked before anything is built. Even on the meta
# device a block takes milliseconds to build, so a count of blocks in the millions would run for
# hours before the memory check could size the model (the deepest language models trained have
# about a hundred); no machine holds a model wider, or of a larger vocabulary or context, than
# MAX_DIMENSION, and below it no tensor's size overflows.
MAX_LAYERS = 1024
MAX_DIMENSION = 2**24


@dataclass
class GPTConfig:
    """The model's shape, named here alone: each field is also a flag of train_gpt2.py and a key of
    a checkpoint's model_args, and a checkpoint from before a field existed loads at its default.
    The defaults are GPT-2; the fields after n_embd are the speedruns' changes (BENCHMARKS.md), each
    read by the module it concerns."""
    block_size: int = flag(1024, "context length in tokens")
    vocab_size: int = flag(50304, "vocabulary size: unless given, the tokenizer's padded to a "
                                  "multiple of 64 (faster matmuls): GPT-2's 50,257 to 50,304")
    n_layer: int = flag(12, "transformer blocks")
    n_head: int = flag(12, "attention heads per block")
    n_embd: int = flag(768, "width of the residual stream")
    positions: str = flag("learned", "'learned' (GPT-2's position table) or 'rotary' (queries and "
                                     "keys rotated by their position, no table)")
    norm: str = flag("layernorm", "'layernorm' (GPT-2's, with gains) or 'rmsnorm' (without gains)")
    bias: bool = flag(True, "biases in the linear layers and LayerNorms (GPT-2's)")
    mlp: str = flag("gelu", "the MLP: 'gelu' (GPT-2's, tanh approximation), 'relu2' (ReLU squared) "
                            "or 'swiglu' (gated, hidden width 8/3 n_embd: the same parameters)")
    qk_norm: bool = flag(False, "RMS-normalize each head's queries and keys before attention")
    attn_scale: float = flag(0.0, "the attention logits' scale (0: 1/sqrt(head size), GPT-2's)")
    tie_embeddings: bool = flag(True, "the output layer is the token embedding (GPT-2's); False: a "
                                      "head of its own, initialized at zero")
    logit_softcap: float = flag(0.0, "logits soft-capped to (-c, c) as c * tanh(logits / c), in "
                                     "training as in evaluation and sampling (0: off)")
    zero_init_projections: bool = flag(False, "initialize the blocks' output projections at zero "
                                              "(GPT-2: normal, scaled down with depth)")

    def __post_init__(self):
        """A shape the model can be built in, else a one-line error: every dimension sized before
        anything is built."""
        for field in dataclasses.fields(GPTConfig):
            value = getattr(self, field.name)
            if field.type is int and not (type(value) is int and value >= 1):
                raise UserError(f"--{field.name} must be a positive integer, got {value!r}")
            most = MAX_LAYERS if field.name == "n_layer" else MAX_DIMENSION
            if field.type is int and value > most:
                raise UserError(f"--{field.name} {value:,} is more than {most:,}, the most this "
                                "model is built with: pass a smaller one")
            if field.type is bool and type(value) is not bool:
                raise UserError(f"--{field.name} must be True or False, got {value!r}")
            if field.type is float and not (type(value) in (int, float) and 0 <= value < math.inf):
                raise UserError(f"--{field.name} must be 0 or a positive number, got {value!r}")
        for name, choices in (("positions", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in choices:
                raise UserError(f"--{name} {getattr(self, name)!r} is not one of {', '.join(choices)}")
        if self.n_embd % self.n_head != 0:
            raise UserError(f"--n_embd {self.n_embd} is not divisible by --n_head {self.n_head}: "
                            "pick sizes where n_embd = n_head * head size")
        if self.positions == "rotary" and (self.n_embd // self.n_head) % 2:
            raise UserError(f"--positions rotary turns pairs of channels: the head size "
                            f"{self.n_embd // self.n_head} must be even")

    def options(self):
        """The fields past GPT-2's own shape that are off their defaults, {name: value}."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in GPT2_SHAPE and getattr(self, f.name) != f.default}


def make_norm(config):
    """The blocks' and the final norm: GPT-2's LayerNorm (gains, and biases with --bias), or RMSNorm
    without gains (nothing to train)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, elementwise_affine=False)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def rotate(x, base=10000.0):
    """Rotary positions (RoFormer): channels i and i + hs/2 of each (B, nh, T, hs) query or key
    turned by the angle position * base^(-2i/hs), so that q.k depends on the distance alone."""
    T, half = x.size(-2), x.size(-1) // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = torch.outer(torch.arange(T, dtype=torch.float32, device=x.device), freqs)  # (T, hs/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True  # scaled at init, see GPT._init_weights
        self.qk_norm, self.rotary = config.qk_norm, config.positions == "rotary"
        self.scale = config.attn_scale or None  # None: SDPA's 1/sqrt(hs)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if self.rotary:
            q, k = rotate(q), rotate(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    """The block's feed-forward layer: GELU (GPT-2's tanh approximation) or ReLU squared over a
    4 * n_embd hidden layer, or SwiGLU, whose gate is a third matrix (hidden 8/3 n_embd)."""

    def __init__(self, config):
        super().__init__()
        self.kind, C = config.mlp, config.n_embd
        hidden = 8 * C // 3 if self.kind == "swiglu" else 4 * C
        self.c_fc = nn.Linear(C, hidden, bias=config.bias)
        if self.kind == "swiglu":
            self.c_gate = nn.Linear(C, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, C, bias=config.bias)
        self.c_proj.residual_projection = True

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.silu(self.c_gate(x)) * h
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def softcap(logits, cap):
    """cap * tanh(logits / cap), in float32: logits held within (-cap, cap); cap 0 leaves them."""
    return cap * torch.tanh(logits.float() / cap) if cap else logits


class OutputHead(nn.Linear):
    """The one way from the last hidden state to the logits: x @ weight.T (+ a bias, if one is
    added), soft-capped by --logit_softcap. forward gives the logits (the samples, HellaSwag, the
    plain loss); loss the training and val loss of those same logits, chunk by chunk, never holding
    all of them (cross_entropy_kernel.py; chunked_loss keeps its CPU buffer)."""

    def __init__(self, config):
        super().__init__(config.n_embd, config.vocab_size, bias=False)
        self.cap = config.logit_softcap
        self.chunked_loss = OutputLayerLoss()

    def forward(self, x):
        return softcap(super().forward(x), self.cap)

    def loss(self, x, targets):
        return self.chunked_loss(x, self.weight, targets, self.bias, self.cap)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.positions == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules["h"] = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        modules["ln_f"] = make_norm(config)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = OutputHead(config)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std *= (2 * self.config.n_layer) ** -0.5  # two residual additions per block
                std = 0.0 if self.config.zero_init_projections else std
            if module is self.lm_head and not self.config.tie_embeddings:
                std = 0.0  # an untied head starts at zero, as the speedruns' does
            if std:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            else:
                nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, return_logits=True, positions=None):
        """(logits, loss). return_logits=False: the training loss, chunk by chunk, never holding
        the (B, T, vocab_size) logits (None in their place). positions: a (K,) index into the B * T
        positions; the (K, vocab_size) logits there alone, no loss (HellaSwag's endings)."""
        B, T = idx.size()
        if positions is not None and targets is not None:
            raise ValueError("positions gives logits without a loss: pass targets or positions")
        if T > self.config.block_size:
            raise ValueError(f"{T} tokens are longer than the block size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:  # rotary positions are attention's
            x = x + self.transformer.wpe(torch.arange(T, dtype=torch.long, device=idx.device))
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None and not return_logits:
            return None, self.lm_head.loss(x.view(B * T, -1), targets.view(-1))
        if positions is not None:
            return self.lm_head(x.view(B * T, -1)[positions]), None
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def architecture(self):
        """What the model is called: GPT-2, or GPT and the options it has off GPT-2's."""
        options = self.config.options()
        return f"GPT ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else "GPT-2"

    def num_params(self, non_embedding=True):
        """Parameters, counted once despite the tying. non_embedding: without the tables that are
        only looked up (the positions), which cost no FLOPs; the token table is also the output
        layer."""
        looked_up = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        multiplied = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        skipped = looked_up - multiplied if non_embedding else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skipped)

    def flops_per_token(self):
        """Training FLOPs per token (forward and backward): 6 per parameter in a matmul, plus
        attention's QK^T and AV products over the whole context (PaLM paper, appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def param_groups(self):
        """The trainable parameters by role, for the optimizer to give each role its own learning
        rate and decay; each role named by the module that owns the parameter (role_of), each
        parameter in one role. Roles without parameters are left out."""
        groups, seen = {role: [] for role in ROLES}, set()
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad and id(p) not in seen:  # a tied weight under its first owner
                    seen.add(id(p))
                    groups[self.role_of(module, p)].append(p)
        return {role: params for role, params in groups.items() if params}

    def role_of(self, module, p):
        """A parameter's role, by its owner: the embedding tables (the token embedding, also the
        output layer when tied, and the positions), the untied output head, the matrices of the
        blocks' linear layers, and every gain and bias (1-D)."""
        if p.dim() < 2:
            return "gains_and_biases"
        if isinstance(module, nn.Embedding):
            return "tables"
        if module is self.lm_head:
            return "head"
        if isinstance(module, nn.Linear):
            return "matrices"
        raise ValueError(f"a {tuple(p.shape)} parameter of a {type(module).__name__} has no role: "
                         "say which in GPT.role_of")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_limit=None,
                 generator=None):
        """idx (B, T) and max_new_tokens sampled after it, never an id past vocab_limit."""
        new = generate_tokens(lambda context: self(context)[0], idx, max_new_tokens,
                              self.config.block_size, temperature, top_k, vocab_limit, generator)
        return torch.cat([idx, *new], dim=1)

    @classmethod
    def from_pretrained(cls, name_or_path):
        """GPT-2 weights from transformers: OpenAI's (gpt2, gpt2-medium, gpt2-large, gpt2-xl, from
        the Hugging Face hub or its cache) or a folder written by save_pretrained."""
        model_args, state = load_gpt2_weights(name_or_path)
        model = cls(GPTConfig(**model_args))
        model.load_state_dict(state)
        return model


# -----------------------------------------------------------------------------
# The data: shards read through memmaps, each rank reading its own part of every global batch


class ShardLoader:
    """Global batches of rows_per_step rows of block_size tokens, targets one token on. Each epoch
    visits the shards in a seeded order and reads a shard one of two ways:
    - shuffle: windows of block_size + 1 tokens starting every block_size tokens, rows_per_step of
      them a step in a seeded permutation new for every shard and epoch (every window once an
      epoch, but the last few that do not fill a step);
    - sequential (build-nanogpt's): the next rows_per_step * block_size + 1 consecutive tokens.
    `position` counts the tokens of the current shard used this epoch; a shard with less than a
    global batch left waits for the next epoch. Rows (micro_step * world_size + rank) of a global
    batch are this rank's micro-batch, so the batches depend on the data, seed, mode and global
    batch shape alone, not on how ranks and micro-steps split it. n_vocab: the tokenizer's ids, which
    every token read is checked to be among."""

    def __init__(self, sources, batch_size, block_size, micro_steps, rank=0, world_size=1, seed=0,
                 shuffle=True, *, n_vocab):
        self.n_vocab = n_vocab
        self.names = [name for name, _ in sources]
        self.shards = [tokens for _, tokens in sources]
        self.B, self.T, self.micro_steps = batch_size, block_size, micro_steps
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.rows_per_step = batch_size * micro_steps * world_size
        self.tokens_per_step = self.rows_per_step * block_size
        if not any(len(s) > self.tokens_per_step for s in self.shards):
            raise UserError(f"the train data ({max(map(len, self.shards))} tokens in the largest "
                            f"shard) is shorter than one global batch ({self.rows_per_step} rows x "
                            f"{block_size} tokens + 1): lower --batch_size, "
                            "--gradient_accumulation_steps or --block_size")
        self.windows, self.windows_of = None, None
        # each shard's fingerprint, taken when the run first reads it; checked when a process first
        # reads it again (a resumed run), so that data changed in place is not trained on silently
        self.fingerprints, self.verified = [None] * len(self.shards), set()
        self.epoch, self.shard, self.position = 0, 0, 0
        self.order = self.shard_order(0)
        self.skip_short_shards()

    def shard_order(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def skip_short_shards(self):
        """Move on, shard by shard and epoch by epoch, to the first place with a whole global batch
        left (with shuffle the same test in windows: position // T + rows <= (len - 1) // T)."""
        while self.position + self.tokens_per_step + 1 > len(self.shards[self.order[self.shard]]):
            self.shard, self.position = self.shard + 1, 0
            if self.shard == len(self.shards):
                self.epoch, self.shard = self.epoch + 1, 0
                self.order = self.shard_order(self.epoch)
            check_unchanged(self.shards[self.order[self.shard]])

    def shard_windows(self):
        """The start offsets of the current shard's windows in this epoch's order (once a shard): a
        permutation fixed by the seed, the epoch and the shard's index, different for each."""
        index = self.order[self.shard]
        if self.windows_of != (self.epoch, index):
            n_windows = (len(self.shards[index]) - 1) // self.T
            order = np.random.default_rng([self.seed, self.epoch, index]).permutation(n_windows)
            self.windows = order * self.T
            self.windows_of = (self.epoch, index)
        return self.windows

    def next_batch(self):
        """This rank's inputs and targets for one optimizer step, each (micro_steps, B, T) int64."""
        self.verify(self.order[self.shard])
        x, y = self.shuffled_batch() if self.shuffle else self.sequential_batch()
        self.position += self.tokens_per_step
        self.skip_short_shards()
        return x, y

    def shuffled_batch(self):
        index = self.order[self.shard]
        first = self.position // self.T
        starts = self.shard_windows()[first:first + self.rows_per_step]  # the global batch's
        mine = starts.reshape(self.micro_steps, self.world_size, self.B)[:, self.rank].flatten()
        name, tokens = self.names[index], self.shards[index]
        windows = [read_span(name, tokens, start, self.T + 1, self.n_vocab) for start in mine]
        windows = np.stack(windows).reshape(self.micro_steps, self.B, self.T + 1)
        # numpy copies the inputs and targets out: torch's copy of these strided views went through
        # its thread pool, a thousand times slower on a busy CPU (BENCHMARKS.md)
        return torch.from_numpy(windows[..., :-1].copy()), torch.from_numpy(windows[..., 1:].copy())

    def sequential_batch(self):
        index = self.order[self.shard]
        micro_batch_tokens = self.B * self.T
        xs, ys = [], []
        for micro_step in range(self.micro_steps):
            start = self.position + (micro_step * self.world_size + self.rank) * micro_batch_tokens
            span = read_span(self.names[index], self.shards[index], start, micro_batch_tokens + 1,
                             self.n_vocab)
            chunk = torch.from_numpy(span)
            xs.append(chunk[:-1].view(self.B, self.T))
            ys.append(chunk[1:].view(self.B, self.T))
        return torch.stack(xs), torch.stack(ys)

    def verify(self, index):
        """Shard index's fingerprint, at this process's first read of it: recorded, or compared with
        the one the run recorded before (a sampled one in checkpoints from before all was read)."""
        if index in self.verified:
            return
        tokens, saved = self.shards[index], self.fingerprints[index]
        now = fingerprint(tokens)
        if saved not in (None, now) and saved != sampled_fingerprint(tokens):
            raise UserError(f"the train data has the checkpoint's shard names and sizes but other "
                            f"contents ({self.names[index]} differs from when the run first read "
                            "it): restore the data the run trained on, or start a new run")
        self.fingerprints[index] = now
        self.verified.add(index)

    def shard_sizes(self):
        return [[name, len(tokens)] for name, tokens in zip(self.names, self.shards)]

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "position": self.position,
                "seed": self.seed, "shuffle": self.shuffle, "shards": self.shard_sizes(),
                "fingerprints": list(self.fingerprints)}

    def load_state_dict(self, state):
        """Continue where the state left off, reading the way its run read (in its seed's order,
        whatever this loader was built with). Fingerprints are None in checkpoints from before they
        were kept, and for shards not read yet; the others are checked as the shards are read."""
        if [list(s) for s in state["shards"]] != self.shard_sizes():
            raise UserError("the train data differs from the checkpoint's (shard names or sizes "
                            "changed): resume with the same --data")
        self.fingerprints = list(state["fingerprints"] or [None] * len(self.shards))
        self.verified = set()
        self.seed, self.epoch, self.shuffle = state["seed"], state["epoch"], state["shuffle"]
        self.shard, self.position = state["shard"], state["position"]
        self.order = self.shard_order(self.epoch)
        self.windows_of = None  # the window order read ahead was this loader's seed's
        self.skip_short_shards()


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


NON_FINITE, LOSS_SPIKE = 1, 2  # why a step is skipped: the larger wins when ranks disagree


def set_learning_rates(optimizers, step, config):
    """Each param group's lr at step: the schedule's value for --learning_rate, scaled by the
    group's own base_lr (by exactly 1.0 for a group at --learning_rate). Returns the schedule's."""
    c = config
    lr = get_lr(step, c.learning_rate, c.min_lr, c.warmup_iters, c.lr_decay_iters)
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group["lr"] = lr * (group["base_lr"] / config.learning_rate)
    return lr


def estimate_mfu(flops_per_token, tokens_per_sec, peak_flops):
    """Model FLOPs utilization: the fraction of the device's peak that the training step reaches."""
    return flops_per_token * tokens_per_sec / peak_flops if peak_flops else None


# -----------------------------------------------------------------------------
# The optimizers (optimizers.py: OPTIMIZERS, one function each, from the model's param_groups()) and
# the state they keep for a GPT, measured without memory


def optimizers_on_meta(model_config, config):
    """(model, {name: optimizer}): a GPT of model_config built on the meta device and the run's
    optimizers stepped once on it, holding the state they keep for it, of every shape and no bytes."""
    with torch.device("meta"):
        model = GPT(model_config)
    return model, stepped_on_meta(model, config)


def training_state_bytes(model_config, config):
    """The bytes a model's training state takes as this run keeps it: {"weights", "gradients",
    "optimizer"}, measured on the model built on the meta device after one step of the run's
    optimizers, so that any model and optimizer is sized as it really is."""
    model, optimizers = optimizers_on_meta(model_config, config)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"weights": weights, "gradients": weights,
            "optimizer": sum(optimizer_state_bytes(o) for o in optimizers.values())}


def expected_optimizer_states(model_config, config):
    """{name: state_dict()} of the run's optimizers after a step on a GPT of model_config (on the
    meta device): what a checkpoint's optimizer state must hold to resume this run."""
    return {name: o.state_dict() for name, o in optimizers_on_meta(model_config, config)[1].items()}


# -----------------------------------------------------------------------------
# Training: the Trainer holds a run's state, its train_step is one optimizer step, its loop the run


class Trainer:
    """What a run carries from step to step: the model (the GPT, sharded in place under FSDP) and
    `wrapped`, what its forward passes call (compiled, under DDP); the optimizer, the GradScaler,
    the batches and the counters (progress). Its checkpoint is those parts' state_dict()s (parts()),
    and the record of the tokenizer the model reads.
    """

    def __init__(self, config, dist_info, model, log, *, loader, evaluation, tokenizer,
                 checkpoint=None):
        self.config, self.dist_info, self.log = config, dist_info, log
        self.tokenizer = tokenizer
        self.device = dist_info.device
        self.dtype = resolve_dtype(config.dtype, self.device, dist_info.sharded)
        device_type = self.device.split(":")[0]
        self.model = place_model(model.train(), dist_info, self.dtype, config.loss_kernel)
        self.model.gradient_checkpointing = config.gradient_checkpointing
        # the weights among the model's state (its buffers may hold anything), checked before a save
        self.parameter_names = [name for name, _ in
                                self.model.named_parameters(remove_duplicate=False)]
        self.wrapped = wrap_model(self.model, config.compile, dist_info)
        # made after sharding: under FSDP their moments are shards too
        self.optimizers = make_optimizers(self.model, config, device_type)
        self.scaler = torch.amp.GradScaler(device_type, enabled=self.dtype == "float16")
        self.autocast = make_autocast(device_type, self.dtype)
        self.batches = Prefetcher(loader, self.device)
        self.evaluation, self.progress = evaluation, Progress()
        self.checkpoints = RunCheckpoints(config.out_dir, config.keep_last)
        self.spikes = SpikeGuard(config.spike_guard, config.spike_window)
        self.plotter = Plotter(log) if config.plot and dist_info.is_master else None
        # a checkpoint written after an evaluation is not evaluated again (a stopped run's is)
        self.evaluated_at_start = checkpoint is not None and checkpoint["val_loss"] is not None
        if checkpoint is not None:
            parts = self.parts()
            del parts["model"]  # the model was built with the checkpoint's weights
            if config.reset_optimizer:
                del parts["optimizer"]
                log.print(f"--reset_optimizer: {config.optimizer}'s state starts afresh (the "
                          f"checkpoint's was {' + '.join(checkpoint['optimizer'])})")
            if not same_path(checkpoint["config"]["data"], config.data):
                del parts["loader"], parts["val_data"]  # new data: its loader and fingerprints anew
            restore(checkpoint, parts)
            self.checkpoints.latest = checkpoint["path"]

    def parts(self):
        """The parts of a checkpoint, each with state_dict() and load_state_dict()."""
        sharded = self.dist_info.sharded
        return {"model": FullModelState(self.model, sharded),
                "optimizer": OptimizerStates(self.model, self.optimizers, sharded, lambda:
                                             expected_optimizer_states(self.model.config, self.config)),
                "scaler": self.scaler, "loader": self.batches, "rng": RNGState(),
                "progress": self.progress, "spike_guard": self.spikes, "val_data": self.evaluation}

    def try_micro_batch(self, size):
        """A forward and backward pass at micro-batch size, the gradients dropped (--auto_batch)."""
        if self.dist_info.world_size > 1:
            set_gradient_sync(self.wrapped, False)  # a rank out of memory leaves none waiting
        x = torch.zeros((size, self.model.config.block_size), dtype=torch.long, device=self.device)
        try:
            with self.autocast:
                _, loss = self.wrapped(x, x, return_logits=False)
            loss.backward()
        finally:  # out of memory half-way leaves gradients that the first step would add to
            self.model.zero_grad(set_to_none=True)

    def use_micro_batch(self, size, make_loader):
        """Read the same global batches in micro-batches of size, from where the loader is."""
        state, loader = self.batches.state_dict(), self.batches.loader
        sequences = loader.B * loader.micro_steps
        self.batches.close()
        self.batches = Prefetcher(make_loader(size, sequences // size), self.device)
        self.batches.load_state_dict(state)

    def train_step(self, step):
        """Optimizer step number `step`: its learning rate and batch, the forward and backward
        passes of its micro-steps, and one update, skipped if the loss or gradient norm is not
        finite (reading that one flag is the step's one wait for the device). Returns (lr, mean
        loss, gradient norm), as tensors."""
        c, d = self.config, self.dist_info
        lr = set_learning_rates(self.optimizers, step, c)
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
        for optimizer in self.optimizers.values():
            self.scaler.unscale_(optimizer)
        params = [p for optimizer in self.optimizers.values() for group in optimizer.param_groups
                  for p in group["params"]]  # in the optimizers' order
        grad_norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor of the ranks' partial norms
            grad_norm = grad_norm.full_tensor()
        # the step's one wait for the device
        finite_loss, finite_norm = torch.stack([torch.isfinite(loss_sum),
                                                torch.isfinite(grad_norm)]).tolist()
        # a GradScaler (float16) skips an overflow itself, every optimizer alike, and lowers its
        # scale
        overflow = self.scaler.is_enabled() and finite_loss and not finite_norm
        problem = None if finite_loss and (finite_norm or overflow) else NON_FINITE
        # the global batch's loss: one guard window on every rank and in checkpoints, for any ranks
        mean_loss = (d.sum(loss_sum.clone()) / d.world_size).item() if c.spike_guard else None
        if problem is None and c.spike_guard and self.spikes.is_spike(mean_loss):
            problem = LOSS_SPIKE
        problem = d.max(problem or 0) or None  # each rank's loss is its own: all skip, or none
        if problem is None and not overflow:
            for optimizer in self.optimizers.values():
                self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.progress.iter_num = step + 1
        self.progress.tokens += self.batches.tokens_per_step
        self.count_bad_steps(step, lr, problem, mean_loss)
        return lr, loss_sum, grad_norm

    def count_bad_steps(self, step, lr, problem, loss):
        """A skipped step is logged; max_bad_steps in a row stop the run or, when all were loss
        spikes, take its weights back to the checkpoint from before them (twice at most, if no step
        is applied in between). loss: the global batch's (None with the guard off)."""
        guard, latest = self.spikes, self.checkpoints.latest
        guard.record(loss if problem is None else None, applied=problem is None,
                     spike=problem == LOSS_SPIKE, latest=None if latest is None else str(latest))
        if problem is None:
            return
        self.progress.skipped_steps += 1
        what = "a loss spike" if problem == LOSS_SPIKE else "non-finite loss or gradient norm"
        self.log.print(f"step {step}: {what}, update skipped ({guard.bad_steps} in a row)")
        self.log.record(step=step, skipped=True, lr=lr, loss_spike=problem == LOSS_SPIKE)
        if guard.bad_steps < self.config.max_bad_steps:
            return
        spikes = guard.in_a_row == guard.bad_steps
        if spikes and guard.back_to is not None and guard.roll_backs < 2:
            return self.roll_back(step, guard.back_to)
        what = "loss spikes" if spikes else "a non-finite loss or gradient norm"
        good = None
        if spikes and guard.back_to is None:  # before any checkpoint; no update reached the weights
            self.save(step + 1)
            good = self.checkpoints.latest
        raise self.diverged(f"stopped at step {step}: {guard.bad_steps} steps in a row had {what}",
                            good)

    def diverged(self, why, good=None):
        """The stop of a run that cannot go on, naming the checkpoint to go back to: good, or the
        one from before its bad steps if it is in some (one written since they began may hold what
        made them), else the latest, whose weights were sound (save writes no other)."""
        guard = self.spikes
        good = good or (guard.back_to if guard.bad_steps else self.checkpoints.latest)
        fix = (f"the last good checkpoint is {good}: continue from it" if good else
               "no checkpoint was written before it: start again")
        return UserError(f"{why}; {fix} with a lower --learning_rate")

    def roll_back(self, step, path):
        """After max_bad_steps loss spikes in a row: the weights, optimizer state and RNG of the
        checkpoint from before them, while the step count and the batches go on from here, so the
        batches since the checkpoint (those that caused the spikes among them) are not in the
        weights. The guard keeps its losses from before the spikes, so that the rest of a bad
        region is still skipped."""
        parts = self.parts()
        checkpoint = load_checkpoint(path)
        restore(checkpoint, {name: parts[name] for name in ("model", "optimizer", "scaler", "rng")})
        self.spikes.rolled_back()
        back_to = checkpoint["progress"]["iter_num"]
        self.log.print(f"step {step}: {self.config.max_bad_steps} loss spikes in a row: the "
                       f"weights go back to {path} (step {back_to}); the batches of steps "
                       f"{back_to} to {step} are skipped")
        self.log.record(step=step, rolled_back_to=back_to, skipped_batches=step + 1 - back_to)

    def save(self, step, val_loss=None):
        """Rank 0 writes the checkpoint of `step` (and the best copy, if val_loss is the best), then
        every rank learns whether that worked: a failed write stops the run on all of them. Weights
        that diverged (a val loss, weight or moment not finite) are never written, where --keep_last
        would count them and a resume pick them: the run stops, naming the last good checkpoint."""
        if val_loss is not None and not math.isfinite(val_loss):
            raise self.diverged(f"stopped at step {step}: its evaluation's val loss is {val_loss}: "
                                "the weights have diverged, and are not saved")
        if val_loss is not None and val_loss < self.progress.best_val_loss:
            self.progress.best_val_loss, self.progress.best_step = val_loss, step
            self.checkpoints.best_pending = True
        micro_batch = [self.batches.loader.B, self.batches.loader.micro_steps]
        checkpoint = make_checkpoint(self.parts(), model_args=dataclasses.asdict(self.model.config),
                                     config=dataclasses.asdict(self.config), val_loss=val_loss,
                                     world_size=self.dist_info.world_size, micro_batch=micro_batch,
                                     torch_version=str(torch.__version__), git_commit=git_commit(),
                                     tokenizer=self.tokenizer.checkpoint_record())
        name = checkpoint_name(step, val_loss)
        best_step, back_to = self.progress.best_step, self.spikes.back_to

        def write():  # on rank 0, which holds the whole state under FSDP too
            unsound = unsound_tensor(checkpoint, self.parameter_names)
            if unsound:
                raise self.diverged(f"stopped after step {step - 1}: {unsound}: the weights have "
                                    "diverged, and are not saved")
            # the checkpoint a roll-back or the stop after bad steps names is never pruned
            self.checkpoints.write(name, checkpoint, best_step, self.log.print, keep=back_to)
        self.dist_info.on_rank0(write, "write a checkpoint")
        self.checkpoints.latest = self.checkpoints.out_dir / name  # on every rank

    def evaluate_and_save(self, step):
        """The evaluation of step and (past step 0) its checkpoint; the seconds each took."""
        scores, eval_seconds = self.evaluation.report(step, self.wrapped, self.model, self.autocast,
                                                      self.progress.tokens)
        self.check_target(step, scores["val_loss"])
        saved, save_seconds = time.perf_counter(), None
        if step > 0:  # step 0 is never checkpointed, so it never counts as the best
            self.save(step, scores["val_loss"])
            save_seconds = time.perf_counter() - saved
        if self.plotter:
            self.plotter.redraw()
        return eval_seconds, save_seconds

    def check_target(self, step, val_loss):
        """The first evaluation at or below --target_val_loss: its step, tokens and training seconds
        kept in the run's progress, printed and recorded in metrics.jsonl. A target the run reached
        before (its record, or a best val loss at or below it) is not reported again; a new one
        given on resume is checked from there on (rundir.target_notes says which). NaN reaches none:
        it compares false with every number, so the test is `not val_loss <= target`."""
        target, p = self.config.target_val_loss, self.progress
        if not target or not val_loss <= target or rundir.target_met(p, target):
            return
        p.target = {"target_val_loss": target, "val_loss": val_loss, "step": step,
                    "tokens": p.tokens, "train_seconds": round(p.train_seconds, 3)}
        self.log.print(f"step {step}: --target_val_loss {target:g} {describe_target(p.target)}")
        self.log.record(**p.target)

    def log_step(self, step, lr, loss, grad_norm, ms_per_step, model_flops_per_token, peak_flops):
        loss = (self.dist_info.sum(loss.clone()) / self.dist_info.world_size).item()  # a sync
        tokens_per_sec = self.batches.tokens_per_step / (ms_per_step / 1000)
        mfu = estimate_mfu(model_flops_per_token, tokens_per_sec, peak_flops)
        self.log.step(step, train_loss=loss, lr=lr, grad_norm=grad_norm.item(),
                      ms_per_step=ms_per_step, tokens_per_sec=tokens_per_sec, mfu=mfu,
                      tokens=self.progress.tokens)

    def loop(self, stop, launched, checkpoint_bytes):
        """Train from the current step to max_iters: evaluate (and checkpoint) every eval_interval
        steps and at the end, log every log_interval steps; stop with a checkpoint on a signal, or
        before the next step would pass --max_time, counted from launched (guards.TimeBudget, which
        guesses a checkpoint's write from its checkpoint_bytes until one is written)."""
        config = self.config
        budget = TimeBudget(parse_duration(config.max_time), launched, checkpoint_bytes)
        profile_steps = parse_step_range(config.profile_steps) if self.dist_info.is_master else None
        profiler = StepProfiler(profile_steps, config.out_dir, self.device, self.log.print,
                                config.max_iters)
        guard_line = self.spikes.describe(config.max_bad_steps)
        if guard_line:
            self.log.print(guard_line)
        model_flops_per_token = self.model.flops_per_token()
        peak_flops = device_peak_flops(self.device, self.dtype, self.dist_info.world_size)
        first_step = step = self.progress.iter_num
        interval_start, interval_steps = time.perf_counter(), 0
        from tqdm import tqdm
        # closed on the way out whatever happens, so that a message after it gets a line of its own
        bar = tqdm(total=config.max_iters, initial=first_step, desc="train", unit="step",
                   dynamic_ncols=True, mininterval=1.0, disable=not self.dist_info.is_master)
        with bar, profiler:
            while True:
                evaluates = step % config.eval_interval == 0 or step == config.max_iters
                if evaluates and not (self.evaluated_at_start and step == first_step):
                    eval_start = time.perf_counter()
                    budget.record_evaluation(*self.evaluate_and_save(step))
                    interval_start, interval_steps = time.perf_counter(), 0  # not training time
                    pause_clock(bar, interval_start - eval_start)  # nor in the bar's rate and ETA
                    target = target_reached(self.progress, config.target_val_loss)
                    if config.stop_at_target and target and target["step"] == step and step > 0:
                        break  # its checkpoint is written: the run ends here
                if step == config.max_iters:
                    break
                profiler.before(step)
                step_start = budget.clock()
                lr, loss, grad_norm = self.train_step(step)
                step_seconds = budget.clock() - step_start  # the step waited for the device
                budget.record_step(step_seconds)
                self.progress.train_seconds += step_seconds
                profiler.after(step)
                interval_steps += 1
                bar.update(1)
                if step % config.log_interval == 0 or step == config.max_iters - 1:
                    ms_per_step = 1000 * (time.perf_counter() - interval_start) / interval_steps
                    self.log_step(step, lr, loss, grad_norm, ms_per_step, model_flops_per_token,
                                  peak_flops)
                    interval_start, interval_steps = time.perf_counter(), 0
                step = self.progress.iter_num
                self.stop_if_asked(stop, budget, step, config.max_iters)

    def stop_if_asked(self, stop, budget, step, max_iters):
        """A checkpoint and the exit, on every rank, when a signal asks for it or the next step
        would pass the time budget (or metrics.jsonl could not be written: then no checkpoint)."""
        d = self.dist_info
        self.log.raise_if_failed(d)
        if d.any(stop.requested is not None):
            signum = stop.requested or signal.SIGTERM
            self.save(step)
            raise UserError(f"stopped by {signal.Signals(signum).name} after step {step - 1}: "
                            f"saved {self.checkpoints.latest}, where step {step} is the next to "
                            "run; continue with --init_from resume", code=128 + signum)
        evaluates = step % self.config.eval_interval == 0 or step == max_iters
        if step < max_iters and d.any(budget.out_of_time(evaluates)):
            self.save(step)
            raise UserError(f"stopped after step {step - 1}: the next step would pass --max_time "
                            f"{self.config.max_time}; saved {self.checkpoints.latest}, where step "
                            f"{step} is the next to run; resumable: run the same command with "
                            "--init_from resume", code=RESUMABLE_EXIT)

    def close(self):
        self.batches.close()
        if self.plotter:
            self.plotter.finish()


# -----------------------------------------------------------------------------
# The three programs: export, train, and evaluate only (evaluation.evaluate_only)


def load_start(init_from, out_dir):
    """(model, checkpoint) for --init_from: a checkpoint of this trainer (a path, or `resume` for
    the latest in out_dir; its weights built into a GPT, removed from the dict) or GPT-2 weights
    (checkpoint None). sample.py loads its model here too, and its tokenizer by start_tokenizer."""
    if init_from != "resume" and is_hf_model(init_from):
        return GPT.from_pretrained(init_from).eval(), None
    checkpoint = load_checkpoint(checkpoint_path(init_from, out_dir))
    model = build_checkpoint_model(checkpoint, GPT, GPTConfig)
    try:
        model.load_state_dict(checkpoint.pop("model"))
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise damaged_weights(checkpoint["path"], e) from None
    return model.eval(), checkpoint


def start_tokenizer(init_from, checkpoint, given=None):
    """The tokenizer that the model of --init_from reads (checkpoint: load_start's): its checkpoint's,
    else a transformers model's own (hf_convert.model_tokenizer); a new run's (--init_from scratch)
    is given, GPT-2's unless given. given: the --tokenizer passed (a Tokenizer, None if none), which
    must be the model's: a model reads the tokens it was trained on. Training, --eval_only, the
    export and sample.py all take a model's tokenizer here."""
    if init_from == "scratch":
        return given or load_tokenizer()
    if checkpoint is not None:
        tokenizer = checkpoint_tokenizer(checkpoint["tokenizer"], checkpoint["path"])
        whose = f"the model of {checkpoint['path']}"
    else:
        tokenizer = model_tokenizer(init_from)
        whose = f"--init_from {init_from} (its folder's tokenizer file; GPT-2's where it has none)"
    if given is not None and given.sha256 != tokenizer.sha256:
        raise UserError(f"{whose} reads the tokens of {describe_tokenizer(tokenizer.record())}, not "
                        f"of --tokenizer {describe_tokenizer(given.record())}: drop --tokenizer (a "
                        "model keeps its tokenizer)")
    return tokenizer


def export(config, given=None):
    """--export_hf: a conversion, not a run; it reads no data and trains nothing (hf_convert). The
    tokenizer goes with the model (start_tokenizer's; given: the --tokenizer passed, if any)."""
    model, checkpoint = load_start(config.init_from, config.out_dir)
    tokenizer = start_tokenizer(config.init_from, checkpoint, given)
    path = export_model(model, config.export_hf, tokenizer)
    print(f"exported {checkpoint['path'] if checkpoint else config.init_from} to {path}")


def train(config, changes, dist_info, model, checkpoint, launched, tokenizer):
    """Training from scratch, from GPT-2 weights or from a checkpoint; one process or many; the data
    in the tokenizer's tokens. launched: when this process started (perf_counter), from which
    --max_time counts."""
    log = RunLog(config.out_dir, dist_info.is_master)
    model_config = model.config if model is not None else new_model_config(config)
    if checkpoint is not None:
        changes = (changes + resume_warnings(checkpoint["config"], config, checkpoint["world_size"],
                                             dist_info.world_size)
                   + target_notes(Progress(**checkpoint["progress"]), config))
    for line in changes:
        log.print(line)
    if checkpoint is not None and checkpoint["progress"]["iter_num"] > config.max_iters:
        raise UserError(f"{checkpoint['path']} is at step {checkpoint['progress']['iter_num']}, "
                        f"past --max_iters {config.max_iters}: raise --max_iters to train on")
    check_vocab_size(model_config.vocab_size,
                     checkpoint["path"] if checkpoint else config.init_from, tokenizer)
    # everything the user gave is checked before a model is built, a step taken or out_dir touched
    resolve_dtype(config.dtype, dist_info.device, dist_info.sharded)
    dist_info.on_rank0(lambda: rundir.check_tracker_packages(config), "load a tracker's package")
    evaluation = Evaluation(config, model_config.block_size, dist_info, log, tokenizer)
    sources = load_token_sources(config.data, "train", tokenizer)
    make_loader = lambda batch_size, micro_steps: ShardLoader(
        sources, batch_size, model_config.block_size, micro_steps, dist_info.rank,
        dist_info.world_size, config.seed, config.shuffle, n_vocab=tokenizer.n_vocab)
    loader = make_loader(config.batch_size, config.gradient_accumulation_steps)
    state_bytes = training_state_bytes(model_config, config)
    if model is None:
        check_model_fits(state_bytes, dist_info)
    continuing = checkpoint["path"] if checkpoint else None
    check = lambda: rundir.check_run_files(config.out_dir, continuing)
    # status: this launch's exit, left in out_dir
    trainer, failed, status, lock = None, True, 1, None
    try:
        if model is None:
            torch.manual_seed(config.seed)
            model = GPT(model_config)
        # the checkpoint's state restored (and checked) before out_dir is touched
        trainer = Trainer(config, dist_info, model, log, loader=loader, evaluation=evaluation,
                          checkpoint=checkpoint, tokenizer=tokenizer)
        lock = dist_info.on_rank0(lambda: rundir.claim_out_dir(config.out_dir, check),
                                  "use --out_dir")
        if config.auto_batch:
            # the optimizer's state not yet made (it is at the first step) needs room too
            unmade = state_bytes["optimizer"] - sum(map(optimizer_state_bytes,
                                                        trainer.optimizers.values()))
            size = choose_micro_batch(config, dist_info, trainer.try_micro_batch, unmade, log.print)
            trainer.use_micro_batch(size, make_loader)
        files = (config, trainer.progress, trainer.evaluated_at_start, log, trainer.batches.loader,
                 tokenizer)
        dist_info.on_rank0(lambda: rundir.prepare_run_files(*files), "prepare --out_dir")
        first_step, started = trainer.progress.iter_num, time.perf_counter()
        for line in rundir.header(trainer.model.num_params(non_embedding=False), dist_info,
                                  trainer.dtype, loader.tokens_per_step, first_step,
                                  trainer.model.architecture()):
            log.print(line)
        with StopSignal(verbose=dist_info.is_master) as stop:
            try:
                checkpoint_bytes = state_bytes["weights"] + state_bytes["optimizer"]
                trainer.loop(stop, launched, checkpoint_bytes)
                log.raise_if_failed(dist_info)
            except UserError as e:
                failed = e.code == 1  # a stop on a signal or the budget saved a checkpoint
                raise
        failed, status = False, 0
        seconds = time.perf_counter() - started
        best_bpb = bits_per_byte(trainer.progress.best_val_loss, evaluation.tokens_per_byte)
        for line in rundir.summary(config.out_dir, trainer.progress, trainer.checkpoints.latest,
                                   first_step, seconds, config.target_val_loss, best_bpb):
            log.print(line)
    except (UserError, KeyboardInterrupt) as e:  # RESUMABLE_EXIT: stopped on --max_time
        status = getattr(e, "code", 130)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        log.close(failed)
        if lock is not None:  # rank 0: what a job script reads where torchrun reports any exit as 1
            rundir.write_exit_status(config.out_dir, status)
            lock.release()


def new_model_config(config):
    """The GPTConfig of the flags' model (its fields are flags too)."""
    return GPTConfig(**{field.name: getattr(config, field.name)
                        for field in dataclasses.fields(GPTConfig)})


def follow_tokenizer(flags, explicit, tokenizer):
    """A new model's flags with --vocab_size the tokenizer's ids padded to a multiple of 64 (faster
    matmuls), unless given (explicit: the names of the flags given)."""
    if "vocab_size" in explicit:
        return flags
    return dataclasses.replace(flags, vocab_size=-(-tokenizer.n_vocab // 64) * 64)


# -----------------------------------------------------------------------------
# Entry point


@dataclass
class TrainConfig(GPTConfig, MuonFlags, AdafactorFlags, TrainSettings):
    """train_gpt2.py's flags: the run's settings (settings.py), the optimizers' own flags
    (optimizers.OPTIMIZER_FLAGS) and the model's shape (GPTConfig)."""

    def validate(self, host=True):
        super().validate(host)
        check_optimizer(self)


def parse_args(argv=None):
    """(the flags as a TrainConfig, the names of those given on the command line or in --config)."""
    return parse_config(TrainConfig, argv)


def start(argv):
    """The config, and what --init_from names loaded: (config, changes, model, checkpoint,
    tokenizer); changes: the lines a training run prints first (flags changed on resume, flags of
    another optimizer); the tokenizer start_tokenizer's, a new run's --vocab_size following it
    unless given. With --export_hf, which loads its model on rank 0, the tokenizer is the
    --tokenizer given (None if none), for the export to check against the model's."""
    flags, explicit = parse_args(argv)
    given = load_tokenizer(flags.tokenizer) if "tokenizer" in explicit else None
    if flags.init_from != "resume" and is_hf_model(flags.init_from):
        start_tokenizer(flags.init_from, None, given)  # a transformers model's: before its weights load
    if flags.export_hf:
        return with_absolute_paths(flags), [], None, None, given
    if flags.init_from == "scratch":
        tokenizer = start_tokenizer(flags.init_from, None, given)
        config = with_absolute_paths(follow_tokenizer(flags, explicit, tokenizer))
        return config, unused_flag_warnings(config, explicit), None, None, tokenizer
    model, checkpoint = load_start(flags.init_from, flags.out_dir)
    tokenizer = start_tokenizer(flags.init_from, checkpoint, given)
    model_args = dataclasses.asdict(model.config)
    check_architecture(explicit, flags, model_args)
    if checkpoint is None:  # GPT-2 weights: a new run, with the weights' architecture and tokenizer
        flags = dataclasses.replace(flags, tokenizer=tokenizer.path or tokenizer.name)
        config, changes = with_absolute_paths(flags), []
    else:
        config, changes = run_config(flags, explicit, checkpoint)
    # the weights' architecture, whatever the flags or the checkpoint's flags say (a field they lack)
    config = dataclasses.replace(config, **model_args)
    return config, changes + unused_flag_warnings(config, explicit), model, checkpoint, tokenizer


def main(argv=None):
    launched = time.perf_counter()

    def program(join):
        config, changes, model, checkpoint, tokenizer = start(argv)
        config.validate()
        dist_info = join(config.device, config.ddp_timeout, config.fsdp and not config.export_hf,
                         config.backend)
        if config.export_hf:
            dist_info.on_rank0(lambda: export(config, tokenizer), "export the model")
        elif config.eval_only:  # the model placed (sharded under FSDP) as training places it
            place = lambda model, dtype: place_model(model, dist_info, dtype, config.loss_kernel)
            evaluate_only(config, dist_info, model, checkpoint, place, tokenizer)
        else:
            train(config, changes, dist_info, model, checkpoint, launched, tokenizer)

    run_on_ranks(program)


if __name__ == "__main__":
    main()
