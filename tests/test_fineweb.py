"""
Tests of fineweb.py, on the CPU and offline: the tokenizer, shards made from local parquet/jsonl/txt files
decoding back to the documents, a killed run resumed into the same bytes, a rerun over changed input
files refused, the trainer reading the result, and one-line errors for bad input. The corpus is
input.txt (tiny Shakespeare) cut into documents at blank lines.

    python -m pytest -q tests/test_fineweb.py
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fineweb import (ShardPlan, ShardWriter, describe_read_error, input_record, load_tokenizer,  # noqa: E402
                     open_shard, parse_args, read_shard_header)

GPT2 = load_tokenizer()
EOT_TOKEN = GPT2.eot

SMALL = ["--shard_size", "20000", "--val_tokens", "20000", "--num_proc", "2"]
TINY = ["--shard_size", "2000", "--val_tokens", "2000", "--num_proc", "1"]


def shakespeare_documents():
    return (REPO / "input.txt").read_text(encoding="utf-8").split("\n\n")


def write_parquet(path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path, row_group_size=1000)


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")


def fineweb(*args, cwd, env=None, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "fineweb.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tokenize_document(text):
    """A document's tokens in a shard: the end-of-text token, then its text's."""
    return np.array([EOT_TOKEN, *GPT2.encode(text)], dtype=np.uint16)


def shard_paths(out_dir):
    return sorted(Path(out_dir).glob("*.bin"), key=lambda p: p.name.split("_")[-1])  # by index


def all_tokens(out_dir):
    return np.concatenate([np.array(open_shard(p)) for p in shard_paths(out_dir)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """input.txt's documents as two parquet files and one jsonl file."""
    root = tmp_path_factory.mktemp("corpus")
    docs = shakespeare_documents()
    half = len(docs) // 2
    write_parquet(root / "part-0.parquet", docs[:half])
    write_parquet(root / "part-1.parquet", docs[half:])
    write_jsonl(root / "docs.jsonl", docs)
    return root, docs


@pytest.fixture(scope="module")
def parquet_shards(corpus, tmp_path_factory):
    root, _ = corpus
    cwd = tmp_path_factory.mktemp("parquet_run")
    result = fineweb("--data_files", root / "part-*.parquet", "--out_dir", "shards", *SMALL, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "shards"


# -----------------------------------------------------------------------------
# The tokenizer and the module


def test_tokenizer_matches_gpt2():
    assert GPT2.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert len(GPT2.encode((REPO / "input.txt").read_text(encoding="utf-8"))) == 338_025
    assert (GPT2.eot, GPT2.n_vocab) == (50256, 50257)
    assert GPT2.encode("<|endoftext|>") != [EOT_TOKEN] and GPT2.encode_prompt("<|endoftext|>") == [EOT_TOKEN]


def test_import_does_no_work(tmp_path):
    modules = "('datasets', 'tqdm', 'torch', 'pyarrow', 'multiprocessing.pool', 'tiktoken', 'tokenizers')"
    code = f"import sys, fineweb; print(sorted(m for m in {modules} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and result.stdout == "[]\n" and result.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_help_lists_every_flag_with_its_default(tmp_path):
    result = fineweb("--help", cwd=tmp_path)
    assert result.returncode == 0
    for name in ("dataset", "name", "data_files", "text_column", "tokenizer", "out_dir", "shard_size", "val_tokens",
                 "max_tokens", "num_proc", "restart"):
        assert f"--{name}" in result.stdout
    text = " ".join(result.stdout.split())  # as argparse wraps it at any word
    assert "(default: HuggingFaceFW/fineweb-edu)" in text and "(default: 100000000)" in text


# -----------------------------------------------------------------------------
# Shards from local files


def test_shards_decode_to_the_documents(parquet_shards, corpus):
    _, docs = corpus
    paths = shard_paths(parquet_shards)
    assert [p.name for p in paths[:2]] == ["local_val_000000.bin", "local_train_000001.bin"]
    assert [int(p.stem.split("_")[-1]) for p in paths] == list(range(len(paths)))

    tokens = all_tokens(parquet_shards)
    assert np.array_equal(tokens, np.concatenate([tokenize_document(d) for d in docs]))
    starts = np.flatnonzero(tokens == EOT_TOKEN)
    assert starts[0] == 0 and len(starts) == len(docs)
    assert [GPT2.decode(piece[1:].tolist()) for piece in np.split(tokens, starts[1:])] == docs


def test_counts_add_up(parquet_shards, corpus):
    _, docs = corpus
    manifest = json.loads((parquet_shards / "manifest.json").read_text())
    paths = shard_paths(parquet_shards)
    sizes = [read_shard_header(p)[0] for p in paths]
    assert manifest["complete"] and [s["name"] for s in manifest["shards"]] == [p.name for p in paths]
    assert [s["tokens"] for s in manifest["shards"]] == sizes
    assert sizes[0] == 20000 == manifest["tokens"]["val"]
    assert all(s == 20000 for s in sizes[1:-1]) and 0 < sizes[-1] <= 20000
    assert sum(sizes) == manifest["tokens"]["total"] == sum(len(tokenize_document(d)) for d in docs)
    assert manifest["documents"] == len(docs) == sum(s["documents"] for s in manifest["shards"])
    assert manifest["shards"][-1]["end"] == [len(docs), 0]
    assert len(manifest["source"]["data_files"]) == 2 and manifest["shard_size"] == 20000


def test_jsonl_gives_the_same_shards(parquet_shards, corpus, tmp_path):
    root, _ = corpus
    result = fineweb("--data_files", root / "docs.jsonl", "--out_dir", "shards", *SMALL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in shard_paths(tmp_path / "shards")] == [p.name for p in shard_paths(parquet_shards)]
    for ours, theirs in zip(shard_paths(tmp_path / "shards"), shard_paths(parquet_shards)):
        assert ours.read_bytes() == theirs.read_bytes(), ours.name


def test_files_as_separate_words_make_the_same_shards_as_the_comma_joined_list(parquet_shards, corpus, tmp_path):
    """An unquoted glob reaches the script as one word per file."""
    root, _ = corpus
    parts = [root / "part-0.parquet", root / "part-1.parquet"]
    result = fineweb("--data_files", *parts, "--out_dir", "shards", *SMALL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in shard_paths(tmp_path / "shards")] == [p.name for p in shard_paths(parquet_shards)]
    for ours, theirs in zip(shard_paths(tmp_path / "shards"), shard_paths(parquet_shards)):
        assert ours.read_bytes() == theirs.read_bytes(), ours.name
    # the same settings: the comma-joined list finds the directory complete
    result = fineweb("--data_files", ",".join(map(str, parts)), "--out_dir", "shards", *SMALL, cwd=tmp_path)
    assert result.returncode == 0 and "nothing to do" in result.stdout, result.stderr


def test_only_data_files_takes_several_words(capsys):
    assert parse_args(["--data_files", "a.parquet", "b.parquet", "--num_proc", "3"]).data_files == "a.parquet,b.parquet"
    assert parse_args(["--data_files=a.parquet", "b.parquet"]).data_files == "a.parquet,b.parquet"
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--out_dir", "a", "b"])
    assert stopped.value.code == 2 and "unrecognized arguments: b" in capsys.readouterr().err


def test_each_txt_file_is_one_document(tmp_path):
    texts = ["First file.\n\nStill the first.\n", "Second file, " * 5000]
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text, encoding="utf-8")
    result = fineweb("--data_files", "doc*.txt", "--out_dir", "shards", "--shard_size", "2000", "--val_tokens", "2000",
                     "--num_proc", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tokens = all_tokens(tmp_path / "shards")
    assert np.array_equal(tokens, np.concatenate([tokenize_document(t) for t in texts]))


def test_local_files_get_a_tenth_of_their_tokens_as_val_split(tmp_path):
    """The Hub's default of 100M val tokens would overrun any small file."""
    docs = shakespeare_documents()[:1000]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    result = fineweb("--data_files", "docs.jsonl", "--out_dir", "shards", "--shard_size", "2000",
                     "--num_proc", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    val, total = manifest["val_tokens"], sum(len(tokenize_document(d)) for d in docs)
    assert f"val split: {val:,} tokens, a tenth of the ~" in result.stdout
    assert manifest["tokens"]["val"] == val and 0.05 < val / total < 0.15
    assert shard_paths(tmp_path / "shards")[0].name == "local_val_000000.bin"


def test_a_rerun_keeps_the_val_split_it_chose(tmp_path):
    """The split follows from the files alone, not --max_tokens: a rerun that goes on from a quick subset to
    all of the files splits where the subset did, and resumes."""
    docs = shakespeare_documents()[:1000]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    args = ["--data_files", "docs.jsonl", "--out_dir", "shards", "--shard_size", "2000", "--num_proc", "1"]
    first = fineweb(*args, "--max_tokens", "20000", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    val = json.loads((tmp_path / "shards" / "manifest.json").read_text())["val_tokens"]
    assert f"val split: {val:,} tokens, a tenth of the ~" in first.stdout and 0 < val < 20000
    again = fineweb(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"val split: {val:,} tokens" in again.stdout and "resuming after" in again.stdout
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["val_tokens"] == manifest["tokens"]["val"] == val
    assert np.array_equal(all_tokens(tmp_path / "shards"),
                          np.concatenate([tokenize_document(d) for d in docs]))


def test_max_tokens_takes_a_prefix(parquet_shards, corpus, tmp_path):
    root, _ = corpus
    result = fineweb("--data_files", root / "part-*.parquet", "--out_dir", "shards", "--max_tokens", "50000", *SMALL,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [read_shard_header(p)[0] for p in shard_paths(tmp_path / "shards")] == [20000, 20000, 10000]
    assert np.array_equal(all_tokens(tmp_path / "shards"), all_tokens(parquet_shards)[:50000])


def test_complete_run_is_left_alone_and_other_settings_refused(parquet_shards, corpus):
    root, _ = corpus
    before = {p.name: p.stat().st_mtime_ns for p in shard_paths(parquet_shards)}
    result = fineweb("--data_files", root / "part-*.parquet", "--out_dir", parquet_shards, *SMALL, cwd=root)
    assert result.returncode == 0 and "nothing to do" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in shard_paths(parquet_shards)} == before
    result = fineweb("--data_files", root / "part-*.parquet", "--out_dir", parquet_shards, "--shard_size", "30000",
                     "--val_tokens", "20000", cwd=root)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "shard_size" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


NULLS = (3, 50, 700)  # in the first batch of 512 documents and in the second


def documents_with_nulls():
    """1000 documents of input.txt, those at NULLS without text."""
    return [None if i in NULLS else doc for i, doc in enumerate(shakespeare_documents()[:1000])]


def null_warnings(stderr):
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_null_texts_are_written_as_empty_documents_and_counted(kind, tmp_path):
    docs = documents_with_nulls()
    if kind == "parquet":
        write_parquet(tmp_path / "docs.parquet", docs)
    else:
        rows = [{"text": doc} for doc in docs]
        rows[NULLS[1]] = {"title": "no text field at all"}  # a .jsonl row without the column is a null too
        (tmp_path / "docs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = fineweb("--data_files", f"docs.{kind}", "--out_dir", "shards", "--shard_size", "2000",
                     "--val_tokens", "2000", "--num_proc", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert null_warnings(result.stderr) == ["warning: 3 documents had no text (null) in column 'text'; they were "
                                            "written as empty documents"]
    assert np.array_equal(all_tokens(tmp_path / "shards"), np.concatenate([tokenize_document(d or "") for d in docs]))


def test_null_texts_past_max_tokens_are_not_counted(tmp_path):
    docs = documents_with_nulls()
    write_parquet(tmp_path / "docs.parquet", docs)
    up_to_600 = sum(len(tokenize_document(d or "")) for d in docs[:600])  # into the second batch, before a null
    result = fineweb("--data_files", "docs.parquet", "--out_dir", "shards", "--shard_size", "2000",
                     "--val_tokens", "2000", "--max_tokens", up_to_600, "--num_proc", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert null_warnings(result.stderr) == ["warning: 2 documents had no text (null) in column 'text'; they were "
                                            "written as empty documents"]


# -----------------------------------------------------------------------------
# Resuming


class NoBar:
    def reset(self, total=None): pass
    def set_description(self, text): pass
    def update(self, n): pass


def test_writer_resumes_from_any_shard_end(tmp_path):
    """Shards of 7 tokens over documents of 1 to 12 tokens (every boundary case): resuming from the end of
    any shard, skipping the documents it records, writes the same shards as one pass."""
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[EOT_TOKEN], rng.integers(0, 50000, n)]).astype(np.uint16) for n in rng.integers(0, 12, 30)]
    plan = ShardPlan("test", shard_size=7, val_tokens=10)

    def write(out_dir, records):
        out_dir.mkdir()
        writer = ShardWriter(out_dir, plan, GPT2, sys.maxsize, records, lambda r: None, NoBar())
        skip = records[-1]["end"][0] if records else 0
        for i in range(skip, len(docs), 5):
            batch = docs[i:i + 5]
            writer.add(np.concatenate(batch), np.array([len(d) for d in batch]))
        return writer.finish()

    full = write(tmp_path / "full", [])
    expected = np.concatenate(docs)
    assert np.array_equal(all_tokens(tmp_path / "full"), expected)
    assert {r["end"][1] == 0 for r in full[:-1]} == {True, False}  # shards that end between and within documents
    for k in range(1, len(full)):
        out_dir = tmp_path / f"from{k}"
        records = write(out_dir, full[:k])
        assert records == full
        assert all(np.array_equal(open_shard(out_dir / r["name"]), open_shard(tmp_path / "full" / r["name"]))
                   for r in full[k:])


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A corpus long enough (~1.3M tokens, 66 shards) to be caught part way, and its shards from one clean run."""
    root = tmp_path_factory.mktemp("long_run")
    write_parquet(root / "long.parquet", shakespeare_documents() * 4)
    args = ["--data_files", root / "long.parquet", *SMALL]
    clean = fineweb(*args, "--out_dir", "clean", cwd=root)
    assert clean.returncode == 0, clean.stderr
    return args, root / "clean"


def default_ctrl_c():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_run(args, out_dir, cwd, **popen):
    """fineweb.py started in its own process group, returned once the second shard exists. Ctrl-C is set to
    stop it, as in a terminal, whatever the tests inherited: a shell starts a background job (CI's, say) with
    Ctrl-C ignored, and its processes pass that on."""
    process = subprocess.Popen([sys.executable, str(REPO / "fineweb.py"), *map(str, args), "--out_dir", out_dir],
                               cwd=cwd, start_new_session=True, preexec_fn=default_ctrl_c, **popen)
    second = cwd / out_dir / "local_train_000001.bin"
    deadline = time.monotonic() + 60
    while not second.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return process


def check_stopped_part_way(out_dir, output=""):
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert not manifest["complete"], f"the run finished before it was stopped: make the corpus longer\n{output}"
    for path in shard_paths(out_dir):
        read_shard_header(path)  # every shard under a final name is whole


def start_and_stop(args, out_dir, cwd, sig):
    """Run fineweb.py and send sig to its whole process group (the pool's workers too, as Ctrl-C in a
    terminal or a machine going away would) once the second shard exists."""
    process = start_run(args, out_dir, cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.killpg(process.pid, sig)
    _, stderr = process.communicate(timeout=60)
    check_stopped_part_way(cwd / out_dir, f"exit status {process.returncode}, stderr:\n{stderr[-2000:]}")
    return process.returncode, stderr


def assert_resumes_to_the_same_bytes(args, out_dir, clean):
    resumed = fineweb(*args, "--out_dir", out_dir.name, cwd=out_dir.parent)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after" in resumed.stdout
    names = sorted(p.name for p in clean.iterdir())
    assert sorted(p.name for p in out_dir.iterdir()) == names  # no temporary files left
    for name in names:
        assert (out_dir / name).read_bytes() == (clean / name).read_bytes(), name


def test_killed_run_resumes_to_the_same_bytes(long_run, tmp_path):
    args, clean = long_run
    start_and_stop(args, "killed", tmp_path, signal.SIGKILL)
    assert_resumes_to_the_same_bytes(args, tmp_path / "killed", clean)


def proc_stat(pid):
    """(state, parent pid, start time) of process pid, from /proc; None once it is gone. The start time tells a
    process from a later one that reuses its pid."""
    try:
        state, ppid, *rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after the command
    except OSError:
        return None
    return state, int(ppid), rest[17]  # rest[17]: the line's field 22, starttime


def children(pid):
    """(pid, start time) of each running child of process pid."""
    stats = {int(p.name): proc_stat(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}
    return {(child, s[2]) for child, s in stats.items() if s and s[1] == pid and s[0] != "Z"}


def still_running(processes):
    """Those of processes, (pid, start time) pairs, that have not exited; a zombie has."""
    return {(pid, start) for pid, start in processes if (s := proc_stat(pid)) and s[0] != "Z" and s[2] == start}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc (Linux)")
def test_workers_exit_when_the_main_process_is_killed_alone(long_run, tmp_path):
    """kill -9 of the main process only, as the OOM killer does: its tokenizer processes must not outlive it,
    or they would keep holding the out_dir lock and the rerun would be refused."""
    args, clean = long_run
    process = start_run(args, "orphaned", tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = children(process.pid)
    try:
        assert len(workers) == 2, "the pool of --num_proc 2 was not running when the main process was killed"
        process.kill()
        process.wait(timeout=60)
        deadline = time.monotonic() + 5
        while still_running(workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not still_running(workers), "tokenizer processes outlived the main process by over 5 s"
    finally:
        for pid, _ in still_running(workers):  # a failed test leaves no orphans behind
            os.kill(pid, signal.SIGKILL)
    check_stopped_part_way(tmp_path / "orphaned")
    assert_resumes_to_the_same_bytes(args, tmp_path / "orphaned", clean)


def test_ctrl_c_stops_cleanly(long_run, tmp_path):
    args, _ = long_run
    returncode, stderr = start_and_stop(args, "stopped", tmp_path, signal.SIGINT)
    assert returncode == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: no partial shard")
    assert not [p.name for p in (tmp_path / "stopped").iterdir() if p.name.endswith(".tmp")]


# fineweb.py whose tokenizer processes SIGKILL themselves in their third task, as the OOM killer would
DYING_WORKERS = ("import os, signal, sys, fineweb\n"
                 "tokenize, tasks = fineweb.tokenize_batch, []\n"
                 "def dying(*task):\n"
                 "    tasks.append(task)\n"
                 "    if len(tasks) == 3:\n"
                 "        os.kill(os.getpid(), signal.SIGKILL)\n"
                 "    return tokenize(*task)\n"
                 "fineweb.tokenize_batch = dying\n"
                 "fineweb.main(sys.argv[1:])\n")


def test_a_tokenizer_process_that_dies_stops_the_run_in_one_line_and_a_rerun_resumes(long_run, tmp_path):
    args, clean = long_run
    died = subprocess.run([sys.executable, "-c", DYING_WORKERS, *map(str, args), "--out_dir", "died"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert died.returncode == 1 and "Traceback" not in died.stderr, died.stderr
    assert died.stderr.strip().splitlines()[-1] == ("error: a tokenizer process died (out of memory?): lower "
                                                    "--num_proc, then rerun the same command to resume")
    check_stopped_part_way(tmp_path / "died", died.stderr)
    assert_resumes_to_the_same_bytes(args, tmp_path / "died", clean)


# -----------------------------------------------------------------------------
# Changed inputs: a rerun refuses them rather than mixing shards of old and new text


def one_line_error(result):
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_manifest_records_each_input_file(parquet_shards, corpus):
    root, _ = corpus
    inputs = json.loads((parquet_shards / "manifest.json").read_text())["inputs"]
    assert [Path(r["path"]).name for r in inputs] == ["part-0.parquet", "part-1.parquet"]
    for record in inputs:
        stat = os.stat(record["path"])
        assert (record["size"], record["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
        assert len(record["fingerprint"]) == 32 and int(record["fingerprint"], 16) >= 0


def test_a_large_file_is_fingerprinted_by_blocks_that_include_its_ends(tmp_path):
    """Over 4 MiB, 64 blocks spread over the file are hashed: a change at either end shows."""
    path = tmp_path / "big.jsonl"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 6 << 20, dtype=np.uint8).tobytes())
    path.write_bytes(data)
    first = input_record(str(path))
    assert first["size"] == 6 << 20 and first == input_record(str(path))
    for at in (0, len(data) - 1):
        changed = bytearray(data)
        changed[at] ^= 1
        path.write_bytes(changed)
        assert input_record(str(path))["fingerprint"] != first["fingerprint"]


def test_killed_run_over_a_rewritten_input_is_refused_and_restart_starts_afresh(long_run, tmp_path):
    (tmp_path / "input.parquet").write_bytes((long_run[1].parent / "long.parquet").read_bytes())
    args = ["--data_files", "input.parquet", *SMALL]
    start_and_stop(args, "killed", tmp_path, signal.SIGKILL)
    new_docs = shakespeare_documents()[::-1][:2000]
    write_parquet(tmp_path / "input.parquet", new_docs)

    refused = one_line_error(fineweb(*args, "--out_dir", "killed", cwd=tmp_path))
    assert "input.parquet changed" in refused and "--restart True" in refused
    out_dir = tmp_path / "killed"
    (out_dir / "notes.txt").write_text("not fineweb.py's: kept")
    restarted = fineweb(*args, "--out_dir", "killed", "--restart", "True", cwd=tmp_path)
    assert restarted.returncode == 0, restarted.stderr
    expected = np.concatenate([tokenize_document(d) for d in new_docs])
    assert np.array_equal(all_tokens(out_dir), expected)  # none of the old text's shards is left
    shards = [r["name"] for r in json.loads((out_dir / "manifest.json").read_text())["shards"]]
    kept = ["manifest.json", "notes.txt"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(kept + shards)
    again = fineweb(*args, "--out_dir", "killed", cwd=tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr


def touch(path):
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def rewrite_keeping_size_and_time(path):
    stat = os.stat(path)
    path.write_text(path.read_text().replace("e", "a", 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def append_document(path):
    with open(path, "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")


INPUT_CHANGES = {
    "rewritten in place": (lambda d: rewrite_keeping_size_and_time(d / "a.jsonl"),
                           "a.jsonl changed (content)"),
    "touched": (lambda d: touch(d / "a.jsonl"), "a.jsonl changed (modification time)"),
    "grown": (lambda d: append_document(d / "b.jsonl"), "b.jsonl changed (size and"),
    "file added": (lambda d: write_jsonl(d / "c.jsonl", ["new"]), "c.jsonl is not among the files"),
    "file removed": (lambda d: (d / "b.jsonl").unlink(), "b.jsonl, from which the shards"),
}


def copy_run(source, destination):
    """A folder of inputs and the shards made from them, copied with the files' modification times, as the
    manifest records them."""
    shutil.copytree(source, destination, dirs_exist_ok=True)  # copy2: the times to the nanosecond


@pytest.fixture(scope="module")
def two_files_run(tmp_path_factory):
    """Shards of a.jsonl and b.jsonl (*.jsonl), made in a folder of their own, to copy."""
    root = tmp_path_factory.mktemp("two_files")
    docs = shakespeare_documents()[:400]
    write_jsonl(root / "a.jsonl", docs[:200])
    write_jsonl(root / "b.jsonl", docs[200:])
    assert fineweb("--data_files", "*.jsonl", "--out_dir", "shards", *TINY, cwd=root).returncode == 0
    return root


@pytest.mark.parametrize("change", INPUT_CHANGES)
def test_rerun_over_changed_input_files_is_refused(change, tmp_path, two_files_run):
    copy_run(two_files_run, tmp_path)
    args = ["--data_files", "*.jsonl", "--out_dir", "shards", *TINY]
    before = {p.name: p.read_bytes() for p in shard_paths(tmp_path / "shards")}
    make_change, needle = INPUT_CHANGES[change]
    make_change(tmp_path)
    refused = one_line_error(fineweb(*args, cwd=tmp_path))
    assert needle in refused and "restore the inputs, or pass --restart True" in refused, refused
    assert {p.name: p.read_bytes() for p in shard_paths(tmp_path / "shards")} == before


@pytest.fixture(scope="module")
def docs_run(tmp_path_factory):
    """Shards of docs.jsonl, made in a folder of their own, to copy."""
    root = tmp_path_factory.mktemp("docs")
    write_jsonl(root / "docs.jsonl", shakespeare_documents()[:200])
    assert fineweb("--data_files", "docs.jsonl", "--out_dir", "shards", *TINY, cwd=root).returncode == 0
    return root


def test_manifest_without_input_records_is_refused_until_restart(tmp_path, docs_run):
    copy_run(docs_run, tmp_path)
    args = ["--data_files", "docs.jsonl", "--out_dir", "shards", *TINY]
    manifest_path = tmp_path / "shards" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["inputs"]  # as an older fineweb.py wrote it
    manifest_path.write_text(json.dumps(manifest))
    refused = one_line_error(fineweb(*args, cwd=tmp_path))
    assert "records no sizes or fingerprints" in refused and "--restart True" in refused
    restarted = fineweb(*args, "--restart", "True", cwd=tmp_path)
    assert restarted.returncode == 0, restarted.stderr
    assert f"deleted {len(manifest['shards'])} shards" in restarted.stdout
    assert json.loads(manifest_path.read_text())["inputs"][0]["path"] == "docs.jsonl"


@pytest.mark.parametrize("damage", ["a list", "shards not a list", "a shard without tokens", "tokens a string",
                                    "inputs not records", "complete a string"])
def test_a_damaged_manifest_is_refused_in_one_line_until_restart(damage, tmp_path, docs_run):
    copy_run(docs_run, tmp_path)
    args = ["--data_files", "docs.jsonl", "--out_dir", "shards", *TINY]
    manifest_path = tmp_path / "shards" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "a list":
        manifest = [manifest]
    elif damage == "shards not a list":
        manifest["shards"] = "all of them"
    elif damage == "a shard without tokens":
        del manifest["shards"][0]["tokens"]
    elif damage == "tokens a string":
        manifest["shards"][0]["tokens"] = "many"
    elif damage == "inputs not records":
        manifest["inputs"] = ["docs.jsonl"]
    else:
        manifest["complete"] = "yes"
    manifest_path.write_text(json.dumps(manifest))
    refused = one_line_error(fineweb(*args, cwd=tmp_path))
    assert "manifest.json is damaged" in refused and "--restart True" in refused
    assert fineweb(*args, "--restart", "True", cwd=tmp_path).returncode == 0


def test_a_manifest_nested_past_what_json_parses_is_one_line(tmp_path, docs_run):
    copy_run(docs_run, tmp_path)
    (tmp_path / "shards" / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    refused = one_line_error(fineweb("--data_files", "docs.jsonl", "--out_dir", "shards", *TINY, cwd=tmp_path))
    assert "shards/manifest.json cannot be read (nested too deeply" in refused and "--restart True" in refused
    from conftest import train_in_process  # the trainer's main, in this process
    refused = one_line_error(train_in_process("--data", tmp_path / "shards", "--out_dir", tmp_path / "out"))
    assert f"{tmp_path / 'shards' / 'manifest.json'} cannot be read (nested too deeply" in refused


@pytest.mark.parametrize("flag", ["--out_dir", "--tokenizer", "--data_files"])
def test_a_path_too_long_for_the_file_system_is_one_line_naming_it(flag, tmp_path):
    """--out_dir and --tokenizer are paths, refused by the parser as every script's are (cli.parse_path);
    --data_files, a list of globs, matches no file."""
    long = "x" * 300  # past the 255 bytes a file name may have
    args = {"--out_dir": ["--data_files", text_file(tmp_path), "--out_dir", long],
            "--tokenizer": ["--data_files", text_file(tmp_path), "--tokenizer", long],
            "--data_files": ["--data_files", long]}[flag]
    result = fineweb(*args, "--num_proc", "1", cwd=tmp_path)
    if flag == "--data_files":
        refused = one_line_error(result)
        assert refused.startswith(f"error: {flag}") and long in refused, refused
    else:
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        (refused,) = result.stderr.strip().splitlines()
        assert refused.startswith(f"fineweb.py: error: argument {flag}: xxx") and "xxx...xxx" in refused
        assert "File name too long: pass a shorter path" in refused
    assert not (tmp_path / "edu_fineweb10B").exists() and not list(tmp_path.rglob("*.bin"))


# -----------------------------------------------------------------------------
# The trainer reads the shards


def test_trainer_trains_on_the_shards(parquet_shards, tmp_path):
    from conftest import train_in_process  # the trainer's main, in this process
    result = train_in_process(
        "--data", str(parquet_shards), "--device", "cpu",
        "--compile", "False", "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32",
        "--batch_size", "2", "--gradient_accumulation_steps", "1", "--max_iters", "3", "--eval_interval", "3",
        "--eval_iters", "2", "--log_interval", "1", "--warmup_iters", "1", "--lr_decay_iters", "3",
        "--out_dir", str(tmp_path / "out"), "--num_samples", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in m for m in metrics) and any("train_loss" in m for m in metrics)


# -----------------------------------------------------------------------------
# Bad input: one line on stderr that names the problem and the fix, and a non-zero exit

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

BAD_INPUTS = {
    "hub unreachable": ([], "--data_files"),
    "unknown dataset": (["--dataset", "nobody/no-such-dataset"], "--data_files"),
    "missing files": (["--data_files", "missing/*.parquet"], "no such file"),
    "unknown file kind": (["--data_files", "notes.csv"], ".parquet"),
    "missing text column": (["--data_files", "{corpus}/part-0.parquet", "--text_column", "body"], "'body'"),
    "column not text": (["--data_files", "{corpus}/part-0.parquet", "--text_column", "id"], "not text"),
    "out_dir is a file": (["--data_files", "{corpus}/docs.jsonl", "--out_dir", "notes.csv"], "is a file"),
    "shard_size too small": (["--shard_size", "10"], "--shard_size"),
    "shard_size not a number": (["--shard_size", "many"], "--shard_size"),
    "negative val_tokens": (["--val_tokens", "-1"], "--val_tokens"),
    "max_tokens within val": (["--max_tokens", "1000", "--val_tokens", "1000"], "--max_tokens"),
    "max_tokens within the Hub's val": (["--max_tokens", "1000"], "after --val_tokens 100000000"),
    "no processes": (["--num_proc", "0"], "--num_proc"),
    "data shorter than val": (["--data_files", "{corpus}/part-0.parquet", "--val_tokens", "10000000"],
                              "--val_tokens"),
    "empty jsonl": (["--data_files", "empty.jsonl"], "empty.jsonl is empty"),
    "blank jsonl": (["--data_files", "blank.jsonl"], "blank.jsonl holds only blank lines"),
    "empty txt": (["--data_files", "empty.txt"], "empty.txt is empty"),
    "empty parquet": (["--data_files", "empty.parquet"], "empty.parquet is empty"),
    "parquet without rows": (["--data_files", "{corpus}/part-0.parquet,no_rows.parquet"], "without rows"),
    "cut parquet": (["--data_files", "cut.parquet"], "cut.parquet is not a readable parquet file"),
    "an empty file among others": (["--data_files", "{corpus}/docs.jsonl,empty.jsonl"], "empty.jsonl is empty"),
    # damaged files, most after a sound one: the error names the damaged one
    "jsonl with a bad line": (["--data_files", "few.jsonl,bad_line.jsonl"],
                              "bad_line.jsonl cannot be read"),
    "jsonl cut mid-line": (["--data_files", "few.jsonl,cut_line.jsonl"],
                           "cut_line.jsonl cannot be read"),
    "jsonl text not UTF-8": (["--data_files", "few.jsonl,latin1.jsonl"],
                             "latin1.jsonl holds text that is not UTF-8 (its document 5, from 0)"),
    "txt not UTF-8": (["--data_files", "few.txt,latin1.txt"], "latin1.txt is not UTF-8 text"),
    "parquet with a damaged page": (["--data_files", "damaged.parquet"],
                                    "damaged.parquet cannot be read"),
    "parquet text not UTF-8": (["--data_files", "few.parquet,latin1.parquet"],
                               "latin1.parquet holds text that is not UTF-8 (its document 2,"),
}


def write_bad_files(directory, corpus_root):
    (directory / "notes.csv").write_text("text\nhello\n")
    for name in ("empty.jsonl", "empty.txt", "empty.parquet"):
        (directory / name).write_bytes(b"")
    (directory / "blank.jsonl").write_text("\n  \n")
    write_parquet(directory / "no_rows.parquet", [])
    whole = (corpus_root / "part-0.parquet").read_bytes()
    (directory / "cut.parquet").write_bytes(whole[:len(whole) // 2])  # a download that stopped half way
    # the first data page overwritten, the footer intact: the file opens but does not decode
    (directory / "damaged.parquet").write_bytes(whole[:60] + b"U" * 1000 + whole[1060:])
    docs = shakespeare_documents()[:20]
    write_jsonl(directory / "few.jsonl", docs)
    write_parquet(directory / "few.parquet", docs)
    (directory / "few.txt").write_text(docs[0], encoding="utf-8")
    lines = [json.dumps({"text": doc}) for doc in docs]
    bad_line = '{"text": "no end'
    (directory / "bad_line.jsonl").write_text("\n".join(lines[:10] + [bad_line] + lines[10:]))
    (directory / "cut_line.jsonl").write_text("\n".join(lines)[:-10])  # a download cut short
    latin1 = "café".encode("latin-1")  # é as one byte, which is not UTF-8
    (directory / "latin1.jsonl").write_bytes("".join(line + "\n" for line in lines[:5]).encode()
                                             + b'{"text": "' + latin1 + b'"}\n')
    (directory / "latin1.txt").write_bytes(latin1)
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = pa.array([docs[0].encode(), docs[1].encode(), latin1], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": texts}), directory / "latin1.parquet")


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_error(case, corpus, tmp_path):
    args, needle = BAD_INPUTS[case]
    write_bad_files(tmp_path, corpus[0])
    args = [a.replace("{corpus}", str(corpus[0])) for a in args]
    # offline throughout: a case that reached for the Hub by mistake fails fast instead of retrying for minutes
    result = fineweb("--num_proc", "1", *args, cwd=tmp_path, env={**os.environ, **OFFLINE}, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(("error: ", "fineweb.py: error: ")) and needle in last, result.stderr
    if case != "data shorter than val":  # that one is found after the progress bars started
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not list(tmp_path.rglob("*.bin")) and not (tmp_path / "edu_fineweb10B").exists()


def test_a_file_damaged_past_the_first_shards_is_named_and_its_repair_needs_a_restart(tmp_path):
    docs = shakespeare_documents()[:1200]
    write_jsonl(tmp_path / "a.jsonl", docs[:1000])  # a batch of documents, and more, before it
    lines = [json.dumps({"text": doc}) for doc in docs[1000:]]
    (tmp_path / "b.jsonl").write_text("\n".join(lines[:50] + ['{"text": "no end'] + lines[50:]))
    args = ["--data_files", "a.jsonl,b.jsonl", "--out_dir", "shards", *TINY]
    damaged = fineweb(*args, cwd=tmp_path)
    assert damaged.returncode == 1 and "Traceback" not in damaged.stderr
    last = damaged.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --data_files: b.jsonl cannot be read"), damaged.stderr
    assert shard_paths(tmp_path / "shards")  # the shards of a.jsonl's first batch
    write_jsonl(tmp_path / "b.jsonl", docs[1000:])
    assert "b.jsonl changed" in one_line_error(fineweb(*args, cwd=tmp_path))
    restarted = fineweb(*args, "--restart", "True", cwd=tmp_path)
    assert restarted.returncode == 0, restarted.stderr
    expected = np.concatenate([tokenize_document(d) for d in docs])
    assert np.array_equal(all_tokens(tmp_path / "shards"), expected)


def test_a_bad_text_column_is_refused_before_any_document_is_read(corpus, tmp_path):
    """By load_stream, from the files' schema: pyarrow's parquet reader reads ahead in threads of its own, and one
    still running when the process exits on the error aborts it now and then ("terminate called without an active
    exception" after the error line), which a loop over the whole script would take a minute to catch. In a
    process of its own: load_stream sets USE_TORCH, which every later test's subprocess would inherit."""
    code = ("import sys, fineweb\n"
            "for column in ('id', 'body'):\n"
            "    config = fineweb.parse_args(['--data_files', sys.argv[1], '--text_column', column])\n"
            "    try:\n"
            "        fineweb.load_stream(config, *fineweb.resolve_data_files(config.data_files))\n"
            "    except fineweb.UserError as e:\n"
            "        print(e)\n")
    result = subprocess.run([sys.executable, "-c", code, str(corpus[0] / "part-0.parquet")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, **OFFLINE, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    refused = result.stdout.splitlines()
    assert len(refused) == 2 and "'id'" in refused[0] and "not text" in refused[0], result.stdout
    assert "no column 'body'" in refused[1], result.stdout


def library_error(cls):
    """An exception of one of the libraries' types, its constructor's arguments aside, as they raise it."""
    error = cls.__new__(cls, "the library's message\nsecond line")
    Exception.__init__(error, "the library's message\nsecond line")
    return error


def hub_errors():
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    return [(DatasetNotFoundError, "not found on the Hugging Face Hub"),
            (RepositoryNotFoundError, "not found on the Hugging Face Hub"),
            (ConnectionError, "cannot reach the Hugging Face Hub"), (TimeoutError, "cannot reach the Hugging Face Hub"),
            (HfHubHTTPError, "refused"), (KeyError, "cannot read")]


def test_hub_errors_are_named_by_their_types():
    for cls, needle in hub_errors():
        message = describe_read_error(library_error(cls), "HuggingFaceFW/fineweb-edu (sample-10BT)", files=[])
        assert needle in message and "\n" not in message and "the library's message" in message, (cls, message)


# -----------------------------------------------------------------------------
# Only fineweb.py's own files: a link at its lock, a user's temporary-looking or shard-looking files, a full disk


def text_file(directory, name="doc.txt", chars=20_000):
    (directory / name).write_text((REPO / "input.txt").read_text(encoding="utf-8")[:chars], encoding="utf-8")
    return name


def test_the_lock_is_never_written_through_a_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / ".lock").symlink_to(outside)
    line = one_line_error(fineweb("--data_files", text_file(tmp_path), "--out_dir", "shards", *TINY, cwd=tmp_path))
    assert "shards/.lock is a symbolic link" in line and "remove the link" in line
    assert outside.read_text() == "precious"


def test_a_rerun_and_a_restart_remove_only_what_fineweb_wrote(tmp_path):
    out_dir = tmp_path / "shards"
    out_dir.mkdir()
    (out_dir / ".notes.tmp").write_text("a user's")
    (out_dir / ".x.tmp").mkdir()  # a folder: it gave a traceback
    (out_dir / ".manifest.json.1234.0badcafe.tmp").write_text("a killed write's")
    (out_dir / "other_train_000001.bin").write_bytes(b"another program's, named like a shard")
    args = ["--data_files", text_file(tmp_path), "--out_dir", "shards", *TINY]
    first = fineweb(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "also holds 1 shard files this run did not make (other_train_000001.bin" in first.stderr
    assert not (out_dir / ".manifest.json.1234.0badcafe.tmp").exists()
    restarted = fineweb(*args, "--restart", "True", cwd=tmp_path)
    assert restarted.returncode == 0, restarted.stderr
    shards = [r["name"] for r in json.loads((out_dir / "manifest.json").read_text())["shards"]]
    assert f"--restart: deleted {len(shards)} shards" in restarted.stdout
    kept = [".notes.tmp", ".x.tmp", "other_train_000001.bin", "manifest.json"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(kept + shards)


def test_a_manifest_that_does_not_fit_the_disk_is_one_line_and_a_rerun_resumes(tmpfs, tmp_path):
    # a page each for the lock, the two shards (1,024 tokens: 3 kB) and the manifest; its rewrite after
    # the second shard needs a fifth
    page = os.sysconf("SC_PAGE_SIZE")
    disk = tmpfs(4 * page)
    args = ["--data_files", text_file(tmp_path), "--out_dir", disk / "shards", "--shard_size", "1024",
            "--val_tokens", "1024", "--max_tokens", "2048", "--num_proc", "1"]
    result = fineweb(*args, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (  # after the progress bars
        f"error: cannot write {disk / 'shards' / 'manifest.json'} (No space left on device): make room or pick "
        "another --out_dir, then rerun the same command to resume")
    assert not list((disk / "shards").glob(".*"))
    subprocess.run(["mount", "-o", f"remount,size={5 * page}", str(disk)], check=True)
    rerun = fineweb(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((disk / "shards" / "manifest.json").read_text())["complete"]
