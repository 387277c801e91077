"""
The one owner of the checkpoint format: what a checkpoint holds, how it is written, read, checked and
upgraded, the model it describes built and checked against its weights (the model class handed in), and
the names of the checkpoints in a run directory. Nothing here imports the model.

    checkpoint = make_checkpoint(parts, model_args=..., config=..., ...)  # each part's state_dict()
    save_checkpoint("out/iter-10-loss-5.0000.pt", checkpoint)
    checkpoint = load_checkpoint("out/iter-10-loss-5.0000.pt")  # every field checked; versions 1, 2 upgraded
    restore(checkpoint, parts)                                  # each part's load_state_dict()

A checkpoint is one file written by torch.save, readable with a bare torch.load(weights_only=True): a dict of
the parts' states under PARTS (the model, the optimizer, the GradScaler, the loader, the RNG, the run's
counters, the spike guard's state and the val data's fingerprints: {} in files from before they were kept) and
what the run is under ABOUT
(the format version, the architecture, the whole config, the number
of processes and the micro-batch they trained with, the torch version and git commit, the val loss it
was saved after, and the tokenizer: its sha256, and its file's content where it is not GPT-2's; None in
files from before it was kept, which were all GPT-2's). The model and optimizer
states are those one process's state_dict() gives, whatever wrote them (one process, DDP or FSDP), so any
checkpoint resumes under any of them. In a run directory the trainer names its checkpoints
iter-{step}-loss-{val loss}.pt and iter-{step}-stopped.pt, keeps a copy of the best as best_val_loss.pt, and
reads, prunes and resumes from files of exactly those names.
"""

import dataclasses
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from cli import UserError, atomic_write

# -----------------------------------------------------------------------------
# What a checkpoint holds

CHECKPOINT_VERSION = 3
PARTS = ("model", "optimizer", "scaler", "loader", "rng", "progress", "spike_guard", "val_data")
ABOUT = ("version", "model_args", "config", "world_size", "micro_batch", "torch_version", "git_commit",
         "val_loss", "tokenizer")


@dataclass
class Progress:
    """The counters a run carries from step to step."""
    iter_num: int = 0  # optimizer steps taken
    tokens: int = 0  # tokens trained on, across any change of batch
    best_val_loss: float = math.inf  # the lowest val loss of a checkpointed evaluation
    best_step: Optional[int] = None  # the step whose checkpoint holds the best weights
    skipped_steps: int = 0  # steps not applied (a non-finite loss, a loss spike)
    wandb_run_id: Optional[str] = None  # so that a resumed run continues its wandb run
    train_seconds: float = 0.0  # time in training steps, evaluations and checkpoints excluded
    target: Optional[dict] = None  # the first evaluation at or below --target_val_loss: its figures

    def state_dict(self):
        return dataclasses.asdict(self)

    def load_state_dict(self, state):
        for name, value in state.items():
            setattr(self, name, value)


class RNGState:
    """torch's random state, and each GPU's."""

    def state_dict(self):
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_state_dict(self, state):
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available() and state["cuda"]:
            torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])  # resumed on fewer GPUs


def git_commit():
    """The short commit of the code running, for ABOUT; None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def make_checkpoint(parts, **about):
    """The checkpoint of parts ({name in PARTS: an object with state_dict()}) and about (the ABOUT fields but the
    version). Every rank calls it: under FSDP the model's and optimizer's parts gather from all of them."""
    return {"version": CHECKPOINT_VERSION, **about, **{name: part.state_dict() for name, part in parts.items()}}


def restore(checkpoint, parts):
    """Each part's load_state_dict() from the checkpoint. A part that had nothing to save (the GradScaler of a
    run without float16) starts fresh. A state that the part refuses is a damaged checkpoint."""
    for name, part in parts.items():
        if checkpoint[name] == {}:
            continue
        try:
            part.load_state_dict(checkpoint[name])
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
            raise malformed(checkpoint.get("path"), f"{name}: {type(e).__name__}: "
                                                    f"{(str(e).splitlines() or [''])[0]}") from None


def malformed(path, reason):
    return UserError(f"checkpoint {path} holds a malformed training state ({reason}): it is damaged; use another "
                     f"checkpoint of the run")


# -----------------------------------------------------------------------------
# Under FSDP: the model's and optimizer's states as one process holds them


class FullModelState:
    """The model's state_dict() as one process gives it. Under FSDP gathered from every rank's shards into rank
    0's CPU memory, one tensor at a time (a collective: the other ranks get an empty dict)."""

    def __init__(self, model, sharded):
        self.model, self.sharded = model, sharded

    def state_dict(self):
        if not self.sharded:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # gathered one name at a time, a tied weight comes back as copies: one tensor under all its names
        # again, as model.state_dict() gives it (and torch.save stores it once)
        first_name = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if state:
                state[name] = state[first_name.setdefault(id(param), name)]
        return state

    def load_state_dict(self, state):
        """The weights from a state of one process's form; under FSDP each rank keeps its shard."""
        if not self.sharded:
            self.model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))


class OptimizerStates:
    """The run's optimizers' states, {name: one optimizer's state}, as optimizers.OPTIMIZERS names them.
    Loading takes from a checkpoint the optimizers' moments alone, checked against the state each
    optimizer keeps for this model (expected: a function giving {name: its state_dict() after a step},
    train_gpt2.expected_optimizer_states); every hyper-parameter (learning rate, weight decay, betas)
    stays the run's config's."""

    def __init__(self, model, optimizers, sharded, expected):
        self.parts = {name: FullOptimizerState(model, optimizer, sharded)
                      for name, optimizer in optimizers.items()}
        self.expected = expected

    def state_dict(self):
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state):
        if set(state) != set(self.parts):
            raise UserError(f"the checkpoint's optimizer is {' + '.join(state)}, this run's "
                            f"{' + '.join(self.parts)}: resume with --optimizer as the run had it, or "
                            "pass --reset_optimizer True to start the optimizer's state afresh")
        expected = self.expected()
        for name, part in self.parts.items():
            part.load_state_dict(state[name], expected[name]["state"])


class FullOptimizerState:
    """An optimizer's state_dict() as one process gives it, keyed by position in the param groups. Under FSDP
    gathered as FullModelState is, and loaded by every rank cutting its own shard of it."""

    def __init__(self, model, optimizer, sharded):
        self.model, self.optimizer, self.sharded = model, optimizer, sharded

    def state_dict(self):
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        return optimizer_state_by_index(state) if state else {}

    def load_state_dict(self, state, expected):
        """The saved moments, checked to be those this optimizer keeps (expected: its state after a step on
        this model; a missing moment fails at the first step, a wrong shape crashes the fused step natively),
        under the param groups this run made."""
        name_of = {id(param): name for name, param in self.model.named_parameters()}
        names = [name_of[id(param)] for group in self.optimizer.param_groups for param in group["params"]]
        check_optimizer_state(state["state"], expected, names)
        state = {"state": state["state"], "param_groups": self.optimizer.state_dict()["param_groups"]}
        if not self.sharded:
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state_by_name(state, names),
                                 options=StateDictOptions(full_state_dict=True))


def check_optimizer_state(state, expected, names):
    """Refuse (ValueError) a saved state that is not the one this optimizer keeps for these parameters
    (expected: its state after a step, built on the meta device): every parameter's state, each with the
    same tensors of the same shapes (a step count and moments, say). names[i]: parameter i's name."""
    for index in state:
        if index not in expected:
            raise ValueError(f"state of parameter {index!r}, of {len(names)} parameters")
    for index, keeps in expected.items():
        what = f"parameter {index} ({names[index]})"
        values = state.get(index)
        if not isinstance(values, dict) or set(values) != set(keeps):
            holds = ("no state" if index not in state else
                     f"state {sorted(values) if isinstance(values, dict) else type(values).__name__}")
            raise ValueError(f"{what} has {holds} where this optimizer keeps {', '.join(sorted(keeps))}; "
                             "--reset_optimizer True starts the optimizer afresh")
        for key, value in values.items():
            ref = keeps[key]
            if not isinstance(ref, torch.Tensor):
                if type(value) is not type(ref):
                    raise ValueError(f"{what}'s {key} is a {type(value).__name__}, not a {type(ref).__name__}")
            elif not isinstance(value, torch.Tensor):
                raise ValueError(f"{what}'s {key} is a {type(value).__name__}, not a tensor")
            elif value.shape != ref.shape or value.is_floating_point() != ref.is_floating_point():
                raise ValueError(f"{what}'s {key} is {value.dtype} {tuple(value.shape)}, this optimizer's "
                                 f"{ref.dtype} {tuple(ref.shape)}")


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


# -----------------------------------------------------------------------------
# The file: written whole, read with every field checked, versions 1 and 2 upgraded


def save_checkpoint(path, checkpoint):
    """torch.save into path, atomically. torch's zip writer turns a failed write (a full disk) into a
    RuntimeError, and so a KeyboardInterrupt in the middle of it: they are given back as what they were."""
    checkpoint = {key: value for key, value in checkpoint.items() if key != "path"}  # where it was read from
    try:
        atomic_write(path, lambda f: torch.save(checkpoint, f))
    except RuntimeError as e:
        if isinstance(e.__context__, (OSError, KeyboardInterrupt)):
            raise e.__context__ from None
        raise OSError(f"torch.save failed: {(str(e).splitlines() or [''])[0]}") from None


def load_checkpoint(path):
    """The checkpoint at path, with its "path"; every field checked, a version 1 or 2 file upgraded (version
    2 held the state of its one optimizer, AdamW, where version 3 holds {optimizer name: its state})."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: pass an existing file to --init_from")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}): "
                        f"use another one, such as an earlier iter-*.pt of the same run") from None
    if not isinstance(checkpoint, dict) or not {"version", "model", "model_args", "config"} <= set(checkpoint):
        raise UserError(f"{path} is not a checkpoint of this trainer: pass a file written by train_gpt2.py")
    if checkpoint["version"] == 1:
        checkpoint = upgrade_version_1(checkpoint, path)
    if checkpoint["version"] == 2:
        progress = checkpoint.get("progress")
        if isinstance(progress, dict):  # the counters added since, which count from here on
            progress = {**Progress().state_dict(), **progress}
        checkpoint = {**checkpoint, "version": 3, "optimizer": {"adamw": checkpoint.get("optimizer")},
                      "progress": progress}
    if checkpoint["version"] != CHECKPOINT_VERSION:
        raise UserError(f"checkpoint {path} has format version {checkpoint['version']!r}, this code reads "
                        f"{CHECKPOINT_VERSION} (and 1, 2)")
    checkpoint.setdefault("spike_guard", {})  # a file from before it was kept: an empty guard
    checkpoint.setdefault("tokenizer", None)  # likewise: GPT-2's (fineweb.checkpoint_tokenizer)
    checkpoint.setdefault("val_data", {})  # nor the val data's fingerprints: the val data is not checked
    check_fields(checkpoint, path)
    checkpoint["path"] = path
    return checkpoint


def upgrade_version_1(checkpoint, path):
    """A version 1 checkpoint in version 2's form. Version 1 kept the counters at the top level, and files
    from before a field existed lack it: tokens (every step had the last global batch), skipped_steps,
    wandb_run_id, world_size, the loader's shuffle (it read sequentially) and fingerprints; the micro-batch
    was always the flags'."""
    c = dict(checkpoint)
    missing = [key for key in ("iter_num", "best_val_loss", "loader", "optimizer", "scaler", "rng") if key not in c]
    if missing or not isinstance(c["config"], dict) or not isinstance(c["loader"], dict):
        raise malformed(path, f"version 1 without {', '.join(missing) or 'a config or loader'}")
    world_size, config, model_args = c.get("world_size", 1), c["config"], c.get("model_args")
    block_size = model_args.get("block_size") if isinstance(model_args, dict) else None
    sizes = {"batch_size": config.get("batch_size"), "gradient_accumulation_steps":
             config.get("gradient_accumulation_steps"), "world_size": world_size, "block_size": block_size}
    # counts before they multiply: a list times a count is a list of that length, and can fill the memory
    for name, value in (*sizes.items(), ("iter_num", c["iter_num"])):
        if not is_int(value, 0 if name == "iter_num" else 1):
            raise malformed(path, f"version 1 {name} {str(value)[:40]} is not a count")
    tokens_per_step = math.prod(sizes.values())
    tokens = c.get("tokens", c["iter_num"] * tokens_per_step)
    c["progress"] = {"iter_num": c.pop("iter_num"), "tokens": tokens, "best_val_loss": c.pop("best_val_loss"),
                     "best_step": None, "skipped_steps": c.pop("skipped_steps", 0),
                     "wandb_run_id": c.pop("wandb_run_id", None)}
    c.pop("tokens", None)
    c["loader"] = {"shuffle": False, "fingerprints": None, **c["loader"]}
    c["config"] = {"shuffle": False, **config}
    micro_batch = [config["batch_size"], config["gradient_accumulation_steps"]]
    for key, value in (("world_size", world_size), ("micro_batch", micro_batch), ("torch_version", None),
                       ("git_commit", None), ("val_loss", None)):
        c.setdefault(key, value)
    c["version"] = 2
    return c


def is_int(value, low=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_target_record(record, iter_num):
    """Whether record is what the trainer keeps of the first evaluation at or below --target_val_loss
    (Progress.target): the target, its val loss, step (not past the checkpoint's), tokens and training seconds."""
    return (isinstance(record, dict) and set(record) == {"target_val_loss", "val_loss", "step", "tokens",
                                                         "train_seconds"}
            and all(is_number(record[key]) and math.isfinite(record[key])
                    for key in ("target_val_loss", "val_loss", "train_seconds"))
            and 0 < record["target_val_loss"] and record["val_loss"] <= record["target_val_loss"]
            and record["train_seconds"] >= 0
            and is_int(record["step"]) and record["step"] <= iter_num and is_int(record["tokens"]))


def check_fields(c, path):
    """Every field of a checkpoint of the right type and in range, else the one-line malformed error. The
    config's flags are checked where they become a TrainConfig, the architecture where it becomes a model,
    the tensors where the model and optimizer load them."""
    model_args, loader, progress, rng = c.get("model_args"), c.get("loader"), c.get("progress"), c.get("rng")
    optimizers, guard, tokenizer = c.get("optimizer"), c.get("spike_guard"), c.get("tokenizer")
    val_data, scaler = c.get("val_data"), c.get("scaler")
    fields = {
        "a field": all(key in c for key in PARTS + ABOUT),
        "model": isinstance(c.get("model"), dict) and all(isinstance(v, torch.Tensor) for v in c["model"].values()),
        # the model's own fields are checked by building it (build_checkpoint_model)
        "model_args": isinstance(model_args, dict) and all(isinstance(k, str) for k in model_args),
        "optimizer": isinstance(optimizers, dict) and len(optimizers) > 0
        and all(isinstance(o, dict) and isinstance(o.get("state"), dict) and isinstance(o.get("param_groups"), list)
                for o in optimizers.values()),
        # a GradScaler's (float16): a NaN or 0 scale would skip every step, a negative count never grow it
        "scaler": isinstance(scaler, dict)
        and all(is_number(v) and math.isfinite(v) and v >= 0 for v in scaler.values())
        and scaler.get("scale", 1) > 0,
        "loader": isinstance(loader, dict) and all(is_int(loader.get(k)) for k in ("epoch", "shard", "position"))
        and is_int(loader.get("seed")) and isinstance(loader.get("shuffle"), bool)
        and isinstance(loader.get("shards"), list) and loader["shard"] < max(len(loader["shards"]), 1)
        and all(isinstance(s, (list, tuple)) and len(s) == 2 and isinstance(s[0], str) and is_int(s[1])
                for s in loader["shards"])
        and (loader.get("fingerprints") is None or isinstance(loader["fingerprints"], list)
             and len(loader["fingerprints"]) == len(loader["shards"])
             and all(f is None or isinstance(f, str) for f in loader["fingerprints"])),
        "rng": isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
        and rng["torch"].dtype == torch.uint8 and isinstance(rng.get("cuda"), list)
        and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in rng["cuda"]),
        "progress": isinstance(progress, dict) and set(progress) == {f.name for f in dataclasses.fields(Progress)}
        and is_int(progress["iter_num"]) and is_int(progress["tokens"]) and is_int(progress["skipped_steps"])
        and is_number(progress["best_val_loss"]) and not math.isnan(progress["best_val_loss"])
        and progress["best_val_loss"] >= 0
        and (progress["best_step"] is None or is_int(progress["best_step"])
             and progress["best_step"] <= progress["iter_num"])
        and (progress["wandb_run_id"] is None or isinstance(progress["wandb_run_id"], str))
        and is_number(progress["train_seconds"]) and progress["train_seconds"] >= 0
        and (progress["target"] is None or is_target_record(progress["target"], progress["iter_num"])),
        "config": isinstance(c.get("config"), dict),
        "world_size": is_int(c.get("world_size"), 1),
        "micro_batch": isinstance(c.get("micro_batch"), (list, tuple)) and len(c["micro_batch"]) == 2
        and all(is_int(n, 1) for n in c["micro_batch"]),
        "torch_version": c.get("torch_version") is None or isinstance(c["torch_version"], str),
        "git_commit": c.get("git_commit") is None or isinstance(c["git_commit"], str),
        "val_loss": c.get("val_loss") is None or is_number(c["val_loss"]),
        "spike_guard": guard == {} or isinstance(guard, dict)
        and set(guard) == {"recent", "in_a_row", "bad_steps", "roll_backs", "back_to"}
        and isinstance(guard["recent"], list) and all(is_number(x) and math.isfinite(x) for x in guard["recent"])
        and all(is_int(guard[k]) for k in ("in_a_row", "bad_steps", "roll_backs"))
        and guard["in_a_row"] <= guard["bad_steps"]
        and (guard["back_to"] is None or isinstance(guard["back_to"], str)),
        "tokenizer": tokenizer is None or isinstance(tokenizer, dict)
        and all(isinstance(tokenizer.get(k), str) for k in ("name", "sha256"))
        and (tokenizer.get("content") is None or isinstance(tokenizer["content"], str)),
        "val_data": val_data == {} or isinstance(val_data, dict) and set(val_data) == {"sources", "fingerprints"}
        and isinstance(val_data["sources"], list) and isinstance(val_data["fingerprints"], list)
        and len(val_data["fingerprints"]) == len(val_data["sources"])
        and all(isinstance(s, (list, tuple)) and len(s) == 2 and isinstance(s[0], str) and is_int(s[1])
                for s in val_data["sources"])
        and all(f is None or isinstance(f, str) for f in val_data["fingerprints"]),
    }
    bad = [name for name, ok in fields.items() if not ok]
    if bad:
        raise malformed(path, f"{bad[0]} has a wrong type or value")


# -----------------------------------------------------------------------------
# The model a checkpoint describes: built from its model_args, checked against its weights


def build_checkpoint_model(checkpoint, model_class, config_class):
    """The model_class (train_gpt2.GPT) of a checkpoint's model_args (config_class's fields, GPTConfig's; one
    it lacks, at its default), first built on the meta device, so that weights which do not fit their
    architecture (an n_embd of 10^9, say), and weights or moments that no training writes (unsound_tensor), are
    refused before any memory is taken. A checkpoint whose model is not the one this code builds (a field, or a
    tensor's name or shape, of another version of the model) is refused naming the first difference."""
    path, model_args = checkpoint["path"], checkpoint["model_args"]
    names = {field.name for field in dataclasses.fields(config_class)}
    unknown = [name for name in model_args if name not in names]
    if unknown:
        raise other_model(checkpoint, f"its architecture has {unknown[0]}={model_args[unknown[0]]!r}, a "
                                      "field this code's GPTConfig lacks")
    try:
        model_config = config_class(**model_args)
    except UserError as e:
        raise UserError(f"checkpoint {path} holds an architecture this code's GPTConfig refuses ({e}): it is "
                        "damaged, or of another version of the model; use another checkpoint of the run") from None
    try:
        with torch.device("meta"):
            meta_model = model_class(model_config)
    except RuntimeError as e:  # past what a tensor can hold, even on the meta device
        raise damaged_weights(path, e) from None
    shapes = {name: t.shape for name, t in meta_model.state_dict().items()}
    parameters = [name for name, _ in meta_model.named_parameters(remove_duplicate=False)]
    saved = {name: t.shape for name, t in checkpoint["model"].items()}
    for name in [*shapes, *saved]:  # in the order this code's model holds them, then the checkpoint's others
        if name not in saved:
            raise other_model(checkpoint, f"it lacks {name}, which this code's GPT has")
        if name not in shapes:
            raise other_model(checkpoint, f"it holds {name}, which this code's GPT lacks")
        if saved[name] != shapes[name]:
            raise other_model(checkpoint, f"its {name} is {tuple(saved[name])}, this code's GPT's "
                                          f"{tuple(shapes[name])}")
    unsound = unsound_tensor(checkpoint, parameters)
    if unsound:
        raise malformed(path, unsound)
    return model_class(model_config)


# an optimizer's state entries that count steps or hold second moments, which no step makes negative
NON_NEGATIVE = ("step", "exp_avg_sq", "max_exp_avg_sq")


def unsound_tensor(checkpoint, parameters):
    """The first tensor of a checkpoint's weights (its model tensors named in parameters: the buffers may hold
    anything) or optimizer state that training never writes, as a phrase that names it: one not of a real
    floating-point dtype (integer, bool, complex), one holding NaN or inf (a run whose weights diverged), or a
    step count or second moment below 0. None when every one is sound. The trainer writes no such checkpoint
    (Trainer.save), and build_checkpoint_model refuses one."""
    tensors = [(name, checkpoint["model"][name], False) for name in parameters]
    for optimizer, saved in checkpoint["optimizer"].items():
        for index, values in saved["state"].items():
            for key, value in values.items() if isinstance(values, dict) else ():
                if isinstance(value, torch.Tensor):  # check_optimizer_state refuses the others
                    tensors.append((f"{optimizer}'s {key} of parameter {index}", value, key in NON_NEGATIVE))
    for name, tensor, non_negative in tensors:
        if not tensor.is_floating_point():
            return f"{name} is {tensor.dtype}, not a floating-point tensor"
        if not bool(torch.isfinite(tensor).all()):
            return f"{name} holds {'NaN' if bool(torch.isnan(tensor).any()) else 'inf'}"
        if non_negative and bool((tensor < 0).any()):
            return f"{name} is negative"
    return None


def other_model(checkpoint, difference):
    """The one-line refusal of a checkpoint whose model differs from the one this code builds."""
    commit = checkpoint.get("git_commit")
    code = f"the code of commit {commit} (git checkout {commit})" if commit else "the code that wrote it"
    return UserError(f"checkpoint {checkpoint['path']} is of a model other than this code's GPT ({difference}): "
                     f"load it with {code}, or start a new run")


def damaged_weights(path, reason):
    lines = str(reason).strip().splitlines()
    reason = " ".join(line.strip() for line in lines[1:3]) or (lines or [""])[0]
    return UserError(f"checkpoint {path} does not match its own architecture ({reason}): it is "
                     "damaged; use another checkpoint of the run")


# -----------------------------------------------------------------------------
# The names in a run directory, the best copy and pruning

BEST_CHECKPOINT = "best_val_loss.pt"
# a val loss of nan or inf is no checkpoint's: such a file (written before the trainer refused to save diverged
# weights) is never resumed from, counted by --keep_last or pruned
CHECKPOINT_NAME = re.compile(r"iter-(\d+)-(?:loss-\d+\.\d{4}|stopped)\.pt")


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


def evaluated_checkpoint(out_dir, step):
    """The checkpoint that out_dir holds of the evaluation at step, or None."""
    return next((p for p in run_checkpoints(out_dir) if p.name.startswith(f"iter-{step}-loss-")), None)


def latest_checkpoint(out_dir):
    checkpoints = run_checkpoints(out_dir)
    if not checkpoints:
        raise UserError(f"--init_from resume: no iter-*.pt checkpoint in {out_dir}; "
                        f"start with --init_from scratch or pass a checkpoint path")
    return checkpoints[-1]


def checkpoint_path(init_from, out_dir):
    """The checkpoint file that --init_from names: `resume` is the latest in out_dir."""
    return latest_checkpoint(out_dir) if init_from == "resume" else Path(init_from)


def prune_checkpoints(out_dir, keep_last, keep=()):
    """Delete all but the newest keep_last checkpoints, and never those in keep. Called only after the newest
    is safely on disk and the best weights are in best_val_loss.pt (RunCheckpoints.write). Returns [(path,
    OSError)] for each that could not be deleted (immutable, say): it stays."""
    failed, keep = [], {Path(path).resolve() for path in keep}
    if keep_last > 0:
        for path in run_checkpoints(out_dir)[:-keep_last]:
            if path.resolve() not in keep:
                try:
                    path.unlink(missing_ok=True)
                except OSError as e:
                    failed.append((path, e))
    return failed


def best_copy_holds(out_dir, step):
    """Whether out_dir's best_val_loss.pt is the checkpoint of step (read lazily: its tensors stay on disk)."""
    path = Path(out_dir) / BEST_CHECKPOINT
    if not path.is_file():
        return False
    try:
        best = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        progress = best["progress"] if "progress" in best else {"iter_num": best["iter_num"]}  # version 1
        return progress["iter_num"] == step
    except Exception:  # damaged, or of another format: not the copy
        return False


def save_best(source, out_dir):
    """best_val_loss.pt as a copy of the checkpoint source, swapped in atomically. A copy, not a hard link: a
    link shares its bytes, so damage to one file (a truncation, an editor) would damage both."""
    def copy(f):
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f, 16 * 2**20)
    atomic_write(Path(out_dir) / BEST_CHECKPOINT, copy)


class RunCheckpoints:
    """The checkpoints a run writes into out_dir: each written whole, the best copied to best_val_loss.pt,
    then the oldest pruned to keep_last, so the best weights are never pruned before their copy is written.
    latest: the newest checkpoint written or resumed from. best_pending: the best evaluation's checkpoint
    is not copied yet (just written, or its copy failed: a resumed run writes it first). A checkpoint that
    cannot be pruned is a warning (once), not a stop: it stays, and the run goes on."""

    def __init__(self, out_dir, keep_last):
        self.out_dir, self.keep_last = Path(out_dir), keep_last
        self.latest, self.best_pending = None, False
        self.unprunable = set()

    def write(self, name, checkpoint, best_step, log, keep=None):
        """Write checkpoint as out_dir/name, then the best copy if pending, then prune all but keep (a path
        or None: the checkpoint a run would go back to); log: a print."""
        path = self.out_dir / name
        try:
            save_checkpoint(path, checkpoint)
        except OSError as e:
            raise UserError(f"could not write checkpoint {path} ({e.strerror or e}); the checkpoints already in "
                            f"{self.out_dir} are intact (latest: {self.latest}); free disk space or fix "
                            f"permissions, then continue with --init_from resume") from None
        self.latest = path
        log(f"saved {path}")
        best = evaluated_checkpoint(self.out_dir, best_step) if self.best_pending else None
        if best is not None:
            try:
                save_best(best, self.out_dir)
                self.best_pending = False
            except OSError as e:
                raise UserError(f"wrote {path}, but not its copy {self.out_dir / BEST_CHECKPOINT} "
                                f"({e.strerror or e}): {best.name} holds the best weights and is kept until the "
                                f"copy is written; free disk space, then continue with --init_from resume") from None
        for failed, e in prune_checkpoints(self.out_dir, self.keep_last, keep=[keep] if keep else []):
            if failed not in self.unprunable:
                self.unprunable.add(failed)
                log(f"warning: --keep_last {self.keep_last}: cannot delete {failed} ({e.strerror or e}); it "
                    "stays, and the run goes on")
