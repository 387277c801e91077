"""
A training run's settings: TrainSettings, the fields of train_gpt2.py's flags but the model's shape
and the optimizers' own (train_gpt2.TrainConfig adds GPTConfig's and optimizers.py's), checked once
before any work, and the rules by which a run that starts from a checkpoint takes its own settings
back.

    config, explicit = parse_config(TrainConfig, ["--max_iters", "400"])  # explicit: the flags given
    config, changes = run_config(config, explicit, checkpoint)           # resumed: the checkpoint's

config.json in a run directory is a TrainConfig written out (with --auto_batch, and the micro-batch
chosen), and every checkpoint's "config" is one.
"""

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path


from cli import INT64, UserError, build_parser, flag, parse_flags, parse_int, parse_text
from device import available_memory, check_dtype

# -----------------------------------------------------------------------------
# The flags

MAX_DDP_TIMEOUT = 24 * 3600
MAX_SAMPLES = 64
MAX_SPIKE_WINDOW = 10_000
SAMPLE_PROMPT = "Hello, I'm a language model,"


@dataclass
class TrainSettings:
    # data and files
    data: str = flag("edu_fineweb10B", "directory of token shards (made by fineweb.py), or a text "
                                       "file such as input.txt, tokenized on the fly and split "
                                       "90/10 into train/val", path=True)
    tokenizer: str = flag("gpt2", "a new run's tokenizer: gpt2 (GPT-2's), a tiktoken ranks file or a "
                                  "tokenizers JSON file; --data's shards must be of it, --vocab_size follows "
                                  "it; a model's (a checkpoint's, a transformers folder's) is its own, which "
                                  "one given must be", path=True)
    out_dir: str = flag("./out", "where checkpoints, config.json and metrics.jsonl are written",
                        path=True)
    init_from: str = flag("scratch", "'scratch', 'resume' (the latest checkpoint in out_dir), a "
                                     "checkpoint path, or GPT-2 weights to fine-tune: gpt2, "
                                     "gpt2-medium, gpt2-large, gpt2-xl or a transformers folder "
                                     "(save_pretrained)", path=True)
    export_hf: str = flag("", "write the --init_from model to this folder in transformers' GPT-2 "
                              "format and exit", path=True)
    plot: bool = flag(False, "redraw out_dir/plot.png (losses, HellaSwag) at every evaluation; "
                             "needs matplotlib")
    tensorboard: bool = flag(False, "also write metrics.jsonl's figures to out_dir/tensorboard/, "
                                    "for `tensorboard --logdir`; needs tensorboard")
    wandb_log: bool = flag(False, "also send metrics.jsonl's figures and the config to Weights & "
                                  "Biases (its files in out_dir/wandb/; WANDB_MODE=offline keeps "
                                  "them there); needs wandb")
    wandb_project: str = flag("gpt2-pretrain", "the wandb project of --wandb_log")
    wandb_run_name: str = flag("", "the wandb run's name ('': out_dir's folder name)")
    # batch: tokens per optimizer step = batch_size * gradient_accumulation_steps * world_size *
    # block_size
    batch_size: int = flag(8, "sequences per micro-step, per process")
    gradient_accumulation_steps: int = flag(5, "micro-steps per optimizer step, per process")
    # optimizer and schedule
    optimizer: str = flag("adamw", "'adamw': AdamW for every parameter; 'muon': Muon for the blocks' "
                                   "matrices and AdamW for the rest (torch 2.9 or later); "
                                   "'adafactor': torch's Adafactor for every parameter (torch 2.5 "
                                   "or later); each one's own flags are in optimizers.py")
    reset_optimizer: bool = flag(False, "resuming: start the optimizer's state afresh instead of "
                                        "restoring it (to change --optimizer)")
    learning_rate: float = flag(6e-4, "peak learning rate, reached at the end of warmup")
    min_lr: float = flag(6e-5, "learning rate at the end of the cosine decay and after it")
    warmup_iters: int = flag(2000, "steps of linear warmup")
    lr_decay_iters: int = flag(600000, "step at which the cosine decay reaches min_lr")
    max_iters: int = flag(600000, "optimizer steps in the whole run")
    weight_decay: float = flag(0.1, "AdamW weight decay, applied to 2-D weights only")
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0 turns clipping off)")
    # evaluation and logging
    target_val_loss: float = flag(0.0, "report the first evaluation at or below this val loss: its "
                                       "step, tokens and training seconds (0: none)")
    stop_at_target: bool = flag(False, "end the run at the evaluation that reaches "
                                       "--target_val_loss, with its checkpoint")
    eval_interval: int = flag(2000, "evaluate, sample and checkpoint every this many steps")
    eval_iters: int = flag(200, "validation batches (of batch_size sequences) per evaluation")
    eval_only: bool = flag(False, "evaluate the checkpoint given by --init_from and exit")
    hellaswag: bool = flag(True, "score zero-shot HellaSwag at every evaluation (downloaded on "
                                 "first use)")
    hellaswag_examples: int = flag(0, "score only the first N HellaSwag examples (0: all 10,042 of "
                                      "val)")
    hellaswag_data: str = flag("val", "the HellaSwag split to download, or a local jsonl file in "
                                      "its format", path=True)
    sample_prompt: str = flag(SAMPLE_PROMPT, "the prompt of the samples printed at each "
                                             "evaluation; empty starts a new document")
    num_samples: int = flag(4, "samples printed at each evaluation, 32 tokens each (0: none; at "
                               f"most {MAX_SAMPLES})")
    log_interval: int = flag(10, "print and record training figures every this many steps")
    keep_last: int = flag(3, "keep only the newest N iter-*.pt checkpoints, and best_val_loss.pt "
                             "(0 keeps all)")
    max_bad_steps: int = flag(3, "stop after this many consecutive steps with a non-finite loss or "
                                 "gradient (loss spikes: back to the last checkpoint)")
    ddp_timeout: int = flag(600, "seconds a rank waits in a collective for the others before "
                                 "giving up")
    backend: str = flag("auto", "torch.distributed backend: 'auto' (nccl on GPUs, gloo on the "
                                "CPU), 'nccl', or 'gloo' (on GPUs it lets several processes share "
                                "one, to try torchrun on one GPU)")
    fsdp: bool = flag(False, "shard the weights, gradients and AdamW state over the processes with "
                             "FSDP2 instead of keeping a full copy on each (DDP), for models past "
                             "one GPU's memory; with one process, a process group of one")
    # system
    device: str = flag("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', "
                               "'mps'")
    dtype: str = flag("auto", "'auto' (bfloat16 on GPUs that have it, else float16 with a "
                              "GradScaler; on the CPU bfloat16 where it has bf16 instructions, "
                              "else float32), 'bfloat16', 'float16' or 'float32'")
    compile: bool = flag(True, "torch.compile the model")
    loss_kernel: bool = flag(True, "on CUDA, the loss's softmax and its gradient in one Triton "
                                   "kernel (cross_entropy_kernel.py); False: plain torch, compiled "
                                   "with the model")
    gradient_checkpointing: bool = flag(False, "recompute each block's activations in the backward "
                                               "pass")
    shuffle: bool = flag(True, "read each shard's windows of block_size + 1 tokens in a seeded "
                               "random order, new every epoch (False: front to back, as "
                               "build-nanogpt); a resumed run reads the way its checkpoint's run "
                               "did")
    seed: int = flag(1337, "seeds the initialization, the shard and window order and the samples")
    # runs that look after themselves
    auto_batch: bool = flag(False, "train with the largest micro-batch that divides this process's "
                                   "sequences per step and fits the GPU's memory, found by trying "
                                   "(the tokens per step stay the flags'); on a CPU, MPS or under "
                                   "--fsdp the flags as given")
    max_time: str = flag("", "this launch's wall-clock budget, in hours (1.5) or HH:MM:SS: before "
                             "the next step would pass it, save a checkpoint and exit with status "
                             "75 (resumable); '': none")
    spike_guard: float = flag(0.0, "skip a step whose loss is more than this many robust "
                                   "deviations above the median of the last --spike_window steps, "
                                   "and after --max_bad_steps in a row go back to the last "
                                   "checkpoint, skipping the batches since (0: off)")
    spike_window: int = flag(100, "the steps whose losses --spike_guard compares a step with")
    profile_steps: str = flag("", "A:B: a torch.profiler trace of steps A to B - 1 into "
                                  "out_dir/profile/ (TensorBoard's and Chrome's format) and a "
                                  "table of the top kernels at the end; '': none")

    def validate(self, host=True):
        """Raise UserError naming the problem and the fix; called before any work is done. host: also
        that a step's batch fits this machine's memory (not asked of a checkpoint's own flags)."""
        check_types(self)
        positive = ["batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                    "log_interval", "lr_decay_iters", "max_bad_steps", "ddp_timeout"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        for name in ["max_iters", "warmup_iters", "keep_last", "hellaswag_examples", "num_samples"]:
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.min_lr < 0 or self.min_lr > self.learning_rate:
            raise UserError(f"learning rates must satisfy 0 <= --min_lr <= --learning_rate and "
                            f"--learning_rate > 0, got --learning_rate {self.learning_rate} "
                            f"--min_lr {self.min_lr}")
        if self.lr_decay_iters < self.warmup_iters:
            raise UserError(f"--lr_decay_iters {self.lr_decay_iters} is less than --warmup_iters "
                            f"{self.warmup_iters}: the decay must end after the warmup")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError("--weight_decay and --grad_clip must be 0 or more")
        if self.target_val_loss < 0 or (self.stop_at_target and not self.target_val_loss):
            raise UserError("--target_val_loss must be 0 (none) or more, and --stop_at_target True "
                            "needs one")
        check_dtype(self.dtype)
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be from 0 to 2**63 - 1, got {self.seed}")
        if self.ddp_timeout > MAX_DDP_TIMEOUT:
            raise UserError(f"--ddp_timeout {self.ddp_timeout} is more than a day "
                            f"({MAX_DDP_TIMEOUT} s): a rank that waits that long has died; pass at "
                            f"most {MAX_DDP_TIMEOUT}")
        if self.num_samples > MAX_SAMPLES:
            raise UserError(f"--num_samples {self.num_samples} is more than {MAX_SAMPLES}: the "
                            "samples are drawn as one batch at every evaluation; for many "
                            "samples, use sample.py")
        if host:
            check_batch_fits_host(self)
        if self.backend not in ("auto", "nccl", "gloo"):
            raise UserError(f"--backend {self.backend!r} is not one of auto, nccl, gloo")
        if self.eval_only and self.init_from == "scratch":
            raise UserError("--eval_only True needs a checkpoint: pass --init_from resume or "
                            "--init_from PATH")
        if self.export_hf and self.init_from == "scratch":
            raise UserError("--export_hf needs a model to export: pass --init_from CHECKPOINT (or "
                            "resume, gpt2, ...)")
        if self.wandb_log and not self.wandb_project:
            raise UserError("--wandb_log True needs a project: pass --wandb_project NAME")
        if self.spike_guard < 0 or not 10 <= self.spike_window <= MAX_SPIKE_WINDOW:
            raise UserError(f"--spike_guard must be 0 or more and --spike_window from 10 to "
                            f"{MAX_SPIKE_WINDOW} (each step takes the median of that many losses), "
                            f"got {self.spike_guard} and {self.spike_window}")
        parse_duration(self.max_time)
        parse_step_range(self.profile_steps)


def parse_duration(text):
    """--max_time in seconds: hours ("1.5") or HH:MM:SS ("01:30:00"); None for ""."""
    if not text:
        return None
    try:
        if ":" in text:
            hours, minutes, seconds = (float(part) for part in text.split(":"))
            if not (0 <= minutes < 60 and 0 <= seconds < 60):
                raise ValueError
            total = 3600 * hours + 60 * minutes + seconds
        else:
            total = 3600 * float(text)
    except ValueError:
        total = None
    if total is None or not math.isfinite(total) or total <= 0:
        raise UserError(f"--max_time {text!r} is not a time: pass hours (1.5) or HH:MM:SS "
                        "(01:30:00)")
    return total


def parse_step_range(text):
    """--profile_steps as (first, end), the steps first to end - 1; None for ""."""
    if not text:
        return None
    first, _, end = text.partition(":")
    try:  # as an integer flag is read: a superscript or a step past 2**63 is no step
        first, end = parse_int(first), parse_int(end)
    except argparse.ArgumentTypeError:
        first = end = None
    if first is None or not 0 <= first < end:
        raise UserError(f"--profile_steps {text!r} is not A:B with 0 <= A < B: pass, say, 10:15")
    return first, end


def check_types(config):
    """Each field of its declared type, every float finite, every string one that a flag takes (no
    NUL character: cli.parse_text), and no path flag empty (flag(path=True)) unless empty is its
    default: '' would silently be the current directory, or nothing at all. A config read from a
    checkpoint, or built in code, is held to what the command line's parser guarantees."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        kinds = (int, float) if field.type is float else (field.type,)
        if isinstance(value, bool) != (field.type is bool) or not isinstance(value, kinds):
            raise UserError(f"--{field.name} must be {field.type.__name__}, got {value!r}")
        if field.type is int and not -INT64 <= value < INT64:
            raise UserError(f"--{field.name} {value} is past the largest integer a flag takes (2**63 - 1)")
        if field.type is float and not math.isfinite(value):
            raise UserError(f"--{field.name} must be a finite number, got {value!r}")
        if field.type is str:
            try:
                parse_text(value)
            except argparse.ArgumentTypeError as e:
                raise UserError(f"--{field.name} {e}") from None
        if field.metadata.get("path") and field.default and not value:
            raise UserError(f"--{field.name} is empty: give it a value ('.' for the current "
                            "directory)")


def check_batch_fits_host(config):
    """Refuse a step's batch that the host cannot hold: the loader reads a whole optimizer step's
    inputs and targets (int64, and a copy being prefetched) before the first micro-step runs."""
    sequences = config.batch_size * config.gradient_accumulation_steps
    step_bytes = 4 * 8 * sequences * (config.block_size + 1)
    free = available_memory("cpu")
    if free is not None and step_bytes > free / 2:
        raise UserError(f"one step's batch ({config.batch_size} x "
                        f"{config.gradient_accumulation_steps} x {config.block_size} tokens) takes "
                        f"{step_bytes / 2**30:,.1f} GiB of host memory, more than half the "
                        f"{free / 2**30:,.1f} GiB available: lower --batch_size or "
                        "--gradient_accumulation_steps")


def parse_config(config_class, argv=None):
    """The config (a config_class: train_gpt2.TrainConfig), and the names of the flags given
    explicitly: on the command line or in its --config file."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(config_class, "Pre-train GPT-2: the sharded loader, the cosine LR "
                                        "schedule, the DDP or FSDP loop.", config_file=True)
    args, explicit = parse_flags(parser, argv)
    config = config_class(**vars(args))
    check_types(config)  # before --init_from or --out_dir is read (validate checks them again)
    return config, explicit


# -----------------------------------------------------------------------------
# A run from a checkpoint: its own settings, with the command line's on top

# what a command asks for, not what the run is: never taken from the checkpoint
COMMAND_FLAGS = ("init_from", "eval_only", "export_hf", "backend", "max_time", "profile_steps",
                 "reset_optimizer")


def run_config(flags, explicit, checkpoint):
    """The config of a run that starts from a checkpoint: every flag at the checkpoint's value
    unless given on the command line, and out_dir the checkpoint's folder unless given. Returns
    (config, changes), changes being one line for each flag given whose value differs from the
    run's. The checkpoint's own flags are checked as the command line's are: a bad one is a damaged
    checkpoint."""
    config_class = type(flags)
    path, fields = checkpoint["path"], {f.name for f in dataclasses.fields(config_class)}
    # a flag the checkpoint lacks had its default then: the whole config from here on
    saved = checkpoint["config"] = {**dataclasses.asdict(config_class()), **checkpoint["config"]}
    values = {name: value for name, value in saved.items()
              if name in fields and name not in COMMAND_FLAGS}
    try:
        config_class(**values).validate(host=False)
    except (TypeError, UserError) as e:
        raise UserError(f"checkpoint {path} holds a malformed config ({e}): it is damaged; use "
                        "another checkpoint of the run") from None
    values.update({name: getattr(flags, name) for name in fields
                   if name in explicit or name in COMMAND_FLAGS})
    if "out_dir" not in explicit:
        values["out_dir"] = str(Path(path).parent)
    if "shuffle" in explicit and flags.shuffle != saved["shuffle"]:
        mode = "shuffled" if saved["shuffle"] else "sequentially"
        raise UserError(f"the run of {path} reads its data {mode}: --shuffle {flags.shuffle} "
                        "cannot change that on resume; start a new run")
    if "seed" in explicit and flags.seed != saved["seed"]:
        # its loader reads on in the order of its own seed, which made its weights too: a new seed
        # would change the samples alone, and look as if it changed the data order
        raise UserError(f"the run of {path} is seeded with {saved['seed']} (its initialization and "
                        f"data order): --seed {flags.seed} cannot change that on resume; drop "
                        "--seed, or start a new run")
    config = with_absolute_paths(config_class(**values))
    changes = [f"--{name}: {saved[name]} -> {getattr(config, name)} (command line)"
               for name in sorted(explicit)
               if name in saved and name not in COMMAND_FLAGS + ("out_dir",)
               and saved[name] != getattr(config, name)]
    return config, changes


def with_absolute_paths(config):
    """The config with --data (and a --hellaswag_data or --tokenizer file) as absolute paths where they
    exist, so that a resume or an --eval_only run from another working directory finds the run's data."""
    data = str(Path(config.data).resolve()) if Path(config.data).exists() else config.data
    hellaswag_data, tokenizer = config.hellaswag_data, config.tokenizer
    if Path(hellaswag_data).is_file():
        hellaswag_data = str(Path(hellaswag_data).resolve())
    if tokenizer != "gpt2" and Path(tokenizer).is_file():  # gpt2 is GPT-2's, whatever files are here
        tokenizer = str(Path(tokenizer).resolve())
    return dataclasses.replace(config, data=data, hellaswag_data=hellaswag_data, tokenizer=tokenizer)


def same_path(a, b):
    """Whether two --data values name the same file or folder (one of them relative, say)."""
    return a == b or Path(a).resolve() == Path(b).resolve()


def check_architecture(explicit, config, model_args):
    """An architecture flag given explicitly must agree with the architecture of the weights loaded
    (model_args: their GPTConfig as a dict)."""
    for name in model_args:
        if name in explicit and model_args[name] != getattr(config, name):
            raise UserError("the checkpoint is of another architecture: it has "
                            f"{name}={model_args[name]} but --{name} {getattr(config, name)} was "
                            "given; drop the flag or pass another checkpoint")


def resume_warnings(saved, config, saved_world_size, world_size):
    """What a change of batch shape or data on resume costs, and steps added past the decay's end,
    one warning each."""
    before, now = saved, dataclasses.asdict(config)
    sequences = lambda c, w: c["batch_size"] * c["gradient_accumulation_steps"] * w  # a step's
    warnings = []
    if sequences(before, saved_world_size) != sequences(now, world_size):
        warnings.append("warning: the global batch changes from "
                        f"{sequences(before, saved_world_size)} to {sequences(now, world_size)} "
                        "sequences per step: from here on the data order is not an uninterrupted "
                        "run's, so the resume is not exact")
    if (before["batch_size"], before["eval_iters"]) != (config.batch_size, config.eval_iters):
        warnings.append("warning: --batch_size or --eval_iters changes the val batches: val losses "
                        "from here on do not compare exactly with the ones before")
    if not same_path(before["data"], config.data):
        warnings.append(f"warning: --data changes from {before['data']} to {config.data}: training "
                        "goes on with the new data from its first batch, and the val batches "
                        "change")
    if config.max_iters > max(before["max_iters"], config.lr_decay_iters):
        # the schedule is the run's: its decay ended, and the steps added past it stay at min_lr
        first = max(before["max_iters"], config.lr_decay_iters)
        warnings.append(f"warning: --max_iters {config.max_iters} runs past --lr_decay_iters "
                        f"{config.lr_decay_iters}, where the cosine decay ends: steps {first:,} to "
                        f"{config.max_iters - 1:,} train at --min_lr {config.min_lr:g}; to decay "
                        f"over them, pass --lr_decay_iters {config.max_iters} too")
    return warnings
