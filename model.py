"""
The GPT-2 model, as in the paper and OpenAI's code, and its interop with transformers' GPT-2.

    from train_gpt2 import GPT, GPTConfig       # (re-exported there; this file is where they live)
    model = GPT(GPTConfig())                     # GPT-2 124M, randomly initialized
    model = GPT.from_pretrained("gpt2")          # OpenAI's weights through transformers
    logits, loss = model(idx, targets)

train_gpt2.py trains it; export_hf writes it out as a transformers folder. Importing this file only defines.
"""

import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from cli import UserError, current_umask
from cross_entropy_kernel import cross_entropy_and_grad_, triton_installed
from fineweb import EOT_TOKEN, VOCAB_SIZE, get_tokenizer


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


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softmax(x @ weight.T) against targets, computed over chunks of rows so that
    only a (chunk, vocab) slice of the logits ever exists. The gradients are computed in the same pass
    (softmax minus one-hot is the gradient of the summed loss with respect to the logits), so the backward
    pass only scales them: the same matmuls as the plain loss, with a fraction of its memory and of its
    passes over (rows, vocab) arrays. The 1/rows of the mean is applied to the small results, never to a
    (rows, vocab) array.

    With a workspace (a dict, kept by the caller between calls) the logits are written into a buffer kept
    there, and their softmax is taken a few rows at a time, in the cache, into that same buffer. That is for
    the CPU, where every fresh tensor of this size is new memory from the operating system, paid for with a
    page fault on each 4 KiB touched: for GPT-2's vocabulary, nearly as long again as the matmul that fills
    it (BENCHMARKS.md). A GPU's caching allocator already reuses its memory; there each chunk's softmax and
    gradient go through the Triton kernel of cross_entropy_kernel.py (use_kernel), two passes over the chunk's
    logits where plain torch makes about eight."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size, needs_grad, workspace, use_kernel):
        n_rows, vocab_size = x.size(0), weight.size(0)
        # under autocast the matmuls run in the autocast dtype, as nn.Linear's would
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x_c, w_c = x.to(dtype), weight.to(dtype)
        # float16 has too little range for the logit gradients (probabilities ~1/vocab): carry them scaled up
        grad_scale = 1024.0 if dtype == torch.float16 else 1.0
        grad_x = torch.empty_like(x) if needs_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            rows = slice(start, end)
            if workspace is None:
                logits = x_c[rows] @ w_c.T  # (chunk, V)
            else:
                logits = torch.mm(x_c[rows], w_c.T, out=reusable_buffer(workspace, (end - start, vocab_size), dtype))
            # the chunk's loss, its logits overwritten by their gradient (in 8-row blocks that fit in L2 on the CPU)
            loss += cross_entropy_and_grad_(logits, targets[rows], grad_scale, needs_grad, use_kernel,
                                            block_rows=8 if workspace is not None else None)
            if needs_grad:
                grad_x[rows] = logits @ w_c
                if dtype == torch.float32:
                    grad_w.addmm_(logits.T, x_c[rows])
                else:  # accumulate the chunks' bf16/fp16 products in float32
                    grad_w += (logits.T @ x_c[rows]).float()
        if needs_grad:
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
            ctx.divisor = n_rows * grad_scale  # the mean's 1/rows, and the float16 scale-up undone
        return loss / n_rows

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.divisor
        # scaled in place: they were made for this one use, and a copy of grad_w is another (vocab, C) array
        return grad_x.mul_(scale), grad_w.mul_(scale), None, None, None, None, None


def reusable_buffer(workspace, shape, dtype):
    """An uninitialized CPU tensor of this shape, kept in workspace and reused while it is large enough."""
    size = math.prod(shape)
    buffer = workspace.get("logits")
    if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
        buffer = workspace["logits"] = torch.empty(size, dtype=dtype)
    return buffer[:size].view(shape)


def linear_cross_entropy(x, weight, targets, chunk_size=4096, workspace=None, use_kernel=True):
    """F.cross_entropy(x @ weight.T, targets) without the full logits; x (N, C), weight (V, C), targets (N,).
    workspace: a dict to keep the logits buffer in between calls (see LinearCrossEntropy). use_kernel: the
    Triton kernel of cross_entropy_kernel.py for each chunk's softmax where it runs (CUDA), else plain torch."""
    # grad mode is off inside forward(), so it is read here: an evaluation must not pay for gradients
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(x, weight, targets, chunk_size, needs_grad, workspace, use_kernel)



class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.loss_workspace = {}  # the CPU loss's logits buffer, kept between steps
        self.loss_kernel = True  # the loss's softmax through cross_entropy_kernel.py's Triton kernel, where it runs
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
        """(logits, loss). With return_logits=False the loss is computed chunk by chunk without ever
        holding the (B, T, vocab_size) logits, and None is returned in their place: the training step's way.
        positions: a (K,) index into the B * T flattened positions; the logits are computed there alone,
        (K, vocab_size), with no loss (an evaluation that scores a few tokens of each row)."""
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
            x, targets = x.view(B * T, -1), targets.view(-1)
            on_cpu = x.device.type == "cpu"
            # no device query here, inside the compiled region: the loss itself checks the GPU and falls back
            use_kernel = self.loss_kernel and x.is_cuda and triton_installed()
            loss_fn = linear_cross_entropy
            if (on_cpu or use_kernel) and torch.compiler.is_compiling():
                # in place into a kept buffer (the CPU), which a compiled graph would turn into copies, or a
                # Triton kernel (a GPU): eager, the rest of the model compiled. (wrapped here, not at import:
                # torch.compiler.disable imports the compiler, a second and a half)
                loss_fn = torch.compiler.disable(loss_fn)
            return None, loss_fn(x, self.lm_head.weight, targets, workspace=self.loss_workspace if on_cpu else None,
                                 use_kernel=use_kernel)
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
        """Append max_new_tokens sampled tokens to idx (B, T). Ids at or past vocab_limit (the padding of
        the vocabulary) are never sampled."""
        for next_token in self.generate_tokens(idx, max_new_tokens, temperature, top_k, vocab_limit, generator):
            idx = torch.cat((idx, next_token), dim=1)
        return idx

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_limit=None, generator=None):
        """generate, one token at a time: yields each sampled (B, 1) batch of ids as soon as it is drawn,
        so that a caller can stream the text."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :vocab_limit].float() / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token

    @classmethod
    def from_pretrained(cls, name_or_path):
        """GPT-2 weights from transformers: OpenAI's ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', from the
        Hugging Face hub or its cache) or a folder written by save_pretrained. See load_hf_gpt2."""
        hf = load_hf_gpt2(name_or_path)
        c = hf.config
        # the vocabulary stays unpadded (50,257): padded rows would take part in the softmax and change the loss
        model = cls(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                              n_head=c.n_head, n_embd=c.n_embd))
        ours = model.state_dict()  # shares storage with the parameters: copying into it loads them
        copied = {"lm_head.weight"}  # tied to wte in both models
        with torch.no_grad():
            for name, value in hf.state_dict().items():
                if name in copied or name.endswith((".attn.bias", ".attn.masked_bias")):
                    continue  # older transformers keep the causal mask as a buffer; ours is in the SDPA call
                ours[name].copy_(value.t() if name.endswith(HF_TRANSPOSED) else value)
                copied.add(name)
        assert copied == set(ours), set(ours) - copied  # load_hf_gpt2 checked that the architectures agree
        return model


# -----------------------------------------------------------------------------
# GPT-2 interop: transformers weights in and out

HF_GPT2_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# transformers' GPT-2 holds these in Conv1D modules, whose weight is nn.Linear's transposed: (in, out)
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_hf_model(init_from):
    """--init_from names transformers weights: one of OpenAI's GPT-2 sizes, or a folder with a config.json.
    Anything else is a checkpoint of this trainer."""
    return init_from in HF_GPT2_MODELS or (Path(init_from) / "config.json").is_file()


@contextlib.contextmanager
def quiet_hf_logs():
    """Silence transformers' and the hub client's warnings (offline, the client logs every retry), so a
    failure ends in our one-line error."""
    import logging
    loggers = [logging.getLogger(name) for name in ("transformers", "huggingface_hub")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def load_hf_gpt2(name_or_path):
    """transformers' GPT2LMHeadModel for a hub name or a save_pretrained folder, checked to be the
    architecture that GPT implements."""
    folder = Path(name_or_path)
    if name_or_path not in HF_GPT2_MODELS:
        try:
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(f"{folder}/config.json cannot be read ({e}): pass a folder written by "
                            f"save_pretrained") from None
        if model_type != "gpt2":
            raise UserError(f"{folder} holds a {model_type!r} model, not GPT-2: pass a GPT-2 folder to --init_from")
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise UserError("loading GPT-2 weights needs transformers: pip install transformers") from None
    try:
        with quiet_hf_logs():
            hf = GPT2LMHeadModel.from_pretrained(name_or_path)
    except Exception as e:  # the hub, the files and their formats all raise their own types
        if name_or_path in HF_GPT2_MODELS:
            raise UserError(f"could not load {name_or_path} from the Hugging Face hub (no network?): download it "
                            f"elsewhere and pass its folder to --init_from") from None
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not load a transformers GPT-2 from {folder} ({reason}): pass a folder written by "
                        f"save_pretrained") from None
    c, n_vocab = hf.config, VOCAB_SIZE
    supported = {  # what GPT hard-codes: the tanh GELU, a 4x MLP, LayerNorm's default eps, SDPA's 1/sqrt(hs)
        "activation_function": c.activation_function in ("gelu_new", "gelu_pytorch_tanh"),
        "n_inner": c.n_inner in (None, 4 * c.n_embd),
        "layer_norm_epsilon": c.layer_norm_epsilon == 1e-5,
        "scale_attn_weights": c.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": not c.scale_attn_by_inverse_layer_idx,
        "vocab_size": n_vocab <= c.vocab_size <= GPTConfig.vocab_size,  # GPT-2's tokenizer, within our padding
    }
    for name, ok in supported.items():
        if not ok:
            raise UserError(f"{name_or_path} has {name}={getattr(c, name)}, which this repo's GPT does not "
                            f"implement (GPT-2's tokenizer and architecture): pass a standard GPT-2")
    return hf


def gpt2_vocab_and_merges():
    """GPT-2's tokenizer in transformers' terms, rebuilt from the tiktoken ranks that fineweb.py loads (the
    repo vendors gpt2.tiktoken, not vocab.json and merges.txt): the vocab maps each token, its bytes
    spelled in GPT-2's printable byte alphabet, to its id; merge k makes token 256 + k from two others."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # bytes that print as themselves
    others = [b for b in range(256) if b not in printable]
    alphabet = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    spell = lambda token: "".join(alphabet[b] for b in token)
    enc = get_tokenizer()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(EOT_TOKEN)}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # byte-pair encode the token with the merges before it: two parts remain
            _, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((spell(parts[0]), spell(parts[1])))
    vocab = {spell(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = EOT_TOKEN
    return vocab, merges


def save_hf_tokenizer(folder, max_length):
    """vocab.json and merges.txt (as OpenAI's GPT-2 folder has them), and tokenizer.json through transformers."""
    from transformers import GPT2Tokenizer
    vocab, merges = gpt2_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    tokenizer = GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(folder)


def export_hf(model, path):
    """Write model to the folder path as a transformers GPT-2 (config.json, model.safetensors,
    generation_config.json and the tokenizer), which GPT2LMHeadModel.from_pretrained and pipelines load; both the
    generation config (max_length) and the tokenizer (model_max_length) carry the context length. The
    padded vocabulary rows are dropped. Written to a temporary folder beside path and renamed into place, so
    path never holds a half-written export."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"--export_hf {path} already exists: remove it or pass a new folder")
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise UserError("--export_hf needs transformers: pip install transformers") from None
    c, n_vocab = model.config, VOCAB_SIZE
    hf_config = GPT2Config(vocab_size=n_vocab, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                           n_head=c.n_head, activation_function="gelu_new", tie_word_embeddings=True,
                           bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # this repo trains without dropout
    hf = GPT2LMHeadModel(hf_config)
    # generation stops at the context length: the position embedding has block_size rows, and transformers'
    # text-generation pipeline would otherwise ask for 256 new tokens and index past them
    hf.generation_config.max_length = c.block_size
    hf.generation_config.pad_token_id = EOT_TOKEN  # GPT-2 has no pad token; generate() warns on every call without
    hf_state = hf.state_dict()  # shares storage with hf's parameters
    with torch.no_grad():
        for name, value in model.state_dict().items():
            value = value.t() if name.endswith(HF_TRANSPOSED) else value
            hf_state[name].copy_(value[:n_vocab] if name.endswith(("wte.weight", "lm_head.weight")) else value)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise UserError(f"--export_hf {path} cannot be written ({e.strerror or e}): pick a folder in a writable "
                        f"place") from None
    try:
        with quiet_hf_logs():
            hf.save_pretrained(tmp, safe_serialization=True)
            save_hf_tokenizer(tmp, c.block_size)
        # mkdtemp makes the folder 0700 and transformers writes the weights 0600: both would hide the export
        # from other users
        os.chmod(tmp, 0o777 & ~current_umask())
        for file in tmp.iterdir():
            os.chmod(file, 0o666 & ~current_umask())
        os.replace(tmp, path)  # replaces an empty folder, never a full one (checked above)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
