"""Where training loops: one epoch of optimisation, and evaluation.

Both functions are task-agnostic: a :class:`Batches` object turns a loader's batch into model inputs and
targets and runs the model, so the vision scripts (``(images, labels)``) and the language-model script
(dicts of token tensors) share the loop.

A run that diverges stops with :class:`TrainingError`: at once for a non-finite loss, after
``window`` steps in a row of a loss far above its start (:class:`DivergenceWatch`), and before a
checkpoint for a non-finite parameter (:func:`check_finite_parameters`).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import TrainingError
from ..tuner.regularization import L2ToPretrained
from .distributed import DistributedContext
from .monitor import Monitor

__all__ = ["Batches", "ImageBatches", "Precision", "train_one_epoch", "evaluate", "TrainingError",
           "DivergenceWatch", "check_finite_parameters"]

_ADVICE = "lower the learning rate (--lr) or clip the gradient (--set clip_grad=1), and start a new run"


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
                f"steps; {_ADVICE} (or --set divergence_factor=0 to train on regardless).")

    def state_dict(self) -> dict[str, Any]:
        return {"first_loss": self.first_loss, "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_loss, self.streak = state["first_loss"], state["streak"]


def check_finite_parameters(model: nn.Module, epoch: int) -> None:
    """Raise :class:`TrainingError` naming the first trainable parameter holding NaN or inf."""
    for name, param in model.named_parameters():
        if param.requires_grad and not bool(torch.isfinite(param.detach()).all()):
            raise TrainingError(f"the run diverged in epoch {epoch + 1}: parameter {name!r} holds NaN or inf; "
                                f"{_ADVICE}.")


class Batches:
    """How a task reads its batches: ``split`` into (inputs, targets) on a device, and ``forward``."""

    def split(self, batch: Any, device: torch.device) -> tuple[Any, torch.Tensor]:
        raise NotImplementedError

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        raise NotImplementedError


class ImageBatches(Batches):
    """``(images [B, 3, H, W], labels [B])`` batches; the model maps images to logits ``[B, classes]``."""

    def split(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch[0], batch[1]
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)


@dataclass
class Precision:
    """Mixed precision on CUDA: bf16 autocast where supported, else fp16 with a gradient scaler."""

    device: torch.device
    enabled: bool

    def __post_init__(self) -> None:
        self.enabled = self.enabled and self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        use_scaler = self.enabled and self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.enabled else nullcontext()


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    batches: Batches,
    regularizer: L2ToPretrained | None,
    precision: Precision,
    context: DistributedContext,
    monitor: Monitor,
    epoch: int,
    global_step: int,
    mixup: Callable | None = None,
    clip_grad: float | None = None,
    progress: bool = True,
    scheduler: Any = None,
    before_step: Callable[[int], Any] | None = None,
    divergence: DivergenceWatch | None = None,
) -> tuple[dict[str, float], int]:
    """Optimise over one pass of ``loader``; returns the epoch's mean losses and the new global step.

    The loss is ``task loss + regulariser`` (the paper's L_R); both parts are logged per step. A timm
    ``scheduler`` given here is stepped after every update (``step_update(global step)``) and the learning
    rate logged per step; epoch-based schedules are stepped by the caller instead. ``before_step(global step)``
    runs before every update (the mask schedules of :mod:`grft_vision.selection.schedules`); ``divergence``
    sees every step's loss.

    Raises:
        TrainingError: the loss is not finite, or ``divergence`` declares the run diverged.
    """
    model.train()
    totals = {"loss": 0.0, "task_loss": 0.0, "reg_loss": 0.0}
    steps = 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
    for batch in bar:
        if before_step is not None:
            before_step(global_step)
        inputs, targets = batches.split(batch, context.device)
        if mixup is not None:
            inputs, targets = mixup(inputs, targets)
        with precision.autocast():
            task_loss = loss_fn(batches.forward(model, inputs).float(), targets)
        reg_loss = regularizer() if regularizer is not None and regularizer.enabled else task_loss.new_zeros(())
        loss = task_loss + reg_loss
        if not math.isfinite(float(loss.detach())):
            raise TrainingError(f"the training loss is {float(loss.detach())} at epoch {epoch + 1}, step {steps + 1} "
                                f"(task {float(task_loss.detach())}, regulariser {float(reg_loss.detach())}); "
                                f"{_ADVICE}, or check the data for NaN/inf.")
        optimizer.zero_grad(set_to_none=True)
        if precision.scaler is not None:
            precision.scaler.scale(loss).backward()
            precision.scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                           clip_grad)
        if precision.scaler is not None:
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            optimizer.step()
        reduced = context.all_reduce_mean(torch.stack([loss.detach(), task_loss.detach(), reg_loss.detach()]))
        values = dict(zip(("loss", "task_loss", "reg_loss"), reduced.tolist()))
        for key, value in values.items():
            totals[key] += value
        steps += 1
        global_step += 1
        monitor.scalars({f"train/{key}": value for key, value in values.items()}, global_step)
        if divergence is not None:
            divergence.update(values["loss"], epoch, steps)
        if scheduler is not None:
            monitor.scalars({"train/lr": optimizer.param_groups[0]["lr"]}, global_step)
            scheduler.step_update(num_updates=global_step)
        bar.set_postfix(loss=f"{values['loss']:.4f}")
    return {key: value / max(steps, 1) for key, value in totals.items()}, global_step


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    batches: Batches,
    precision: Precision,
    context: DistributedContext,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and targets over ``loader``, gathered from every process (in rank order).

    Returns:
        ``(predicted class [N], target [N])`` on the CPU, int64.
    """
    model.eval()
    predictions, targets = [], []
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
        inputs, target = batches.split(batch, context.device)
        with precision.autocast():
            logits = batches.forward(model, inputs)
        predictions.append(logits.argmax(-1).cpu())
        targets.append(target.cpu())
    local = (torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long),
             torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long))
    gathered = context.gather(local)
    return torch.cat([p for p, _ in gathered]), torch.cat([t for _, t in gathered])
