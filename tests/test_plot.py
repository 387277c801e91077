"""plot.py: a real PNG of the expected size from one or more runs, the scale runs are drawn against, GPT-2's
FineWeb-Edu line only for FineWeb runs, the trainer's --plot, and a clear message without matplotlib (in
requirements.txt, but training runs without it: the tests that draw are skipped where it is missing).
Damaged files (metrics.jsonl, config.json, manifest.json) are written as a user could find them, and
plot.py is run on them as a user would: a warning or one error line, never a traceback."""

import json
import struct

import pytest

import plot
from conftest import INPUT_TXT, TINY, run_main, run_script, run_train, train_in_process


def png_size(path):
    """(width, height) from the PNG signature and the IHDR chunk that must follow it."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def write_metrics(folder, hellaswag=False, tokens_per_step=256, data=None, tokenizer="gpt2"):
    """A run's metrics.jsonl as the trainer writes it, with a half-written last line, and its config.json's
    --data and --tokenizer when data is given."""
    folder.mkdir(parents=True)
    lines = [{"step": s, "train_loss": 10 - s / 10, "tokens": (s + 1) * tokens_per_step} for s in range(20)]
    scores = lambda s: {"hellaswag_acc_norm": 0.25 + s / 1000} if hellaswag else {}
    lines += [{"step": s, "val_loss": 10.5 - s / 10, **scores(s), "tokens": s * tokens_per_step} for s in (0, 10, 20)]
    lines += [{"step": 20, "val_loss": 8.0, "eval_only": True}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines) + '{"step": 2')
    if data is not None:
        (folder / "config.json").write_text(json.dumps({"data": str(data), "tokenizer": tokenizer, "n_layer": 2}))
    return folder / "metrics.jsonl"


def legend(ax):
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_plot_command_draws_runs_side_by_side_with_hellaswag(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [write_metrics(tmp_path / "run-a"), write_metrics(tmp_path / "run-b", hellaswag=True)]
    result = run_main("plot.py", *runs, "--out", tmp_path / "plots" / "compare.png")
    assert result.returncode == 0, result.stderr
    assert png_size(tmp_path / "plots" / "compare.png") == (1400, 500)  # two panels: loss and HellaSwag
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["compare.png"]  # no temporary file left


def test_without_out_one_run_is_drawn_beside_it_and_several_in_the_current_folder(tmp_path):
    pytest.importorskip("matplotlib")
    run_a, run_b = write_metrics(tmp_path / "run-a"), write_metrics(tmp_path / "run-b")
    (tmp_path / "here").mkdir()
    result = run_main("plot.py", run_a, cwd=tmp_path / "here")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {tmp_path / 'run-a' / 'plot.png'}"
    assert png_size(tmp_path / "run-a" / "plot.png") == (700, 500)
    result = run_main("plot.py", run_a, run_b, cwd=tmp_path / "here")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "here").iterdir()] == ["compare.png"]
    assert not (tmp_path / "run-b" / "plot.png").exists()


def test_a_run_without_hellaswag_gets_the_loss_panel_only(tmp_path):
    pytest.importorskip("matplotlib")
    plot.plot_runs([write_metrics(tmp_path / "run")], tmp_path / "plot.png")
    assert png_size(tmp_path / "plot.png") == (700, 500)


GPT2_LINE = "OpenAI GPT-2 124M val (FineWeb-Edu)"


def test_gpt2s_val_loss_is_drawn_only_beside_runs_on_fineweb(tmp_path):
    pytest.importorskip("matplotlib")
    shards = tmp_path / "shards"  # fineweb.py's output under a name of the user's
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"source": {"dataset": "HuggingFaceFW/fineweb-edu"}}))
    runs = {"shakespeare": write_metrics(tmp_path / "shakespeare", data=INPUT_TXT),
            "no config": write_metrics(tmp_path / "no-config"),
            "named": write_metrics(tmp_path / "named", data="edu_fineweb10B"),
            "manifest": write_metrics(tmp_path / "manifest", data=shards),
            "own tokenizer": write_metrics(tmp_path / "bpe", data="edu_fineweb10B", tokenizer="/data/bpe.json")}
    drawn = lambda *names: GPT2_LINE in legend(plot.figure([runs[n] for n in names]).axes[0])
    assert not drawn("shakespeare") and not drawn("no config") and not drawn("own tokenizer")
    assert drawn("named") and drawn("manifest") and drawn("shakespeare", "named")


def test_runs_with_different_tokens_per_step_are_drawn_against_tokens(tmp_path):
    pytest.importorskip("matplotlib")
    small = write_metrics(tmp_path / "small", hellaswag=True)
    large = write_metrics(tmp_path / "large", hellaswag=True, tokens_per_step=1024)
    loss_ax, acc_ax = plot.figure([small, large]).axes[:2]
    assert loss_ax.get_xlabel() == acc_ax.get_xlabel() == "tokens"
    assert max(loss_ax.get_lines()[-2].get_xdata()) == 20 * 1024  # the large run's val line, at its last step
    # the same tokens per step: steps below, tokens on the axis above
    loss_ax = plot.figure([small, write_metrics(tmp_path / "same")]).axes[0]
    assert loss_ax.get_xlabel() == "step"
    assert [child.get_xlabel() for child in loss_ax.child_axes] == ["tokens"]


def test_the_loss_axis_is_zoomed_to_the_trained_part_unless_asked_for_all_of_it(tmp_path):
    pytest.importorskip("matplotlib")
    run = write_metrics(tmp_path / "run")  # losses from 10.5 (val, step 0) to 8.1 (train, step 19) over 20 steps
    bottom, top = plot.figure([run]).axes[0].get_ylim()
    # from the lowest loss to the highest from step 2 on (a tenth of the run): train's 9.8, with 5% to spare
    assert (bottom, top) == (pytest.approx(8.1 - 0.085), pytest.approx(9.8 + 0.085))
    full = plot.figure([run], y="full").axes[0]
    assert full.get_ylim()[1] > 10.5 and full.get_yscale() == "linear"
    assert plot.figure([run], y="log").axes[0].get_yscale() == "log"
    records = [("run", plot.read_run(run)[0])]
    assert plot.zoomed_loss_limits(records, "step", floor=3.2924)[0] < 3.2924  # GPT-2's line stays in view
    result = run_main("plot.py", run, "--y", "log", "--out", tmp_path / "log.png")
    assert result.returncode == 0 and png_size(tmp_path / "log.png") == (700, 500)
    result = run_main("plot.py", run, "--y", "linear")
    assert result.returncode == 2 and "argument --y: invalid choice: 'linear'" in result.stderr


def test_help_describes_the_script_in_a_whole_sentence():
    result = run_main("plot.py", "--help")
    assert result.returncode == 0
    description = " ".join(result.stdout.split("\n\n")[1].split())
    assert description == plot.__doc__.strip().splitlines()[0] and description.endswith(".")


def test_a_mistyped_flag_gets_one_line_naming_the_real_one(tmp_path):
    result = run_main("plot.py", write_metrics(tmp_path / "run"), "--outt", tmp_path / "plot.png")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("plot.py: error: unrecognized arguments: --outt") and "(did you mean --out?)" in line


def test_without_matplotlib_the_message_says_how_to_install_it(tmp_path):
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "matplotlib.py").write_text("raise ImportError('No module named matplotlib')\n")
    result = run_script("plot.py", write_metrics(tmp_path / "run"), "--out", tmp_path / "plot.png",
                        env={"PYTHONPATH": str(tmp_path / "shim")})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: plot.py needs matplotlib: pip install matplotlib"]
    assert not (tmp_path / "plot.png").exists()


def test_an_out_path_that_cannot_be_written_gets_one_line(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "a_file").write_text("")
    result = run_main("plot.py", write_metrics(tmp_path / "run"), "--out", tmp_path / "a_file" / "plot.png")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'a_file' / 'plot.png'} cannot be written")
    assert line.endswith("pass a writable .png path to --out")


def test_an_out_path_without_a_file_name_gets_one_line(tmp_path):
    result = run_main("plot.py", write_metrics(tmp_path / "run"), "--out", ".", cwd=tmp_path)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line == "error: --out . names no file: pass a .png path, such as plot.png"


def test_a_missing_metrics_file_gets_one_line(tmp_path):
    result = run_main("plot.py", tmp_path / "metrics.jsonl")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'metrics.jsonl'} not found: pass a run's "
                                                  f"--out_dir or the metrics.jsonl in it"]


def test_a_run_directory_is_drawn_from_its_metrics_jsonl(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path / "run-a")
    plot.main([str(tmp_path / "run-a")])
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'run-a' / 'plot.png'}"
    assert png_size(tmp_path / "run-a" / "plot.png") == (700, 500)


def test_a_directory_without_metrics_gets_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        plot.main([str(tmp_path)])
    assert exit.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'metrics.jsonl'} not found: pass a run's --out_dir or the metrics.jsonl in it"]


def test_the_trainer_redraws_the_plot_at_each_evaluation(tmp_path):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "out"
    result = train_in_process(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "2",
                              "--eval_interval", "2", "--plot", "True")
    assert result.returncode == 0, result.stderr
    assert png_size(out_dir / "plot.png") == (700, 500)


def test_the_trainers_plot_warns_once_without_matplotlib(tmp_path):
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "matplotlib.py").write_text("raise ImportError('No module named matplotlib')\n")
    out_dir = tmp_path / "out"
    result = run_train(*TINY, "--data", INPUT_TXT, "--out_dir", out_dir, "--max_iters", "3", "--eval_interval", "1",
                       "--plot", "True", env={"PYTHONPATH": str(tmp_path / "shim")})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "--plot True" in line]
    assert len(warnings) == 1 and "plot.py needs matplotlib: pip install matplotlib" in warnings[0]
    assert not (out_dir / "plot.png").exists()


# Damaged lines of metrics.jsonl, a class of damage per case, followed by valid lines
BIG = b"1" + b"0" * 400  # an int no float holds
DAMAGED_LINES = {
    "cut short": [b'{"step": 3, "train_lo', b'{"step": 4, "val_loss": 9.'],
    "not JSON": [b"step=3 train_loss=2.0", b'{"step": 3,, }', b"[" * 100_000],
    "not UTF-8": [b'\xff\xfe{"step": 3, "train_loss": 2.0}', b'{"step": 3, "x": "\xe9"}'],
    "not an object": [b"null", b"[1, 2]", b'"step"', b"3"],
    "no step": [b'{"train_loss": 2.0}', b"{}"],
    "step not a whole number >= 0": [b'{"step": %s, "train_loss": 2.0}' % step for step in
                                     (b'"3"', b"3.5", b"true", b"null", b"-1", b"[3]", BIG)],
    "figure of the wrong type": [b'{"step": 3, "val_loss": "2.0"}', b'{"step": 3, "val_loss": [2]}',
                                 b'{"step": 3, "hellaswag_acc_norm": {}}',
                                 b'{"step": 3, "train_loss": true}'],
    "figure not finite": [b'{"step": 3, "val_loss": %s}' % v
                          for v in (b"NaN", b"Infinity", b"-Infinity", b"1e400", BIG)],
    "tokens not a count": [b'{"step": 3, "train_loss": 2.0, "tokens": %s}' % v
                           for v in (b'"768"', b"-5", b"NaN")],
}


def with_lines(path, lines, at=1):
    """path's lines with lines inserted after its first `at` lines."""
    old = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(old[:at] + lines + old[at:]))


@pytest.fixture(scope="module")
def clean_png(tmp_path_factory):
    """The picture of write_metrics' run, labeled "run", drawn by plot.py."""
    pytest.importorskip("matplotlib")
    path = write_metrics(tmp_path_factory.mktemp("clean") / "run")
    assert run_main("plot.py", path).returncode == 0
    return path.with_name("plot.png").read_bytes()


@pytest.mark.parametrize("damage", DAMAGED_LINES)
def test_damaged_lines_are_skipped_with_one_warning(tmp_path, damage, clean_png):
    lines = DAMAGED_LINES[damage]
    path = write_metrics(tmp_path / "run")
    with_lines(path, lines)
    result = run_main("plot.py", path)
    assert result.returncode == 0, result.stderr
    assert len(lines) > 1  # so that the warning says "lines"
    warning = f"warning: {path}: {len(lines)} damaged lines skipped (first: line 2)"
    assert result.stderr.splitlines() == [warning]
    assert path.with_name("plot.png").read_bytes() == clean_png  # drawn from the valid lines alone


def test_null_figures_and_a_last_line_being_written_are_no_damage(tmp_path, clean_png):
    """The trainer writes a NaN loss as null, and a run may be writing its last line as we read."""
    path = write_metrics(tmp_path / "run")  # its last line is cut short, without a newline
    null = b'{"step": 3, "val_loss": null, "hellaswag_acc_norm": null, "tokens": null}'
    with_lines(path, [null, b"", b"  "])
    result = run_main("plot.py", path)
    assert result.returncode == 0 and result.stderr == ""
    assert path.with_name("plot.png").read_bytes() == clean_png


def test_a_run_with_nothing_to_draw_is_refused_in_one_line(tmp_path):
    damaged = tmp_path / "damaged" / "metrics.jsonl"
    damaged.parent.mkdir()
    lines = DAMAGED_LINES["not an object"] + [b'{"step": 0, "val_loss": null}\n']
    damaged.write_bytes(b"\n".join(lines))
    result = run_main("plot.py", damaged)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"error: no losses in {damaged}, 4 damaged lines skipped "
                                          f"(first: line 1): mend the file or leave the run out"]
    empty = tmp_path / "empty" / "metrics.jsonl"
    empty.parent.mkdir()
    empty.write_bytes(b'{"step": 0, "train_lo')  # the first line, being written
    result = run_main("plot.py", write_metrics(tmp_path / "run"), empty, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: no losses in {empty} yet: plot a run after its "
                                          f"first log line, or leave it out"]
    assert not (tmp_path / "run" / "plot.png").exists() and not (tmp_path / "compare.png").exists()


DAMAGED_CONFIGS = {  # config.json as it is damaged, and what the warning says of it
    "not JSON": (b'{"data": "edu_fineweb10B"', "is not JSON"),
    "not UTF-8": (b'{"data": "edu_fineweb10B\xff"}', "is not JSON"),
    "nested past Python's stack": (b"[" * 100_000, "is not JSON"),
    "not an object": (b'["edu_fineweb10B"]', "is not a JSON object"),
    "data not a string": (b'{"data": ["edu_fineweb10B"]}', "has no data string"),
    "data null": (b'{"data": null}', "has no data string"),
    "no data": (b'{"n_layer": 2}', "has no data string"),
    "a folder": (None, "cannot be read (Is a directory)"),
}


@pytest.mark.parametrize("damage", DAMAGED_CONFIGS)
def test_a_damaged_config_json_gets_one_warning_and_no_fineweb_line(tmp_path, damage, clean_png):
    text, says = DAMAGED_CONFIGS[damage]
    path = write_metrics(tmp_path / "run")
    config = path.with_name("config.json")
    config.mkdir() if text is None else config.write_bytes(text)
    result = run_main("plot.py", path)
    assert result.returncode == 0, result.stderr
    unknown = "the run's --data is unknown, so it is not taken for a FineWeb run"
    assert result.stderr.splitlines() == [f"warning: {config} {says}: {unknown}"]
    assert path.with_name("plot.png").read_bytes() == clean_png  # without GPT-2's FineWeb-Edu line


DAMAGED_MANIFESTS = {  # the manifest.json of the shards --data names, and what the warning says
    "not JSON": (b'{"source": {"dataset": "HuggingFaceFW/fineweb-edu"}', "is not JSON"),
    "not UTF-8": (b"\xff\xfe", "is not JSON"),
    "not an object": (b'"HuggingFaceFW/fineweb-edu"', "names no source dataset"),
    "no source": (b'{"shards": []}', "names no source dataset"),
    "source not an object": (b'{"source": "HuggingFaceFW/fineweb-edu"}', "names no source dataset"),
    "dataset not a string": (b'{"source": {"dataset": ["HuggingFaceFW/fineweb-edu"]}}',
                             "names no source dataset"),
    "a folder": (None, "cannot be read (Is a directory)"),
}


@pytest.mark.parametrize("damage", DAMAGED_MANIFESTS)
def test_a_damaged_manifest_json_gets_one_warning_and_no_fineweb_line(tmp_path, damage, clean_png):
    text, says = DAMAGED_MANIFESTS[damage]
    manifest = tmp_path / "shards" / "manifest.json"  # no "fineweb" in the name: manifest decides
    manifest.parent.mkdir()
    manifest.mkdir() if text is None else manifest.write_bytes(text)
    runs = [write_metrics(tmp_path / name / "run", data=manifest.parent) for name in ("a", "b")]
    result = run_main("plot.py", runs[0], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warning = f"warning: {manifest} {says}: {manifest.parent} is not taken for FineWeb shards"
    assert result.stderr.splitlines() == [warning]
    assert runs[0].with_name("plot.png").read_bytes() == clean_png
    result = run_main("plot.py", *runs, cwd=tmp_path)  # two runs on the same shards: one warning
    assert result.returncode == 0 and result.stderr.splitlines() == [warning]
    assert (tmp_path / "compare.png").is_file()


def test_a_data_too_long_for_a_path_is_no_fineweb_run(tmp_path, clean_png):
    path = write_metrics(tmp_path / "run", data="x" * 5000)  # the trainer would refuse it; a hand edit
    result = run_main("plot.py", path)
    assert result.returncode == 0 and result.stderr == ""
    assert path.with_name("plot.png").read_bytes() == clean_png
