"""
A tokenizer of one's own, end to end as a user goes: a 4,096-token BPE trained with `tokenizers` on input.txt, a
local jsonl tokenized with it by fineweb.py, a run trained on the shards and resumed, scored by --eval_only (val
bits per byte, HellaSwag), sampled and exported; the shards refused to a GPT-2 checkpoint and to fineweb.py with
another tokenizer. Then the other choices: a text file as --data, a tiktoken ranks file, a vocabulary past 65,536
ids (4-byte tokens, shard version 2).

    python -m pytest -q tests/test_tokenizer.py
"""

import dataclasses
import hashlib
import io
import json
import math
import shutil

import numpy as np
import pytest
import torch

import sample
from checkpoint import load_checkpoint
from conftest import INPUT_TXT, REPO, TINY, eval_records, read_metrics, run_main, train_in_process, train_losses
from fineweb import load_token_sources, load_tokenizer, open_shard, read_shard_header
from fineweb import describe_tokenizer
from hf_convert import model_tokenizer, save_hf_tokenizer
from sampling import generate_tokens
from train_gpt2 import load_start

DOCUMENTS = INPUT_TXT.read_text(encoding="utf-8").split("\n\n")
HELLASWAG_ITEMS = [  # docs/data.md's format: a context, four endings, the right one's index
    {"ctx": "KING RICHARD III: Now is the winter of", "label": 0,
     "endings": ["our discontent", "the table", "seven apples", "a running dog"]},
    {"ctx": "ROMEO: But, soft! what light through yonder", "label": 1,
     "endings": ["river goes", "window breaks?", "hat is red", "dog is grey"]},
    {"ctx": "HAMLET: To be, or not to be:", "label": "2",  # a string of digits, as the Hub's copy stores it
     "endings": ["the cat sat", "it is a box", "that is the question", "run away now"]},
    {"ctx": "First Citizen: Before we proceed any further,", "label": 3,
     "endings": ["eat the cake", "sing a song", "buy a car", "hear me speak."]},
]


def one_line_error(result):
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A 4,096-token byte-level BPE trained on input.txt with `tokenizers`, its end-of-text token among them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train([str(INPUT_TXT)], trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def shards(bpe, tmp_path_factory):
    """input.txt's documents as a jsonl file, tokenized with the BPE by fineweb.py."""
    root = tmp_path_factory.mktemp("bpe_shards")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS), encoding="utf-8")
    result = run_main("fineweb.py", "--data_files", "docs.jsonl", "--out_dir", "shards", "--tokenizer", bpe,
                      "--shard_size", "20000", "--val_tokens", "20000", "--num_proc", "1", cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "shards"


@pytest.fixture(scope="module")
def bpe_run(bpe, shards, tmp_path_factory):
    """6 steps on the shards, with evaluations (and checkpoints) at steps 3 and 6."""
    out_dir = tmp_path_factory.mktemp("bpe_run") / "out"
    result = train_in_process(*TINY, "--data", shards, "--tokenizer", bpe, "--out_dir", out_dir,
                              "--max_iters", "6", "--eval_interval", "3")
    assert result.returncode == 0, result.stderr
    return out_dir, result


def hellaswag_file(directory):
    path = directory / "hellaswag.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in HELLASWAG_ITEMS))
    return path


def test_the_shards_hold_the_documents_in_the_tokenizers_ids(bpe, shards):
    from tokenizers import Tokenizer
    theirs = Tokenizer.from_file(str(bpe))
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(bpe.read_bytes()).hexdigest()
    assert manifest["tokenizer"]["n_vocab"] == 4096 and manifest["shard_format"] == [20240520, 1]
    paths = sorted(shards.glob("*.bin"), key=lambda p: p.name.split("_")[-1])
    assert all(read_shard_header(p)[1] == np.dtype("<u2") for p in paths)
    tokens = np.concatenate([np.array(open_shard(p)) for p in paths])
    eot = theirs.token_to_id("<|endoftext|>")
    starts = np.flatnonzero(tokens == eot)
    assert len(starts) == len(DOCUMENTS) and tokens.max() < 4096
    pieces = [theirs.decode(piece[1:].tolist()) for piece in np.split(tokens, starts[1:])]
    assert pieces == DOCUMENTS


def test_a_run_on_them_records_the_tokenizer_and_reports_bits_per_byte(bpe, bpe_run):
    out_dir, result = bpe_run
    sha = hashlib.sha256(bpe.read_bytes()).hexdigest()
    config = json.loads((out_dir / "config.json").read_text())
    assert config["tokenizer"] == str(bpe) and config["tokenizer_record"]["sha256"] == sha
    checkpoint = load_checkpoint(out_dir / "best_val_loss.pt")
    assert checkpoint["model_args"]["vocab_size"] == 4096  # the tokenizer's, padded to a multiple of 64
    assert checkpoint["tokenizer"]["sha256"] == sha and checkpoint["tokenizer"]["content"] == bpe.read_text()
    # bits per byte: nats per token over ln 2, times the val targets' tokens per byte of their text
    from tokenizers import Tokenizer
    val = np.array(open_shard(next(out_dir.parent.parent.glob("bpe_shards*/shards/local_val_000000.bin"))))
    targets = val[1:1 + 2 * 4 * 32]  # --eval_iters 2 batches of 4 x 32, from the start of the val data
    text_bytes = len(Tokenizer.from_file(str(bpe)).decode(targets.tolist(), skip_special_tokens=True).encode())
    evaluations = [m for m in read_metrics(out_dir) if "val_loss" in m]
    assert len(evaluations) == 3
    for m in evaluations:
        assert m["val_bpb"] == pytest.approx(m["val_loss"] * len(targets) / text_bytes / math.log(2), rel=1e-9)
        assert f"val loss {m['val_loss']:.4f} | val bpb {m['val_bpb']:.4f}" in result.stdout


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_bits_per_byte_count_the_val_texts_bytes_where_a_batch_ends_inside_a_character(kind, bpe):
    """Val batches cut the tokens anywhere, between the bytes of one character too; each token's bytes are counted,
    so the bytes are the val text's, end-of-text tokens none (decoded batch by batch, a cut character was counted
    as U+FFFD's 3 bytes)."""
    from evaluation import val_batch_positions, val_tokens_per_byte
    tokenizer = load_tokenizer() if kind == "gpt2" else load_tokenizer(str(bpe))
    documents = ["Ærø: naïve café, 東京 😀!\n" * 20, "Über 🦜 ¡sí! Ωμέγα\n" * 20]
    for span in (5, 7, 11):
        tokens = [tokenizer.eot, *tokenizer.encode(documents[0]), tokenizer.eot, *tokenizer.encode(documents[1])]
        dots = 0
        while (len(tokens) - 1) % span:  # whole spans to the end: "." is one token (one byte) in any byte-level BPE
            tokens, dots = tokens + tokenizer.encode("."), dots + 1
        sources = [("val", np.array(tokens, dtype=np.uint16))]
        positions = val_batch_positions(sources, 1, span, 10**6)
        batches = [tokens[1 + start:1 + start + span] for _, start in positions]
        assert sum(map(len, batches)) == len(tokens) - 1 and any("\ufffd" in tokenizer.decode(b) for b in batches)
        text_bytes = len("".join(documents).encode("utf-8")) + dots
        assert val_tokens_per_byte(sources, positions, span, tokenizer) == (len(tokens) - 1) / text_bytes


def test_bits_per_byte_count_no_bytes_for_an_unknown_token(tmp_path):
    """A word-level tokenizer's [UNK] stands for a word it does not keep: none of its bytes are known, and the five
    of the name "[UNK]" are not the data's."""
    words = big_vocabulary(tmp_path / "words.json", ["the", "cat", "sat"])
    tokenizer = load_tokenizer(str(words))
    ids = np.array(tokenizer.encode("the cat sat on the mat"))
    assert (ids == tokenizer.backend.token_to_id("[UNK]")).sum() == 2
    assert tokenizer.text_bytes(ids) == len("the cat sat the") and tokenizer.text_bytes([tokenizer.eot]) == 0


def test_it_resumes_exactly(bpe, shards, bpe_run, tmp_path):
    out_dir = tmp_path / "out"
    args = [*TINY, "--data", shards, "--tokenizer", bpe, "--out_dir", out_dir, "--eval_interval", "3"]
    assert train_in_process(*args, "--max_iters", "3").returncode == 0
    resumed = train_in_process("--init_from", "resume", "--out_dir", out_dir, "--max_iters", "6")
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(out_dir) == train_losses(bpe_run[0])
    assert eval_records(out_dir) == eval_records(bpe_run[0])
    # a run keeps the tokenizer its model reads
    refused = train_in_process("--init_from", "resume", "--out_dir", out_dir, "--max_iters", "9",
                               "--tokenizer", "gpt2")
    sha = hashlib.sha256(bpe.read_bytes()).hexdigest()[:12]
    assert (f"reads the tokens of tokenizer.json (sha256 {sha}), not of --tokenizer gpt2 (sha256 "
            f"{load_tokenizer().sha256[:12]}): drop --tokenizer") in one_line_error(refused)


def test_eval_only_and_hellaswag_score_it_with_its_tokenizer(bpe_run, tmp_path):
    out_dir, _ = bpe_run
    last = [m for m in read_metrics(out_dir) if "val_loss" in m][-1]
    checkpoint = next(out_dir.glob("iter-6-*.pt"))
    result = train_in_process("--init_from", checkpoint, "--eval_only", "True", "--out_dir", tmp_path / "eval",
                              "--hellaswag", "True", "--hellaswag_data", hellaswag_file(tmp_path))
    assert result.returncode == 0, result.stderr
    record = read_metrics(tmp_path / "eval")[-1]
    assert (record["val_loss"], record["val_bpb"]) == (last["val_loss"], last["val_bpb"])  # the same val batches
    assert record["hellaswag_n"] == len(HELLASWAG_ITEMS) and 0 <= record["hellaswag_acc_norm"] <= 1
    assert f"val loss {last['val_loss']:.4f} over 2 batches | val bpb {last['val_bpb']:.4f}" in result.stdout


def test_sample_py_samples_in_its_tokens(bpe, bpe_run):
    checkpoint = bpe_run[0] / "best_val_loss.pt"
    out = io.StringIO()
    sample.sample(sample.SampleConfig(init_from=str(checkpoint), start="ROMEO:", num_samples=1, max_new_tokens=24,
                                      seed=3, device="cpu", dtype="float32"), out=out)
    # what the sampling loop draws from the model, decoded by `tokenizers` itself
    from tokenizers import Tokenizer
    theirs, model = Tokenizer.from_file(str(bpe)), load_start(str(checkpoint), ".")[0]
    idx = torch.tensor([theirs.encode("ROMEO:").ids])
    new = generate_tokens(lambda context: model(context)[0], idx, 24, 32, temperature=0.8, top_k=50,
                          vocab_limit=4096, generator=torch.Generator().manual_seed(3))
    ids = torch.cat(list(new), dim=1)[0].tolist()
    assert theirs.token_to_id("<|endoftext|>") in ids  # shown, as GPT-2's samples show it
    expected = "ROMEO:" + theirs.decode(ids, skip_special_tokens=False) + "\n---------------\n"
    assert out.getvalue() == expected


@pytest.fixture(scope="module")
def bpe_export(bpe_run, tmp_path_factory):
    """The run's best checkpoint exported to transformers."""
    folder = tmp_path_factory.mktemp("bpe_export") / "hf"
    result = train_in_process("--init_from", bpe_run[0] / "best_val_loss.pt", "--export_hf", folder)
    assert result.returncode == 0, result.stderr
    return folder


def test_the_export_carries_the_tokenizer_to_transformers_and_hellaswag_py(bpe, bpe_run, bpe_export, tmp_path):
    out_dir, folder = bpe_run[0], bpe_export
    from transformers import AutoTokenizer, GPT2LMHeadModel
    text = DOCUMENTS[7]
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == load_tokenizer(str(bpe)).encode(text)
    hf, ours = GPT2LMHeadModel.from_pretrained(folder).eval(), load_start(str(out_dir / "best_val_loss.pt"), ".")[0]
    assert hf.config.vocab_size == 4096 and hf.config.eos_token_id == load_tokenizer(str(bpe)).eot
    idx = torch.tensor([load_tokenizer(str(bpe)).encode(text)[:32]])
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max() < 1e-4
    scored = run_main("hellaswag.py", "--init_from", folder, "--data", hellaswag_file(tmp_path), "--device", "cpu")
    assert scored.returncode == 0, scored.stderr
    assert f"n {len(HELLASWAG_ITEMS)} | {folder}" in scored.stdout


def test_the_export_is_known_by_the_runs_tokenizer_so_it_trains_scores_samples_and_exports_on_its_shards(
        bpe, shards, bpe_run, bpe_export, tmp_path):
    """transformers rewrites a tokenizer.json as it saves it; the export puts the run's file back, so the folder's
    tokenizer is the run's by its sha256, and the shards made with that file go with it, --tokenizer or not."""
    sha = hashlib.sha256(bpe.read_bytes()).hexdigest()
    assert (bpe_export / "tokenizer.json").read_bytes() == bpe.read_bytes()
    best = load_checkpoint(bpe_run[0] / "best_val_loss.pt")["val_loss"]
    for given in ([], ["--tokenizer", bpe]):
        scored = train_in_process(*TINY, "--init_from", bpe_export, "--data", shards, "--eval_only", "True",
                                  "--out_dir", tmp_path / f"eval{len(given)}", *given)
        assert scored.returncode == 0, scored.stderr
        assert read_metrics(tmp_path / f"eval{len(given)}")[-1]["val_loss"] == pytest.approx(best, abs=1e-4)
    tuned = train_in_process(*TINY, "--init_from", bpe_export, "--data", shards, "--out_dir", tmp_path / "tune",
                             "--max_iters", "2", "--eval_interval", "2")
    assert tuned.returncode == 0, tuned.stderr
    assert load_checkpoint(tmp_path / "tune" / "best_val_loss.pt")["tokenizer"]["sha256"] == sha
    config = json.loads((tmp_path / "tune" / "config.json").read_text())
    assert config["tokenizer"] == str(bpe_export / "tokenizer.json")
    again = train_in_process("--init_from", bpe_export, "--export_hf", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == bpe.read_bytes()
    out = io.StringIO()
    sample.sample(sample.SampleConfig(init_from=str(bpe_export), start="ROMEO:", num_samples=1, max_new_tokens=8,
                                      device="cpu", dtype="float32"), out=out)
    assert out.getvalue().startswith("ROMEO:")


def test_a_tokenizer_other_than_the_models_is_refused_in_one_line_before_anything_is_written(bpe, bpe_export,
                                                                                              trained_run, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    bare = tmp_path / "gpt2"  # save_pretrained's weights without a tokenizer: GPT-2's
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(bare)
    checkpoint, folder = trained_run[0] / "best_val_loss.pt", "(its folder's tokenizer file; GPT-2's where it has none)"
    run = ["--data", INPUT_TXT, "--out_dir", tmp_path / "out", "--max_iters", "2", "--device", "cpu"]
    for model, given, whose in ((bare, bpe, f"--init_from {bare} {folder}"),
                                (bpe_export, "gpt2", f"--init_from {bpe_export} {folder}"),
                                (checkpoint, bpe, f"the model of {checkpoint}")):
        theirs = model_tokenizer(model).record()  # a checkpoint of GPT-2's: no folder, GPT-2's
        reads = (f"error: {whose} reads the tokens of {describe_tokenizer(theirs)}, not of --tokenizer "
                 f"{describe_tokenizer(load_tokenizer(str(given)).record())}: drop --tokenizer (a model keeps its "
                 "tokenizer)")
        for command in (run, [*run, "--eval_only", "True"], ["--export_hf", tmp_path / "hf"]):
            assert one_line_error(train_in_process("--init_from", model, "--tokenizer", given, *command)) == reads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_the_shards_are_refused_to_a_gpt2_checkpoint(shards, trained_run, tmp_path):
    checkpoint = trained_run[0] / "best_val_loss.pt"  # GPT-2's tokenizer, trained on input.txt
    for extra in (["--out_dir", tmp_path / "branch", "--max_iters", "10"], ["--eval_only", "True"]):
        line = one_line_error(train_in_process("--init_from", checkpoint, "--data", shards, *extra))
        assert f"{shards} holds shards of the tokenizer" in line and "this run's is gpt2 (sha256" in line, line
    assert not (tmp_path / "branch").exists()


def test_fineweb_over_them_with_another_tokenizer_is_refused_or_told_to_start_afresh(bpe, shards, tmp_path):
    shutil.copytree(shards.parent, tmp_path, dirs_exist_ok=True)  # the jsonl and its shards, times kept
    args = ["--data_files", "docs.jsonl", "--out_dir", "shards", "--shard_size", "20000", "--val_tokens", "20000",
            "--num_proc", "1"]
    line = one_line_error(run_main("fineweb.py", *args, cwd=tmp_path))  # GPT-2's tokenizer, the default
    assert f"holds shards of the tokenizer {bpe} (sha256" in line and "--restart True" in line, line
    same = run_main("fineweb.py", *args, "--tokenizer", bpe, cwd=tmp_path)
    assert same.returncode == 0 and "nothing to do" in same.stdout, same.stderr
    restarted = run_main("fineweb.py", *args, "--restart", "True", cwd=tmp_path)
    assert restarted.returncode == 0, restarted.stderr
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == load_tokenizer().sha256 and manifest["tokenizer"]["path"] == "gpt2"


def test_a_text_file_as_data_is_tokenized_with_the_runs_tokenizer(bpe, tmp_path):
    tokenizer = load_tokenizer(str(bpe))
    (name, train), = load_token_sources(INPUT_TXT, "train", tokenizer)
    whole = tokenizer.encode(INPUT_TXT.read_text(encoding="utf-8"))
    assert train.tolist() == whole[:int(0.9 * len(whole))]
    result = train_in_process(*TINY, "--data", INPUT_TXT, "--tokenizer", bpe, "--out_dir", tmp_path / "out",
                              "--max_iters", "2", "--eval_interval", "2")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(tmp_path / "out" / "best_val_loss.pt")["model_args"]["vocab_size"] == 4096


def test_a_tiktoken_ranks_file_is_a_tokenizer_and_exports_as_gpt2s_files(tmp_path):
    """GPT-2's first 2,000 merges: a BPE of its own, split by GPT-2's pattern, <|endoftext|> after the last."""
    ranks = tmp_path / "small.tiktoken"
    ranks.write_bytes(b"".join((REPO / "gpt2.tiktoken").read_bytes().splitlines(keepends=True)[:2000]))
    tokenizer = load_tokenizer(str(ranks))
    assert (tokenizer.eot, tokenizer.n_vocab) == (2000, 2001) and tokenizer.sha256 != load_tokenizer().sha256
    text = DOCUMENTS[3]
    ids = tokenizer.encode(text)
    assert max(ids) < 2000 and tokenizer.decode(ids) == text and len(ids) > len(load_tokenizer().encode(text))
    (tmp_path / "hf").mkdir()
    save_hf_tokenizer(tmp_path / "hf", 64, tokenizer)
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] == ids


def big_vocabulary(path, words):
    """A tokenizers JSON file of 70,000 ids: words at ids past 65,536, the rest fillers; whitespace splits."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"<{i}>": i for i in range(2, 70_000 - len(words))}}
    vocab.update({word: 70_000 - len(words) + i for i, word in enumerate(words)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(path))
    return path


def test_a_vocabulary_past_65536_ids_is_written_in_4_byte_tokens_and_trained_on(tmp_path):
    documents = DOCUMENTS[:300]
    words = sorted({word for doc in documents for word in doc.split()})
    vocab = big_vocabulary(tmp_path / "big.json", words)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    result = run_main("fineweb.py", "--data_files", "docs.jsonl", "--out_dir", "shards", "--tokenizer", vocab,
                      "--shard_size", "1024", "--val_tokens", "1024", "--num_proc", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    paths = sorted((tmp_path / "shards").glob("*.bin"))
    assert all(read_shard_header(p)[1] == np.dtype("<u4") for p in paths)
    assert np.fromfile(paths[0], dtype="<i4", count=3)[1] == 2  # llm.c's version of 4-byte tokens
    tokens = np.concatenate([np.array(open_shard(p)) for p in sorted(paths, key=lambda p: p.name[-10:])])
    assert tokens.max() >= 2**16 and len(tokens) == sum(len(d.split()) + 1 for d in documents)
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["shard_format"] == [20240520, 2]
    trained = train_in_process(*TINY, "--data", tmp_path / "shards", "--tokenizer", vocab, "--out_dir",
                               tmp_path / "out", "--max_iters", "2", "--eval_interval", "2")
    assert trained.returncode == 0, trained.stderr
    assert load_checkpoint(tmp_path / "out" / "best_val_loss.pt")["model_args"]["vocab_size"] == 70_016


def test_a_tokenizer_file_that_is_none_is_refused_in_one_line(tmp_path):
    (tmp_path / "notes.json").write_text('{"not": "a tokenizer"}')
    (tmp_path / "noeot.json").write_text(load_tokenizer_without_eot())
    for name, needle in (("notes.json", "is neither a tiktoken ranks file nor a tokenizers JSON file"),
                         ("noeot.json", "none of the end-of-text tokens"), ("missing.json", "cannot be read")):
        result = train_in_process(*TINY, "--data", INPUT_TXT, "--tokenizer", tmp_path / name, "--out_dir",
                                  tmp_path / "out")
        assert needle in one_line_error(result), name
    assert not (tmp_path / "out").exists()


def load_tokenizer_without_eot():
    from tokenizers import Tokenizer, models
    return Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str()


def test_a_checkpoint_from_before_tokenizers_were_recorded_is_gpt2s(trained_run, tmp_path):
    checkpoint = load_checkpoint(trained_run[0] / "best_val_loss.pt")
    del checkpoint["tokenizer"], checkpoint["path"]
    torch.save(checkpoint, tmp_path / "iter-8-loss-1.0000.pt")
    loaded = load_checkpoint(tmp_path / "iter-8-loss-1.0000.pt")
    assert loaded["tokenizer"] is None
    result = train_in_process("--init_from", tmp_path / "iter-8-loss-1.0000.pt", "--eval_only", "True")
    assert result.returncode == 0, result.stderr
    assert dataclasses.asdict(load_start(str(tmp_path / "iter-8-loss-1.0000.pt"), ".")[0].config)["vocab_size"] == 50304
