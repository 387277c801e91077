"""guards.py: the bisection that finds the largest micro-batch that fits (--auto_batch; the GPU's own trial is
measured by the allocator, on a GPU only), the loss-spike rule (--spike_guard), the time budget (--max_time) as
a rule and run for real with a short budget, and a profile of a few steps (--profile_steps) read back from its
trace."""

import json
import time

from conftest import INPUT_TXT, REPO, TINY, run_script, run_train, train_in_process
from checkpoint import load_checkpoint
from guards import RESUMABLE_EXIT, TimeBudget, is_loss_spike, largest_fitting


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


def test_a_run_past_its_time_budget_saves_and_exits_resumable(tmp_path):
    out_dir = tmp_path / "out"
    args = [*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--eval_interval", "1000"]
    started = time.monotonic()
    result = run_script(REPO / "tests" / "fault_injection.py", *args, "--max_iters", "1000",
                        "--max_time", "00:00:08", env={"FAULT": "slow_steps:0.5"})
    elapsed = time.monotonic() - started
    assert result.returncode == RESUMABLE_EXIT, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "would pass --max_time 00:00:08" in line and "--init_from resume" in line
    (stopped,) = out_dir.glob("iter-*-stopped.pt")
    step = load_checkpoint(stopped)["progress"]["iter_num"]
    assert 4 <= step < 16 and elapsed < 8 + 30  # the budget counts from the trainer's start
    resumed = run_train("--init_from", "resume", "--out_dir", out_dir, "--max_iters", str(step + 2))
    assert resumed.returncode == 0, resumed.stderr


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
