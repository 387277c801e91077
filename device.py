"""
Where and in what precision a script runs: --device and --dtype resolved against the machine, the autocast
context for the dtype, and the device's peak FLOP/s for the MFU figure. Shared by training, evaluation,
sampling and the benchmark.
"""

import contextlib
import re
from pathlib import Path

import torch

from cli import UserError

# -----------------------------------------------------------------------------
# The device and the dtype


def resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise UserError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use --device cpu")
    if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available here; use --device cpu")
    return device


def make_autocast(device_type, dtype):
    """Mixed precision by --dtype: matmuls in bfloat16/float16, reductions and the loss in float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def resolve_dtype(dtype, device):
    if device.startswith("cuda"):
        bf16 = torch.cuda.is_bf16_supported()
        if dtype == "auto":
            return "bfloat16" if bf16 else "float16"
        if dtype == "bfloat16" and not bf16:
            raise UserError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} does not support it; "
                            f"use --dtype float16")
        return dtype
    if dtype == "float16" and device == "cpu":
        raise UserError("--dtype float16 is not supported for training on the CPU; use float32 or bfloat16")
    if dtype == "auto":
        return "bfloat16" if device == "cpu" and cpu_has_bf16() else "float32"
    return dtype


# -----------------------------------------------------------------------------
# The device's peak, for MFU

GPU_PEAK_BF16_FLOPS = {  # dense tensor-core peak, by the name torch reports
    "H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12,
    "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12, "4090": 165e12,
    "3090": 71e12, "V100": 125e12, "B200": 2250e12,
}


def device_peak_flops(device, dtype):
    """A best estimate of the device's peak FLOP/s for dtype, or None when unknown."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_BF16_FLOPS.items() if k in name), None)
        return peak / 2 if peak and dtype == "float32" else peak  # float32 matmuls run as TF32
    if device == "cpu":
        flags = cpu_flags()
        per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 8  # float32 FMA lanes x 2 x 2 units
        if dtype == "bfloat16" and cpu_has_bf16():
            per_cycle *= 2  # the bf16 dot-product instructions do twice the multiply-adds
        return torch.get_num_threads() * 2.5e9 * per_cycle
    return None


def cpu_flags():
    """The CPU's instruction-set flags (Linux; elsewhere none are known)."""
    cpuinfo = Path("/proc/cpuinfo")
    return set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()


def cpu_has_bf16():
    """bfloat16 matmul instructions (AVX512-BF16 or AMX): there bf16 autocast trains faster than float32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


# -----------------------------------------------------------------------------
# Memory


def available_memory(device):
    """Bytes free for a new model on device (the GPU's free memory; the CPU's MemAvailable), None if unknown."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    if device == "cpu":
        meminfo = Path("/proc/meminfo")
        if meminfo.exists():
            for line in meminfo.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None
