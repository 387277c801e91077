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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One finished tiny run on input.txt, shared by the tests that only read its outputs."""
    out_dir = tmp_path_factory.mktemp("run") / "out"
    result = run_train(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "8",
                       "--eval_interval", "4")
    assert result.returncode == 0, result.stderr
    return out_dir, result
