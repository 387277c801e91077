"""HellaSwag: rendering, the most-likely ending, batching and ranks, bad input, downloads, the command line."""

import dataclasses
import http.client
import io
import json
import os
import random
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import hellaswag
from fineweb import load_tokenizer
from checkpoint import OptimizerStates, Progress, RNGState, make_checkpoint, save_checkpoint
from cli import UserError
from device import Distributed
from hellaswag import (collate, evaluate, load_examples, padded_length, predict, render_examples, score_examples,
                       token_losses)
from train_gpt2 import GPT, GPTConfig, TrainConfig, make_optimizers
from conftest import run_main

REPO = Path(__file__).resolve().parent.parent
GPT2 = load_tokenizer()
ROOF_CTX = "A man is sitting on a roof."
ROOF_ENDINGS = ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                "is holding a rubik's cube.", "he starts pulling up roofing."]


def item(ind, ctx, endings, label):
    """One example with every field of HellaSwag's documented jsonl format."""
    return {"ind": ind, "activity_label": "Roof shingle removal", "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
            "split": "val", "split_type": "indomain", "label": label, "endings": endings,
            "source_id": f"activitynet~v_{ind}"}


def write_jsonl(path, rows):
    """rows: dicts (written as JSON) or raw strings (written as they are)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def random_items(n, seed=0, ctx_words=(8, 30), ending_words=(2, 12)):
    """Made-up examples of varied lengths from the words of input.txt."""
    rng = random.Random(seed)
    words = (REPO / "input.txt").read_text().split()[:5000]
    phrase = lambda lo_hi: " ".join(rng.choices(words, k=rng.randint(*lo_hi)))
    return [item(i, phrase(ctx_words), [phrase(ending_words) for _ in range(4)], rng.randrange(4))
            for i in range(n)]


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=64)).eval()


def run_script(*args, cwd=REPO, env=None):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=300)


# -----------------------------------------------------------------------------
# Rendering and the most-likely ending, checked by hand


def render_example(example, enc, max_tokens=None):
    return render_examples([example], enc, max_tokens)[0]


def test_render_example_is_the_context_then_each_ending_with_a_leading_space():
    enc = load_tokenizer()
    tokens, mask, label = render_example(item(0, ROOF_CTX, ROOF_ENDINGS, 3), enc)
    ctx = enc.encode(ROOF_CTX)
    assert ctx == [32, 582, 318, 5586, 319, 257, 9753, 13]
    ends = [enc.encode(" " + e) for e in ROOF_ENDINGS]
    assert ends[3] == enc.encode(" he") + enc.encode(" starts pulling up roofing.")
    width = len(ctx) + max(map(len, ends))
    assert label == 3 and tokens.shape == mask.shape == (4, width)
    for i, end in enumerate(ends):
        padding = width - len(ctx) - len(end)
        assert tokens[i].tolist() == ctx + end + [0] * padding
        assert mask[i].tolist() == [False] * len(ctx) + [True] * len(end) + [False] * padding
    assert enc.decode(tokens[3, mask[3]].tolist()) == " he starts pulling up roofing."


def test_render_example_keeps_the_last_max_tokens_of_each_row():
    enc = load_tokenizer()
    ctx, ending, long_ending = "one two three four five six seven eight", "nine ten", "a b c d e f g h i j k"
    tokens, mask, _ = render_example(item(0, ctx, [ending, ending, ending, long_ending], 0), enc, max_tokens=6)
    row = enc.encode(ctx) + enc.encode(" " + ending)
    assert tokens[0].tolist() == row[-6:]  # the context's start is dropped, the ending kept whole
    assert mask[0].tolist() == [False] * 4 + [True] * 2
    assert tokens[3].tolist() == enc.encode(" " + long_ending)[-6:]  # the ending alone is too long: its tail
    assert mask[3].all()


def test_predict_picks_the_lowest_total_loss_and_the_lowest_mean_loss():
    inf = float("inf")
    losses = torch.tensor([[inf, 1.0, 1.0, 0.0, 0.0, 0.0],   # total 2.0, mean 1.0
                           [inf, 0.6, 0.6, 0.6, 0.6, 0.6],   # total 3.0, mean 0.6
                           [inf, 2.0, 2.0, 0.0, 0.0, 0.0],   # total 4.0, mean 2.0
                           [inf, 3.0, 0.0, 0.0, 0.0, 0.0]])  # total 3.0, mean 3.0
    mask = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    pred_sum, pred_norm = predict(losses, mask)  # the inf losses are outside the mask: ignored
    assert (pred_sum.item(), pred_norm.item()) == (0, 1)
    pred_sum, pred_norm = predict(torch.stack([losses, losses.flip(0)]), torch.stack([mask, mask.flip(0)]))
    assert pred_sum.tolist() == [0, 3] and pred_norm.tolist() == [1, 2]


def test_batches_have_a_fixed_row_count_and_few_lengths():
    lengths = [1, 32, 33, 48, 49, 64, 65, 97, 192, 200, 1000, 1024]
    assert [padded_length(n, 1024) for n in lengths] == [32, 32, 48, 48, 64, 64, 96, 128, 192, 256, 1024, 1024]
    assert padded_length(300, 100) == 100
    enc = load_tokenizer()
    rendered = [render_example(example, enc)[:2] for example in random_items(3)]
    x, y, scored = collate(rendered, batch_size=5, block_size=1024)
    assert x.shape == y.shape == scored.shape == (20, 64)
    tokens, mask = rendered[1]
    n = tokens.size(1) - 1
    assert x[4:8, :n].tolist() == tokens[:, :-1].tolist() and y[4:8, :n].tolist() == tokens[:, 1:].tolist()
    assert scored[4:8, :n].tolist() == mask[:, 1:].tolist()
    assert not scored[12:].any()  # the dummy rows that fill the batch


# -----------------------------------------------------------------------------
# Scoring: a model that knows the answer, and the same answers however the work is split


class KnowsTheAnswers(nn.Module):
    """After each token of a context followed by its right ending, a logit of 20 on the token that follows
    it there, so the right endings cost almost nothing; and 100 on the padding of the vocabulary (ids 50257
    up), which the scoring must ignore. `style` picks the form of the output: a tensor, this repo's
    (logits, loss) tuple, or transformers' object with .logits."""

    def __init__(self, rows, style="tensor"):
        super().__init__()
        self.next_token = torch.full((50304,), -1)
        for row in rows:
            for a, b in zip(row, row[1:]):
                assert int(self.next_token[a]) in (-1, b), "a token with two successors: pick other words"
                self.next_token[a] = b
        self.style = style

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 50304)  # (B, T, V)
        logits[..., 50257:] = 100.0
        next_token = self.next_token[idx]
        logits.scatter_(-1, next_token.clamp(min=0).unsqueeze(-1), (20.0 * (next_token >= 0)).unsqueeze(-1))
        return {"tensor": logits, "tuple": (logits, None), "object": SimpleNamespace(logits=logits)}[self.style]


def answer_items():
    """Right endings longer than the wrong ones, so that a total loss which counted the padding logits
    (about 100 a token) would pick a wrong one."""
    right = {"Zoo animals": "elephant lion tiger monkey bear", "Orchestral instruments": "violin trumpet guitar piano",
             "Distant planets": "Saturn Jupiter Neptune Mars"}
    wrong = ["the cat", "a dog", "my cup"]
    return [item(i, topic, wrong[:label] + [right[topic]] + wrong[label:], label)
            for i, (topic, label) in enumerate(zip(right, [0, 2, 3]))]


@pytest.mark.parametrize("style", ["tensor", "tuple", "object"])
def test_a_model_that_knows_the_right_endings_gets_them_all(style):
    enc = load_tokenizer()
    examples = answer_items()
    model = KnowsTheAnswers([enc.encode(ex["ctx"]) + enc.encode(" " + ex["endings"][ex["label"]])
                             for ex in examples], style)
    result = evaluate(model, examples, batch_size=2, block_size=64, tokenizer=GPT2)
    assert result == {"acc": 1.0, "acc_norm": 1.0, "n": 3, "correct": 3, "correct_norm": 3}
    unsliced = evaluate(model, examples, batch_size=2, block_size=64, tokenizer=GPT2, vocab_limit=50304)
    assert unsliced["acc"] == 0.0 and unsliced["acc_norm"] == 1.0
    bf16 = evaluate(model, examples, batch_size=2, block_size=64, tokenizer=GPT2,
                    autocast=torch.autocast("cpu", torch.bfloat16))
    assert bf16["acc"] == bf16["acc_norm"] == 1.0


def reference_predictions(model, examples, block_size):
    """build-nanogpt's way, one example at a time, unpadded: the yardstick for the batched path."""
    enc = load_tokenizer()
    predictions = []
    for example in examples:
        tokens, mask, _ = render_example(example, enc, max_tokens=block_size + 1)
        logits = model(tokens[:, :-1])[0][..., :50257]
        losses = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        sums = (losses.view(4, -1) * mask[:, 1:]).sum(1)
        predictions.append([sums.argmin().item(), (sums / mask[:, 1:].sum(1)).argmin().item()])
    return predictions


def test_batched_unbatched_and_split_ranks_agree_with_one_example_at_a_time():
    model, examples = tiny_gpt(), random_items(7)
    with torch.no_grad():
        expected = reference_predictions(model, examples, block_size=64)
    for batch_size in (1, 3, 8):
        scores = score_examples(model, examples, batch_size=batch_size, block_size=64, tokenizer=GPT2)
        assert scores.tolist() == expected
    whole = evaluate(model, examples, batch_size=4, block_size=64, tokenizer=GPT2)
    labels = [ex["label"] for ex in examples]
    assert whole["correct"] == sum(p[0] == y for p, y in zip(expected, labels))
    assert whole["correct_norm"] == sum(p[1] == y for p, y in zip(expected, labels))
    # without a process group each rank returns its own share's counts: together they are the whole
    shares = [evaluate(model, examples, batch_size=4, block_size=64, tokenizer=GPT2,
                       dist_info=Distributed(rank=r, world_size=2))
              for r in (0, 1)]
    assert [s["n"] for s in shares] == [4, 3]
    for key in ("n", "correct", "correct_norm"):
        assert sum(s[key] for s in shares) == whole[key]


def test_this_repos_gpt_computes_logits_at_the_endings_alone_with_the_same_losses():
    model, examples = tiny_gpt(), random_items(6)
    rows_seen = []
    full_logits = lambda x: rows_seen.append(model(x)[0].shape) or model(x)  # a plain callable: every position
    with torch.no_grad():
        x, y, scored = collate([render_example(ex, load_tokenizer(), 65)[:2] for ex in examples], 6, 64)
        positions = scored.view(-1).nonzero().squeeze(1)
        at_endings = token_losses(model, x, y, scored, nullcontext(), 50257, positions)
        everywhere = token_losses(full_logits, x, y, scored, nullcontext(), 50257)
    assert rows_seen == [(24, x.size(1), 50304)]
    assert torch.allclose(at_endings, everywhere, atol=1e-5) and (at_endings[scored] > 0).all()
    compiled = torch.compile(model)  # as the trainer's evaluation calls it
    at_positions = score_examples(compiled, examples, batch_size=4, block_size=64, by_position=True, tokenizer=GPT2)
    everywhere = score_examples(model, examples, batch_size=4, block_size=64, tokenizer=GPT2)
    assert at_positions.tolist() == everywhere.tolist()


DDP_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from device import Distributed
from fineweb import load_tokenizer
from hellaswag import evaluate, load_examples
from train_gpt2 import GPT, GPTConfig
GPT2 = load_tokenizer()
dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=64))
model.load_state_dict(torch.load({weights!r}))
examples, _ = load_examples({data!r})
result = evaluate(model, examples, batch_size=4, block_size=64, tokenizer=GPT2,
                  dist_info=Distributed(rank=rank, world_size=world_size))
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


def test_two_gloo_processes_sum_their_counts_to_the_single_process_figures(tmp_path):
    model, examples = tiny_gpt(), random_items(7)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    data = write_jsonl(tmp_path / "data.jsonl", examples)
    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), weights=str(tmp_path / "weights.pt"), data=str(data),
                                        out=str(tmp_path)))
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script,
                        cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    expected = evaluate(model, examples, batch_size=4, block_size=64, tokenizer=GPT2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected


class ShapeRecorder(nn.Module):
    """Wraps a model and records the shape of every input it is given, and whether it was in eval mode."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, idx):
        self.calls.append((tuple(idx.shape), self.training))
        return self.model(idx)


def test_in_lockstep_every_rank_calls_the_model_as_often_and_scores_the_same():
    examples = random_items(9)  # shares of 5 and 4: 2 and 1 batches of 4
    calls, results = [], []
    for rank in (0, 1):
        model = ShapeRecorder(tiny_gpt())
        sharded = Distributed(rank=rank, world_size=2, sharded=True)
        results.append(evaluate(model, examples, batch_size=4, block_size=64, tokenizer=GPT2, dist_info=sharded))
        calls.append(len(model.calls))
    assert calls == [2, 2]  # FSDP: each call is a collective that every rank must join
    assert results == [evaluate(tiny_gpt(), examples, batch_size=4, block_size=64, tokenizer=GPT2,
                                dist_info=Distributed(rank=rank, world_size=2)) for rank in (0, 1)]
    # this repo's GPT, scored at the endings' positions: its padding pass asks for no logits at all
    for rank in (0, 1):
        model, logit_rows = tiny_gpt(), []
        model.register_forward_hook(lambda module, args, output: logit_rows.append(output[0].size(0)))
        assert evaluate(model, examples, batch_size=4, block_size=64, tokenizer=GPT2, by_position=True,
                        dist_info=Distributed(rank=rank, world_size=2, sharded=True)) == results[rank]
        assert len(logit_rows) == 2 and logit_rows[0] > 0
        assert (logit_rows[1] == 0) == (rank == 1)  # rank 1 has one batch: its second call is the padding pass


def test_few_input_shapes_reach_the_model_and_its_mode_is_restored():
    model = ShapeRecorder(tiny_gpt()).train()
    examples = random_items(40, ctx_words=(2, 40), ending_words=(1, 15))
    result = evaluate(model, examples, batch_size=8, block_size=64, tokenizer=GPT2)
    assert result["n"] == 40 and model.training
    shapes = {shape for shape, _ in model.calls}
    assert {rows for rows, _ in shapes} == {32} and {T for _, T in shapes} <= {32, 48, 64}
    assert not any(training for _, training in model.calls)


def test_examples_longer_than_the_context_window_are_cut_not_fatal():
    examples = [item(0, "word " * 300, ["short end", "another end", "more " * 80, "x"], 2),
                item(1, "a short context", ["tail " * 100, "b", "c", "d"], 1)]
    model = ShapeRecorder(tiny_gpt())
    result = evaluate(model, examples, batch_size=2, block_size=64, tokenizer=GPT2)
    assert result["n"] == 2
    assert all(T <= 64 for (_, T), _ in model.calls)


# -----------------------------------------------------------------------------
# Loading: bad lines, local files, the download and its cache


def test_malformed_lines_are_reported_with_their_line_number_and_the_rest_kept(tmp_path):
    good = random_items(3)
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        good[0],
        "{not json",
        {k: v for k, v in good[1].items() if k != "endings"},
        {**good[1], "label": 4},
        "",
        {**good[1], "endings": good[1]["endings"][:3]},
        {**good[1], "label": "2"},  # the Hugging Face copy's string labels are fine
        "[1, 2]",
        good[2],
    ])
    examples, problems = load_examples(str(path))
    assert [ex["ind"] for ex in examples] == [0, 1, 2] and examples[1]["label"] == 2
    assert [p.split(": ")[0] for p in problems] == [f"{path}:{n}" for n in (2, 3, 4, 6, 8)]
    assert "not JSON" in problems[0] and "'endings'" in problems[1] and "'label' is 4" in problems[2]
    assert "list of 4 strings" in problems[3] and all(p.endswith("line skipped") for p in problems)
    result = evaluate(tiny_gpt(), examples, batch_size=2, block_size=64, tokenizer=GPT2)
    assert result["n"] == 3
    assert load_examples(str(path), limit=2)[0] == examples[:2]


def test_an_example_whose_endings_are_all_empty_is_skipped_not_scored(tmp_path):
    good = random_items(2)
    path = write_jsonl(tmp_path / "empty_endings.jsonl", [
        {**good[0], "endings": ["", " ", "\t", ""], "label": 0},  # would tie, and ending 0 would count as correct
        {**good[0], "endings": ["", "", "", ""], "label": 2},
        {**good[1], "endings": ["", "an ending", "", ""]},  # one real ending is enough to score it
    ])
    examples, problems = load_examples(str(path))
    assert [ex["endings"] for ex in examples] == [["", "an ending", "", ""]]
    assert problems == [f"{path}:{n}: 'endings' are all empty; line skipped" for n in (1, 2)]


def test_a_missing_file_is_an_error_that_names_it(tmp_path):
    with pytest.raises(UserError, match="nothing.jsonl: no such file"):
        load_examples(str(tmp_path / "nothing.jsonl"))


def test_a_split_is_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    server = tmp_path / "server"
    server.mkdir()
    write_jsonl(server / "hellaswag_val.jsonl", random_items(4))
    monkeypatch.setattr(hellaswag, "URL", server.as_uri() + "/hellaswag_{split}.jsonl")
    cache = tmp_path / "cache"
    examples, problems = load_examples("val", cache_dir=cache)
    assert len(examples) == 4 and not problems
    assert [p.name for p in cache.iterdir()] == ["hellaswag_val.jsonl"]
    (server / "hellaswag_val.jsonl").unlink()  # the second load reads the cache
    assert load_examples("val", cache_dir=cache)[0] == examples


def test_no_network_is_an_error_that_says_where_to_put_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(hellaswag, "URL", "http://127.0.0.1:9/hellaswag_{split}.jsonl")  # refused at once
    with pytest.raises(UserError, match=f"put a copy at {tmp_path / 'hellaswag_val.jsonl'}") as error:
        load_examples("val", cache_dir=tmp_path, flag="--some_flag")
    assert "--some_flag path/to/hellaswag_val.jsonl" in str(error.value)  # the calling script's flag
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_download_leaves_nothing_behind(tmp_path, monkeypatch):
    class Truncated(io.BytesIO):
        headers = {"Content-Length": "100000"}

    monkeypatch.setattr(hellaswag.urllib.request, "urlopen", lambda url, timeout: Truncated(b'{"ctx": "A man'))
    with pytest.raises(UserError, match="IncompleteRead"):
        load_examples("train", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []

    def broken(url, timeout):
        raise http.client.RemoteDisconnected("Remote end closed connection without response")
    monkeypatch.setattr(hellaswag.urllib.request, "urlopen", broken)
    with pytest.raises(UserError):
        load_examples("train", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# The command line


def write_checkpoint(path, model):
    """A checkpoint of the trainer's format holding model's weights, its other parts fresh."""
    loader = SimpleNamespace(state_dict=lambda: {"epoch": 0, "shard": 0, "position": 0, "seed": 0, "shuffle": True,
                                                 "shards": [["data.bin", 1000]], "fingerprints": None})
    parts = {"model": model, "optimizer": OptimizerStates(model, make_optimizers(model, TrainConfig(), "cpu"), False,
                                              expected=None),  # what a resume checks the state against
             "scaler": torch.amp.GradScaler("cpu", enabled=False), "loader": loader, "rng": RNGState(),
             "progress": Progress()}
    save_checkpoint(path, make_checkpoint(parts, model_args=dict(block_size=64, vocab_size=50304, n_layer=2,
                                                                 n_head=2, n_embd=64),
                                          config=dataclasses.asdict(TrainConfig()), world_size=1, micro_batch=[1, 1],
                                          torch_version=str(torch.__version__), git_commit=None, val_loss=None))
    return path


def parse_result(stdout):
    """{"acc": ..., "acc_norm": ..., "n": ...} from the line the command line prints."""
    fields = dict(part.split(" ", 1) for part in stdout.strip().splitlines()[-1].split(" | ")[:3])
    return {"acc": float(fields["acc"]), "acc_norm": float(fields["acc_norm"]), "n": int(fields["n"])}


def test_command_line_scores_a_transformers_gpt2_saved_in_a_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(tmp_path / "hf")
    items = random_items(5)
    data = write_jsonl(tmp_path / "data.jsonl", items[:2] + ["oops"] + items[2:])  # read before the 4th example
    # a batch of the 4 examples, not 16 (12 of padding): a CPU without bfloat16 matmuls emulates them, slowly
    result = run_main("hellaswag.py", "--init_from", tmp_path / "hf", "--data", data,
                      "--hellaswag_examples", "4", "--dtype", "bfloat16", "--batch_size", "4")
    assert result.returncode == 0, result.stderr
    assert parse_result(result.stdout)["n"] == 4
    assert f"warning: {data}:3: not JSON" in result.stderr


@pytest.mark.parametrize("case", ["missing data", "missing checkpoint", "a trainer's checkpoint", "not a model folder",
                                  "no network", "no model", "nothing scorable"])
def test_bad_input_gets_one_error_line_and_exit_1(case, tmp_path, monkeypatch, capsys):
    checkpoint = write_checkpoint(tmp_path / "ok.pt", tiny_gpt())
    data = write_jsonl(tmp_path / "data.jsonl", random_items(2))
    (tmp_path / "empty_folder").mkdir()
    monkeypatch.setattr(hellaswag, "URL", "http://127.0.0.1:9/hellaswag_{split}.jsonl")
    args, message = {
        "missing data": (["--init_from", checkpoint, "--data", tmp_path / "no.jsonl"], "no.jsonl: no such file"),
        "missing checkpoint": (["--init_from", tmp_path / "no.pt", "--data", data], "no.pt cannot be loaded"),
        "a trainer's checkpoint": (["--init_from", checkpoint, "--data", data],
                                   f"python train_gpt2.py --eval_only True --init_from {checkpoint}"),
        "not a model folder": (["--init_from", tmp_path / "empty_folder", "--data", data], "cannot be loaded"),
        "no network": (["--init_from", checkpoint, "--cache_dir", tmp_path / "cache"],
                       "pass a local copy: --data path/to/hellaswag_val.jsonl"),
        "no model": (["--data", data], "pass the model to score: --init_from gpt2"),
        "nothing scorable": (["--init_from", checkpoint, "--data", write_jsonl(tmp_path / "bad.jsonl", ["{}"])],
                             "no example of"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        hellaswag.main(list(map(str, args)))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert all(line.startswith(("warning: ", "error: ")) for line in err)


def test_importing_does_nothing(tmp_path):
    result = run_script("-c", "import sys, hellaswag; print(sorted(m for m in ('transformers', 'datasets') "
                              "if m in sys.modules))", cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n" and result.stderr == "" and list(tmp_path.iterdir()) == []


# -----------------------------------------------------------------------------
# In the trainer


def trainer_args(out_dir, *extra):
    from conftest import INPUT_TXT, TINY
    return [*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "2", "--eval_interval", "2",
            "--hellaswag", "True", *extra]


def hellaswag_records(out_dir):
    from conftest import read_metrics
    return [{k: v for k, v in m.items() if k.startswith("hellaswag") or k == "step"}
            for m in read_metrics(out_dir) if "val_loss" in m]


def test_the_trainer_scores_hellaswag_at_every_evaluation_and_two_ranks_count_the_same(tmp_path):
    from conftest import run_torchrun, train_in_process
    data = tmp_path / "hs.jsonl"
    write_jsonl(data, random_items(12))
    common = ["--hellaswag_data", data, "--hellaswag_examples", "10"]
    single = train_in_process(*trainer_args(tmp_path / "one", *common, "--gradient_accumulation_steps", "2"))
    assert single.returncode == 0, single.stderr
    records = hellaswag_records(tmp_path / "one")
    assert [r["step"] for r in records] == [0, 2] and all(r["hellaswag_n"] == 10 for r in records)
    assert "hellaswag acc_norm" in single.stdout
    ddp = run_torchrun(*trainer_args(tmp_path / "two", *common, "--gradient_accumulation_steps", "1"))
    assert ddp.returncode == 0, ddp.stderr
    assert hellaswag_records(tmp_path / "two") == records


def test_the_trainer_warns_once_and_trains_on_without_hellaswag_data(tmp_path):
    from conftest import train_in_process
    result = train_in_process(*trainer_args(tmp_path / "out", "--hellaswag_data", tmp_path / "missing.jsonl"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("warning: HellaSwag is off for this run") == 1
    assert hellaswag_records(tmp_path / "out") == [{"step": 0}, {"step": 2}]


def test_the_trainers_offline_warning_names_the_trainers_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(hellaswag, "URL", "http://127.0.0.1:9/hellaswag_{split}.jsonl")  # refused at once
    monkeypatch.setattr(hellaswag, "DEFAULT_CACHE_DIR", str(tmp_path))  # an empty cache
    printed = []
    log = SimpleNamespace(print=printed.append)
    assert hellaswag.load_for_training(TrainConfig(), Distributed(), log) is None
    (warning,) = printed
    # --data is the trainer's training data: naming it here would send the user to the wrong flag
    assert "--hellaswag_data" in warning and "--data" not in warning.replace("--hellaswag_data", "")
    assert warning.count("--hellaswag_data") == 1 and warning.count("--hellaswag False") == 1  # each fix once


def test_the_model_flag_of_other_hellaswag_scripts_names_init_from(capsys):
    with pytest.raises(SystemExit):
        hellaswag.parse_args(["--model", "gpt2"])  # build-nanogpt's is -m/--model_type
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "(did you mean --init_from?)" in line


def test_eval_only_reports_hellaswag_for_a_checkpoint(tmp_path, trained_run):
    from conftest import read_metrics, train_in_process
    data = tmp_path / "hs.jsonl"
    write_jsonl(data, random_items(6))
    checkpoint = next(trained_run[0].glob("iter-8-*.pt"))
    result = train_in_process(*trainer_args(tmp_path / "eval", "--eval_only", "True", "--init_from", checkpoint,
                              "--hellaswag_data", data))
    assert result.returncode == 0, result.stderr
    (record,) = read_metrics(tmp_path / "eval")
    assert record["hellaswag_n"] == 6 and 0 <= record["hellaswag_acc_norm"] <= 1
