"""guards.py: the bisection that finds the largest micro-batch that fits (--auto_batch; the GPU's own trial is
measured by the allocator, on a GPU only), the loss-spike rule (--spike_guard), the time budget (--max_time) as
a rule and run for real with a short budget, and a profile of a few steps (--profile_steps) read back from its
trace."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import INPUT_TXT, REPO, TINY, run_script, run_train, train_in_process, train_losses
from checkpoint import load_checkpoint
from guards import RESUMABLE_EXIT, SpikeGuard, StepProfiler, TimeBudget, is_loss_spike, largest_fitting


def test_the_largest_fitting_size_is_found_by_bisection():
    sizes = [1, 2, 4, 5, 8, 10, 20, 40]
    tried = []
    fits = lambda size: tried.append(size) or size <= 10
    assert largest_fitting(sizes, fits) == 10
    assert len(tried) <= 4  # log2 of 8 candidates, not all of them
    assert largest_fitting(sizes, lambda size: True) == 40
    assert largest_fitting(sizes, lambda size: False) is None


def test_a_loss_spike_is_far_above_the_recent_median():
    recent = [3.0, 3.1, 2.9, 3.05, 2.95, 3.0, 3.1, 2.9, 3.0, 3.02]
    assert not is_loss_spike(3.3, recent, 6.0) and is_loss_spike(4.5, recent, 6.0)
    assert not is_loss_spike(100.0, recent[:9], 6.0)  # too few to know the trend
    flat = [2.0] * 10  # no deviation at all: 1% of the median stands in for it
    assert not is_loss_spike(2.1, flat, 6.0) and is_loss_spike(2.2, flat, 6.0)


def test_the_spike_guard_judges_the_rest_of_a_bad_region_by_the_trend_before_it():
    guard = SpikeGuard(3.0, window=10)
    for loss in [3.0, 3.1, 2.9, 3.05, 2.95, 3.0, 3.1, 2.9, 3.0, 3.02]:
        guard.record(loss, applied=True, spike=False, latest="iter-10.pt")
    for latest in ["iter-10.pt", "iter-12.pt", "iter-12.pt"]:  # a checkpoint written within the region
        assert guard.is_spike(6.0)
        guard.record(None, applied=False, spike=True, latest=latest)
    assert (guard.in_a_row, guard.bad_steps, guard.back_to) == (3, 3, "iter-10.pt")
    guard.rolled_back()
    assert (guard.in_a_row, guard.bad_steps, guard.roll_backs) == (0, 0, 1) and guard.is_spike(6.0)
    guard.record(None, applied=False, spike=True, latest="iter-12.pt")
    assert guard.back_to == "iter-10.pt"  # the region goes on: the same checkpoint from before it
    guard.record(3.0, applied=True, spike=False, latest="iter-12.pt")
    assert (guard.bad_steps, guard.roll_backs, guard.back_to) == (0, 0, None)


def test_the_spike_guards_state_is_what_a_checkpoint_keeps():
    guard = SpikeGuard(3.0, window=10)
    for step in range(12):
        guard.record(3.0 - 0.01 * step, applied=True, spike=False, latest=None)
    guard.record(None, applied=False, spike=True, latest="out/iter-10-loss-3.0000.pt")
    state = guard.state_dict()
    assert state == {"recent": [3.0 - 0.01 * step for step in range(2, 12)], "in_a_row": 1, "bad_steps": 1,
                     "roll_backs": 0, "back_to": "out/iter-10-loss-3.0000.pt"}
    resumed = SpikeGuard(3.0, window=10)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    narrower = SpikeGuard(3.0, window=5)  # --spike_window changed on resume: the newest losses
    narrower.load_state_dict(state)
    assert narrower.state_dict()["recent"] == state["recent"][-5:]


def test_the_budget_stops_before_a_step_and_a_checkpoint_would_pass_it():
    budget = TimeBudget(10.0, started=100.0, checkpoint_bytes=100e6)  # a write guessed at 1 s
    budget.record_step(1.0)
    budget.record_step(2.0)  # the slowest of the last steps counts
    assert not budget.out_of_time(False, now=106.9) and budget.out_of_time(False, now=107.1)
    budget.record_evaluation(eval_seconds=3.0)  # step 0's: no checkpoint, the write's guess stands
    assert budget.out_of_time(False, now=107.1)
    budget.record_evaluation(eval_seconds=3.0, save_seconds=0.5)
    assert not budget.out_of_time(False, now=107.4)
    # the next step evaluates: its evaluation and checkpoint count too (2 + 3 + 0.5 + 0.5)
    assert not budget.out_of_time(True, now=103.9) and budget.out_of_time(True, now=104.1)


def test_the_budget_reads_the_clock_it_is_given():
    now = [100.0]
    budget = TimeBudget(10.0, started=100.0, checkpoint_bytes=100e6, clock=lambda: now[0])
    budget.record_step(2.0)
    now[0] = 106.9
    assert not budget.out_of_time(False)
    now[0] = 107.1
    assert budget.out_of_time(False)


def test_a_run_past_its_time_budget_saves_and_exits_resumable(tmp_path):
    out_dir = tmp_path / "out"
    args = [*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--eval_interval", "1000"]
    # each step takes 1 s on the budget's clock, however long it takes on this machine's
    result = run_script(REPO / "tests" / "fault_injection.py", *args, "--max_iters", "1000",
                        "--max_time", "00:00:10", env={"FAULT": "budget_clock:1"})
    assert result.returncode == RESUMABLE_EXIT, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    # after 9 steps, a 10th (1 s) and the checkpoint's write (3.3M parameters x 16 bytes at 100 MB/s:
    # 0.53 s) would end at 10.53 s
    assert line.startswith("stopped after step 8: the next step would pass --max_time 00:00:10; saved ")
    assert "iter-9-stopped.pt, where step 9 is the next to run" in line and "--init_from resume" in line
    (stopped,) = out_dir.glob("iter-*-stopped.pt")
    assert stopped.name == "iter-9-stopped.pt" and load_checkpoint(stopped)["progress"]["iter_num"] == 9
    assert (out_dir / "exit_status").read_text() == f"{RESUMABLE_EXIT}\n"
    resumed = run_train("--init_from", "resume", "--out_dir", out_dir, "--max_iters", "11")
    assert resumed.returncode == 0, resumed.stderr
    assert (out_dir / "exit_status").read_text() == "0\n"


def as_toml(flags):
    """["--name", "value", ...] as a --config file."""
    lines = []
    for name, value in zip(flags[::2], flags[1::2]):
        if value in ("True", "False"):
            value = value.lower()
        else:
            try:
                float(value)
            except ValueError:
                value = json.dumps(value)
        lines.append(f"{name[2:]} = {value}\n")
    return "".join(lines)


def test_the_slurm_job_resubmits_itself_after_a_budget_stop_under_torchrun_and_not_after_a_failure(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "sbatch").write_text('#!/bin/sh\necho "$@" >> "$SBATCH_LOG"\n')
    (stubs / "sbatch").chmod(0o755)
    data = tmp_path / "data.txt"
    data.write_text(INPUT_TXT.read_text())
    (tmp_path / "tiny.toml").write_text(as_toml([*TINY, "--data", str(data), "--max_iters", "4"]))
    out_dir, log = tmp_path / "out", tmp_path / "sbatch.log"
    env = {**os.environ, "PATH": f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SBATCH_LOG": str(log), "CONFIG": str(tmp_path / "tiny.toml"), "OUT_DIR": str(out_dir),
           "NPROC": "2", "MAX_TIME": "00:00:00.1"}  # less than the first checkpoint's write is guessed at
    job = lambda: subprocess.run(["bash", "slurm_job.sh", "--gradient_accumulation_steps", "1"], cwd=REPO,
                                 env=env, capture_output=True, text=True, timeout=300)
    first = job()  # starts the run; both ranks stop after step 0 and exit 75, which torchrun reports as 1
    assert first.returncode == RESUMABLE_EXIT, first.stderr
    assert "stopped after step 0: the next step would pass --max_time" in first.stderr
    assert list(out_dir.glob("iter-*.pt")) == [out_dir / "iter-1-stopped.pt"]
    assert log.read_text() == "slurm_job.sh --gradient_accumulation_steps 1\n"  # the next part queued
    with open(data, "a") as f:
        f.write("a line that changes the data\n")
    second = job()  # resumes, and fails: the data differs from the checkpoint's
    assert second.returncode == 1
    assert "the train data differs from the checkpoint's" in second.stderr
    # refused before it held out_dir, it wrote no exit_status, and the first launch's 75 was removed
    assert not (out_dir / "exit_status").exists()
    assert log.read_text() == "slurm_job.sh --gradient_accumulation_steps 1\n"  # nothing queued


def test_a_slurm_job_stopped_by_sigterm_queues_the_next_which_resumes_it_exactly(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "sbatch").write_text('#!/bin/sh\necho "$@" >> "$SBATCH_LOG"\n')
    (stubs / "sbatch").chmod(0o755)
    run = [*TINY, "--data", str(INPUT_TXT), "--eval_interval", "1000"]
    (tmp_path / "tiny.toml").write_text(as_toml([*run, "--max_iters", "1000"]))
    out_dir, log = tmp_path / "out", tmp_path / "sbatch.log"
    out_dir.mkdir()
    for name in ("iter-1-my-notes.pt", "iter-2-loss-3.1.pt", "iter-3-stopped.pt.bak"):  # a user's, no checkpoints
        (out_dir / name).write_text("notes")
    env = {**os.environ, "PATH": f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SBATCH_LOG": str(log), "CONFIG": str(tmp_path / "tiny.toml"), "OUT_DIR": str(out_dir), "NPROC": "1"}
    # the job in a process group of its own, every process of which SLURM signals at the job's time limit
    first = subprocess.Popen(["bash", "slurm_job.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and '"train_loss"' in metrics.read_text()):
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, stderr
    assert "from step 0" in stdout and "stopped by SIGTERM" in stderr  # a new run, whatever the user's files
    (stopped,) = out_dir.glob("iter-*-stopped.pt")
    assert log.read_text() == "slurm_job.sh\n"  # the next part queued, as after a --max_time stop
    steps = load_checkpoint(stopped)["progress"]["iter_num"] + 3
    second = subprocess.run(["bash", "slurm_job.sh", "--max_iters", str(steps)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)  # the next job, made to end soon
    assert second.returncode == 0, second.stderr
    assert f"from step {steps - 3}" in second.stdout
    assert log.read_text() == "slurm_job.sh\n"  # done: nothing more queued
    reference = tmp_path / "reference"
    uninterrupted = train_in_process(*run, "--max_iters", steps, "--out_dir", reference)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert train_losses(out_dir) == train_losses(reference)
    assert all((out_dir / name).read_text() == "notes"
               for name in ("iter-1-my-notes.pt", "iter-2-loss-3.1.pt", "iter-3-stopped.pt.bak"))


def test_a_profile_of_the_steps_asked_for_is_a_trace_and_a_table(tmp_path):
    out_dir = tmp_path / "out"
    result = train_in_process(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "6",
                              "--eval_interval", "6", "--profile_steps", "2:4")
    assert result.returncode == 0, result.stderr
    trace = out_dir / "profile" / "steps-2-3.pt.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::mm" in event.get("name", "") for event in events)  # the matmuls are in it
    assert f"profile of steps 2 to 3: {trace}" in result.stdout and "Self CPU" in result.stdout


def test_a_profile_window_past_the_run_ends_with_it(tmp_path):
    out_dir = tmp_path / "out"
    result = train_in_process(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "4",
                              "--eval_interval", "4", "--profile_steps", "2:100")
    assert result.returncode == 0, result.stderr
    assert (out_dir / "profile" / "steps-2-3.pt.trace.json").is_file()


def test_a_profile_window_wholly_past_the_run_is_a_warning():
    lines = []
    StepProfiler((5, 7), "out", "cpu", lines.append, max_iters=4)
    assert lines == ["warning: --profile_steps 5:7: the run ends at --max_iters 4, before the window's first "
                     "step; nothing is profiled"]


def test_a_profile_is_never_written_through_a_link(tmp_path):
    import torch
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "profile").symlink_to(elsewhere)
    lines = []
    with StepProfiler((0, 1), tmp_path, "cpu", lines.append, max_iters=4) as profiler:
        profiler.before(0)
        torch.ones(8).sum()
        profiler.after(0)
    assert lines[0].startswith(f"warning: --profile_steps: {tmp_path / 'profile'}/steps-0-0.pt.trace.json cannot "
                               f"be written ({tmp_path / 'profile'} is a symbolic link (to {elsewhere})")
    assert list(elsewhere.iterdir()) == []
