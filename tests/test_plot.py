"""plot.py: a real PNG of the expected size from one or more runs, the trainer's --plot, and a clear message
without matplotlib (an optional dependency: the tests that draw are skipped without it)."""

import json
import struct

import pytest

import plot
from conftest import INPUT_TXT, TINY, run_script, run_train


def png_size(path):
    """(width, height) from the PNG signature and the IHDR chunk that must follow it."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def write_metrics(folder, hellaswag=False):
    """A run's metrics.jsonl as the trainer writes it, with a half-written last line."""
    folder.mkdir(parents=True)
    lines = [{"step": s, "train_loss": 10 - s / 10, "tokens": (s + 1) * 256} for s in range(20)]
    lines += [{"step": s, "val_loss": 10.5 - s / 10, "tokens": s * 256} for s in (0, 10, 20)]
    lines += [{"step": s, "hellaswag_acc_norm": 0.25 + s / 1000} for s in (0, 10, 20)] if hellaswag else []
    lines += [{"step": 20, "val_loss": 8.0, "eval_only": True}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines) + '{"step": 2')
    return folder / "metrics.jsonl"


def test_plot_command_draws_runs_side_by_side_with_hellaswag(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [write_metrics(tmp_path / "run-a"), write_metrics(tmp_path / "run-b", hellaswag=True)]
    result = run_script("plot.py", *runs, "--out", tmp_path / "plots" / "compare.png")
    assert result.returncode == 0, result.stderr
    assert png_size(tmp_path / "plots" / "compare.png") == (1400, 500)  # two panels: loss and HellaSwag
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["compare.png"]  # no temporary file left


def test_a_run_without_hellaswag_gets_the_loss_panel_only(tmp_path):
    pytest.importorskip("matplotlib")
    plot.plot_runs([write_metrics(tmp_path / "run")], tmp_path / "plot.png")
    assert png_size(tmp_path / "plot.png") == (700, 500)


def test_without_matplotlib_the_message_says_how_to_install_it(tmp_path):
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "matplotlib.py").write_text("raise ImportError('No module named matplotlib')\n")
    result = run_script("plot.py", write_metrics(tmp_path / "run"), "--out", tmp_path / "plot.png",
                        env={"PYTHONPATH": str(tmp_path / "shim")})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: plot.py needs matplotlib: pip install matplotlib"]
    assert not (tmp_path / "plot.png").exists()


def test_a_missing_metrics_file_gets_one_line(tmp_path):
    result = run_script("plot.py", tmp_path / "metrics.jsonl")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'metrics.jsonl'} not found: pass the "
                                                  f"metrics.jsonl of a run (it is in the run's --out_dir)"]


def test_the_trainer_redraws_the_plot_at_each_evaluation(tmp_path):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "out"
    result = run_train(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "2", "--eval_interval", "2",
                       "--plot", "True", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert png_size(out_dir / "plot.png") == (700, 500)


def test_the_trainers_plot_warns_once_without_matplotlib(tmp_path):
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "matplotlib.py").write_text("raise ImportError('No module named matplotlib')\n")
    out_dir = tmp_path / "out"
    result = run_train(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "3", "--eval_interval", "1",
                       "--plot", "True", env={"PYTHONPATH": str(tmp_path / "shim")})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "--plot True" in line]
    assert len(warnings) == 1 and "plot.py needs matplotlib: pip install matplotlib" in warnings[0]
    assert not (out_dir / "plot.png").exists()


def test_damaged_lines_of_a_metrics_file_are_skipped(tmp_path):
    path = write_metrics(tmp_path / "run")
    with open(path, "ab") as f:
        f.write(b'null\n{"val_loss": 1.0}\n\xff\xfe not text\n{"step": "x", "train_loss": 2.0}\n{"step": 9, "tr')
    assert plot.read_run(path) == plot.read_run(write_metrics(tmp_path / "clean"))
