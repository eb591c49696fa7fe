"""When a run has diverged: a non-finite loss or parameter, or a loss that stays far above its start.

A run that diverges stops with :class:`~grft_vision.TrainingError`: at once for a non-finite loss (the step
loop checks it), after ``window`` steps in a row of a loss far above its start (:class:`DivergenceWatch`,
also applied to the last epoch of a run shorter than its window: :meth:`DivergenceWatch.check_end`), and
before a checkpoint for a non-finite parameter (:func:`check_finite_parameters`), so the last good
checkpoint stays.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import TrainingError

__all__ = ["DivergenceWatch", "check_finite_parameters", "ADVICE"]

ADVICE = "lower the learning rate (--lr) or clip the gradient (--set clip_grad=1), and start a new run"


class DivergenceWatch:
    """Declares a run diverged when its training loss stays far above its starting value.

    The rule: with ``threshold = factor * max(first-step loss, 1)``, the run has diverged when ``window``
    consecutive steps have a loss above ``threshold``. The floor of 1 keeps a run that starts near zero
    loss from being stopped by ordinary noise. ``factor=0`` disables the watch. Its state (the first loss
    and the current streak) is saved in checkpoints, so a resumed run applies the same rule.
    """

    def __init__(self, factor: float, window: int) -> None:
        self.factor, self.window = factor, window
        self.first_loss: float | None = None
        self.streak = 0

    def update(self, loss: float, epoch: int, step: int) -> None:
        """Count one step's loss (the mean over processes); raises :class:`TrainingError` once diverged."""
        if self.factor == 0:
            return
        if self.first_loss is None:
            self.first_loss = loss
        threshold = self.factor * max(self.first_loss, 1.0)
        self.streak = self.streak + 1 if loss > threshold else 0
        if self.streak >= self.window:
            raise TrainingError(
                f"the run diverged at epoch {epoch + 1}, step {step}: the training loss ({loss:.4g}) stayed above "
                f"{threshold:.4g} ({self.factor:g} x max(first loss {self.first_loss:.4g}, 1)) for {self.window} "
                f"steps; {ADVICE} (or --set divergence_factor=0 to train on regardless).")

    def check_end(self, epoch: int, epoch_steps: int) -> None:
        """At the end of a run, the same rule over its last epoch: a run whose every step of the last epoch
        stayed above the threshold has diverged, even when the epoch is shorter than the window.

        Raises:
            TrainingError: the run ended diverged.
        """
        if self.factor == 0 or self.streak == 0 or self.streak < min(self.window, max(epoch_steps, 1)):
            return
        threshold = self.factor * max(self.first_loss, 1.0)
        raise TrainingError(
            f"the run ended diverged: the training loss stayed above {threshold:.4g} ({self.factor:g} x max(first loss "
            f"{self.first_loss:.4g}, 1)) for the last {self.streak} steps, through the end of epoch {epoch + 1}; "
            f"{ADVICE} (or --set divergence_factor=0 to accept it).")

    def state_dict(self) -> dict[str, Any]:
        return {"first_loss": self.first_loss, "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_loss, self.streak = state["first_loss"], state["streak"]


def check_finite_parameters(model: nn.Module, epoch: int) -> None:
    """Raise :class:`TrainingError` naming the first trainable parameter holding NaN or inf."""
    for name, param in model.named_parameters():
        if param.requires_grad and not bool(torch.isfinite(param.detach()).all()):
            raise TrainingError(f"the run diverged in epoch {epoch + 1}: parameter {name!r} holds NaN or inf; "
                                f"{ADVICE}.")


