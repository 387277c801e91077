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
          "iter-10-loss-2.5.pt", "iter-x-loss-1.0000.pt", "best_val_loss.pt", "iter-12-loss-nan.pt.bak")
    assert [p.name for p in run_checkpoints(tmp_path)] == ["iter-2-loss-3.1416.pt", "iter-9-stopped.pt",
                                                           "iter-9-loss-2.0000.pt"]
    assert latest_checkpoint(tmp_path).name == "iter-9-loss-2.0000.pt"


def test_pruning_never_touches_a_users_file(tmp_path):
    touch(tmp_path, "iter-1-my-notes.pt", "iter-2-loss-3.0000.pt", "iter-4-loss-2.0000.pt", "iter-6-loss-1.0000.pt")
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter-1-my-notes.pt", "iter-6-loss-1.0000.pt"]


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
    ("missing tensor", "does not match its own architecture"),
    ("extra tensor", "does not match its own architecture"),
    ("wrong shape", "does not match its own architecture"),
    ("unknown model_args key", "has an unknown architecture"),
])
def test_a_damaged_checkpoint_is_one_line(kind, message, trained_run, tmp_path):
    checkpoint = load_checkpoint(next(trained_run[0].glob("iter-8-*.pt")))
    path = tmp_path / "iter-8-loss-1.0000.pt"
    save_checkpoint(path, damaged(checkpoint, kind))
    with pytest.raises(UserError, match=message) as error:
        load_start(str(path), ".")
    assert "\n" not in str(error.value)


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
    return old


def test_a_version_1_checkpoint_is_upgraded_with_what_its_run_did(trained_run, tmp_path):
    checkpoint = load_checkpoint(next(trained_run[0].glob("iter-8-*.pt")))
    path = tmp_path / "iter-8-loss-1.0000.pt"
    save_checkpoint(path, as_version_1(checkpoint))
    upgraded = load_checkpoint(path)
    assert upgraded["version"] == 2 and upgraded["world_size"] == 1
    config = checkpoint["config"]
    tokens_per_step = config["batch_size"] * config["gradient_accumulation_steps"] * config["block_size"]
    assert upgraded["progress"] == {**checkpoint["progress"], "tokens": 8 * tokens_per_step, "best_step": None,
                                    "skipped_steps": 0, "wandb_run_id": None}
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
    assert resumed["version"] == 2 and resumed["loader"]["shuffle"] is False  # still read in order


def crafted(checkpoint, field, value):
    """checkpoint with one field (a path of keys) set to value."""
    *parents, last = field.split(".")
    target = checkpoint
    for key in parents:
        target = target[key]
    target[last] = value
    return checkpoint


@pytest.mark.parametrize("field, value, message", [
    ("progress.iter_num", -5, "malformed training state (progress"),
    ("progress.best_val_loss", "low", "malformed training state (progress"),
    ("progress.tokens", "many", "malformed training state (progress"),
    ("progress.best_step", 99, "malformed training state (progress"),
    ("loader.position", -1, "malformed training state (loader"),
    ("loader.shards", "all", "malformed training state (loader"),
    ("model_args.n_head", 3, "malformed training state (model_args"),
    ("rng.torch", [1, 2], "malformed training state (rng"),
    ("world_size", 0, "malformed training state (world_size"),
    ("version", 7, "format version 7"),
    ("config.learning_rate", float("nan"), "malformed config (--learning_rate must be a finite number"),
    ("config.batch_size", "8", "malformed config (--batch_size must be int"),
    ("config.max_iters", -1, "malformed config (--max_iters must be 0 or more"),
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
