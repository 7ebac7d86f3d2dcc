"""Tests of plot_scaling.py on fake inputs written in the formats of mamba_distill.py and sample.py.

`python -m pytest -q test_plot.py` (CPU, a few seconds; no torch needed).
"""
import json
import os

import matplotlib.image
import pytest

import plot_scaling as ps

PLOT_MODELS = {"teacher": 1.0, "hybrid": 0.45, "pure": 0.3, "pure_random": 0.3}  # relative time per sample
PLOT_KS = [1, 2, 4, 8, 16, 32, 64]
PLOT_PNGS = ("accuracy_vs_time.png", "accuracy_vs_k.png", "decode_throughput.png", "distill_loss.png")


def plot_write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)


def plot_write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)


def plot_fake_out(root, eval_=True, bench=True, logs=True):
    """A fake out/ directory: eval summaries of four models, a decode bench, three distillation logs."""
    if eval_:
        for i, (name, speed) in enumerate(PLOT_MODELS.items()):
            base = 0.62 - 0.08 * i
            coverage = [round(min(0.99, base + 0.055 * j), 4) for j in range(len(PLOT_KS))]
            majority = [round(base + 0.012 * j, 4) for j in range(len(PLOT_KS))]
            plot_write_json(os.path.join(root, "eval", name, "summary.json"), {
                "model": name, "checkpoint": f"out/{name}", "device": "FakeGPU 80GB", "n_problems": 200,
                "k": PLOT_KS, "coverage": coverage, "majority": majority,
                "time_s": [round(9.5 * speed * k, 2) for k in PLOT_KS], "temperature": 0.8, "top_p": 0.95,
                "max_new_tokens": 512, "batch_size": 256})
    if bench:
        rows = []
        for model, per_seq, biggest in (("teacher", 60.0, 256), ("hybrid", 110.0, 512), ("pure", 190.0, 1024)):
            # a batch sweep at gen_len 512, then longer generations at the largest batch that "fits"
            sweep = [(b, 512) for b in (16, 32, 64, 128, 256, 512, 1024) if b <= biggest]
            sweep += [(biggest * 512 // g if model == "teacher" else biggest, g) for g in (1024, 2048, 4096, 8192)]
            for batch, gen_len in sweep:
                tps = per_seq * batch / (1 + batch / 2048) / (1 + gen_len / 16384)
                rows.append({"shape": "llama-3.2-1b", "model": model, "batch": batch, "prompt_len": 128,
                             "gen_len": gen_len, "tokens_per_s": round(tps, 1),
                             "roofline_tokens_per_s": round(2.5 * tps + 2000, 1), "roofline_frac": 0.4,
                             "peak_mem_GB": 12.3})
        plot_write_json(os.path.join(root, "bench", "decode.json"), {
            "device": "FakeGPU 80GB", "copy_GBps": 3000.0, "date": "2026-11-27", "results": rows,
            "hf": [{"cache": "static", "batch": 256, "prompt_len": 128, "gen_len": 512, "tokens_per_s": 9380.0},
                   {"cache": "dynamic", "batch": 256, "prompt_len": 128, "gen_len": 512, "tokens_per_s": 7420.0}]})
    if logs:
        for name, model, init, offset in (("teacher", "teacher", "random", 0.0),
                                          ("hybrid", "hybrid", "attention", 0.3),
                                          ("pure", "pure", "attention", 0.6),
                                          ("pure_random", "pure", "random", 2.0)):
            stages = ["teacher"] if model == "teacher" else ["align", "kl", "sft"]
            records, t = [], 0.0
            for stage in stages:
                for step in range(0, 200, 10):
                    t += 1.5
                    records.append({"model": model, "init": init, "stage": stage, "step": step,
                                    "loss": round((3.0 + offset) / (1 + step / 40) + 0.05 * (step % 20 == 0), 4),
                                    "lr": 3e-4, "tokens": step * 4096, "time_s": round(t, 2)})
            plot_write_jsonl(os.path.join(root, "logs", f"{name}.jsonl"), records)


def plot_run(out_dir, capsys, *flags):
    rc = ps.main(["--out_dir", str(out_dir), "--dpi", "40", *flags])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_plot_every_figure_and_table(tmp_path, capsys):
    plot_fake_out(tmp_path)
    rc, out, err = plot_run(tmp_path, capsys, "--smooth", "3")
    assert rc == 0, err
    assert err == ""
    plots = tmp_path / "plots"
    assert sorted(os.listdir(plots)) == sorted(PLOT_PNGS), "stray temp files or missing PNGs"
    for name in PLOT_PNGS:
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        img = matplotlib.image.imread(plots / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 200, (name, img.shape)
        assert img[..., :3].std() > 0.05, f"{name} looks blank"
    summary = json.loads((tmp_path / "eval" / "hybrid" / "summary.json").read_text())
    bench = json.loads((tmp_path / "bench" / "decode.json").read_text())
    last_pure_random = json.loads((tmp_path / "logs" / "pure_random.jsonl").read_text().splitlines()[-1])
    for expected in ("FakeGPU 80GB", f"{100 * summary['coverage'][-1]:.1f}", f"{100 * summary['majority'][3]:.1f}",
                     f"{summary['time_s'][-1]:.1f}", f"{bench['results'][5]['tokens_per_s']:.0f}",
                     "9380", "HF static", f"{last_pure_random['loss']:.4g}"):
        assert expected in out, f"{expected!r} missing from the printed tables"
    assert out.count("wrote ") == len(PLOT_PNGS)


def test_plot_missing_inputs(tmp_path, capsys):
    rc, out, err = plot_run(tmp_path / "nothing", capsys)
    assert rc == 1
    assert err.strip().splitlines()[-1].startswith("plot_scaling.py: error: nothing to plot")
    for missing in ("summary.json", "decode.json", "*.jsonl"):
        assert missing in err, f"no note naming {missing}: {err}"

    plot_fake_out(tmp_path / "partial", eval_=False, logs=False)
    rc, out, err = plot_run(tmp_path / "partial", capsys)
    assert rc == 0
    assert os.listdir(tmp_path / "partial" / "plots") == ["decode_throughput.png"]
    assert len(err.strip().splitlines()) == 2 and "summary.json" in err and "logs" in err


@pytest.mark.parametrize("target,line", [("logs/pure.jsonl", 3), ("eval/hybrid/summary.json", 2),
                                         ("bench/decode.json", 1)])
def test_plot_malformed_input_names_file_and_line(tmp_path, capsys, target, line):
    plot_fake_out(tmp_path)
    path = tmp_path / target
    lines = path.read_text().splitlines()
    lines[line - 1] = lines[line - 1][:-3] + "{oops"
    path.write_text("\n".join(lines) + "\n")
    rc, out, err = plot_run(tmp_path, capsys)
    assert rc == 1
    assert len(err.strip().splitlines()) == 1
    assert f"{path}:{line}: invalid JSON" in err, err


def test_plot_bad_values_are_reported(tmp_path, capsys):
    plot_fake_out(tmp_path, bench=False, logs=False)
    path = tmp_path / "eval" / "pure" / "summary.json"
    summary = json.loads(path.read_text())
    summary["coverage"] = [100 * c for c in summary["coverage"]]  # percentages instead of fractions
    path.write_text(json.dumps(summary))
    rc, out, err = plot_run(tmp_path, capsys)
    assert rc == 1 and f"{path}: 'coverage' must hold fractions" in err
    plot_write_jsonl(str(tmp_path / "logs" / "x.jsonl"), [{"model": "pure", "init": "random", "stage": "kl"}])
    path.write_text(json.dumps({**summary, "coverage": [c / 100 for c in summary["coverage"]]}))
    rc, out, err = plot_run(tmp_path, capsys)
    assert rc == 1 and "x.jsonl:1: missing key 'time_s'" in err, err


def test_plot_flags(capsys):
    with pytest.raises(SystemExit) as e:
        ps.parse_config(ps.PlotConfig, ["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for name in ("out_dir", "plots_dir", "dpi", "smooth", "label_k"):
        assert f"--{name}" in help_text
    with pytest.raises(SystemExit) as e:
        ps.parse_config(ps.PlotConfig, ["--no_such_flag", "1"])
    assert e.value.code == 2 and "unrecognized arguments: --no_such_flag" in capsys.readouterr().err
    cfg = ps.parse_config(ps.PlotConfig, ["--dpi", "72", "--label_k", "false", "--plots_dir", "p"])
    assert (cfg.dpi, cfg.label_k, cfg.plots_dir, cfg.out_dir) == (72, False, "p", "out")
