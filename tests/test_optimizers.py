"""optimizers.py's optimizers as the trainer runs them: which parameters each one trains (an untied head is
AdamW's under Muon), each group's own learning rate under the schedule, Muon wherever AdamW runs (accumulation
and DDP alike, exact resume, compiled, the spike guard's roll-back, the refusals), Adafactor as a second
optimizer whose state has other shapes (trained, resumed exactly, sized), a resume checked against the state
the optimizer keeps, the flags of another optimizer said, and the report of the first evaluation at or below
--target_val_loss."""

import shutil

import pytest
import torch

import train_gpt2
from checkpoint import load_checkpoint, save_checkpoint
from conftest import (INPUT_TXT, SPIKE_GUARD, TINY, read_metrics, run_torchrun, run_train, spiky_data,
                      train_in_process, train_losses)
from train_gpt2 import GPT, GPTConfig, TrainConfig, make_optimizers, set_learning_rates, training_state_bytes

TINY_MODEL = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64)


def names(model, optimizer):
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def test_muon_trains_the_blocks_matrices_and_adamw_everything_else():
    model = GPT(TINY_MODEL)
    optimizers = make_optimizers(model, TrainConfig(optimizer="muon"), "cpu")
    muon, adamw = names(model, optimizers["muon"]), names(model, optimizers["adamw"])
    assert muon == [n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]
    assert "transformer.wte.weight" in adamw and "transformer.wpe.weight" in adamw  # wte is also lm_head
    assert all(n.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight"))
               for n in adamw if n not in ("transformer.wte.weight", "transformer.wpe.weight"))
    assert sorted(muon + adamw) == sorted(n for n, _ in model.named_parameters())
    adamw_alone = names(model, make_optimizers(model, TrainConfig(), "cpu")["adamw"])
    assert sorted(adamw_alone) == sorted(n for n, _ in model.named_parameters())


def test_muons_newton_schulz_runs_in_float32_only_where_the_cpu_emulates_bfloat16(monkeypatch):
    """torch.optim.Muon's iterations are bfloat16, which a CPU without the instructions emulates, slowly: on
    such a CPU they run in float32; on any other device or CPU, torch's own."""
    import optimizers
    from torch.optim import _muon
    monkeypatch.setattr(_muon, "_zeropower_via_newtonschulz", _muon._zeropower_via_newtonschulz)  # put back after
    make_optimizers(GPT(TINY_MODEL), TrainConfig(optimizer="muon"), "cpu")  # puts the float32 path in
    newton_schulz = _muon._zeropower_via_newtonschulz
    torch_newton_schulz = newton_schulz.torch_newton_schulz
    grad, args = torch.randn(192, 64, generator=torch.Generator().manual_seed(0)), ((3.4445, -4.7750, 2.0315), 5, 1e-7)
    monkeypatch.setattr(optimizers, "cpu_has_bf16", lambda: True)
    assert torch.equal(newton_schulz(grad, *args), torch_newton_schulz(grad, *args))  # torch's, bit for bit
    monkeypatch.setattr(optimizers, "cpu_has_bf16", lambda: False)
    assert newton_schulz(torch.empty(8, 4, device="meta"), *args).dtype == torch.bfloat16  # not a CPU: torch's
    update, in_bfloat16 = newton_schulz(grad, *args), torch_newton_schulz(grad, *args).float()
    a, b, c = args[0]
    reference = grad.double().T / grad.double().norm()  # the same iteration in float64
    for _ in range(5):
        gram = reference @ reference.T
        reference = a * reference + (b * gram + c * gram @ gram) @ reference
    error = lambda x: ((x - reference.T).norm() / reference.norm()).item()
    assert update.dtype == torch.float32 and error(update) < 1e-5 < error(in_bfloat16) < 0.05


def test_a_muon_step_on_a_cpu_without_bfloat16_goes_through_the_float32_iterations(monkeypatch):
    import optimizers
    from torch.optim import _muon
    monkeypatch.setattr(_muon, "_zeropower_via_newtonschulz", _muon._zeropower_via_newtonschulz)  # put back after
    monkeypatch.setattr(optimizers, "cpu_has_bf16", lambda: False)
    shapes = []
    float32_iterations = optimizers.newton_schulz_float32
    monkeypatch.setattr(optimizers, "newton_schulz_float32",
                        lambda grad, *args: shapes.append(tuple(grad.shape)) or float32_iterations(grad, *args))
    model = GPT(TINY_MODEL)
    muon = make_optimizers(model, TrainConfig(optimizer="muon"), "cpu")["muon"]
    x = torch.randint(0, TINY_MODEL.vocab_size, (2, 16))
    model(x, x)[1].backward()
    muon.step()
    assert shapes == [tuple(p.shape) for p in muon.param_groups[0]["params"]]


def test_an_untied_head_is_trained_by_adamw_under_muon_and_muon_gets_the_blocks_matrices_alone():
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64, tie_embeddings=False))
    optimizers = make_optimizers(model, TrainConfig(optimizer="muon"), "cpu")
    muon, adamw = names(model, optimizers["muon"]), names(model, optimizers["adamw"])
    assert "lm_head.weight" in adamw and "lm_head.weight" not in muon
    assert muon == [n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]
    head_group = next(g for g in optimizers["adamw"].param_groups if g["params"][0] is model.lm_head.weight)
    assert len(head_group["params"]) == 1 and head_group["base_lr"] == 6e-4


def test_the_schedule_scales_each_groups_own_rate():
    config = TrainConfig(optimizer="muon", learning_rate=2e-3, min_lr=2e-4, muon_lr=0.02, warmup_iters=10,
                         lr_decay_iters=100)
    optimizers = make_optimizers(GPT(TINY_MODEL), config, "cpu")
    for step in (0, 5, 50, 200):
        lr = set_learning_rates(optimizers, step, config)
        assert lr == train_gpt2.get_lr(step, 2e-3, 2e-4, 10, 100)
        assert all(g["lr"] == lr for g in optimizers["adamw"].param_groups)
        assert optimizers["muon"].param_groups[0]["lr"] == pytest.approx(lr * 10)  # 0.02 / 2e-3


def test_muon_keeps_one_buffer_per_matrix_and_adamw_two():
    config = TrainConfig(n_layer=2, n_head=2, n_embd=64, block_size=32)
    adamw = training_state_bytes(TINY_MODEL, config)
    muon = training_state_bytes(TINY_MODEL, TrainConfig(optimizer="muon"))
    model = GPT(TINY_MODEL)
    matrices = model.param_groups()["matrices"]
    n_params, n_matrices = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in matrices)
    n_tensors = len(list(model.parameters()))
    assert adamw["weights"] == muon["weights"] == 4 * n_params
    assert adamw["optimizer"] == 8 * n_params + 4 * n_tensors  # two moments and a step count per tensor
    # Muon: one buffer per matrix, and no step count
    assert muon["optimizer"] == 4 * n_matrices + 8 * (n_params - n_matrices) + 4 * (n_tensors - len(matrices))


def test_adafactor_is_sized_though_it_reads_values_as_it_steps():
    state = training_state_bytes(TINY_MODEL, TrainConfig(optimizer="adafactor"))
    model = GPT(TINY_MODEL)
    params = list(model.parameters())
    # a matrix keeps its rows' and columns' means, a vector one value per entry, each a step count
    expected = sum(4 * (sum(p.shape) if p.dim() == 2 else p.numel()) + 4 for p in params)
    assert state["optimizer"] == expected and state["weights"] == 4 * sum(p.numel() for p in params)


MUON = ["--optimizer", "muon", "--muon_lr", "0.02"]


def test_muon_resumes_exactly_and_lowers_the_loss_as_adamw_does_and_a_lost_buffer_is_refused(tmp_path, capsys):
    run = lambda *args: train_gpt2.main([*TINY, *MUON, "--data", str(INPUT_TXT), "--num_samples", "0",
                                         "--eval_interval", "3", *map(str, args)])
    run("--out_dir", tmp_path / "whole", "--max_iters", "6")
    checkpoint = load_checkpoint(next((tmp_path / "whole").glob("iter-3-*.pt")))
    assert set(checkpoint["optimizer"]) == {"muon", "adamw"}
    assert checkpoint["optimizer"]["muon"]["state"][0]["momentum_buffer"].shape == (192, 64)
    run("--init_from", checkpoint["path"], "--out_dir", tmp_path / "resumed", "--max_iters", "6")
    whole, resumed = train_losses(tmp_path / "whole"), train_losses(tmp_path / "resumed")
    assert resumed == {step: loss for step, loss in whole.items() if step >= 3}
    assert whole[5] < whole[0]
    del checkpoint["optimizer"]["muon"]["state"][1]["momentum_buffer"]  # a Muon buffer lost
    save_checkpoint(tmp_path / "lost.pt", checkpoint)
    with pytest.raises(SystemExit):
        run("--init_from", tmp_path / "lost.pt", "--out_dir", tmp_path / "refused", "--max_iters", "6")
    assert "parameter 1 (transformer.h.0.attn.c_proj.weight) has state [] where this optimizer keeps " \
           "momentum_buffer" in capsys.readouterr().err and not (tmp_path / "refused").exists()


def test_adafactor_trains_and_resumes_exactly(tmp_path):
    run = lambda *args: train_gpt2.main([*TINY, "--optimizer", "adafactor", "--data", str(INPUT_TXT),
                                         "--eval_interval", "3", *map(str, args)])
    run("--out_dir", tmp_path / "whole", "--max_iters", "6")
    checkpoint = load_checkpoint(next((tmp_path / "whole").glob("iter-3-*.pt")))
    state = checkpoint["optimizer"]["adafactor"]["state"]
    assert state[2]["row_var"].shape == (192, 1) and state[2]["col_var"].shape == (1, 64)  # c_attn's
    run("--init_from", checkpoint["path"], "--out_dir", tmp_path / "resumed", "--max_iters", "6")
    whole, resumed = train_losses(tmp_path / "whole"), train_losses(tmp_path / "resumed")
    assert resumed == {step: loss for step, loss in whole.items() if step >= 3}
    assert whole[5] < whole[0]


def test_a_flag_of_another_optimizer_is_said_in_one_line(tmp_path, capsys):
    train_gpt2.main([*TINY, "--data", str(INPUT_TXT), "--out_dir", str(tmp_path), "--max_iters", "1",
                     "--eval_interval", "1", "--muon_lr", "0.05", "--adafactor_lr", "0.1"])
    out = capsys.readouterr().out
    assert "warning: --muon_lr is a flag of --optimizer muon, not of this run's --optimizer adamw: it has " \
           "no effect" in out and "warning: --adafactor_lr is a flag of --optimizer adafactor" in out


def test_muon_trains_compiled_and_through_the_spike_guards_roll_back(tmp_path):
    data = spiky_data(tmp_path / "shards", 25, 5)  # the batches of steps 25 to 29 are random tokens
    out_dir = tmp_path / "out"
    result = train_in_process(*TINY, *SPIKE_GUARD, *MUON, "--compile", "True", "--data", data,
                              "--out_dir", out_dir)
    assert result.returncode == 0, result.stderr
    records = read_metrics(out_dir)
    assert [r["step"] for r in records if r.get("loss_spike")] == [25, 26, 27, 28, 29]
    (rolled,) = [r for r in records if "rolled_back_to" in r]
    assert rolled["step"] == 27 and rolled["rolled_back_to"] == 20
    after = [r for r in records if r["step"] > 29 and "train_loss" in r]
    assert [r["step"] for r in after] == [30, 31] and all(r["train_loss"] < 9 for r in after)
    final = load_checkpoint(next(out_dir.glob("iter-32-*.pt")))
    assert set(final["optimizer"]) == {"muon", "adamw"} and final["config"]["compile"] is True


def test_two_torchrun_processes_with_muon_match_one_process_with_twice_the_accumulation(tmp_path):
    common = [*TINY, *MUON, "--data", INPUT_TXT, "--max_iters", "3", "--eval_interval", "3", "--num_samples", "0"]
    single = run_train(*common, "--out_dir", tmp_path / "one", "--gradient_accumulation_steps", "2")
    assert single.returncode == 0, single.stderr
    ddp = run_torchrun(*common, "--out_dir", tmp_path / "two", "--gradient_accumulation_steps", "1")
    assert ddp.returncode == 0, ddp.stderr
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert list(one) == list(two) == [0, 1, 2]
    assert list(two.values()) == pytest.approx(list(one.values()), rel=1e-5)


@pytest.mark.parametrize("case", ["fsdp", "old torch", "the other optimizer", "a bad scaling rule",
                                  "adafactor under fsdp", "adafactor on old torch"])
def test_muon_and_adafactor_are_refused_in_one_line_where_they_cannot_run(case, trained_run, tmp_path, monkeypatch, capsys):
    args = {"fsdp": [*MUON, "--fsdp", "True"], "old torch": MUON,
            "the other optimizer": [*MUON, "--init_from", next(trained_run[0].glob("iter-8-*.pt")),
                                    "--max_iters", "9"],
            "a bad scaling rule": [*MUON, "--muon_lr_scaling", "rms"],
            "adafactor under fsdp": ["--optimizer", "adafactor", "--fsdp", "True"],
            "adafactor on old torch": ["--optimizer", "adafactor"]}[case]
    message = {"fsdp": "--optimizer muon needs whole matrices, which --fsdp True shards",
               "old torch": "--optimizer muon needs torch 2.9 or later (torch.optim.Muon); this is torch",
               "the other optimizer": "the checkpoint's optimizer is adamw, this run's muon + adamw: resume with "
                                      "--optimizer as the run had it, or pass --reset_optimizer True",
               "a bad scaling rule": "--muon_lr_scaling 'rms' is not one of original, match_rms_adamw",
               "adafactor under fsdp": "--optimizer adafactor cannot step the sharded matrices of --fsdp True",
               "adafactor on old torch": "--optimizer adafactor needs torch 2.5 or later"}[case]
    if case.endswith("old torch"):
        monkeypatch.delattr(torch.optim, "Adafactor" if "adafactor" in case else "Muon")
    with pytest.raises(SystemExit) as exit_info:
        train_gpt2.main([*TINY, "--data", str(INPUT_TXT), "--out_dir", str(tmp_path / "out"), *map(str, args)])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_reset_optimizer_switches_a_run_to_muon_and_says_so(trained_run, tmp_path, capsys):
    train_gpt2.main([*TINY, *MUON, "--data", str(INPUT_TXT), "--init_from",
                     str(next(trained_run[0].glob("iter-8-*.pt"))), "--reset_optimizer", "True",
                     "--out_dir", str(tmp_path), "--max_iters", "9", "--num_samples", "0"])
    assert "--reset_optimizer: muon's state starts afresh (the checkpoint's was adamw)" in capsys.readouterr().out
    assert set(load_checkpoint(next(tmp_path.glob("iter-9-*.pt")))["optimizer"]) == {"muon", "adamw"}


def test_the_first_evaluation_at_the_target_is_reported_and_can_end_the_run(tmp_path, capsys):
    train_gpt2.main([*TINY, "--data", str(INPUT_TXT), "--out_dir", str(tmp_path), "--max_iters", "20",
                     "--eval_interval", "2", "--num_samples", "0", "--target_val_loss", "9.0",
                     "--stop_at_target", "True"])
    out = capsys.readouterr().out
    evaluations = [m for m in read_metrics(tmp_path) if "val_loss" in m]
    first = next(m for m in evaluations if m["val_loss"] <= 9.0)
    assert all(m["val_loss"] > 9.0 for m in evaluations if m["step"] < first["step"])
    (record,) = [m for m in read_metrics(tmp_path) if "target_val_loss" in m]
    assert record["step"] == first["step"] and record["val_loss"] == first["val_loss"]
    assert record["tokens"] == first["step"] * 4 * 2 * 32 and 0 < record["train_seconds"]
    assert f"--target_val_loss 9 reached at step {first['step']}" in out
    assert "target 9" in out and "reached at step" in out.split("done:")[1]  # and in the summary
    # --stop_at_target: the run ends there, with that evaluation's checkpoint
    assert evaluations[-1]["step"] == first["step"] < 20
    assert load_checkpoint(next(tmp_path.glob(f"iter-{first['step']}-*.pt")))["progress"]["target"] == \
        {k: record[k] for k in ("target_val_loss", "val_loss", "step", "tokens", "train_seconds")}


def test_a_resume_checks_a_new_target_and_says_when_the_target_was_reached_before(tmp_path):
    # val loss 10.24 at step 4 and 9.51 at step 8 (one thread): 10.3 is first reached at step 4
    first = tmp_path / "first"
    stopped = train_in_process(*TINY, "--data", INPUT_TXT, "--out_dir", first, "--max_iters", "10",
                               "--eval_interval", "2", "--target_val_loss", "10.3", "--stop_at_target", "True")
    assert stopped.returncode == 0, stopped.stderr
    assert sorted(p.name.split("-")[1] for p in first.glob("iter-*.pt")) == ["2", "4"]  # stopped at the target
    resume = lambda name, *flags: train_in_process("--init_from", "resume", "--out_dir",
                                                   shutil.copytree(first, tmp_path / name), *flags)
    targets = lambda out_dir: [m for m in read_metrics(out_dir) if "target_val_loss" in m]
    summary = lambda result: result.stdout.split("done:")[1]

    same = resume("same")  # the same flags: it says that the target is behind it, and trains on
    assert same.returncode == 0, same.stderr
    assert ("note: --target_val_loss 10.3 was reached at step 4 (1,024 tokens" in same.stdout
            and "; this run trains on past it to --max_iters 10 (--stop_at_target stops at that evaluation alone)"
            in same.stdout)
    assert next((tmp_path / "same").glob("iter-10-*.pt"))
    assert [m["step"] for m in targets(tmp_path / "same")] == [4] and "reached at step 4" in summary(same)

    lower = resume("lower", "--target_val_loss", "9.6")  # a new target: checked, and the run stops there
    assert lower.returncode == 0, lower.stderr
    assert "--target_val_loss: 10.3 -> 9.6 (command line)" in lower.stdout and "note:" not in lower.stdout
    (record,) = [m for m in targets(tmp_path / "lower") if m["target_val_loss"] == 9.6]
    evaluations = {m["step"]: m["val_loss"] for m in read_metrics(tmp_path / "same") if "val_loss" in m}
    assert record["step"] == min(step for step, loss in evaluations.items() if loss <= 9.6) == 8
    assert record["val_loss"] == evaluations[8] and record["tokens"] == 8 * 4 * 2 * 32
    assert max(m["step"] for m in read_metrics(tmp_path / "lower")) == 8  # stopped at it
    assert "target 9.6" in summary(lower) and "reached at step 8" in summary(lower)
    assert load_checkpoint(next((tmp_path / "lower").glob("iter-8-*.pt")))["progress"]["target"]["step"] == 8

    higher = resume("higher", "--target_val_loss", "10.5", "--max_iters", "6")  # passed before this resume
    assert higher.returncode == 0, higher.stderr
    assert ("note: --target_val_loss 10.5 was reached before step 4 (its first evaluation at or below it is in "
            "metrics.jsonl); this run trains on past it to --max_iters 6" in higher.stdout)
    assert [m["target_val_loss"] for m in targets(tmp_path / "higher")] == [10.3]  # nothing new reported
    assert "target 10.5" in summary(higher) and "reached before step 4" in summary(higher)
