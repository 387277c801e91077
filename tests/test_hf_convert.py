"""hf_convert.py: GPT-2 weights between our GPT and transformers': in (from_pretrained, --init_from), out
(--export_hf, and the transformers model that sample.py and hellaswag.py run a checkpoint as). Offline: a
randomly initialized transformers GPT-2 saved to a temporary folder stands in for OpenAI's."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from fineweb import load_tokenizer
from checkpoint import load_checkpoint
from cli import UserError
from hf_convert import export_hf
from evaluation import val_batch_positions
from fineweb import load_token_sources
from train_gpt2 import GPT, load_start
from conftest import INPUT_TXT, TINY, read_metrics, run_train, train_in_process

transformers = pytest.importorskip("transformers")

N_VOCAB = 50257


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random transformers GPT-2, as save_pretrained writes it."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=N_VOCAB)
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def hf_model(folder):
    return transformers.GPT2LMHeadModel.from_pretrained(folder).eval()


def our_model(checkpoint):
    return load_start(str(checkpoint), ".")[0]


def export(checkpoint, folder):
    model = our_model(checkpoint)
    return export_hf(dataclasses.asdict(model.config), model.state_dict(), folder, load_tokenizer())


@torch.no_grad()
def assert_same_logits(ours, theirs, block_size):
    idx = torch.randint(0, N_VOCAB, (2, block_size), generator=torch.Generator().manual_seed(0))
    diff = (ours(idx)[0][..., :N_VOCAB] - theirs(idx).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_from_pretrained_gives_the_logits_of_transformers(hf_folder):
    ours, theirs = GPT.from_pretrained(str(hf_folder)).eval(), hf_model(hf_folder)
    assert (ours.config.block_size, ours.config.n_layer, ours.config.n_embd) == (64, 2, 64)
    assert ours.config.vocab_size == N_VOCAB and ours.lm_head.weight is ours.transformer.wte.weight
    assert_same_logits(ours, theirs, 64)
    # the vocabulary is left unpadded, so the loss is transformers' own, not an approximation of it
    idx = torch.randint(0, N_VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        our_loss = ours(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())[1].item()
        their_loss = theirs(idx, labels=idx).loss.item()
    assert our_loss == pytest.approx(their_loss, abs=1e-5)


def test_export_of_a_trained_checkpoint_loads_in_transformers(trained_run, tmp_path):
    run_dir, _ = trained_run
    checkpoint, folder = run_dir / "best_val_loss.pt", tmp_path / "exports" / "hf"
    # no data is needed to export: --data points nowhere
    result = train_in_process("--init_from", checkpoint, "--export_hf", folder, "--data", tmp_path / "no-data")
    assert result.returncode == 0, result.stderr
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                                   "tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                   "merges.txt"}
    assert [p.name for p in folder.parent.iterdir()] == ["hf"]  # no temporary folder left beside it
    config = json.loads((folder / "config.json").read_text())
    assert (config["vocab_size"], config["n_positions"], config["n_layer"]) == (N_VOCAB, 32, 2)
    assert config["tie_word_embeddings"] and config["activation_function"] == "gelu_new"
    assert_same_logits(our_model(checkpoint), hf_model(folder), 32)
    text = INPUT_TXT.read_text()[:3000] + " caf\u00e9 \u65e5\u672c \U0001f916<|endoftext|>"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer(text)["input_ids"] == load_tokenizer().encode_prompt(text)
    with pytest.raises(UserError, match="already exists: remove it or pass a new folder"):
        export(checkpoint, folder)  # a second export never overwrites the first


def test_the_readmes_pipeline_line_generates_from_an_export_with_a_short_context(trained_run, tmp_path):
    checkpoint = trained_run[0] / "best_val_loss.pt"
    folder = export(checkpoint, tmp_path / "hf")  # a context of 32 tokens
    # the README's line; unbounded, the pipeline's default of 256 new tokens indexed past the 32 positions
    generated = transformers.pipeline("text-generation", str(folder))("Hello,")[0]["generated_text"]
    assert generated.startswith("Hello,")
    assert json.loads((folder / "generation_config.json").read_text())["max_length"] == 32


def test_a_folder_with_gpt2s_ranks_or_gpt2s_tokenizer_json_reads_gpt2s_tokens(trained_run, tmp_path):
    """The export of a GPT-2 run carries the ranks file as it is; a folder of transformers' files alone (OpenAI's,
    or a save_pretrained elsewhere) has GPT-2's tokenizer.json, known by its vocabulary and merges. Either is
    GPT-2's: its shards go with it, and --tokenizer gpt2 is its own."""
    from conftest import REPO
    from fineweb import make_tokenizer
    from hf_convert import is_gpt2s, model_tokenizer
    folder = tmp_path / "hf"
    export(trained_run[0] / "best_val_loss.pt", folder)
    assert (folder / "tokenizer.tiktoken").read_bytes() == (REPO / "gpt2.tiktoken").read_bytes()
    assert model_tokenizer(str(folder)) is load_tokenizer()
    (folder / "tokenizer.tiktoken").unlink()
    assert model_tokenizer(str(folder)) is load_tokenizer()
    result = train_in_process(*TINY, "--init_from", folder, "--tokenizer", "gpt2", "--eval_only", "True",
                              "--data", INPUT_TXT, "--out_dir", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    # the run's val loss, but for the padded rows of its vocabulary, which the export leaves out of the softmax
    assert read_metrics(tmp_path / "eval")[-1]["val_loss"] == pytest.approx(
        load_checkpoint(trained_run[0] / "best_val_loss.pt")["val_loss"], abs=1e-2)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["merges"][:2] = spec["model"]["merges"][1::-1]  # two merges in the other order: another BPE
    assert not is_gpt2s(make_tokenizer("tokenizer.json", json.dumps(spec).encode()))


def test_an_architecture_transformers_cannot_hold_is_refused_naming_the_field(trained_run, tmp_path, monkeypatch):
    import train_gpt2
    from dataclasses import dataclass

    @dataclass
    class WithMLPWidth(train_gpt2.GPTConfig):  # a researcher's new field, past GPT-2's shape
        mlp_width: int = 4

    @dataclass
    class TrainConfigWithMLPWidth(WithMLPWidth, train_gpt2.TrainConfig):
        pass  # what TrainConfig becomes when the field is written into GPTConfig

    checkpoint = torch.load(trained_run[0] / "best_val_loss.pt", weights_only=True)
    checkpoint["model_args"]["mlp_width"] = 3
    torch.save(checkpoint, tmp_path / "wide.pt")
    monkeypatch.setattr(train_gpt2, "GPTConfig", WithMLPWidth)
    monkeypatch.setattr(train_gpt2, "TrainConfig", TrainConfigWithMLPWidth)
    with pytest.raises(UserError, match="transformers' GPT-2 has no mlp_width 3 .GPT-2's is 4.: only GPT-2's"):
        train_gpt2.export(train_gpt2.parse_args(["--init_from", str(tmp_path / "wide.pt"),
                                                  "--export_hf", str(tmp_path / "hf")])[0])
    state = our_model(trained_run[0] / "best_val_loss.pt").state_dict()
    state["transformer.h.0.mlp.c_fc.weight"] = state["transformer.h.0.mlp.c_fc.weight"][:96]  # hidden 3C
    with pytest.raises(UserError, match="c_fc.weight is .96, 64., GPT-2's .256, 64..: only a model of GPT-2's"):
        export_hf(dataclasses.asdict(our_model(trained_run[0] / "best_val_loss.pt").config), state,
                  tmp_path / "hf", load_tokenizer())


def test_trainer_evaluates_and_fine_tunes_transformers_weights(hf_folder, tmp_path):
    common = [*TINY, "--block_size", "64", "--data", INPUT_TXT, "--init_from", hf_folder]
    result = train_in_process(*common, "--out_dir", tmp_path / "eval", "--eval_only", "True")
    assert result.returncode == 0, result.stderr
    (record,) = read_metrics(tmp_path / "eval")
    # transformers' own loss on the same val batches (batch_size 4, eval_iters 2 from TINY)
    sources, theirs = load_token_sources(INPUT_TXT, "val", load_tokenizer()), hf_model(hf_folder)
    losses = []
    for source, start in val_batch_positions(sources, 4, 64, 2):
        chunk = torch.from_numpy(np.array(sources[source][1][start:start + 4 * 64 + 1], dtype=np.int64))
        with torch.no_grad():
            logits = theirs(chunk[:-1].view(4, 64)).logits
        losses.append(torch.nn.functional.cross_entropy(logits.view(-1, N_VOCAB), chunk[1:]).item())
    assert record["step"] == 0 and record["val_loss"] == pytest.approx(np.mean(losses), abs=1e-5)

    # fine-tuning: the weights only, from step 0 with a fresh optimizer
    result = train_in_process(*common, "--out_dir", tmp_path / "tune", "--max_iters", "2",
                              "--eval_interval", "2")
    assert result.returncode == 0, result.stderr
    train = [m for m in read_metrics(tmp_path / "tune") if "train_loss" in m]
    assert [m["step"] for m in train] == [0, 1]
    val = [m for m in read_metrics(tmp_path / "tune") if "val_loss" in m]
    assert [m["step"] for m in val] == [0, 2] and val[0]["val_loss"] == pytest.approx(record["val_loss"])
    assert abs(train[0]["train_loss"] - record["val_loss"]) < 0.1  # it starts from the loaded weights
    assert next((tmp_path / "tune").glob("iter-2-*.pt")).is_file()


def test_bad_transformers_sources_get_one_line(tmp_path):
    # no network, an empty cache: read when the hub's library is imported, so in a process of its own
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = run_train("--init_from", "gpt2", "--export_hf", tmp_path / "out", env=env)
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    assert result.stderr.strip().splitlines() == [
        "error: could not load gpt2 from the Hugging Face hub (no network?): download it elsewhere and pass its "
        "folder to --init_from"]
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = train_in_process("--init_from", tmp_path / "llama", "--export_hf", tmp_path / "out")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "holds a 'llama' model, not GPT-2" in result.stderr


def test_a_folders_tokenizer_json_that_is_none_is_one_line_naming_init_from(hf_folder, tmp_path):
    import shutil
    from conftest import run_main
    folder = tmp_path / "model"
    shutil.copytree(hf_folder, folder)
    (folder / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    (tmp_path / "hs.jsonl").write_text('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}\n')
    for script, args in (("train_gpt2.py", [*TINY, "--data", INPUT_TXT, "--eval_only", "True"]),
                         ("sample.py", ["--device", "cpu", "--num_samples", "1"]),
                         ("hellaswag.py", ["--device", "cpu", "--data", tmp_path / "hs.jsonl"])):
        result = run_main(script, *args, "--init_from", folder)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: --init_from {folder}: its tokenizer.json is not a tokenizers JSON file "
                               "that works here (") and line.endswith("): pass a folder written by save_pretrained "
                                                                     "or --export_hf"), (script, line)


@pytest.mark.parametrize("kind", ["folder", "dangling"])
def test_an_export_to_a_link_is_refused_in_one_line(kind, trained_run, tmp_path):
    target = tmp_path / "target"
    if kind == "folder":
        target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(UserError, match=f"--export_hf {tmp_path / 'link'} is a symbolic link"):
        export(trained_run[0] / "best_val_loss.pt", tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["link"] + (["target"] if kind == "folder" else []))


def test_an_export_that_does_not_fit_the_disk_is_one_line_and_leaves_nothing(trained_run, tmpfs):
    disk = tmpfs(2 << 20)  # the tiny model's weights alone are 13 MB
    with pytest.raises(UserError) as error:
        export(trained_run[0] / "best_val_loss.pt", disk / "hf")
    assert str(error.value).startswith(f"--export_hf {disk / 'hf'} could not be written (")
    assert "No space left on device" in str(error.value) and "\n" not in str(error.value)
    assert list(disk.iterdir()) == []


EXPORTABLE = {"untied": dict(tie_embeddings=False), "no biases": dict(bias=False), "relu2": dict(mlp="relu2"),
              "zero-initialized projections": dict(zero_init_projections=True)}
NOT_EXPORTABLE = {"rotary": (dict(positions="rotary"), "positions 'rotary'"),
                  "rmsnorm": (dict(norm="rmsnorm"), "norm 'rmsnorm'"), "swiglu": (dict(mlp="swiglu"), "mlp 'swiglu'"),
                  "qk_norm": (dict(qk_norm=True), "qk_norm True"), "attn_scale": (dict(attn_scale=0.2), "attn_scale 0.2"),
                  "softcap": (dict(logit_softcap=15.0), "logit_softcap 15.0")}


def model_of(**options):
    from train_gpt2 import GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=N_VOCAB, n_layer=2, n_head=2, n_embd=64, **options))
    with torch.no_grad():  # a trained model's weights: zero-initialized ones no longer zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.mark.parametrize("option", EXPORTABLE)
def test_an_option_transformers_holds_exports_with_the_same_logits_and_comes_back(option, tmp_path):
    from hf_convert import export_model
    model = model_of(**EXPORTABLE[option])
    folder = export_model(model, tmp_path / "hf", load_tokenizer())
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] == (option != "untied")
    assert config["activation_function"] == ("relu2" if option == "relu2" else "gelu_new")
    assert_same_logits(model, hf_model(folder), 32)
    back = GPT.from_pretrained(str(folder)).eval()  # --init_from the export: the same model
    assert back.config.tie_embeddings == model.config.tie_embeddings and back.config.mlp == model.config.mlp
    assert_same_logits(back, hf_model(folder), 32)


@pytest.mark.parametrize("option", NOT_EXPORTABLE)
def test_an_option_transformers_cannot_hold_is_refused_naming_it(option, tmp_path):
    from hf_convert import export_model
    options, named = NOT_EXPORTABLE[option]
    with pytest.raises(UserError, match=f"transformers' GPT-2 has no {named} "):
        export_model(model_of(**options), tmp_path / "hf", load_tokenizer())
    assert not (tmp_path / "hf").exists()


def test_an_export_whose_logits_would_differ_is_refused(tmp_path, monkeypatch):
    import hf_convert
    from hf_convert import export_model
    monkeypatch.setitem(hf_convert.HF_ACTIVATIONS, "relu2", "relu")  # a wrong translation of an option
    with pytest.raises(UserError, match="transformers' GPT-2 gives logits .* away from this model's"):
        export_model(model_of(mlp="relu2"), tmp_path / "hf", load_tokenizer())
    assert not (tmp_path / "hf").exists()
