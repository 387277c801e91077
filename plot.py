"""
Plot training runs from their metrics.jsonl files: losses and HellaSwag accuracy, beside OpenAI's GPT-2 124M.

    python plot.py out                                        # writes out/plot.png, from out/metrics.jsonl
    python plot.py out-a out-b/metrics.jsonl                  # writes compare.png here
    python plot.py out --y full                               # the loss axis from the first step's loss

Train and val loss are drawn against the step, with tokens on the top axis; runs whose steps hold different
numbers of tokens (another batch, or a batch changed on resume) are drawn against tokens instead, the one scale
they share. The loss axis is zoomed to the trained part (--y zoom): a run's loss falls from about 11 in its first
steps, and an axis from 11 would squash the range where runs differ; --y full shows every loss, --y log every
loss on a log scale. HellaSwag accuracy gets a panel of its own where a run measured it. One line per run,
labeled with the run's folder. A damaged line of a metrics.jsonl (cut short, not JSON, a figure that is not a number)
is skipped with one warning for the file; a run with no loss to draw is refused.

OpenAI's GPT-2 124M is drawn for comparison: its HellaSwag acc_norm in the HellaSwag panel, its val loss on
FineWeb-Edu only where a run trained on FineWeb with GPT-2's tokenizer (elsewhere the losses are of other text, or
per other tokens, and do not compare; val bits per byte do). A run is on FineWeb when the `data` in its config.json (beside its metrics.jsonl) is a directory whose name contains
"fineweb" (the trainer's default, edu_fineweb10B) or whose manifest.json, written by fineweb.py, names a FineWeb
dataset. A relative `data` is read from the current directory, as the trainer read it.

Needs matplotlib (in requirements.txt), which training does not: `python train_gpt2.py --plot True` redraws
{out_dir}/plot.png at every evaluation when it is installed.
"""

import json
import math
import sys
from pathlib import Path

from cli import OneLineParser, UserError, atomic_write, parse_nested, parse_path, run_command

# -----------------------------------------------------------------------------
# Reading runs

# OpenAI's GPT-2 124M, the baselines of build-nanogpt's notebook
GPT2_124M_HELLASWAG = 0.2955  # HellaSwag acc_norm, as build-nanogpt measured it (see hellaswag.py)
GPT2_124M_VAL_LOSS = 3.2924  # on the FineWeb-Edu val shard
PANEL_INCHES = (7, 5)
DPI = 100  # so each panel is 700 x 500 pixels
Y_AXES = ("zoom", "full", "log")  # --y
UNTRAINED = 0.1  # the first tenth of each run, left out of the zoomed loss axis


class MatplotlibMissing(ImportError):
    pass


def read_run(path):
    """The records of a run's metrics.jsonl, and the numbers of its damaged lines (skipped).
    Skipped quietly: --eval_only records (they score a checkpoint, they are not a point of the run),
    blank lines, and a last line cut short before its newline (a run writing it as we read)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: pass a run's --out_dir or the metrics.jsonl in it")
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        why = e.strerror or e
        raise UserError(f"{path} cannot be read ({why}): pass a readable metrics.jsonl") from None
    records, damaged = [], []
    for number, line in enumerate(lines, 1):
        record = parse_record(line)
        if record is None and line.strip() and number < len(lines):
            damaged.append(number)
        elif record is not None and not record.get("eval_only"):
            records.append(record)
    return records, damaged


FIGURES = ("train_loss", "val_loss", "hellaswag_acc_norm")  # drawn; "tokens" may be the x axis too


def parse_record(line):
    """The record on a line of metrics.jsonl; None where there is none: not JSON (cut short, not
    UTF-8), not an object, no whole step >= 0, or tokens or a figure neither a number nor null (null
    is how the trainer writes a NaN loss: no point, but no damage)."""
    try:
        record = parse_nested(json.loads, line)
    except ValueError:  # not JSON, not UTF-8, or nested past Python's stack
        return None
    if not isinstance(record, dict):
        return None
    if not (isinstance(record.get("step"), int) and is_count(record["step"])):
        return None
    if record.get("tokens") is not None and not is_count(record["tokens"]):
        return None
    if any(record.get(key) is not None and not is_number(record[key]) for key in FIGURES):
        return None
    return record


def is_number(value):
    """A finite int or float that a plot can take: not a bool (JSON's true is no figure), not NaN or
    infinity (which Python's json reads), not an int too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def is_count(value):
    """A step or a number of tokens: a finite number >= 0 (tokens per step divides by step + 1)."""
    return is_number(value) and value >= 0


def skipped(damaged):
    """The damaged lines of a file, as its warning or error says them."""
    lines = "line" if len(damaged) == 1 else "lines"
    return f"{len(damaged)} damaged {lines} skipped (first: line {damaged[0]})"


def series(records, key, x="step"):
    """(xs, values) of key in step order, xs the records' steps (x="step") or tokens (x="tokens"); a step logged
    twice (a run resumed from an earlier checkpoint) keeps its latest record."""
    by_step = {r["step"]: r for r in records if r.get(key) is not None and r.get(x) is not None}
    steps = sorted(by_step)
    return [by_step[s][x] for s in steps], [by_step[s][key] for s in steps]


def tokens_per_step(records):
    """From the train records, which hold the tokens seen after step + 1 steps; None if not logged."""
    ratios = {r["tokens"] / (r["step"] + 1) for r in records if "train_loss" in r and r.get("tokens")}
    return ratios.pop() if len(ratios) == 1 else None


def read_json(path):
    """The JSON value in the file path, None where there is no such file; a damaged one (unreadable,
    not JSON) is a ValueError saying so."""
    try:
        text = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise ValueError(f"cannot be read ({e.strerror or e})") from None
    except ValueError:  # from a --data that no path holds
        raise ValueError("cannot be read (a NUL in its name)") from None
    try:
        return parse_nested(json.loads, text)
    except ValueError:
        raise ValueError("is not JSON") from None


def run_data(metrics_path):
    """The --data of the run whose metrics.jsonl this is, from the config.json beside it, where the run's
    tokens are GPT-2's; None if not (a --tokenizer of its own: its losses are per other tokens) or unknown:
    no config.json, or a damaged one, which gets a warning."""
    path = Path(metrics_path).parent / "config.json"
    try:
        config = read_json(path)
        if config is None:  # a run from before the trainer wrote it
            return None
        if isinstance(config, dict) and isinstance(config.get("data"), str):
            return config["data"] if config.get("tokenizer", "gpt2") == "gpt2" else None
        damage = "has no data string" if isinstance(config, dict) else "is not a JSON object"
    except ValueError as e:
        damage = str(e)
    warn(f"{path} {damage}: the run's --data is unknown, so it is not taken for a FineWeb run")
    return None


def is_fineweb(data):
    """Whether --data names FineWeb shards: a directory named *fineweb* (any case), or one whose manifest.json
    (fineweb.py's) names a FineWeb dataset. A text file such as input.txt is not."""
    try:
        if data is None or Path(data).is_file():
            return False
    except OSError:  # a name too long for a path
        return False
    if "fineweb" in Path(data).name.lower():
        return True
    path = Path(data) / "manifest.json"
    try:
        manifest = read_json(path)
        if manifest is None:  # shards not made by fineweb.py, or not on this machine
            return False
        source = manifest.get("source") if isinstance(manifest, dict) else None
        if isinstance(source, dict) and isinstance(source.get("dataset"), str):
            return "fineweb" in source["dataset"].lower()
        damage = "names no source dataset"
    except ValueError as e:
        damage = str(e)
    warn(f"{path} {damage}: {data} is not taken for FineWeb shards")
    return False


def x_axis(runs):
    """The scale the runs share: ("step", tokens per step) when every run logged one constant tokens per step,
    ("tokens", None) when they differ (steps of different sizes do not compare) and every run logged its
    tokens, else ("step", None): steps alone, for logs from before tokens were counted."""
    ratios = {tokens_per_step(records) for _, records in runs}
    if len(ratios) == 1 and None not in ratios:
        return "step", ratios.pop()
    logged = lambda records: all("tokens" in r for r in records if "train_loss" in r or "val_loss" in r)
    if all(logged(records) for _, records in runs):
        return "tokens", None
    return "step", None


def zoomed_loss_limits(runs, x, floor=None):
    """(bottom, top) of the loss axis zoomed to the trained part (--y zoom): from the lowest loss (or floor, a
    baseline drawn beside them) to the highest after the first tenth of each run's steps (or tokens), with 5%
    to spare; None where there is no loss."""
    lowest, trained = [] if floor is None else [floor], []
    for _, records in runs:
        points = [point for key in ("train_loss", "val_loss") for point in zip(*series(records, key, x))]
        if not points:
            continue
        first, last = min(at for at, _ in points), max(at for at, _ in points)
        lowest += [loss for _, loss in points]
        trained += [loss for at, loss in points if at >= first + UNTRAINED * (last - first)]
    if not trained:
        return None
    bottom, top = min(lowest), max(trained)
    margin = 0.05 * (top - bottom) or 0.05 * abs(top) or 0.1
    return bottom - margin, top + margin


def run_labels(paths):
    """Each run's folder name, or its whole path where two runs share a name."""
    names = [Path(p).resolve().parent.name for p in paths]
    return [name if names.count(name) == 1 else str(Path(p).parent) for name, p in zip(names, paths)]


# -----------------------------------------------------------------------------
# Drawing


def plot_runs(paths, out, y="zoom"):
    """Draw the runs of the metrics.jsonl files in paths into the PNG out, replacing it atomically. y: the
    loss axis, one of Y_AXES."""
    if not Path(out).name:  # "/" or ".": atomic_write needs a file name to put its temporary beside
        example = Path(out) / "plot.png"
        raise UserError(f"--out {out} names no file: pass a .png path, such as {example}")
    fig = figure(paths, y)
    import matplotlib.pyplot as plt
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=DPI))  # a viewer never sees half a PNG
    except OSError as e:
        why = e.strerror or e
        raise UserError(f"{out} cannot be written ({why}): pass a writable .png path to --out") from None
    finally:
        plt.close(fig)


def figure(paths, y="zoom"):
    """The matplotlib figure of the runs of the metrics.jsonl files in paths, its loss axis as y says (one of
    Y_AXES). A run with nothing to draw is refused; one with damaged lines gets a warning and is drawn from
    the rest."""
    reads = [read_run(path) for path in paths]
    for path, (records, damaged) in zip(paths, reads):
        if not any(series(records, key)[0] for key in ("train_loss", "val_loss")):
            if damaged:
                fix = "mend the file or leave the run out"
                raise UserError(f"no losses in {path}, {skipped(damaged)}: {fix}")
            fix = "plot a run after its first log line, or leave it out"
            raise UserError(f"no losses in {path} yet: {fix}")
    for path, (_, damaged) in zip(paths, reads):
        if damaged:
            warn(f"{path}: {skipped(damaged)}")
    runs = list(zip(run_labels(paths), (records for records, _ in reads)))
    datas = dict.fromkeys(run_data(path) for path in paths)  # shared shards: read, warned of, once
    return draw(runs, fineweb=any([is_fineweb(data) for data in datas]), y=y)


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def draw(runs, fineweb, y="zoom"):
    """A matplotlib figure of runs, [(label, records)]: a loss panel, and a HellaSwag panel where a run has
    HellaSwag. fineweb: draw GPT-2 124M's FineWeb-Edu val loss. y: the loss axis, one of Y_AXES."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
        from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter, ScalarFormatter
    except ImportError:
        raise MatplotlibMissing("plot.py needs matplotlib: pip install matplotlib") from None

    x, ratio = x_axis(runs)
    with_hellaswag = any(series(records, "hellaswag_acc_norm")[0] for _, records in runs)
    panels = 2 if with_hellaswag else 1
    fig, axes = plt.subplots(1, panels, figsize=(PANEL_INCHES[0] * panels, PANEL_INCHES[1]), dpi=DPI,
                             squeeze=False)
    loss_ax = axes[0][0]
    for i, (label, records) in enumerate(runs):
        color = f"C{i % 10}"
        loss_ax.plot(*series(records, "train_loss", x), color=color, alpha=0.4, lw=1, label=f"{label} train")
        loss_ax.plot(*series(records, "val_loss", x), color=color, lw=2, marker=".", label=f"{label} val")
    if fineweb:
        loss_ax.axhline(GPT2_124M_VAL_LOSS, color="r", ls="--", lw=1, label="OpenAI GPT-2 124M val (FineWeb-Edu)")
    loss_ax.set(xlabel=x, ylabel="loss", title="loss")
    limits = zoomed_loss_limits(runs, x, GPT2_124M_VAL_LOSS if fineweb else None) if y == "zoom" else None
    if limits is not None:
        loss_ax.set_ylim(*limits)
        loss_ax.set_title("loss (zoomed past each run's first tenth; --y full: all)")
    if y == "log":  # a tick at every whole loss: a decade of 1 to 10 would have none between
        loss_ax.set_yscale("log")
        loss_ax.yaxis.set_major_locator(LogLocator(subs=range(1, 10)))
        loss_ax.yaxis.set_major_formatter(ScalarFormatter())
        loss_ax.yaxis.set_minor_formatter(NullFormatter())
    if ratio is not None:
        top = loss_ax.secondary_xaxis("top", functions=(lambda s: s * ratio, lambda t: t / ratio))
        top.set_xlabel("tokens")
        top.xaxis.set_major_formatter(EngFormatter())
    if x == "tokens":
        loss_ax.xaxis.set_major_formatter(EngFormatter())
    if with_hellaswag:
        acc_ax = axes[0][1]
        for i, (label, records) in enumerate(runs):
            acc_ax.plot(*series(records, "hellaswag_acc_norm", x), color=f"C{i % 10}", lw=2, marker=".",
                        label=label)
        acc_ax.axhline(GPT2_124M_HELLASWAG, color="r", ls="--", lw=1, label="OpenAI GPT-2 124M")
        acc_ax.set(xlabel=x, ylabel="acc_norm", title="HellaSwag")
        if x == "tokens":
            acc_ax.xaxis.set_major_formatter(EngFormatter())
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


# -----------------------------------------------------------------------------
# Entry point


def default_out(paths):
    """Where the picture goes without --out: one run's beside its metrics.jsonl, as the trainer's --plot
    writes it; a comparison of several runs belongs to none of them, so it goes in the current folder."""
    return Path(paths[0]).with_name("plot.png") if len(paths) == 1 else Path("compare.png")


def run_metrics(run):
    """A run's metrics.jsonl: the file itself, or the one in a run directory."""
    return Path(run) / "metrics.jsonl" if Path(run).is_dir() else Path(run)


def build_parser():
    parser = OneLineParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    parser.add_argument("metrics", nargs="+", metavar="run", type=parse_path,
                        help="runs, one per line drawn: a run's --out_dir, or the metrics.jsonl in it")
    parser.add_argument("--y", choices=Y_AXES, default="zoom",
                        help="the loss axis: zoom (from the lowest loss to the highest after each run's first "
                             "tenth), full (every loss) or log (every loss, on a log scale)")
    parser.add_argument("--out", type=parse_path,
                        help="the PNG to write (default: plot.png beside the metrics.jsonl of a single run, "
                             "compare.png in the current folder for several runs)")
    return parser


def main(argv=None):
    def command():
        args = build_parser().parse_args(argv)
        paths = [run_metrics(run) for run in args.metrics]
        out = args.out or default_out(paths)
        try:
            plot_runs(paths, out, args.y)
        except MatplotlibMissing as e:
            raise UserError(str(e)) from None
        print(f"wrote {out}")
    run_command(command)


if __name__ == "__main__":
    main()
