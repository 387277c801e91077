"""The training script end to end: schedule, command line, checkpoints, exact resume, DDP, bad input."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import math

import numpy as np
import pytest
import torch


from fineweb import load_tokenizer, open_shard, write_shard
from checkpoint import load_checkpoint, save_checkpoint
from device import Distributed
from train_gpt2 import TrainConfig
from evaluation import sample_text
from rundir import pause_clock
from train_gpt2 import GPT, GPTConfig, estimate_mfu, get_lr
from conftest import (INPUT_TXT, REPO, SPIKE_GUARD, TINY, read_metrics, run_torchrun, run_train, snapshot,
                      spiky_data, train_in_process, train_losses)

# -----------------------------------------------------------------------------
# The learning-rate schedule


def lr_at(step):
    return get_lr(step, learning_rate=6e-4, min_lr=6e-5, warmup_iters=10, lr_decay_iters=110)


def test_lr_warms_up_linearly_from_above_zero_to_the_peak():
    assert lr_at(0) == pytest.approx(6e-4 / 11)
    assert lr_at(5) == pytest.approx(6e-4 * 6 / 11)
    assert lr_at(9) == pytest.approx(6e-4 * 10 / 11)
    assert lr_at(10) == pytest.approx(6e-4)


def test_lr_decays_by_a_cosine_to_min_lr_and_stays_there():
    assert lr_at(60) == pytest.approx((6e-4 + 6e-5) / 2)  # halfway through the decay
    assert lr_at(35) == pytest.approx(6e-5 + 0.5 * (1 + math.cos(math.pi / 4)) * (6e-4 - 6e-5))
    assert lr_at(110) == pytest.approx(6e-5)
    assert lr_at(10_000) == 6e-5
    assert all(lr_at(s) >= lr_at(s + 1) for s in range(10, 120))


def test_lr_without_warmup_starts_at_the_peak():
    assert get_lr(0, 1e-3, 1e-4, 0, 100) == 1e-3
    assert get_lr(5, 1e-3, 1e-4, 5, 5) == 1e-4  # warmup ending where the decay ends


def test_mfu_is_achieved_flops_over_peak():
    per_token = GPT(GPTConfig()).flops_per_token()  # GPT-2 124M: 85M parameters in its matmuls
    assert per_token == 6 * (124_475_904 - 1024 * 768) + 12 * 12 * 768 * 1024
    assert estimate_mfu(per_token, 400_000, 989e12) == pytest.approx(per_token * 400_000 / 989e12)
    assert estimate_mfu(per_token, 400_000, None) is None


# -----------------------------------------------------------------------------
# A whole run


def test_a_run_logs_falling_loss_samples_and_writes_checkpoints(trained_run):
    out_dir, result = trained_run
    losses = train_losses(out_dir)
    assert sorted(losses) == list(range(8))
    assert losses[7] < losses[0] - 0.3
    assert result.stdout.count("Hello, I'm a language model,") >= 4
    names = sorted(p.name for p in out_dir.iterdir())
    val = {m["step"]: m["val_loss"] for m in read_metrics(out_dir) if "val_loss" in m}
    assert sorted(val) == [0, 4, 8]
    assert f"iter-4-loss-{val[4]:.4f}.pt" in names and f"iter-8-loss-{val[8]:.4f}.pt" in names
    assert "best_val_loss.pt" in names and "config.json" in names
    assert not [n for n in names if n.startswith(".")]  # no temporary files left


def test_metrics_record_every_figure(trained_run):
    out_dir, _ = trained_run
    train = [m for m in read_metrics(out_dir) if "train_loss" in m]
    for key in ("step", "train_loss", "lr", "grad_norm", "ms_per_step", "tokens_per_sec", "mfu", "tokens"):
        assert all(key in m for m in train), key
    assert train[0]["tokens"] == 4 * 2 * 32


def test_config_json_is_the_run_config(trained_run):
    out_dir, _ = trained_run
    config = json.loads((out_dir / "config.json").read_text())
    assert set(config) == {f.name for f in dataclasses.fields(TrainConfig)} | {"tokenizer_record"}
    assert config["n_layer"] == 2 and config["max_iters"] == 8 and config["compile"] is False
    gpt2 = load_tokenizer()
    assert config["tokenizer"] == "gpt2" and config["tokenizer_record"]["sha256"] == gpt2.sha256


def test_checkpoint_holds_everything_a_restart_needs(trained_run):
    out_dir, _ = trained_run
    checkpoint = load_checkpoint(next(out_dir.glob("iter-8-*.pt")))
    assert checkpoint["progress"]["iter_num"] == 8
    shape = dict(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=64)
    assert checkpoint["model_args"] == dataclasses.asdict(GPTConfig(**shape))  # GPT-2's options: every field
    assert checkpoint["optimizer"]["adamw"]["state"]  # AdamW's moments, under its name
    assert checkpoint["scaler"] == {}  # float32 needs no GradScaler; its (empty) state is kept all the same
    assert set(checkpoint["loader"]) >= {"epoch", "shard", "position", "seed", "shuffle"}
    assert "torch" in checkpoint["rng"] and checkpoint["config"]["max_iters"] == 8
    best = load_checkpoint(out_dir / "best_val_loss.pt")
    assert best["val_loss"] == min(m["val_loss"] for m in read_metrics(out_dir) if m.get("step", 0) > 0
                                   and "val_loss" in m)


@pytest.fixture(scope="module")
def run_to_4(tmp_path_factory):
    """A tiny run stopped at its checkpoint of step 4 (trained_run's first half, trained on its own), and a
    function that copies it into a test's folder, for the tests that resume it."""
    out_dir = tmp_path_factory.mktemp("run_to_4") / "out"
    first = train_in_process(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "4",
                             "--eval_interval", "4")
    assert first.returncode == 0, first.stderr
    return lambda destination: shutil.copytree(out_dir, destination)


def test_resume_continues_with_exactly_the_losses_of_an_uninterrupted_run(trained_run, run_to_4, tmp_path):
    full_dir, _ = trained_run
    out_dir = run_to_4(tmp_path / "out")
    resumed = train_in_process(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "8",
                               "--eval_interval", "4", "--init_from", "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(out_dir) == train_losses(full_dir)  # bit for bit, steps 0-7
    final = load_checkpoint(next(out_dir.glob("iter-8-*.pt")))["model"]
    expected = load_checkpoint(next(full_dir.glob("iter-8-*.pt")))["model"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_eval_only_reports_the_checkpoints_val_loss_without_training(trained_run, tmp_path):
    run_dir, _ = trained_run
    checkpoint = next(run_dir.glob("iter-8-*.pt"))
    out_dir = tmp_path / "eval"
    result = train_in_process(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--eval_only", "True",
                              "--init_from", checkpoint)
    assert result.returncode == 0, result.stderr
    (record,) = read_metrics(out_dir)
    expected = next(m["val_loss"] for m in read_metrics(run_dir) if m.get("step") == 8 and "val_loss" in m)
    assert record["val_loss"] == expected and record["step"] == 8
    assert f"val loss {expected:.4f}" in result.stdout
    assert not list(out_dir.glob("*.pt"))


def test_a_run_ends_with_a_summary_of_where_everything_is(trained_run):
    out_dir, result = trained_run
    best, bpb = min((m["val_loss"], m["val_bpb"]) for m in read_metrics(out_dir) if "val_loss" in m)
    summary = result.stdout.strip().splitlines()[-5:]
    # 8 steps of 4 x 2 x 32 tokens
    assert re.fullmatch(r"done: 8 steps, 2,048 tokens; \d+:\d\d:\d\d in this process, from step 0", summary[0])
    assert summary[1].split() == ["best", "val", "loss", f"{best:.4f}", f"({bpb:.4f}", "bpb)",
                                  str(out_dir / "best_val_loss.pt")]
    assert summary[2].split()[:3] == ["latest", "checkpoint", str(next(out_dir.glob("iter-8-*.pt")))]
    assert str(out_dir / "metrics.jsonl") in summary[3] and str(out_dir / "config.json") in summary[4]


def test_a_target_is_met_by_its_record_or_by_a_best_val_loss_at_or_below_it_in_every_report():
    """The trainer's check, the resume's note and the summary share one rule (rundir.target_met)."""
    from checkpoint import Progress
    from rundir import summary, target_met, target_notes
    record = {"target_val_loss": 9.0, "val_loss": 8.9, "step": 4, "tokens": 1024, "train_seconds": 1.0}
    cases = [(Progress(iter_num=8, target=record), 9.0, True),
             (Progress(iter_num=8, target=record, best_val_loss=8.9), 8.0, False),  # a record of another target
             (Progress(iter_num=8, best_val_loss=8.0), 8.0, True),  # a target given on resume, reached before
             (Progress(iter_num=8, best_val_loss=8.1), 8.0, False)]
    for progress, target, met in cases:
        assert target_met(progress, target) is met
        config = TrainConfig(target_val_loss=target, max_iters=10)
        assert bool(target_notes(progress, config)) is met
        line = [row for row in summary(".", progress, None, 8, 1.0, target) if row.strip().startswith("target")]
        assert ("not reached" not in line[0]) is met


def test_a_val_loss_that_is_not_a_number_reaches_no_target(trained_run, tmp_path):
    """Weights driven to NaN by a learning rate of 1e30: the run stops as diverged, and NaN, which compares false
    with every number, is not reported as reaching --target_val_loss."""
    out_dir, _ = trained_run
    target = round(min(m["val_loss"] for m in read_metrics(out_dir) if "val_loss" in m) - 0.5, 2)
    result = train_in_process("--init_from", next(out_dir.glob("iter-8-*.pt")), "--out_dir", tmp_path / "branch",
                              "--max_iters", "10", "--eval_interval", "1", "--learning_rate", "1e30",
                              "--min_lr", "1e29", "--target_val_loss", str(target))
    assert result.returncode == 1 and "the weights have diverged, and are not saved" in result.stderr
    evaluation = [m for m in read_metrics(tmp_path / "branch") if "val_loss" in m][-1]
    assert evaluation["step"] == 9 and evaluation["val_loss"] is None  # metrics.jsonl writes NaN as null
    assert "step 9: val loss nan" in result.stdout
    assert "reached" not in result.stdout
    assert not [m for m in read_metrics(tmp_path / "branch") if "target_val_loss" in m]


def test_the_trainers_own_code_takes_its_tokenizer_from_the_caller_never_gpt2s_by_default():
    """A tokenizer left out along the trainer's call chain is a TypeError, not GPT-2's quietly: a run of another
    tokenizer would read, score and export its tokens as GPT-2's."""
    import inspect
    import hellaswag
    from fineweb import load_token_sources
    from hf_convert import export_hf, hf_model, load_hf_gpt2
    from train_gpt2 import ShardLoader, Trainer
    required = [(ShardLoader, "n_vocab"), (Trainer, "tokenizer"), (load_token_sources, "tokenizer"),
                (sample_text, "tokenizer"), (hellaswag.score_examples, "tokenizer"), (hellaswag.evaluate, "tokenizer"),
                (hf_model, "tokenizer"), (export_hf, "tokenizer"), (load_hf_gpt2, "tokenizer")]
    for function, name in required:
        assert inspect.signature(function).parameters[name].default is inspect.Parameter.empty, function.__name__


def test_the_samples_continue_the_sample_prompt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))
    no_autocast, gpt2 = torch.autocast("cpu", enabled=False), load_tokenizer()
    samples = sample_text(model, Distributed(), no_autocast, 0, "ROMEO:", num_samples=3, max_new_tokens=5,
                          tokenizer=gpt2)
    assert len(samples) == 3 and all(text.startswith("ROMEO:") for text in samples)
    assert sample_text(model, Distributed(), no_autocast, 0, "ROMEO:", num_samples=0, tokenizer=gpt2) == []
    assert sample_text(model, Distributed(), no_autocast, 0, "", tokenizer=gpt2)[0].startswith("<|endoftext|>")


def test_the_trainer_prints_num_samples_from_sample_prompt(tmp_path):
    result = train_in_process(*TINY, "--data", INPUT_TXT, "--out_dir", tmp_path / "out", "--max_iters", "1",
                              "--eval_interval", "1", "--sample_prompt", "ROMEO:", "--num_samples", "2")
    assert result.returncode == 0, result.stderr
    samples = [line[len("  sample: "):] for line in result.stdout.splitlines() if line.startswith("  sample: ")]
    assert len(samples) == 4  # two at step 0, two at step 1
    assert all(text[1:].startswith("ROMEO:") for text in samples)  # text[0] is the quote of its repr


def test_the_progress_bars_rate_and_eta_leave_out_evaluation_time(monkeypatch):
    import io
    import tqdm.std
    now = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])  # tqdm's clock
    progress = tqdm.std.tqdm(total=100, file=io.StringIO(), mininterval=0)
    now[0] += 300  # the step-0 evaluation
    pause_clock(progress, 300)
    for _ in range(10):  # ten steps of 2 s
        now[0] += 2
        progress.update(1)
    assert progress.format_dict["elapsed"] == 20
    assert progress.format_dict["rate"] == pytest.approx(0.5)  # so the ETA is 90 steps x 2 s, not 90 x 32 s
    progress.close()


@pytest.mark.parametrize("run", [run_train, run_torchrun], ids=["one_process", "torchrun"])
def test_compiled_model_trains_evaluates_and_samples(tmp_path, run):
    result = run(*TINY, "--data", INPUT_TXT, "--out_dir", tmp_path / "out", "--max_iters", "2",
                 "--eval_interval", "2", "--compile", "True", "--gradient_checkpointing", "True",
                 "--num_samples", "4")
    assert result.returncode == 0, result.stderr
    assert "Hello, I'm a language model," in result.stdout
    assert sorted(m["step"] for m in read_metrics(tmp_path / "out") if "val_loss" in m) == [0, 2]


def test_two_torchrun_processes_match_one_process_with_twice_the_accumulation(tmp_path, run_to_4):
    common = [*TINY, "--data", INPUT_TXT, "--max_iters", "4", "--eval_interval", "4"]
    run_to_4(tmp_path / "one")  # the same run in one process, with TINY's 2 micro-steps
    ddp = run_torchrun(*common, "--out_dir", tmp_path / "two", "--gradient_accumulation_steps", "1",
                       "--backend", "gloo")  # what auto picks on the CPU, named
    assert ddp.returncode == 0, ddp.stderr
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    weights_one = load_checkpoint(next((tmp_path / "one").glob("iter-4-*.pt")))["model"]
    weights_two = load_checkpoint(next((tmp_path / "two").glob("iter-4-*.pt")))["model"]
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-4, atol=1e-5)
    assert ddp.stdout.count("step      3") == 1  # only rank 0 logs
    assert "FutureWarning" not in ddp.stderr  # DDP's flag asked by its name in this torch


# -----------------------------------------------------------------------------
# Bad input: one line naming the problem, a non-zero exit, nothing in out_dir touched


def write_bad_shards(directory, kind):
    directory.mkdir()
    write_shard(directory / "x_val_000000.bin", np.ones(5000, dtype=np.uint16))
    write_shard(directory / "x_train_000001.bin", np.ones(5000, dtype=np.uint16))
    train = directory / "x_train_000001.bin"
    if kind == "magic":
        train.write_bytes(b"\x01\x02\x03\x04" + train.read_bytes()[4:])
    elif kind == "count":
        train.write_bytes(train.read_bytes()[:-100])
    elif kind == "empty":
        write_shard(train, np.zeros(0, dtype=np.uint16))
    elif kind == "none":
        train.unlink()
    elif kind == "one":
        return train
    return directory


BAD_INPUTS = {
    "n_embd not divisible": (["--n_embd", "65"], "is not divisible by --n_head"),
    "zero block size": (["--block_size", "0"], "--block_size must be a positive integer"),
    "decay before warmup": (["--warmup_iters", "30", "--lr_decay_iters", "20"], "the decay must end after the warmup"),
    "bad boolean": (["--compile", "maybe"], "expected True or False"),
    "wrong type": (["--batch_size", "eight"], "argument --batch_size: expected an integer, got 'eight'"),
    "negative size": (["--batch_size", "-1"], "--batch_size must be a positive integer, got -1"),
    "no such device": (["--device", "cuda"], "--device cuda: CUDA is not available here; use --device cpu"),
    "malformed device": (["--device", "cuda:x"], "--device 'cuda:x' is not one of auto, cpu, cuda, cuda:N, mps"),
    "dtype the device cannot run": (["--dtype", "float16"], "--dtype float16 is not supported for training on the CPU"),
    "batch larger than the data": (["--batch_size", "2000"], "is shorter than one batch"),
    "unknown flag": (["--learning_rat", "1"], "unrecognized arguments"),
    "missing data": (["--data", "{tmp}/nowhere"], "no such file or directory"),
    "no train shards": (["--data", "{shards:none}"], "no train shards"),
    "wrong magic": (["--data", "{shards:magic}"], "not a token shard"),
    "wrong count": (["--data", "{shards:count}"], "truncated or empty"),
    "empty shard": (["--data", "{shards:empty}"], "truncated or empty"),
    "text too short": (["--data", "{short_text}"], "is shorter than one batch"),
    "missing checkpoint": (["--init_from", "{tmp}/missing.pt"], "not found"),
    "corrupt checkpoint": (["--init_from", "{corrupt}"], "is corrupt or not a checkpoint"),
    "other architecture": (["--init_from", "{checkpoint}", "--n_layer", "3"], "another architecture"),
    "nothing to resume": (["--init_from", "resume"], "no iter-*.pt checkpoint"),
    "eval_only from scratch": (["--eval_only", "True"], "needs a checkpoint"),
    "unwritable out_dir": (["--out_dir", "{file}"], "cannot be written"),
    "rank without torchrun": (["--env", "RANK=0"], "RANK is set but"),
    "new run over an old one": (["--out_dir", "{run_dir}"], "already holds checkpoints"),
    "new run over an old one's log": (["--out_dir", "{log_only}"], "holds files of a run that wrote no checkpoint"),
    "older checkpoint of the same run": (["--init_from", "{checkpoint}", "--out_dir", "{run_dir}", "--max_iters", "8"],
                                         "is not the latest checkpoint of"),
    "nan learning rate": (["--learning_rate", "nan"], "expected a finite number, got 'nan'"),
    "inf weight decay": (["--weight_decay", "inf"], "expected a finite number, got 'inf'"),
    "negative seed": (["--seed", "-1"], "--seed must be from 0 to 2**63 - 1, got -1"),
    "huge seed": (["--seed", str(2**70)], "past the largest integer a flag takes (2**63 - 1)"),
    "huge ddp timeout": (["--ddp_timeout", str(10**15)], "is more than a day"),
    "model too large for memory": (["--n_embd", "131072", "--n_head", "1"], "more than the"),
    # sized before anything is built: a count of blocks past any model's would take hours even on the meta device
    "too many blocks": (["--n_layer", str(10**12)], "--n_layer 1,000,000,000,000 is more than 1,024, the most"),
    "too wide": (["--n_embd", str(10**9), "--n_head", "1"], "--n_embd 1,000,000,000 is more than 16,777,216"),
    "too large a vocabulary": (["--vocab_size", str(10**18)], "--vocab_size 1,000,000,000,000,000,000 is more"),
    "too long a context": (["--block_size", str(10**12)], "--block_size 1,000,000,000,000 is more than 16,777,216"),
    "damaged loader state": (["--init_from", "{bad_loader}", "--out_dir", "{tmp}/branch", "--max_iters", "8"],
                             "holds a malformed training state"),
    "export under a file": (["--init_from", "{checkpoint}", "--export_hf", "{file}/hf"], "cannot be written"),
    "empty text file": (["--data", "{file}"], "is empty: pass a text file with text in it"),
    "a shard given as text": (["--data", "{shards:one}"], "is a binary file, not text (a token shard?)"),
    "a checkpoint given as text": (["--data", "{checkpoint}"], "is a binary file, not text"),
    "too many samples": (["--num_samples", "1000000"], "--num_samples 1000000 is more than 64"),
    "a step past the host's memory": (["--batch_size", "100000", "--gradient_accumulation_steps", "100000"],
                                      "of host memory, more than half"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_line_and_a_nonzero_exit_and_touches_nothing(case, tmp_path, trained_run):
    args, message = BAD_INPUTS[case]
    if case == "no such device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run_dir, _ = trained_run
    (tmp_path / "short.txt").write_text("Too short for a batch.")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "log_only").mkdir()
    (tmp_path / "log_only" / "metrics.jsonl").write_text('{"step": 0, "val_loss": 10.9}\n')
    bad_loader = load_checkpoint(next(run_dir.glob("iter-4-*.pt")))
    bad_loader["loader"] = {"epoch": "first"}
    save_checkpoint(tmp_path / "bad_loader.pt", bad_loader)
    values = {"tmp": tmp_path, "short_text": tmp_path / "short.txt", "corrupt": tmp_path / "corrupt.pt",
              "checkpoint": next(run_dir.glob("iter-4-*.pt")), "file": tmp_path / "a_file", "run_dir": run_dir,
              "log_only": tmp_path / "log_only", "bad_loader": tmp_path / "bad_loader.pt"}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("a previous run's notes")
    command = [*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "2", "--eval_interval", "2"]
    env = {}
    for arg in args:
        if arg.startswith("{shards:"):
            arg = write_bad_shards(tmp_path / "shards", arg[8:-1])
        elif isinstance(arg, str) and arg.startswith("{"):
            arg = arg.format(**values)
        command.append(arg)
    if command[-2] == "--env":
        key, value = command.pop().split("=")
        command.pop()
        env[key] = value
    before = snapshot(out_dir), snapshot(run_dir)
    result = train_in_process(*command, env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert (snapshot(out_dir), snapshot(run_dir)) == before


# -----------------------------------------------------------------------------
# A run directory is one run: resume and eval-only take its settings; one writer; only the trainer's files


CUSTOM = [*TINY, "--data", INPUT_TXT, "--eval_interval", "4", "--gradient_accumulation_steps", "3",
          "--warmup_iters", "3", "--lr_decay_iters", "12", "--learning_rate", "2e-3", "--eval_iters", "3"]


@pytest.fixture(scope="module")
def custom_run_to_4(tmp_path_factory):
    """A run of CUSTOM's settings stopped at step 4, and a function that copies it into a test's folder (the
    copy's config.json names this run's out_dir, as a moved run's does)."""
    out_dir = tmp_path_factory.mktemp("custom") / "cut"
    first = train_in_process(*CUSTOM, "--out_dir", out_dir, "--max_iters", "4")
    assert first.returncode == 0, first.stderr
    return lambda destination: shutil.copytree(out_dir, destination)


def test_resume_with_only_init_from_restores_every_setting(tmp_path, custom_run_to_4):
    full = train_in_process(*CUSTOM, "--out_dir", tmp_path / "full", "--max_iters", "8")
    assert full.returncode == 0, full.stderr
    custom_run_to_4(tmp_path / "cut")
    resumed = train_in_process("--init_from", "resume", "--out_dir", tmp_path / "cut", "--max_iters", "8")
    assert resumed.returncode == 0, resumed.stderr
    assert "--max_iters: 4 -> 8 (command line)" in resumed.stdout
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "full")  # step by step, bit for bit
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    expected = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config == {**expected, "out_dir": str(tmp_path / "cut"), "init_from": "resume"}
    tokens = [m["tokens"] for m in read_metrics(tmp_path / "cut") if "train_loss" in m]
    assert tokens == [(step + 1) * 4 * 3 * 32 for step in range(8)]


def test_tokens_stay_true_when_the_batch_changes_on_resume(tmp_path, custom_run_to_4):
    custom_run_to_4(tmp_path / "out")
    resumed = train_in_process("--init_from", "resume", "--out_dir", tmp_path / "out", "--max_iters", "6",
                               "--gradient_accumulation_steps", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert "the global batch changes from 12 to 4 sequences per step" in resumed.stdout
    tokens = {m["step"]: m["tokens"] for m in read_metrics(tmp_path / "out") if "train_loss" in m}
    assert tokens[3] == 4 * 12 * 32 and tokens[5] == tokens[3] + 2 * 4 * 32


def test_eval_only_with_nothing_else_scores_as_training_did_into_the_checkpoints_folder(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], run_dir)
    checkpoint = next(run_dir.glob("iter-8-*.pt"))
    result = train_in_process("--eval_only", "True", "--init_from", checkpoint, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    logged = [m for m in read_metrics(run_dir) if m.get("step") == 8 and "val_loss" in m]
    assert len(logged) == 2 and logged[1]["eval_only"] is True
    assert logged[1]["val_loss"] == pytest.approx(logged[0]["val_loss"], rel=1e-6)
    assert logged[0]["eval_seconds"] > 0  # the training run says what each evaluation cost it
    assert "over 2 batches" in result.stdout  # the run's --eval_iters, not the default 200


def test_a_second_trainer_on_the_same_out_dir_is_refused_and_the_first_is_unaffected(tmp_path):
    out_dir = tmp_path / "out"
    command = [sys.executable, str(REPO / "tests" / "fault_injection.py"), *TINY, "--data", str(INPUT_TXT),
               "--out_dir", str(out_dir), "--max_iters", "9", "--eval_interval", "3"]
    # slow enough that the first is still training while the two others start and are refused, on a
    # busy machine too
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "FAULT": "slow_steps:1.5", "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while not ((out_dir / ".lock").exists() and (out_dir / ".lock").read_text().strip()):
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    while not list(out_dir.glob("iter-3-*.pt")):  # something to resume from
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    for args in (["--init_from", "resume"], []):  # from scratch or resume alike
        second = train_in_process(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "6", *args)
        assert second.returncode == 1
        (line,) = second.stderr.strip().splitlines()
        assert f"is in use by another trainer (pid {first.pid} on" in line
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert next(out_dir.glob("iter-9-*.pt"))


def test_a_users_file_named_like_a_checkpoint_is_never_read_pruned_or_resumed(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "iter-100-my-notes.pt").write_text("notes")
    (out_dir / ".notes.tmp").write_text("notes")  # named like temporary files, but not the trainer's
    (out_dir / ".x.tmp").mkdir()
    (out_dir / ".metrics.jsonl.1234.0badcafe.tmp").write_text("cut short")  # a killed write's, removed
    result = train_in_process(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "4",
                              "--eval_interval", "1", "--keep_last", "1")
    assert result.returncode == 0, result.stderr
    resumed = train_in_process("--init_from", "resume", "--out_dir", out_dir, "--max_iters", "5")
    assert resumed.returncode == 0, resumed.stderr
    assert "from step 4" in resumed.stdout
    assert (out_dir / "iter-100-my-notes.pt").read_text() == "notes"
    assert sorted(p.name for p in out_dir.glob("iter-*.pt"))[0] == "iter-100-my-notes.pt"
    assert sorted(p.name for p in out_dir.glob(".*")) == [".notes.tmp", ".x.tmp"]


def refused_in_process(argv, capsys):
    """The trainer's main in this process, refusing: its one line."""
    import train_gpt2
    with pytest.raises(SystemExit) as exit_info:
        train_gpt2.main([str(word) for word in argv])
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "config.json", "exit_status", "plot.png", "dangling"])
def test_nothing_the_trainer_writes_goes_through_a_link_in_out_dir(name, tmp_path, capsys):
    outside = tmp_path / "outside"
    if name != "dangling":
        outside.write_text("precious")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    link = out_dir / ("metrics.jsonl" if name == "dangling" else name)
    link.symlink_to(outside)
    line = refused_in_process([*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "2"], capsys)
    assert line == (f"error: {link} is a symbolic link (to {outside}): this program writes that file itself, "
                    "never through a link; remove the link, then run again")
    assert outside.read_text() == "precious" if name != "dangling" else not outside.exists()
    assert sorted(p.name for p in out_dir.iterdir()) == [link.name]


def test_a_resume_never_appends_through_a_link(trained_run, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    latest = sorted(trained_run[0].glob("iter-8-*.pt"))[0]
    shutil.copy(latest, out_dir / latest.name)
    outside = tmp_path / "metrics-elsewhere.jsonl"
    shutil.copy(trained_run[0] / "metrics.jsonl", outside)
    (out_dir / "metrics.jsonl").symlink_to(outside)
    before = outside.read_bytes()
    line = refused_in_process(["--init_from", "resume", "--out_dir", out_dir, "--max_iters", "10"], capsys)
    assert f"{out_dir / 'metrics.jsonl'} is a symbolic link" in line
    assert outside.read_bytes() == before


def test_a_tracker_folder_that_is_a_link_is_refused(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "tensorboard").symlink_to(elsewhere)
    line = refused_in_process([*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "2",
                               "--tensorboard", "True"], capsys)
    assert "--tensorboard True writes into the folder" in line and "which is a symbolic link" in line
    assert list(elsewhere.iterdir()) == []


def test_resume_forgets_damaged_lines_of_the_metrics_log(tmp_path, run_to_4):
    out_dir = run_to_4(tmp_path / "out")
    with open(out_dir / "metrics.jsonl", "ab") as f:
        f.write(b'{"val_loss": 1.0}\nnull\n\xff\xfe not text\n[1, 2]\n{"step": "x"}\n')
    resumed = train_in_process("--init_from", "resume", "--out_dir", out_dir, "--max_iters", "6")
    assert resumed.returncode == 0, resumed.stderr
    assert [m["step"] for m in read_metrics(out_dir) if "train_loss" in m] == list(range(6))


def test_a_run_records_its_data_path_so_eval_only_works_from_another_directory(tmp_path):
    out_dir = tmp_path / "out"
    result = train_in_process(*TINY, "--data", "input.txt", "--out_dir", out_dir, "--max_iters", "2",
                              "--eval_interval", "2", cwd=REPO)  # --data relative to the repo
    assert result.returncode == 0, result.stderr
    assert json.loads((out_dir / "config.json").read_text())["data"] == str(INPUT_TXT)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    scored = train_in_process("--eval_only", "True", "--init_from", next(out_dir.glob("iter-2-*.pt")),
                              cwd=elsewhere)
    assert scored.returncode == 0, scored.stderr
    assert read_metrics(out_dir)[-1]["eval_only"] is True


def val_data_edited(data, kind):
    """The edit of kind to data's val split (a copy of input.txt, or shards of its tokens), made in place."""
    if kind == "a token in a text file's last 10%":
        text = data.read_text()
        at = text.rindex(" the ")  # one token for another: the same count, the train part's the same
        data.write_text(text[:at] + " and " + text[at + 5:])
    elif kind == "2 bytes of a val shard":
        raw = bytearray((data / "x_val_000000.bin").read_bytes())
        raw[-64:-62] = b"\x01\x01" if raw[-64:-62] != b"\x01\x01" else b"\x02\x01"  # token 257 (or 258)
        (data / "x_val_000000.bin").write_bytes(raw)
    elif kind == "a val shard cut short":
        write_shard(data / "x_val_000000.bin", open_shard(data / "x_val_000000.bin")[:-10].copy())
    elif kind == "another val shard":
        shutil.copyfile(data / "x_val_000000.bin", data / "x_val_000001.bin")


@pytest.mark.parametrize("kind, message", [
    ("a token in a text file's last 10%", "the val data has the checkpoint's source names and sizes but other "
                                          "contents (data.txt[val] differs from when the run first read it)"),
    ("2 bytes of a val shard", "the val data has the checkpoint's source names and sizes but other contents "
                               "(x_val_000000.bin differs from when the run first read it)"),
    ("a val shard cut short", "the val data differs from the checkpoint's (source names or sizes changed)"),
    ("another val shard", "the val data differs from the checkpoint's (source names or sizes changed)"),
])
def test_val_data_changed_in_place_is_refused_on_resume_as_train_data_is(kind, message, tmp_path, trained_run):
    import fineweb
    if "text file" in kind:
        data = tmp_path / "data.txt"
        shutil.copyfile(INPUT_TXT, data)
    else:
        data = tmp_path / "shards"
        data.mkdir()
        tokens = np.array(fineweb.load_tokenizer().encode(INPUT_TXT.read_text()), dtype=np.uint16)
        write_shard(data / "x_train_000001.bin", tokens[:100_000])
        write_shard(data / "x_val_000000.bin", tokens[-20_000:])
    out_dir, args = tmp_path / "out", [*TINY, "--data", data, "--max_iters", "8", "--eval_interval", "4"]
    first = train_in_process(*args, "--out_dir", out_dir, "--max_iters", "4")
    assert first.returncode == 0, first.stderr
    copy = shutil.copyfile if data.is_file() else shutil.copytree
    copy(data, tmp_path / "pristine")
    val_data_edited(data, kind)
    fineweb.tokenize_text_file.cache_clear()  # read afresh, as a resumed run's new process does
    if "text file" in kind:  # the train split is untouched: it is the val split that is refused
        train = [fineweb.load_token_sources(path, "train", load_tokenizer())[0][1] for path in (data, INPUT_TXT)]
        assert np.array_equal(*train)
    before = snapshot(out_dir)
    refused = train_in_process(*args, "--out_dir", out_dir, "--init_from", "resume")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [f"error: {message}: restore the data the run evaluated on, or "
                                                   "start a new run" if "contents" in message else
                                                   f"error: {message}: resume with the same --data"]
    assert snapshot(out_dir) == before
    if data.is_dir():
        shutil.rmtree(data)
    copy(tmp_path / "pristine", data)  # the data restored: the run goes on exactly
    fineweb.tokenize_text_file.cache_clear()
    resumed = train_in_process(*args, "--out_dir", out_dir, "--init_from", "resume")
    assert resumed.returncode == 0, resumed.stderr
    if "text file" in kind:  # input.txt's own tokens
        assert train_losses(out_dir) == train_losses(trained_run[0])


# -----------------------------------------------------------------------------
# Runs that look after themselves: the loss-spike guard, --auto_batch on a CPU


def test_a_region_of_loss_spikes_goes_back_to_the_checkpoint_before_it_and_none_of_it_is_applied(spiky_run):
    _, out_dir, result = spiky_run  # the batches of steps 25 to 29 are random tokens
    assert "spike guard: a step whose loss is more than 3 robust deviations above the median of the last 10 " \
           "applied steps is skipped; 3 in a row go back to the last checkpoint before them" in result.stdout
    records = read_metrics(out_dir)
    # after the roll-back the guard still judges by the losses before the spikes: 28 and 29 are skipped too
    assert [r["step"] for r in records if r.get("loss_spike")] == [25, 26, 27, 28, 29]
    (rolled,) = [r for r in records if "rolled_back_to" in r]
    assert rolled == {"step": 27, "rolled_back_to": 20, "skipped_batches": 8}
    assert "3 loss spikes in a row: the weights go back to" in result.stdout
    final = load_checkpoint(next(out_dir.glob("iter-32-*.pt")))
    # the steps go on: the weights of step 20 trained on from step 30, the batches of 20 to 29 unused
    assert final["loader"]["position"] == 32 * 4 * 2 * 32 and final["progress"]["skipped_steps"] == 5
    after = [r for r in records if r["step"] > 29 and "train_loss" in r]
    assert [r["step"] for r in after] == [30, 31] and all(r["train_loss"] < 9 for r in after)


def test_a_third_run_of_spikes_in_one_region_stops_naming_the_checkpoint_before_it(tmp_path):
    data = spiky_data(tmp_path / "shards", 25, 9)  # steps 25 to 33; a checkpoint at 30, inside
    out_dir = tmp_path / "out"
    result = run_train(*TINY, *SPIKE_GUARD, "--data", data, "--out_dir", out_dir, "--max_iters", "40")
    assert result.returncode == 1
    records = read_metrics(out_dir)
    assert [r["rolled_back_to"] for r in records if "rolled_back_to" in r] == [20, 20]
    assert [r["step"] for r in records if r.get("loss_spike")] == list(range(25, 34))
    before = next(out_dir.glob("iter-20-*.pt"))
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: stopped at step 33: 3 steps in a row had loss spikes; the last good checkpoint is {before}: "
        "continue from it with a lower --learning_rate")


def test_auto_batch_on_a_cpu_keeps_the_flags_and_says_so(tmp_path):
    out_dir = tmp_path / "out"
    result = train_in_process(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "2",
                              "--eval_interval", "2", "--auto_batch", "True")
    assert result.returncode == 0, result.stderr
    assert "--auto_batch: on cpu the flags' micro-batch of 4 is kept" in result.stdout
    config = json.loads((out_dir / "config.json").read_text())
    assert config["auto_batch"] is True
    assert config["auto_batch_chosen"] == {"batch_size": 4, "gradient_accumulation_steps": 2}
    assert load_checkpoint(next(out_dir.glob("iter-2-*.pt")))["micro_batch"] == [4, 2]
