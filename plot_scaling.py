"""
Plot the measurements of mamba_distill.py and sample.py: accuracy against time, decode speed, losses.

Reads what the other scripts wrote under one output directory (see their docstrings' "Outputs") and
writes PNGs into <out_dir>/plots/, and the same numbers as tables on stdout. It imports neither torch
nor the project's other files: it draws on any machine with matplotlib and numpy.

Run:
  python plot_scaling.py                     # reads out/, writes out/plots/*.png
  python plot_scaling.py --out_dir runs/h100 --dpi 200 --smooth 20
  python plot_scaling.py --help              # every option of PlotConfig below

Figures (a figure whose input files are absent is skipped with a one-line note naming them):
  accuracy_vs_time.png   the paper's headline figure: coverage@k and majority-vote accuracy@k against
                         the measured time each model needed to draw k samples of every problem (one
                         GPU each); the title states the computed takeaway. Input: <out_dir>/eval/*/summary.json.
  accuracy_vs_k.png      the same two accuracies against k (log2 axis): what each model's samples are
                         worth, whatever they cost. Same input.
  accuracy_vs_time_gpus.png   a model drawn on 1 GPU and on several (torchrun): the same samples,
                         sooner. Drawn when eval summaries of one checkpoint have different 'gpus'.
  decode_throughput.png  tokens/s of sample.py --bench per card and model shape, against generation
                         length (largest batch) and batch size; dashed: the memory-bandwidth roofline;
                         black markers: HF transformers' generate. Input: <out_dir>/bench/decode*.json.
  distill_loss.png       training loss against wall time, a panel per stage, colour by model, dashed =
                         random mixer init, open markers = held-out loss. Input: <out_dir>/logs/*.jsonl.

Tables on stdout: the same numbers; the equal-time comparison; where the wrong samples (a model's
samples.jsonl, on the data file its summary names) and the greedy solutions of mamba_distill.py
(<out_dir>/greedy/*.jsonl, on the test file distill_summary.json names: so a run that sampled nothing yet
says where its chains break) first leave the gold solution; their accuracy by the number of steps a
problem takes (where the data rows say it, as the synthetic tasks' do); and the kinds of solution line
that hold most of each student's held-out KL (<out_dir>/kl_by_line/).

Bad input (a malformed json/jsonl line, a missing key, a bad flag) stops with one line naming file:line
or the flag, exit status 2; if no figure at all could be drawn the script exits with status 1.

Glossary: k samples per problem, b batch size (sequences decoded together), gen_len new tokens per
sequence, coverage@k = pass@k, majority@k = accuracy of the most frequent extracted answer of k.
"""
import argparse
import glob
import json
import os
import re
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass, field, fields

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, same output on every machine
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation  # noqa: E402


class InputError(Exception):
    """A bad input file or flag; the message names it (file:line where there is a line)."""


@dataclass
class PlotConfig:
    """Every option of this script; defaults read the default run's out/."""
    out_dir: str = field(default="out", metadata={"help": "directory mamba_distill.py and sample.py wrote"})
    plots_dir: str = field(default="", metadata={"help": "where the PNGs go (empty: <out_dir>/plots)"})
    dpi: int = field(default=150, metadata={"help": "resolution of the PNGs (dots per inch)"})
    smooth: int = field(default=1, metadata={"help": "loss curves: trailing mean over this many logged steps (1: raw)"})
    label_k: bool = field(default=True, metadata={"help": "accuracy-vs-time figure: write k next to each point"})


# -----------------------------------------------------------------------------
# Reading and checking the input files


def _bool(s):
    if s.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() == "true"


def parse_config(cls, argv=None, description=None):
    """--field value for every field of the dataclass (scan_kernel.py's parse_config needs torch)."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # a bad flag: one line and exit status 2, as every other bad input
    parser.error = lambda message: parser.exit(2, f"plot_scaling.py: error: {message} (see --help)\n")
    for f in fields(cls):
        parser.add_argument(f"--{f.name}", type=_bool if isinstance(f.default, bool) else type(f.default),
                            default=f.default, help=f.metadata.get("help", " "))
    return cls(**vars(parser.parse_args(argv)))


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None


def read_json(path, text=None, lineno=1):
    """The JSON object in file path, or in text: line lineno of path (errors name path:line)."""
    try:
        obj = json.loads(_read_text(path) if text is None else text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{lineno + e.lineno - 1}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_jsonl(path):
    """[(line number, dict)] for every non-blank line."""
    return [(lineno, read_json(path, line, lineno))
            for lineno, line in enumerate(_read_text(path).split("\n"), 1) if line.strip()]


def _number(value, key, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: '{key}' must be a number, got {value!r}")
    return float(value)


def _checked(rec, where, numbers=(), lists=(), present=()):
    """{key: float} for rec's numbers and {key: [float]} for its lists (non-empty); every key named must be there."""
    for key in (*present, *numbers, *lists):
        if key not in rec:
            raise InputError(f"{where}: missing key '{key}'")
    for key in lists:
        if not isinstance(rec[key], list) or not rec[key]:
            raise InputError(f"{where}: '{key}' must be a non-empty list of numbers")
    return ({key: _number(rec[key], key, where) for key in numbers}
            | {key: [_number(v, key, where) for v in rec[key]] for key in lists})


def read_eval_summaries(pattern):
    """One checked dict per eval summary.json (times positive: they go on a log axis)."""
    runs = []
    for path in sorted(glob.glob(pattern)):
        s = read_json(path)
        run = _checked(s, path, lists=("k", "coverage", "majority", "time_s"))
        if len({len(v) for v in run.values()}) != 1:
            raise InputError(f"{path}: 'k', 'coverage', 'majority' and 'time_s' must have the same length")
        for key in ("coverage", "majority"):
            if not all(0.0 <= v <= 1.0 for v in run[key]):
                raise InputError(f"{path}: '{key}' must hold fractions in [0, 1], got {run[key]}")
        if not all(k >= 1 and k == int(k) for k in run["k"]) or not all(t > 0 for t in run["time_s"]):
            raise InputError(f"{path}: 'k' must hold positive integers and 'time_s' positive seconds")
        run["k"] = [int(k) for k in run["k"]]
        gpus = s.get("gpus", 1)
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
            raise InputError(f"{path}: 'gpus' must be a positive whole number, got {gpus!r}")
        run.update(name=str(s.get("model", os.path.basename(os.path.dirname(path)))),
                   device=str(s.get("device", "unknown device")), n_problems=s.get("n_problems"), gpus=gpus,
                   checkpoint=os.path.normpath(str(s.get("checkpoint", path))), data=s.get("data"),
                   samples=os.path.join(os.path.dirname(path), "samples.jsonl"))
        runs.append(run)
    return sorted(runs, key=lambda r: paper_order(r["name"]))


def read_decode_bench(path):
    """decode.json checked: its dict with 'results' and 'hf_rows' (the HF runs that did not fail)."""
    bench = read_json(path)
    for part, numbers in (("results", ("batch", "prompt_len", "gen_len", "tokens_per_s", "roofline_tokens_per_s")),
                          ("hf", ("batch", "prompt_len", "gen_len", "tokens_per_s"))):
        if not isinstance(bench.get(part, []), list):
            raise InputError(f"{path}: '{part}' must be a list")
        for i, r in enumerate(bench.get(part, [])):
            where = f"{path}: {part}[{i}]"
            if not isinstance(r, dict):
                raise InputError(f"{where}: expected a JSON object")
            if part == "hf" and "error" in r:  # sample.py records a failed HF run this way: nothing to draw for it
                note(f"{where}: HF transformers' run failed ({str(r['error'])[:80]}); not drawn")
            else:
                _checked(r, where, numbers, present=("model", "shape") if part == "results" else ())
    return dict(bench, results=bench.get("results", []), hf_rows=[r for r in bench.get("hf", []) if "error" not in r])


def read_logs(pattern):
    """{(model, init, stage): [(time_s, loss, step, tokens, held-out loss or None)]} from every log .jsonl.
    A stage's step-0 line holds only the held-out loss before training (its loss is None)."""
    curves = {}
    for path in sorted(glob.glob(pattern)):
        for lineno, rec in read_jsonl(path):
            where = f"{path}:{lineno}"
            start = rec.get("step") == 0 and "loss" not in rec
            v = _checked(rec, where, ("time_s", "step") + (() if start else ("loss",)),
                         present=("model", "init", "stage"))
            held_out = _number(rec["held_out_loss"], "held_out_loss", where) if "held_out_loss" in rec else None
            if start and held_out is None:
                raise InputError(f"{where}: a step-0 line without 'loss' must hold 'held_out_loss'")
            point = (v["time_s"], v.get("loss"), int(v["step"]), rec.get("tokens"), held_out)
            curves.setdefault((str(rec["model"]), str(rec["init"]), str(rec["stage"])), []).append(point)
    return {key: sorted(points, key=lambda p: (p[0], p[2])) for key, points in curves.items()}  # by time, then step


# -----------------------------------------------------------------------------
# Shared look: one colour per model in every figure, models in the paper's order


MODEL_ORDER = ("teacher", "hybrid", "hybrid_random", "pure", "pure_random")
STAGES = {"teacher": "teacher training (cross-entropy)", "orient": "stage 0: matrix orientation (MSE)",
          "align": "stage 1: layer alignment (MSE)",
          "kl": "stage 2: distillation (KL to teacher)", "sft": "stage 3: fine-tuning (cross-entropy)"}


def paper_order(name, known=MODEL_ORDER):
    """Sort key: the known models (or, known=STAGES, stages) in the paper's order, then the others by name."""
    return (list(known).index(name), name) if name in known else (len(known), name)


def model_colours(names):
    """Known models get fixed tab10 colours, others the next free ones, so colours match across figures."""
    extra = sorted({n for n in names if n not in MODEL_ORDER})
    return {name: f"C{i % 10}" for i, name in enumerate((*MODEL_ORDER, *extra))}


def _distinct(values):
    """The distinct values, sorted, as one string: "a" or "a / b"."""
    return " / ".join(sorted({str(v) for v in values}))


class PlainLogFormatter(LogFormatterSciNotation):
    """matplotlib's choice of which log-axis ticks get a label, written 0.5, 200, 30k instead of 5x10^-1."""

    def __call__(self, x, pos=None):
        if not super().__call__(x, pos):
            return ""
        return f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k" if x >= 1e4 else f"{x:g}"


def style_axes(ax, title, xlabel, ylabel, xbase=None, ybase=None, grid="major", **title_kw):
    """A panel's title, labels and grid; an axis given a base (10 or 2) gets a log scale in plain numbers."""
    for set_scale, axis, base in ((ax.set_xscale, ax.xaxis, xbase), (ax.set_yscale, ax.yaxis, ybase)):
        if base:
            set_scale("log", base=base)
        if base == 2:
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 2, 4 ... 4096, not 2^12
        elif base:
            axis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
            axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
    ax.set_title(title, **title_kw)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, which=grid, alpha=0.3)


MARKERS, LINESTYLES = "os^vDP", ("-", "--", "-.", ":")
METRICS = {"coverage": ("coverage: any of k samples correct", "coverage@k = pass@k (% of problems)"),  # title, y label
           "majority": ("majority vote over k samples", "majority-vote accuracy@k (% of problems)")}
TIME_LABEL = "wall-clock time to draw k samples for every problem (s, log scale)"


def save_png(fig, path, dpi):
    """Atomic: a reader never sees half a PNG."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# Figures 1 and 2: coverage and majority-vote accuracy against time and against k


def metric_panels(height, xlabel, xbase):
    """The figure and its [(panel, metric)]: coverage left, majority vote right, one y axis labelled on both."""
    fig, axes = plt.subplots(1, 2, figsize=(13, height), sharey=True, layout="constrained")
    axes[1].yaxis.set_tick_params(labelleft=True)
    for ax, (title, ylabel) in zip(axes, METRICS.values()):
        style_axes(ax, title, xlabel, ylabel, xbase=xbase)
    return fig, list(zip(axes, METRICS))


def plot_accuracy(runs, x_key, path, cfg):
    """Coverage and majority vote against time (x_key "time_s", the headline figure) or against k."""
    colours = model_colours(r["name"] for r in runs)
    several_devices = len({r["device"] for r in runs}) > 1  # then each line names its own card
    by_time = x_key == "time_s"
    fig, panels = metric_panels(5.8, TIME_LABEL if by_time else "k = samples per problem (log2 scale)",
                                10 if by_time else 2)
    for ax, metric in panels:
        for i, run in enumerate(runs):
            # distinct markers and dashes, drawn in model order: a line under another still shows
            ax.plot(run[x_key], [100 * v for v in run[metric]], linestyle=LINESTYLES[i % len(LINESTYLES)],
                    marker=MARKERS[i % len(MARKERS)], color=colours[run["name"]], lw=1.6, ms=6, alpha=0.9,
                    zorder=3 + i, label=f"{run['name']} ({run['device']})" if several_devices else run["name"])
        if by_time:
            ax.margins(x=0.18)  # room for the k labels at both ends
        else:
            ax.set_xticks(sorted({k for r in runs for k in r["k"]}))
    counts = {r["n_problems"] for r in runs} - {None}
    details = ([f"{_distinct(counts)} problems"] if counts else []) + [runs[0]["device"]] * (not several_devices)
    if by_time:
        title = headline(runs) or "Accuracy against wall-clock time"
        sub = "points left to right: k = 1, 2, 4, ...; a faster model reaches a larger k in the same time"
    else:
        title, sub = "Accuracy against samples per problem k", "what each model's samples are worth, whatever they cost"
    fig.suptitle(textwrap.fill(title, 120) + f"\n{sub} ({', '.join(details)})", fontsize=11)
    fig.legend(handles=panels[0][0].lines, loc="outside lower center", ncol=min(len(runs), 6), title="model")
    if by_time and cfg.label_k:  # k only at both ends of each line
        fig.canvas.draw()  # the final layout: labels are placed in points
        for ax, metric in panels:
            for j, side in ((0, "left"), (-1, "right")):
                ends = [(r["time_s"][j], 100 * r[metric][j], f"k={r['k'][j]}", colours[r["name"]]) for r in runs]
                place_labels(ax, ends, side, [(t, 100 * v) for r in runs for t, v in zip(r["time_s"], r[metric])])
    save_png(fig, path, cfg.dpi)


def place_labels(ax, labels, side, markers, size=(34, 11)):
    """Write each (x, y, text, colour) beside its point, on the given side, moved up or down just enough
    (whichever is less) that it covers no label written before it and no other marker (markers: (x, y)
    of every point drawn); the lowest point's label goes first. A label is about `size` points (w, h)."""
    w, h = size

    def pts(xys):
        return ax.transData.transform([xy[:2] for xy in xys]) * 72 / ax.figure.dpi  # (n, 2) in points

    boxes = [(mx - 4, mx + 4, my - 4, my + 4) for mx, my in pts(markers)]  # x0, x1, y0, y1
    for (px, py), (x, y, text, colour) in sorted(zip(pts(labels), labels), key=lambda r: r[0][1]):
        x0 = px + 5 if side == "right" else px - 5 - w
        mine = (px - 4, px + 4, py - 4, py + 4)

        def free(ly):
            return not any(b != mine and x0 < b[1] and b[0] < x0 + w and ly - h / 2 < b[3] and b[2] < ly + h / 2
                           for b in boxes)
        # the nearest free height: 0, +1, -1, +2, -2, ... points (up first), at most 20 heights away
        ly = next((py + d for step in range(int(20 * h) + 1) for d in (step, -step) if free(py + d)), py + 20 * h)
        boxes.append((x0, x0 + w, ly - h / 2, ly + h / 2))
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(7 if side == "right" else -7, ly - py),
                    ha="left" if side == "right" else "right", va="center", fontsize=7.5, color=colour,
                    bbox=dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none", alpha=0.75), zorder=10)


def share_above(student, teacher, metric, points=400):
    """The share of the teacher's time range (log scale) in which the student's accuracy is above its;
    a model's accuracy at time t is that of the largest k it had drawn by then (none before its first)."""
    def at(run, t):
        done = [v for v, tk in zip(run[metric], run["time_s"]) if tk <= t]
        return done[-1] if done else None

    # the midpoints of `points` equal steps of log(time): every other one of 2 * points + 1 points
    times = np.geomspace(teacher["time_s"][0], teacher["time_s"][-1], 2 * points + 1)[1::2]
    pairs = [(at(student, t), at(teacher, t)) for t in times]
    return sum(s is not None and tc is not None and s > tc for s, tc in pairs) / points


def equal_time_table(runs):
    """Per student: how much faster it drew its samples than the teacher, and in what share of the
    teacher's time range its coverage / majority vote lie above the teacher's. [] without a teacher."""
    teacher = next((r for r in runs if r["name"] == "teacher"), None)
    if teacher is None:
        return []
    return [(r["name"], teacher["time_s"][-1] / r["time_s"][-1] if r["k"][-1] == teacher["k"][-1] else None,
             *(share_above(r, teacher, metric) for metric in METRICS)) for r in runs if r is not teacher]


def headline(runs):
    """The headline figure's title: its takeaway, computed from the runs (None without a teacher): the best
    transferred student against the teacher at equal time, or that it has not learnt the task."""
    rows = [r for r in equal_time_table(runs) if r[1] is not None]
    # the takeaway is about the students the paper makes; a random-init baseline only when there is nothing else
    rows = [r for r in rows if not r[0].endswith("_random")] or rows
    if not rows:
        return None
    name, speed, cov, maj = max(rows, key=lambda r: r[2] + r[3])
    first = {r["name"]: r["coverage"][0] for r in runs}  # each model's share of right answers at the smallest k
    if first[name] < 0.5 * first["teacher"]:  # a student that failed to learn the task: no comparison to draw
        return (f"The {name} student has not learnt the task: {100 * first[name]:.1f}% of its samples are right "
                f"against the teacher's {100 * first['teacher']:.1f}% (it draws them {speed:.1f}x faster)")
    verdict = "beats" if min(cov, maj) > 0.5 else "does not beat"
    return (f"At equal wall-clock time the {name} student {verdict} its teacher: it draws its samples {speed:.1f}x "
            f"faster and is ahead for {100 * cov:.0f}% (coverage) / {100 * maj:.0f}% (majority vote) of the time range")


def gpu_pairs(runs):
    """[(1-GPU run, N-GPU run, speed-up at the largest k)] of the same checkpoint and sampling settings."""
    return [(one, many, one["time_s"][-1] / many["time_s"][-1]) for one in runs if one["gpus"] == 1 for many in runs
            if many["gpus"] > 1 and many["checkpoint"] == one["checkpoint"] and many["k"] == one["k"]]


def plot_gpus(pairs, path, cfg):
    """Each model drawn on 1 GPU and on N GPUs (torchrun): the same accuracies, sooner."""
    colours = model_colours(one["name"] for one, _, _ in pairs)
    fig, panels = metric_panels(5.5, TIME_LABEL, 10)
    for ax, metric in panels:
        for one, many, _ in pairs:
            for run, style in ((one, "-o"), (many, "--s")):
                ax.plot(run["time_s"], [100 * v for v in run[metric]], style, color=colours[one["name"]],
                        label=f"{one['name']}, {run['gpus']} GPU{'s' * (run['gpus'] > 1)}")
    speedups = ", ".join(f"{one['name']} {s:.2f}x" for one, _, s in pairs)
    fig.suptitle(f"The same draw on 1 GPU (solid) and on several GPUs of one host (dashed, torchrun): {speedups} at "
                 f"the largest k\n({_distinct(r['device'] for one, many, _ in pairs for r in (one, many))})")
    fig.legend(handles=panels[0][0].lines, loc="outside lower center", ncol=min(2 * len(pairs), 8))
    save_png(fig, path, cfg.dpi)


# -----------------------------------------------------------------------------
# Tables: where wrong solutions leave the gold one, where a student's KL to its teacher lies


def line_kind(line, names):
    """A solution line's kind: its first four words, with numbers as # and names as X."""
    words = [w.rstrip(":,.") for w in line.split()[:4]]
    return " ".join("X" if w in names else re.sub(r"\d+", "#", w) for w in words)


def question_names(question):
    """The names in a question: its capitalised words seen at least twice."""
    counts = Counter(w.strip(",.?!") for w in question.split())
    return {w for w, n in counts.items() if w[:1].isupper() and n >= 2}


def chain_breaks(run):
    """Where a run's wrong samples first leave the gold worked solution (meaningful when the gold is in the
    model's own format, as in the synthetic tasks): the first line whose numbers differ from the gold's (a
    name slip that leaves every number right does not change the answer). A table row: the wrong samples,
    their share in each tenth of the gold solution, the commonest kinds of line where they break, each
    with the kind the sample wrote there when that starts with another word (e.g. the answer line where
    the gold has another turn: a wrong decision to stop, not a wrong sum); or None."""
    if not (gold := gold_rows(run)):
        return None
    tenths, kinds = [0] * 10, Counter()
    for s in run_samples(run, gold):
        if s.get("correct"):
            continue
        lines, text = gold[s["problem"]]["answer"].split("\n"), s["text"].split("\n")
        i = next((i for i, (g, t) in enumerate(zip(lines, text)) if re.findall(r"\d+", g) != re.findall(r"\d+", t)),
                 min(len(lines), len(text)))
        tenths[min(9, 10 * i // len(lines))] += 1
        names = question_names(gold[s["problem"]]["question"])
        kind = f"'{line_kind(lines[i], names)}'" if i < len(lines) else "(after the end)"
        if i < len(lines) and (wrote := other_kind(lines, i, text[i] if i < len(text) else None, names)):
            kind += f" wrote {wrote}"
        kinds[kind] += 1
    wrong = sum(tenths)
    return (run["name"], wrong, " ".join(f"{100 * (t / wrong):.0f}" for t in tenths),
            ", ".join(f"{kind} {100 * n / wrong:.0f}%" for kind, n in kinds.most_common(3))) if wrong else None


def other_kind(gold_lines, i, written, names):
    """What a sample wrote where it left gold line i, when that is another kind of line (another first
    word): its kind, quoted, or "(the end)" for a sample that stopped there; None for the same kind. A
    capitalised word that starts no gold line is a name, one the model may have made up."""
    if written is None:
        return "(the end)"
    starts = {line.split(" ")[0].rstrip(":,.") for line in gold_lines} - names  # "Turn", "After", ...
    made_up = {w.rstrip(":,.") for w in written.split() if w[:1].isupper()} - starts
    wrote = line_kind(written, names | made_up)
    return None if wrote.split(" ")[0] == line_kind(gold_lines[i], names).split(" ")[0] else f"'{wrote}'"


def gold_rows(run):
    """The data rows a run's samples answer, or [] where its data or samples file is not here."""
    if not (run["data"] and os.path.isfile(run["data"]) and os.path.isfile(run["samples"])):
        return []
    return [row for _, row in read_jsonl(run["data"])]


def run_samples(run, gold):
    """A run's samples, each checked to name a row of gold ('problem') and to hold its 'text'."""
    for lineno, s in read_jsonl(run["samples"]):
        if not isinstance(s.get("problem"), int) or not 0 <= s["problem"] < len(gold) or "text" not in s:
            raise InputError(f"{run['samples']}:{lineno}: needs 'problem' (a row of {run['data']}) and 'text'")
        yield s


def by_steps(run):
    """A run's accuracy split by the number of steps its problems take (the synthetic tasks' rows say it,
    'steps'): {steps: (share of samples right, share of problems with a right sample)}; None where the
    data rows do not say it. Mistakes compound with length: the first share falls as steps grow, and the
    second shows how much more samples win back."""
    gold = gold_rows(run)
    if not gold or not all(isinstance(row.get("steps"), int) for row in gold):
        return None
    drawn, right, solved = Counter(), Counter(), {}
    for s in run_samples(run, gold):
        n = gold[s["problem"]]["steps"]
        drawn[n] += 1
        right[n] += bool(s.get("correct"))
        solved[s["problem"]] = solved.get(s["problem"], False) or bool(s.get("correct"))
    problems = Counter(gold[p]["steps"] for p in solved)
    wins = Counter(gold[p]["steps"] for p, ok in solved.items() if ok)
    return {n: (right[n] / drawn[n], wins[n] / problems[n]) for n in drawn}


def steps_table(runs):
    """Accuracy by the number of steps, a row per run: the % of samples right, and where a problem had
    several samples, / the % of problems that any of them solved."""
    split = [(run, shares) for run in runs if (shares := by_steps(run))]
    steps = sorted({n for _, shares in split for n in shares})

    def cell(run, shares, n):
        if n not in shares:
            return "-"
        right, solved = shares[n]
        return f"{100 * right:.0f}" if run.get("greedy") else f"{100 * right:.0f} / {100 * solved:.0f}"

    rows = [(run["name"], *(cell(run, shares, n) for n in steps)) for run, shares in split]
    return ("model", *(f"{n} steps" for n in steps)), rows


def breaks_table(runs):
    return (("model", "wrong samples", "% in each tenth of the solution", "commonest first wrong lines"),
            [row for row in map(chain_breaks, runs) if row])


def greedy_runs(out_dir):
    """The greedy solutions mamba_distill.py wrote (greedy/<model>.jsonl), as runs for chain_breaks."""
    path = os.path.join(out_dir, "distill_summary.json")
    if not os.path.isfile(path):
        return []
    summary = read_json(path)
    if not isinstance(summary.get("models"), dict):
        raise InputError(f"{path}: expected an object with a 'models' object")
    test = (summary.get("config") or {}).get("test_data") or os.path.join(out_dir, "data", "test.jsonl")
    return [{"name": m, "data": test, "samples": os.path.join(out_dir, "greedy", f"{m}.jsonl"), "greedy": True}
            for m in sorted(summary["models"], key=paper_order)]


def kl_lines_table(pattern):
    """Where each student's held-out KL to its teacher lies (mamba_distill.py's kl_by_line/<model>.jsonl):
    its KL per solution token, and the kinds of line holding most of it, with their share and KL per token."""
    rows = []
    for path in sorted(glob.glob(pattern), key=lambda p: paper_order(os.path.basename(p)[:-len(".jsonl")])):
        kl, tokens = Counter(), Counter()
        for lineno, r in read_jsonl(path):
            where = f"{path}:{lineno}"
            v = _checked(r, where, lists=("kl", "tokens"), present=("prompt", "lines"))
            if not isinstance(r["lines"], list) or not len(r["lines"]) == len(v["kl"]) == len(v["tokens"]):
                raise InputError(f"{where}: 'lines', 'kl' and 'tokens' must be lists of one length")
            names = question_names(str(r["prompt"]))
            for line, k, n in zip(r["lines"], v["kl"], v["tokens"]):
                kind = line_kind(str(line), names)
                kl[kind] += k
                tokens[kind] += n
        total = sum(kl.values())
        top = ", ".join(f"'{kind}' {100 * k / total:.0f}% ({k / max(tokens[kind], 1):.3f})"
                        for kind, k in kl.most_common(4)) if total > 0 else "-"
        rows.append((os.path.basename(path)[:-len(".jsonl")], f"{total / max(sum(tokens.values()), 1):.4f}", top))
    return ("model", "KL per token", "lines holding most of it: kind, share (KL per token there)"), rows


# -----------------------------------------------------------------------------
# Figure 3: decode throughput against batch size and generation length


def _method(row):
    """How sample.py --bench measured a row; rows without a 'method' timed whole generate calls."""
    return row.get("method", "generate")


def batch_sweep(rows):
    """The whole generate calls at the (prompt_len, gen_len) that measured the most batch sizes (the
    shortest gen_len on a tie); [] where that is fewer than two."""
    at = {}  # (prompt_len, gen_len) -> its generate rows
    for r in rows:
        if _method(r) == "generate":
            at.setdefault((r["prompt_len"], r["gen_len"]), []).append(r)
    best = min(at.values(), key=lambda rs: (-len({r["batch"] for r in rs}), rs[0]["gen_len"]), default=[])
    return best if len({r["batch"] for r in best}) > 1 else []


def length_method(rows):
    """The one way of measuring that a length panel draws: the one that measured the most (model,
    gen_len) points, so that a batch sweep of whole generate calls at one length does not win."""
    return max(sorted({_method(r) for r in rows}),
               key=lambda method: len({(r["model"], r["gen_len"]) for r in rows if _method(r) == method}))


def _length_sweep(rows):
    """For each gen_len of one model/shape, the row with the largest batch (the paper's 'largest batch
    that fits'); prompt_len fixed to the most common one."""
    prompt = max({r["prompt_len"] for r in rows}, key=lambda p: sum(r["prompt_len"] == p for r in rows))
    largest = {r["gen_len"]: r for r in sorted(rows, key=lambda r: r["batch"]) if r["prompt_len"] == prompt}
    return [largest[g] for g in sorted(largest)]


def crossover(student, teacher):
    """The shortest gen_len at which the student's tokens/s pass the teacher's (sorted sweeps), or None."""
    teacher_at = {r["gen_len"]: r["tokens_per_s"] for r in teacher}
    return next((r["gen_len"] for r in student if r["gen_len"] in teacher_at
                 and r["tokens_per_s"] > teacher_at[r["gen_len"]]), None)


def plot_decode(benches, path, cfg):
    """A row of panels per (card, model shape): tokens/s against generation length at the largest batch,
    and against batch size where a batch sweep was measured."""
    panels = [(bench, shape, [r for r in bench["results"] if r["shape"] == shape])  # (bench, shape, its rows)
              for bench in benches for shape in sorted({r["shape"] for r in bench["results"]})]
    models = sorted({r["model"] for _, _, rows in panels for r in rows}, key=paper_order)
    colours = model_colours(models)
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(models)}
    ncols = 2 if any(batch_sweep(rows) for _, _, rows in panels) else 1
    fig = plt.figure(figsize=(6.5 * ncols, 4.6 * len(panels) + 1.2), layout="constrained")

    def draw_rates(cell, x_key, rows, title, xlabel):
        """A new panel in grid cell `cell` (1, 2, ... row by row): each model's tokens/s (solid) and its
        roofline (dashed) against x_key."""
        ax = fig.add_subplot(len(panels), ncols, cell)
        for model in models:
            rs = sorted((r for r in rows if r["model"] == model), key=lambda r: r[x_key])
            xs = [r[x_key] for r in rs]
            ax.plot(xs, [r["tokens_per_s"] for r in rs], marker=markers[model], color=colours[model], lw=1.6)
            ax.plot(xs, [r["roofline_tokens_per_s"] for r in rs], "--", color=colours[model], alpha=0.5, lw=1)
        style_axes(ax, title, xlabel, "generated tokens/s (log scale)", xbase=2, ybase=10, fontsize=10)
        ax.margins(x=0.06, y=0.08)
        return ax

    for i, (bench, shape, rows) in enumerate(panels):
        method = length_method(rows)
        lengths = {m: _length_sweep(rs) for m in models
                   if (rs := [r for r in rows if r["model"] == m and _method(r) == method])}
        drawn = [r for rs in lengths.values() for r in rs]
        step = {True: "compiled step", False: "eager step"}.get(bench.get("compile"), "step")
        ax = draw_rates(ncols * i + 1, "gen_len", drawn, f"{shape} on {bench.get('device', '?')}, "
                        f"{bench.get('date', '?')}: against generation length\n"
                        f"(batch {_distinct(r['batch'] for r in drawn)}; {method}; {step})",
                        "generated tokens per sequence, gen_len (log2 scale)")
        notes = [f"{s}: faster than the teacher from {c:g} new tokens" for s, rs in lengths.items()
                 if s != "teacher" and "teacher" in lengths and (c := crossover(rs, lengths["teacher"]))]
        if notes:  # as a legend without handles: "best" keeps it off the points and lines
            ax.legend([Line2D([], [], linestyle="none")] * len(notes), notes, loc="best", fontsize=8,
                      handlelength=0, handletextpad=0, framealpha=0.75)
        if not (sweep := batch_sweep(rows)):  # no batch sweep for this card and shape: its batch cell stays empty
            continue
        ax = draw_rates(ncols * i + 2, "batch", sweep, f"{shape}: against batch size\n(prompt "
                        f"{sweep[0]['prompt_len']:g}, {sweep[0]['gen_len']:g} new tokens; whole generate calls)",
                        "batch size b = sequences decoded together (log2 scale)")
        # sample.py runs HF transformers' generate on llama-3.2-1b only, at one batch and length
        hf = [h for h in bench.get("hf_rows", []) if h["gen_len"] == sweep[0]["gen_len"] and shape == "llama-3.2-1b"]
        for h in hf:
            ax.plot([h["batch"]], [h["tokens_per_s"]], "kX" if h.get("cache") == "static" else "kP", ms=9,
                    label=f"HF generate, {h.get('cache', '?')} cache")
        if hf:
            ax.legend(fontsize=8, loc="upper left")
    handles = [Line2D([], [], color=colours[m], marker=markers[m], label=m) for m in models]
    handles.append(Line2D([], [], color="grey", linestyle="--",
                          label="roofline: bytes a step must move / measured copy bandwidth"))
    fig.suptitle("Decode throughput: whole batches, prefill and decode, random weights, bf16")
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9)
    save_png(fig, path, cfg.dpi)


def decode_table(rows, hf):
    """tokens/s of whole generate calls; the decode steps' own rates where sample.py recorded them. HF
    transformers' runs (hf) come last, named by their cache."""
    numbers = {"batch": "g", "prompt_len": "g", "gen_len": "g", "tokens_per_s": ".0f", "decode_tokens_per_s": ".0f",
               "roofline_tokens_per_s": ".0f", "roofline_frac": ".2f", "peak_mem_GB": ".1f"}  # key: format
    table = [(r.get("model", f"HF {r.get('cache', '?')}"), r.get("shape", ""),
              *(_cell(r.get(key), spec) for key, spec in numbers.items()))
             for r in sorted(rows, key=lambda r: (r["shape"], paper_order(r["model"]), r["gen_len"], r["batch"])) + hf]
    return (("model", "shape", "batch", "prompt", "gen_len", "tokens/s", "decode tok/s", "roofline tok/s",
             "of roofline", "peak mem GB"), table)


# -----------------------------------------------------------------------------
# Figure 4: distillation loss curves


def _moving_average(values, window):
    """Trailing mean over `window` points (fewer at the start), so a curve starts where the log starts."""
    return [np.mean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def plot_losses(curves, path, cfg):
    stages = sorted({s for _, _, s in curves}, key=lambda s: paper_order(s, STAGES))
    models = sorted({m for m, _, _ in curves}, key=paper_order)
    # the init flag is about the students' mixers: the teacher's own training is drawn solid whatever it logs
    inits = sorted({i for _, i, s in curves if s != "teacher"}, key=lambda i: (i != "attention", i))
    colours = model_colours(models)
    dashes = {init: LINESTYLES[i % len(LINESTYLES)] for i, init in enumerate(inits)}
    ncols = len(stages) if len(stages) <= 3 else 2  # four panels as 2 x 2 stay readable when shrunk
    nrows = -(-len(stages) // ncols)  # rounded up
    fig = plt.figure(figsize=(max(7, 5.5 * ncols), 0.8 + 4.2 * nrows), layout="constrained")
    panel = {stage: fig.add_subplot(nrows, ncols, i + 1) for i, stage in enumerate(stages)}
    for (model, init, stage), points in sorted(curves.items(), key=lambda kv: paper_order(kv[0][0])):
        times, losses = [p[0] for p in points if p[1] is not None], [p[1] for p in points if p[1] is not None]
        held = [(p[0], p[4]) for p in points if p[4] is not None]
        panel[stage].plot(times, _moving_average(losses, cfg.smooth), "-" if stage == "teacher" else dashes[init],
                          color=colours[model], lw=1.5)
        if held:  # the held-out loss as open markers on the training curve's colour
            panel[stage].plot(*zip(*held), "o", color=colours[model], mfc="white", ms=5, zorder=3)
    for stage, ax in panel.items():
        positive = ax.dataLim.ymin > 0  # every loss drawn is positive: a log axis
        style_axes(ax, STAGES.get(stage, f"stage '{stage}'"), "wall-clock time since the model's run started (s)",
                   "loss (log scale)" if positive else "loss", ybase=10 if positive else None, grid="both")
    handles = [Line2D([], [], color=colours[m], lw=2, label=m) for m in models]
    handles += [Line2D([], [], color="black", linestyle=dashes[i], label=f"student mixer: {i} init") for i in inits]
    if any(p[4] is not None for points in curves.values() for p in points):
        handles.append(Line2D([], [], color="black", marker="o", mfc="white", linestyle="none",
                              label="held-out loss (lines: training)"))
    smooth = f"\n(moving average over {cfg.smooth} logged steps)" if cfg.smooth > 1 else ""
    fig.suptitle(f"Distillation loss curves: student mixers initialised from attention vs random{smooth}")
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 2 * ncols))  # wraps, never clipped
    save_png(fig, path, cfg.dpi)


def loss_table(curves):
    rows = []
    for model, init, stage in sorted(curves, key=lambda k: (paper_order(k[0]), k[1], paper_order(k[2], STAGES))):
        points = curves[model, init, stage]
        t, loss, step, tokens, _ = points[-1]
        losses = [p[1] for p in points if p[1] is not None]
        held = [p[4] for p in points if p[4] is not None and p[1] is not None]  # during training
        start = points[0][4] if points[0][1] is None else None  # the step-0 line: held-out before training
        rows.append((model, init, stage, len(losses), step, _cell(tokens, "g"), *(_cell(v, ".4g") for v in (
            start, losses[0] if losses else None, loss, held[-1] if held else None)), f"{t:.1f}"))
    return (("model", "init", "stage", "logged", "last step", "tokens", "held-out at start", "first loss",
             "final loss", "held-out", "time s"), rows)


# -----------------------------------------------------------------------------
# Tables and the main routine


def _cell(value, spec):
    """A table cell: value in format spec, or "-" where it is not a number (absent, None)."""
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def print_table(title, headers, rows):
    """The title, then the rows under their headers in aligned columns (nothing without rows)."""
    if not rows:
        return
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    print(f"== {title} ==", lines[0], "-" * len(lines[0]), *lines[1:], sep="\n", end="\n\n")


def make_plots(cfg):
    """Draw every figure whose inputs exist (tables to stdout, a note per skipped figure to stderr);
    returns the PNG paths. Every input is checked first: a malformed file leaves the plots untouched."""
    if cfg.dpi <= 0 or cfg.smooth < 1:
        raise InputError(f"--dpi must be > 0 and --smooth >= 1 (got {cfg.dpi}, {cfg.smooth})")
    if cfg.plots_dir and os.path.exists(cfg.plots_dir) and not os.path.isdir(cfg.plots_dir):
        raise InputError(f"--plots_dir {cfg.plots_dir}: exists and is not a directory")
    summaries = os.path.join(cfg.out_dir, "eval", "*", "summary.json")
    bench_paths = os.path.join(cfg.out_dir, "bench", "decode*.json")
    logs = os.path.join(cfg.out_dir, "logs", "*.jsonl")
    runs = read_eval_summaries(summaries)
    benches = [read_decode_bench(path) for path in sorted(glob.glob(bench_paths))]
    curves = read_logs(logs)
    plots_dir = cfg.plots_dir or os.path.join(cfg.out_dir, "plots")
    written = []

    def target(name):
        os.makedirs(plots_dir, exist_ok=True)
        written.append(os.path.join(plots_dir, name))
        return written[-1]

    print_table("where each student's held-out KL to the teacher lies, by kind of solution line",
                *kl_lines_table(os.path.join(cfg.out_dir, "kl_by_line", "*.jsonl")))
    greedy = greedy_runs(cfg.out_dir)
    print_table("where the wrong greedy solutions of mamba_distill.py first leave the gold solution",
                *breaks_table(greedy))
    print_table("% of greedy solutions right, by the number of steps a problem takes", *steps_table(greedy))
    one_gpu = [r for r in runs if r["gpus"] == 1]  # the headline compares models on one GPU each
    if one_gpu:
        print_table(f"accuracy per k ({summaries}; {_distinct(r['device'] for r in runs)})",
                    ("model", "GPUs", "k", "coverage %", "majority %", "time s"),
                    [(r["name"], r["gpus"], k, f"{100 * c:.1f}", f"{100 * m:.1f}", f"{t:.1f}")
                     for r in runs for k, c, m, t in zip(r["k"], r["coverage"], r["majority"], r["time_s"])])
        print_table("at equal time: each student against the teacher (one GPU each)",
                    ("model", "samples drawn x faster", "coverage above teacher", "majority above teacher"),
                    [(n, _cell(s, ".2f"), f"{100 * c:.0f}% of the time range", f"{100 * m:.0f}%")
                     for n, s, c, m in equal_time_table(one_gpu)])
        print_table("where the wrong samples first leave the gold solution", *breaks_table(one_gpu))
        print_table("% of samples right / % of problems solved by any sample, by the number of steps a problem "
                    "takes", *steps_table(one_gpu))
        plot_accuracy(one_gpu, "time_s", target("accuracy_vs_time.png"), cfg)
        plot_accuracy(one_gpu, "k", target("accuracy_vs_k.png"), cfg)
    else:
        note(f"skipped accuracy_vs_time.png and accuracy_vs_k.png: no one-GPU {summaries} found (run sample.py)")
    if pairs := gpu_pairs(runs):
        print_table("1 GPU against several (same checkpoint, same samples)",
                    ("model", "GPUs", "speed-up at the largest k"),
                    [(one["name"], many["gpus"], f"{s:.2f}x") for one, many, s in pairs])
        plot_gpus(pairs, target("accuracy_vs_time_gpus.png"), cfg)
    if rows := [r for b in benches for r in b["results"]]:
        hf_rows = [h for b in benches for h in b["hf_rows"]]
        print_table(f"decode throughput ({bench_paths})", *decode_table(rows, hf_rows))
        plot_decode(benches, target("decode_throughput.png"), cfg)
    else:
        note(f"skipped decode_throughput.png: no rows in {bench_paths} (run sample.py --bench)")
    if curves:
        print_table(f"distillation losses ({logs})", *loss_table(curves))
        plot_losses(curves, target("distill_loss.png"), cfg)
    else:
        note(f"skipped distill_loss.png: no log lines in {logs} (run mamba_distill.py)")
    return written


def note(message):
    print(f"plot_scaling.py: {message}", file=sys.stderr)


def main(argv=None):
    """0: figures written; 1: nothing to plot (no input found); 2: a bad flag or input file."""
    cfg = parse_config(PlotConfig, argv, description=__doc__.strip().splitlines()[0])
    try:
        written = make_plots(cfg)
    except InputError as e:
        note(f"error: {e}")
        return 2
    if not written:
        note(f"error: nothing to plot: no usable input under {cfg.out_dir}/ (see the notes above)")
        return 1
    print("\n".join(f"wrote {path}" for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
