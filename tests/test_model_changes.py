"""The changes researchers make first, each made in one place as they would make it in train_gpt2.py (here a
class or a field swapped in by the test, not an edit of the repo), and each of the model's options: training,
an exact resume, --eval_only, sample.py and bench.py all run the changed model, and the printed parameter
count, FLOPs and memory sizes follow it."""

import dataclasses
import io
import json
import re
from dataclasses import dataclass

import pytest
import torch.nn as nn
import torch.nn.functional as F

import bench
import sample
import train_gpt2
from cli import flag
from checkpoint import load_checkpoint, save_checkpoint
from conftest import INPUT_TXT, TINY, eval_records, read_metrics, train_in_process, train_losses
from device import device_peak_flops


class SwiGLU(nn.Module):
    """(a) Another kind of MLP: a gated one of hidden width 3C, three matrices instead of two."""

    def __init__(self, config):
        super().__init__()
        hidden = 3 * config.n_embd
        self.gate = nn.Linear(config.n_embd, hidden, bias=False)
        self.up = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.c_proj.residual_projection = True

    def forward(self, x):
        return self.c_proj(F.silu(self.gate(x)) * self.up(x))


@dataclass
class WithMLPRatio(train_gpt2.GPTConfig):
    """(b) A new field of the model's shape, with a default: the MLP's width in multiples of n_embd."""
    mlp_ratio: int = flag(4, "the MLP's hidden width, in multiples of n_embd")


@dataclass
class TrainConfigWithMLPRatio(WithMLPRatio, train_gpt2.TrainConfig):
    pass  # what TrainConfig(GPTConfig, TrainSettings) becomes when the field is written into GPTConfig


@dataclass
class BenchConfigWithMLPRatio(WithMLPRatio, bench.BenchConfig):
    pass  # bench.py's flags are the trainer's and its own: the field among them


class MLPOfRatio(train_gpt2.MLP):
    def __init__(self, config):
        nn.Module.__init__(self)
        hidden = config.mlp_ratio * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden)
        self.c_proj = nn.Linear(hidden, config.n_embd)
        self.c_proj.residual_projection = True

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


# the speedruns' options, each as its flags set it; the untied head under Muon (whose head is AdamW's)
OPTIONS = {"rotary": ["--positions", "rotary"], "rmsnorm": ["--norm", "rmsnorm"], "no biases": ["--bias", "False"],
           "relu2": ["--mlp", "relu2"], "swiglu": ["--mlp", "swiglu"], "qk_norm": ["--qk_norm", "True"],
           "attn_scale": ["--attn_scale", "0.3"], "untied head": ["--tie_embeddings", "False", "--optimizer", "muon"],
           "softcap": ["--logit_softcap", "15"], "zero-initialized projections": ["--zero_init_projections", "True"]}


@pytest.fixture(params=["a gated MLP class", "an mlp_ratio field", *OPTIONS])
def changed_model(request, monkeypatch):
    """The trainer with one change made: (the extra flags the run passes, what the header calls the model)."""
    if request.param == "a gated MLP class":
        monkeypatch.setattr(train_gpt2, "MLP", SwiGLU)
        return [], "GPT-2"  # the class swapped in is the researcher's to name
    if request.param == "an mlp_ratio field":
        monkeypatch.setattr(train_gpt2, "GPTConfig", WithMLPRatio)
        monkeypatch.setattr(train_gpt2, "TrainConfig", TrainConfigWithMLPRatio)
        monkeypatch.setattr(train_gpt2, "MLP", MLPOfRatio)
        monkeypatch.setattr(bench, "BenchConfig", BenchConfigWithMLPRatio)
        return ["--mlp_ratio", "3"], "GPT (mlp_ratio=3)"
    flags = OPTIONS[request.param]
    name, value = flags[0].lstrip("-"), flags[1]
    return flags, f"GPT ({name}={float(value) if name in ('logit_softcap', 'attn_scale') else value})"


def run(*args):
    train_gpt2.main([*TINY, "--data", str(INPUT_TXT), "--num_samples", "0", *map(str, args)])


def test_a_changed_model_trains_resumes_exactly_evaluates_samples_and_benches(changed_model, tmp_path, capsys):
    flags, name = changed_model
    run(*flags, "--out_dir", tmp_path / "run", "--max_iters", "4", "--eval_interval", "2")
    header = next(line for line in capsys.readouterr().out.splitlines() if "M parameters" in line)
    model, checkpoint = train_gpt2.load_start("resume", tmp_path / "run")
    n_params = sum(p.numel() for p in model.parameters())
    assert f"{name} {n_params / 1e6:.2f}M parameters" in header
    if not flags or flags[0] == "--mlp_ratio":
        mlp = model.transformer.h[0].mlp
        assert isinstance(mlp, train_gpt2.MLP) and mlp.c_proj.in_features == 3 * 64  # the changed model, loaded
    else:  # the option, in the checkpoint's architecture and in the model loaded from it
        option = flags[0].lstrip("-")
        assert str(checkpoint["model_args"][option]) == str(getattr(model.config, option)) != \
            str(getattr(train_gpt2.GPTConfig(), option))
    # the MFU logged is the real model's FLOPs over the device's peak
    step = next(m for m in read_metrics(tmp_path / "run") if "mfu" in m)
    peak = device_peak_flops("cpu", "float32")
    assert step["mfu"] == pytest.approx(model.flops_per_token() * step["tokens_per_sec"] / peak)
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 2 * 64 * 32
    config = train_gpt2.parse_args([*TINY, *flags])[0]
    state = train_gpt2.training_state_bytes(train_gpt2.new_model_config(config), config)
    assert state["weights"] == 4 * n_params and state["optimizer"] >= 4 * n_params  # a moment or two

    # an exact resume from the step-2 checkpoint
    first = next((tmp_path / "run").glob("iter-2-*.pt"))
    run(*flags, "--init_from", first, "--out_dir", tmp_path / "resumed", "--max_iters", "4")
    whole, resumed = train_losses(tmp_path / "run"), train_losses(tmp_path / "resumed")
    assert resumed == {step: loss for step, loss in whole.items() if step >= 2}

    # --eval_only repeats the run's last evaluation
    run("--init_from", tmp_path / "run" / "best_val_loss.pt", "--eval_only", "True",
        "--out_dir", tmp_path / "eval")
    logged = [m["val_loss"] for m in read_metrics(tmp_path / "run") if "val_loss" in m]
    (scored,) = [m["val_loss"] for m in read_metrics(tmp_path / "eval")]
    assert scored == pytest.approx(logged[-1], rel=1e-6)

    out = io.StringIO()
    sample.sample(sample.SampleConfig(init_from=str(tmp_path / "run" / "best_val_loss.pt"), start="ROMEO:",
                                      num_samples=1, max_new_tokens=4, device="cpu", dtype="float32"), out=out)
    assert out.getvalue().startswith("ROMEO:") and len(out.getvalue()) > len("ROMEO:\n---------------\n")

    # bench.py times the same model: from the same seed, its first step's loss is the run's
    bench.main([*TINY, "--data", str(INPUT_TXT), *flags, "--steps", "1", "--warmup_steps", "1",
                "--json_out", str(tmp_path / "bench.json")])
    (result,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert result["losses"][0] == pytest.approx(whole[0], rel=1e-6)


def test_a_checkpoint_from_before_a_field_existed_loads_at_its_default(trained_run, monkeypatch):
    monkeypatch.setattr(train_gpt2, "GPTConfig", WithMLPRatio)
    monkeypatch.setattr(train_gpt2, "MLP", MLPOfRatio)
    model, checkpoint = train_gpt2.load_start(str(trained_run[0] / "best_val_loss.pt"), ".")
    assert "mlp_ratio" not in checkpoint["model_args"] and model.config.mlp_ratio == 4


def test_a_model_without_a_position_table_counts_and_trains(monkeypatch, tmp_path, capsys):
    """Positions another way (here none at all, a causal model can still tell them apart): nothing outside the
    model names the position table."""
    class NoPositions(train_gpt2.GPT):
        def __init__(self, config):
            super().__init__(config)
            del self.transformer.wpe
            self.transformer.wpe = lambda pos: 0  # the model's forward adds the table's rows: none here

    monkeypatch.setattr(train_gpt2, "GPT", NoPositions)
    run("--out_dir", tmp_path, "--max_iters", "2", "--eval_interval", "2")
    model = NoPositions(train_gpt2.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64))
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert re.search(rf"GPT-2 {model.num_params() / 1e6:.2f}M parameters", capsys.readouterr().out)


def test_the_default_run_gives_the_losses_it_gave_before_the_options(tmp_path):
    """GPT-2 at every option's default: the quick start's first steps, as the code before the options logged them
    (one thread, float32; another CPU's kernels may round the last digits differently)."""
    result = train_in_process("--config", "config/shakespeare_cpu.toml", "--dtype", "float32", "--max_iters", "3",
                              "--eval_interval", "3", "--eval_iters", "2", "--log_interval", "1", "--num_samples", "0",
                              "--out_dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "GPT-2 7.25M parameters" in result.stdout
    assert train_losses(tmp_path) == pytest.approx({0: 10.8328857421875, 1: 10.784585952758789,
                                                    2: 10.676543235778809}, rel=1e-6)
    assert [m["val_loss"] for m in eval_records(tmp_path)] == pytest.approx([10.819984436035156, 10.53823184967041],
                                                                             rel=1e-6)


def test_a_checkpoint_from_before_the_options_resumes_exactly_as_gpt2(trained_run, tmp_path):
    checkpoint = load_checkpoint(next(trained_run[0].glob("iter-4-*.pt")))
    options = {f.name for f in dataclasses.fields(train_gpt2.GPTConfig)} - set(train_gpt2.GPT2_SHAPE)
    new_fields = options | {"adafactor_lr", "adafactor_beta2_decay"}
    for part in ("model_args", "config"):  # written before these fields existed
        checkpoint[part] = {k: v for k, v in checkpoint[part].items() if k not in new_fields}
    save_checkpoint(tmp_path / "iter-4-loss-9.0000.pt", checkpoint)
    result = train_in_process("--init_from", tmp_path / "iter-4-loss-9.0000.pt", "--out_dir", tmp_path / "resumed")
    assert result.returncode == 0, result.stderr
    assert "GPT-2 " in result.stdout and "from step 4" in result.stdout
    whole = train_losses(trained_run[0])
    assert train_losses(tmp_path / "resumed") == {step: loss for step, loss in whole.items() if step >= 4}
