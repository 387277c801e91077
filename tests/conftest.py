"""Shared helpers for the tests: a tiny model configuration and a way to run the trainer for real."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INPUT_TXT = REPO / "input.txt"

# 2 layers, 64 wide, short blocks: a real GPT-2 that trains in milliseconds per step on the CPU
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32", "--batch_size", "4",
        "--gradient_accumulation_steps", "2", "--device", "cpu", "--compile", "False", "--dtype", "float32",
        "--warmup_iters", "2", "--lr_decay_iters", "20", "--learning_rate", "3e-3", "--min_lr", "3e-4",
        "--eval_iters", "2", "--log_interval", "1", "--hellaswag", "False"]


def run_script(script, *args, env=None, cwd=None, timeout=300):
    """Run one of the repo's scripts in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd or REPO, timeout=timeout)


def run_train(*args, **kwargs):
    return run_script("train_gpt2.py", *args, **kwargs)


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
    from fineweb import get_tokenizer, write_shard
    tokens = np.array(get_tokenizer().encode_ordinary(INPUT_TXT.read_text()), dtype=np.uint16)
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
    """One finished tiny run on input.txt, shared by the tests that only read its outputs."""
    out_dir = tmp_path_factory.mktemp("run") / "out"
    result = run_train(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "8",
                       "--eval_interval", "4")
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
