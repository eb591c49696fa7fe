"""TensorBoard monitoring of a run (main process only; every call is a no-op elsewhere).

Tags written by the training engine:

- ``train/loss``, ``train/task_loss``, ``train/reg_loss`` (per step), ``train/lr`` (per epoch, or per step
  with per-update schedules);
- ``<eval split>/<metric>``, e.g. ``test/top1`` (every evaluation);
- ``schedule/chosen_entries`` (dynamic and incremental mask schedules, at every event);
- ``params/trainable``, ``params/trainable_percent``;
- ``selection/summary`` (markdown text) and ``selection/<layer>`` (histogram of chosen indices);
- hparams (the resolved settings) with the final metrics.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..extras import import_optional
from ..selection import SelectionRecord

__all__ = ["Monitor"]


class Monitor:
    """A thin wrapper over ``torch.utils.tensorboard.SummaryWriter``.

    Args:
        logdir: event-file directory; None disables writing (non-main processes).
    """

    def __init__(self, logdir: str | None) -> None:
        self.writer = None
        if logdir is not None:
            import_optional("tensorboard", "TensorBoard logging")  # a missing package names the extra
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=logdir)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def selection(self, record: SelectionRecord) -> None:
        """The selection summary as text and each layer's chosen indices as a histogram."""
        if self.writer is None:
            return
        self.writer.add_text("selection/summary", record.summary(), 0)
        for layer in record.layers:
            if layer.indices:  # incremental schedules start with nothing chosen
                self.writer.add_histogram(f"selection/{layer.name}", torch.tensor(layer.indices).flatten(), 0)

    def hparams(self, settings: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Log the run's settings with its final metrics (scalar-valued settings only, as TensorBoard needs)."""
        if self.writer is None:
            return
        hparams = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                   for key, value in settings.items()}
        self.writer.add_hparams(hparams, {f"hparam/{key}": value for key, value in metrics.items()},
                                run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
