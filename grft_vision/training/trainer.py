"""Where training loops: the step loop (one epoch of optimisation), the epoch loop (:class:`Trainer`), evaluation.

Usable from your own script as well as by the training scripts::

    from grft_vision.training import Trainer, TrainStep

    step = TrainStep(model, optimizer, torch.nn.CrossEntropyLoss(), regularizer=L2ToPretrained(model, config))
    trainer = Trainer(step, train_loader, eval_loader, scheduler=scheduler)
    history = trainer.fit(epochs=10)             # [{"epoch": 10, "top1": ..., "loss": ...}]

:func:`train_one_epoch` takes one small state object, :class:`TrainStep` (model, optimizer, loss, and the
optional pieces); the backward pass, gradient clipping and the optimizer step go through a loss scaler with
timm's convention, ``scaler(loss, optimizer, clip_grad=..., parameters=...)`` (timm's own ``NativeScaler`` for
fp16 autocast, :class:`PlainScaler` otherwise). Both loops are task-agnostic: a :class:`Batches` object turns
a loader's batch into model inputs and targets and runs the model, so the vision scripts (``(images,
labels)``) and the language-model script (dicts of token tensors) share them.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from timm.utils import NativeScaler, dispatch_clip_grad
from torch import nn
from tqdm.auto import tqdm

from ..errors import TrainingError
from ..tuner.regularization import L2ToPretrained
from .distributed import DistributedContext
from .divergence import ADVICE, DivergenceWatch
from .monitor import Monitor

__all__ = ["Batches", "ImageBatches", "Precision", "PlainScaler", "TrainStep", "train_one_epoch", "evaluate",
           "Trainer", "top1_metrics"]


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


class PlainScaler:
    """The loss "scaler" without mixed precision, with timm's calling convention: backward, clip, step."""

    state_dict_key = "amp_scaler"

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip_grad: float | None = None,
                 clip_mode: str = "norm", parameters: Iterable[torch.Tensor] | None = None,
                 create_graph: bool = False, need_update: bool = True) -> None:
        loss.backward(create_graph=create_graph)
        if need_update:
            if clip_grad is not None:
                dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class Precision:
    """Mixed precision on CUDA: bf16 autocast where supported, else fp16 with timm's ``NativeScaler``."""

    device: torch.device
    enabled: bool

    def __post_init__(self) -> None:
        self.enabled = self.enabled and self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        use_scaler = self.enabled and self.dtype == torch.float16
        self.scaler = NativeScaler(self.device.type) if use_scaler else PlainScaler()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.enabled else nullcontext()


@dataclass
class TrainStep:
    """What the step loop needs: the state of one run's optimisation.

    Attributes:
        model: the model (or its DDP / FSDP wrapper) in train mode during the loop.
        optimizer: the optimizer of the trainable tensors.
        loss_fn: ``(logits, targets) -> scalar``; the loss is ``loss_fn + regularizer()``.
        batches: how batches become inputs and targets (:class:`ImageBatches` by default).
        regularizer: the L2-to-pretrained penalty (or any callable with ``enabled``), None for none.
        precision: autocast and the loss scaler (default: none on CPU).
        clip_grad: clip the gradient norm of the optimizer's tensors to this value.
        mixup: ``(inputs, targets) -> (inputs, targets)`` batch mixing (timm's ``Mixup``).
        scheduler: a timm scheduler stepped after every update (``step_update``); None when epoch-based.
        before_step: called with the global step before every update (mask schedules).
        divergence: sees every step's loss.
        context: the process's distributed context (losses are averaged over processes).
        monitor: TensorBoard (per-step losses, per-update learning rate).
        global_step: updates done so far (advanced by the loop).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batches: Batches = field(default_factory=ImageBatches)
    regularizer: L2ToPretrained | None = None
    precision: Precision | None = None
    clip_grad: float | None = None
    mixup: Callable | None = None
    scheduler: Any = None
    before_step: Callable[[int], Any] | None = None
    divergence: DivergenceWatch | None = None
    context: DistributedContext = field(default_factory=DistributedContext)
    monitor: Monitor = field(default_factory=lambda: Monitor(None))
    global_step: int = 0

    def __post_init__(self) -> None:
        if self.precision is None:
            self.precision = Precision(self.context.device, False)

    def parameters(self) -> list[torch.Tensor]:
        """The tensors the optimizer updates (what gradient clipping sees)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def train_one_epoch(step: TrainStep, loader: Iterable[Any], epoch: int, progress: bool = True) -> dict[str, float]:
    """Optimise over one pass of ``loader``; returns the epoch's mean losses (``loss``, ``task_loss``,
    ``reg_loss``) and advances ``step.global_step``.

    The loss is ``task loss + regulariser`` (the paper's L_R); both parts are logged per step.

    Raises:
        TrainingError: the loss is not finite, or ``step.divergence`` declares the run diverged.
    """
    step.model.train()
    totals = {"loss": 0.0, "task_loss": 0.0, "reg_loss": 0.0}
    steps = 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
    for batch in bar:
        if step.before_step is not None:
            step.before_step(step.global_step)
        inputs, targets = step.batches.split(batch, step.context.device)
        if step.mixup is not None:
            inputs, targets = step.mixup(inputs, targets)
        with step.precision.autocast():
            task_loss = step.loss_fn(step.batches.forward(step.model, inputs).float(), targets)
        regularizer = step.regularizer
        reg_loss = regularizer() if regularizer is not None and regularizer.enabled else task_loss.new_zeros(())
        loss = task_loss + reg_loss
        if not math.isfinite(float(loss.detach())):
            raise TrainingError(f"the training loss is {float(loss.detach())} at epoch {epoch + 1}, step {steps + 1} "
                                f"(task {float(task_loss.detach())}, regulariser {float(reg_loss.detach())}); "
                                f"{ADVICE}, or check the data for NaN/inf.")
        step.optimizer.zero_grad(set_to_none=True)
        step.precision.scaler(loss, step.optimizer, clip_grad=step.clip_grad,
                              parameters=step.parameters() if step.clip_grad is not None else None)
        reduced = step.context.all_reduce_mean(torch.stack([loss.detach(), task_loss.detach(), reg_loss.detach()]))
        values = dict(zip(("loss", "task_loss", "reg_loss"), reduced.tolist()))
        for key, value in values.items():
            totals[key] += value
        steps += 1
        step.global_step += 1
        step.monitor.scalars({f"train/{key}": value for key, value in values.items()}, step.global_step)
        if step.divergence is not None:
            step.divergence.update(values["loss"], epoch, steps)
        if step.scheduler is not None:
            step.monitor.scalars({"train/lr": step.optimizer.param_groups[0]["lr"]}, step.global_step)
            step.scheduler.step_update(num_updates=step.global_step)
        bar.set_postfix(loss=f"{values['loss']:.4f}")
    return {key: value / max(steps, 1) for key, value in totals.items()}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], *, batches: Batches | None = None,
             precision: Precision | None = None, context: DistributedContext | None = None,
             progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and targets over ``loader``, gathered from every process (in rank order).

    Returns:
        ``(predicted class [N], target [N])`` on the CPU, int64.
    """
    batches = batches or ImageBatches()
    context = context or DistributedContext()
    precision = precision or Precision(context.device, False)
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


def top1_metrics(predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``{"top1": accuracy}`` of predicted classes ``[N]`` against targets ``[N]``."""
    return {"top1": float((predictions == targets).float().mean()) if len(targets) else 0.0}


class Trainer:
    """The epoch loop: train an epoch, step an epoch-based schedule, evaluate every ``eval_every`` epochs and at
    the end, then call ``on_epoch_end`` (the scripts save a checkpoint there).

    Args:
        step: the step loop's state (:class:`TrainStep`); its scheduler field is for per-update schedules.
        train_loader: the training data; a ``DistributedSampler`` gets ``set_epoch`` every epoch.
        eval_loader: the evaluation data (None: no evaluation).
        scheduler: a timm scheduler stepped after every epoch (``step(epoch + 1)``); None for per-update ones.
        metrics: ``(predictions, targets) -> {name: value}`` (top-1 by default).
        predictions: ``() -> (predictions, targets)`` over the evaluation data (default :func:`evaluate`).
        eval_every: evaluate every N epochs (and after the last).
        eval_split: the tag prefix of evaluation scalars in TensorBoard.
        on_epoch_start / on_epoch_end: ``(epoch)`` and ``(epoch, history)`` callbacks.
        progress: progress bars.
    """

    def __init__(self, step: TrainStep, train_loader: Iterable[Any], eval_loader: Iterable[Any] | None = None, *,
                 scheduler: Any = None, metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] = top1_metrics,
                 predictions: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None, eval_every: int = 1,
                 eval_split: str = "eval", on_epoch_start: Callable[[int], Any] | None = None,
                 on_epoch_end: Callable[[int, list[dict[str, Any]]], Any] | None = None,
                 progress: bool = True) -> None:
        self.step, self.train_loader, self.eval_loader = step, train_loader, eval_loader
        self.scheduler, self.metrics, self.eval_every, self.eval_split = scheduler, metrics, eval_every, eval_split
        self.on_epoch_start, self.on_epoch_end, self.progress = on_epoch_start, on_epoch_end, progress
        self._predictions = predictions or (lambda: evaluate(
            self.step.model, self.eval_loader, batches=self.step.batches, precision=self.step.precision,
            context=self.step.context, progress=self.progress))

    def evaluate(self, epoch: int) -> dict[str, float]:
        """The metrics of the evaluation data now (logged under ``<eval_split>/<name>`` at ``epoch``)."""
        scores = self.metrics(*self._predictions())
        self.step.monitor.scalars({f"{self.eval_split}/{name}": value for name, value in scores.items()}, epoch)
        return scores

    def fit(self, epochs: int, *, start_epoch: int = 0, history: list[dict[str, Any]] | None = None
            ) -> list[dict[str, Any]]:
        """Train epochs ``start_epoch .. epochs - 1``; returns the evaluation history (one dict per evaluation,
        with the epoch's mean losses).

        Raises:
            TrainingError: the loss or a parameter is not finite, or the run diverged (also over its last epoch).
        """
        history = list(history or [])
        epoch_losses: dict[str, float] = {}
        for epoch in range(start_epoch, epochs):
            sampler = getattr(self.train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            if self.on_epoch_start is not None:
                self.on_epoch_start(epoch)
            if self.step.scheduler is None:  # per-update schedules log their rate every step
                self.step.monitor.scalars({"train/lr": self.step.optimizer.param_groups[0]["lr"]}, epoch)
            epoch_losses = train_one_epoch(self.step, self.train_loader, epoch, self.progress)
            if self.scheduler is not None:
                self.scheduler.step(epoch + 1)
            if self.eval_loader is not None and ((epoch + 1) % self.eval_every == 0 or epoch + 1 == epochs):
                history.append({"epoch": epoch + 1, **self.evaluate(epoch + 1), **epoch_losses})
            if epoch + 1 == epochs and self.step.divergence is not None:
                self.step.divergence.check_end(epoch, len(self.train_loader))
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, history)
        return history
