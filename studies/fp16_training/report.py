"""The study's tables (markdown) and plots (PNG), generated from ``results.json``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from hyprec.dtypes import FP16_MAX
from studies.fp16_training.grid import FAMILIES
from studies.fp16_training.measure import HALF_POLICIES

PREDICTORS = ("norm_gain_max", "norm_gain_attention_max", "weight_max_abs", "embedding_row_norm_max", "qkv_bound_max")
TARGETS = ("residual", "ffn", "attention_inputs")
WHOLE = ("float16", "bfloat16")


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(map(_fmt, row)) + " |" for row in rows
    ]


def _kind(results: dict[str, Any], run: str) -> str:
    return FAMILIES[results["runs"][run]["config"]["family"]]


def finals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The last checkpoint of each run, in grid order."""
    last: dict[str, dict[str, Any]] = {}
    for record in results["records"]:
        if record["run"] not in last or record["step"] > last[record["run"]]["step"]:
            last[record["run"]] = record
    return [last[run] for run in results["runs"] if run in last]


def _damage_cell(kind: str, damage: dict[str, Any]) -> str:
    nan = damage["non_finite_logits" if kind == "decoder" else "non_finite"]
    value = damage["top1_agreement"] if kind == "decoder" else damage["min_cos"]
    text = "NaN" if nan else (f"{value:.4f}" if kind == "decoder" else f"{value:.6f}")
    return f"**{text}**" if damage["damaged"] else text


def final_table(results: dict[str, Any], kind: str) -> list[str]:
    """One row per run: what it varies, loss, activation maxima, weight statistics, damage and check's verdicts."""
    metric = "top-1 vs float32" if kind == "decoder" else "min cosine vs float32"
    header = ["run", "factor", "step", "loss", "residual", "FFN", "q/k/v", "logits", "norm gain", "q/k/v bound"]
    header += [f"{p}: {metric} / check" for p in HALF_POLICIES]
    rows = []
    for r in finals(results):
        if _kind(results, r["run"]) != kind:
            continue
        cfg = results["runs"][r["run"]]["config"]
        act = r["activity"]
        row = [r["run"], cfg["factor"], r["step"], r["loss"], act["residual"], act["ffn"]]
        row += [act["attention_inputs"], act["logits"], r["params"]["norm_gain_max"], r["qkv_bound_max"]]
        row += [f"{_damage_cell(kind, r['damage'][p])} / {r['verdicts'][p]}" for p in HALF_POLICIES]
        rows.append(row)
    return _table(header, rows)


def growth_table(results: dict[str, Any]) -> list[str]:
    """Largest residual |x| at each checkpoint of each run: how fast training pushes toward 65504."""
    rows = []
    for run, info in results["runs"].items():
        points = [r for r in results["records"] if r["run"] == run]
        steps = ", ".join(f"{r['step']}: {r['activity']['residual']:.4g}" for r in points)
        rows.append([run, info["config"]["lr"], steps])
    return _table(["run", "lr", "step: largest residual magnitude"], rows)


def confusion(results: dict[str, Any], verdicts: str = "verdicts") -> dict[str, dict[str, int]]:
    """Per half policy, over every checkpoint: check's verdict (flagged = at-risk or fails) against measured damage.
    ``verdicts``: the record's field to read (``verdicts_at_training``: check as it was when the study ran)."""
    table = {
        p: {"flagged, damaged": 0, "flagged, clean": 0, "safe, damaged": 0, "safe, clean": 0} for p in HALF_POLICIES
    }
    for r in results["records"]:
        if verdicts not in r:  # measured after check changed: it has no verdicts from before
            continue
        for p in HALF_POLICIES:
            flagged = "flagged" if r[verdicts][p] != "safe" else "safe"
            hurt = "damaged" if r["damage"][p]["damaged"] else "clean"
            table[p][f"{flagged}, {hurt}"] += 1
    return table


def confusion_table(results: dict[str, Any], verdicts: str = "verdicts") -> list[str]:
    cells = confusion(results, verdicts)
    keys = ["flagged, damaged", "flagged, clean", "safe, damaged", "safe, clean"]
    rows = [[p, *(cells[p][k] for k in keys)] for p in HALF_POLICIES]
    return _table(["policy", "true alarm", "false alarm", "miss", "true clear"], rows)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN with fewer than three points."""
    if len(x) < 3:
        return math.nan

    def ranks(v: list[float]) -> np.ndarray:
        a = np.asarray(v, dtype=np.float64)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a))
        for value in np.unique(a):  # ties share their mean rank
            r[a == value] = r[a == value].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def _loss(kind: str, damage: dict[str, Any]) -> float:
    """How far a policy fell from float32: 1 - top-1 agreement (decoders) or 1 - least cosine (encoders)."""
    return 1.0 - (damage["top1_agreement"] if kind == "decoder" else damage["min_cos"])


def predictor_table(results: dict[str, Any], kind: str) -> list[str]:
    """Rank correlation, over every checkpoint of one kind, between each weight statistic and each activation
    maximum, and the whole-model half policies' damage."""
    records = [r for r in results["records"] if _kind(results, r["run"]) == kind]

    def stat(r: dict[str, Any], name: str) -> float | None:
        return r["qkv_bound_max"] if name == "qkv_bound_max" else r["params"].get(name)

    def targets(r: dict[str, Any]) -> list[float]:
        return [r["activity"][t] for t in TARGETS] + [_loss(kind, r["damage"][p]) for p in WHOLE]

    rows = []
    for name in PREDICTORS:
        usable = [r for r in records if stat(r, name) is not None]
        xs = [stat(r, name) for r in usable]
        ys = [targets(r) for r in usable]
        rows.append([name, *(spearman(xs, [y[i] for y in ys]) for i in range(len(TARGETS) + len(WHOLE)))])
    metric = "1 - top-1" if kind == "decoder" else "1 - min cosine"
    header = ["weight statistic", *(f"max {t}" for t in TARGETS), *(f"{p}: {metric}" for p in WHOLE)]
    return _table(header, rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_lines(series: dict[str, tuple[list, list]], ylabel: str, title: str, path: Path, xticks=None) -> None:
    """One line per run (``label -> (xs, ys)``, log scale) against the float16 maximum, written as PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, (xs, ys)) in enumerate(series.items()):
        style = ("-", "--", ":")[i // 10 % 3]  # the colour cycle has ten colours
        ax.plot(xs, ys, marker="o", markersize=3, linestyle=style, label=label)
    ax.axhline(FP16_MAX, color="red", linestyle="--", label="float16 max (65504)")
    ax.set_yscale("log")
    if xticks is not None:
        ax.set_xticks(range(len(xticks)), xticks, fontsize=8)
    else:
        ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_growth(results: dict[str, Any], kind: str, path: Path) -> None:
    """Max residual |x| against training step, one line per run, with the float16 maximum."""
    series = {}
    for run in results["runs"]:
        if _kind(results, run) == kind:
            points = [(r["step"], r["activity"]["residual"]) for r in results["records"] if r["run"] == run]
            series[run] = tuple(zip(*points, strict=True))
    _log_lines(series, "max |residual| on held-out text", f"{kind}s: residual stream growth during training", path)


def plot_layers(results: dict[str, Any], kind: str, path: Path) -> None:
    """The residual stream's largest |x| after each layer (the embedding output first) at each run's last
    checkpoint: where in the depth an outlier is written."""
    rows = [r for r in finals(results) if _kind(results, r["run"]) == kind]
    names = [layer["layer"] for layer in rows[0]["layers"]]
    series = {r["run"]: (range(len(names)), [layer["residual"] for layer in r["layers"]]) for r in rows}
    title = f"{kind}s: the residual stream layer by layer"
    _log_lines(series, "max |residual| at the last checkpoint", title, path, xticks=names)


def plot_maxima(results: dict[str, Any], path: Path) -> None:
    """Final residual, FFN and q/k/v maxima per run (log scale) against the float16 maximum."""
    plt = _pyplot()
    rows = finals(results)
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(rows)), 4.5))
    for i, (q, label) in enumerate((("residual", "residual"), ("ffn", "FFN"), ("attention_inputs", "q/k/v"))):
        ax.bar(x + (i - 1) * 0.27, [r["activity"][q] for r in rows], width=0.27, label=label)
    ax.axhline(FP16_MAX, color="red", linestyle="--", label="float16 max")
    ax.set_yscale("log")
    ax.set_xticks(x, [r["run"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("max |x| at the last checkpoint")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], directory: Path) -> None:
    """``tables.md`` and the PNG plots into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    m = results.get("machine", {})
    total = sum(run["total_seconds"] for run in results["runs"].values())
    training = sum(run["train_seconds"] for run in results["runs"].values())
    lines = [
        "# fp16 training study: generated tables",
        "",
        "Generated by `python -m studies.fp16_training` from its `results.json`; the findings are in "
        "`docs/fp16-study.md`.",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')} ({m.get('torch_threads')} threads); "
        f"flags {m.get('flags')}. Training and measuring took {total / 60:.1f} min (the sum over runs; training "
        f"alone {training / 60:.1f} min).",
        "",
    ]
    kinds = sorted({_kind(results, run) for run in results["runs"]})
    for kind in kinds:
        what = "top-1 agreement" if kind == "decoder" else "min cosine of the pooled embeddings"
        lines += [f"## {kind.capitalize()}s: last checkpoint of each run", ""]
        lines += [f"Damage: {what} against float32 (**bold**: damaged); then `hyprec check`'s verdict.", ""]
        lines += [*final_table(results, kind), ""]
        lines += [f"### {kind.capitalize()}s: which weight statistics track the activations and the damage", ""]
        lines += ["Spearman rank correlation over every checkpoint of every run.", ""]
        lines += [*predictor_table(results, kind), ""]
        plot_growth(results, kind, directory / f"growth-{kind}.png")
        lines += [f"![residual growth, {kind}s](growth-{kind}.png)", ""]
        plot_layers(results, kind, directory / f"layers-{kind}.png")
        lines += [f"![the residual stream layer by layer, {kind}s](layers-{kind}.png)", ""]
    lines += ["## Training length", "", *growth_table(results), ""]
    lines += ["## `hyprec check` against measured damage (every checkpoint)", ""]
    if any("verdicts_at_training" in r for r in results["records"]):
        earlier = sum("verdicts_at_training" in r for r in results["records"])
        lines += [f"`check` as it was when the study ran ({earlier} checkpoints measured before it changed):", ""]
        lines += [*confusion_table(results, "verdicts_at_training"), ""]
        lines += ["`check` now (every checkpoint; `--check-again` re-ran it on the earlier ones):", ""]
    lines += [*confusion_table(results), ""]
    plot_maxima(results, directory / "maxima.png")
    lines += ["![activation maxima at the last checkpoint](maxima.png)", ""]
    (directory / "tables.md").write_text("\n".join(lines))
