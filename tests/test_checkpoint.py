"""checkpoint.py: the run directory's names, the best checkpoint's own copy, and damaged files refused with
one line."""

import os
import shutil

import pytest
import torch

from checkpoint import (BEST_CHECKPOINT, checkpoint_name, latest_checkpoint, load_checkpoint, prune_checkpoints,
                        run_checkpoints, save_best, save_checkpoint)
from cli import UserError
from train_gpt2 import load_start


def touch(directory, *names):
    for name in names:
        (directory / name).write_bytes(b"x")


def test_only_the_trainers_own_names_are_checkpoints(tmp_path):
    touch(tmp_path, "iter-1-my-notes.pt", "iter-2-loss-3.1416.pt", "iter-9-stopped.pt", "iter-9-loss-2.0000.pt",
          "iter-10-loss-2.5.pt", "iter-x-loss-1.0000.pt", "best_val_loss.pt", "iter-12-loss-nan.pt.bak",
          "iter-11-loss-nan.pt", "iter-12-loss-inf.pt")  # diverged weights: never resumed from nor counted
    assert [p.name for p in run_checkpoints(tmp_path)] == ["iter-2-loss-3.1416.pt", "iter-9-stopped.pt",
                                                           "iter-9-loss-2.0000.pt"]
    assert latest_checkpoint(tmp_path).name == "iter-9-loss-2.0000.pt"


def test_pruning_never_touches_a_users_file(tmp_path):
    touch(tmp_path, "iter-1-my-notes.pt", "iter-2-loss-3.0000.pt", "iter-4-loss-2.0000.pt", "iter-6-loss-1.0000.pt")
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter-1-my-notes.pt", "iter-6-loss-1.0000.pt"]


def test_pruning_keeps_the_checkpoint_a_run_would_go_back_to(tmp_path):
    touch(tmp_path, "iter-2-loss-3.0000.pt", "iter-4-loss-2.0000.pt", "iter-6-loss-1.0000.pt")
    (tmp_path / "iter-7-stopped.pt").mkdir()  # not a file: never a checkpoint, never deleted
    failed = prune_checkpoints(tmp_path, keep_last=1, keep=[f"{tmp_path}/./iter-2-loss-3.0000.pt"])
    assert failed == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "iter-2-loss-3.0000.pt", "iter-6-loss-1.0000.pt", "iter-7-stopped.pt"]


def test_names_follow_the_step_and_the_val_loss():
    assert checkpoint_name(40, 3.14159) == "iter-40-loss-3.1416.pt"
    assert checkpoint_name(40) == "iter-40-stopped.pt"


def test_the_best_checkpoint_survives_damage_to_the_file_it_was_copied_from(trained_run, tmp_path):
    source = tmp_path / "iter-8-loss-1.0000.pt"
    shutil.copyfile(next(trained_run[0].glob("iter-8-*.pt")), source)
    save_best(source, tmp_path)
    os.truncate(source, 100)
    assert load_checkpoint(tmp_path / BEST_CHECKPOINT)["progress"]["iter_num"] == 8


def damaged(checkpoint, kind):
    state = checkpoint["model"]
    if kind == "missing tensor":
        del state["lm_head.weight"], state["transformer.wte.weight"]
    elif kind == "extra tensor":
        state["transformer.extra"] = torch.zeros(3)
    elif kind == "wrong shape":
        state["transformer.ln_f.weight"] = torch.zeros(7)
    elif kind == "unknown model_args key":
        checkpoint["model_args"]["n_experts"] = 8
    return checkpoint


@pytest.mark.parametrize("kind, message", [
    ("missing tensor", "is of a model other than this code's GPT (it lacks transformer.wte.weight, which this "
                       "code's GPT has): load it with the code "),
    ("extra tensor", "(it holds transformer.extra, which this code's GPT lacks)"),
    ("wrong shape", "(its transformer.ln_f.weight is (7,), this code's GPT's (64,))"),
    ("unknown model_args key", "(its architecture has n_experts=8, a field this code's GPTConfig lacks)"),
])
def test_a_checkpoint_of_another_model_is_one_line_naming_the_first_difference(kind, message, trained_run,
                                                                                tmp_path):
    checkpoint = load_checkpoint(next(trained_run[0].glob("iter-8-*.pt")))
    path = tmp_path / "iter-8-loss-1.0000.pt"
    save_checkpoint(path, damaged(checkpoint, kind))
    with pytest.raises(UserError) as error:
        load_start(str(path), ".")
    assert message in str(error.value) and "\n" not in str(error.value) and "damaged" not in str(error.value)


def test_loading_keeps_one_copy_of_the_weights_and_names_the_file(trained_run):
    path = next(trained_run[0].glob("iter-8-*.pt"))
    model, checkpoint = load_start(str(path), ".")
    assert "model" not in checkpoint and checkpoint["path"] == path and not model.training
    model, checkpoint = load_start("resume", trained_run[0])
    assert checkpoint["path"] == latest_checkpoint(trained_run[0])


def as_version_1(checkpoint):
    """A checkpoint in the layout version 1 wrote: the counters at the top level, and none of the fields
    added since (tokens, skipped_steps, wandb_run_id, world_size, the loader's shuffle and fingerprints)."""
    old = {key: value for key, value in checkpoint.items()
           if key not in ("progress", "path", "world_size", "torch_version", "git_commit")}
    old.update(version=1, iter_num=checkpoint["progress"]["iter_num"],
               best_val_loss=checkpoint["progress"]["best_val_loss"])
    old["loader"] = {k: v for k, v in checkpoint["loader"].items() if k not in ("shuffle", "fingerprints")}
    old["config"] = {k: v for k, v in checkpoint["config"].items() if k != "shuffle"}
    old["optimizer"] = checkpoint["optimizer"]["adamw"]  # versions 1 and 2 held AdamW's state alone
    return old


def test_a_version_1_checkpoint_is_upgraded_with_what_its_run_did(trained_run, tmp_path):
    checkpoint = load_checkpoint(next(trained_run[0].glob("iter-8-*.pt")))
    path = tmp_path / "iter-8-loss-1.0000.pt"
    save_checkpoint(path, as_version_1(checkpoint))
    upgraded = load_checkpoint(path)
    assert upgraded["version"] == 3 and upgraded["world_size"] == 1
    assert set(upgraded["optimizer"]) == {"adamw"}  # version 2 held AdamW's state alone
    config = checkpoint["config"]
    tokens_per_step = config["batch_size"] * config["gradient_accumulation_steps"] * config["block_size"]
    assert upgraded["progress"] == {**checkpoint["progress"], "tokens": 8 * tokens_per_step, "best_step": None,
                                    "skipped_steps": 0, "wandb_run_id": None, "train_seconds": 0.0,
                                    "target": None}  # the counters since version 2 count from the upgrade on
    # the loader of version 1 read its data in order: the upgraded run goes on reading it so
    assert upgraded["loader"]["shuffle"] is False and upgraded["config"]["shuffle"] is False
    assert upgraded["loader"]["fingerprints"] is None


def test_a_version_1_checkpoint_resumes(trained_run, tmp_path):
    from conftest import train_in_process
    checkpoint = load_checkpoint(next(trained_run[0].glob("iter-8-*.pt")))
    path = tmp_path / "iter-8-loss-1.0000.pt"
    save_checkpoint(path, as_version_1(checkpoint))
    result = train_in_process("--init_from", path, "--out_dir", tmp_path / "branch", "--max_iters", "10")
    assert result.returncode == 0, result.stderr
    assert "from step 8" in result.stdout
    resumed = load_checkpoint(next((tmp_path / "branch").glob("iter-10-*.pt")))
    assert resumed["version"] == 3 and resumed["loader"]["shuffle"] is False  # still read in order


def crafted(checkpoint, field, value):
    """checkpoint with one field (a path of keys) set to value."""
    *parents, last = field.split(".")
    target = checkpoint
    index = lambda key: int(key) if key.isdigit() else key  # an optimizer's state is keyed by position
    for key in parents:
        target = target[index(key)]
    target[index(last)] = value
    return checkpoint


@pytest.mark.parametrize("field, value, message", [
    ("progress.iter_num", -5, "malformed training state (progress"),
    ("progress.best_val_loss", "low", "malformed training state (progress"),
    ("progress.tokens", "many", "malformed training state (progress"),
    ("progress.best_step", 99, "malformed training state (progress"),
    ("loader.position", -1, "malformed training state (loader"),
    ("loader.shards", "all", "malformed training state (loader"),
    ("model_args.n_head", 3, "architecture this code's GPTConfig refuses (--n_embd 64 is not divisible by --n_head 3"),
    ("model_args.n_layer", "2", "GPTConfig refuses (--n_layer must be a positive integer, got '2'"),
    ("model_args.n_embd", 10**9, "GPTConfig refuses (--n_embd 1,000,000,000 is more than 16,777,216"),
    ("model_args.n_layer", 10**12, "GPTConfig refuses (--n_layer 1,000,000,000,000 is more than 1,024"),
    ("model_args.block_size", 10**15, "GPTConfig refuses (--block_size 1,000,000,000,000,000 is more than"),
    ("model_args.vocab_size", 10**20, "GPTConfig refuses (--vocab_size 100,000,000,000,000,000,000 is more"),
    ("model_args.n_embd", 2**16, "(its transformer.wte.weight is (50304, 64), this code's GPT's (50304, 65536))"),
    ("optimizer.adamw.state.4.exp_avg", torch.zeros(1), "parameter 4 (transformer.h.0.mlp.c_fc.weight)'s exp_avg "
                                                         "is torch.float32 (1,), this optimizer's torch.float32 "
                                                         "(256, 64)"),
    ("optimizer.adamw.state.4.exp_avg_sq", "big", "parameter 4 (transformer.h.0.mlp.c_fc.weight)'s exp_avg_sq is "
                                                  "a str, not a tensor"),
    ("optimizer.adamw.state.99", {}, "state of parameter 99, of 28 parameters"),
    ("optimizer", {"muon": {"state": {}, "param_groups": []}}, "the checkpoint's optimizer is muon, this run's "
                                                               "adamw: resume with --optimizer"),
    ("rng.torch", [1, 2], "malformed training state (rng"),
    ("world_size", 0, "malformed training state (world_size"),
    ("version", 7, "format version 7"),
    ("config.learning_rate", float("nan"), "malformed config (--learning_rate must be a finite number"),
    ("config.batch_size", "8", "malformed config (--batch_size must be int"),
    ("config.max_iters", -1, "malformed config (--max_iters must be 0 or more"),
    ("loader.fingerprints", ["abc", None, None], "malformed training state (loader"),
    ("spike_guard.recent", [3.0, float("nan")], "malformed training state (spike_guard"),
    ("spike_guard.bad_steps", -1, "malformed training state (spike_guard"),
    ("progress.target", "reached", "malformed training state (progress"),
    ("progress.target", {"step": 4}, "malformed training state (progress"),
    ("progress.target", {"target_val_loss": 9.0, "val_loss": 8.0, "step": "four", "tokens": 1024,
                         "train_seconds": 1.0}, "malformed training state (progress"),
    ("progress.target", {"target_val_loss": 9.0, "val_loss": float("nan"), "step": 4, "tokens": 1024,
                         "train_seconds": 1.0}, "malformed training state (progress"),
    ("progress.target", {"target_val_loss": 9.0, "val_loss": 8.0, "step": 40, "tokens": 1024,
                         "train_seconds": 1.0}, "malformed training state (progress"),  # past the checkpoint
    ("scaler", {"scale": float("nan"), "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                "_growth_tracker": 0}, "malformed training state (scaler"),
    ("scaler", {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                "_growth_tracker": -3}, "malformed training state (scaler"),
    ("scaler.scale", "big", "malformed training state (scaler"),
    ("val_data.fingerprints", ["abc", "def"], "malformed training state (val_data"),
    ("val_data.sources", "all", "malformed training state (val_data"),
])
def test_a_crafted_field_is_refused_in_one_line_before_any_training(field, value, message, trained_run, tmp_path,
                                                                   capsys):
    import train_gpt2
    checkpoint = load_checkpoint(next(trained_run[0].glob("iter-8-*.pt")))
    path = tmp_path / "iter-8-loss-1.0000.pt"
    save_checkpoint(path, crafted(checkpoint, field, value))
    with pytest.raises(SystemExit) as exit_info:  # the trainer's main, in this process: no start-up to pay
        train_gpt2.main(["--init_from", str(path), "--out_dir", str(tmp_path / "branch"), "--max_iters", "10"])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "branch").exists()


@pytest.mark.parametrize("lost", ["one parameter's state", "the whole state", "a moment"])
def test_an_optimizer_state_without_its_moments_is_refused_in_one_line(lost, trained_run, tmp_path, capsys):
    checkpoint = load_checkpoint(next(trained_run[0].glob("iter-8-*.pt")))
    state = checkpoint["optimizer"]["adamw"]["state"]
    if lost == "one parameter's state":
        del state[4]
    elif lost == "the whole state":
        state.clear()
    else:
        del state[4]["exp_avg_sq"]
    path = tmp_path / "iter-8-loss-1.0000.pt"
    save_checkpoint(path, checkpoint)
    holds = {"one parameter's state": "parameter 4 (transformer.h.0.mlp.c_fc.weight) has no state",
             "the whole state": "parameter 0 (transformer.wte.weight) has no state",
             "a moment": "parameter 4 (transformer.h.0.mlp.c_fc.weight) has state ['exp_avg', 'step']"}[lost]
    line = refused_in_process(["--init_from", path, "--out_dir", tmp_path / "branch", "--max_iters", "10"], capsys)
    assert f"{holds} where this optimizer keeps exp_avg, exp_avg_sq, step; --reset_optimizer True starts" in line
    assert not (tmp_path / "branch").exists()


def test_a_resume_takes_every_optimizer_setting_from_the_run_never_from_the_saved_groups(trained_run, tmp_path):
    import train_gpt2
    checkpoint = load_checkpoint(next(trained_run[0].glob("iter-8-*.pt")))
    for group in checkpoint["optimizer"]["adamw"]["param_groups"]:
        group.update(weight_decay=1e6, eps="abc", betas=(0.0, 0.0))  # a crafted or stale hyper-parameter
    path = tmp_path / "iter-8-loss-1.0000.pt"
    save_checkpoint(path, checkpoint)
    train_gpt2.main(["--init_from", str(path), "--out_dir", str(tmp_path / "branch"), "--max_iters", "9",
                     "--weight_decay", "0.5", "--num_samples", "0"])
    resumed = load_checkpoint(next((tmp_path / "branch").glob("iter-9-*.pt")))
    groups = resumed["optimizer"]["adamw"]["param_groups"]  # the groups the optimizer stepped with
    assert [g["weight_decay"] for g in groups] == [0.5, 0.5, 0.0]  # the flag given, applied
    assert all(g["eps"] == 1e-8 and tuple(g["betas"]) == (0.9, 0.95) for g in groups)
    assert resumed["optimizer"]["adamw"]["state"][0]["step"].item() == 9  # the moments went on


def refused_in_process(argv, capsys):
    """The trainer's main in this process, refusing: its one line."""
    import train_gpt2
    with pytest.raises(SystemExit) as exit_info:
        train_gpt2.main([str(word) for word in argv])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("config, message", [
    ({"batch_size": [0]}, "version 1 batch_size [0] is not a count"),
    ({"batch_size": [0], "gradient_accumulation_steps": 10**12}, "version 1 batch_size [0] is not a count"),
    ({"gradient_accumulation_steps": 10**12}, "one step's batch (4 x 1000000000000 x 32 tokens) takes"),
])
def test_a_version_1_checkpoint_of_impossible_batch_counts_is_one_line(config, message, trained_run, tmp_path,
                                                                         capsys):
    old = as_version_1(load_checkpoint(next(trained_run[0].glob("iter-8-*.pt"))))
    old["config"].update(config)
    path = tmp_path / "iter-8-loss-1.0000.pt"
    save_checkpoint(path, old)  # a list times a count was a list of 10^12 items: MemoryError
    line = refused_in_process(["--init_from", path, "--out_dir", tmp_path / "branch", "--max_iters", "10"], capsys)
    assert message in line
    assert not (tmp_path / "branch").exists()


def test_a_checkpoint_of_a_smaller_vocabulary_than_the_tokenizers_is_refused_in_training_and_eval_only(
        trained_run, tmp_path, capsys):
    checkpoint = load_checkpoint(next(trained_run[0].glob("iter-8-*.pt")))
    checkpoint["model_args"]["vocab_size"] = 1000  # self-consistent: the weights, and no optimizer state
    checkpoint["model"]["lm_head.weight"] = checkpoint["model"]["lm_head.weight"][:1000].clone()
    checkpoint["model"]["transformer.wte.weight"] = checkpoint["model"]["lm_head.weight"]
    checkpoint["optimizer"]["adamw"]["state"] = {}
    path = tmp_path / "iter-8-loss-1.0000.pt"
    save_checkpoint(path, checkpoint)
    expected = (f"error: {path} has vocab_size=1000, fewer than the 50,257 token ids of its tokenizer gpt2.tiktoken: "
                "pass a model of that tokenizer's vocabulary (a new run's --vocab_size follows its --tokenizer unless "
                "given)")
    for extra in (["--out_dir", tmp_path / "branch", "--max_iters", "10"], ["--eval_only", "True"]):
        assert refused_in_process(["--init_from", path, *extra], capsys) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_checkpoint_from_before_the_spike_guard_was_kept_resumes_with_an_empty_guard(trained_run, tmp_path):
    import train_gpt2
    checkpoint = load_checkpoint(next(trained_run[0].glob("iter-8-*.pt")))
    assert checkpoint["spike_guard"]["recent"] == []  # the guard was off: no losses kept
    del checkpoint["spike_guard"]
    path = tmp_path / "iter-8-loss-1.0000.pt"
    save_checkpoint(path, checkpoint)
    assert load_checkpoint(path)["spike_guard"] == {}
    train_gpt2.main(["--init_from", str(path), "--out_dir", str(tmp_path / "branch"), "--max_iters", "9",
                     "--spike_guard", "6"])
    resumed = load_checkpoint(next((tmp_path / "branch").glob("iter-9-*.pt")))
    assert len(resumed["spike_guard"]["recent"]) == 1  # step 8's loss, the first the guard kept


def spoiled(tensor, kind):
    """tensor as no run of the trainer writes it."""
    return {"nan": lambda t: t.clone().fill_(float("nan")), "inf": lambda t: t.clone().fill_(float("inf")),
            "negative": lambda t: -1.0 - t.abs(), "integer": lambda t: t.long(),
            "complex": lambda t: t.to(torch.complex64)}[kind](tensor)


@pytest.mark.parametrize("where, kind, message", [
    ("model.transformer.h.0.attn.c_attn.weight", "nan", "transformer.h.0.attn.c_attn.weight holds NaN"),
    ("model.transformer.ln_f.bias", "inf", "transformer.ln_f.bias holds inf"),
    ("model.transformer.h.1.mlp.c_fc.weight", "integer", "transformer.h.1.mlp.c_fc.weight is torch.int64, not a "
                                                         "floating-point tensor"),
    ("model.transformer.wpe.weight", "complex", "transformer.wpe.weight is torch.complex64, not a floating-point"),
    ("optimizer.3.exp_avg", "nan", "adamw's exp_avg of parameter 3 holds NaN"),
    ("optimizer.3.exp_avg_sq", "negative", "adamw's exp_avg_sq of parameter 3 is negative"),
    ("optimizer.0.step", "negative", "adamw's step of parameter 0 is negative"),
], ids=lambda value: value if isinstance(value, str) and " " not in value else None)
def test_a_tensor_no_training_writes_is_refused_naming_it_by_every_tool(where, kind, message, trained_run, tmp_path,
                                                                          capsys):
    from conftest import run_main
    checkpoint = load_checkpoint(next(trained_run[0].glob("iter-8-*.pt")))
    part, name = where.split(".", 1)
    tensors = checkpoint["model"] if part == "model" else checkpoint["optimizer"]["adamw"]["state"][int(name[0])]
    key = name if part == "model" else name.split(".")[1]
    tensors[key] = spoiled(tensors[key], kind)
    path = tmp_path / "iter-8-loss-1.0000.pt"
    save_checkpoint(path, checkpoint)
    expected = f"error: checkpoint {path} holds a malformed training state ({message}"
    for extra in (["--out_dir", tmp_path / "branch", "--max_iters", "10"], ["--eval_only", "True"]):
        assert refused_in_process(["--init_from", path, *extra], capsys).startswith(expected)
    sampled = run_main("sample.py", "--init_from", path, "--device", "cpu", "--max_new_tokens", "2")
    assert sampled.returncode == 1 and sampled.stderr.strip().startswith(expected), sampled.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
