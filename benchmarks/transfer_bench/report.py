"""The report of a benchmark run: per-method summaries over seeds, paired differences, the selection record
(:func:`summarise`), and the markdown tables (:func:`to_markdown`)."""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from .methods import METHODS

__all__ = ["mean_std", "summarise", "cell", "to_markdown"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / max(len(a | b), 1)


Key = tuple[str, str, int]  # (method, target, seed) of one run
# the paired differences of the table (a - b on the same target and seed), when both methods ran
PAIRS = (("grft-row-k1", "random-row-k1"), ("grft-row-k2", "random-row-k2"),
         ("grft-row-k1-nobias", "random-row-k1-nobias"), ("grft-row-k1", "lowest-row-k1"),
         ("grft-row-k1-plain", "random-row-k1"), ("grft-row-k1-plain", "grft-row-k1"),
         ("grft-row-k1-n4", "grft-row-k1"), ("grft-row-k1", "grft-row-k1-noL2"), ("grft-row-k1", "bias"),
         ("grft-row-k1", "linear"), ("full", "grft-row-k1"), ("grft-row-k1", "lora"))


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per method: per-target and overall mean ± std over seeds, trainable counts; selection vs random.

    Returns ``methods`` (a row per method: accuracies in %, trainable counts, seconds), ``paired`` (a - b in
    top-1 points, per target and over all pairs, with wins / ties / losses) and ``selection`` (for the methods
    with a selection record: the chosen candidates' score share, and the overlap of the chosen indices).
    """
    runs = [r for r in results["runs"] if r["split"] == "test"]
    targets = list(results["settings"]["targets"])
    seeds = list(results["settings"]["seeds"])
    by = {(r["method"], r["target"], r["seed"]): r for r in runs}
    methods = [m for m in results["methods"] if any(r["method"] == m for r in runs)]
    summary: dict[str, Any] = {"methods": {m: _method_row(m, runs, by, targets, seeds) for m in methods},
                               "paired": {}, "selection": {}}
    for a, b in _pairs(methods):
        entry = _paired_entry(a, b, by, targets, seeds)
        if entry is not None:
            summary["paired"][f"{a} - {b}"] = entry
    for method in methods:
        entry = _selection_entry(method, runs, by, targets, seeds)
        if entry is not None:
            summary["selection"][method] = entry
    return summary


def _method_row(method: str, runs: list[dict[str, Any]], by: dict[Key, dict[str, Any]], targets: list[str],
                seeds: list[int]) -> dict[str, Any]:
    per_target = {}
    for target in targets:
        values = [by[(method, target, s)]["top1"] for s in seeds if (method, target, s) in by]
        if values:
            per_target[target] = mean_std([100 * v for v in values])
    complete = [s for s in seeds if all((method, t, s) in by for t in targets)]
    seed_means = [100 * float(np.mean([by[(method, t, s)]["top1"] for t in targets])) for s in complete]
    mine = [r for r in runs if r["method"] == method]
    return {
        "label": METHODS[method].label if method in METHODS else method,
        "group": METHODS[method].group if method in METHODS else "other",
        "per_target": per_target,
        "mean": mean_std(seed_means) if seed_means else None,
        "trainable_mean": float(np.mean([r["trainable"] for r in mine])),
        "backbone_trainable": float(np.mean([r["trainable"] - r["head_params"] for r in mine])),
        "trainable_percent": float(np.mean([r["trainable_percent"] for r in mine])),
        "seconds_mean": float(np.mean([r["seconds"] for r in mine])),
    }


def _pairs(methods: list[str]) -> list[tuple[str, str]]:
    """:data:`PAIRS`, then every beyond-GRFT row against GRFT and against random rows at its budget."""
    pairs = list(PAIRS)
    for method in methods:
        if method in METHODS and METHODS[method].group == "beyond":
            k = "k2" if method.endswith("-k2") else "k1"
            pairs += [(method, f"grft-row-{k}"), (method, f"random-row-{k}")]
    return pairs


def _paired_entry(a: str, b: str, by: dict[Key, dict[str, Any]], targets: list[str],
                  seeds: list[int]) -> dict[str, Any] | None:
    diffs = {t: [100 * (by[(a, t, s)]["top1"] - by[(b, t, s)]["top1"]) for s in seeds
                 if (a, t, s) in by and (b, t, s) in by] for t in targets}
    flat = [d for v in diffs.values() for d in v]
    if not flat:
        return None
    return {"per_target": {t: mean_std(v) for t, v in diffs.items() if v},
            "mean": float(np.mean(flat)), "wins": sum(d > 0 for d in flat), "ties": sum(d == 0 for d in flat),
            "losses": sum(d < 0 for d in flat), "pairs": len(flat)}


def _selection_entry(method: str, runs: list[dict[str, Any]], by: dict[Key, dict[str, Any]], targets: list[str],
                     seeds: list[int]) -> dict[str, Any] | None:
    mine = [r for r in runs if r["method"] == method and "chosen_share_mean" in r["info"]]
    if not mine:
        return None
    entry = {"chosen_share": float(np.mean([r["info"]["chosen_share_mean"] for r in mine])),
             "uniform_share": float(np.mean([r["info"]["uniform_share_mean"] for r in mine]))}
    ratios = [r["info"]["chosen_vs_rest_geomean"] for r in mine if r["info"].get("chosen_vs_rest_geomean")]
    entry["chosen_vs_rest"] = float(np.mean(ratios)) if ratios else None
    entry["jaccard_across_seeds"] = _index_overlap(by, [((method, t, s), (method, t, s2)) for t in targets
                                                        for s, s2 in itertools.combinations(seeds, 2)])
    entry["jaccard_across_targets"] = _index_overlap(by, [((method, t, s), (method, t2, s)) for s in seeds
                                                          for t, t2 in itertools.combinations(targets, 2)])
    return entry


def _index_overlap(by: dict[Key, dict[str, Any]], pairs: list[tuple[Key, Key]]) -> float | None:
    """Mean Jaccard index of the chosen indices, layer by layer, over the pairs of runs that both exist."""
    overlaps = []
    for one, other in pairs:
        if one in by and other in by:
            a, b = by[one]["info"]["indices"], by[other]["info"]["indices"]
            overlaps += [_jaccard(a[n], b[n]) for n in a if n in b]
    return float(np.mean(overlaps)) if overlaps else None


def cell(value: tuple[float, float] | None) -> str:
    """``mean ± std`` with one decimal; ``—`` for None."""
    return "—" if value is None else f"{value[0]:.1f} ± {value[1]:.1f}"


def to_markdown(results: dict[str, Any]) -> str:
    """The results table (mean ± std over seeds, top-1 %), the paired differences and the selection record."""
    summary = results.get("summary") or summarise(results)
    targets = list(results["settings"]["targets"])
    lines = ["| method | trainable params | trainable % | " + " | ".join(targets) + " | mean |",
             "|---|---:|---:|" + "---:|" * (len(targets) + 1)]
    for method, row in summary["methods"].items():
        cells = [cell(row["per_target"].get(t)) for t in targets]
        lines.append(f"| {row['label']} | {row['trainable_mean']:,.0f} | {row['trainable_percent']:.2f} | "
                     + " | ".join(cells) + f" | **{cell(row['mean'])}** |")
    seeds = results["settings"]["seeds"]
    lines += ["", f"Top-1 accuracy (%) on each target's test split, mean ± std over seeds {list(seeds)}; "
                  "trainable params = mean over targets (the head differs by class count); trainable % of the "
                  "model's own parameters.", ""]
    if summary["paired"]:
        lines += ["| paired difference (same target, same seed) | " + " | ".join(targets)
                  + " | mean | wins / ties / losses |", "|---|" + "---:|" * (len(targets) + 2)]
        for name, entry in summary["paired"].items():
            cells = [cell(entry["per_target"].get(t)) for t in targets]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {entry['mean']:+.2f} | "
                         f"{entry['wins']} / {entry['ties']} / {entry['losses']} |")
        lines.append("")
    if summary["selection"]:
        lines += ["| selection record | share of the selection score held by the chosen candidates (controls: "
                  "of GRFT's SupCon gradient score) | "
                  "same for a uniform random choice (k / candidates) | chosen / rest mean score | "
                  "index overlap across seeds (Jaccard) | across targets |", "|---|---:|---:|---:|---:|---:|"]
        fmt = lambda v, p=3: "—" if v is None else f"{v:.{p}f}"  # noqa: E731
        for method, entry in summary["selection"].items():
            lines.append(f"| {method} | {fmt(entry['chosen_share'])} | {fmt(entry['uniform_share'])} | "
                         f"{fmt(entry['chosen_vs_rest'], 2)} | {fmt(entry['jaccard_across_seeds'])} | "
                         f"{fmt(entry['jaccard_across_targets'])} |")
    return "\n".join(lines) + "\n"

