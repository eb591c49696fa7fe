"""Aggregate training runs into the GRFT paper's result tables, side by side with the paper's numbers.

    python benchmarks/paper_report.py runs/vtab --benchmark vtab --out runs/vtab/table2.md
    python benchmarks/paper_report.py runs/fgvc/cub/seed42 runs/fgvc/cub/seed43 --benchmark fgvc

Every argument is a run directory (holding ``metrics.json``, as ``train_vtab.py`` / ``train_fgvc.py`` write
it) or a folder searched recursively for them. Runs are grouped by method (``grft``, ``full``, ``head``) and
dataset; a cell is the mean ± sample std of test top-1 over the runs (seeds) of that dataset. The layout is
the paper's Table 1 (FGVC: 5 datasets, mean accuracy, mean trainable %) or Table 2 (VTAB-1k: 19 tasks in
the Natural / Specialized / Structured groups, mean accuracy over the 19 tasks, mean trainable %), with the
paper's GRFT row and the difference under it; a task without runs is shown as '—'. When some tasks are
missing, the means are over the tasks present, and the paper's means are recomputed over the same tasks.

The paper's numbers are data, not code: ``paper_results.yaml`` beside this file (Tables 1, 2 and 8, with
their source), or another file of that layout given with ``--paper``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import yaml

__all__ = ["PAPER_RESULTS", "PaperTable", "load_paper_table", "RunResult", "find_runs", "load_run", "aggregate",
           "render", "main"]

PAPER_RESULTS = Path(__file__).resolve().with_name("paper_results.yaml")
BENCHMARKS = ("fgvc", "vtab")


@dataclass(frozen=True)
class PaperTable:
    """One of the paper's result tables: its layout and the GRFT row (top-1 %, trainable % per dataset)."""

    benchmark: str  # "fgvc" or "vtab"
    title: str  # e.g. "Table 2 (VTAB-1k, ViT-B/16 ImageNet-21k)"
    groups: list[tuple[str, list[tuple[str, str]]]]  # ordered (group, [(dataset, column title)])
    top1: dict[str, float]  # dataset -> the paper's GRFT test top-1 (%)
    trainable_percent: dict[str, float]  # dataset -> Table 8's trainable share (%)
    mean_top1: float  # the printed mean over all datasets
    mean_trainable_percent: float


def load_paper_table(benchmark: str, path: str | Path = PAPER_RESULTS) -> PaperTable:
    """Read ``benchmark``'s table from a results file (see ``paper_results.yaml`` for the layout).

    Raises:
        ValueError: the file has no such benchmark, or a dataset lacks its title, top1 or trainable_percent.
    """
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if benchmark not in data:
        raise ValueError(f"{path}: no {benchmark!r} table (it has: {', '.join(k for k in data if k != 'source')})")
    table = data[benchmark]
    groups, top1, trainable = [], {}, {}
    for group, datasets in table["groups"].items():
        for name, entry in datasets.items():
            missing = {"title", "top1", "trainable_percent"} - set(entry or {})
            if missing:
                raise ValueError(f"{path}: {benchmark}/{name} lacks {', '.join(sorted(missing))}")
            top1[name], trainable[name] = float(entry["top1"]), float(entry["trainable_percent"])
        groups.append((group, [(name, str(entry["title"])) for name, entry in datasets.items()]))
    return PaperTable(benchmark, str(table["table"]), groups, top1, trainable, float(table["mean_top1"]),
                      float(table["mean_trainable_percent"]))


MISSING = "—"


@dataclass
class RunResult:
    """One finished run: where it is, its dataset, method, seed (None when unknown), top-1 (%) and trainable %."""

    path: Path
    dataset: str
    method: str
    seed: int | None
    top1: float
    trainable_percent: float | None
    structure: str | None = None
    k: int | float | None = None


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """``metrics.json`` files: each path is a run directory, a metrics.json file, or a folder searched recursively."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file() and path.name == "metrics.json":
            found.append(path)
        elif (path / "metrics.json").is_file():
            found.append(path / "metrics.json")
        elif path.is_dir():
            found.extend(sorted(path.rglob("metrics.json")))
        else:
            raise FileNotFoundError(f"{path}: no such run directory or folder")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def _seed(run_dir: Path, metrics: dict) -> int | None:
    if isinstance(metrics.get("seed"), int):
        return metrics["seed"]
    config = run_dir / "config.yaml"
    if config.is_file():
        try:
            value = (yaml.safe_load(config.read_text()) or {}).get("seed")
            return int(value) if value is not None else None
        except Exception:  # an unreadable config only loses the seed column
            return None
    return None


def load_run(metrics_path: Path) -> RunResult:
    """Read one ``metrics.json`` (``top1`` is a fraction in [0, 1], as the training scripts write it).

    Raises:
        ValueError: the file lacks ``dataset`` or ``top1``.
    """
    metrics = json.loads(Path(metrics_path).read_text())
    for key in ("dataset", "top1"):
        if key not in metrics:
            raise ValueError(f"{metrics_path}: no {key!r} in metrics.json (not a grft-vision run?)")
    top1 = float(metrics["top1"])
    if not 0.0 <= top1 <= 1.0:
        raise ValueError(f"{metrics_path}: top1={top1} is not a fraction in [0, 1]")
    percent = metrics.get("trainable_percent")
    return RunResult(Path(metrics_path).parent, str(metrics["dataset"]), str(metrics.get("method", "grft")),
                     _seed(Path(metrics_path).parent, metrics), 100.0 * top1,
                     float(percent) if percent is not None else None, metrics.get("structure"), metrics.get("k"))


@dataclass
class Cell:
    """The runs of one (method, dataset)."""

    runs: list[RunResult] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(r.top1 for r in self.runs)

    @property
    def std(self) -> float:
        return statistics.stdev(r.top1 for r in self.runs) if len(self.runs) > 1 else 0.0

    @property
    def trainable_percent(self) -> float | None:
        values = [r.trainable_percent for r in self.runs if r.trainable_percent is not None]
        return statistics.fmean(values) if values else None


def aggregate(runs: Sequence[RunResult], paper: PaperTable) -> tuple[dict[str, dict[str, Cell]], list[str]]:
    """``{method: {dataset: Cell}}`` for the datasets of ``paper``'s table, and warnings (other datasets,
    repeated seeds)."""
    datasets = set(paper.top1)
    table: dict[str, dict[str, Cell]] = {}
    warnings = []
    for run in runs:
        if run.dataset not in datasets:
            warnings.append(f"{run.path}: dataset {run.dataset!r} is not a {paper.benchmark} task; ignored")
            continue
        table.setdefault(run.method, {}).setdefault(run.dataset, Cell()).runs.append(run)
    for method, cells in table.items():
        for dataset, cell in cells.items():
            seeds = [r.seed for r in cell.runs if r.seed is not None]
            if len(seeds) != len(set(seeds)):
                warnings.append(f"{method}/{dataset}: several runs share a seed ({sorted(seeds)}); all are averaged")
    return table, warnings


def _columns(paper: PaperTable) -> list[tuple[str, str, str]]:
    return [(group, name, title) for group, columns in paper.groups for name, title in columns]


def _fmt(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def render(table: dict[str, dict[str, Cell]], paper_table: PaperTable, warnings: Sequence[str] = ()) -> str:
    """The markdown report: the paper's layout (one row per method, the paper's GRFT row, the difference),
    then one line per dataset with seeds, std and trainable % against Table 8."""
    columns = _columns(paper_table)
    groups = paper_table.groups
    paper, paper_params = paper_table.top1, paper_table.trainable_percent
    multi_group = len(groups) > 1
    headers = ["Method", *[title for _, _, title in columns]]
    if multi_group:
        headers += [f"{group} mean" for group, _ in groups]
    headers += ["Mean Acc.", "Mean Params. (%)"]
    lines = [f"# {paper_table.title}: this reproduction vs the paper", ""]
    if multi_group:
        spans = ", ".join(f"{group}: {', '.join(title for _, title in cols)}" for group, cols in groups)
        lines += [f"Groups — {spans}.", ""]
    lines += ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    present_all: set[str] = set()
    method_order = sorted(table, key=lambda m: (m != "grft", m))
    for method in method_order:
        cells = table[method]
        present = [name for _, name, _ in columns if name in cells]
        present_all |= set(present)
        row = [f"this run: {method}"]
        row += [f"{cells[name].mean:.1f} ± {cells[name].std:.1f}" if name in cells else MISSING
                for _, name, _ in columns]
        if multi_group:
            for _, cols in groups:
                values = [cells[name].mean for name, _ in cols if name in cells]
                row.append(_fmt(statistics.fmean(values)) if values else MISSING)
        mean = statistics.fmean(cells[name].mean for name in present) if present else None
        params = [cells[name].trainable_percent for name in present if cells[name].trainable_percent is not None]
        note = "" if len(present) == len(columns) or not present else f" ({len(present)}/{len(columns)} tasks)"
        row += [_fmt(mean, 2) + note, _fmt(statistics.fmean(params), 2) if params else MISSING]
        lines.append("| " + " | ".join(row) + " |")
    complete = len(present_all) == len(columns) or not present_all
    subset = [name for _, name, _ in columns if name in present_all] if not complete else [n for _, n, _ in columns]
    paper_row = ["paper: GRFT", *[_fmt(paper[name]) for _, name, _ in columns]]
    if multi_group:  # over the same tasks as this run's group means
        for _, cols in groups:
            names = [name for name, _ in cols if name in subset]
            paper_row.append(_fmt(statistics.fmean(paper[n] for n in names)) if names else MISSING)
    if complete:
        paper_row += [_fmt(paper_table.mean_top1, 2), _fmt(paper_table.mean_trainable_percent, 2)]
    else:
        paper_row += [_fmt(statistics.fmean(paper[n] for n in subset), 2) + f" (same {len(subset)} tasks)",
                      _fmt(statistics.fmean(paper_params[n] for n in subset), 2)]
    lines.append("| " + " | ".join(paper_row) + " |")
    if "grft" in table:
        cells = table["grft"]
        diff = ["Δ (this GRFT − paper)", *[_fmt(cells[name].mean - paper[name], 1, sign=True) if name in cells
                                           else MISSING for _, name, _ in columns]]
        if multi_group:
            for _, cols in groups:
                names = [name for name, _ in cols if name in cells]
                diff.append(_fmt(statistics.fmean(cells[n].mean - paper[n] for n in names), 1, sign=True)
                            if names else MISSING)
        names = [name for _, name, _ in columns if name in cells]
        diff += [_fmt(statistics.fmean(cells[n].mean - paper[n] for n in names), 2, sign=True) if names else MISSING,
                 ""]
        lines.append("| " + " | ".join(diff) + " |")
    lines += ["", "Cells: mean ± sample std of test top-1 (%) over the runs of a task; '—': no run. Paper row: "
                  "the GRFT row of the paper's " + paper_table.title.split(" (")[0] + "; its mean over all "
                  f"{len(columns)} tasks is the paper's printed mean.", ""]
    lines += ["| method | task | runs | seeds | top-1 (%) | paper GRFT | Δ | trainable % | paper % (Table 8) | "
              "structure, k |", "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for method in method_order:
        for _, name, title in columns:
            cell = table[method].get(name)
            if cell is None:
                continue
            seeds = ", ".join("?" if r.seed is None else str(r.seed)
                              for r in sorted(cell.runs, key=lambda r: (r.seed is None, r.seed or 0)))
            shapes = sorted({f"{r.structure}, {r.k}" for r in cell.runs if r.structure is not None})
            lines.append(f"| {method} | {title} | {len(cell.runs)} | {seeds} | {cell.mean:.2f} ± {cell.std:.2f} | "
                         f"{_fmt(paper[name])} | {_fmt(cell.mean - paper[name], 2, sign=True)} | "
                         f"{_fmt(cell.trainable_percent, 3)} | {_fmt(paper_params[name], 2)} | "
                         f"{'; '.join(shapes) if method == 'grft' else ''} |")
    if warnings:
        lines += ["", "Warnings:", *[f"- {w}" for w in warnings]]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/paper_report.py",
        description="Aggregate run directories (metrics.json) into the GRFT paper's Table 1 (FGVC) or Table 2 "
                    "(VTAB-1k), with the paper's GRFT numbers side by side.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or folders holding them")
    parser.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    parser.add_argument("--paper", type=Path, default=PAPER_RESULTS, metavar="FILE",
                        help="the paper's numbers (layout of paper_results.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    try:
        paper = load_paper_table(args.benchmark, args.paper)
        paths = find_runs(args.runs)
        runs = [load_run(path) for path in paths]
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no metrics.json under {' '.join(args.runs)} (no finished run yet?)", file=sys.stderr)
        return 2
    table, warnings = aggregate(runs, paper)
    text = render(table, paper, warnings)
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
