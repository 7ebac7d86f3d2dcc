"""
Plot the measurements of mamba_distill.py and sample.py: accuracy against time, decode speed, losses.

Reads what the other scripts wrote under one output directory (formats: the "Outputs" parts of the
docstrings of mamba_distill.py and sample.py) and writes PNG files into <out_dir>/plots/, printing the same numbers
as plain-text tables on stdout. No GPU needed (torch comes in only through mamba_distill's flag parser).

Run:
  python plot_scaling.py                     # reads out/, writes out/plots/*.png
  python plot_scaling.py --out_dir runs/h100 --dpi 200 --smooth 20
  python plot_scaling.py --help              # every option of PlotConfig below

Figures (a figure whose input files are absent is skipped with a one-line note naming them):
  accuracy_vs_time.png   the paper's headline figure: coverage@k (pass@k: at least one of k samples is
                         right) and majority-vote accuracy@k against the measured wall-clock time each
                         model needed to draw k samples for every problem, log time axis, one line per
                         model, each point labelled with its k. A faster student can afford a larger k
                         in the same time budget: its curve lies to the left of the teacher's.
                         Input: <out_dir>/eval/*/summary.json.
  accuracy_vs_k.png      the same two accuracies against k (log2 axis): how much the distilled students
                         lose per sample, regardless of speed. Same input.
  decode_throughput.png  generated tokens/s (all sequences of a batch together, prefill + decode as
                         sample.py --bench measures them: whole generate calls for the batch sweep, and,
                         unless it ran with --bench_e2e, the decode step timed at 8 slots for the
                         length sweep) against batch size, and against length
                         at the largest batch measured for that length, one line per model kind and
                         shape; dashed: the memory-bandwidth roofline (bytes of weights + KV cache or SSM
                         state moved per decode step / measured copy bandwidth); black markers: HF
                         transformers' generate when the bench ran it. Input: <out_dir>/bench/decode.json.
  distill_loss.png       training loss against wall time since the start of each model's run, one panel
                         per stage (teacher training, layer alignment, KL distillation, SFT), colour by
                         model, solid = mixer initialised from attention, dashed = random init.
                         Input: <out_dir>/logs/*.jsonl.

Bad input (a malformed json/jsonl line, a missing key) stops with one line naming file:line; if no
figure at all could be drawn the script exits with status 1.

Glossary: k samples per problem, b batch size (sequences decoded together), gen_len new tokens per
sequence, coverage@k = pass@k, majority@k = accuracy of the most frequent extracted answer of k.
"""
import glob
import json
import math
import os
import sys
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, same output on every machine
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation  # noqa: E402

# One command-line convention for the whole project: --help and flags generated from the dataclass.
# (mamba_distill imports torch, so this script needs it installed although it draws no tensors.)
from mamba_distill import InputError, parse_config  # noqa: E402


@dataclass
class PlotConfig:
    """Every option of this script; defaults read the default run's out/."""
    out_dir: str = field(default="out", metadata={"help": "directory mamba_distill.py and sample.py wrote"})
    plots_dir: str = field(default="", metadata={"help": "where the PNGs go (empty: <out_dir>/plots)"})
    dpi: int = field(default=150, metadata={"help": "resolution of the PNGs (dots per inch)"})
    smooth: int = field(default=1, metadata={"help": "loss curves: trailing moving average over this many "
                                                     "logged steps (1 = raw)"})
    label_k: bool = field(default=True, metadata={"help": "accuracy-vs-time figure: write k next to each point"})


# -----------------------------------------------------------------------------
# Reading and checking the input files


def read_json(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None


def read_jsonl(path):
    """[(line number, dict)] for every non-blank line."""
    records = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                records.append((lineno, rec))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    return records


def _number(rec, key, where):
    if key not in rec:
        raise InputError(f"{where}: missing key '{key}'")
    value = rec[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: '{key}' must be a number, got {value!r}")
    return float(value)


def _number_list(rec, key, where):
    if key not in rec:
        raise InputError(f"{where}: missing key '{key}'")
    values = rec[key]
    if not isinstance(values, list) or not values:
        raise InputError(f"{where}: '{key}' must be a non-empty list of numbers")
    return [_number({key: v}, key, where) for v in values]


def read_eval_summaries(out_dir):
    """One dict per out_dir/eval/<model>/summary.json, checked: equal-length k / coverage / majority /
    time_s lists, accuracies as fractions in [0, 1], positive times (they go on a log axis)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(out_dir, "eval", "*", "summary.json"))):
        s = read_json(path)
        if not isinstance(s, dict):
            raise InputError(f"{path}: expected a JSON object")
        run = {key: _number_list(s, key, path) for key in ("k", "coverage", "majority", "time_s")}
        if len({len(v) for v in run.values()}) != 1:
            raise InputError(f"{path}: 'k', 'coverage', 'majority' and 'time_s' must have the same length")
        for key in ("coverage", "majority"):
            if not all(0.0 <= v <= 1.0 for v in run[key]):
                raise InputError(f"{path}: '{key}' must hold fractions in [0, 1], got {run[key]}")
        if not all(k >= 1 and k == int(k) for k in run["k"]) or not all(t > 0 for t in run["time_s"]):
            raise InputError(f"{path}: 'k' must hold positive integers and 'time_s' positive seconds")
        run["k"] = [int(k) for k in run["k"]]
        run.update(name=str(s.get("model", os.path.basename(os.path.dirname(path)))),
                   device=str(s.get("device", "unknown device")), n_problems=s.get("n_problems"), path=path)
        runs.append(run)
    return sorted(runs, key=lambda r: model_order(r["name"]))


def read_decode_bench(path):
    """decode.json checked; returns (dict with device/copy_GBps/date, results rows, hf rows)."""
    bench = read_json(path)
    if not isinstance(bench, dict):
        raise InputError(f"{path}: expected a JSON object")
    rows, hf = bench.get("results", []), bench.get("hf", [])
    if not isinstance(rows, list) or not isinstance(hf, list):
        raise InputError(f"{path}: 'results' and 'hf' must be lists")
    for i, r in enumerate(rows):
        where = f"{path}: results[{i}]"
        if not isinstance(r, dict) or "model" not in r or "shape" not in r:
            raise InputError(f"{where}: needs 'model' and 'shape'")
        for key in ("batch", "prompt_len", "gen_len", "tokens_per_s", "roofline_tokens_per_s"):
            _number(r, key, where)
    for i, r in enumerate(hf):
        where = f"{path}: hf[{i}]"
        if not isinstance(r, dict):
            raise InputError(f"{where}: expected a JSON object")
        if "error" in r:  # sample.py records a failed HF run this way: nothing to draw for it
            note(f"{where}: HF transformers' run failed ({str(r['error'])[:80]}); not drawn")
            continue
        for key in ("batch", "prompt_len", "gen_len", "tokens_per_s"):
            _number(r, key, where)
    return bench, rows, [r for r in hf if "error" not in r]


def read_logs(out_dir):
    """{(model, init, stage): [(time_s, loss, step, tokens)]} from every out_dir/logs/*.jsonl."""
    curves = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "logs", "*.jsonl"))):
        for lineno, rec in read_jsonl(path):
            where = f"{path}:{lineno}"
            for key in ("model", "init", "stage"):
                if key not in rec:
                    raise InputError(f"{where}: missing key '{key}'")
            point = (_number(rec, "time_s", where), _number(rec, "loss", where),
                     int(_number(rec, "step", where)), rec.get("tokens"))
            curves.setdefault((str(rec["model"]), str(rec["init"]), str(rec["stage"])), []).append(point)
    return {key: sorted(points) for key, points in curves.items()}


# -----------------------------------------------------------------------------
# Shared look: one colour per model in every figure, models in the paper's order


MODEL_ORDER = ("teacher", "hybrid", "pure", "pure_random")
STAGES = {"teacher": "teacher training (cross-entropy)", "align": "stage 1: layer alignment (MSE)",
          "kl": "stage 2: distillation (KL to teacher)", "sft": "stage 3: fine-tuning (cross-entropy)"}


def model_order(name):
    return (MODEL_ORDER.index(name), name) if name in MODEL_ORDER else (len(MODEL_ORDER), name)


def model_colours(names):
    """Known models get fixed tab10 colours, others the next free ones, so colours match across figures."""
    colours = {name: f"C{i}" for i, name in enumerate(MODEL_ORDER)}
    extra = sorted({n for n in names if n not in colours})
    colours.update({name: f"C{(len(MODEL_ORDER) + i) % 10}" for i, name in enumerate(extra)})
    return colours


def _one_or_many(values):
    values = sorted({str(v) for v in values})
    return values[0] if len(values) == 1 else " / ".join(values)


def _plain(v):
    return f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k" if v >= 1e4 else f"{v:g}"


class PlainLogFormatter(LogFormatterSciNotation):
    """matplotlib's choice of which log-axis ticks get a label, written 0.5, 200, 30k instead of 5x10^-1."""

    def __call__(self, x, pos=None):
        return _plain(x) if super().__call__(x, pos) else ""


def plain_log_ticks(axis):
    """Label a log axis in plain numbers (axis: ax.xaxis or ax.yaxis, already set to log scale)."""
    if axis.get_scale() == "log" and axis.get_transform().base == 2:
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 2, 4 ... 4096, not 2^12
    else:
        axis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
        axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


LABEL_BOX = dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none", alpha=0.75)


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


def plot_accuracy(runs, x_key, path, cfg):
    colours = model_colours(r["name"] for r in runs)
    several_devices = len({r["device"] for r in runs}) > 1  # then each line names its own card
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True, layout="constrained")
    for ax, metric, ylabel in ((axes[0], "coverage", "coverage@k = pass@k (% of problems)"),
                               (axes[1], "majority", "majority-vote accuracy@k (% of problems)")):
        for run in runs:
            xs, ys = run[x_key], [100 * v for v in run[metric]]
            label = f"{run['name']} ({run['device']})" if several_devices else run["name"]
            ax.plot(xs, ys, "o-", color=colours[run["name"]], label=label if ax is axes[0] else None)
            if x_key == "time_s" and cfg.label_k:
                for i, (x, y, k) in enumerate(zip(xs, ys, run["k"])):
                    ax.annotate(f"k={k}" if i == 0 else str(k), (x, y), textcoords="offset points",
                                xytext=(-4, 5), ha="right", fontsize=8, color=colours[run["name"]],
                                bbox=LABEL_BOX)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 105)
        ax.grid(True, which="major", alpha=0.3)
        if x_key == "time_s":
            ax.set_xscale("log")
            ax.margins(x=0.08)  # room for the k=1 label left of the first point
            plain_log_ticks(ax.xaxis)
            ax.set_xlabel("wall-clock time to draw k samples for every problem (s, log scale)")
        else:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({k for r in runs for k in r["k"]}))
            plain_log_ticks(ax.xaxis)
            ax.set_xlabel("k = samples per problem (log2 scale)")
        ax.set_title({"coverage": "coverage: any of k samples correct",
                      "majority": "majority vote over k samples"}[metric])
    axes[1].yaxis.set_tick_params(labelleft=True)
    counts = [r["n_problems"] for r in runs if r["n_problems"] is not None]
    details = [f"{_one_or_many(counts)} problems"] if counts else []
    details += [] if several_devices else [runs[0]["device"]]
    against = "wall-clock time" if x_key == "time_s" else "samples per problem k"
    fig.suptitle(f"Accuracy against {against} ({', '.join(details)})"
                 + ("\nnumbers next to points: k" if x_key == "time_s" and cfg.label_k else ""))
    fig.legend(loc="outside lower center", ncol=min(len(runs), 6), title="model")
    save_png(fig, path, cfg.dpi)


def accuracy_table(runs):
    rows = [(r["name"], k, f"{100 * c:.1f}", f"{100 * m:.1f}", f"{t:.1f}")
            for r in runs for k, c, m, t in zip(r["k"], r["coverage"], r["majority"], r["time_s"])]
    return format_table(("model", "k", "coverage %", "majority %", "time s"), rows)


# -----------------------------------------------------------------------------
# Figure 3: decode throughput against batch size and generation length


def _batch_sweep(rows):
    """The rows of one model/shape at the (prompt_len, gen_len) with the most batch sizes measured."""
    groups = {}
    for r in rows:
        groups.setdefault((r["prompt_len"], r["gen_len"]), []).append(r)
    best = max(groups.values(), key=lambda g: (len({r["batch"] for r in g}), -g[0]["gen_len"]))
    return sorted(best, key=lambda r: r["batch"])


def _length_sweep(rows):
    """For each gen_len of one model/shape, the row with the largest batch (the paper's 'largest batch
    that fits'); prompt_len fixed to the most common one."""
    prompt = max({r["prompt_len"] for r in rows}, key=lambda p: sum(r["prompt_len"] == p for r in rows))
    best = {}
    for r in rows:
        if r["prompt_len"] == prompt and r["batch"] >= best.get(r["gen_len"], {"batch": -1})["batch"]:
            best[r["gen_len"]] = r
    return [best[g] for g in sorted(best)]


def plot_decode(bench, rows, hf, path, cfg):
    colours = model_colours(r["model"] for r in rows)
    shapes = sorted({r["shape"] for r in rows})
    markers = dict(zip(shapes, "os^Dv<>p"))
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["shape"]), []).append(r)
    keys = sorted(groups, key=lambda k: (k[1], model_order(k[0])))
    sweeps = {key: _batch_sweep(groups[key]) for key in keys}
    # the batch sweep's settings go in the panel title when every line shares them, else in the legend
    settings = {key: f"prompt {sweep[0]['prompt_len']:g}, gen_len {sweep[0]['gen_len']:g}"
                for key, sweep in sweeps.items()}
    shared = _one_or_many(settings.values()) if len(set(settings.values())) == 1 else ""
    fig, (ax_b, ax_l) = plt.subplots(1, 2, figsize=(13, 6), layout="constrained")
    handles = []
    for key in keys:
        model, shape = key
        style = dict(color=colours[model], marker=markers[shape])
        label = f"{model}, {shape}" if len(shapes) > 1 else model
        sweep, lens = sweeps[key], _length_sweep(groups[key])
        for ax, x_key, points in ((ax_b, "batch", sweep), (ax_l, "gen_len", lens)):
            xs = [r[x_key] for r in points]
            ax.plot(xs, [r["tokens_per_s"] for r in points], "-", **style)
            ax.plot(xs, [r["roofline_tokens_per_s"] for r in points], "--", color=colours[model], alpha=0.6)
        for r in lens:
            ax_l.annotate(f"b={r['batch']:g}", (r["gen_len"], r["tokens_per_s"]), textcoords="offset points",
                          xytext=(0, 7), ha="center", fontsize=7, color=colours[model], bbox=LABEL_BOX)
        handles.append(Line2D([], [], linestyle="-", label=label + ("" if shared else f" ({settings[key]})"),
                              **style))
    if rows:
        handles.append(Line2D([], [], color="grey", linestyle="--",
                              label="roofline (memory-bandwidth bound), colour of its model"))
    hf_markers = dict(zip(sorted({str(r.get("cache", "?")) for r in hf}), "XP*h"))
    for r in hf:
        cache = str(r.get("cache", "?"))
        style = dict(color="black", marker=hf_markers[cache], markersize=9, linestyle="none")
        ax_b.plot([r["batch"]], [r["tokens_per_s"]], **style)
        ax_l.plot([r["gen_len"]], [r["tokens_per_s"]], **style)
        handles.append(Line2D([], [], label=f"HF transformers generate, {cache} cache (b={r['batch']:g}, "
                                            f"prompt {r['prompt_len']:g}, gen_len {r['gen_len']:g})", **style))
    ax_b.set_title("against batch size" + (f" ({shared} tokens)" if shared else ""))
    ax_b.set_xlabel("batch size b = sequences decoded together (log2 scale)")
    ax_l.set_title("against generation length, each at the largest batch b measured")
    ax_l.set_xlabel("generated tokens per sequence, gen_len (log2 scale)")
    for ax in (ax_b, ax_l):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.margins(x=0.06, y=0.08)
        plain_log_ticks(ax.xaxis)
        plain_log_ticks(ax.yaxis)
        ax.set_ylabel("generated tokens/s (whole batch, prefill + decode, log scale)")
        ax.grid(True, which="major", alpha=0.3)
    date = f", {bench['date']}" if bench.get("date") else ""
    copy = f", measured copy bandwidth {bench['copy_GBps']:g} GB/s" if "copy_GBps" in bench else ""
    fig.suptitle(f"Decode throughput on {bench.get('device', 'unknown device')}{copy}{date}")
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8)
    save_png(fig, path, cfg.dpi)


def _optional(row, key, fmt):
    return format(row[key], fmt) if isinstance(row.get(key), (int, float)) else "-"


def decode_table(rows, hf):
    """tokens/s: whole generate calls (prefill + decode); 'decode tok/s' and 'of roofline' (the decode
    steps alone against the bandwidth bound) are printed when sample.py recorded them."""
    table = [(r["model"], r["shape"], f"{r['batch']:g}", f"{r['prompt_len']:g}", f"{r['gen_len']:g}",
              f"{r['tokens_per_s']:.0f}", _optional(r, "decode_tokens_per_s", ".0f"),
              f"{r['roofline_tokens_per_s']:.0f}", _optional(r, "roofline_frac", ".2f"),
              _optional(r, "peak_mem_GB", ".1f"))
             for r in sorted(rows, key=lambda r: (r["shape"], model_order(r["model"]), r["gen_len"], r["batch"]))]
    table += [(f"HF {r.get('cache', '?')}", "", f"{r['batch']:g}", f"{r['prompt_len']:g}", f"{r['gen_len']:g}",
               f"{r['tokens_per_s']:.0f}", "-", "-", "-", "-") for r in hf]
    return format_table(("model", "shape", "batch", "prompt", "gen_len", "tokens/s", "decode tok/s",
                         "roofline tok/s", "of roofline", "peak mem GB"), table)


# -----------------------------------------------------------------------------
# Figure 4: distillation loss curves


def _moving_average(values, window):
    """Trailing mean over `window` points (fewer at the start), so a curve starts where the log starts."""
    values = np.asarray(values, dtype=float)
    csum = np.cumsum(np.insert(values, 0, 0.0))
    lo = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (csum[1:] - csum[lo]) / (np.arange(1, len(values) + 1) - lo)


def plot_losses(curves, path, cfg):
    stages = sorted({s for _, _, s in curves}, key=lambda s: (list(STAGES).index(s) if s in STAGES else 99, s))
    models = sorted({m for m, _, _ in curves}, key=model_order)
    # the init flag is about the students' mixers: the teacher's own training is drawn solid whatever it logs
    inits = sorted({i for _, i, s in curves if s != "teacher"}, key=lambda i: (i != "attention", i))
    colours = model_colours(models)
    dashes = {init: ["-", "--", ":", "-."][i % 4] for i, init in enumerate(inits)}
    ncols = len(stages) if len(stages) <= 3 else 2  # four panels as 2 x 2 stay readable when shrunk
    nrows = math.ceil(len(stages) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(7, 5.5 * ncols), 0.8 + 4.2 * nrows),
                             layout="constrained", squeeze=False)
    for ax in axes.flat[len(stages):]:
        ax.set_visible(False)
    for ax, stage in zip(axes.flat, stages):
        positive = True
        for (model, init, s), points in sorted(curves.items(), key=lambda kv: model_order(kv[0][0])):
            if s != stage:
                continue
            times, losses = [p[0] for p in points], [p[1] for p in points]
            positive &= all(v > 0 for v in losses)
            ax.plot(times, _moving_average(losses, cfg.smooth), "-" if s == "teacher" else dashes[init],
                    color=colours[model], lw=1.5)
        if positive:
            ax.set_yscale("log")
            plain_log_ticks(ax.yaxis)
        ax.set_title(STAGES.get(stage, f"stage '{stage}'"))
        ax.set_xlabel("wall-clock time since the model's run started (s)")
        ax.set_ylabel("training loss" + (" (log scale)" if positive else ""))
        ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=colours[m], lw=2, label=m) for m in models]
    handles += [Line2D([], [], color="black", linestyle=dashes[i], label=f"student mixer: {i} init") for i in inits]
    smooth = f"\n(moving average over {cfg.smooth} logged steps)" if cfg.smooth > 1 else ""
    fig.suptitle(f"Distillation loss curves: student mixers initialised from attention vs random{smooth}")
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles))
    save_png(fig, path, cfg.dpi)


def loss_table(curves):
    rows = []
    for (model, init, stage), points in sorted(curves.items(), key=lambda kv: (model_order(kv[0][0]), kv[0][1:])):
        t, loss, step, tokens = points[-1]
        rows.append((model, init, stage, len(points), step, f"{tokens:g}" if isinstance(tokens, (int, float))
                     else "-", f"{points[0][1]:.4g}", f"{loss:.4g}", f"{t:.1f}"))
    return format_table(("model", "init", "stage", "logged", "last step", "tokens", "first loss", "final loss",
                         "time s"), rows)


# -----------------------------------------------------------------------------
# Tables and the main routine


def format_table(headers, rows):
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def make_plots(cfg):
    """Draw every figure whose inputs exist; returns the PNG paths written. Prints tables to stdout and
    a one-line note per skipped figure to stderr. Every input is read and checked before anything is
    drawn, so a malformed file leaves the existing plots untouched."""
    if cfg.dpi <= 0 or cfg.smooth < 1:
        raise InputError(f"--dpi must be > 0 and --smooth >= 1 (got {cfg.dpi}, {cfg.smooth})")
    summaries = os.path.join(cfg.out_dir, "eval", "*", "summary.json")
    bench_path = os.path.join(cfg.out_dir, "bench", "decode.json")
    logs = os.path.join(cfg.out_dir, "logs", "*.jsonl")
    runs = read_eval_summaries(cfg.out_dir)
    bench, rows, hf = read_decode_bench(bench_path) if os.path.exists(bench_path) else (None, [], [])
    curves = read_logs(cfg.out_dir)

    plots_dir = cfg.plots_dir or os.path.join(cfg.out_dir, "plots")
    written = []

    def target(name):
        os.makedirs(plots_dir, exist_ok=True)
        written.append(os.path.join(plots_dir, name))
        return written[-1]

    if runs:
        print(f"== accuracy per k ({summaries}; {_one_or_many(r['device'] for r in runs)}) ==")
        print(accuracy_table(runs), end="\n\n")
        plot_accuracy(runs, "time_s", target("accuracy_vs_time.png"), cfg)
        plot_accuracy(runs, "k", target("accuracy_vs_k.png"), cfg)
    else:
        note(f"skipped accuracy_vs_time.png and accuracy_vs_k.png: no {summaries} found (run sample.py)")
    if bench is None:
        note(f"skipped decode_throughput.png: {bench_path} not found (run sample.py --bench)")
    elif rows or hf:
        print(f"== decode throughput ({bench_path}; {bench.get('device', 'unknown device')}) ==")
        print(decode_table(rows, hf), end="\n\n")
        plot_decode(bench, rows, hf, target("decode_throughput.png"), cfg)
    else:
        note(f"skipped decode_throughput.png: {bench_path} has no 'results' or 'hf' rows")
    if curves:
        print(f"== distillation losses ({logs}) ==")
        print(loss_table(curves), end="\n\n")
        plot_losses(curves, target("distill_loss.png"), cfg)
    else:
        note(f"skipped distill_loss.png: no log lines in {logs} (run mamba_distill.py)")
    return written


def note(message):
    print(f"plot_scaling.py: {message}", file=sys.stderr)


def main(argv=None):
    cfg = parse_config(PlotConfig, argv, description=__doc__.strip().splitlines()[0])
    try:
        written = make_plots(cfg)
        if not written:
            raise InputError(f"nothing to plot: no usable input under {cfg.out_dir}/ (see the notes above)")
    except InputError as e:
        print(f"plot_scaling.py: error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
