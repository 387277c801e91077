"""
Run train_gpt2.py with a fault injected at an exact point, for tests/test_faults.py.

    FAULT=kill_in_save:2 python tests/fault_injection.py <train_gpt2.py flags>

The trainer itself has no test hooks: this wrapper patches its functions, then calls its main(). A test may
also patch them in its own process for a while (`with injected(FAULT): ...`) where the fault does not end the
process. FAULT is NAME:ARG, one of
    kill_at_step:S      SIGKILL this process inside optimizer step S (its update done, not yet recorded)
    kill_in_eval:N      SIGKILL inside the N-th evaluation
    kill_in_save:N      SIGKILL half way through writing the N-th checkpoint
    slow_save:SECONDS   write every checkpoint slowly, so that an outside signal lands mid-write
    slow_steps:SECONDS  sleep in every step, so that an outside signal lands mid-run
    sigterm_at_step:S   send this process SIGTERM inside step S
    nan_steps:S,S,...   the loss is NaN at these steps
    disk_full_at:N      the N-th checkpoint write fails half way with "No space left on device"
    die_at_step:S@R     rank R SIGKILLs itself at step S
    truncate_shard_at_step:S@PATH   cut 1000 bytes off the shard PATH after step S
    budget_clock:SECONDS    --max_time's clock reads SECONDS more after each step, however long it took
"""

import contextlib
import errno
import io
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import checkpoint  # noqa: E402
import guards  # noqa: E402
import train_gpt2  # noqa: E402
from cli import atomic_write  # noqa: E402

counts = {"save": 0, "eval": 0}
current_step = [None]
# everything install() may replace: (owner, attribute name)
PATCHED = [(train_gpt2.Trainer, "train_step"), (train_gpt2.Evaluation, "val_loss"),
           (train_gpt2.GPT, "forward"), (checkpoint, "save_checkpoint"), (train_gpt2, "TimeBudget")]


def kill_self():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def patch_step(after_step):
    original = train_gpt2.Trainer.train_step

    def train_step(self, step):
        current_step[0] = step
        result = original(self, step)
        after_step(step)
        return result
    train_gpt2.Trainer.train_step = train_step


def patch_save(write):
    """write(file, data, n) replaces the write of the n-th checkpoint's bytes (checkpoint.py's
    save_checkpoint, which RunCheckpoints.write looks up in its module)."""
    def save_checkpoint(path, checkpoint):
        counts["save"] += 1
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(path, lambda f: write(f, buffer.getvalue(), counts["save"]))
    checkpoint.save_checkpoint = save_checkpoint


def install(fault):
    name, _, arg = fault.partition(":")
    if name == "kill_at_step":
        patch_step(lambda step: kill_self() if step == int(arg) else None)
    elif name == "kill_in_eval":
        original = train_gpt2.Evaluation.val_loss

        def val_loss(*args, **kwargs):
            counts["eval"] += 1
            if counts["eval"] == int(arg):
                kill_self()
            return original(*args, **kwargs)
        train_gpt2.Evaluation.val_loss = val_loss
    elif name == "kill_in_save":
        def write(f, data, n):
            f.write(data[:len(data) // 2])
            if n == int(arg):
                f.flush()
                kill_self()
            f.write(data[len(data) // 2:])
        patch_save(write)
    elif name == "slow_save":
        def write(f, data, n):
            pieces = 20
            for i in range(pieces):
                f.write(data[i * len(data) // pieces:(i + 1) * len(data) // pieces])
                f.flush()
                time.sleep(float(arg) / pieces)
        patch_save(write)
    elif name == "sigterm_at_step":
        patch_step(lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == int(arg) else None)
    elif name == "slow_steps":
        patch_step(lambda step: time.sleep(float(arg)))
    elif name == "nan_steps":
        bad = {int(s) for s in arg.split(",")}
        original_forward = train_gpt2.GPT.forward

        def forward(self, idx, targets=None, return_logits=True):
            logits, loss = original_forward(self, idx, targets, return_logits)
            if loss is not None and self.training and current_step[0] in bad:
                loss = loss * float("nan")
            return logits, loss
        train_gpt2.GPT.forward = forward
        patch_step(lambda step: None)
    elif name == "disk_full_at":
        def write(f, data, n):
            f.write(data[:len(data) // 2])
            if n == int(arg):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.write(data[len(data) // 2:])
        patch_save(write)
    elif name == "die_at_step":
        step_arg, rank = arg.split("@")
        patch_step(lambda step: kill_self() if step == int(step_arg) and os.environ.get("RANK") == rank else None)
    elif name == "truncate_shard_at_step":
        step_arg, path = arg.split("@", 1)

        def truncate(step):
            if step == int(step_arg):
                os.truncate(path, os.path.getsize(path) - 1000)
        patch_step(truncate)
    elif name == "budget_clock":
        steps = [0]

        class Budget(guards.TimeBudget):  # the clock the budget was started on, moved by the steps alone
            def __init__(self, seconds, started, checkpoint_bytes):
                super().__init__(seconds, started, checkpoint_bytes,
                                 clock=lambda: started + float(arg) * steps[0])
        train_gpt2.TimeBudget = Budget
        patch_step(lambda step: steps.__setitem__(0, steps[0] + 1))
    else:
        raise SystemExit(f"unknown FAULT {fault!r}")


@contextlib.contextmanager
def injected(fault):
    """install(fault) for the length of a with block, in this process; the functions and counts restored
    after it."""
    originals = [(owner, name, vars(owner)[name]) for owner, name in PATCHED]
    counts.update(save=0, eval=0)
    current_step[0] = None
    try:
        install(fault)
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


if __name__ == "__main__":
    if os.environ.get("FAULT"):
        install(os.environ["FAULT"])
    train_gpt2.main()
