"""The trackers, TensorBoard and Weights & Biases (offline, no network): what they hold read back from their files
equals metrics.jsonl, a resumed run continues the same wandb run, and a tracker without its package stops the
trainer at start-up in one line. The tests that read a tracker's files are skipped without its package."""

import json
import shutil
import struct
import subprocess
import sys

import pytest

from conftest import INPUT_TXT, REPO, TINY, read_metrics, run_train, train_in_process
from checkpoint import load_checkpoint
from rundir import RunLog

RUN = [*TINY, "--data", INPUT_TXT, "--max_iters", "6", "--eval_interval", "3", "--wandb_log", "True",
       "--tensorboard", "True"]


def offline_wandb(tmp):
    """wandb kept on disk, its caches and settings in tmp: nothing is sent or written elsewhere."""
    return {"WANDB_MODE": "offline", "WANDB_CACHE_DIR": str(tmp / "cache"), "WANDB_CONFIG_DIR": str(tmp / "config"),
            "WANDB_DATA_DIR": str(tmp / "data"), "WANDB_ARTIFACT_DIR": str(tmp / "artifacts"), "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A tiny run of 6 steps, evaluated at 0, 3 and 6, with both trackers on."""
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    tmp = tmp_path_factory.mktemp("tracked")
    result = run_train(*RUN, "--out_dir", tmp / "out", env=offline_wandb(tmp))
    assert result.returncode == 0, result.stderr
    return tmp / "out"


@pytest.fixture(scope="module")
def resumed_run(tracked_run, tmp_path_factory):
    """The tracked run as if it had died between its checkpoints at steps 3 and 6, then resumed."""
    tmp = tmp_path_factory.mktemp("resumed")
    out_dir = shutil.copytree(tracked_run, tmp / "out")
    next(out_dir.glob("iter-6-*.pt")).unlink()
    result = run_train("--init_from", "resume", "--out_dir", out_dir, env=offline_wandb(tmp))
    assert result.returncode == 0, result.stderr
    return out_dir


# -----------------------------------------------------------------------------
# Reading the trackers' files back


def wandb_records(path):
    """The protobuf Records of a wandb run file (run-ID.wandb): a 7-byte header (":W&B", a magic, a version),
    then LevelDB's log format: 32 KiB blocks of chunks, each a 7-byte header (CRC-32, length, type: 1 whole,
    2 first, 3 middle, 4 last) and its bytes; a block's last 6 bytes or fewer are padding."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:  # zeros: the end of what was written
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_runs(out_dir):
    """[(run id, config, {step: {figure: value}})] for each offline wandb run in out_dir, oldest first."""
    runs = []
    for path in sorted((out_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run_id, config, history = None, {}, {}
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "run":
                run_id = record.run.run_id
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
        runs.append((run_id, config, history))
    return runs


def tensorboard_scalars(out_dir):
    """{tag: [(step, value)]} as TensorBoard shows out_dir/tensorboard/ (purged events hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def figures(record):
    return {k: v for k, v in record.items() if k != "step" and v is not None}


def by_step(records):
    """metrics.jsonl's figures merged step by step, a later record's on top: as wandb keeps one row a step."""
    merged = {}
    for record in records:
        merged.setdefault(record["step"], {}).update(figures(record))
    return merged


def by_figure(records):
    """metrics.jsonl as {figure: [(step, value)]}, in the order recorded."""
    series = {}
    for record in records:
        for name, value in figures(record).items():
            series.setdefault(name, []).append((record["step"], value))
    return series


# -----------------------------------------------------------------------------
# What the trackers hold is metrics.jsonl


def test_wandb_history_holds_every_figure_of_metrics_jsonl_step_by_step(tracked_run):
    [(_, _, history)] = wandb_runs(tracked_run)
    expected = by_step(read_metrics(tracked_run))
    assert history == expected
    assert sorted(history) == list(range(7)) and {"val_loss", "train_loss", "lr", "grad_norm", "tokens_per_sec",
                                                 "ms_per_step", "tokens"} <= set(history[3])


def test_the_wandb_run_carries_the_run_config(tracked_run):
    [(_, config, _)] = wandb_runs(tracked_run)
    assert {k: v for k, v in config.items() if not k.startswith("_")} == json.loads(
        (tracked_run / "config.json").read_text())


def test_tensorboard_scalars_equal_metrics_jsonl_step_by_step(tracked_run):
    scalars, expected = tensorboard_scalars(tracked_run), by_figure(read_metrics(tracked_run))
    assert set(scalars) == set(expected)
    for tag, points in expected.items():
        assert scalars[tag] == [(step, pytest.approx(value, rel=1e-6)) for step, value in points], tag


def test_a_resumed_run_continues_the_same_wandb_run(tracked_run, resumed_run):
    (first_id, _, first), (resumed_id, _, resumed) = wandb_runs(resumed_run)
    assert resumed_id == first_id
    assert load_checkpoint(next(resumed_run.glob("iter-6-*.pt")))["progress"]["wandb_run_id"] == first_id
    assert sorted(resumed) == [3, 4, 5, 6]  # the resumed run's steps: from the checkpoint at step 3 on
    assert by_step(read_metrics(resumed_run))[6] == resumed[6]


def test_tensorboard_after_a_resume_shows_what_metrics_jsonl_holds(resumed_run):
    scalars, expected = tensorboard_scalars(resumed_run), by_figure(read_metrics(resumed_run))
    assert len(list((resumed_run / "tensorboard").iterdir())) == 2  # an event file for each process
    for tag, points in expected.items():
        assert scalars[tag] == [(step, pytest.approx(value, rel=1e-6)) for step, value in points], tag


# -----------------------------------------------------------------------------
# One place sends the records; the packages are optional


class Recorder:
    def __init__(self):
        self.logged, self.closed = [], None

    def log(self, step, figures):
        self.logged.append((step, figures))

    def close(self, failed=False):
        self.closed = failed


def test_each_record_goes_to_every_tracker_as_its_numbers_by_step(tmp_path):
    log = RunLog(tmp_path, enabled=True)
    log.trackers = [Recorder(), Recorder()]
    trackers = list(log.trackers)
    log.record(step=3, val_loss=2.5, tokens=768)
    log.record(step=3, train_loss=float("nan"), lr=1e-3, tokens=1024)
    log.record(step=4, skipped=True, lr=1e-3)
    log.close(failed=True)
    for tracker in trackers:
        assert tracker.logged == [(3, {"val_loss": 2.5, "tokens": 768}), (3, {"lr": 1e-3, "tokens": 1024}),
                                  (4, {"lr": 1e-3})]
        assert tracker.closed is True
    assert read_metrics(tmp_path)[1]["train_loss"] is None  # metrics.jsonl keeps every record whole


def test_a_rank_other_than_0_sends_nothing(tmp_path):
    log = RunLog(tmp_path, enabled=False)
    log.trackers = [Recorder()]
    log.record(step=0, val_loss=2.5)
    assert log.trackers[0].logged == []


@pytest.mark.parametrize("flag, package", [("--wandb_log", "wandb"), ("--tensorboard", "tensorboard")])
def test_a_tracker_without_its_package_stops_the_trainer_at_start_up_in_one_line(flag, package, tmp_path):
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / f"{package}.py").write_text(f"raise ImportError('No module named {package}')\n")
    result = run_train(*TINY, "--data", INPUT_TXT, "--out_dir", tmp_path / "out", "--max_iters", "2", flag, "True",
                       env={"PYTHONPATH": str(tmp_path / "shim")})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {flag} True needs {package}: pip install {package}"]
    assert not (tmp_path / "out").exists()  # before any work


def test_importing_the_trainer_loads_no_tracker_package():
    code = "import sys, train_gpt2; print(sorted({'wandb', 'tensorboard'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("flag, folder", [("--tensorboard", "tensorboard"), ("--wandb_log", "wandb")])
def test_a_tracker_folder_that_is_a_file_is_named_at_start_up(flag, folder, tmp_path):
    pytest.importorskip({"tensorboard": "tensorboard", "wandb": "wandb"}[folder])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / folder).write_text("a file of the user's")
    result = train_in_process(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "2", flag, "True",
                              env=offline_wandb(tmp_path))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"{out_dir / folder}, which is a file" in line and f"{flag} False" in line
    assert (out_dir / folder).read_text() == "a file of the user's"


class Failing(Recorder):
    def log(self, step, figures):
        raise ConnectionResetError(104, "Connection reset by peer")


def test_a_failing_tracker_is_dropped_with_one_warning_and_the_record_kept(tmp_path):
    log = RunLog(tmp_path, enabled=True)
    printed = []
    log.print = printed.append
    failing, working = Failing(), Recorder()
    failing.name, working.name = "--wandb_log", "--tensorboard"
    log.trackers = [failing, working]
    log.record(step=1, val_loss=2.5)
    log.record(step=2, val_loss=2.4)
    assert log.trackers == [working] and len(working.logged) == 2
    (warning,) = printed
    assert warning.startswith("warning: --wandb_log failed (ConnectionResetError") and "goes on" in warning
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_a_run_whose_wandb_service_dies_trains_on_to_the_end(tmp_path):
    pytest.importorskip("wandb")
    import os
    import signal
    import time
    out_dir = tmp_path / "out"
    command = [sys.executable, str(REPO / "tests" / "fault_injection.py"), *TINY, "--data", INPUT_TXT,
               "--out_dir", out_dir, "--max_iters", "30", "--eval_interval", "1000", "--wandb_log", "True"]
    env = {**os.environ, **offline_wandb(tmp_path), "FAULT": "slow_steps:0.2", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    services = []
    while not services and time.monotonic() < deadline:  # wandb's service: a child process of the trainer
        time.sleep(0.2)
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout
        services = [int(pid) for pid in children.split()]
    assert services, "wandb started no service process"
    metrics = out_dir / "metrics.jsonl"
    while not (metrics.exists() and "train_loss" in metrics.read_text()):  # the tracker is in use
        time.sleep(0.2)
    for pid in services:
        os.kill(pid, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "warning: --wandb_log failed" in stdout and "Traceback" not in stderr
    assert [r["step"] for r in read_metrics(out_dir) if "train_loss" in r] == list(range(30))
