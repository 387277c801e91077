"""
A run directory (--out_dir): one run, one writer, and only the trainer's own files touched. Its lock, the
rules for which directory a run may write, the run's record (metrics.jsonl, the source of truth) and what
mirrors it (the plot, TensorBoard, Weights & Biases). The checkpoints' own format and names are
checkpoint.py's. Everything here is rank 0's: the trainer has every rank agree on the outcome.

    lock = claim_out_dir(out_dir)                   # refused, naming the holder, while another trainer has it
    log = RunLog(out_dir, enabled=True)
    log.record(step=0, val_loss=10.9)               # a line of metrics.jsonl, and a point in every tracker
"""

import dataclasses
import datetime
import errno
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from checkpoint import (BEST_CHECKPOINT, CHECKPOINT_NAME, best_copy_holds, evaluated_checkpoint, git_commit,
                        run_checkpoints, save_best)
from cli import (NO_FOLLOW, UserError, atomic_write, lock_directory, parse_nested, refuse_links, remove_temporaries,
                 shown_path)
from device import busy_cpu_warning, cpu_without_bf16_note

# -----------------------------------------------------------------------------
# The directory: one run, one writer, and only the trainer's own files touched

RUN_FILES = (BEST_CHECKPOINT, "metrics.jsonl", "config.json")
EXIT_STATUS = "exit_status"  # the last launch's exit status, for a job script (slurm_job.sh) to read
WRITTEN = RUN_FILES + (EXIT_STATUS, "plot.png")  # the files in out_dir besides the checkpoints


def is_run_file(name):
    """Whether name is one the trainer writes in out_dir (a checkpoint's, or one of WRITTEN)."""
    return name in WRITTEN or CHECKPOINT_NAME.fullmatch(name) is not None


def run_files(out_dir):
    """The files of a run in out_dir: its checkpoints (by the trainer's names) and its logs."""
    path = Path(out_dir)
    return [p.name for p in run_checkpoints(path)] + [name for name in RUN_FILES if (path / name).exists()]


LONGEST_NAME = 64  # of a file the trainer writes: a checkpoint's temporary, .iter-{step}-loss-{loss}.pt.{pid}.{hex}.tmp


def make_out_dir(out_dir):
    """Create out_dir and prove it writable, with a file whose name is as long as the longest the trainer
    writes there: a path near the system's limit is refused now, not at the first checkpoint."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix="." + "n" * (LONGEST_NAME - 9)):  # + 8 random
            pass
    except OSError as e:
        fix = "pass a shorter path" if e.errno == errno.ENAMETOOLONG else "pick a writable directory"
        raise UserError(f"--out_dir {shown_path(out_dir)} cannot be written ({e.strerror}): {fix}") from None


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


def claim_out_dir(out_dir, check=lambda: None):
    """Create out_dir, take its lock and run check() under it (check_run_files, say). Returns the lock, which
    the caller releases; on failure the lock is released and a UserError raised. A symbolic link in place of
    a file the trainer writes is refused: a write would go through it, to a file outside out_dir."""
    lock = None
    try:
        make_out_dir(out_dir)
        lock = lock_directory(out_dir, "trainer")
        refuse_links(out_dir, WRITTEN)
        check()
        return lock
    except (UserError, OSError) as e:
        if lock is not None:
            lock.release()
        if isinstance(e, UserError):
            raise
        raise UserError(f"cannot use --out_dir {out_dir} ({e.strerror or e}): fix its permissions or pick "
                        f"another directory") from None


# -----------------------------------------------------------------------------
# The run's record: metrics.jsonl, and the plot redrawn from it


def parse_record(line):
    """A line of metrics.jsonl as a record (a dict with an int step), or None for a line that is not one: cut
    short by a kill or a full disk, not JSON, not UTF-8, nested past Python's stack."""
    try:
        record = parse_nested(json.loads, line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
        return None
    return record


class RunLog:
    """Rank 0's output: printed lines (kept clear of the progress bar) and metrics.jsonl, the run's record.
    The trackers (TensorBoard, wandb: start_trackers) mirror metrics.jsonl: record() is the one place that
    feeds them. A tracker never ends a run: one that fails is dropped with a warning, and training goes on."""

    def __init__(self, out_dir, enabled):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.trackers, self.error = [], None

    def raise_if_failed(self, dist_info):
        """On every rank, the error of a record that rank 0 could not write."""
        if dist_info.any(self.error is not None):
            raise self.error or UserError("rank 0 could not append to metrics.jsonl: see its message")

    def print(self, text):
        if self.enabled:
            from tqdm import tqdm
            tqdm.write(text)

    def record(self, **metrics):
        if not self.enabled:
            return
        metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
        line = (json.dumps(metrics) + "\n").encode()
        try:  # never through a link (claim_out_dir refuses one; this, one made since)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NO_FOLLOW, 0o666)
            with open(fd, "ab", buffering=0) as f:  # unbuffered: a failed write fails here
                size = f.tell()
                try:
                    if f.write(line) != len(line):
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                except OSError:
                    f.truncate(size)  # no line cut mid-way
                    raise
        except OSError as e:  # said on every rank by raise_if_failed, not here on rank 0 alone
            self.error = UserError(f"cannot append to {self.path} ({e.strerror or e}): free disk space, "
                                   f"then continue with --init_from resume")
            return
        for tracker in list(self.trackers):
            self.use(tracker, lambda: tracker.log(metrics["step"], tracker_figures(metrics)))

    def step(self, step, **figures):
        """A training step's line (loss, lr, norm, ms, tok/s, mfu) and its record."""
        f, mfu = figures, figures["mfu"]
        self.print(f"step {step:6d} | loss {f['train_loss']:.4f} | lr {f['lr']:.2e} | norm "
                   f"{f['grad_norm']:.3f} | {f['ms_per_step']:.1f} ms | {f['tokens_per_sec']:,.0f} tok/s | "
                   f"mfu {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'}")
        self.record(step=step, **figures)

    def use(self, tracker, action, closing=False):
        """action() on a tracker; one that fails is dropped (closed as well as it can be) with a warning."""
        try:
            action()
        except Exception as e:  # a tracker's package, its service or its files: any of them can fail
            self.trackers.remove(tracker)
            reason = (str(e).strip().splitlines() or [""])[0]
            self.print(f"warning: {tracker.name} failed ({type(e).__name__}: {reason}); the run goes on without "
                       f"it, and {self.path} keeps every figure")
            if not closing:
                try:
                    tracker.close(failed=True)
                except Exception:
                    pass  # it has failed once already, and said so

    def records_from(self, step):
        """The records of metrics.jsonl from `step` on; after drop_after, what a resumed run keeps there."""
        if not self.enabled or not self.path.exists():
            return []
        records = [parse_record(line) for line in self.path.read_bytes().splitlines()]
        return [record for record in records if record is not None and record["step"] >= step]

    def close(self, failed=False):
        """Flush and close the trackers; failed marks the run as failed where a tracker keeps that (wandb)."""
        for tracker in list(self.trackers):
            self.use(tracker, lambda: tracker.close(failed), closing=True)
        self.trackers = []

    def drop_after(self, iter_num, evaluated_at_start):
        """Forget what an interrupted run logged past the point this run starts from (its checkpoint, or
        step 0): this run logs it again, so the file reads as if the run had never been interrupted. A line
        that is not a record (cut short by a kill, or damaged) goes too; a whole line that is damaged (not
        JSON, nested past Python's stack) is said in one warning."""
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_bytes().splitlines(keepends=True)
        damaged = [number for number, line in enumerate(lines, 1)
                   if line.endswith(b"\n") and parse_record(line) is None]
        if damaged:
            self.print(f"warning: {self.path}: {len(damaged)} damaged line(s) dropped, not records of a step "
                       f"(first: line {damaged[0]})")

        def before(line):  # a run does not redo the evaluation its checkpoint was saved after
            record = parse_record(line)
            if record is None:
                return False
            step = record["step"]
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


def pause_clock(progress, seconds):
    """Take seconds off a tqdm bar's clock, so that its rate and ETA count training steps only. tqdm's own
    unpause() moves the same two times, but from the last redraw, up to a second of training before."""
    if not progress.disable:
        progress.start_t += seconds
        progress.last_print_t += seconds


# -----------------------------------------------------------------------------
# Trackers: TensorBoard and Weights & Biases, mirrors of metrics.jsonl (RunLog.record feeds them). Optional
# packages: the trainer checks them at start-up (TRACKER_PACKAGES), the classes import them.

TRACKER_PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb_log": ("wandb", "wandb")}


def tracker_folder(out_dir, name, flag):
    """out_dir/name, the folder a tracker keeps its files in, refused in one line where it cannot be one."""
    folder = Path(out_dir) / name
    if folder.is_symlink():  # its files would be written into the folder it names, outside out_dir
        raise UserError(f"{flag} True writes into the folder {folder}, which is a symbolic link (to "
                        f"{os.readlink(folder)}): remove the link, or pass {flag} False")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} True writes into the folder {folder}, which is a file: move it away, or pass "
                        f"{flag} False")
    return folder


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

    name = "--tensorboard"

    def __init__(self, out_dir, first_step, kept_records):
        from torch.utils.tensorboard import SummaryWriter

        folder = tracker_folder(out_dir, "tensorboard", "--tensorboard")
        self.writer = SummaryWriter(str(folder), purge_step=first_step or None)
        for record in kept_records:
            self.log(record["step"], tracker_figures(record))

    def log(self, step, figures):
        for name, value in figures.items():
            self.writer.add_scalar(name, value, step)

    def close(self, failed=False):
        self.writer.close()


class WandbTracker:
    """--wandb_log True: each record to a Weights & Biases run by step, with the run's config (flags: what
    config.json holds, the flags themselves by default). The checkpoints keep the wandb run's id, so that a
    resumed run continues the same wandb run."""

    name = "--wandb_log"

    def __init__(self, config, run_id, flags=None):
        import wandb

        tracker_folder(config.out_dir, "wandb", "--wandb_log")
        name = config.wandb_run_name or Path(config.out_dir).resolve().name
        try:
            self.run = wandb.init(project=config.wandb_project, name=name, id=run_id, resume="allow",
                                  dir=config.out_dir, config=flags or dataclasses.asdict(config))
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
        import wandb
        try:
            self.run.finish(exit_code=1 if failed else 0)
        finally:
            # the service's own exit hook, left to run at exit, prints a traceback if the service is gone;
            # teardown unregisters it before it talks to the service
            wandb.teardown()


# -----------------------------------------------------------------------------
# Rank 0's set-up of a run's files, and its summary


def check_tracker_packages(config):
    """Import the package of each tracker asked for: a missing one is refused in one line before any work,
    not found by the first record."""
    for name, (module, package) in TRACKER_PACKAGES.items():
        if getattr(config, name):
            try:
                importlib.import_module(module)
            except ImportError:
                raise UserError(f"--{name} True needs {package}: pip install {package}") from None


def start_trackers(config, progress, log, flags=None):
    """The trackers asked for by --wandb_log and --tensorboard, starting where the run starts: called after
    log.drop_after, so that a resumed run knows what metrics.jsonl keeps. Each joins log.trackers as it
    starts, so that log.close() closes it whatever fails after. flags: config.json's, which wandb keeps."""
    if config.wandb_log:  # first: it is the one that can fail (not logged in)
        wandb_tracker = WandbTracker(config, progress.wandb_run_id, flags)
        progress.wandb_run_id = wandb_tracker.run_id
        log.trackers.append(wandb_tracker)
    if config.tensorboard:
        records = log.records_from(progress.iter_num)
        log.trackers.append(TensorBoardTracker(config.out_dir, progress.iter_num, records))


def prepare_run_files(config, progress, evaluated_at_start, log, loader=None, tokenizer=None):
    """Clear what a killed run left, cut metrics.jsonl back to the checkpoint, write a best copy that is
    pending (best_val_loss.pt could not be written when its checkpoint was), start the trackers and write
    config.json: the flags, with --auto_batch the micro-batch the loader reads for them, and the tokenizer
    the model reads (its record: the sha256 of its file, its vocabulary)."""
    out_dir = Path(config.out_dir)
    try:
        remove_temporaries(out_dir, is_run_file)  # a killed run's, safe under the lock
        (out_dir / EXIT_STATUS).unlink(missing_ok=True)  # an earlier launch's: this one's is written at its end
        log.drop_after(progress.iter_num, evaluated_at_start)
        write_pending_best(out_dir, progress.best_step, log)
        flags = dataclasses.asdict(config)
        if config.auto_batch and loader is not None:
            flags["auto_batch_chosen"] = {"batch_size": loader.B, "gradient_accumulation_steps": loader.micro_steps}
        if tokenizer is not None:
            flags["tokenizer_record"] = tokenizer.record()
        start_trackers(config, progress, log, flags)
        atomic_write(out_dir / "config.json", lambda f: f.write(json.dumps(flags, indent=2).encode()))
    except OSError as e:
        raise UserError(f"cannot write into --out_dir {out_dir} ({e.strerror or e}): fix its permissions or "
                        f"free disk space, then run the same command again") from None


def write_exit_status(out_dir, code):
    """out_dir/exit_status: this launch's exit status, which a job script reads where a launcher hides it
    (torchrun reports any failure of its processes as 1, a stop on --max_time's 75 among them)."""
    try:
        atomic_write(Path(out_dir) / EXIT_STATUS, lambda f: f.write(f"{code}\n".encode()))
    except OSError:
        pass  # the run's own message says what went wrong; a job script without the file resubmits nothing


def write_pending_best(out_dir, best_step, log):
    """Copy the checkpoint of the best evaluation to best_val_loss.pt where the copy is not there yet."""
    source = evaluated_checkpoint(out_dir, best_step) if best_step is not None else None
    if source is not None and not best_copy_holds(out_dir, best_step):
        save_best(source, out_dir)
        log.print(f"wrote {out_dir / BEST_CHECKPOINT}, the copy of {source} that could not be written before")


def header(n_params, dist_info, dtype, tokens_per_step, first_step, model="GPT-2"):
    """The lines a run starts with: a warning where the CPU is busy, a note where it has no bfloat16
    instructions, then what trains where (model: what the architecture is called)."""
    where, lines = dist_info.device, []
    if where == "cpu":
        where += f" ({torch.get_num_threads()} threads)"
        lines += filter(None, [busy_cpu_warning(), cpu_without_bf16_note(dtype)])
    lines.append(f"{model} {n_params / 1e6:.2f}M parameters | {dist_info.world_size} process(es) on "
                 f"{where} | {dtype} | {tokens_per_step:,} tokens/step | torch {torch.__version__} | "
                 f"commit {git_commit()} | from step {first_step}")
    return lines


def describe_target(target):
    """The speedruns' figure: when the run first evaluated at or below its target val loss."""
    return (f"reached at step {target['step']:,} ({target['tokens']:,} tokens, "
            f"{target['train_seconds']:.1f} s of training): val loss {target['val_loss']:.4f}")


def target_reached(progress, target_val_loss):
    """The record of the first evaluation at or below target_val_loss (progress.target, if it is of that
    target: a resume may give another), or None."""
    record = progress.target
    return record if record is not None and record["target_val_loss"] == target_val_loss else None


def target_met(progress, target_val_loss):
    """Whether a run (its progress) has reached target_val_loss already: its record says so, or its best val loss
    is at or below it (a target first given on resume, reached before then). A target is reported once."""
    return target_reached(progress, target_val_loss) is not None or progress.best_val_loss <= target_val_loss


def target_notes(progress, config):
    """What a run resumed from a checkpoint (its progress) says of a --target_val_loss it reached before:
    it trains on past it, without --stop_at_target stopping it again (the first evaluation at or below a
    target is reported once). A target it has not reached is checked from the first evaluation on."""
    target = config.target_val_loss
    record, stops = target_reached(progress, target), " (--stop_at_target stops at that evaluation alone)"
    if not target or not target_met(progress, target):
        return []
    reached = describe_target(record) if record else reached_before(progress.iter_num)
    return [f"note: --target_val_loss {target:g} was {reached}; this run trains on past it to --max_iters "
            f"{config.max_iters:,}" + (stops if config.stop_at_target else "")]


def reached_before(step):
    """A target first reached at an evaluation a checkpoint does not record: before a resume gave it."""
    return f"reached before step {step:,} (its first evaluation at or below it is in metrics.jsonl)"


def summary(out_dir, progress, last_checkpoint, first_step, seconds, target_val_loss=0.0, best_val_bpb=None):
    """What a finished run did and where everything it wrote is, a line each; best_val_bpb: the best val loss
    in bits per byte."""
    out_dir = Path(out_dir)
    best, metrics = out_dir / BEST_CHECKPOINT, out_dir / "metrics.jsonl"
    lines = [f"done: {progress.iter_num:,} steps, {progress.tokens:,} tokens; "
             f"{datetime.timedelta(seconds=round(seconds))} in this process, from step {first_step:,}"]
    row = lambda label, text: lines.append(f"  {label:<20} {text}")
    if best.exists():
        bpb = f" ({best_val_bpb:.4f} bpb)" if best_val_bpb is not None else ""
        row(f"best val loss {progress.best_val_loss:.4f}{bpb}", best)
    if target_val_loss:
        record = target_reached(progress, target_val_loss)
        row(f"target {target_val_loss:g}", describe_target(record) if record else
            reached_before(first_step) if target_met(progress, target_val_loss) else "not reached")
    if last_checkpoint is not None:
        row("latest checkpoint", f"{last_checkpoint}  (to train on: --init_from resume --max_iters N)")
    row("every figure", f"{metrics}  (python plot.py {metrics})")
    row("every flag", out_dir / "config.json")
    return lines
