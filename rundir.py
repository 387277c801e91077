"""
A run directory (--out_dir): one run, one writer, and only the trainer's own files touched. Its lock, the rules
for which directory a run may write, the run's record (metrics.jsonl, the source of truth) and what mirrors it
(the plot, TensorBoard, Weights & Biases). The checkpoints' own format and names are checkpoint.py's.

    lock = OutDirLock(out_dir)          # refused, naming the holder, while another trainer writes out_dir
    log = RunLog(out_dir, enabled=True)
    log.record(step=0, val_loss=10.9)   # a line of metrics.jsonl, and a point in every tracker
"""

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from checkpoint import BEST_CHECKPOINT, run_checkpoints
from cli import UserError, atomic_write

# -----------------------------------------------------------------------------
# The directory: one run, one writer, and only the trainer's own files touched

RUN_FILES = (BEST_CHECKPOINT, "metrics.jsonl", "config.json")


def run_files(out_dir):
    """The files of a run in out_dir: its checkpoints (by the trainer's names) and its logs."""
    path = Path(out_dir)
    return [p.name for p in run_checkpoints(path)] + [name for name in RUN_FILES if (path / name).exists()]


def make_out_dir(out_dir):
    """Create out_dir and prove it writable."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"--out_dir {out_dir} cannot be written ({e.strerror}): pick a writable directory") from None


def check_run_files(out_dir, continuing):
    """A new run (continuing None) needs a directory without another run's files; a run that continues from a
    checkpoint into a directory with run files must continue from the latest checkpoint there: an older one
    would mix two histories in one directory."""
    files = run_files(out_dir)
    if not files:
        return
    checkpoints = run_checkpoints(out_dir)
    if continuing is None and not checkpoints:
        raise UserError(f"{out_dir} holds files of a run that wrote no checkpoint ({', '.join(files)}): delete them "
                        f"or pass another --out_dir")
    if continuing is None:
        raise UserError(f"{out_dir} already holds checkpoints or files of a run ({files[0]}): continue it with "
                        f"--init_from resume, or pass another --out_dir")
    latest = checkpoints[-1] if checkpoints else None
    if latest is None or Path(continuing).resolve() != latest.resolve():
        latest_name = latest.name if latest else "none"
        raise UserError(f"{continuing} is not the latest checkpoint of {out_dir} (that is {latest_name}): continuing "
                        f"from it there would mix two histories; continue the run with --init_from resume, or "
                        f"branch from {continuing} with a new --out_dir")


class OutDirLock:
    """out_dir/.lock, held for as long as a trainer writes out_dir, with the holder's process id written in it:
    a second trainer on the same directory is refused and told who holds it. The kernel drops the lock when
    the process ends, however it ends, so a killed run never leaves a stale lock (only the file, which the
    next run takes over). release() deletes the file while still holding it; a trainer that opened the file
    just before then finds, once it has the lock, that the path names another file, and tries again."""

    def __init__(self, out_dir):
        import fcntl
        self.path = Path(out_dir) / ".lock"
        while True:
            self.file = open(self.path, "a+")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.seek(0)
                holder = self.file.read().strip() or "another process"
                self.file.close()
                raise UserError(f"{out_dir} is in use by another trainer ({holder}): wait for it to end, or pass "
                                f"another --out_dir") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            self.file.close()  # released and deleted by its holder meanwhile: take the new one
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self):
        self.path.unlink(missing_ok=True)
        self.file.close()


def lock_out_dir(out_dir):
    """An OutDirLock on out_dir; None where the system has no flock (Windows), which then runs unlocked."""
    try:
        return OutDirLock(out_dir)
    except ImportError:
        return None


# -----------------------------------------------------------------------------
# The run's record: metrics.jsonl, and the plot redrawn from it


class RunLog:
    """Rank 0's output: printed lines (kept clear of the progress bar) and metrics.jsonl, the run's record. The
    trackers (TensorBoard, wandb: start_trackers) mirror metrics.jsonl: record() is the one place that feeds them."""

    def __init__(self, out_dir, enabled):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.trackers = []

    def print(self, text):
        if self.enabled:
            from tqdm import tqdm
            tqdm.write(text)

    def record(self, **metrics):
        if self.enabled:
            metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            for tracker in self.trackers:
                tracker.log(metrics["step"], tracker_figures(metrics))

    def records_from(self, step):
        """The records of metrics.jsonl from `step` on; after drop_after, what a resumed run keeps there."""
        if not self.enabled or not self.path.exists():
            return []
        records = [json.loads(line) for line in self.path.read_text().splitlines()]
        return [record for record in records if record["step"] >= step]

    def close(self, failed=False):
        """Flush and close the trackers; failed marks the run as failed where a tracker keeps that (wandb)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed)

    def drop_after(self, iter_num, evaluated_at_start):
        """Forget what an interrupted run logged past the point this run starts from (its checkpoint, or
        step 0): this run logs it again, so the file reads as if the run had never been interrupted. A line
        that is not a record (cut short by a kill, or damaged) goes too."""
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_bytes().splitlines(keepends=True)

        def before(line):  # a run does not redo the evaluation its checkpoint was saved after
            try:
                record = json.loads(line)
                step = record["step"]
            except (ValueError, TypeError, KeyError):  # cut short, not JSON, not UTF-8, not a record
                return False
            if not isinstance(step, int):
                return False
            return step < iter_num or (evaluated_at_start and step == iter_num and "val_loss" in record)
        kept = [line for line in lines if before(line)]
        if len(kept) != len(lines):
            atomic_write(self.path, lambda f: f.write(b"".join(kept)))


class Plotter:
    """--plot True: plot.py redraws out_dir/plot.png in a process of its own after each evaluation, so the
    trainer neither imports a tool nor waits for matplotlib. A plot is never worth a training run: a failure
    is a warning, printed once."""

    def __init__(self, log):
        self.log = log
        self.command = [sys.executable, str(Path(__file__).with_name("plot.py")), str(log.path),
                        "--out", str(log.path.with_name("plot.png"))]
        self.process, self.warned, self.behind = None, False, False

    def redraw(self):
        if self.process is not None and self.process.poll() is None:
            self.behind = True  # still drawing the last one: the end of the run draws the newest
        else:
            self.start()

    def start(self):
        self.check()
        # its messages go to a file, not a pipe: a pipe nobody reads while the process runs could fill and stall it
        self.errors = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=self.errors)
        self.behind = False

    def finish(self):
        if self.process is None:
            return
        self.process.wait()
        if self.behind:
            self.start()
            self.process.wait()
        self.check()

    def check(self):
        if self.process is None or self.process.returncode in (None, 0) or self.warned:
            return
        self.warned = True
        self.errors.seek(0)
        reason = (self.errors.read().decode(errors="replace").strip().splitlines() or ["plot.py failed"])[-1]
        self.log.print(f"warning: --plot True: no plot ({reason.removeprefix('error: ')})")


# -----------------------------------------------------------------------------
# Trackers: TensorBoard and Weights & Biases, mirrors of metrics.jsonl (RunLog.record feeds them). Optional
# packages: the trainer checks them at start-up (TRACKER_PACKAGES), the classes import them.

TRACKER_PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb_log": ("wandb", "wandb")}


def tracker_figures(record):
    """A metrics.jsonl record as the trackers take it: its numbers, without the step (their x axis), the flags
    and texts (skipped, eval_only, checkpoint) and the non-finite figures, which are null in the record."""
    return {key: value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoardTracker:
    """--tensorboard True: each figure a scalar in out_dir/tensorboard/ by step, so that `tensorboard --logdir`
    on a folder of runs shows them side by side. A resumed run writes an event file of its own, from which
    TensorBoard hides the earlier files' events at first_step and after (purge_step); the records metrics.jsonl
    keeps there (the evaluation the checkpoint was saved after) are written again, so both show the same."""

    def __init__(self, out_dir, first_step, kept_records):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=first_step or None)
        for record in kept_records:
            self.log(record["step"], tracker_figures(record))

    def log(self, step, figures):
        for name, value in figures.items():
            self.writer.add_scalar(name, value, step)

    def close(self, failed=False):
        self.writer.close()


class WandbTracker:
    """--wandb_log True: each record to a Weights & Biases run by step, with the run's config. The checkpoints
    keep the wandb run's id, so that a resumed run continues the same wandb run."""

    def __init__(self, config, run_id):
        import wandb

        name = config.wandb_run_name or Path(config.out_dir).resolve().name
        try:
            self.run = wandb.init(project=config.wandb_project, name=name, id=run_id, resume="allow",
                                  dir=config.out_dir, config=dataclasses.asdict(config))
        except wandb.errors.Error as e:
            raise UserError(f"--wandb_log True: wandb could not start a run ({str(e).splitlines()[0]}): log in "
                            f"with `wandb login`, or set WANDB_MODE=offline to keep the run on disk") from None
        self.run_id = self.run.id
        # a resumed wandb run goes on from the step after its last; it would refuse, with a warning each, the
        # steps an interrupted run logged past its checkpoint, which the resumed run logs again
        self.first_step = self.run.starting_step

    def log(self, step, figures):
        if step >= self.first_step:
            self.run.log(figures, step=step)

    def close(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)
