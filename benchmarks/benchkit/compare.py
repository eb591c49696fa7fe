"""Methods side by side in one run: step times measured interleaved (:func:`time_interleaved`), every figure
as a ratio to reference methods (:func:`add_ratios`)."""
from __future__ import annotations

import statistics
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .step import Setup, train_step

__all__ = ["TIMERS", "RATIO_FIGURES", "check_timer", "torch_threads", "time_interleaved", "add_ratios"]

TIMERS = ("wall", "cpu")
RATIO_FIGURES = {"flops": "flops", "saved": "saved_bytes", "time": "step_time_s"}


def check_timer(timer: str) -> None:
    """Raise ``ValueError`` unless ``timer`` is one of :data:`TIMERS`."""
    if timer not in TIMERS:
        raise ValueError(f"timer={timer!r} must be 'wall' or 'cpu'")


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block (None: leave it), the previous count restored after."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def time_interleaved(setups: dict[str, Setup], inputs: torch.Tensor, labels: torch.Tensor, *, warmup: int,
                     repeats: int, timer: str = "wall",
                     log: Callable[[str], None] = lambda _: None) -> dict[str, dict[str, Any]]:
    """Time one training step of every method, the methods interleaved round by round.

    ``warmup`` untimed rounds, then ``repeats`` timed ones; in each round every method does one step, the
    starting method rotating so that drift of the machine spreads over all methods. Returns, per method
    (in ``setups`` order), the medians in seconds: ``step_time_s`` (in the ``timer``'s unit: wall-clock or
    process CPU seconds), ``wall_time_s``, ``cpu_time_s``, ``step_time_min_s``, the ``forward`` /
    ``backward`` / ``update`` phases (wall), ``cpu_per_wall``, and every timed step (``step_times_s``).
    ``log`` receives one progress line per round.
    """
    order = list(setups)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in order}
    for round_index in range(warmup + repeats):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            phases = train_step(setups[name], inputs, labels)
            if round_index >= warmup:
                times[name].append(phases)
        log(f"timing round {round_index + 1}/{warmup + repeats}{' (warm-up)' if round_index < warmup else ''}")
    figures: dict[str, dict[str, Any]] = {}
    for name in order:
        steps = [t["cpu" if timer == "cpu" else "step"] for t in times[name]]
        row = figures[name] = {"timer": timer}
        row["wall_time_s"] = _median_or_none([t["step"] for t in times[name]])
        row["cpu_time_s"] = _median_or_none([t["cpu"] for t in times[name]])
        row["step_times_s"] = steps
        row["step_time_s"] = _median_or_none(steps)
        row["step_time_min_s"] = min(steps) if steps else None
        for phase in ("forward", "backward", "update"):
            row[f"{phase}_time_s"] = _median_or_none([t[phase] for t in times[name]])
        # process CPU seconds per wall second: about the thread count when the cores are not shared
        row["cpu_per_wall"] = _median_or_none([t["cpu"] / t["step"] for t in times[name]])
    return figures


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def add_ratios(rows: dict[str, dict[str, Any]], references: Sequence[str] = ("floor", "full"),
               figures: Mapping[str, str] = RATIO_FIGURES) -> None:
    """Add ``<figure>_vs_<reference>`` ratios to every row, for each reference method present in ``rows``.

    ``figures`` maps the ratio's name to the row key it divides (default: FLOPs, saved bytes, step time).
    A step-time ratio also comes as ``time_vs_<reference>_paired``: the ratio taken round by round (both
    steps from the same round), then the median.
    """
    for ref_name in references:
        ref = rows.get(ref_name)
        if ref is None:
            continue
        for row in rows.values():
            for label, key in figures.items():
                row[f"{label}_vs_{ref_name}"] = _ratio(row.get(key), ref.get(key))
            if "time" in figures:
                paired = [a / b for a, b in zip(row["step_times_s"], ref["step_times_s"]) if b > 0]
                row[f"time_vs_{ref_name}_paired"] = _median_or_none(paired)
