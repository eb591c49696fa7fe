"""What the width sweep compares (:data:`SWEEP_METHODS`, :data:`SWEEP_PAIRS`) and its statistics: paired
differences over (checkpoint, seed) units with a Student-t interval (:func:`paired_difference`), the summary
per width (:func:`summarise_sweep`) and its tables (:func:`sweep_markdown`)."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from .report import cell, mean_std

__all__ = ["SWEEP_METHODS", "SWEEP_PAIRS", "PLOTTED_PAIRS", "CONFIDENCE", "paired_difference", "method_means",
           "summarise_sweep", "pair_cell", "sweep_markdown"]

# Does gradient selection beat random rows as the model widens? The same source task, targets and protocol at
# several widths (depth fixed, head width fixed: heads scale with the width), each width pre-trained from
# several seeds, so that no single checkpoint decides (the GRFT - random sign flips between checkpoints).
SWEEP_METHODS = ("grft-row-k1", "grft-row-k1-plain", "random-row-k1", "lowest-row-k1", "score-grasp", "linear",
                 "bias")
SWEEP_PAIRS = (("grft-row-k1", "random-row-k1"), ("grft-row-k1", "lowest-row-k1"),
               ("grft-row-k1-plain", "random-row-k1"), ("score-grasp", "random-row-k1"), ("grft-row-k1", "bias"),
               ("grft-row-k1", "linear"))
PLOTTED_PAIRS = SWEEP_PAIRS[:2]  # the question: GRFT - random and GRFT - lowest against width
CONFIDENCE = 0.95


def _confidence_interval(values: Sequence[float]) -> list[float] | None:
    """Student-t interval of the mean (:data:`CONFIDENCE`); None for fewer than two values."""
    from scipy import stats

    if len(values) < 2:
        return None
    mean, sem = float(np.mean(values)), float(np.std(values, ddof=1)) / math.sqrt(len(values))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)) * sem
    return [mean - half, mean + half]


def _test_top1(results: dict[str, Any]) -> dict[tuple[str, str, int], float]:
    return {(r["method"], r["target"], r["seed"]): 100 * r["top1"] for r in results["runs"] if r["split"] == "test"}


def _units(results: Sequence[dict[str, Any]], value: Callable[[dict, str, int], float | None]) -> list[float]:
    """One value per (checkpoint, seed): ``value(top1 by key, target, seed)`` averaged over the targets,
    for the seeds where every target has one."""
    units = []
    for result in results:
        by, targets = _test_top1(result), result["settings"]["targets"]
        for seed in result["settings"]["seeds"]:
            values = [value(by, t, seed) for t in targets]
            if all(v is not None for v in values):
                units.append(float(np.mean(values)))
    return units


def paired_difference(results: Sequence[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """``a - b`` top-1 (points) over one or more checkpoints' runs, paired on (checkpoint, target, seed).

    ``mean`` and ``ci95`` (Student t) are over the units of replication, the (checkpoint, seed) runs of the
    whole target set (the difference averaged over the targets); ``wins`` / ``ties`` / ``losses`` count the
    single (checkpoint, target, seed) pairs. None when no pair exists (a method missing at this width).
    """
    def diff(by: dict, target: str, seed: int) -> float | None:
        if (a, target, seed) in by and (b, target, seed) in by:
            return by[(a, target, seed)] - by[(b, target, seed)]
        return None

    units = _units(results, diff)
    if not units:
        return None
    flat = [d for r in results for t in r["settings"]["targets"] for s in r["settings"]["seeds"]
            if (d := diff(_test_top1(r), t, s)) is not None]
    return {"mean": float(np.mean(units)), "ci95": _confidence_interval(units), "units": len(units),
            "wins": sum(d > 0 for d in flat), "ties": sum(d == 0 for d in flat), "losses": sum(d < 0 for d in flat),
            "pairs": len(flat)}


def method_means(results: Sequence[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per method: mean ± std over the (checkpoint, seed) units of the top-1 averaged over the targets."""
    methods = list(dict.fromkeys(m for r in results for m in r["methods"]))
    means = {}
    for method in methods:
        units = _units(results, lambda by, t, s: by.get((method, t, s)))
        if units:
            means[method] = mean_std(units)
    return means


def summarise_sweep(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per width: every checkpoint (pre-training seed, weight hash, source accuracy, method means, paired
    differences) and all checkpoints pooled; the figures of ``sweep.md`` and the plot, from per-job results."""
    widths: dict[str, Any] = {}
    for name, result in runs.items():
        width = str(result["settings"]["embed_dim"])
        entry = widths.setdefault(width, {"params": result["pretrain"]["params"],
                                          "num_heads": result["settings"]["num_heads"], "checkpoints": {}})
        entry["checkpoints"][name] = {
            "pretrain_seed": result["settings"]["pretrain_seed"], "sha256": result["pretrain"]["sha256"],
            "source_val_top1": 100 * result["pretrain"]["source_val_top1"],
            "pretrain_epochs": result["settings"]["pretrain_epochs"], "methods": method_means([result]),
            "paired": {f"{a} - {b}": paired_difference([result], a, b) for a, b in SWEEP_PAIRS}}
    for width, entry in widths.items():
        results = [r for r in runs.values() if str(r["settings"]["embed_dim"]) == width]
        entry["pooled"] = {"methods": method_means(results),
                           "paired": {f"{a} - {b}": paired_difference(results, a, b) for a, b in SWEEP_PAIRS}}
    return {"confidence": CONFIDENCE, "pairs": [f"{a} - {b}" for a, b in SWEEP_PAIRS],
            "widths": dict(sorted(widths.items(), key=lambda item: int(item[0])))}


def pair_cell(entry: dict[str, Any] | None) -> str:
    """A paired difference as ``+mean [low, high] (wins/ties/losses)``; ``—`` for None."""
    if entry is None:
        return "—"
    interval = "" if entry["ci95"] is None else f" [{entry['ci95'][0]:+.1f}, {entry['ci95'][1]:+.1f}]"
    return f"{entry['mean']:+.2f}{interval} ({entry['wins']}/{entry['ties']}/{entry['losses']})"


def sweep_markdown(summary: dict[str, Any]) -> str:
    """The sweep's two tables: accuracy per method, and the paired differences, per checkpoint and pooled
    (the methods and pairs that ran at some width)."""
    methods = [m for m in SWEEP_METHODS if any(m in w["pooled"]["methods"] for w in summary["widths"].values())]
    pairs = [p for p in summary["pairs"] if any(w["pooled"]["paired"].get(p) for w in summary["widths"].values())]
    names = [pair.replace(" - ", " − ") for pair in pairs]
    lines = ["| width (heads) | checkpoint: pre-training seed, weights sha256 | source epochs | source val top-1 | "
             + " | ".join(methods) + " |", "|---|---|---:|---:|" + "---:|" * len(methods)]
    diffs = ["| width | checkpoint | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for width, entry in summary["widths"].items():
        for name, ckpt in entry["checkpoints"].items():
            head = f"| {width} ({entry['num_heads']}) | seed {ckpt['pretrain_seed']}, `{ckpt['sha256'][:12]}`"
            lines.append(f"{head} | {ckpt['pretrain_epochs']} | {ckpt['source_val_top1']:.1f} | "
                         + " | ".join(cell(ckpt["methods"].get(m)) for m in methods) + " |")
            diffs.append(f"| {width} | seed {ckpt['pretrain_seed']} | "
                         + " | ".join(pair_cell(ckpt["paired"].get(p)) for p in pairs) + " |")
        seeds = ", ".join(str(c["pretrain_seed"]) for c in entry["checkpoints"].values())
        lines.append(f"| **{width}** ({entry['num_heads']}) | **pooled** (seeds {seeds}) | | | "
                     + " | ".join(f"**{cell(entry['pooled']['methods'].get(m))}**" for m in methods) + " |")
        diffs.append(f"| **{width}** | **pooled** | "
                     + " | ".join(f"**{pair_cell(entry['pooled']['paired'].get(p))}**" for p in pairs)
                     + " |")
    level = f"{100 * summary['confidence']:.0f}"
    lines += ["", "Top-1 (%) averaged over the targets, mean ± std over the (checkpoint, seed) runs.", ""]
    diffs += ["", f"Paired difference in top-1 points (same checkpoint, target and seed): mean [{level} % confidence "
                  "interval, Student t over the (checkpoint, seed) runs of the whole target set] (wins/ties/losses "
                  "over the single target × seed pairs)."]
    return "\n".join(lines + diffs) + "\n"

