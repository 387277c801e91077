"""device.py: the dtype check, the peak FLOP/s of a run's processes, and the bisection that finds the largest
micro-batch that fits (the GPU's own trial is measured by the allocator, on a GPU only)."""

import pytest

from cli import UserError
from device import check_dtype, device_peak_flops, largest_fitting


def test_the_largest_fitting_size_is_found_by_bisection():
    sizes = [1, 2, 4, 5, 8, 10, 20, 40]
    tried = []
    fits = lambda size: tried.append(size) or size <= 10
    assert largest_fitting(sizes, fits) == 10
    assert len(tried) <= 4  # log2 of 8 candidates, not all of them
    assert largest_fitting(sizes, lambda size: True) == 40
    assert largest_fitting(sizes, lambda size: False) is None


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
