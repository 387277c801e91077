"""
What keeps a long run going without a person watching it, each asked for by a flag of the trainer's:

    --auto_batch True   choose_micro_batch: the largest micro-batch that fits the GPU, by trying
    --max_time 3.5      TimeBudget: a checkpoint and exit status 75 before the budget runs out
    --spike_guard 6     SpikeGuard: a step whose loss is far above the recent ones is not applied
    --profile_steps A:B StepProfiler: a torch.profiler trace of a few steps, and its top kernels

The trainer calls them at its step and its loop; each is a rule here, tested on its own.
"""

import collections
import math
import os
import statistics
import time
from pathlib import Path

import torch

from cli import UserError

# -----------------------------------------------------------------------------
# --auto_batch: the micro-batch that fits


def largest_fitting(candidates, fits):
    """The largest of the ascending candidates for which fits(candidate) is true, found by bisection
    (what fits is taken to shrink as candidates grow), or None when none fits."""
    low, high, best = 0, len(candidates) - 1, None
    while low <= high:
        middle = (low + high) // 2
        if fits(candidates[middle]):
            best, low = candidates[middle], middle + 1
        else:
            high = middle - 1
    return best


def fits_in_gpu(trial, device, reserved_bytes, fraction=0.9):
    """Whether trial() (a forward and backward pass) runs on the GPU with reserved_bytes to spare
    (the optimizer's state, made at its first step), measured by the allocator's peak: out of memory
    is a no."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        trial()
        peak = torch.cuda.max_memory_allocated(device)
    except Exception as e:  # out of memory, or a compiler's error wrapped around one
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            return False
        raise
    finally:
        torch.cuda.empty_cache()
    return peak + reserved_bytes <= fraction * torch.cuda.get_device_properties(device).total_memory


def largest_micro_batch(sequences, trial, dist_info, reserved_bytes):
    """The largest divisor of sequences (a process's sequences per step) for which trial(size), a
    forward and backward pass, fits the GPU with reserved_bytes to spare, on every rank: bisection
    over the divisors, every rank taking the size the tightest one can. None if none fits."""
    sizes = [size for size in range(1, sequences + 1) if sequences % size == 0]
    fits = lambda size: not dist_info.any(not fits_in_gpu(lambda: trial(size), dist_info.device,
                                                          reserved_bytes))
    return largest_fitting(sizes, fits)


def choose_micro_batch(config, dist_info, trial, reserved_bytes, log):
    """--auto_batch: the largest micro-batch that divides this process's sequences per step and for
    which trial(size), a forward and backward pass of the model as it trains, fits the GPU with
    reserved_bytes to spare (the optimizer's state, made at its first step). On a CPU or under FSDP,
    the flags'. It says why."""
    sequences, asked = config.batch_size * config.gradient_accumulation_steps, config.batch_size
    if not dist_info.device.startswith("cuda") or dist_info.sharded:
        where = "under --fsdp" if dist_info.sharded else f"on {dist_info.device}"
        log(f"--auto_batch: {where} the flags' micro-batch of {asked} is kept")
        return asked
    chosen = largest_micro_batch(sequences, trial, dist_info, reserved_bytes=reserved_bytes)
    if chosen is None:
        raise UserError("--auto_batch: not even a micro-batch of 1 sequence fits "
                        f"{torch.cuda.get_device_name(dist_info.device)} with the optimizer's state: "
                        "pass --gradient_checkpointing True, shard the model with --fsdp True, or "
                        "choose a smaller one")
    log(f"--auto_batch: micro-batch {chosen} x {sequences // chosen} steps (asked: {asked} x "
        f"{config.gradient_accumulation_steps}), the largest whose forward and backward pass fit "
        f"{torch.cuda.get_device_name(dist_info.device)}")
    return chosen


# -----------------------------------------------------------------------------
# --spike_guard: a loss far above the recent trend


def is_loss_spike(loss, recent, threshold):
    """Whether loss is more than threshold robust deviations above the median of the recent losses
    (at least 10 of them): the median absolute deviation, scaled to a normal's standard deviation
    and at least 1% of the median, so that a flat stretch of losses does not make every wobble a
    spike."""
    if len(recent) < 10:
        return False
    median = statistics.median(recent)
    deviation = max(1.4826 * statistics.median(abs(x - median) for x in recent), 0.01 * abs(median))
    return loss > median + threshold * deviation


class SpikeGuard:
    """What --spike_guard and --max_bad_steps keep: the losses of the last `window` steps applied;
    the steps in a row not applied (bad_steps) and how many were spikes (in_a_row); and for the bad
    region they are in (the steps since the last one applied) the checkpoint from before it
    (back_to: where a roll-back goes, the last good one) and the roll-backs to it so far. A
    roll-back keeps the losses, all from before the region, so that the rest of it is judged by the
    trend it broke; a checkpoint keeps all of it (state_dict), so that a resumed run does as the
    uninterrupted run does."""

    def __init__(self, threshold, window):
        self.threshold, self.recent = threshold, collections.deque(maxlen=window)
        self.in_a_row, self.bad_steps, self.roll_backs, self.back_to = 0, 0, 0, None

    def is_spike(self, loss):
        return bool(self.threshold) and is_loss_spike(loss, self.recent, self.threshold)

    def record(self, loss, applied, spike, latest):
        """A step's loss (None if not applied, or with the guard off), whether its update was
        applied and whether it was skipped as a spike. latest: the newest checkpoint (a path's str,
        or None), which becomes back_to when this step begins a bad region."""
        if not applied and self.bad_steps == 0 and self.roll_backs == 0:
            self.back_to = latest
        self.in_a_row = self.in_a_row + 1 if spike else 0
        self.bad_steps = 0 if applied else self.bad_steps + 1
        if applied:
            self.roll_backs, self.back_to = 0, None
            if self.threshold:
                self.recent.append(loss)

    def rolled_back(self):
        """The weights went back to back_to: a new count of bad steps, against the same trend."""
        self.in_a_row, self.bad_steps = 0, 0
        self.roll_backs += 1

    def describe(self, max_bad_steps):
        """The run's header line for the guard, when it is on."""
        if not self.threshold:
            return None
        return (f"spike guard: a step whose loss is more than {self.threshold:g} robust deviations "
                f"above the median of the last {self.recent.maxlen} applied steps is skipped; "
                f"{max_bad_steps} in a row go back to the last checkpoint before them")

    def state_dict(self):
        return {"recent": list(self.recent), "in_a_row": self.in_a_row, "bad_steps": self.bad_steps,
                "roll_backs": self.roll_backs, "back_to": self.back_to}

    def load_state_dict(self, state):
        """The state of a checkpoint; with another --spike_window, its newest losses that fit."""
        self.recent.clear()
        self.recent.extend(float(loss) for loss in state["recent"])
        self.in_a_row, self.bad_steps = int(state["in_a_row"]), int(state["bad_steps"])
        self.roll_backs, self.back_to = int(state["roll_backs"]), state["back_to"]


# -----------------------------------------------------------------------------
# --max_time and --profile_steps


RESUMABLE_EXIT = 75  # sysexits.h's EX_TEMPFAIL: stopped for now, to be run again


class TimeBudget:
    """--max_time: whether the next step (with its evaluation, if it has one) and then a checkpoint
    would end past the budget, from the slowest of the last steps and the last evaluation and
    checkpoint write measured. Before the first write is measured, it is guessed at 100 MB/s."""

    def __init__(self, seconds, started, checkpoint_bytes, clock=time.perf_counter):
        self.deadline = math.inf if seconds is None else started + seconds  # None: no budget
        self.clock = clock  # what started is a reading of, and the steps are timed by
        self.steps = collections.deque(maxlen=20)
        self.eval_seconds, self.save_seconds = 0.0, checkpoint_bytes / 100e6

    def record_step(self, seconds):
        self.steps.append(seconds)

    def record_evaluation(self, eval_seconds, save_seconds=None):
        """An evaluation's time, and its checkpoint's write (None: none was written, the estimate
        stands)."""
        self.eval_seconds = eval_seconds
        if save_seconds is not None:
            self.save_seconds = save_seconds

    def out_of_time(self, evaluates_next, now=None):
        """Whether the next step, then its evaluation and checkpoint (if it evaluates), then the
        checkpoint of a stop would end past the budget."""
        now = self.clock() if now is None else now
        needed = max(self.steps, default=0.0) + self.save_seconds
        if evaluates_next:
            needed += self.eval_seconds + self.save_seconds
        return now + needed > self.deadline


class StepProfiler:
    """--profile_steps A:B: torch.profiler over steps A to B - 1, written to out_dir/profile/ as a
    Chrome trace (chrome://tracing, Perfetto) that TensorBoard's profiler plugin reads too, then a
    table of the kernels that took the most time."""

    def __init__(self, steps, out_dir, device, log, max_iters):
        self.first, self.end = steps or (None, None)  # None: nothing to profile
        self.folder, self.log = Path(out_dir) / "profile", log
        self.cuda = device.startswith("cuda")
        self.profile, self.last, self.seen = None, None, False
        if self.first is not None and self.first >= max_iters:
            log(f"warning: --profile_steps {self.first}:{self.end}: the run ends at --max_iters "
                f"{max_iters}, before the window's first step; nothing is profiled")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.profile is not None:  # the run ended inside the window
            self.last = self.first if self.last is None else self.last
            self.end = self.last + 1
            self.after(self.last)

    def before(self, step):
        if self.first is not None and not self.seen and step > self.first:
            self.log(f"warning: --profile_steps {self.first}:{self.end}: this run starts at step "
                     f"{step}, past the window's first step; nothing is profiled")
        self.seen = True
        if step == self.first:
            from torch.profiler import ProfilerActivity, profile
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.profile = profile(activities=activities)
            self.profile.start()

    def after(self, step):
        """Stops after step end - 1 (or at close, the run's last step): the trace, then the table.
        """
        self.last = step
        if self.profile is None or step < self.end - 1:
            return
        self.profile.stop()
        path = self.folder / f"steps-{self.first}-{step}.pt.trace.json"
        try:
            link = next((p for p in (self.folder, path) if p.is_symlink()), None)
            if link is not None:  # the trace would be written through it, outside out_dir
                raise OSError(f"{link} is a symbolic link (to {os.readlink(link)}); remove it")
            self.folder.mkdir(exist_ok=True)
            self.profile.export_chrome_trace(str(path))
        except OSError as e:  # a profile is never worth the run
            self.log(f"warning: --profile_steps: {path} cannot be written ({e.strerror or e})")
            path = "not written"
        sort_by = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        self.log(f"profile of steps {self.first} to {step}: {path} (tensorboard --logdir "
                 f"{self.folder})")
        self.log(self.profile.key_averages().table(sort_by=sort_by, row_limit=15))
        self.profile = None
