"""Shared helpers for the tests: a tiny model configuration, and ways to run the trainer and the other scripts
for real, in a process of their own or in this one."""

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest

# One thread for torch, here and in every process the tests start: the models are tiny, and on a machine whose
# cores are busy a thread per core makes each step several times slower. Set before torch is imported, so that
# this process and every child (which inherits the environment) starts with one.
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)  # in case a plugin imported torch before this file

REPO = Path(__file__).resolve().parent.parent
INPUT_TXT = REPO / "input.txt"

# 2 layers, 64 wide, short blocks: a real GPT-2 that trains in milliseconds per step on the CPU. No samples at
# the evaluations (their 32 steps of decoding cost more than the training steps of a short run): the tests of
# the samples ask for them with --num_samples; they draw from a generator of their own, so the losses are the
# same with or without them.
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32", "--batch_size", "4",
        "--gradient_accumulation_steps", "2", "--device", "cpu", "--compile", "False", "--dtype", "float32",
        "--warmup_iters", "2", "--lr_decay_iters", "20", "--learning_rate", "3e-3", "--min_lr", "3e-4",
        "--eval_iters", "2", "--log_interval", "1", "--hellaswag", "False", "--num_samples", "0"]


def run_script(script, *args, env=None, cwd=None, timeout=300):
    """Run one of the repo's scripts in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd or REPO, timeout=timeout)


def run_train(*args, **kwargs):
    return run_script("train_gpt2.py", *args, **kwargs)


class Captured(io.StringIO):
    """A stream standing in for stdout or stderr (sample.py reconfigures its stdout's error handling)."""

    def reconfigure(self, **kwargs):
        pass


def run_main(script, *args, env=None, cwd=None):
    """One of the repo's scripts run through its main(argv) in this process, without the start-up of a new
    Python and torch, answered as run_script answers: its exit status and what it printed, with warnings on
    stderr and line ends read as a text pipe reads them. For the cases where a separate process is not the
    point; environment variables that a library reads at import (PYTHONPATH, HF_HOME) need run_script."""
    argv = [str(arg) for arg in args]
    main = importlib.import_module(Path(script).stem).main
    stdout, stderr = Captured(), Captured()

    def show_warning(message, category, filename, lineno, file=None, line=None):
        stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    returncode = 0
    try:
        os.environ.update(env or {})
        os.chdir(cwd or REPO)
        sys.argv = [str(REPO / script), *argv]  # argparse names the script in its messages from argv[0]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.resetwarnings()  # a fresh Python's filters: warnings shown once per place, to stderr
            for action, category in (("ignore", DeprecationWarning), ("ignore", PendingDeprecationWarning),
                                     ("ignore", ImportWarning), ("ignore", ResourceWarning)):
                warnings.simplefilter(action, category)
            warnings.showwarning = show_warning
            try:
                main(argv)
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=stderr)
                returncode = 1 if isinstance(e.code, str) else e.code or 0
            except Exception:  # as an uncaught exception ends a process: its traceback on stderr, status 1
                traceback.print_exc(file=stderr)
                returncode = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    text = lambda stream: stream.getvalue().replace("\r\n", "\n").replace("\r", "\n")
    return subprocess.CompletedProcess([sys.executable, str(REPO / script), *argv], returncode, text(stdout),
                                       text(stderr))


def train_in_process(*args, **kwargs):
    """train_gpt2.py's main in this process (run_main): a run's behaviour without a process start-up."""
    return run_main("train_gpt2.py", *args, **kwargs)


def run_torchrun(*args, timeout=300):
    """train_gpt2.py as 2 processes under torchrun (Gloo on the CPU)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "train_gpt2.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def read_metrics(out_dir):
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def eval_records(out_dir):
    """The evaluations' records, without how long each took (the one figure a resumed run cannot repeat)."""
    return [{k: v for k, v in m.items() if k != "eval_seconds"} for m in read_metrics(out_dir) if "val_loss" in m]


def train_losses(out_dir):
    return {m["step"]: m["train_loss"] for m in read_metrics(out_dir) if "train_loss" in m}


def snapshot(directory):
    """Every file under directory with its bytes, to prove that nothing was changed."""
    directory = Path(directory)
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size): a real tmpfs of size bytes (a whole number of pages), mounted under tmp_path; the tests
    that use it are skipped where this process may not mount one (not root)."""
    mounts = []

    def mount(size):
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs needs root")
        mounts.append(path)
        return path
    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def spiky_data(directory, first_step, steps):
    """Shards of input.txt's tokens whose batches of steps first_step to first_step + steps - 1, read in
    order (--shuffle False) with TINY's batch, are random tokens: a loss spike each."""
    import numpy as np
    from fineweb import load_tokenizer, write_shard
    tokens = np.array(load_tokenizer().encode(INPUT_TXT.read_text()), dtype=np.uint16)
    step_tokens = 4 * 2 * 32  # TINY's batch x accumulation x block
    noise = np.random.default_rng(0).integers(0, 50257, steps * step_tokens, dtype=np.uint16)
    train = tokens[:100_000].copy()
    train[first_step * step_tokens:(first_step + steps) * step_tokens] = noise
    directory.mkdir()
    write_shard(directory / "x_val_000000.bin", tokens[-20_000:])
    write_shard(directory / "x_train_000001.bin", train)
    return directory


# a tight guard (the loss still falls), and a checkpoint every 10 steps
SPIKE_GUARD = ["--shuffle", "False", "--spike_guard", "3", "--spike_window", "10", "--eval_interval", "10",
               "--lr_decay_iters", "100", "--max_iters", "32"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One finished tiny run on input.txt (with the default 4 samples at each evaluation), shared by the tests
    that only read its outputs and the tests that compare another run with it."""
    out_dir = tmp_path_factory.mktemp("run") / "out"
    result = train_in_process(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "8",
                              "--eval_interval", "4", "--num_samples", "4")
    assert result.returncode == 0, result.stderr
    return out_dir, result


@pytest.fixture(scope="session")
def spiky_run(tmp_path_factory):
    """A run whose batches of steps 25 to 29 are loss spikes (checkpoints every 10 steps, 32 steps)."""
    data = spiky_data(tmp_path_factory.mktemp("spiky") / "shards", 25, 5)
    out_dir = data.parent / "out"
    result = run_train(*TINY, *SPIKE_GUARD, "--data", data, "--out_dir", out_dir)
    assert result.returncode == 0, result.stderr
    return data, out_dir, result
