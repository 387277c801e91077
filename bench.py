"""
Time the real training step of train_gpt2.py: its Trainer (model, optimizer, precision, compile, loader) and step.

    python bench.py                                             # GPT-2 124M, the trainer's defaults
    python bench.py --device cpu --n_layer 6 --n_head 6 --n_embd 384 --block_size 256 --batch_size 8 \
        --gradient_accumulation_steps 1 --dtype float32 --compare True

Prints ms/step, tokens/s, MFU and peak memory as a table and as JSON. ms/step is the median step, so that
the odd slow step on a shared machine does not move it; the mean is in the JSON. --compare True also times
the straightforward step (full float32 logits into F.cross_entropy, the loss read back every micro-step, no
prefetch, no compile) from the same initialization on the same batches, each variant in its own process,
and checks that both give the same losses. --rounds N alternates the two N times and pools their steps, so
that a machine that slows down for a while slows both. --fsdp True times the model sharded with FSDP2 over a
process group of one: what FSDP's all-gathers, casts and float32 reductions cost on one GPU, and its peak memory
(the state that N GPUs would split, plus what FSDP itself adds).

--tokenize True times fineweb.py's tokenizing instead: one process (a tokenizer process's work) turning --data,
a text file cut into documents at blank lines, into tokens with --tokenizer, in the batches fineweb.py hands
its processes; tokens/s of the median pass over the file, by the clock and by this process's CPU time (which
other processes on a busy machine do not stretch).

    python bench.py --tokenize True --data input.txt --steps 10   # GPT-2's tokenizer on tiny Shakespeare
"""

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

import fineweb
from cli import UserError, atomic_write, build_parser, flag, parse_flags, run_command
from cross_entropy_kernel import kernel_runs_on
from device import Distributed, device_peak_flops, resolve_device, setup_distributed, warn_if_cpu_busy
from rundir import RunLog
from train_gpt2 import (GPT, ShardLoader, TrainConfig, Trainer, estimate_mfu, follow_tokenizer,
                        new_model_config, set_learning_rates)

# -----------------------------------------------------------------------------
# Configuration: the trainer's flags choose the model and batch, plus a few of the benchmark's own


@dataclass
class BenchConfig(TrainConfig):
    data: str = flag("input.txt", "token shards or a text file to draw the batches from", path=True)
    steps: int = flag(10, "timed optimizer steps")
    warmup_steps: int = flag(3, "untimed steps first (compilation, allocator and cache warm-up)")
    compare: bool = flag(False, "also time the straightforward step, each variant in its own process")
    rounds: int = flag(1, "with --compare: alternate naive and fast this many times, pooling their steps")
    variant: str = flag("fast", "'fast' (the trainer's step) or 'naive' (the straightforward step)")
    json_out: str = flag("", "also write the results as JSON to this file", path=True)
    tokenize: bool = flag(False, "time fineweb.py's tokenizing of --data (a text file) with --tokenizer in one "
                                 "process instead, --steps passes over it after --warmup_steps")


def parse_args(argv=None):
    """(the flags as a BenchConfig, the names of those given)."""
    parser = build_parser(BenchConfig, __doc__.strip().splitlines()[0])
    args, given = parse_flags(parser, sys.argv[1:] if argv is None else argv)
    return BenchConfig(**vars(args)), given


# -----------------------------------------------------------------------------
# Timing one variant


def peak_memory_bytes(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the whole process, on Linux in KiB


def naive_step(trainer, x, y):
    """The straightforward step, the baseline: the trainer's model, optimizer and scaler, but full float32
    logits into F.cross_entropy (the model's return_logits path) and the loss read back to the host on every
    micro-step; no compile, no prefetch."""
    micro_steps = x.size(0)
    loss_sum = 0.0
    for micro_step in range(micro_steps):
        with trainer.autocast:
            _, loss = trainer.model(x[micro_step], y[micro_step])
        loss = loss / micro_steps
        loss_sum += loss.item()
        trainer.scaler.scale(loss).backward()
    for optimizer in trainer.optimizers.values():
        trainer.scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.config.grad_clip or float("inf"))
    for optimizer in trainer.optimizers.values():
        trainer.scaler.step(optimizer)
    trainer.scaler.update()
    for optimizer in trainer.optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    return loss_sum


def measure(config):
    """Train warmup_steps + steps from a fixed init and return the timing of the last `steps`. The fast variant
    is the trainer's own Trainer.train_step (prefetching loader, compiled model, chunked loss); the naive one
    uses the same model, optimizer and batches with naive_step, uncompiled."""
    device = resolve_device(config.device)
    config = replace(config, hellaswag=False, compile=config.compile and config.variant != "naive")
    # --fsdp: a process group of one (bench.py is one process), as `python train_gpt2.py --fsdp True` makes
    dist_info = setup_distributed(device, config.ddp_timeout, fsdp=True) if config.fsdp else Distributed(device=device)
    try:
        tokenizer = fineweb.load_tokenizer(config.tokenizer)
        sources = fineweb.load_token_sources(config.data, "train", tokenizer)
        make_loader = lambda: ShardLoader(sources, config.batch_size, config.block_size,
                                          config.gradient_accumulation_steps, seed=config.seed, shuffle=config.shuffle,
                                          n_vocab=tokenizer.n_vocab)
        torch.manual_seed(config.seed)
        trainer = Trainer(config, dist_info, GPT(new_model_config(config)),
                          RunLog(".", enabled=False), loader=make_loader(), evaluation=None, tokenizer=tokenizer)
        try:
            return summarize(time_steps(config, trainer, make_loader))
        finally:
            trainer.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def time_steps(config, trainer, make_loader):
    """The losses of warmup_steps + steps steps, and how long each of the last `steps` took."""
    device = trainer.device
    if config.variant == "naive":
        batches = make_loader()  # its own: the trainer's loader is being read ahead by its prefetcher

        def step(i):
            set_learning_rates(trainer.optimizers, i, config)
            x, y = batches.next_batch()
            return naive_step(trainer, x.to(device), y.to(device))
    else:
        def step(i):
            return trainer.train_step(i)[1]

    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    losses = [step(i) for i in range(config.warmup_steps)]
    synchronize()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    # the step waits for the device once (its finite check), so the time between steps is the step's time
    step_ends = [time.perf_counter()]
    for i in range(config.steps):
        losses.append(step(config.warmup_steps + i))
        if i == config.steps - 1:
            synchronize()
        step_ends.append(time.perf_counter())
    step_ms = [1000 * (end - start) for start, end in zip(step_ends, step_ends[1:])]
    return {"variant": config.variant, "device": device, "dtype": trainer.dtype, "compile": config.compile,
            "loss_kernel": config.loss_kernel and config.variant == "fast" and kernel_runs_on(device),
            "fsdp": config.fsdp, "step_ms": step_ms, "peak_memory_mb": peak_memory_bytes(device) / 2**20,
            "tokens_per_step": trainer.batches.tokens_per_step, "losses": [float(loss) for loss in losses],
            "flops_per_token": trainer.model.flops_per_token(),
            "peak_flops": device_peak_flops(device, trainer.dtype)}


def summarize(result):
    """ms/step (the median step), its mean, tokens/s and MFU from a result's step_ms."""
    ms_per_step = statistics.median(result["step_ms"])
    tokens_per_sec = result["tokens_per_step"] / (ms_per_step / 1000)
    mfu = estimate_mfu(result["flops_per_token"], tokens_per_sec, result["peak_flops"])
    return result | {"ms_per_step": ms_per_step, "ms_per_step_mean": statistics.mean(result["step_ms"]),
                     "tokens_per_sec": tokens_per_sec, "mfu": mfu}


def measure_in_subprocess(config, variant):
    """Each variant in a fresh process, so neither's memory peak or compile cache colours the other."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = [f"--{k}={v}" for k, v in asdict(config).items()
                if k not in ("compare", "rounds", "variant", "json_out")]
        result = subprocess.run([sys.executable, __file__, *args, f"--variant={variant}", f"--json_out={out}"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(result.stderr.strip())
        return json.loads(out.read_text())["results"][0]


def compare(config):
    """naive and fast, alternated config.rounds times: each variant's steps pooled, its peak the highest."""
    runs = {"naive": [], "fast": []}
    for _ in range(config.rounds):
        for variant, results in runs.items():
            results.append(measure_in_subprocess(config, variant))
    pooled = []
    for results in runs.values():
        first = results[0]
        first["step_ms"] = [ms for r in results for ms in r["step_ms"]]
        first["peak_memory_mb"] = max(r["peak_memory_mb"] for r in results)
        pooled.append(summarize(first))
    return pooled


# -----------------------------------------------------------------------------
# --tokenize: fineweb.py's tokenizing, in one process


def tokenize_speed(config):
    """Tokens/s of fineweb.tokenize_batch, the work of one tokenizer process, over --data's documents (a text
    file cut at blank lines) in batches of fineweb.BATCH_DOCS: the median of --steps passes, by the clock and
    by CPU time, after --warmup_steps passes (and the tokenizer built) untimed."""
    import pyarrow as pa
    try:
        documents = Path(config.data).read_text(encoding="utf-8").split("\n\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--tokenize True: --data {config.data} is no text file ({e}): pass one, e.g. input.txt") \
            from None
    batches = [pa.array(documents[i:i + fineweb.BATCH_DOCS]) for i in range(0, len(documents), fineweb.BATCH_DOCS)]
    fineweb.load_tokenizer(config.tokenizer)
    seconds, cpu_seconds = [], []
    for i in range(config.warmup_steps + config.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        tokens = sum(len(fineweb.tokenize_batch(texts, config.tokenizer)[0]) for texts in batches)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    median, cpu_median = (statistics.median(s[config.warmup_steps:]) for s in (seconds, cpu_seconds))
    return {"tokenizer": config.tokenizer, "data": config.data, "documents": len(documents), "tokens": tokens,
            "pass_ms": 1000 * median, "tokens_per_sec": tokens / median, "tokens_per_cpu_sec": tokens / cpu_median}


# -----------------------------------------------------------------------------
# Report


def table(results):
    lines = [f"{'variant':8} {'device':7} {'dtype':9} {'compile':7} {'fsdp':5} {'kernel':6} {'ms/step':>9} "
             f"{'tokens/s':>10} {'MFU':>6} {'peak MB':>8}"]
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(f"{r['variant']:8} {r['device']:7} {r['dtype']:9} {str(r['compile']):7} {str(r['fsdp']):5} "
                     f"{str(r['loss_kernel']):6} "
                     f"{r['ms_per_step']:9.1f} {r['tokens_per_sec']:10,.0f} {mfu:>6} {r['peak_memory_mb']:8.0f}")
    return "\n".join(lines)


def main(argv=None):
    run_command(lambda: run(*parse_args(argv)))


def run(config, given):
    config.validate()
    if config.variant not in ("fast", "naive"):
        raise UserError(f"--variant {config.variant!r} is not one of fast, naive")
    if config.steps <= 0 or config.warmup_steps < 0 or config.rounds <= 0:
        raise UserError("--steps and --rounds must be positive and --warmup_steps 0 or more")
    if config.json_out:
        check_json_out(Path(config.json_out))
    warn_if_cpu_busy(resolve_device(config.device))  # a busy core's figures are not the machine's
    if config.tokenize:
        result = tokenize_speed(config)
        print(f"{result['tokens_per_sec']:,.0f} tokens/s in one process ({result['tokens_per_cpu_sec']:,.0f} "
              f"per CPU second): {result['tokens']:,} tokens of {result['documents']:,} documents of "
              f"{config.data} with {config.tokenizer} in {result['pass_ms']:.1f} ms (the median of "
              f"{config.steps} passes)")
        print(json.dumps(result))
        return
    # the model a new run of the trainer builds: --vocab_size follows --tokenizer unless given
    tokenizer = fineweb.load_tokenizer(config.tokenizer)
    config = follow_tokenizer(config, given, tokenizer)
    fineweb.check_vocab_size(config.vocab_size, "the model", tokenizer)
    if config.compare:
        results = compare(config)
    else:
        results = [measure(config)]
    report = {"config": asdict(config), "torch": str(torch.__version__), "results": results}
    print(table(results))
    if config.compare:
        naive, fast = results
        report["speedup"] = fast["tokens_per_sec"] / naive["tokens_per_sec"]
        report["max_loss_difference"] = max(abs(a - b) for a, b in zip(naive["losses"], fast["losses"]))
        print(f"speedup {report['speedup']:.2f}x; losses agree to {report['max_loss_difference']:.1e} "
              f"over {len(fast['losses'])} steps")
    print(json.dumps({k: v for k, v in report.items() if k != "config"} | {"config": asdict(config)}))
    if config.json_out:
        try:
            atomic_write(config.json_out, lambda f: f.write(json.dumps(report, indent=2).encode()))
        except OSError as e:
            print(f"error: --json_out {config.json_out} cannot be written ({e.strerror or e}); the results are "
                  "the JSON line above", file=sys.stderr)
            sys.exit(1)


def check_json_out(path):
    """--json_out, before anything is timed: a file name in a folder that exists, not a folder."""
    if path.is_dir():
        raise UserError(f"--json_out {path} is a directory: pass a file name, such as {path / 'bench.json'}")
    if not path.parent.is_dir():
        raise UserError(f"--json_out {path}: {path.parent} is not a directory: create it, or pass a file in one "
                        "that is")


if __name__ == "__main__":
    main()
