"""device.py: the dtype check, the peak FLOP/s of a run's processes, joining the ranks (a backend that
cannot serve the device is refused before joining), and the busy CPU's warning in every script."""

import pytest
import torch

import device
from cli import UserError
from conftest import run_main
from device import check_dtype, device_peak_flops, setup_distributed
from train_gpt2 import TrainConfig


def test_a_runs_peak_counts_every_process():
    one = device_peak_flops("cpu", "float32")
    assert one > 0 and device_peak_flops("cpu", "float32", processes=2) == 2 * one


def test_processes_sharing_a_machine_share_its_cores(monkeypatch):
    import os
    import torch
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)  # more threads than cores
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    per_core = device_peak_flops("cpu", "float32")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert device_peak_flops("cpu", "float32") == 2 * per_core  # two processes: a core each


@pytest.mark.parametrize("dtype", ["float64", "bf16", ""])
def test_an_unknown_dtype_is_refused_naming_the_ones_there_are(dtype):
    with pytest.raises(UserError, match="is not one of auto, float32, bfloat16, float16"):
        check_dtype(dtype)


def test_a_backend_that_cannot_serve_the_device_is_refused_before_joining(monkeypatch):
    with pytest.raises(UserError, match="--backend 'mpi' is not one of auto, nccl, gloo"):
        TrainConfig(backend="mpi").validate()
    for name, value in [("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "1")]:  # a port nothing listens on: joining would wait, not fail
        monkeypatch.setenv(name, value)
    join = lambda device, **kwargs: setup_distributed(device, timeout_seconds=5, **kwargs)
    with pytest.raises(UserError, match="--backend nccl needs CUDA GPUs.*pass --backend gloo"):
        join("cpu", backend="nccl")
    # a machine of one GPU, seen from the second rank, without touching CUDA
    monkeypatch.setattr(device, "resolve_device", lambda name: name)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="LOCAL_RANK 1 has no GPU of its own.*--nproc_per_node 1.*--backend gloo"):
        join("cuda")
    with pytest.raises(UserError, match="--fsdp True on GPUs needs --backend nccl"):
        join("cuda", fsdp=True, backend="gloo")


@pytest.mark.parametrize("script", ["sample.py", "hellaswag.py", "bench.py"])
def test_every_script_on_the_cpu_warns_when_its_threads_would_fight_a_busy_machine(script, monkeypatch, tmp_path,
                                                                                  trained_run):
    import os
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "getloadavg", lambda: (7.5, 6.0, 5.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the count torch would run, one per core
    if script == "hellaswag.py":
        from transformers import GPT2Config, GPT2LMHeadModel
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(tmp_path / "hf")
        (tmp_path / "hs.jsonl").write_text('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}\n')
        args = ["--init_from", tmp_path / "hf", "--data", tmp_path / "hs.jsonl", "--device", "cpu"]
    elif script == "sample.py":
        args = ["--init_from", trained_run[0] / "best_val_loss.pt", "--num_samples", "1", "--max_new_tokens", "1",
                "--device", "cpu"]
    else:
        args = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "1",
                "--gradient_accumulation_steps", "1", "--steps", "1", "--warmup_steps", "0", "--device", "cpu",
                "--compile", "False", "--dtype", "float32"]
    result = run_main(script, *args)
    assert result.returncode == 0, result.stderr
    assert "warning: the CPU is busy (load 7.5 on 2 cores) and torch runs 2 threads" in result.stderr
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # threads chosen by hand: no warning
    assert "the CPU is busy" not in run_main(script, *args).stderr


def test_a_run_on_a_cpu_without_bfloat16_instructions_says_so_in_its_first_lines(monkeypatch):
    import rundir
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    first_lines = rundir.header(7e6, device.Distributed(), "float32", 1024, 0)
    assert first_lines[0] == ("note: this CPU has no bfloat16 matmul instructions (AVX-512 BF16 or AMX; `lscpu | grep "
                              "-E 'avx512_bf16|amx_bf16'` shows them): it trains in float32, several times slower "
                              "than on a CPU with them")
    assert "emulated here, slower than float32" in rundir.header(7e6, device.Distributed(), "bfloat16", 1024, 0)[0]
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    assert len(rundir.header(7e6, device.Distributed(), "bfloat16", 1024, 0)) == 1  # what trains where, alone


def test_bfloat16_counts_as_there_only_where_onednn_may_use_it():
    """ONEDNN_MAX_CPU_ISA=AVX2 (how to try an AVX2 CPU's path on a newer one) forbids oneDNN the bfloat16
    instructions: the CPU then counts as one without them, whatever it has. Only a CPU that has them can show
    it: elsewhere the answer is False either way."""
    if not device.cpu_has_bf16():
        pytest.skip("this CPU has no bfloat16 instructions for ONEDNN_MAX_CPU_ISA to forbid")
    import os
    import subprocess
    import sys
    from conftest import REPO
    limited = subprocess.run([sys.executable, "-c", "import device; print(device.cpu_has_bf16())"], cwd=REPO,
                             env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}, capture_output=True, text=True)
    assert limited.stdout.strip() == "False", limited.stderr
