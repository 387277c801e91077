"""sample.py: reproducible under a seed, streams the text the sampling loop draws from the checkpoint run as a
transformers model, FILE: prompts, bad input."""

import io

import pytest
import torch

import sample

from fineweb import load_tokenizer
from conftest import run_main, run_script
from sampling import generate_tokens
from train_gpt2 import load_start

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # a 64-wide model runs faster on one thread, and the CPU is shared


def run_sample(*args, run=run_script):
    """sample.py in a process of its own (its samples stream to the sys.stdout it was imported with), or with
    run=run_main through its main in this process, where its output is what stderr says."""
    return run("sample.py", "--num_samples", "2", "--max_new_tokens", "16", "--device", "cpu",
               "--dtype", "float32", *args, env=ONE_THREAD)


def test_samples_are_reproducible_under_a_seed_and_are_what_generate_makes(trained_run, tmp_path):
    checkpoint = trained_run[0] / "best_val_loss.pt"
    prompt = "ROMEO: caf\u00e9,"
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    first = run_sample("--init_from", checkpoint, "--start", prompt, "--seed", "42")
    from_file = run_sample("--init_from", checkpoint, "--start", f"FILE:{tmp_path / 'prompt.txt'}", "--seed", "42")
    for result in (first, from_file):
        assert result.returncode == 0, result.stderr
    assert first.stdout == from_file.stdout
    other_seed = io.StringIO()  # in this process, to spare a third start-up
    sample.sample(sample.SampleConfig(init_from=str(checkpoint), start=prompt, num_samples=2, max_new_tokens=16,
                                      seed=7, device="cpu", dtype="float32"), out=other_seed)
    assert other_seed.getvalue().startswith(prompt) and other_seed.getvalue() != first.stdout
    # the streamed text is the sampling loop's over the converted checkpoint, decoded in one go at the end
    enc, model = load_tokenizer(), load_start(str(checkpoint), ".")[0]
    generator, expected = torch.Generator().manual_seed(42), ""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess ran: the same sums in the same order, so the same draws
    try:
        for _ in range(2):
            idx = torch.tensor([enc.encode(prompt)])
            tokens = generate_tokens(lambda context: model(context)[0], idx, 16, 32, temperature=0.8,
                                     top_k=50, vocab_limit=50257, generator=generator)
            out = torch.cat([idx, *tokens], dim=1)
            expected += enc.decode(out[0].tolist()) + "\n---------------\n"
    finally:
        torch.set_num_threads(threads)
    assert first.stdout == expected.replace("\r\n", "\n").replace("\r", "\n")  # as text-mode pipes read it


class CountingDecodes:
    """A tokenizer that counts the ids each decode is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, []

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def decode(self, ids):
        self.decoded.append(len(ids))
        return self.tokenizer.decode(ids)


def test_the_stream_decodes_a_few_tokens_a_step_and_writes_the_whole_text(trained_run):
    """Each step decodes the tokens not yet written and the ones written last, never the whole sample so far (a
    long sample's decoding was quadratic): the text is decode's of all the new tokens all the same."""
    tokenizer, model = CountingDecodes(load_tokenizer()), load_start(str(trained_run[0] / "best_val_loss.pt"), ".")[0]
    config, out = sample.SampleConfig(max_new_tokens=300, device="cpu"), io.StringIO()
    new_ids = sample.stream_sample(model, tokenizer, "ROMEO:", config, "cpu", torch.autocast("cpu", enabled=False),
                                   torch.Generator().manual_seed(0), out)
    assert len(new_ids) == 300 and out.getvalue() == "ROMEO:" + load_tokenizer().decode(new_ids)
    assert sum(tokenizer.decoded) < 10 * len(new_ids) and max(tokenizer.decoded) < 20


def test_a_character_split_between_tokens_is_written_once_it_is_whole():
    import random
    gpt2 = load_tokenizer()
    ids = gpt2.encode("caf\u00e9 \u6771\u4eac \U0001f600 \U0001f99c \u00a1s\u00ed!")  # some characters span tokens
    pieces = list(sample.text_pieces(gpt2, ids))
    assert "".join(pieces) == gpt2.decode(ids) and not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) < len(ids)  # held back while a character was incomplete
    rng = random.Random(0)  # any ids, byte pieces that never make a character among them: decode's text all the same
    for _ in range(50):
        ids = [rng.randrange(gpt2.n_vocab) for _ in range(30)]
        assert "".join(sample.text_pieces(gpt2, ids)) == gpt2.decode(ids)


@pytest.mark.parametrize("args, message", [
    (["--init_from", "{tmp}/missing.pt"], "checkpoint {tmp}/missing.pt not found"),
    (["--start", "FILE:{tmp}/missing.txt"], "--start FILE:{tmp}/missing.txt: cannot read"),
    (["--seed", "-1"], "--seed must be from 0 to 2**63 - 1, got -1"),
    # a prompt file is read up to a cap, whatever it is
    (["--start", "FILE:/dev/zero"], "--start FILE:/dev/zero: /dev/zero is longer than 1,000,000 characters"),
    (["--start", "FILE:{tmp}/long.txt"], "--start FILE:{tmp}/long.txt: {tmp}/long.txt is longer than 1,000,000"),
    (["--start", "FILE:/dev/urandom"], "--start FILE:/dev/urandom: /dev/urandom is not UTF-8 text"),
    (["--start", "FILE:{tmp}"], "--start FILE:{tmp}: cannot read it (Is a directory)"),
])
def test_bad_input_gets_one_line_and_exit_1(args, message, trained_run, tmp_path):
    (tmp_path / "long.txt").write_text("a" * 1_000_001)
    args = [a.format(tmp=tmp_path) for a in args]
    result = run_sample("--init_from", trained_run[0] / "best_val_loss.pt", *args, run=run_main)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message.format(tmp=tmp_path)}"), result.stderr


def test_help_describes_the_script_in_whole_sentences(capsys):
    with pytest.raises(SystemExit) as exit:
        sample.main(["--help"])
    assert exit.value.code == 0
    description = " ".join(capsys.readouterr().out.split("\n\n")[1].split())
    assert description == " ".join(sample.__doc__.strip().split("\n\n")[0].split()) and description.endswith(".")


def test_a_model_whose_logits_are_not_finite_is_one_line(trained_run, tmp_path):
    from checkpoint import load_checkpoint, save_checkpoint
    checkpoint = load_checkpoint(trained_run[0] / "best_val_loss.pt")
    checkpoint["model"] = {name: tensor * 1e30 for name, tensor in checkpoint["model"].items()}  # finite, diverged
    save_checkpoint(tmp_path / "diverged.pt", checkpoint)
    result = run_sample("--init_from", tmp_path / "diverged.pt", run=run_main)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --init_from {tmp_path / 'diverged.pt'}: the model's logits are not finite: its weights have "
        "diverged; sample an earlier checkpoint of the run"]
