"""
Where and in what precision a script runs: --device and --dtype resolved against the machine, the autocast
context for the dtype, the device's peak FLOP/s for the MFU figure, a process's place among the ranks of
a distributed run with the two rules every rank follows, and the model and its batches put there (whole or
sharded, wrapped in DDP, batches copied ahead). Shared by training, evaluation, sampling and the benchmark.
"""

import contextlib
import datetime
import functools
import inspect
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from cli import UserError, os_errors_as_user_errors

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


def busy_cpu_warning():
    """A warning when the machine's cores are already busy (by the load average) and torch would run a
    thread on each of them: the threads then fight the other work, and a step can take several times
    as long (OMP_NUM_THREADS=1 helped most on a busy 2-core machine). None otherwise."""
    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "getloadavg"):
        return None
    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    if torch.get_num_threads() > 1 and load >= 0.75 * cores:
        return (f"warning: the CPU is busy (load {load:.1f} on {cores} cores) and torch runs "
                f"{torch.get_num_threads()} threads: if steps are slow, set OMP_NUM_THREADS=1 (or fewer "
                f"threads than idle cores)")
    return None


def warn_if_cpu_busy(device):
    """busy_cpu_warning on stderr, for a script about to run on the CPU (the trainer's is in its header)."""
    warning = busy_cpu_warning() if device == "cpu" else None
    if warning:
        print(warning, file=sys.stderr, flush=True)


def make_autocast(device_type, dtype):
    """Mixed precision by --dtype: matmuls in bfloat16/float16, reductions and the loss in float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_dtype(dtype):
    """The --dtype flag names a dtype: checked by every script's config before any work."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def resolve_dtype(dtype, device, sharded=False):
    """The dtype a run uses on device. sharded (FSDP): float16 is refused, since its GradScaler is not set up
    for sharded gradients."""
    check_dtype(dtype)
    if not (sharded and dtype == "float16"):  # refused below whatever the device, before asking it
        dtype = resolve_device_dtype(dtype, device)
    if sharded and dtype == "float16":
        raise UserError("--fsdp True trains in bfloat16 or float32, not float16 (its GradScaler is not set up for "
                        "sharded gradients): pass --dtype bfloat16 where the GPU has it, else --dtype float32")
    return dtype


def resolve_device_dtype(dtype, device):
    check_dtype(dtype)
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


def device_peak_flops(device, dtype, processes=1):
    """A best estimate of the peak FLOP/s for dtype of a run's processes together (each on a device
    of this kind; on the CPU, the processes of a machine share its cores), or None when unknown."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_BF16_FLOPS.items() if k in name), None)
        peak = peak / 2 if peak and dtype == "float32" else peak  # float32 matmuls run as TF32
        return peak * processes if peak else None
    if device == "cpu":
        flags = cpu_flags()
        per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 8  # float32 FMA lanes x 2 x 2 units
        if dtype == "bfloat16" and cpu_has_bf16():
            per_cycle *= 2  # the bf16 dot-product instructions do twice the multiply-adds
        per_machine = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        threads = min(torch.get_num_threads(), max(1, (os.cpu_count() or 1) // per_machine))
        return threads * 2.5e9 * per_cycle * processes
    return None


def cpu_flags():
    """The CPU's instruction-set flags (Linux; elsewhere none are known)."""
    cpuinfo = Path("/proc/cpuinfo")
    return set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()


@functools.cache
def cpu_has_bf16():
    """bfloat16 matmul instructions (AVX512-BF16 or AMX) that oneDNN may use: there bf16 autocast trains
    faster than float32; elsewhere bfloat16 is emulated, several times slower. torch says which the CPU has
    (on any system) and whether oneDNN may use them (ONEDNN_MAX_CPU_ISA can forbid it); a torch too old to
    say leaves /proc/cpuinfo's flags."""
    has_avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if has_avx512_bf16 is None:
        return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return (has_avx512_bf16() or has_amx()) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_without_bf16_note(dtype):
    """The line a CPU run starts with where the CPU has no bfloat16 instructions (None elsewhere): the
    README's quick start takes about a minute where it has them."""
    if cpu_has_bf16():
        return None
    if dtype == "bfloat16":
        what = "--dtype bfloat16 is emulated here, slower than float32 (--dtype auto)"
    else:
        what = "it trains in float32, several times slower than on a CPU with them"
    return ("note: this CPU has no bfloat16 matmul instructions (AVX-512 BF16 or AMX; `lscpu | grep -E "
            f"'avx512_bf16|amx_bf16'` shows them): {what}")


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


def check_model_fits(state_bytes, dist_info):
    """Refuse, before allocating it, a model whose training state cannot fit: an allocation far past the
    memory fails with a traceback or, on the CPU, summons the out-of-memory killer. state_bytes: the
    {"weights", "gradients", "optimizer"} bytes the model and its optimizer say they take
    (train_gpt2.training_state_bytes). Under FSDP a device holds 1/world_size of the state, but the host of
    rank 0 gathers the whole weights and optimizer state for every checkpoint."""
    total, fsdp = sum(state_bytes.values()), dist_info.sharded
    size = f"a model of {state_bytes['weights'] / 4e6:,.0f}M float32 parameters needs about"
    needed = total / (dist_info.world_size if fsdp else 1)
    free = available_memory(dist_info.device)
    if free is not None and needed > free:
        how = f" per process (--fsdp True over {dist_info.world_size})" if fsdp else ""
        fix = "" if fsdp else ", or shard it over several processes with --fsdp True"
        raise UserError(f"{size} {needed / 2**30:,.1f} GiB for its weights, gradients and optimizer state{how}, "
                        f"more than the {free / 2**30:,.1f} GiB available on {dist_info.device}: choose a "
                        f"smaller --n_layer or --n_embd{fix}")
    # every rank checks its own host, so that all stop together rather than rank 0 alone
    needed, free = state_bytes["weights"] + state_bytes["optimizer"], available_memory("cpu")
    if fsdp and free is not None and needed > free:
        raise UserError(f"{size} {needed / 2**30:,.1f} GiB of host memory to gather its whole weights and "
                        f"optimizer state into a checkpoint on rank 0 (--fsdp True), more than the "
                        f"{free / 2**30:,.1f} GiB available: choose a smaller --n_layer or --n_embd, or "
                        f"run on hosts with more memory")


# -----------------------------------------------------------------------------
# A process among the ranks: one process is world_size 1, not a separate code path


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    control: object = None  # a Gloo group for host-side agreement (stop requests, failures), no device sync
    sharded: bool = False  # FSDP: each rank holds a shard of the weights, and every forward pass is a collective

    @property
    def is_master(self):
        return self.rank == 0

    def any(self, condition):
        """True on every rank when condition is true on any rank: how ranks agree to stop at the same step."""
        return self.max(int(bool(condition))) > 0

    def max(self, value):
        """The largest of the ranks' integers, on every rank (host-side, over the control group)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value])
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.control)
        return int(tensor.item())

    def on_rank0(self, action, what):
        """Rank 0 runs action() and every rank learns whether it worked: its result on rank 0 (None on the
        others), or a UserError raised on every rank, so that none goes on alone. what: what rank 0 does, for
        the other ranks' message."""
        result, error = None, None
        if self.is_master:
            try:
                with os_errors_as_user_errors():  # on a path (the user's): its one line, on every rank
                    result = action()
            except UserError as e:
                error = e
        if self.any(error is not None):
            raise error or UserError(f"rank 0 could not {what}: see its message")
        return result

    def forward_passes(self, n_items, per_pass=1):
        """How many forward passes this rank makes over its share of n_items (items rank, rank + world_size,
        ...), per_pass at a time. Under FSDP every forward pass is a collective of all the ranks, so each
        makes as many as the largest share (rank 0's) needs, the ones past its share on dummy input."""
        share = len(range(0 if self.sharded else self.rank, n_items, self.world_size))
        return math.ceil(share / per_pass)

    def sum(self, tensor):
        """tensor summed over the ranks, in place (Gloo has no AVG, so means are sums divided)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def lost_contact(error):
    """An error from a collective whose peer died or timed out, as opposed to a bug."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    words = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "imed out",
             "NCCL error")
    return isinstance(error, RuntimeError) and any(w in str(error) for w in words)


def run_on_ranks(program):
    """Run program(join) as a script's whole run, where join(...) is setup_distributed, and exit as a
    distributed run should: a UserError with its code (rank 0 prints its line; another rank prints an
    error of its own, its data say, prefixed with its rank), an OSError on a path as cli.path_error's
    UserError, Ctrl-C with 130, and a rank that lost contact
    with the others at once, without tearing down a group that could wait on the gone peer."""
    joined, code = [], 0  # joined: this process's Distributed, once it has one

    def join(*args):
        joined.append(setup_distributed(*args))
        return joined[0]

    try:
        with os_errors_as_user_errors():
            program(join)
    except UserError as e:
        code, message = e.code, f"error: {e}" if e.code == 1 else str(e)
        if code == 1 and joined and not joined[0].is_master:
            print(f"rank {joined[0].rank}: {message}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        code = 130
        message = "error: interrupted: stopped at once; the checkpoints on disk are intact"
    except Exception as e:
        if not joined or joined[0].world_size == 1 or not lost_contact(e):
            raise
        print(f"error: rank {joined[0].rank} lost contact with the other processes "
              f"({str(e).splitlines()[0]}): see their output; continue with --init_from resume",
              file=sys.stderr, flush=True)
        os._exit(1)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if code:
        if not joined or joined[0].is_master:
            print(message, file=sys.stderr, flush=True)
        sys.exit(code)


def rank_device_and_backend(device, backend, fsdp, local_rank=None):
    """(device, backend) of a process of a distributed run: under torchrun (local_rank given) each process
    takes a GPU of its node, and the backend is NCCL on GPUs, Gloo on the CPU, unless backend names one.
    A combination that cannot work is refused with the fix."""
    if fsdp and device.split(":")[0] not in ("cuda", "cpu"):
        raise UserError(f"--fsdp True runs on CUDA GPUs or the CPU, not on {device}: pass --fsdp False")
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl" and not device.startswith("cuda"):
        raise UserError(f"--backend nccl needs CUDA GPUs, and this run is on {device}: pass --backend gloo")
    if backend == "gloo" and fsdp and device.startswith("cuda"):
        raise UserError("--fsdp True on GPUs needs --backend nccl (FSDP's collectives on CUDA tensors are "
                        "not Gloo's): pass --backend auto, or --fsdp False to try DDP on Gloo")
    if device.startswith("cuda") and local_rank is not None:
        gpus = torch.cuda.device_count()
        if local_rank >= gpus and backend == "nccl":
            raise UserError(f"LOCAL_RANK {local_rank} has no GPU of its own on this machine of {gpus}: "
                            f"launch at most {gpus} processes per node (--nproc_per_node {gpus}), or pass "
                            f"--backend gloo to let processes share GPUs (slow, for trying the path)")
        device = f"cuda:{local_rank % gpus}"
    return device, backend


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def setup_distributed(device, timeout_seconds=600, fsdp=False, backend="auto"):
    """Join the process group when launched by torchrun (NCCL on CUDA, Gloo on the CPU, unless
    backend names one). A collective that waits past the timeout (a rank died or hangs) raises
    instead of waiting forever. FSDP needs a process group even for one process: without torchrun,
    fsdp makes one of a single rank (its store in memory, so no port is opened)."""
    present = [v for v in TORCHRUN_VARIABLES if v in os.environ]
    device = resolve_device(device)
    if not present and not fsdp:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)  # where Triton's kernels land too: --device cuda:1
        return Distributed(device=device)
    missing = [v for v in TORCHRUN_VARIABLES if v not in os.environ]
    if present and missing:
        raise UserError(f"{present[0]} is set but {missing[0]} is not: launch distributed runs "
                        "with `torchrun --nproc_per_node N train_gpt2.py ...`")
    rank, local_rank, world_size = (0, None, 1)  # a process group of one: no torchrun
    if present:
        rank, local_rank, world_size = (int(os.environ[v]) for v in TORCHRUN_VARIABLES[:3])
    device, backend = rank_device_and_backend(device, backend, fsdp, local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_seconds)
    if present:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return Distributed(rank, local_rank or 0, world_size, device, control, sharded=fsdp)


# -----------------------------------------------------------------------------
# The model on the ranks: placed whole or sharded (FSDP), wrapped in DDP, and its batches


def shard_model(model, device, dtype):
    """FSDP2 over every rank: each block is a group of its own, gathered whole just before it runs
    and freed after, and the root holds the rest (wte, which is also lm_head, wpe and ln_f), so the
    tied weight stays one parameter. Each rank keeps its float32 shard of every weight, gradient and
    AdamW moment; with bfloat16 the gathered weights are bfloat16 and the gradients reduced in
    float32. Each shard is moved to device as it is cut, so the whole model never is."""
    try:  # public in torch.distributed.fsdp from torch 2.6
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()  # float32: the weights as they are
    if dtype == "bfloat16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def place_model(model, dist_info, dtype, loss_kernel=True):
    """The model on its device: whole, or under FSDP this rank's shards of it. On CUDA, float32
    matmuls run as TF32 (training and evaluation alike, so that an evaluation repeats the one logged
    in training)."""
    model.lm_head.chunked_loss.use_kernel = loss_kernel
    if dist_info.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dist_info.sharded:
        return shard_model(model, dist_info.device, dtype)
    return model.to(dist_info.device)


def wrap_model(model, compile, dist_info):
    """What every forward pass calls: the model compiled if asked, and that wrapped in DDP when
    there are several processes (a sharded model, FSDP, is its own wrapper). Evaluation calls it
    too, on some ranks only: DDP's forward pass without gradients is no collective, as long as it
    does not broadcast buffers (a model's buffers, such as rotary tables, are the same on every
    rank)."""
    ddp = dist_info.world_size > 1 and not dist_info.sharded
    version = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    if ddp and compile and version < (2, 6):
        # before 2.6, DDP's graph splitting refused the loss's autograd.Function (a higher-order op)
        torch._dynamo.config.optimize_ddp = False
    compiled = torch.compile(model) if compile else model
    if not ddp:
        return compiled
    cuda = dist_info.device.startswith("cuda")
    device_ids = [torch.device(dist_info.device).index] if cuda else None
    # torch 2.13 renamed broadcast_buffers (deprecated, with a warning on every rank) forward_sync_buffers
    renamed = "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_buffer_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(compiled, device_ids=device_ids, **no_buffer_sync)


def set_gradient_sync(model, sync):
    """Whether the next backward pass reduces the gradients over the ranks: DDP's flag (flipped
    rather than entering no_sync(), so the loop stays flat; set before the forward pass, where DDP
    reads it) or FSDP's."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = sync
    else:
        model.set_requires_gradient_sync(sync)  # FSDP2 (a compiled model passes it on)


class Prefetcher:
    """The loader's next batch read in a thread while the step runs, copied to the device from
    pinned memory without blocking. state_dict() is the loader's state after the batches handed
    out, not the one being read ahead, so that a checkpoint resumes at the right batch."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device
        self.pin = device.startswith("cuda")
        self.tokens_per_step = loader.tokens_per_step
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.start()

    def start(self):
        self.state = self.loader.state_dict()
        self.pending = self.pool.submit(self.fetch)

    def fetch(self):
        x, y = self.loader.next_batch()
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y, self.loader.state_dict()

    def next_batch(self):
        x, y, self.state = self.pending.result()
        self.pending = self.pool.submit(self.fetch)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.pending.result()  # the batch read ahead from the old state is dropped
        self.loader.load_state_dict(state)
        self.start()

    def close(self):
        self.pool.shutdown(wait=True)
