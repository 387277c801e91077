"""bench.py on a tiny configuration: it runs, prints its table and JSON, and both steps agree (no timing)."""

import json

import pytest

from conftest import run_main

TINY_BENCH = ["--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32",
              "--batch_size", "4", "--gradient_accumulation_steps", "2", "--compile", "False", "--dtype", "float32",
              "--steps", "2", "--warmup_steps", "1"]


def test_compare_times_both_steps_and_they_give_the_same_losses(tmp_path):
    result = run_main("bench.py", *TINY_BENCH, "--compare", "True", "--rounds", "2",
                        "--json_out", tmp_path / "bench.json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["variant", "device", "dtype", "compile"]
    assert lines[1].startswith("naive") and lines[2].startswith("fast") and lines[3].startswith("speedup")
    report = json.loads(lines[-1])
    assert report == json.loads((tmp_path / "bench.json").read_text())
    naive, fast = report["results"]
    assert len(naive["losses"]) == len(fast["losses"]) == 3
    assert report["max_loss_difference"] < 1e-4
    for result in (naive, fast):
        assert result["tokens_per_step"] == 4 * 2 * 32
        assert result["ms_per_step"] > 0 and result["tokens_per_sec"] > 0 and result["peak_memory_mb"] > 0
        assert len(result["step_ms"]) == 2 * 2  # two rounds of two timed steps, pooled


def test_fsdp_is_timed_on_a_process_group_of_one_with_the_same_losses(tmp_path):
    reports = []
    for fsdp in ("False", "True"):
        result = run_main("bench.py", *TINY_BENCH, "--fsdp", fsdp, "--json_out", tmp_path / f"{fsdp}.json")
        assert result.returncode == 0, result.stderr
        reports.append(json.loads((tmp_path / f"{fsdp}.json").read_text())["results"][0])
    whole, sharded = reports
    assert (whole["fsdp"], sharded["fsdp"]) == (False, True)
    assert sharded["peak_memory_mb"] > 0
    for a, b in zip(whole["losses"], sharded["losses"]):
        assert b == pytest.approx(a, rel=1e-5)


def test_bad_flags_get_one_line(tmp_path):
    result = run_main("bench.py", *TINY_BENCH, "--variant", "slow")
    assert result.returncode == 1 and result.stderr.strip() == "error: --variant 'slow' is not one of fast, naive"


def test_tokenize_times_fineweb_tokenizing_input_txt_in_one_process():
    from conftest import INPUT_TXT
    from fineweb import load_tokenizer
    result = run_main("bench.py", "--tokenize", "True", "--data", INPUT_TXT, "--steps", "1", "--warmup_steps", "0")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    documents = INPUT_TXT.read_text(encoding="utf-8").split("\n\n")
    assert report["documents"] == len(documents) and report["tokenizer"] == "gpt2"
    assert report["tokens"] == sum(len(load_tokenizer().encode(d)) + 1 for d in documents)  # an end-of-text each
    assert report["tokens_per_sec"] > 0 and report["tokens_per_cpu_sec"] > 0
    assert result.stdout.startswith(f"{report['tokens_per_sec']:,.0f} tokens/s in one process")


@pytest.mark.parametrize("where, message", [
    ("{tmp}", "--json_out {tmp} is a directory: pass a file name, such as {tmp}/bench.json"),
    ("{tmp}/missing/bench.json", "--json_out {tmp}/missing/bench.json: {tmp}/missing is not a directory"),
    ("{tmp}/a_file/bench.json", "--json_out {tmp}/a_file/bench.json: {tmp}/a_file is not a directory"),
])
def test_a_json_out_that_cannot_be_written_is_one_line_before_anything_is_timed(where, message, tmp_path):
    (tmp_path / "a_file").write_text("")
    result = run_main("bench.py", *TINY_BENCH, "--json_out", where.format(tmp=tmp_path))
    assert result.returncode == 1 and result.stdout == ""  # refused before the benchmark ran
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {message.format(tmp=tmp_path)}")


def test_the_model_follows_the_tokenizer_as_a_new_run_of_the_trainers_does(tmp_path):
    """--vocab_size follows --tokenizer unless given: a 100-word vocabulary makes the model of --vocab_size 128,
    where it timed a 50,304-row model (and crashed on a tokenizer past 50,304 ids); one given too small is refused
    in one line."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from conftest import INPUT_TXT
    words = sorted(set(INPUT_TXT.read_text(encoding="utf-8").split()))[:98]
    tokenizer = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, **{w: 2 + i for i, w in enumerate(words)}},
                                           unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "words.json"))
    reports = []
    for given in ([], ["--vocab_size", "128"]):
        result = run_main("bench.py", *TINY_BENCH, "--tokenizer", tmp_path / "words.json", "--mlp", "relu2", *given)
        assert result.returncode == 0, result.stderr
        reports.append(json.loads(result.stdout.strip().splitlines()[-1]))
    followed, given = reports
    assert followed["config"]["vocab_size"] == 128
    assert followed["results"][0]["losses"] == given["results"][0]["losses"]
    small = run_main("bench.py", *TINY_BENCH, "--tokenizer", tmp_path / "words.json", "--vocab_size", "64")
    assert small.returncode == 1 and small.stderr.startswith("error: the model has vocab_size=64, fewer than the 100 ")
