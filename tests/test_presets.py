"""The presets in config/ (--config FILE.toml): each is a valid run, says what its comment says, and the CPU one
trains; a file's flags count as given, the command line overrides them, and a bad file gets one line."""

import dataclasses
import json

import pytest

from conftest import REPO, train_in_process
from train_gpt2 import TrainConfig, parse_args

PRESETS = sorted((REPO / "config").glob("*.toml"))

# the README's Shakespeare quick start, as it was typed before the preset held it
QUICK_START = ["--data", "input.txt", "--device", "cpu", "--compile", "False", "--n_layer", "4", "--n_head", "4",
               "--n_embd", "128", "--block_size", "128", "--batch_size", "8", "--gradient_accumulation_steps", "1",
               "--learning_rate", "2e-3", "--min_lr", "2e-4", "--warmup_iters", "30", "--lr_decay_iters", "300",
               "--max_iters", "300", "--eval_interval", "100", "--eval_iters", "20", "--log_interval", "25",
               "--hellaswag", "False", "--out_dir", "out-shakespeare"]

# GPT-2's shapes (n_layer, n_head, n_embd) and the GPT-3 paper's learning rates for those sizes
GPT2_SIZES = {"gpt2_124m_8gpu.toml": (12, 12, 768, 6e-4), "gpt2_350m.toml": (24, 16, 1024, 3e-4),
              "gpt2_774m.toml": (36, 20, 1280, 2.5e-4), "gpt2_1558m.toml": (48, 25, 1600, 2e-4)}


def preset(name, *argv):
    return parse_args(["--config", str(REPO / "config" / name), *argv])


def test_the_presets_are_the_ones_the_docs_list():
    listed = (REPO / "docs" / "training.md").read_text()
    assert [p.name for p in PRESETS] == ["gpt2_124m.toml", "gpt2_124m_8gpu.toml", "gpt2_124m_modern.toml",
                                         "gpt2_124m_muon.toml", "gpt2_1558m.toml", "gpt2_350m.toml",
                                         "gpt2_774m.toml", "shakespeare_cpu.toml", "shakespeare_cpu_modern.toml",
                                         "shakespeare_cpu_muon.toml"]
    assert all(f"`{p.name}`" in listed for p in PRESETS)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_each_preset_parses_into_a_valid_config_and_says_how_to_run_it(path):
    config, explicit = parse_args(["--config", str(path)])
    config.validate()
    assert "--config config/" + path.name in path.read_text().split("\n\n")[0]  # the run command, in the top comment
    assert config.out_dir != TrainConfig.out_dir and "out_dir" in explicit  # no two presets share ./out


def test_the_shakespeare_preset_is_the_readme_quick_start_with_a_prompt_from_the_play():
    assert preset("shakespeare_cpu.toml") == parse_args([*QUICK_START, "--sample_prompt", "ROMEO:"])


@pytest.mark.parametrize("name", ["shakespeare_cpu", "gpt2_124m"])
def test_the_muon_presets_are_their_adamw_twins_with_the_optimizer_changed(name):
    adamw, muon = preset(f"{name}.toml")[0], preset(f"{name}_muon.toml")[0]
    changed = {k for k, v in vars(muon).items() if getattr(adamw, k) != v}
    assert changed <= {"optimizer", "muon_lr", "out_dir"} and muon.optimizer == "muon"


@pytest.mark.parametrize("name", ["shakespeare_cpu", "gpt2_124m"])
def test_the_modern_presets_are_their_muon_twins_with_model_options(name):
    from train_gpt2 import GPT2_SHAPE, GPTConfig
    muon, modern = preset(f"{name}_muon.toml")[0], preset(f"{name}_modern.toml")[0]
    options = {f.name for f in dataclasses.fields(GPTConfig)} - set(GPT2_SHAPE)
    changed = {k for k, v in vars(modern).items() if getattr(muon, k) != v}
    assert changed - options <= {"out_dir", "muon_lr", "learning_rate", "min_lr"} and changed & options
    assert modern.optimizer == "muon" and modern.min_lr == pytest.approx(modern.learning_rate / 10)


def test_the_gpt2_124m_preset_is_the_defaults_at_batch_16_by_2():
    config, _ = preset("gpt2_124m.toml")
    defaults = TrainConfig()
    assert config.batch_size * config.gradient_accumulation_steps * config.block_size == 32_768
    assert {k: v for k, v in vars(config).items() if getattr(defaults, k) != v} == {
        "batch_size": 16, "gradient_accumulation_steps": 2, "out_dir": "out-gpt2-124m", "auto_batch": True}


@pytest.mark.parametrize("path", [p for p in PRESETS if p.name.startswith("gpt2")], ids=lambda p: p.name)
def test_the_gpu_presets_find_their_batch_and_the_large_ones_guard_against_spikes(path):
    config, _ = parse_args(["--config", str(path)])
    assert config.auto_batch is True
    large = path.name in ("gpt2_774m.toml", "gpt2_1558m.toml")
    assert (config.spike_guard > 0) == large and TrainConfig().spike_guard == 0


@pytest.mark.parametrize("name", GPT2_SIZES)
def test_the_8_gpu_presets_have_gpt2s_shape_gpt3s_learning_rate_and_524288_tokens_per_step(name):
    config, _ = preset(name)
    n_layer, n_head, n_embd, learning_rate = GPT2_SIZES[name]
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (n_layer, n_head, n_embd, 1024)
    assert config.learning_rate == learning_rate and config.min_lr == pytest.approx(learning_rate / 10)
    assert config.batch_size * config.gradient_accumulation_steps * 8 * config.block_size == 524_288
    assert config.max_iters == config.lr_decay_iters == 19_073  # 10B tokens, one epoch of edu_fineweb10B
    assert config.eval_iters * config.batch_size == 1280  # the same val sequences at every size


def test_a_flag_on_the_command_line_overrides_the_file_and_the_files_flags_count_as_given():
    config, explicit = preset("shakespeare_cpu.toml", "--max_iters", "3", "--n_layer=2")
    assert (config.max_iters, config.n_layer, config.n_head) == (3, 2, 4)
    assert explicit >= {"max_iters", "n_layer", "n_head", "data", "out_dir"} and "config" not in explicit


def test_the_cpu_preset_trains_and_config_json_records_the_result(tmp_path):
    # 2 val batches, not 20, and no samples: the evaluations are tested elsewhere
    result = train_in_process("--config", "config/shakespeare_cpu.toml", "--max_iters", "3",
                              "--eval_interval", "3", "--out_dir", tmp_path / "out", "--eval_iters", "2",
                              "--num_samples", "0")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["max_iters"], config["n_layer"], config["n_embd"]) == (3, 4, 128)
    assert config["out_dir"] == str(tmp_path / "out") and "config" not in config
    assert list((tmp_path / "out").glob("iter-3-*.pt"))


@pytest.mark.parametrize("text, message", [
    ("n_layers = 4\n", "unknown key 'n_layers' (did you mean n_layer?)"),
    ("n_layer = \"four\"\n", "n_layer = 'four' should be an integer"),
])
def test_a_bad_key_or_type_in_the_config_file_gets_one_line_naming_it(tmp_path, text, message):
    (tmp_path / "bad.toml").write_text(text)
    result = train_in_process("--config", tmp_path / "bad.toml", "--out_dir", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'bad.toml'}: {message}"]
    assert not (tmp_path / "out").exists()
