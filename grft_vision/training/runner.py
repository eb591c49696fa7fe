"""One fine-tuning run, start to finish (what the training scripts execute), for any :class:`Task`.

data -> model -> selection (SupCon gradients, main process) -> ``apply_grft`` -> optimizer on the trainable
tensors + L2-to-pretrained -> schedule with warm-up -> evaluation -> outputs. The run directory
receives ``config.yaml``, ``selection.json``, ``adapter.safetensors``, ``checkpoint.pt`` (every epoch,
atomic), ``metrics.json`` and TensorBoard events; ``resume=True`` continues from the checkpoint to the
result an uninterrupted run gives.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..adapter import adapter_state, apply_adapter_state, save_adapter
from ..anatomy import grft_layers, head_module_names
from ..config import ConfigError, GRFTConfig
from ..model import DEFAULT_ADAPTER, add_adapter, apply_grft
from ..regularization import L2ToPretrained
from ..selection.record import write_json_atomic
from ..selection.schedules import MaskSchedule, create_schedule
from ..trainable import trainable_parameters_report
from .checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from .config import TrainConfig, resolved_settings
from .distributed import DistributedContext
from .loop import Precision, evaluate, train_one_epoch
from .monitor import Monitor
from .task import Task, VisionTask

__all__ = ["run", "seed_everything", "create_scheduler"]

# settings that may differ between a run and its resumption
_RESUME_FREE = {"run_dir", "logdir", "quiet", "workers", "device", "eval_every"}


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _run_dir(train: TrainConfig, context: DistributedContext) -> Path:
    if train.run_dir is None:
        stamp = context.broadcast(time.strftime("%Y%m%d-%H%M%S"))
        train.run_dir = str(Path("runs") / train.dataset / stamp)
    return Path(train.run_dir)


def _train_loader(train: TrainConfig, dataset: Dataset, context: DistributedContext, task: Task) -> DataLoader:
    """Shuffled per epoch by a seeded sampler; with N processes each takes every N-th sample of a global batch."""
    if train.batch_size % context.world_size:
        raise ConfigError(f"batch_size={train.batch_size} must be divisible by the {context.world_size} processes.")
    sampler = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True,
                                 seed=train.seed)
    return DataLoader(dataset, batch_size=train.batch_size // context.world_size, sampler=sampler,
                      num_workers=train.workers, pin_memory=context.device.type == "cuda",
                      generator=torch.Generator(), collate_fn=task.collate_fn)


def _eval_loader(train: TrainConfig, dataset: Dataset, context: DistributedContext, task: Task) -> DataLoader:
    shard = Subset(dataset, list(range(context.rank, len(dataset), context.world_size)))
    return DataLoader(shard, batch_size=train.batch_size, shuffle=False, num_workers=train.workers,
                      pin_memory=context.device.type == "cuda", collate_fn=task.collate_fn)


def _select_and_wrap(model: nn.Module, train: TrainConfig, grft: GRFTConfig, task: Task, train_set: Dataset,
                     context: DistributedContext, run_dir: Path, monitor: Monitor) -> None:
    """Selection on the main process, indices broadcast, every process wraps identically."""
    chosen = None
    if context.is_main:
        apply_grft(model, config=grft, dataloader=task.selection_loader(train, grft, train_set),
                   features=task.selection_features(grft), device=context.device, amp=train.amp,
                   progress=not train.quiet)
        model.grft_state.selection.save_json(run_dir / "selection.json")
        monitor.selection(model.grft_state.selection)
        chosen = {name: (layer.structure, layer.indices.cpu()) for name, layer in grft_layers(model)}
    chosen = context.broadcast(chosen)
    if not context.is_main:
        add_adapter(model, DEFAULT_ADAPTER, {n: i for n, (_, i) in chosen.items()},
                    {n: s for n, (s, _) in chosen.items()}, grft)


def _prepare_method(model: nn.Module, train: TrainConfig, grft: GRFTConfig) -> None:
    """Trainable set of the baselines: everything (full) or the head only (head)."""
    model.requires_grad_(train.method == "full")
    if train.method == "head":
        for name in head_module_names(model, grft.head_modules):
            model.get_submodule(name).requires_grad_(True)


def _check_resumable(run_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}; start the run without --resume.")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    changed = sorted(key for key in set(saved) | set(settings)
                     if key not in _RESUME_FREE and saved.get(key) != settings.get(key))
    if changed:
        raise ConfigError(f"--resume: settings differ from the run in {run_dir}: {', '.join(changed)}; resume "
                          "with the same settings, or start a new run directory.")
    return load_checkpoint(path)


def _trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().cpu() for name, param in model.named_parameters() if param.requires_grad}


def _save_outputs(model: nn.Module, train: TrainConfig, run_dir: Path) -> None:
    if train.method == "grft":
        save_adapter(model, run_dir / "adapter.safetensors")
    else:
        save_file({k: v.contiguous() for k, v in _trainable_tensors(model).items()}, run_dir / "trainable.safetensors")


def run(train: TrainConfig, grft: GRFTConfig, *, resume: bool = False, task: Task | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the final metrics (also written to ``metrics.json``).

    ``task`` supplies data, model and metrics (default :class:`VisionTask`).

    Raises:
        ConfigError: inconsistent settings (e.g. resuming with other settings).
        DataNotFoundError, ModelLoadError, SelectionError: missing data or weights, unusable selection data.
        TrainingError: a non-finite loss.
    """
    context = DistributedContext.from_environment(train.device)
    try:
        return _run(train, grft, resume, context, task or VisionTask())
    finally:
        context.close()


def _run(train: TrainConfig, grft: GRFTConfig, resume: bool, context: DistributedContext,
         task: Task) -> dict[str, Any]:
    start = time.perf_counter()
    seed_everything(train.seed)
    run_dir = _run_dir(train, context)
    settings = resolved_settings(train, grft)
    checkpoint = _check_resumable(run_dir, settings) if resume else None
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=True))
    monitor = Monitor(str(train.logdir or run_dir / "tb") if context.is_main else None)

    train_set, eval_set, num_classes = task.datasets(train)
    model = task.build_model(train, num_classes).to(context.device)
    task.prepare_data(train, model, train_set, eval_set)
    begin = time.perf_counter()
    _make_trainable(model, train, grft, task, train_set, checkpoint, context, run_dir, monitor)
    selection_seconds = time.perf_counter() - begin if checkpoint is None and train.method == "grft" else 0.0
    regularizer = L2ToPretrained(model, grft)  # references taken before any trained value is loaded
    if checkpoint is not None:
        _load_trained_values(model, train, checkpoint, run_dir)
    report = trainable_parameters_report(model)
    monitor.scalars({"params/trainable": report.trainable, "params/trainable_percent": report.percent}, 0)

    loop = _Loop(train, grft, task, context, monitor, run_dir, model, regularizer, train_set, eval_set, num_classes)
    history = loop.fit(checkpoint)
    main = task.main_metric
    metrics = {
        **{name: value for name, value in history[-1].items() if name != "epoch"},
        f"best_{main}": max(h[main] for h in history),
        "history": history,
        "trainable": report.trainable,
        "total": report.total,
        "trainable_percent": report.percent,
        "epochs": loop.total_epochs,
        "selection_seconds": selection_seconds,
        "train_seconds": loop.seconds,
        "seconds": time.perf_counter() - start,
        "dataset": train.dataset,
        "method": train.method,
        "structure": grft.structure,
        "k": grft.k,
        "run_dir": str(run_dir),
    }
    if context.is_main:
        _save_outputs(model, train, run_dir)
        write_json_atomic(run_dir / "metrics.json", metrics)
        monitor.hparams(settings, {main: metrics[main], "trainable_percent": report.percent})
    monitor.close()
    return metrics


def _make_trainable(model: nn.Module, train: TrainConfig, grft: GRFTConfig, task: Task, train_set: Dataset,
                    checkpoint: dict | None, context: DistributedContext, run_dir: Path, monitor: Monitor) -> None:
    """GRFT: select (or take the checkpoint's indices) and wrap; baselines: set their trainable set."""
    if train.method != "grft":
        _prepare_method(model, train, grft)
        return
    if checkpoint is None:
        _select_and_wrap(model, train, grft, task, train_set, context, run_dir, monitor)
    else:
        tensors, metadata = checkpoint["adapter"]
        structures = json.loads(metadata["structures"])
        add_adapter(model, DEFAULT_ADAPTER, {n: tensors[f"{n}.grft_indices"].long() for n in structures}, structures,
                    grft)
    model.to(context.device)


def _load_trained_values(model: nn.Module, train: TrainConfig, checkpoint: dict, run_dir: Path) -> None:
    if train.method == "grft":
        apply_adapter_state(model, *checkpoint["adapter"], source=str(run_dir / "checkpoint.pt"))
        return
    with torch.no_grad():
        for name, value in checkpoint["trainable"].items():
            model.get_parameter(name).copy_(value)


def create_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, updates_per_epoch: int) -> tuple[Any, int]:
    """The run's timm learning-rate schedule and its total number of epochs.

    Per epoch (the vision scripts): ``warmup_epochs`` linear warm-up epochs from ``warmup_lr``, added before
    ``epochs`` epochs of ``sched`` decaying to ``min_lr``. With ``train.sched_on_updates`` the same schedule
    is counted in optimizer updates (stepped by ``scheduler.step_update``), and a warm-up of
    ``warmup_ratio`` of the updates of ``epochs`` may replace the prefix (the language-model convention).
    ``sched='linear'`` is a linear decay (timm's 'poly' with power 1); every other name is timm's.
    """
    sched, options = ("poly", {"decay_rate": 1.0}) if train.sched == "linear" else (train.sched, {})
    options.update(sched=sched, warmup_lr=train.warmup_lr, min_lr=train.min_lr)
    if not train.sched_on_updates:
        return create_scheduler_v2(optimizer, num_epochs=train.epochs, warmup_epochs=train.warmup_epochs,
                                   warmup_prefix=True, **options)
    updates = train.epochs * updates_per_epoch
    prefix = train.warmup_epochs * updates_per_epoch
    warmup = prefix or min(round(train.warmup_ratio * updates), updates - 1)
    # the decay starts at the peak after the warm-up: a prefix before `updates`, or a ratio taken from them
    scheduler, _ = create_scheduler_v2(optimizer, num_epochs=updates if prefix else updates - warmup,
                                       warmup_epochs=warmup, warmup_prefix=True, step_on_epochs=False,
                                       updates_per_epoch=1, **options)
    return scheduler, train.total_epochs


class _Loop:
    """Optimizer, schedule, loaders and the epoch loop of one run, with checkpointing after every epoch."""

    def __init__(self, train: TrainConfig, grft: GRFTConfig, task: Task, context: DistributedContext,
                 monitor: Monitor, run_dir: Path, model: nn.Module, regularizer: L2ToPretrained, train_set: Dataset,
                 eval_set: Dataset, num_classes: int) -> None:
        self.train, self.task, self.context, self.monitor, self.run_dir = train, task, context, monitor, run_dir
        self.model, self.regularizer = model, regularizer
        self.network = DistributedDataParallel(model) if context.distributed else model
        trainable = [param for param in model.parameters() if param.requires_grad]
        self.optimizer = create_optimizer_v2(trainable, opt=train.opt, lr=train.lr, weight_decay=train.weight_decay)
        self.precision = Precision(context.device, train.amp)
        self.train_loader = _train_loader(train, train_set, context, task)
        self.scheduler, self.total_epochs = create_scheduler(self.optimizer, train, len(self.train_loader))
        self.eval_loader = _eval_loader(train, eval_set, context, task)
        self.loss_fn, self.mixup = task.loss_and_mixup(train, num_classes)
        self.progress = not train.quiet and context.is_main
        self.seconds = 0.0
        self.mask_schedule = self._mask_schedule(grft, train_set) if train.method == "grft" else None

    def _mask_schedule(self, grft: GRFTConfig, train_set: Dataset) -> MaskSchedule | None:
        """The dynamic or incremental schedule of the chosen entries (None when they are static)."""
        if grft.schedule == "static":
            return None
        if self.context.distributed:
            raise ConfigError(f"schedule={grft.schedule!r} replaces the trainable tensors during training, which "
                              "DistributedDataParallel does not allow; run it in a single process.")
        return create_schedule(self.model, grft, self.task.selection_loader(self.train, grft, train_set),
                               total_steps=self.total_epochs * len(self.train_loader),
                               budgets=self.model.grft_state.budgets,
                               features=self.task.selection_features(grft), device=self.context.device,
                               amp=self.train.amp)

    def _before_step(self, step: int) -> None:
        if self.mask_schedule.before_step(step, self.optimizer):
            trainable = sum(layer.delta.numel() for _, layer in grft_layers(self.model))
            self.monitor.scalars({"schedule/chosen_entries": trainable}, step)

    def _restore(self, checkpoint: dict) -> tuple[int, list[dict[str, Any]]]:
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.precision.scaler is not None and checkpoint["scaler"] is not None:
            self.precision.scaler.load_state_dict(checkpoint["scaler"])
        if self.mask_schedule is not None:
            self.mask_schedule.load_state_dict(checkpoint["mask_schedule"])
        restore_rng_state(checkpoint["rng"])
        return checkpoint["epoch"] + 1, checkpoint["history"]

    def fit(self, checkpoint: dict | None) -> list[dict[str, Any]]:
        """Run the remaining epochs; returns the evaluation history."""
        first_epoch, history = self._restore(checkpoint) if checkpoint is not None else (0, [])
        global_step = first_epoch * len(self.train_loader)
        begin = time.perf_counter()
        for epoch in range(first_epoch, self.total_epochs):
            self.train_loader.sampler.set_epoch(epoch)
            self.train_loader.generator.manual_seed(self.train.seed + epoch)  # worker seeds, resume-proof
            if not self.train.sched_on_updates:  # per-update schedules log their rate every step
                self.monitor.scalars({"train/lr": self.optimizer.param_groups[0]["lr"]}, epoch)
            losses, global_step = train_one_epoch(
                self.network, self.train_loader, self.optimizer, self.loss_fn, batches=self.task.batches,
                regularizer=self.regularizer, precision=self.precision, context=self.context,
                monitor=self.monitor, epoch=epoch, global_step=global_step, mixup=self.mixup,
                clip_grad=self.train.clip_grad, progress=self.progress,
                scheduler=self.scheduler if self.train.sched_on_updates else None,
                before_step=self._before_step if self.mask_schedule is not None else None)
            if self.scheduler is not None:  # sched='none' keeps the learning rate constant
                self.scheduler.step(epoch + 1)
            if (epoch + 1) % self.train.eval_every == 0 or epoch + 1 == self.total_epochs:
                history.append({"epoch": epoch + 1, **self.evaluate(epoch + 1), **losses})
            self._checkpoint(epoch, history)
        self.seconds = time.perf_counter() - begin
        return history

    def evaluate(self, step: int) -> dict[str, float]:
        predictions, targets = evaluate(self.network, self.eval_loader, batches=self.task.batches,
                                        precision=self.precision, context=self.context, progress=self.progress)
        scores = self.task.metrics(predictions, targets)
        self.monitor.scalars({f"{self.train.eval_split}/{name}": value for name, value in scores.items()}, step)
        return scores

    def _checkpoint(self, epoch: int, history: list[dict[str, Any]]) -> None:
        if self.context.is_main:
            grft = self.train.method == "grft"
            save_checkpoint(self.run_dir / "checkpoint.pt", epoch=epoch,
                            adapter=adapter_state(self.model) if grft else None,
                            trainable=None if grft else _trainable_tensors(self.model),
                            optimizer=self.optimizer, scheduler=self.scheduler, history=history,
                            scaler=self.precision.scaler,
                            mask_schedule=self.mask_schedule.state_dict() if self.mask_schedule else None)
        self.context.barrier()
