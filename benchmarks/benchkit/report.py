"""What a step-cost run prints and writes: progress lines, markdown tables, target checks, the JSON and
markdown files, the exit status, and the run's surroundings (device, load average, command line)."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .step import PROFILE_CATEGORIES

__all__ = ["progress_logger", "check", "fmt", "fmt_ratio", "markdown_table", "step_detail_markdown",
           "targets_markdown", "load_average", "load_average_line", "device_name", "command_line", "publish",
           "exit_status"]


def progress_logger(script: str, enabled: bool) -> Callable[[str], None]:
    """A function printing ``[<script> HH:MM:SS] message`` lines to stderr, or doing nothing unless ``enabled``."""

    def log(message: str) -> None:
        if enabled:
            print(f"[{script} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return log


def check(target: str, value: Any, limit: str, passed: bool | None) -> dict[str, Any]:
    """One target check: what is checked, the measured value, the limit as text, pass / fail (None: no verdict)."""
    return {"target": target, "value": value, "limit": limit, "passed": passed}


# --------------------------------------------------------------------------------------------- markdown
def fmt(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    """``value / scale`` with thousands separators and ``digits`` decimals; ``–`` for None."""
    if value is None:
        return "–"
    return f"{value / scale:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table: the first column left-aligned, the others right-aligned."""
    return (["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
            + ["| " + " | ".join(cells) + " |" for cells in body])


def step_detail_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The step-detail table (wall / CPU time, phases, profile split) as markdown lines; none without timings."""
    if all(row.get("forward_time_s") is None for row in rows):
        return []
    profiled = any("profile_s" in row for row in rows)
    categories = [cat for cat, _ in PROFILE_CATEGORIES] + ["other"]
    header = ["method", "wall step s", "CPU step s", "CPU s / wall s", "min step s", "forward s", "backward s",
              "update s"]
    if profiled:
        header += [f"prof. {cat} s" for cat in categories]
    body = []
    for row in rows:
        cells = [row["method"], fmt(row.get("wall_time_s"), 3), fmt(row.get("cpu_time_s"), 3),
                 fmt(row.get("cpu_per_wall"), 2), fmt(row.get("step_time_min_s"), 3),
                 fmt(row.get("forward_time_s"), 3), fmt(row.get("backward_time_s"), 3),
                 fmt(row.get("update_time_s"), 3)]
        if profiled:
            profile = row.get("profile_s") or {}
            cells += [fmt(profile.get(cat), 3) for cat in categories]
        body.append(cells)
    title = ("Step detail (medians; min step in the timer's unit; phases in wall-clock seconds, "
             "update = GPS masking + Adam step + zero_grad)"
             + (" and one profiled step's self time by operator category" if profiled else ""))
    return ["", title, ""] + markdown_table(header, body)


def targets_markdown(checks: list[dict[str, Any]]) -> list[str]:
    """The target checks (target, measured value, limit, pass/fail) as markdown lines."""
    lines = ["", "| target | measured | limit | result |", "|---|---:|---|---|"]
    for entry in checks:
        value = entry["value"]
        shown = f"{value:.4f}" if isinstance(value, float) else f"{value:,}"
        result = {True: "pass", False: "**FAIL**", None: "–"}[entry["passed"]]
        lines.append(f"| {entry['target']} | {shown} | {entry['limit']} | {result} |")
    return lines


# --------------------------------------------------------------------------------------------- the run
def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15-minute load averages; None where the system has none."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def load_average_line(meta: dict[str, Any]) -> list[str]:
    """The markdown line of the load average before and after the run; none when it was not known."""
    if meta.get("loadavg_before") is None:
        return []
    return [f"(1-minute load average {meta['loadavg_before'][0]:.2f} before, "
            f"{meta['loadavg_after'][0]:.2f} after the run)"]


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``<machine> CPU, <n> cores``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def command_line() -> str:
    """This process's command line, as ``python <script> <arguments>``."""
    return "python " + " ".join(sys.argv) if sys.argv else ""


def publish(meta: dict[str, Any], rows: list[dict[str, Any]], checks: list[dict[str, Any]], markdown: str,
            out: str | None, markdown_path: str | None) -> dict[str, Any]:
    """Print ``markdown``; write the report ``{"meta", "methods": rows, "targets": checks}`` as JSON to ``out``
    and ``markdown`` to ``markdown_path`` (each when given); return the report."""
    report = {"meta": meta, "methods": rows, "targets": checks}
    print(markdown)
    for path, text in ((out, json.dumps(report, indent=2) + "\n"), (markdown_path, markdown)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
    return report


def exit_status(report: dict[str, Any], strict: bool) -> int:
    """Print the missed targets of ``report`` to stderr; 1 when some were missed and ``strict``, else 0."""
    missed = [entry["target"] for entry in report["targets"] if entry["passed"] is False]
    if missed:
        print(f"{len(missed)} target(s) missed: {'; '.join(missed)}", file=sys.stderr)
    return 1 if (missed and strict) else 0
