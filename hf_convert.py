"""
GPT-2's weights between this repo's GPT and transformers' GPT2LMHeadModel, as state dicts: nothing here needs
the model class. The trainer builds its GPT from them (--init_from gpt2) and exports its own to them
(--export_hf); hellaswag.py scores transformers' models with them.

    model_args, state = load_gpt2_weights("gpt2")         # OpenAI's GPT-2 (or a save_pretrained folder)
    tokenizer = model_tokenizer("gpt2")                   # its tokenizer (GPT-2's; a folder's own)
    hf = hf_model(model_args, state, tokenizer)           # our weights in a GPT2LMHeadModel
    export_hf(model_args, state, "out/hf", tokenizer)     # a folder that transformers loads

Names are the same on both sides (transformer.h.0.attn.c_attn.weight, ...); transformers keeps four of the
matrices transposed (HF_TRANSPOSED), and its vocabulary is the tokenizer's (GPT-2's 50,257) where ours may be
padded. The tokenizer goes with the weights: a tiktoken one as GPT-2's vocab.json and merges.txt (and the ranks
file itself), a tokenizers JSON file as itself; a folder's tokenizer is model_tokenizer's.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from cli import UserError, current_umask, parse_nested
from fineweb import HFTokenizer, load_tokenizer, make_tokenizer

# -----------------------------------------------------------------------------
# Loading transformers' GPT-2

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


def hub_reachable(timeout=5):
    """Whether the Hugging Face hub answers at all: without a network, transformers retries for most of a
    minute before it gives up, where this fails in a moment."""
    import socket
    from urllib.parse import urlparse
    try:
        from huggingface_hub import constants
        endpoint = urlparse(constants.ENDPOINT)
    except (ImportError, AttributeError):
        return True  # not knowing the endpoint, let transformers try
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def from_cache_or_hub(model_class, name_or_path):
    """model_class.from_pretrained: a folder as it is; a hub name from the local cache if it is there, else
    from the hub, once the hub is known to answer."""
    if name_or_path not in HF_GPT2_MODELS:
        return model_class.from_pretrained(name_or_path)
    try:
        return model_class.from_pretrained(name_or_path, local_files_only=True)
    except OSError:
        if not hub_reachable():
            raise
    return model_class.from_pretrained(name_or_path)


# the run's tiktoken ranks file, as it was, in an export (transformers reads the vocab.json and merges.txt beside it)
RANKS_FILE = "tokenizer.tiktoken"


def model_tokenizer(name_or_path):
    """The tokenizer of a transformers model (--init_from), known as the tokenizer of its data is, by the
    sha256 of its file: a folder's tokenizer.tiktoken (an export's ranks file), else its tokenizer.json (an
    export's is the run's file as it was), else GPT-2's, as OpenAI's models' is. One that is GPT-2's by its
    content (is_gpt2s) is GPT-2's, so that GPT-2's shards go with it."""
    folder = Path(name_or_path)
    paths = [folder / RANKS_FILE, folder / "tokenizer.json"]
    path = next((p for p in paths if p.is_file()), None) if name_or_path not in HF_GPT2_MODELS else None
    if path is None:
        return load_tokenizer()
    try:
        content = path.read_bytes()
    except OSError as e:
        raise UserError(f"--init_from {name_or_path}: its {path.name} cannot be read ({e.strerror or e}): fix "
                        f"its permissions") from None
    try:
        tokenizer = make_tokenizer(path.name, content, str(path.resolve()))
    except ValueError as e:
        kind = "tiktoken ranks file" if path.name == RANKS_FILE else "tokenizers JSON file"
        raise UserError(f"--init_from {name_or_path}: its {path.name} is not a {kind} that works here ({e}): "
                        f"pass a folder written by save_pretrained or --export_hf") from None
    return load_tokenizer() if is_gpt2s(tokenizer) else tokenizer


def is_gpt2s(tokenizer):
    """Whether a tokenizer is GPT-2's: its file is gpt2.tiktoken, or a tokenizers JSON file of a byte-level
    BPE with GPT-2's vocabulary and merges, split as GPT-2 splits text (OpenAI's tokenizer.json, say)."""
    gpt2 = load_tokenizer()
    if tokenizer.sha256 == gpt2.sha256:
        return True
    if not isinstance(tokenizer, HFTokenizer) or tokenizer.n_vocab != gpt2.n_vocab:
        return False
    spec = json.loads(tokenizer.content)
    model, split = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (model.get("type"), spec.get("normalizer"), split.get("type")) != ("BPE", None, "ByteLevel") or \
            split.get("add_prefix_space") or not split.get("use_regex", True):
        return False
    vocab, merges = gpt2_vocab_and_merges(gpt2)
    theirs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    return model.get("vocab") == vocab and theirs == merges


def load_hf_gpt2(name_or_path, tokenizer):
    """transformers' GPT2LMHeadModel for a hub name or a save_pretrained folder, checked to be the
    architecture that this repo's GPT implements, with a row for every id of the tokenizer (the model's own:
    model_tokenizer's)."""
    folder = Path(name_or_path)
    if name_or_path not in HF_GPT2_MODELS:
        try:
            model_type = parse_nested(json.loads, (folder / "config.json").read_text()).get("model_type")
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
            hf = from_cache_or_hub(GPT2LMHeadModel, name_or_path)
    except Exception as e:  # the hub, the files and their formats all raise their own types
        if name_or_path in HF_GPT2_MODELS:
            raise UserError(f"could not load {name_or_path} from the Hugging Face hub (no network?): download it "
                            f"elsewhere and pass its folder to --init_from") from None
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not load a transformers GPT-2 from {folder} ({reason}): pass a folder written by "
                        f"save_pretrained") from None
    c, n_vocab = hf.config, tokenizer.n_vocab
    supported = {  # what GPT can be: its MLP's activations, a 4x MLP, LayerNorm's default eps, SDPA's 1/sqrt(hs)
        "activation_function": c.activation_function in MLP_OF_ACTIVATION,
        "n_inner": c.n_inner in (None, 4 * c.n_embd),
        "layer_norm_epsilon": c.layer_norm_epsilon == 1e-5,
        "scale_attn_weights": c.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": not c.scale_attn_by_inverse_layer_idx,
        "vocab_size": c.vocab_size >= n_vocab,  # the tokenizer's ids
    }
    for name, ok in supported.items():
        if not ok:
            raise UserError(f"{name_or_path} has {name}={getattr(c, name)}, which this repo's GPT does not "
                            f"implement (its tokenizer and GPT-2's architecture): pass a standard GPT-2")
    return hf


# -----------------------------------------------------------------------------
# The conversion, both ways


# the fields of train_gpt2.GPTConfig that transformers' GPT2Config holds, and their names there; any other
# field of GPTConfig takes its default when GPT-2 weights come in, and must be at it for an export, but those
# of HF_HOLDS
HF_CONFIG_NAMES = {"block_size": "n_positions", "vocab_size": "vocab_size", "n_layer": "n_layer",
                   "n_head": "n_head", "n_embd": "n_embd"}
# GPTConfig's --mlp as transformers' activation_function (the same function), and back
HF_ACTIVATIONS = {"gelu": "gelu_new", "relu2": "relu2"}
MLP_OF_ACTIVATION = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu2": "relu2"}
# the options of GPTConfig past GPT-2's shape that transformers' GPT-2 holds, and which of their values: an
# untied head (tie_word_embeddings=False), no biases (held as zero biases), any initialization, and an MLP whose
# activation transformers has
HF_HOLDS = {"tie_embeddings": lambda value: True, "bias": lambda value: True,
            "zero_init_projections": lambda value: True, "mlp": lambda value: hf_activation(value) is not None}


def hf_activation(mlp):
    """transformers' name for the activation of GPTConfig's --mlp, if this transformers has it, else None."""
    from transformers.activations import ACT2CLS
    return HF_ACTIVATIONS.get(mlp) if HF_ACTIVATIONS.get(mlp) in ACT2CLS else None


def model_args_of(hf_config):
    """The architecture (GPTConfig's fields, as a dict) of a transformers GPT2Config."""
    return {**{ours: getattr(hf_config, theirs) for ours, theirs in HF_CONFIG_NAMES.items()},
            "mlp": MLP_OF_ACTIVATION[hf_config.activation_function],
            "tie_embeddings": bool(hf_config.tie_word_embeddings)}


def load_gpt2_weights(name_or_path):
    """(model_args, state dict in our names) of transformers' GPT-2 weights: a hub name or a folder, checked
    against its own tokenizer (model_tokenizer). The vocabulary stays unpadded (50,257): padded rows would take
    part in the softmax and change the loss."""
    hf = load_hf_gpt2(name_or_path, model_tokenizer(name_or_path))  # a bad tokenizer.json before the weights
    state = {}
    for name, value in hf.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # older transformers keep the causal mask as a buffer; ours is in the SDPA call
        state[name] = value.t() if name.endswith(HF_TRANSPOSED) else value
    return model_args_of(hf.config), state


def hf_model(model_args, state, tokenizer):
    """transformers' GPT2LMHeadModel holding our weights (a state dict of our GPT), in eval mode: GPT-2's
    shape, with the head tied or not and the MLP's activation as model_args say; a model without biases
    gets zero biases. The padded vocabulary rows are dropped, so its logits are over the tokenizer's ids
    alone (GPT-2's 50,257)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise UserError("a model in transformers' format needs transformers: pip install transformers") from None
    a = model_args
    hf_config = GPT2Config(vocab_size=tokenizer.n_vocab, n_positions=a["block_size"], n_embd=a["n_embd"],
                           n_layer=a["n_layer"], n_head=a["n_head"],
                           activation_function=hf_activation(a.get("mlp", "gelu")) or "gelu_new",
                           tie_word_embeddings=a.get("tie_embeddings", True), bos_token_id=tokenizer.eot,
                           eos_token_id=tokenizer.eot, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0)  # this repo trains without dropout
    with quiet_hf_logs():
        hf = GPT2LMHeadModel(hf_config)
    hf_state = hf.state_dict()  # shares storage with hf's parameters: copying into it loads them
    expected = {name for name in hf_state if not name.endswith((".attn.bias", ".attn.masked_bias"))}
    if not a.get("bias", True):  # transformers' GPT-2 has biases: zeros add nothing
        state = {**{name: torch.zeros_like(hf_state[name]) for name in expected if name.endswith(".bias")},
                 **state}
    if set(state) != expected:
        different = sorted(set(state) ^ expected)[:3]
        raise UserError(f"transformers' GPT-2 cannot hold these weights ({', '.join(different)} missing or "
                        "extra there): only a model of GPT-2's architecture converts") from None
    with torch.no_grad():
        for name, value in state.items():
            transposed = name.endswith(HF_TRANSPOSED)
            value = value.t() if transposed else value
            value = value[:tokenizer.n_vocab] if name.endswith(("wte.weight", "lm_head.weight")) else value
            if value.shape != hf_state[name].shape:
                ours, gpt2 = tuple(value.shape), tuple(hf_state[name].shape)
                if transposed:  # said as this repo's Linear holds it (transformers' Conv1D has it transposed)
                    ours, gpt2 = ours[::-1], gpt2[::-1]
                raise UserError(f"transformers' GPT-2 cannot hold these weights ({name} is {ours}, GPT-2's "
                                f"{gpt2}): only a model of GPT-2's architecture converts")
            hf_state[name].copy_(value)
    return hf.eval()


# -----------------------------------------------------------------------------
# Export: a folder that transformers loads


@lru_cache(maxsize=2)
def gpt2_vocab_and_merges(tokenizer):
    """A tiktoken tokenizer (GPT-2's, or another ranks file split by GPT-2's pattern) in transformers' terms,
    rebuilt from its ranks (the repo vendors gpt2.tiktoken, not vocab.json and merges.txt): the vocab maps each
    token, its bytes spelled in GPT-2's printable byte alphabet, to its id; merge k makes token 256 + k from two
    others."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # bytes that print as themselves
    others = [b for b in range(256) if b not in printable]
    alphabet = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    spell = lambda token: "".join(alphabet[b] for b in token)
    eot = tokenizer.eot
    ranks = {tokenizer.encoding.decode_single_token_bytes(i): i for i in range(eot)}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # byte-pair encode the token with the merges before it: two parts remain
            _, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((spell(parts[0]), spell(parts[1])))
    vocab = {spell(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = eot
    return vocab, merges


def save_hf_tokenizer(folder, max_length, tokenizer):
    """The tokenizer as transformers loads it, and as the run's file it was made from, so that the folder's
    tokenizer (model_tokenizer) is known by the run's sha256 and takes the shards made with that file: a
    tokenizers JSON file through transformers' PreTrainedTokenizerFast, its tokenizer.json then put back as it
    was (transformers rewrites it, adding a post-processor that adds nothing); a tiktoken one as vocab.json and
    merges.txt (as OpenAI's GPT-2 folder has them) and tokenizer.json through transformers, and the ranks file
    as tokenizer.tiktoken."""
    if isinstance(tokenizer, HFTokenizer):
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast
        eot = tokenizer.backend.id_to_token(tokenizer.eot)
        fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.content.decode("utf-8")),
                                       bos_token=eot, eos_token=eot, model_max_length=max_length)
        fast.save_pretrained(folder)
        (folder / "tokenizer.json").write_bytes(tokenizer.content)
        return
    from transformers import GPT2Tokenizer
    vocab, merges = gpt2_vocab_and_merges(tokenizer)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                  model_max_length=max_length).save_pretrained(folder)
    (folder / RANKS_FILE).write_bytes(tokenizer.content)


def export_model(model, path, tokenizer):
    """export_hf of a model of this repo (a GPT) and its tokenizer: only what transformers' GPT2LMHeadModel
    holds goes out, GPT-2's shape and the options of HF_HOLDS; a field of its config at any other value is
    refused, naming it. The exported model's logits are checked against the model's before anything is
    written."""
    for field in dataclasses.fields(model.config):
        value = getattr(model.config, field.name)
        holds = field.name in HF_CONFIG_NAMES or value == field.default
        if not (holds or field.name in HF_HOLDS and HF_HOLDS[field.name](value)):
            raise UserError(f"--export_hf: transformers' GPT-2 has no {field.name} {value!r} (GPT-2's is "
                            f"{field.default!r}): only GPT-2's architecture can be exported, with an untied "
                            f"head, no biases or an MLP of {' or '.join(HF_ACTIVATIONS)} if it has them")
    model_args, state = dataclasses.asdict(model.config), model.state_dict()
    check_same_logits(model, hf_model(model_args, state, tokenizer), tokenizer.n_vocab)
    return export_hf(model_args, state, path, tokenizer)


@torch.no_grad()
def check_same_logits(model, hf, n_vocab):
    """Refuse an export whose transformers model would give other logits than ours (over the n_vocab ids of
    the tokenizer), on a row of tokens."""
    idx = torch.arange(min(model.config.block_size, 16)).view(1, -1) * 997 % n_vocab
    device = next(model.parameters()).device
    ours = model.eval()(idx.to(device))[0][..., :n_vocab].float().cpu()
    theirs = hf(idx).logits.float()
    difference = (ours - theirs).abs().max().item()
    if not difference <= 1e-3 * max(1.0, ours.abs().max().item()):
        raise UserError(f"--export_hf: transformers' GPT-2 gives logits {difference:.3g} away from this model's: "
                        "its architecture is not one transformers holds; nothing was exported")


def export_hf(model_args, state, path, tokenizer):
    """Write our weights (model_args and a state dict) to the folder path as a transformers GPT-2
    (config.json, model.safetensors, generation_config.json and the tokenizer, save_hf_tokenizer's), which
    GPT2LMHeadModel and pipelines load; both the generation config (max_length) and the
    tokenizer (model_max_length) carry the context length. Written to a temporary folder beside path and
    renamed into place, so path never holds a half-written export."""
    path = Path(path)
    if path.is_symlink():  # the rename below would not go through it, and replacing it loses it
        raise UserError(f"--export_hf {path} is a symbolic link (to {os.readlink(path)}): pass the folder it "
                        f"names, or a new one")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"--export_hf {path} already exists: remove it or pass a new folder")
    hf = hf_model(model_args, state, tokenizer)
    block_size = model_args["block_size"]
    # generation stops at the context length: the position embedding has block_size rows, and transformers'
    # text-generation pipeline would otherwise ask for 256 new tokens and index past them
    hf.generation_config.max_length = block_size
    hf.generation_config.pad_token_id = tokenizer.eot  # GPT-2 has no pad token; generate() warns on every call without
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise UserError(f"--export_hf {path} cannot be written ({e.strerror or e}): pick a folder in a writable "
                        f"place") from None
    from safetensors import SafetensorError
    try:
        with quiet_hf_logs():
            hf.save_pretrained(tmp, safe_serialization=True)
            save_hf_tokenizer(tmp, block_size, tokenizer)
        # mkdtemp makes the folder 0700 and transformers writes the weights 0600: both would hide the export
        # from other users
        os.chmod(tmp, 0o777 & ~current_umask())
        for file in tmp.iterdir():
            os.chmod(file, 0o666 & ~current_umask())
        os.replace(tmp, path)  # replaces an empty folder, never a full one (checked above)
    except (OSError, SafetensorError) as e:  # a full disk: safetensors says so in its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [""])[0]
        raise UserError(f"--export_hf {path} could not be written ({reason}): free disk space or pick "
                        f"another folder; nothing was left there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
