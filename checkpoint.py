"""
The one owner of the checkpoint format, and the one way to turn any --init_from into a model.

    from checkpoint import load_model, load_start
    model = load_model("out/best_val_loss.pt")                 # or "gpt2", a transformers folder
    model, checkpoint = load_start("resume", out_dir="out")    # the model and the rest of the latest checkpoint

A checkpoint is one file written by torch.save, readable with a bare torch.load(weights_only=True): a dict
with the keys of CHECKPOINT_KEYS (the model's and the optimizer's state, the architecture in model_args, the
step, the loader's position, the RNG, the run's whole config) and a format version. The model and optimizer
states are those one process's state_dict() gives, whatever wrote them (one process, DDP or FSDP), so any
checkpoint resumes under any of them. The trainer writes it from Trainer.state_dict(), always to a temporary file
renamed into place. In a run directory the trainer
names its checkpoints iter-{step}-loss-{val loss}.pt (after an evaluation) and iter-{step}-stopped.pt (on a
stop request), and keeps a copy of the best one as best_val_loss.pt; it reads, prunes and resumes from files
of exactly those names and no others.
"""

import re
import shutil
from pathlib import Path

import torch

from cli import UserError, atomic_write
from model import GPT, GPTConfig, is_hf_model

# -----------------------------------------------------------------------------
# The file: saved atomically, loaded with its keys and version checked

CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("version", "model", "model_args", "optimizer", "scaler", "iter_num", "best_val_loss",
                   "loader", "rng", "config")


def save_checkpoint(path, checkpoint):
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def optimizer_state_by_index(state):
    """An optimizer state keyed by parameter names, as torch.distributed.checkpoint gathers it, in the form
    optimizer.state_dict() gives: each parameter keyed by its position in the param groups."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def optimizer_state_by_name(state, names):
    """The other way: names[i] is the name of the parameter at position i of the optimizer's param groups."""
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in state["param_groups"]]}


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: pass an existing file to --init_from")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}): "
                        f"use another one, such as an earlier iter-*.pt of the same run") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a checkpoint of this trainer: pass a file written by train_gpt2.py")
    if not isinstance(checkpoint["config"], dict) or not isinstance(checkpoint["iter_num"], int):
        raise UserError(f"checkpoint {path} holds a malformed config or step: it is damaged; use another checkpoint "
                        f"of the run")
    if checkpoint["version"] != CHECKPOINT_VERSION:
        raise UserError(f"checkpoint {path} has format version {checkpoint['version']}, this code reads "
                        f"{CHECKPOINT_VERSION}")
    return checkpoint


def model_from_checkpoint(checkpoint, path):
    """The GPT whose weights the checkpoint holds; a damaged file (a tensor missing, extra or of the wrong
    shape, an unknown architecture field) is a one-line error, not a traceback."""
    try:
        model = GPT(GPTConfig(**checkpoint["model_args"]))
    except TypeError as e:
        raise UserError(f"checkpoint {path} has an unknown architecture ({e}): it is damaged or from another "
                        f"program") from None
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()
        reason = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else (first or [""])[0]
        raise UserError(f"checkpoint {path} does not match its own architecture ({reason}): it is damaged; "
                        f"use another checkpoint of the run") from None
    return model


# -----------------------------------------------------------------------------
# The names in a run directory

BEST_CHECKPOINT = "best_val_loss.pt"
CHECKPOINT_NAME = re.compile(r"iter-(\d+)-(?:loss-(?:\d+\.\d{4}|nan|inf)|stopped)\.pt")


def checkpoint_name(step, val_loss=None):
    """iter-{step}-loss-{val_loss}.pt after an evaluation, iter-{step}-stopped.pt without one."""
    return f"iter-{step}-stopped.pt" if val_loss is None else f"iter-{step}-loss-{val_loss:.4f}.pt"


def run_checkpoints(out_dir):
    """out_dir's checkpoints named by the trainer, oldest first. At the same step a stopped run's checkpoint
    comes before the evaluated one that the resumed run writes there. Other files are never considered."""
    def age(path):
        return int(CHECKPOINT_NAME.fullmatch(path.name)[1]), not path.name.endswith("-stopped.pt")
    directory = Path(out_dir)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.is_file()), key=age)


def latest_checkpoint(out_dir):
    checkpoints = run_checkpoints(out_dir)
    if not checkpoints:
        raise UserError(f"--init_from resume: no iter-*.pt checkpoint in {out_dir}; "
                        f"start with --init_from scratch or pass a checkpoint path")
    return checkpoints[-1]


def prune_checkpoints(out_dir, keep_last):
    """Delete all but the newest keep_last checkpoints. Called only after the newest is safely on disk;
    best_val_loss.pt is a copy of its own, so it survives its iter file."""
    if keep_last > 0:
        for path in run_checkpoints(out_dir)[:-keep_last]:
            path.unlink(missing_ok=True)


def save_best(source, out_dir):
    """best_val_loss.pt as a copy of the checkpoint just written, swapped in atomically. A copy, not a hard
    link: a link shares its bytes, so damage to one file (a truncation, an editor) would damage both."""
    def copy(f):
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f, 16 * 2**20)
    atomic_write(Path(out_dir) / BEST_CHECKPOINT, copy)


# -----------------------------------------------------------------------------
# --init_from: any value to a model


def checkpoint_path(init_from, out_dir):
    """The checkpoint file that --init_from names: `resume` is the latest in out_dir."""
    return latest_checkpoint(out_dir) if init_from == "resume" else Path(init_from)


def load_start(init_from, out_dir="."):
    """(model, checkpoint) for --init_from: a checkpoint of this trainer (a path, or `resume` for the latest
    in out_dir) or GPT-2 weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl, a transformers folder), the model
    on the CPU in eval mode. checkpoint is the file's dict without the weights (they are in the model), with
    its path under "path"; None for GPT-2 weights. Training, evaluation, sampling, export and hellaswag.py
    all load their models here (through load_model where only the model is wanted)."""
    if init_from != "resume" and is_hf_model(init_from):
        return GPT.from_pretrained(init_from).eval(), None
    path = checkpoint_path(init_from, out_dir)
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint, path)
    del checkpoint["model"]  # the model holds the weights now: one copy in memory, not two
    checkpoint["path"] = path
    return model.eval(), checkpoint


def load_model(init_from, device="cpu", out_dir="."):
    """The model alone, for sampling, scoring and export, in eval mode on device."""
    return load_start(init_from, out_dir)[0].to(device)
