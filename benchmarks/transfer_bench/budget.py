"""The budget study (``--budget``): when does the choice of rows matter? GRFT's rows against random and
lowest-scored rows as the training budget grows (:class:`BudgetStudy`, :func:`run_budget`), with the paired
differences per setting and budget (:func:`summarise_budget`) and their table (:func:`budget_markdown`).

Every (k, biases, learning rate) setting runs once with the benchmark's 17-epoch schedule (2 warm-up epochs from
lr / 1000, then 15 cosine epochs), the test top-1 recorded after epochs 1, 2, 5 and 17 of that one run; at the
tuned learning rate, genuinely shorter runs (1, 2 and 5 epochs, cosine from the first epoch without warm-up)
show what a user with that budget gets. The 17-epoch run's first epoch trains at lr / 1000 and its second
at lr / 2, so its early points are a small-step regime, not a short training.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .jobs import Job
from .orchestration import run_study, write_results_json
from .plots import plot_budget
from .report import mean_std
from .settings import DEFAULT_LR, DEFAULT_REG_LAMBDA, Settings
from .sweep_statistics import CONFIDENCE, method_means, pair_cell, paired_difference

__all__ = ["CHOOSERS", "BUDGET_PAIRS", "BudgetStudy", "BUDGET", "QUICK_BUDGET", "method_name", "run_budget",
           "write_budget_report", "summarise_budget", "budget_markdown"]

CHOOSERS = ("grft", "random", "lowest")  # GRFT's SupCon-gradient rows, uniformly random rows, the lowest-scored
BUDGET_PAIRS = (("grft", "random"), ("grft", "lowest"))


def method_name(chooser: str, k: int, bias: bool) -> str:
    """The registered method of ``chooser``'s rows at ``k`` with the biases trained (``bias``) or frozen."""
    return f"{chooser}-row-k{k}" + ("" if bias else "-nobias")


@dataclass(frozen=True)
class BudgetStudy:
    """The settings (every k x biases x learning rate) and budgets of the study.

    Attributes:
        ks: rows per layer.
        biases: the targeted layers' biases trained (GRFT's default) or frozen (rows + head only).
        lrs: learning rates: a small one (first-order regime for longer) and the tuned one.
        eval_epochs: epochs after which the one run records its test top-1 (the last: the run's end).
        short_epochs: budgets of the genuinely shorter runs.
        short_lrs, short_biases: the settings that also run the shorter budgets (by default the tuned learning
            rate with the biases trained, GRFT's own setting: what a user shortening a run gets).
    """

    ks: tuple[int, ...] = (1, 8)
    biases: tuple[bool, ...] = (True, False)
    lrs: tuple[float, ...] = (3e-3, DEFAULT_LR["grft"])
    eval_epochs: tuple[int, ...] = (1, 2, 5, 17)
    short_epochs: tuple[int, ...] = (1, 2, 5)
    short_lrs: tuple[float, ...] = (DEFAULT_LR["grft"],)
    short_biases: tuple[bool, ...] = (True,)

    def has_short_runs(self, setting: dict[str, Any]) -> bool:
        """Whether ``setting`` also runs the shorter budgets."""
        return setting["lr"] in self.short_lrs and setting["bias"] in self.short_biases

    def points(self, setting: dict[str, Any]) -> list[tuple[str, int]]:
        """The (run, epochs) points of ``setting``: ``('within', e)`` of the one run, ``('short', e)`` the
        shorter runs."""
        points = [("within", e) for e in self.eval_epochs]
        return points + ([("short", e) for e in self.short_epochs] if self.has_short_runs(setting) else [])

    def settings(self) -> list[dict[str, Any]]:
        """Every (k, bias, lr) setting, as dicts."""
        return [{"k": k, "bias": bias, "lr": lr} for lr in self.lrs for k in self.ks for bias in self.biases]

    def jobs(self, settings: Settings, reg_lambda: float) -> list[Job]:
        """The one long run of every setting, chooser, target and seed, and the shorter runs."""
        jobs = []
        for setting in self.settings():
            for chooser in CHOOSERS:
                method = method_name(chooser, setting["k"], setting["bias"])
                runs = [{"eval_epochs": self.eval_epochs}]
                if self.has_short_runs(setting):
                    runs += [{"short_schedule": epochs} for epochs in self.short_epochs]
                jobs += [Job(t, method, s, setting["lr"], reg_lambda, **run) for run in runs for t in settings.targets
                         for s in settings.seeds]
        return jobs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


BUDGET = BudgetStudy()
# the pipeline check: QUICK trains 1 warm-up + 1 cosine epoch; one learning rate, one short budget
QUICK_BUDGET = BudgetStudy(lrs=(DEFAULT_LR["grft"],), eval_epochs=(1, 2), short_epochs=(1,))


def _top1_at(run: dict[str, Any], kind: str, epochs: int) -> float | None:
    if kind == "within":
        return run.get("top1_by_epoch", {}).get(str(epochs))
    return run["top1"] if run.get("short_schedule") == epochs else None


def _as_results(runs: list[dict[str, Any]], setting: dict[str, Any], kind: str, epochs: int,
                settings: dict[str, Any]) -> dict[str, Any]:
    """The top-1 of one (setting, point) as a benchmark result with the choosers as methods (what
    :func:`.sweep_statistics.paired_difference` reads)."""
    names = {method_name(c, setting["k"], setting["bias"]): c for c in CHOOSERS}
    rows = [{"method": names[r["method"]], "target": r["target"], "seed": r["seed"], "split": "test", "top1": top1}
            for r in runs if r["method"] in names and r["lr"] == setting["lr"]
            and (top1 := _top1_at(r, kind, epochs)) is not None]
    return {"runs": rows, "methods": list(CHOOSERS), "settings": {"targets": settings["targets"],
                                                                 "seeds": settings["seeds"]}}


def _costs(runs: list[dict[str, Any]], k: int) -> dict[str, float]:
    """Mean seconds of one training epoch and of GRFT's selection (its 17-epoch runs at ``k``), and the mean of
    their ratio job by job (robust to a load that changes between jobs)."""
    grft = (method_name("grft", k, True), method_name("grft", k, False))
    long = [r for r in runs if r.get("top1_by_epoch") and r["method"] in grft]
    epochs = [r["train_seconds"] / r["epochs"] for r in long]
    selections = [r["info"]["selection_seconds"] for r in long]
    return {"epoch_seconds": float(np.mean(epochs)), "selection_seconds": float(np.mean(selections)),
            "selection_epochs": float(np.mean([s / e for s, e in zip(selections, epochs)]))}


def summarise_budget(results: dict[str, Any]) -> dict[str, Any]:
    """Per setting and (run, epochs) point: each chooser's mean ± std top-1 over the seeds (averaged over the
    targets) and the paired differences of :data:`BUDGET_PAIRS` (Student-t interval over the seeds); per
    setting the mean first-order share of each chooser; per k the cost of GRFT's selection in epochs."""
    study, runs = BudgetStudy(**{k: tuple(v) for k, v in results["study"].items()}), results["runs"]
    settings = []
    for setting in study.settings():
        points = []
        for kind, epochs in study.points(setting):
            pseudo = _as_results(runs, setting, kind, epochs, results["settings"])
            points.append({"run": kind, "epochs": epochs, "methods": method_means([pseudo]),
                           "paired": {f"{a} - {b}": paired_difference([pseudo], a, b) for a, b in BUDGET_PAIRS}})
        shares = {c: mean_std([r["first_order"]["share"] for r in runs
                               if r["method"] == method_name(c, setting["k"], setting["bias"])
                               and r["lr"] == setting["lr"] and r.get("top1_by_epoch")]) for c in CHOOSERS}
        settings.append({**setting, "first_order_share": shares, "points": points})
    return {"confidence": CONFIDENCE, "pairs": [f"{a} - {b}" for a, b in BUDGET_PAIRS], "settings": settings,
            "costs": {str(k): _costs(runs, k) for k in study.ks}}


def _point_label(point: dict[str, Any], long_epochs: int) -> str:
    if point["run"] == "within":
        return f"{point['epochs']} of a {long_epochs}-epoch run"
    return f"a {point['epochs']}-epoch run"


def budget_markdown(summary: dict[str, Any]) -> str:
    """The study's table: one row per setting and point, the choosers' top-1 and the paired differences."""
    long_epochs = max(p["epochs"] for s in summary["settings"] for p in s["points"] if p["run"] == "within")
    names = [pair.replace(" - ", " − ").replace("grft", "GRFT") for pair in summary["pairs"]]
    lines = ["| k | biases | lr | epochs | GRFT | random | lowest | " + " | ".join(names) + " |",
             "|---:|---|---:|---|---:|---:|---:|" + "---:|" * len(names)]
    for setting in summary["settings"]:
        head = f"| {setting['k']} | {'trained' if setting['bias'] else 'frozen'} | {setting['lr']:g}"
        for point in setting["points"]:
            means = " | ".join(f"{point['methods'][c][0]:.1f} ± {point['methods'][c][1]:.1f}"
                               if c in point["methods"] else "—" for c in CHOOSERS)
            pairs = " | ".join(pair_cell(point["paired"].get(p)) for p in summary["pairs"])
            lines.append(f"{head} | {_point_label(point, long_epochs)} | {means} | {pairs} |")
    level = f"{100 * summary['confidence']:.0f}"
    lines += ["", "Top-1 (%) averaged over the targets, mean ± std over the seeds; paired difference in top-1 points "
                  f"(same target and seed): mean [{level} % confidence interval, Student t over the seeds of the whole "
                  "target set] (wins/ties/losses over the single target × seed pairs).", "",
              "| k | GRFT's selection, seconds | one training epoch, seconds | selection in epochs (job by job) |",
              "|---:|---:|---:|---:|"]
    for k, cost in summary["costs"].items():
        lines.append(f"| {k} | {cost['selection_seconds']:.2f} | {cost['epoch_seconds']:.2f} | "
                     f"{cost['selection_epochs']:.2f} |")
    return "\n".join(lines) + "\n"


def run_budget(study: BudgetStudy, settings: Settings, out_dir: Path, cache_dir: Path | None, workers: int = 2,
               reg_lambda: float = DEFAULT_REG_LAMBDA, quiet: bool = False,
               command: str | None = None) -> dict[str, Any]:
    """Run the study on ``settings``' checkpoint, targets and seeds; write results.json (every job),
    table.md and budget.png."""
    results = run_study("transfer-budget", settings, lambda values: study.jobs(values, reg_lambda), out_dir,
                        cache_dir, workers, quiet, command)
    results.update(study=study.to_dict(), reg_lambda=reg_lambda)
    write_budget_report(results, out_dir)
    return results


def write_budget_report(results: dict[str, Any], out_dir: Path) -> None:
    """Summarise ``results`` (:func:`summarise_budget`) and write results.json, table.md and budget.png."""
    results["summary"] = summarise_budget(results)
    (out_dir / "table.md").write_text(budget_markdown(results["summary"]))
    plot_budget(results["summary"], out_dir / "budget.png")
    write_results_json(results, out_dir / "results.json")
