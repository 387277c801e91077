"""Fault injection: kills at exact points, signals, NaNs, a full disk, a dying rank, data changed under
a run. Each run is compared with the uninterrupted run (conftest's trained_run) or checked for a clear
message, and every checkpoint on disk must load at every point."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fineweb import write_shard
from checkpoint import load_checkpoint
from conftest import (INPUT_TXT, REPO, SPIKE_GUARD, TINY, eval_records, read_metrics, run_script, run_torchrun,
                      run_train, spiky_data, train_in_process, train_losses)
from fault_injection import injected

FAULTS = REPO / "tests" / "fault_injection.py"


def run_args(out_dir, *extra):
    """The arguments of conftest's trained_run (8 steps, checkpoints at 4 and 8), into out_dir."""
    return [*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "8", "--eval_interval", "4", *extra]


def run_with_fault(fault, *args, **kwargs):
    return run_script(FAULTS, *args, env={"FAULT": fault}, **kwargs)


def train_with_fault(fault, *args, **kwargs):
    """The trainer in this process with a fault that does not end the process (a NaN, a full disk, a shard
    cut short): its main, as conftest's train_in_process runs it."""
    with injected(fault):
        return train_in_process(*args, **kwargs)


def start_with_fault(fault, *args, torchrun=False):
    command = [sys.executable, str(FAULTS), *map(str, args)]
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   *command[1:]]
    env = {**os.environ, "FAULT": fault, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def wait_for(condition, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def logged_step(out_dir, step):
    path = out_dir / "metrics.jsonl"
    return path.exists() and any(m.get("step", -1) >= step and "train_loss" in m for m in read_metrics(out_dir))


def last_line(stderr):
    """The message a stopped run ends with (the progress bar's lines come before it)."""
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def assert_every_checkpoint_loads(out_dir):
    for path in [*out_dir.glob("iter-*.pt"), *out_dir.glob("best_val_loss.pt")]:
        load_checkpoint(path)  # raises on a partial or corrupt file


def delete_the_logs_of_a_run_without_checkpoints(out_dir):
    """What a user does before starting again: a new run refuses to write over another run's logs."""
    refused = train_in_process(*run_args(out_dir))
    assert refused.returncode == 1 and "holds files of a run that wrote no checkpoint" in refused.stderr
    for name in ("metrics.jsonl", "config.json"):
        (out_dir / name).unlink()


def assert_resumes_to_the_uninterrupted_run(out_dir, reference_dir):
    resumed = train_in_process(*run_args(out_dir, "--init_from", "resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(out_dir) == train_losses(reference_dir)
    assert eval_records(out_dir) == eval_records(reference_dir)
    final = load_checkpoint(next(out_dir.glob("iter-8-*.pt")))["model"]
    expected = load_checkpoint(next(reference_dir.glob("iter-8-*.pt")))["model"]
    assert all(torch.equal(final[name], expected[name]) for name in expected)


# -----------------------------------------------------------------------------
# SIGKILL anywhere, then --init_from resume: the same losses and weights as a run never killed


@pytest.mark.parametrize("fault", ["kill_at_step:6", "kill_in_eval:3", "kill_in_save:2"])
def test_killed_run_resumes_to_the_same_losses_and_weights(fault, tmp_path, trained_run):
    out_dir = tmp_path / "out"
    killed = run_with_fault(fault, *run_args(out_dir))
    assert killed.returncode == -signal.SIGKILL
    assert_every_checkpoint_loads(out_dir)
    assert not list(out_dir.glob("iter-8-*.pt"))
    assert_resumes_to_the_uninterrupted_run(out_dir, trained_run[0])
    assert not list(out_dir.glob(".*"))  # the killed write's temporary file was cleaned up


def test_killed_in_the_first_checkpoint_write_leaves_nothing_to_resume_and_restarts_clean(tmp_path, trained_run):
    out_dir = tmp_path / "out"
    killed = run_with_fault("kill_in_save:1", *run_args(out_dir))
    assert killed.returncode == -signal.SIGKILL
    assert not list(out_dir.glob("*.pt"))  # half a checkpoint never stands under a final name
    resume = train_in_process(*run_args(out_dir, "--init_from", "resume"))
    assert resume.returncode == 1 and "no iter-*.pt checkpoint" in resume.stderr
    delete_the_logs_of_a_run_without_checkpoints(out_dir)
    again = train_in_process(*run_args(out_dir))
    assert again.returncode == 0, again.stderr
    assert train_losses(out_dir) == train_losses(trained_run[0])


def test_sigkill_from_outside_during_a_slow_checkpoint_write(tmp_path, trained_run):
    out_dir = tmp_path / "out"
    process = start_with_fault("slow_save:4", *run_args(out_dir))
    wait_for(lambda: list(out_dir.glob(".iter-4-*.tmp")) if out_dir.exists() else False)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not list(out_dir.glob("iter-*.pt"))
    assert_every_checkpoint_loads(out_dir)
    delete_the_logs_of_a_run_without_checkpoints(out_dir)
    # nothing to resume: start again, the half-written file is cleared
    again = train_in_process(*run_args(out_dir))
    assert again.returncode == 0, again.stderr
    assert train_losses(out_dir) == train_losses(trained_run[0])


# -----------------------------------------------------------------------------
# Polite stops: SIGTERM or Ctrl-C checkpoint at the end of the step; a second Ctrl-C stops at once


def test_sigterm_saves_a_resumable_checkpoint_and_exits_cleanly(tmp_path, trained_run):
    out_dir = tmp_path / "out"
    process = start_with_fault("slow_steps:0.5", *run_args(out_dir))
    wait_for(lambda: logged_step(out_dir, 5))
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in stderr and "--init_from resume" in stderr and "Traceback" not in stderr
    (stopped,) = out_dir.glob("iter-*-stopped.pt")
    assert load_checkpoint(stopped)["progress"]["iter_num"] >= 6
    assert_resumes_to_the_uninterrupted_run(out_dir, trained_run[0])


def test_a_stop_just_before_an_evaluation_is_evaluated_on_resume_even_after_a_cut_log_line(tmp_path, trained_run):
    out_dir = tmp_path / "out"
    stopped = run_with_fault("sigterm_at_step:3", *run_args(out_dir))
    assert stopped.returncode == 128 + signal.SIGTERM
    assert [p.name for p in out_dir.glob("iter-*.pt")] == ["iter-4-stopped.pt"]  # saved before step 4's eval
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train_lo')  # a line a kill cut short
    assert_resumes_to_the_uninterrupted_run(out_dir, trained_run[0])
    assert next(out_dir.glob("iter-4-loss-*.pt"))  # step 4 was evaluated and checkpointed after all


def test_second_ctrl_c_stops_at_once_without_a_broken_file(tmp_path):
    out_dir = tmp_path / "out"
    process = start_with_fault("slow_save:30", *run_args(out_dir))
    wait_for(lambda: list(out_dir.glob(".iter-4-*.tmp")) if out_dir.exists() else False)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=20)  # well before the 30 s write would have finished
    assert process.returncode == 130
    assert "stopped at once" in stderr and "Traceback" not in stderr
    assert not list(out_dir.glob("*.pt")) and not list(out_dir.glob(".*.tmp"))


def test_sigterm_to_a_torchrun_job_stops_every_rank_with_a_checkpoint(tmp_path):
    out_dir = tmp_path / "out"
    process = start_with_fault("slow_steps:0.5", *run_args(out_dir, "--gradient_accumulation_steps", "1"),
                               torchrun=True)
    wait_for(lambda: logged_step(out_dir, 5))
    process.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    _, stderr = process.communicate(timeout=90)
    assert process.returncode != 0
    assert "stopped by SIGTERM" in stderr
    (stopped,) = out_dir.glob("iter-*-stopped.pt")
    iter_num = load_checkpoint(stopped)["progress"]["iter_num"]
    resumed = run_torchrun(*run_args(out_dir, "--gradient_accumulation_steps", "1", "--init_from", "resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {iter_num}" in resumed.stdout
    assert sorted(train_losses(out_dir)) == list(range(8))


# -----------------------------------------------------------------------------
# Numerics, disk, ranks, data


def test_a_non_finite_step_is_skipped_and_counted(tmp_path):
    out_dir = tmp_path / "out"
    result = train_with_fault("nan_steps:3", *run_args(out_dir))
    assert result.returncode == 0, result.stderr
    assert "step 3: non-finite loss or gradient norm, update skipped (1 in a row)" in result.stdout
    assert any(m.get("skipped") and m["step"] == 3 for m in read_metrics(out_dir))
    checkpoint = load_checkpoint(next(out_dir.glob("iter-8-*.pt")))
    assert checkpoint["progress"]["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())


def test_repeated_non_finite_steps_stop_the_run_naming_the_step_and_the_last_checkpoint(tmp_path):
    out_dir = tmp_path / "out"
    result = train_with_fault("nan_steps:5,6,7", *run_args(out_dir, "--max_bad_steps", "3"))
    assert result.returncode == 1
    line = last_line(result.stderr)
    last_good = next(out_dir.glob("iter-4-*.pt"))
    assert line == (f"error: stopped at step 7: 3 steps in a row had a non-finite loss or gradient norm; the last "
                    f"good checkpoint is {last_good}: continue from it with a lower --learning_rate")


def test_the_last_good_checkpoint_after_non_finite_steps_is_the_one_from_before_them(tmp_path):
    out_dir = tmp_path / "out"  # checkpoints at 2 and 4: the one at 4 is written among the bad steps
    result = run_with_fault("nan_steps:3,4,5", *run_args(out_dir, "--max_bad_steps", "3", "--eval_interval", "2"))
    assert result.returncode == 1
    assert f"the last good checkpoint is {next(out_dir.glob('iter-2-*.pt'))}:" in last_line(result.stderr)


def test_a_run_stopped_after_a_loss_spike_resumes_to_the_same_figures_as_the_uninterrupted_run(tmp_path, spiky_run):
    data, reference, _ = spiky_run  # steps 25 to 29 spike, and 27 rolls back to step 20
    out_dir = tmp_path / "out"
    stopped = run_with_fault("sigterm_at_step:25", *TINY, *SPIKE_GUARD, "--data", data, "--out_dir", out_dir)
    assert stopped.returncode == 128 + signal.SIGTERM
    assert "step 25: a loss spike, update skipped (1 in a row)" in stopped.stdout
    assert last_line(stopped.stderr).startswith("stopped by SIGTERM after step 25: saved ")
    assert "iter-26-stopped.pt, where step 26 is the next to run" in last_line(stopped.stderr)
    resumed = run_train("--init_from", "resume", "--out_dir", out_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "step 26: a loss spike, update skipped (2 in a row)" in resumed.stdout
    assert train_losses(out_dir) == train_losses(reference)
    assert eval_records(out_dir) == eval_records(reference)
    rolled = lambda run: [r for r in read_metrics(run) if "rolled_back_to" in r]
    assert rolled(out_dir) == rolled(reference)
    final = load_checkpoint(next(out_dir.glob("iter-32-*.pt")))["model"]
    expected = load_checkpoint(next(reference.glob("iter-32-*.pt")))["model"]
    assert all(torch.equal(final[name], expected[name]) for name in expected)


def test_loss_spikes_before_the_first_checkpoint_stop_the_run_with_the_weights_saved(tmp_path):
    data = spiky_data(tmp_path / "shards", 25, 3)
    out_dir = tmp_path / "out"
    result = run_train(*TINY, *SPIKE_GUARD, "--data", data, "--out_dir", out_dir, "--eval_interval", "100")
    assert result.returncode == 1
    saved = out_dir / "iter-28-stopped.pt"
    assert last_line(result.stderr) == (  # no update reached the weights: they are saved
        f"error: stopped at step 27: 3 steps in a row had loss spikes; the last good checkpoint is {saved}: "
        "continue from it with a lower --learning_rate")
    checkpoint = load_checkpoint(saved)
    assert checkpoint["progress"]["skipped_steps"] == 3 and checkpoint["spike_guard"]["bad_steps"] == 3


def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoints(tmp_path):
    out_dir = tmp_path / "out"
    result = train_with_fault("disk_full_at:2", *run_args(out_dir))
    assert result.returncode == 1
    line = last_line(result.stderr)
    assert "could not write checkpoint" in line and "No space left on device" in line
    assert "--init_from resume" in line
    assert not list(out_dir.glob("iter-8-*")) and not list(out_dir.glob(".*.tmp"))
    assert load_checkpoint(next(out_dir.glob("iter-4-*.pt")))["progress"]["iter_num"] == 4
    assert load_checkpoint(out_dir / "best_val_loss.pt")["progress"]["iter_num"] == 4


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of 60 MB (one tiny checkpoint is 40 MB), and a function that resizes it; skipped where
    this process may not mount one (not root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    resize = lambda size: subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)
    yield mount, resize
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_best_copy_that_did_not_fit_is_written_on_resume_and_its_checkpoint_never_pruned(small_disk):
    mount, resize = small_disk
    out_dir = mount / "out"
    args = [*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--eval_interval", "10"]
    result = train_in_process(*args, "--max_iters", "10")  # iter-10 fits; its copy best_val_loss.pt does not
    assert result.returncode == 1
    line = last_line(result.stderr)
    assert "but not its copy" in line and "iter-10-loss-" in line and "No space left" in line, result.stderr
    assert "Traceback" not in result.stderr and not list(out_dir.glob(".*.tmp"))
    assert not (out_dir / "best_val_loss.pt").exists()
    resize("400m")
    resumed = train_in_process("--init_from", "resume", "--out_dir", out_dir, "--max_iters", "12",
                               "--keep_last", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert "wrote " in resumed.stdout and "could not be written before" in resumed.stdout
    best = load_checkpoint(out_dir / "best_val_loss.pt")
    val = {m["step"]: m["val_loss"] for m in read_metrics(out_dir) if "val_loss" in m and m["step"] > 0}
    assert best["val_loss"] == min(val.values()) and best["progress"]["best_step"] == min(val, key=val.get)


def test_a_best_copy_that_still_does_not_fit_stops_the_resume_and_keeps_the_checkpoint(small_disk):
    mount, _ = small_disk
    out_dir = mount / "out"
    result = train_in_process(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--eval_interval", "10",
                              "--max_iters", "10")
    assert result.returncode == 1 and not (out_dir / "best_val_loss.pt").exists()
    for _ in range(2):  # the disk is still full: the copy fails again, before any step or pruning
        resumed = train_in_process("--init_from", "resume", "--out_dir", out_dir, "--max_iters", "20",
                                   "--keep_last", "1")
        assert resumed.returncode == 1
        assert "No space left on device" in last_line(resumed.stderr)
        assert load_checkpoint(next(out_dir.glob("iter-10-*.pt")))["progress"]["best_step"] == 10


def test_a_full_disk_while_logging_stops_in_one_line_without_a_cut_line(small_disk, tmp_path):
    mount, resize = small_disk
    out_dir = mount / "out"
    filler = mount / "filler"
    process = start_with_fault("slow_steps:0.3", *TINY, "--data", INPUT_TXT, "--out_dir", out_dir,
                               "--max_iters", "400", "--eval_interval", "1000")
    wait_for(lambda: (out_dir / "metrics.jsonl").exists())
    with open(filler, "wb", buffering=0) as f:  # fill the disk to its last byte
        for size in (65536, 1):
            try:
                while True:
                    f.write(b"x" * size)
            except OSError:
                pass
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert "cannot append to" in last_line(stderr) and "Traceback" not in stderr
    filler.unlink()
    assert (out_dir / "metrics.jsonl").read_bytes().endswith(b"\n")  # no line cut mid-way


def test_keep_last_keeps_the_newest_checkpoints_and_the_best(tmp_path):
    out_dir = tmp_path / "out"
    result = train_in_process(*run_args(out_dir, "--eval_interval", "2", "--keep_last", "2"))
    assert result.returncode == 0, result.stderr
    assert sorted(int(p.name.split("-")[1]) for p in out_dir.glob("iter-*.pt")) == [6, 8]
    best = load_checkpoint(out_dir / "best_val_loss.pt")
    val = {m["step"]: m["val_loss"] for m in read_metrics(out_dir) if "val_loss" in m and m["step"] > 0}
    assert best["val_loss"] == min(val.values())


@pytest.mark.parametrize("fsdp", ["False", "True"], ids=["ddp", "fsdp"])
def test_a_killed_rank_does_not_leave_the_other_hanging(tmp_path, fsdp):
    start = time.monotonic()
    process = start_with_fault("die_at_step:3@1", *run_args(tmp_path / "out", "--gradient_accumulation_steps", "1",
                                                           "--ddp_timeout", "30", "--fsdp", fsdp), torchrun=True)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert time.monotonic() - start < 100
    assert "ChildFailedError" in stderr or "lost contact" in stderr


def shard_dir(tmp_path, train_tokens):
    data = tmp_path / "shards"
    data.mkdir()
    rng = np.random.default_rng(0)
    write_shard(data / "t_val_000000.bin", rng.integers(0, 50257, 5000, dtype=np.uint16))
    for i, tokens in enumerate(train_tokens):
        write_shard(data / f"t_train_{i + 1:06d}.bin", tokens)
    return data


def test_token_ids_past_the_vocabulary_are_reported_with_the_file(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 50257, 20000, dtype=np.uint16)
    tokens[::32] = 60000  # the first token of every 32-token row, so the first batch holds one, shuffled or not
    data = shard_dir(tmp_path, [tokens])
    result = train_in_process(*TINY, "--data", data, "--out_dir", tmp_path / "out", "--max_iters", "4")
    assert result.returncode == 1
    line = last_line(result.stderr)
    assert line.startswith("error: t_train_000001.bin: token id 60000") and "outside the tokenizer's 50,257 ids" in line


def test_a_shard_truncated_during_the_run_is_reported_with_the_file(tmp_path):
    rng = np.random.default_rng(1)
    # shards of 2,000 tokens: the run opens the second (checking it again) after 7 steps of the first
    data = shard_dir(tmp_path, [rng.integers(0, 50257, 2000, dtype=np.uint16) for _ in range(2)])
    victim = data / "t_train_000002.bin"
    result = train_with_fault(f"truncate_shard_at_step:1@{victim}", *TINY, "--data", data, "--out_dir",
                              tmp_path / "out", "--max_iters", "100", "--eval_interval", "100")
    assert result.returncode == 1
    line = last_line(result.stderr)
    assert line.startswith(f"error: {victim} changed")


# -----------------------------------------------------------------------------
# Weights that diverge: never saved, so never counted by --keep_last, called good or resumed from


@pytest.mark.parametrize("fault, flags, stop", [
    # finite weights of 1e30, whose val loss is nan, at an evaluation (the --keep_last 1 would have pruned step 4's)
    ("", ["--learning_rate", "1e30", "--min_lr", "1e29", "--eval_interval", "1", "--keep_last", "1",
          "--num_samples", "1"],  # whose logits no sample can be drawn from
     "stopped at step 5: its evaluation's val loss is nan: the weights have diverged, and are not saved"),
    # weights of inf when SIGTERM asks for a checkpoint
    ("sigterm_at_step:4", ["--learning_rate", "1e300", "--min_lr", "1e299"],
     "stopped after step 4: transformer.wte.weight holds "),
    # and when --max_time does (each step 1 s on the budget's clock: steps 4 and 5 fit in 3 s)
    ("budget_clock:1", ["--learning_rate", "1e300", "--min_lr", "1e299", "--max_time", "00:00:03"],
     "stopped after step 5: transformer.wte.weight holds "),
], ids=["val-loss-nan", "sigterm", "max-time"])
def test_diverged_weights_are_never_saved_and_the_stop_names_the_last_good_checkpoint(fault, flags, stop, tmp_path,
                                                                                     trained_run):
    out_dir = tmp_path / "out"
    first = train_in_process(*run_args(out_dir, "--max_iters", "4"))
    assert first.returncode == 0, first.stderr
    good = next(out_dir.glob("iter-4-*.pt"))
    with injected(fault) if fault else contextlib.nullcontext():
        diverged = train_in_process("--init_from", "resume", "--out_dir", out_dir, "--max_iters", "8", *flags)
    assert diverged.returncode == 1
    assert last_line(diverged.stderr).startswith(f"error: {stop}")
    assert last_line(diverged.stderr).endswith(f"; the last good checkpoint is {good}: continue from it with a lower "
                                               "--learning_rate")
    assert [p.name for p in out_dir.glob("iter-*.pt")] == [good.name]  # nothing of the diverged weights
    assert (out_dir / "exit_status").read_text() == "1\n"  # no job script queues it again
    assert_resumes_to_the_uninterrupted_run(out_dir, trained_run[0])  # the command line's rates, not 1e30's


def test_the_checkpoint_from_before_non_finite_steps_is_never_pruned_while_they_last(tmp_path):
    out_dir = tmp_path / "out"  # checkpoints after every step, one kept: steps 5-7 bad, checkpoints at 6 and 7
    result = train_with_fault("nan_steps:5,6,7", *run_args(out_dir, "--eval_interval", "1", "--keep_last", "1"))
    assert result.returncode == 1
    before_them = out_dir / next(p.name for p in out_dir.glob("iter-5-*.pt"))
    assert f"the last good checkpoint is {before_them}:" in last_line(result.stderr)
    assert load_checkpoint(before_them)["progress"]["iter_num"] == 5
    assert sorted(p.name.split("-")[1] for p in out_dir.glob("iter-*.pt")) == ["5", "7"]


# -----------------------------------------------------------------------------
# A checkpoint that cannot be pruned: a warning, and the run goes on


def make_immutable(path):
    """chattr +i on path (as root, on a file system that has the attribute), else the test is skipped."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root and a file system with the attribute")


@pytest.mark.parametrize("how", ["immutable", "permission", "busy"])
def test_a_checkpoint_that_cannot_be_pruned_is_a_warning_and_the_run_goes_on(how, tmp_path, trained_run,
                                                                           monkeypatch):
    import errno
    from pathlib import Path
    out_dir = tmp_path / "out"
    first = train_in_process(*run_args(out_dir, "--max_iters", "2", "--eval_interval", "2"))
    assert first.returncode == 0, first.stderr
    stuck = next(out_dir.glob("iter-2-*.pt"))
    if how == "immutable":
        make_immutable(stuck)
    else:
        original, code = Path.unlink, errno.EACCES if how == "permission" else errno.EBUSY

        def unlink(path, missing_ok=False):
            if path.name == stuck.name:
                raise OSError(code, os.strerror(code), str(path))
            return original(path, missing_ok=missing_ok)
        monkeypatch.setattr(Path, "unlink", unlink)
    try:
        resumed = train_in_process(*run_args(out_dir, "--init_from", "resume", "--eval_interval", "2",
                                             "--keep_last", "1"))
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], capture_output=True)
    assert resumed.returncode == 0, resumed.stderr
    warning = f"warning: --keep_last 1: cannot delete {stuck} ("
    assert resumed.stdout.count(warning) == 1, resumed.stdout  # said once, not at every checkpoint
    assert "; it stays, and the run goes on" in resumed.stdout
    assert sorted(p.name.split("-")[1] for p in out_dir.glob("iter-*.pt")) == ["2", "8"]
    assert train_losses(out_dir) == train_losses(trained_run[0])
