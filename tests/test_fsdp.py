"""--fsdp True: the same training as DDP and as one process, checkpoints in the one format that any of them
resumes, world size 1. Every run is 2 Gloo processes on the CPU under torchrun, or one process."""

import json
import shutil

import pytest
import torch

from checkpoint import load_checkpoint, optimizer_state_by_index, optimizer_state_by_name
from cli import UserError
from conftest import INPUT_TXT, TINY, read_metrics, run_torchrun, train_in_process, train_losses
import device
from device import Distributed, check_model_fits, resolve_dtype
from train_gpt2 import (GPT, GPTConfig, TrainConfig, make_optimizers, new_model_config, parse_args,
                        training_state_bytes)


def assert_same_metrics(a_dir, b_dir, rel=1e-5):
    """Every record of two runs' metrics.jsonl agrees, step by step: losses and HellaSwag scores."""
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in ("train_loss", "val_loss", "hellaswag_acc_norm", "hellaswag_acc", "hellaswag_n"):
            assert (key in x) == (key in y), (x["step"], key)
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=rel), (x["step"], key)


def hellaswag_file(path, n):
    """n made-up HellaSwag examples from Shakespeare's words."""
    words = INPUT_TXT.read_text().split()
    phrase = lambda i, k: " ".join(words[i * 37 % 4000 + j] for j in range(k))
    rows = [{"ind": i, "ctx": phrase(i, 9), "endings": [phrase(i + e + 1, 3 + e) for e in range(4)], "label": i % 4}
            for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_fsdp_and_ddp_train_exactly_as_one_process_with_the_same_global_batch(tmp_path):
    # 3 val batches and 9 HellaSwag examples in batches of 4 split unevenly over 2 ranks (2 and 1 val batches,
    # 2 and 1 HellaSwag batches): under FSDP the rank with less to do must still take part in every forward
    common = [*TINY, "--data", INPUT_TXT, "--max_iters", "10", "--eval_interval", "5", "--eval_iters", "3",
              "--hellaswag", "True", "--hellaswag_data", hellaswag_file(tmp_path / "hellaswag.jsonl", 9)]
    one = train_in_process(*common, "--out_dir", tmp_path / "one", "--gradient_accumulation_steps", "4")
    assert one.returncode == 0, one.stderr
    ddp = run_torchrun(*common, "--out_dir", tmp_path / "ddp", "--gradient_accumulation_steps", "2")
    assert ddp.returncode == 0, ddp.stderr
    fsdp = run_torchrun(*common, "--out_dir", tmp_path / "fsdp", "--gradient_accumulation_steps", "2",
                        "--fsdp", "True", "--num_samples", "4")
    assert fsdp.returncode == 0, fsdp.stderr
    assert sorted(train_losses(tmp_path / "fsdp")) == list(range(10))
    assert_same_metrics(tmp_path / "one", tmp_path / "ddp")
    assert_same_metrics(tmp_path / "one", tmp_path / "fsdp")
    assert [m["hellaswag_n"] for m in read_metrics(tmp_path / "fsdp") if "hellaswag_n" in m] == [9, 9, 9]
    expected = load_checkpoint(next((tmp_path / "one").glob("iter-10-*.pt")))["model"]
    sharded = load_checkpoint(next((tmp_path / "fsdp").glob("iter-10-*.pt")))["model"]
    for name in expected:
        # rounding differs at 1e-7 (the shards' memory layout, the reduction order), and AdamW scales a gradient
        # of 1e-7 up to a whole step: a few such entries of wte end 5e-5 apart after 10 steps of up to 3e-3
        torch.testing.assert_close(sharded[name], expected[name], rtol=1e-4, atol=1e-4)
    # samples come from every rank's forward passes, printed once, by rank 0: 4 at each of 3 evaluations
    assert fsdp.stdout.count("\n  sample: ") == 4 * 3


def test_under_bfloat16_fsdp_trains_as_ddp_does_and_keeps_float32_weights_and_moments(tmp_path):
    # one micro-step of 2 rows a rank: a CPU without bfloat16 matmuls emulates them, at ten times float32's cost
    common = [*TINY, "--data", INPUT_TXT, "--max_iters", "4", "--eval_interval", "4", "--dtype", "bfloat16",
              "--batch_size", "2", "--gradient_accumulation_steps", "1"]
    ddp = run_torchrun(*common, "--out_dir", tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr
    fsdp = run_torchrun(*common, "--out_dir", tmp_path / "fsdp", "--fsdp", "True")
    assert fsdp.returncode == 0, fsdp.stderr
    # bfloat16 weights gathered and bfloat16 activations between blocks: DDP's losses to bfloat16's precision
    assert_same_metrics(tmp_path / "ddp", tmp_path / "fsdp", rel=1e-3)
    checkpoint = load_checkpoint(next((tmp_path / "fsdp").glob("iter-4-*.pt")))
    assert {t.dtype for t in checkpoint["model"].values()} == {torch.float32}
    moments = checkpoint["optimizer"]["adamw"]["state"].values()
    assert {t.dtype for per_param in moments for t in per_param.values()} == {torch.float32}


# -----------------------------------------------------------------------------
# Checkpoints: the one format, resumed under FSDP, DDP or one process


def stopped_args(out_dir, *extra):
    """conftest's trained_run (8 steps, checkpoints at 4 and 8, one process with 2 micro-steps), as 2 ranks
    of 1 micro-step: the same global batch."""
    return [*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "8", "--eval_interval", "4", *extra]


@pytest.fixture(scope="module")
def fsdp_run_to_4(tmp_path_factory):
    """An FSDP run stopped after step 4 (its last checkpoint), to resume in every way."""
    out_dir = tmp_path_factory.mktemp("fsdp") / "out"
    result = run_torchrun(*stopped_args(out_dir, "--max_iters", "4", "--gradient_accumulation_steps", "1",
                                        "--fsdp", "True"))
    assert result.returncode == 0, result.stderr
    return out_dir


RESUMES = {  # how the rest of the run is launched: the same global batch of 8 rows every way
    "fsdp": (run_torchrun, ["--gradient_accumulation_steps", "1"]),  # --fsdp True from the checkpoint's config
    "ddp": (run_torchrun, ["--gradient_accumulation_steps", "1", "--fsdp", "False"]),
    "one_process": (train_in_process, ["--gradient_accumulation_steps", "2", "--fsdp", "False"]),
    "fsdp_one_process": (train_in_process, ["--gradient_accumulation_steps", "2"]),  # a process group of one
}


@pytest.mark.parametrize("way", list(RESUMES))
def test_a_run_stopped_under_fsdp_resumes_every_way_as_the_uninterrupted_run(way, fsdp_run_to_4, trained_run,
                                                                              tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(fsdp_run_to_4, out_dir)
    run, extra = RESUMES[way]
    resumed = run(*stopped_args(out_dir, "--init_from", "resume", *extra))
    assert resumed.returncode == 0, resumed.stderr
    assert "from step 4" in resumed.stdout
    assert sorted(train_losses(out_dir)) == list(range(8))
    assert_same_metrics(trained_run[0], out_dir)  # losses to 1e-5, steps 0-7, and the val losses at 0, 4, 8


def test_an_fsdp_checkpoint_is_a_plain_checkpoint_with_the_keys_and_shapes_of_any_other(fsdp_run_to_4, trained_run):
    path = next(fsdp_run_to_4.glob("iter-4-*.pt"))
    sharded = torch.load(path, weights_only=True)  # no class of ours or torch's DTensor in it
    plain = torch.load(next(trained_run[0].glob("iter-4-*.pt")), weights_only=True)
    assert set(sharded) == set(plain)
    assert {k: v.shape for k, v in sharded["model"].items()} == {k: v.shape for k, v in plain["model"].items()}
    assert all(v.dtype == torch.float32 and type(v) is torch.Tensor for v in sharded["model"].values())
    # the tied embedding is one tensor under both names, stored once, as model.state_dict() gives it
    assert sharded["model"]["lm_head.weight"].data_ptr() == sharded["model"]["transformer.wte.weight"].data_ptr()
    state, expected = sharded["optimizer"]["adamw"], plain["optimizer"]["adamw"]
    assert state["param_groups"] == expected["param_groups"]
    assert sorted(state["state"]) == sorted(expected["state"]) == list(range(len(state["state"])))
    for i, moments in expected["state"].items():
        assert {k: v.shape for k, v in state["state"][i].items()} == {k: v.shape for k, v in moments.items()}
        torch.testing.assert_close(state["state"][i]["exp_avg"], moments["exp_avg"], rtol=1e-3, atol=1e-6)
    assert sharded["world_size"] == 2 and sharded["config"]["fsdp"] is True


def test_fsdp_composes_with_compile_and_gradient_checkpointing(fsdp_run_to_4, tmp_path):
    result = run_torchrun(*stopped_args(tmp_path / "out", "--max_iters", "4", "--gradient_accumulation_steps", "1",
                                        "--fsdp", "True", "--compile", "True", "--gradient_checkpointing", "True",
                                        "--num_samples", "4"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n  sample: ") == 4 * 2
    assert_same_metrics(fsdp_run_to_4, tmp_path / "out", rel=1e-4)  # compiled kernels may round differently


def test_eval_only_under_fsdp_scores_the_checkpoint_as_training_did(fsdp_run_to_4, tmp_path):
    checkpoint = next(fsdp_run_to_4.glob("iter-4-*.pt"))
    result = run_torchrun("--eval_only", "True", "--init_from", checkpoint, "--out_dir", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    (record,) = read_metrics(tmp_path / "eval")
    logged = next(m for m in read_metrics(fsdp_run_to_4) if m["step"] == 4 and "val_loss" in m)
    assert record["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-6)


def test_optimizer_state_keyed_by_names_and_by_positions_convert_both_ways():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=128, n_layer=1, n_head=2, n_embd=16))
    optimizer = make_optimizers(model, TrainConfig(), "cpu")["adamw"]
    model(torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8)))[1].backward()
    optimizer.step()
    by_position = optimizer.state_dict()
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = optimizer_state_by_name(by_position, names)
    assert by_name["param_groups"][0]["params"][0] == "transformer.wte.weight"  # the tied weight, by its first name
    assert by_name["state"]["transformer.h.0.mlp.c_fc.weight"] is by_position["state"][names.index(
        "transformer.h.0.mlp.c_fc.weight")]
    assert optimizer_state_by_index(by_name) == by_position


# -----------------------------------------------------------------------------
# Refused up front, with the fix


def test_a_model_whose_whole_state_overflows_the_host_is_refused_under_fsdp_though_its_shards_fit(monkeypatch):
    config = parse_args([])[0]
    state = training_state_bytes(new_model_config(config), config)  # GPT-2 124M: 2.0 GB, 1.0 GB per rank of 2
    assert state == {"weights": 4 * 124_475_904, "gradients": 4 * 124_475_904,
                     "optimizer": 8 * 124_475_904 + 4 * 148}  # two moments, a step count per tensor
    # 1.2 GiB: a rank's shard (0.93 GiB) fits, the whole weights and moments (1.39 GiB) do not
    monkeypatch.setattr(device, "available_memory", lambda device: 1.2 * 2**30)
    with pytest.raises(UserError, match="GiB of host memory to gather its whole weights and optimizer state"):
        check_model_fits(state, Distributed(world_size=2, sharded=True))
    with pytest.raises(UserError, match="for its weights, gradients and optimizer state, more than"):
        check_model_fits(state, Distributed(world_size=1))  # the device check: unsharded it does not fit


def test_float16_under_fsdp_is_refused_naming_the_dtypes_that_work():
    with pytest.raises(UserError, match="pass --dtype bfloat16 where the GPU has it, else --dtype float32"):
        resolve_dtype("float16", "cpu", sharded=True)
    with pytest.raises(UserError, match="not supported for training on the CPU"):
        resolve_dtype("float16", "cpu")  # DDP keeps its GradScaler: float16 is refused here for the CPU alone
