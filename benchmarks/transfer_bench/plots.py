"""The figures: accuracy against trainable share (:func:`plot`), the width sweep (:func:`plot_sweep`) and the
budget study (:func:`plot_budget`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .report import summarise
from .sweep_statistics import PLOTTED_PAIRS, SWEEP_METHODS

__all__ = ["plot", "plot_sweep", "plot_budget"]

_GROUP_STYLE = {"baseline": ("tab:gray", "s"), "grft": ("tab:blue", "o"), "control": ("tab:red", "x"),
                "ablation": ("tab:green", "^"), "beyond": ("tab:orange", "v"), "other": ("tab:purple", "D")}
# the methods of the per-target bars, when they ran
_BAR_METHODS = ("linear", "bias", "grft-row-k1", "random-row-k1", "lowest-row-k1", "lora", "full")


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot(results: dict[str, Any], path: Path) -> Path:
    """Mean top-1 over targets vs trainable % (log x), error bars = std over seeds; and per-target bars."""
    summary = results.get("summary") or summarise(results)
    targets = list(results["settings"]["targets"])
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(15, 6.2), gridspec_kw={"width_ratios": [1.25, 1]})
    _accuracy_vs_trainable(left, summary["methods"], len(targets))
    _per_target_bars(right, summary["methods"], targets)
    return _save(fig, path)


def _accuracy_vs_trainable(axes, rows: dict[str, dict[str, Any]], num_targets: int) -> None:
    for method, row in rows.items():
        if row["mean"] is None:
            continue
        colour, marker = _GROUP_STYLE.get(row["group"], _GROUP_STYLE["other"])
        axes.errorbar(row["trainable_percent"], row["mean"][0], yerr=row["mean"][1], fmt=marker, color=colour,
                      capsize=3, markersize=7)
        axes.annotate(method, (row["trainable_percent"], row["mean"][0]), textcoords="offset points",
                      xytext=(5, 3), fontsize=7)
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters (% of the model)")
    axes.set_ylabel(f"top-1 (%), mean over {num_targets} targets")
    axes.set_title("accuracy vs trainable % (error bar: std over seeds)")
    axes.grid(True, which="both", alpha=0.3)
    for group, (colour, marker) in _GROUP_STYLE.items():
        if any(row["group"] == group for row in rows.values()):
            axes.plot([], [], marker, color=colour, label=group)
    axes.legend(loc="lower right", fontsize=8)


def _per_target_bars(axes, rows: dict[str, dict[str, Any]], targets: list[str]) -> None:
    key = [m for m in _BAR_METHODS if m in rows]
    width = 0.8 / max(len(key), 1)
    for i, method in enumerate(key):
        row = rows[method]
        means = [row["per_target"].get(t, (np.nan, 0))[0] for t in targets]
        stds = [row["per_target"].get(t, (0, 0))[1] for t in targets]
        axes.bar(np.arange(len(targets)) + (i - (len(key) - 1) / 2) * width, means, width, yerr=stds,
                 label=method, capsize=2)
    axes.set_xticks(np.arange(len(targets)), targets)
    axes.set_ylabel("top-1 (%)")
    axes.set_title("per target")
    if key:
        axes.legend(fontsize=7, ncol=2)
    axes.grid(True, axis="y", alpha=0.3)


def plot_sweep(summary: dict[str, Any], path: Path) -> Path:
    """Left: the paired differences of :data:`PLOTTED_PAIRS` against width (pooled mean, confidence interval
    as error bar, each checkpoint's mean as a small marker); right: each method's mean top-1 against width."""
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(13, 5.2))
    _paired_vs_width(left, summary)
    _accuracy_vs_width(right, summary)
    return _save(fig, path)


def _paired_vs_width(axes, summary: dict[str, Any]) -> None:
    widths = [int(w) for w in summary["widths"]]
    for i, (a, b) in enumerate(PLOTTED_PAIRS):
        pair, offset = f"{a} - {b}", (i - (len(PLOTTED_PAIRS) - 1) / 2) * 0.03 * (max(widths) - min(widths) or 1)
        xs, means, low, high = [], [], [], []
        for width, entry in summary["widths"].items():
            pooled = entry["pooled"]["paired"].get(pair)
            if pooled is None:
                continue
            xs.append(int(width) + offset)
            means.append(pooled["mean"])
            interval = pooled["ci95"] or [pooled["mean"]] * 2
            low.append(pooled["mean"] - interval[0])
            high.append(interval[1] - pooled["mean"])
            for ckpt in entry["checkpoints"].values():
                if ckpt["paired"].get(pair) is not None:
                    axes.plot(int(width) + offset, ckpt["paired"][pair]["mean"], "o", mfc="none", ms=5,
                              color=f"C{i}", alpha=0.7)
        axes.errorbar(xs, means, yerr=[low, high], fmt="-s", color=f"C{i}", capsize=4,
                      label=pair.replace(" - ", " − "))
    axes.plot([], [], "o", mfc="none", color="gray", label="one checkpoint (mean over its seeds)")
    axes.axhline(0.0, color="black", lw=0.8)
    axes.set_xticks(widths)
    axes.set_xlabel("model width (embedding dimension)")
    axes.set_ylabel("paired difference in top-1 (points)")
    axes.set_title(f"pooled over checkpoints, {100 * summary['confidence']:.0f} % confidence interval")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)


def _accuracy_vs_width(axes, summary: dict[str, Any]) -> None:
    widths = [int(w) for w in summary["widths"]]
    spread = 0.012 * (max(widths) - min(widths) or 1)
    for i, method in enumerate(SWEEP_METHODS):
        points = [(int(w), e["pooled"]["methods"][method]) for w, e in summary["widths"].items()
                  if method in e["pooled"]["methods"]]
        if points:
            shift = (i - (len(SWEEP_METHODS) - 1) / 2) * spread
            axes.errorbar([p[0] + shift for p in points], [p[1][0] for p in points], yerr=[p[1][1] for p in points],
                          fmt="-o", capsize=3, color=f"C{i}", label=method)
    axes.set_xticks(widths)
    axes.set_xlabel("model width (embedding dimension)")
    axes.set_ylabel("top-1 (%), mean over targets")
    axes.set_title("accuracy (error bar: std over checkpoints × seeds)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, ncol=2)


def plot_budget(summary: dict[str, Any], path: Path) -> Path:
    """The budget study: one panel per (pair, learning rate), the paired difference against epochs (log x) with
    its confidence interval, one line per (k, biases) setting; filled markers: points of the one long run,
    hollow markers and dashed lines: the genuinely shorter runs."""
    lrs = list(dict.fromkeys(s["lr"] for s in summary["settings"]))
    pairs = summary["pairs"]
    fig, panels = _pyplot().subplots(len(pairs), len(lrs), figsize=(6.5 * len(lrs), 4.6 * len(pairs)),
                                     squeeze=False, sharex=True)
    for row, pair in enumerate(pairs):
        for column, lr in enumerate(lrs):
            settings = [s for s in summary["settings"] if s["lr"] == lr]
            for i, setting in enumerate(settings):
                shift = 1.05 ** (i - (len(settings) - 1) / 2)
                label = f"k={setting['k']}, biases {'trained' if setting['bias'] else 'frozen'}"
                for run, style in (("within", {"fmt": "-o"}), ("short", {"fmt": "--o", "mfc": "white"})):
                    _budget_line(panels[row][column], setting, pair, run, shift * (1.1 if run == "short" else 1),
                                 f"C{i}", label if run == "within" else None, style)
            _budget_axes(panels[row][column], summary, pair, lr, row == len(pairs) - 1)
    return _save(fig, path)


def _budget_line(axes, setting: dict[str, Any], pair: str, run: str, shift: float, colour: str, label: str | None,
                 style: dict[str, Any]) -> None:
    points = [p for p in setting["points"] if p["run"] == run and p["paired"].get(pair)]
    if not points:
        return
    entries = [p["paired"][pair] for p in points]
    means = [e["mean"] for e in entries]
    low = [e["mean"] - (e["ci95"] or [e["mean"]] * 2)[0] for e in entries]
    high = [(e["ci95"] or [e["mean"]] * 2)[1] - e["mean"] for e in entries]
    axes.errorbar([p["epochs"] * shift for p in points], means, yerr=[low, high], color=colour, capsize=3,
                  label=label, **style)


def _budget_axes(axes, summary: dict[str, Any], pair: str, lr: float, bottom: bool) -> None:
    epochs = sorted({p["epochs"] for s in summary["settings"] for p in s["points"]})
    axes.axhline(0.0, color="black", lw=0.8)
    axes.set_xscale("log")
    axes.set_xticks(epochs, [str(e) for e in epochs])
    axes.minorticks_off()
    if bottom:
        long = max(p["epochs"] for s in summary["settings"] for p in s["points"] if p["run"] == "within")
        axes.set_xlabel(f"epochs trained (filled: within one {long}-epoch run; hollow, dashed: a run of that length)")
    axes.set_ylabel(f"{pair.replace(' - ', ' − ').replace('grft', 'GRFT')}, top-1 points")
    axes.set_title(f"lr {lr:g}, {100 * summary['confidence']:.0f} % confidence interval over seeds", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
