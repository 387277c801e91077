"""settings.py: the flags (TrainConfig, parsed from the command line), their checks, and a resumed run's
settings taken back from its checkpoint."""

import dataclasses

import pytest

from cli import UserError
from conftest import train_in_process
from settings import resume_warnings
from train_gpt2 import TrainConfig, parse_args


# -----------------------------------------------------------------------------
# The command line


def test_help_lists_every_flag_with_its_default():
    result = train_in_process("--help")
    assert result.returncode == 0
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in result.stdout
    for default in ("6e-05", "600000", "edu_fineweb10B", "./out", "scratch"):
        assert default in result.stdout


def test_defaults_match_the_readme_training_command():
    config, _ = parse_args([])
    shape = (config.batch_size, config.block_size, config.n_layer, config.n_head, config.n_embd)
    assert shape == (8, 1024, 12, 12, 768)
    schedule = (config.learning_rate, config.min_lr, config.warmup_iters, config.lr_decay_iters)
    assert schedule == (6e-4, 6e-5, 2000, 600000)
    assert (config.max_iters, config.eval_interval, config.eval_iters) == (600000, 2000, 200)
    assert (config.gradient_accumulation_steps, config.compile, config.eval_only) == (5, True, False)
    assert (config.out_dir, config.weight_decay, config.grad_clip) == ("./out", 0.1, 1.0)


def test_booleans_parse_true_and_false():
    config, explicit = parse_args(["--compile", "False", "--eval_only", "True", "--gradient_checkpointing=True"])
    assert config.compile is False and config.eval_only is True and config.gradient_checkpointing is True
    assert explicit == {"compile", "eval_only", "gradient_checkpointing"}


def test_validation_names_the_problem():
    with pytest.raises(UserError, match="not divisible"):
        TrainConfig(n_embd=100, n_head=3).validate()


def test_a_spike_window_past_its_limit_is_one_line():
    config, _ = parse_args(["--spike_guard", "3", "--spike_window", str(10**6)])
    with pytest.raises(UserError, match="--spike_window from 10 to 10000"):
        config.validate()


def test_a_resume_with_another_seed_is_refused_in_one_line(trained_run, tmp_path, capsys):
    import train_gpt2
    with pytest.raises(SystemExit) as exit_info:
        train_gpt2.main(["--init_from", "resume", "--out_dir", str(trained_run[0]), "--seed", "7",
                         "--max_iters", "10"])
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is seeded with 1337 (its initialization and data order): --seed 7 cannot change that" in line


def test_a_resume_that_adds_steps_past_the_decays_end_says_they_train_at_min_lr():
    saved = dataclasses.asdict(TrainConfig(max_iters=300, lr_decay_iters=300, warmup_iters=30, min_lr=2e-4))
    resumed = lambda **flags: TrainConfig(**{**saved, **flags})
    assert resume_warnings(saved, resumed(max_iters=400), 1, 1) == [
        "warning: --max_iters 400 runs past --lr_decay_iters 300, where the cosine decay ends: steps 300 to 399 "
        "train at --min_lr 0.0002; to decay over them, pass --lr_decay_iters 400 too"]
    assert resume_warnings(saved, resumed(max_iters=400, lr_decay_iters=400), 1, 1) == []
    assert resume_warnings(saved, resumed(), 1, 1) == []  # the run as it was planned


def test_a_config_built_in_code_or_read_from_a_checkpoint_holds_its_integers_to_64_bits():
    with pytest.raises(UserError, match=r"--max_iters 1180591620717411303424 is past the largest integer a flag "
                                        r"takes \(2\*\*63 - 1\)"):
        TrainConfig(max_iters=2**70).validate()


NUL = "'out\\x00put' holds a NUL character, which no flag takes: remove it"  # the one line's reason, everywhere


@pytest.mark.parametrize("flag", ["out_dir", "data", "init_from", "hellaswag_data", "export_hf", "tokenizer",
                                  "wandb_run_name", "sample_prompt"])
def test_a_nul_character_in_any_string_flag_is_one_line_naming_where_it_came_from(flag, tmp_path, capsys):
    """A path or any other text, from a config file (its file and key named) or a command line given in code (an
    operating system's argv cannot hold one): the same reason, before anything is read or written."""
    (tmp_path / "nul.toml").write_text(f'{flag} = "out\\u0000put"\n')  # TOML's escape: a real NUL in the value
    line = refused(["--config", tmp_path / "nul.toml"], capsys)
    assert line == f"error: {tmp_path / 'nul.toml'}: {flag} = 'out\\x00put': {NUL}"
    with pytest.raises(SystemExit) as exit_info:
        parse_args([f"--{flag}", "out\0put"])
    assert exit_info.value.code == 2 and f"argument --{flag}: {NUL} (see --help)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "nul.toml"]


def test_a_checkpoints_config_with_a_nul_character_is_a_damaged_checkpoint(trained_run, tmp_path, capsys):
    from checkpoint import load_checkpoint, save_checkpoint
    checkpoint = load_checkpoint(next(trained_run[0].glob("iter-8-*.pt")))
    for flag in ("data", "sample_prompt"):
        checkpoint["config"] = {**load_checkpoint(next(trained_run[0].glob("iter-8-*.pt")))["config"],
                                flag: "out\0put"}
        save_checkpoint(tmp_path / "iter-8-loss-1.0000.pt", checkpoint)
        line = refused(["--init_from", tmp_path / "iter-8-loss-1.0000.pt", "--out_dir", tmp_path / "branch"], capsys)
        assert f"holds a malformed config (--{flag} {NUL}): it is damaged" in line
    assert not (tmp_path / "branch").exists()


# the path flags (flag(path=True)) that '' would silently make the current directory or nothing at all: all but
# those whose default is empty (--export_hf: no export)
NOT_EMPTY = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata["path"] and f.default]


def test_the_path_flags_that_may_not_be_empty_are_the_ones_marked_as_paths_with_a_default():
    assert NOT_EMPTY == ["data", "tokenizer", "out_dir", "init_from", "hellaswag_data"]
    assert parse_args(["--export_hf", ""])[0].export_hf == ""


@pytest.mark.parametrize("flag", NOT_EMPTY)
def test_an_empty_path_flag_is_refused_instead_of_meaning_the_current_directory(flag, tmp_path, capsys):
    line = refused([f"--{flag}", ""], capsys, cwd=tmp_path)
    assert line == f"error: --{flag} is empty: give it a value ('.' for the current directory)"
    assert list(tmp_path.iterdir()) == []  # nothing written into the current directory


def refused(argv, capsys, cwd=None):
    """The trainer's main in this process (in cwd), refusing: its one line."""
    import os
    import train_gpt2
    before = os.getcwd()
    try:
        os.chdir(cwd or before)
        with pytest.raises(SystemExit) as exit_info:
            train_gpt2.main([str(word) for word in argv])
    finally:
        os.chdir(before)
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line
