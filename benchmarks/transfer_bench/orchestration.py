"""A whole benchmark run (:func:`run_benchmark`: pre-train, fine-tune every job, report), the choice of
the learning rates and lambda on validation splits (:func:`tune`), the runs of a study's own jobs
(:func:`run_study`) and the first-order diagnostic of every row / column choice (:func:`run_first_order`)."""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from .data import TargetData, make_target
from .first_order import first_order_markdown, summarise_first_order
from .jobs import Job, run_jobs
from .log import line_logger
from .methods import DEFAULT_METHODS, FIRST_ORDER_METHODS, METHODS, choose_lora_rank
from .plots import plot
from .pretrain import pretrain
from .provenance import code_version, command_line, machine
from .report import summarise, to_markdown
from .settings import DEFAULT_LR, DEFAULT_REG_LAMBDA, Settings

__all__ = ["TUNE_LR_GRID", "TUNE_LR_METHOD", "TUNE_LAMBDA_GRID", "make_targets", "run_benchmark", "tune",
           "run_study", "write_results_json", "run_first_order"]

# the grids of --tune: learning rate per family (each with the method it is tuned on), then GRFT's lambda
TUNE_LR_GRID = {"head": (3e-2, 1e-1, 3e-1), "full": (1e-3, 3e-3, 1e-2), "grft": (1e-2, 3e-2, 1e-1),
                "lora": (3e-3, 1e-2, 3e-2)}
TUNE_LR_METHOD = {"head": "linear", "full": "full", "grft": "grft-row-k1-noL2", "lora": "lora"}
TUNE_LAMBDA_GRID = (1e-4, 1e-3, 1e-2)


def make_targets(settings: Settings) -> dict[str, TargetData]:
    """Every target task of ``settings``, by name."""
    return {name: make_target(name, settings.num_train, settings.num_test, settings.data_seed, settings.img_size)
            for name in settings.targets}


class _Start(NamedTuple):
    """What every run of this benchmark begins with: its log, start time, code version and pre-trained weights."""

    log: Callable[[str], None]
    begin: float  # time.perf_counter() at the start
    code: dict[str, Any]  # the code that runs, not the checkout at the end
    state: dict[str, Any]  # the pre-trained state dict
    pretrain: dict[str, Any]  # the pre-training's record


def _start(settings: Settings, out_dir: Path, cache_dir: Path | None, workers: int, quiet: bool) -> _Start:
    """Create ``out_dir``, open its log.txt, record the code version and pre-train (or load) the weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = line_logger(out_dir / "log.txt", quiet)
    begin, code = time.perf_counter(), code_version()
    state, pre = pretrain(settings, cache_dir, log, workers, out_dir / "log.txt", quiet)
    return _Start(log, begin, code, state, pre)


def run_benchmark(settings: Settings, out_dir: Path, cache_dir: Path | None, workers: int = 2,
                  lr: dict[str, float] | None = None, reg_lambda: float = DEFAULT_REG_LAMBDA,
                  quiet: bool = False, plot_file: str | None = "accuracy_vs_trainable.png",
                  command: str | None = None) -> dict[str, Any]:
    """Pre-train (or load), fine-tune every (target, method, seed), write results.json, table.md and, unless
    ``plot_file`` is None, the plot. ``command``: the command line to record (default: this process's)."""
    lr = {**DEFAULT_LR, **(lr or {})}
    methods = settings.methods or DEFAULT_METHODS
    METHODS.check(methods)
    log, begin, code, state, pre = _start(settings, out_dir, cache_dir, workers, quiet)
    t_targets = time.perf_counter()
    targets = make_targets(settings)
    target_seconds = time.perf_counter() - t_targets
    lora = choose_lora_rank(settings)
    log(f"targets ready in {target_seconds:.1f} s; LoRA rank {lora['rank']} ({lora['lora_trainable']:,} trainable) "
        f"matches GRFT row k=1 ({lora['grft_row_k1_trainable']:,}) at 10 classes")
    jobs = [Job(t, m, s, lr[METHODS[m].family], reg_lambda) for t in settings.targets for m in methods
            for s in settings.seeds]
    t_fine = time.perf_counter()
    runs = run_jobs(jobs, settings, state, targets, lora["rank"], workers, log)
    finetune_seconds = time.perf_counter() - t_fine
    results = {
        "benchmark": "transfer", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command or command_line(), "code": code, "machine": machine(), "workers": workers,
        "settings": settings.to_dict(), "methods": list(methods),
        "lr": lr, "reg_lambda": reg_lambda, "lora": lora, "pretrain": pre,
        "timing": {"pretrain_seconds": 0.0 if pre["from_cache"] else pre["seconds"],
                   "pretrain_seconds_when_made": pre["seconds"], "pretrain_from_cache": pre["from_cache"],
                   "target_data_seconds": target_seconds, "finetune_seconds": finetune_seconds,
                   "finetune_jobs": len(runs), "finetune_job_seconds_sum": sum(r["seconds"] for r in runs)},
        "runs": sorted(runs, key=lambda r: (r["target"], METHODS.names().index(r["method"]), r["seed"])),
    }
    results["summary"] = summarise(results)
    _write_results(results, out_dir, plot_file, begin)
    log(f"done in {results['timing']['total_seconds']:.0f} s: {out_dir / 'table.md'}")
    return results


def _write_results(results: dict[str, Any], out_dir: Path, plot_file: str | None, begin: float) -> None:
    """table.md, the plot (unless ``plot_file`` is None) and results.json, with the report's and the whole run's
    seconds (since ``begin``, a ``time.perf_counter()``) in ``results['timing']``."""
    t_report = time.perf_counter()
    (out_dir / "table.md").write_text(to_markdown(results))
    if plot_file is not None:
        plot(results, out_dir / plot_file)
    results["timing"]["report_seconds"] = time.perf_counter() - t_report
    results["timing"]["total_seconds"] = time.perf_counter() - begin
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))


def tune(settings: Settings, out_dir: Path, cache_dir: Path | None, workers: int = 2,
         quiet: bool = False) -> dict[str, Any]:
    """Choose the learning rate of each family, then GRFT's lambda, on validation splits (seed 0); write
    ``tune.json``.

    Each target's training set is split train[:80%] -> val[80%:]; the test split is never read. The score
    of a setting is its mean validation top-1 over the targets.
    """
    log, begin, code, state, pre = _start(settings, out_dir, cache_dir, workers, quiet)
    targets = make_targets(settings)
    lora = choose_lora_rank(settings)
    seed = settings.seeds[0]

    def validate(jobs: list[Job]) -> list[dict[str, Any]]:
        return run_jobs(jobs, settings, state, targets, lora["rank"], workers, log)

    runs = validate([Job(t, TUNE_LR_METHOD[family], seed, value, 0.0, split="val")
                     for family, grid in TUNE_LR_GRID.items() for value in grid for t in settings.targets])
    table = {family: {value: _mean_top1(runs, method=TUNE_LR_METHOD[family], lr=value) for value in grid}
             for family, grid in TUNE_LR_GRID.items()}
    chosen_lr = {family: max(scores, key=scores.get) for family, scores in table.items()}
    log(f"chosen learning rates: {chosen_lr}")
    lambda_runs = validate([Job(t, "grft-row-k1", seed, chosen_lr["grft"], value, split="val")
                            for value in TUNE_LAMBDA_GRID for t in settings.targets])
    lambdas = {value: _mean_top1(lambda_runs, reg_lambda=value) for value in TUNE_LAMBDA_GRID}
    lambdas_zero = table["grft"][chosen_lr["grft"]]  # the lr search ran GRFT row k=1 with L2 off
    chosen_lambda = max(lambdas, key=lambdas.get)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "code": code, "machine": machine(),
              "settings": settings.to_dict(), "pretrain": pre,
              "lr_grid": {f: list(g) for f, g in TUNE_LR_GRID.items()}, "lr_method": TUNE_LR_METHOD,
              "val_top1_by_lr": {f: {str(k): v for k, v in s.items()} for f, s in table.items()},
              "chosen_lr": chosen_lr, "val_top1_by_lambda": {str(k): v for k, v in lambdas.items()},
              "val_top1_lambda_0": lambdas_zero, "chosen_lambda": chosen_lambda,
              "per_target": runs + lambda_runs, "seconds": time.perf_counter() - begin}
    (out_dir / "tune.json").write_text(json.dumps(result, indent=1))
    log(f"chosen lambda: {chosen_lambda} (val top-1 {lambdas}, lambda 0: {lambdas_zero:.4f}); "
        f"{result['seconds']:.0f} s")
    return result


def _mean_top1(runs: list[dict[str, Any]], **match: Any) -> float:
    """Mean top-1 of the runs whose fields equal ``match`` (e.g. ``method=..., lr=...``)."""
    return float(np.mean([r["top1"] for r in runs if all(r[key] == value for key, value in match.items())]))


def run_study(benchmark: str, settings: Settings, make_jobs: Callable[[Settings], list[Job]], out_dir: Path,
              cache_dir: Path | None, workers: int = 2, quiet: bool = False,
              command: str | None = None) -> dict[str, Any]:
    """Pre-train (or load) and run ``make_jobs(settings)`` (GRFT-family methods: no LoRA rank); the results
    without a summary: provenance, settings, the pre-training, timing and every job's record."""
    log, begin, code, state, pre = _start(settings, out_dir, cache_dir, workers, quiet)
    targets = make_targets(settings)
    jobs = make_jobs(settings)
    t_jobs = time.perf_counter()
    runs = run_jobs(jobs, settings, state, targets, 0, workers, log)
    return {"benchmark": benchmark, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": command or command_line(), "code": code, "machine": machine(), "workers": workers,
            "settings": settings.to_dict(), "pretrain": pre,
            "timing": {"pretrain_seconds": 0.0 if pre["from_cache"] else pre["seconds"],
                       "pretrain_from_cache": pre["from_cache"], "jobs_seconds": time.perf_counter() - t_jobs,
                       "jobs": len(runs), "job_seconds_sum": sum(r["seconds"] for r in runs),
                       "total_seconds": time.perf_counter() - begin},
            "runs": sorted(runs, key=lambda r: (r["target"], METHODS.names().index(r["method"]), r["seed"]))}


def write_results_json(results: dict[str, Any], path: Path) -> None:
    """``results`` as indented JSON with each job's record on one line (compact for hundreds of jobs)."""
    text = json.dumps({**results, "runs": []}, indent=1)
    runs = ",\n  ".join(json.dumps(run, separators=(",", ":")) for run in results["runs"])
    path.write_text(text.replace('\n "runs": []', '\n "runs": [\n  ' + runs + "\n ]", 1))


def run_first_order(settings: Settings, out_dir: Path, cache_dir: Path | None, workers: int = 2,
                    lr: dict[str, float] | None = None, reg_lambda: float = DEFAULT_REG_LAMBDA, quiet: bool = False,
                    command: str | None = None) -> dict[str, Any]:
    """The first-order share (:mod:`.first_order`) of every static row / column choice of ``settings.methods``
    (default: :data:`FIRST_ORDER_METHODS`) on every target and seed: selection only, no training; writes
    results.json and table.md."""
    methods = settings.methods or FIRST_ORDER_METHODS
    METHODS.check(methods)
    lr = {**DEFAULT_LR, **(lr or {})}

    def make_jobs(values: Settings) -> list[Job]:
        return [Job(t, m, s, lr[METHODS[m].family], reg_lambda, train=False) for t in values.targets
                for m in methods for s in values.seeds]

    results = run_study("transfer-first-order", settings, make_jobs, out_dir, cache_dir, workers, quiet, command)
    results.update(methods=list(methods), lr=lr, reg_lambda=reg_lambda,
                   summary=summarise_first_order(results["runs"], methods))
    (out_dir / "table.md").write_text(first_order_markdown(results["summary"]))
    write_results_json(results, out_dir / "results.json")
    return results
