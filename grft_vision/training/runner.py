"""One run, start to finish (what the training scripts execute), for any :class:`~.task.Task` and
:class:`~.methods.Method`: it wires the pieces and owns none of them.

settings -> run directory checked (:mod:`.run_dir`) -> data and model (the task) -> the method makes the model
trainable (GRFT: SupCon selection on the main process, ``apply_grft``) -> run directory claimed -> optimizer,
schedule, L2-to-pretrained -> :class:`~.trainer.Trainer` (the epoch loop) with a checkpoint after every epoch
-> outputs. The run directory receives ``config.yaml``, ``selection.json``, the method's output
(``adapter.safetensors``), ``checkpoint.pt`` (every epoch), ``metrics.json`` and TensorBoard events, every
file written atomically; ``resume=True`` continues from the checkpoint to the result an uninterrupted run
gives.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..config import GRFTConfig
from ..errors import ConfigError
from ..selection.record import write_json_atomic
from ..tuner.layer import grft_layers
from ..tuner.regularization import L2ToPretrained
from ..tuner.trainable import trainable_parameters_report
from .checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from .config import TrainConfig, resolved_settings
from .distributed import DistributedContext, shard_frozen_base
from .divergence import DivergenceWatch, check_finite_parameters
from .methods import METHODS, Method, RunSetup
from .monitor import Monitor
from .run_dir import RUN_FILES, RunDirectory
from .task import Task, VisionTask
from .trainer import Precision, Trainer, TrainStep, evaluate

__all__ = ["run", "seed_everything", "create_scheduler", "RUN_FILES"]


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


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


def _check_device(device: str | None) -> None:
    """Refuse a CUDA device this machine does not have (before torch fails on it)."""
    if device is None or torch.device(device).type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}, but CUDA is not available on this machine; use --device cpu, or "
                          "leave --device out to use CUDA where there is one.")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s); "
                          f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}.")


def _train_loader(train: TrainConfig, dataset: Dataset, context: DistributedContext, task: Task) -> DataLoader:
    """Shuffled per epoch by a seeded sampler; with N processes each takes every N-th sample of a global batch."""
    sampler = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True,
                                 seed=train.seed)
    return DataLoader(dataset, batch_size=train.batch_size // context.world_size, sampler=sampler,
                      num_workers=train.workers, pin_memory=context.device.type == "cuda",
                      generator=torch.Generator(), collate_fn=task.collate_fn)


def _eval_loader(train: TrainConfig, dataset: Dataset, context: DistributedContext, task: Task) -> DataLoader:
    """Every N-th sample; under FSDP every shard is padded (with its own first sample) to the length of the
    longest, because every process must run every forward pass (:meth:`_Run.predictions` drops the padding)."""
    indices = list(range(context.rank, len(dataset), context.world_size))
    if train.fsdp and len(dataset):
        indices += (indices[:1] or [0]) * (-(-len(dataset) // context.world_size) - len(indices))
    return DataLoader(Subset(dataset, indices), batch_size=train.batch_size, shuffle=False, num_workers=train.workers,
                      pin_memory=context.device.type == "cuda", collate_fn=task.collate_fn)


class _Run:
    """The pieces of one run once its model is trainable: the step loop's state, the epoch loop, checkpoints."""

    def __init__(self, setup: RunSetup, method: Method, directory: RunDirectory, checkpoint: dict | None,
                 selection_seconds: float, eval_set: Dataset, num_classes: int, started: float) -> None:
        self.setup, self.method, self.directory, self.checkpoint = setup, method, directory, checkpoint
        self.selection_seconds, self.started = selection_seconds, started
        train, model, context = setup.train, setup.model, setup.context
        self.regularizer = L2ToPretrained(model, setup.grft)  # references taken before any trained value is loaded
        if checkpoint is not None:
            method.load_values(model, checkpoint, str(directory / "checkpoint.pt"))
        self.report = trainable_parameters_report(model)
        setup.monitor.scalars({"params/trainable": self.report.trainable,
                               "params/trainable_percent": self.report.percent}, 0)
        network = shard_frozen_base(model, context) if train.fsdp else \
            DistributedDataParallel(model) if context.distributed else model
        optimizer = create_optimizer_v2([p for p in model.parameters() if p.requires_grad], opt=train.opt, lr=train.lr,
                                        weight_decay=train.weight_decay)
        self.train_loader = _train_loader(train, setup.train_set, context, setup.task)
        self.eval_loader = _eval_loader(train, eval_set, context, setup.task)
        self.scheduler, self.total_epochs = create_scheduler(optimizer, train, len(self.train_loader))
        loss_fn, mixup = setup.task.loss_and_mixup(train, num_classes)
        self.mask_schedule = method.mask_schedule(setup, self.total_epochs * len(self.train_loader))
        self.step = TrainStep(
            network, optimizer, loss_fn, batches=setup.task.batches, regularizer=self.regularizer,
            precision=Precision(context.device, train.amp), clip_grad=train.clip_grad, mixup=mixup,
            scheduler=self.scheduler if train.sched_on_updates else None,
            before_step=self._before_step if self.mask_schedule is not None else None,
            divergence=DivergenceWatch(train.divergence_factor, train.divergence_window), context=context,
            monitor=setup.monitor)
        self.progress = not train.quiet and context.is_main
        self.trainer = Trainer(
            self.step, self.train_loader, self.eval_loader,
            scheduler=None if train.sched_on_updates else self.scheduler, metrics=setup.task.metrics,
            predictions=self.predictions, eval_every=train.eval_every, eval_split=train.eval_split,
            on_epoch_start=self._epoch_start, on_epoch_end=self._save_checkpoint, progress=self.progress)
        self.seconds = 0.0  # training time, of earlier sessions too
        self._began = time.perf_counter()

    # ------------------------------------------------------------------ the epoch loop's hooks
    def _before_step(self, step: int) -> None:
        if self.mask_schedule.before_step(step, self.step.optimizer):
            trainable = sum(layer.delta.numel() for _, layer in grft_layers(self.setup.model))
            self.setup.monitor.scalars({"schedule/chosen_entries": trainable}, step)

    def _epoch_start(self, epoch: int) -> None:
        self.train_loader.generator.manual_seed(self.setup.train.seed + epoch)  # worker seeds, resume-proof

    def predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions and targets of the whole eval set; under FSDP without the padding of :func:`_eval_loader`."""
        step, context = self.step, self.setup.context
        if not self.setup.train.fsdp:
            return evaluate(step.model, self.eval_loader, batches=step.batches, precision=step.precision,
                            context=context, progress=self.progress)
        alone = DistributedContext(0, 1, context.device)  # gather after dropping the padding
        predictions, targets = evaluate(step.model, self.eval_loader, batches=step.batches, precision=step.precision,
                                        context=alone, progress=self.progress)
        own = len(range(context.rank, len(self.eval_loader.dataset.dataset), context.world_size))
        gathered = context.gather((predictions[:own], targets[:own]))
        return torch.cat([p for p, _ in gathered]), torch.cat([t for _, t in gathered])

    def _train_seconds(self) -> float:
        return self.seconds + time.perf_counter() - self._began

    def _save_checkpoint(self, epoch: int, history: list[dict[str, Any]]) -> None:
        """Save the epoch's state, unless a parameter is no longer finite (the last good one then stays)."""
        check_finite_parameters(self.setup.model, epoch)
        if self.setup.context.is_main:
            save_checkpoint(self.directory / "checkpoint.pt", epoch=epoch,
                            **self.method.checkpoint_state(self.setup.model),
                            optimizer=self.step.optimizer, scheduler=self.scheduler, history=history,
                            scaler=self.step.precision.scaler,
                            mask_schedule=self.mask_schedule.state_dict() if self.mask_schedule else None,
                            settings=self.directory.settings, divergence=self.step.divergence.state_dict(),
                            seconds={"selection": self.selection_seconds, "train": self._train_seconds()})
        self.setup.context.barrier()

    # ------------------------------------------------------------------ start and end
    def restore(self) -> tuple[int, list[dict[str, Any]]]:
        """``(first epoch, history)``: from the checkpoint's optimizer, schedule, RNG and loop state, or a fresh start."""
        checkpoint = self.checkpoint
        if checkpoint is None:
            return 0, []
        self.step.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint["scaler"] is not None:
            self.step.precision.scaler.load_state_dict(checkpoint["scaler"])
        if self.mask_schedule is not None:
            self.mask_schedule.load_state_dict(checkpoint["mask_schedule"])
        self.step.divergence.load_state_dict(checkpoint["divergence"])
        self.seconds = checkpoint["seconds"]["train"]
        restore_rng_state(checkpoint["rng"])
        first_epoch = checkpoint["epoch"] + 1
        self.step.global_step = first_epoch * len(self.train_loader)
        self._began = time.perf_counter()
        return first_epoch, checkpoint["history"]

    def finish(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The final metrics, written with the method's outputs and TensorBoard's hparams."""
        setup, main = self.setup, self.setup.task.main_metric
        metrics = {
            **{name: value for name, value in history[-1].items() if name != "epoch"},
            f"best_{main}": max(h[main] for h in history),
            "history": history,
            "trainable": self.report.trainable,
            "total": self.report.total,
            "trainable_percent": self.report.percent,
            "epochs": self.total_epochs,
            "selection_seconds": self.selection_seconds,
            "train_seconds": self._train_seconds(),
            "seconds": time.perf_counter() - self.started,
            "dataset": setup.train.dataset,
            "method": setup.train.method,
            "structure": setup.grft.structure,
            "k": setup.grft.k,
            "run_dir": str(self.directory.path),
        }
        if setup.context.is_main:
            self.method.save_outputs(setup.model, self.directory.path, self.method.checkpoint_state(setup.model))
            write_json_atomic(self.directory / "metrics.json", metrics)
            setup.monitor.hparams(self.directory.settings, {main: metrics[main],
                                                            "trainable_percent": self.report.percent})
        setup.monitor.close()
        return metrics


def _run_dir_path(train: TrainConfig, context: DistributedContext) -> Path:
    if train.run_dir is None:
        stamp = context.broadcast(time.strftime("%Y%m%d-%H%M%S"))
        train.run_dir = str(Path("runs") / train.dataset / stamp)
    return Path(train.run_dir)


def _open(train: TrainConfig, grft: GRFTConfig, task: Task, context: DistributedContext, directory: RunDirectory,
          started: float) -> _Run:
    """Everything up to the first epoch: checks, data, model, the claimed run directory, the trainable model."""
    if train.batch_size % context.world_size:
        raise ConfigError(f"batch_size={train.batch_size} must be divisible by the {context.world_size} processes "
                          f"(torchrun --nproc_per_node); use a multiple of {context.world_size}.")
    method = METHODS.get(train.method)()
    refusal, checkpoint = None, None
    if context.is_main:
        try:
            checkpoint = directory.check()
        except ConfigError as error:
            refusal = str(error)
    refusal = context.broadcast(refusal)
    if refusal is not None:
        raise ConfigError(refusal)
    if directory.resume and not context.is_main:
        checkpoint = load_checkpoint(directory / "checkpoint.pt")
    train_set, eval_set, num_classes = task.datasets(train)
    model = task.build_model(train, num_classes, context.device).to(context.device)
    task.prepare_data(train, model, train_set, eval_set)
    if checkpoint is None:  # nothing is written before the data, the model and k are known to be usable
        method.check(model, grft)
    if context.is_main:
        directory.claim(train.logdir)
    context.barrier()
    monitor = Monitor(str(train.logdir or directory / "tb") if context.is_main else None)
    setup = RunSetup(model, train, grft, task, train_set, context, directory.path, monitor)
    begin = time.perf_counter()
    if checkpoint is None:
        method.prepare(setup)
        selection_seconds = time.perf_counter() - begin if method.selects else 0.0
    else:
        method.restore(setup, checkpoint)
        selection_seconds = checkpoint["seconds"]["selection"]  # the original selection's time
    return _Run(setup, method, directory, checkpoint, selection_seconds, eval_set, num_classes, started)


def run(train: TrainConfig, grft: GRFTConfig, *, resume: bool = False, overwrite: bool = False,
        task: Task | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the final metrics (also written to ``metrics.json``).

    Args:
        train, grft: the run's settings.
        resume: continue the run in ``train.run_dir`` from its checkpoint.
        overwrite: start a new run in ``train.run_dir`` even though it holds one of grft-vision (its files are
            deleted once the new run's data and model are ready). Without it a run directory that holds files
            is refused.
        task: supplies data, model and metrics (default :class:`VisionTask`).

    Raises:
        ConfigError: inconsistent settings (e.g. resuming with other settings), a run directory that holds
            another run or is in use, a stale or unreadable checkpoint, an unavailable device.
        DataNotFoundError, ModelLoadError, SelectionError: missing data or weights, unusable selection data.
        TrainingError: a non-finite loss, or a diverging run (the last good checkpoint stays in place).
    """
    started = time.perf_counter()
    _check_device(train.device)
    context = DistributedContext.from_environment(train.device)
    directory = RunDirectory(_run_dir_path(train, context), resolved_settings(train, grft), resume=resume,
                             overwrite=overwrite)
    try:
        seed_everything(train.seed)
        state = _open(train, grft, task or VisionTask(), context, directory, started)
        first_epoch, history = state.restore()
        history = state.trainer.fit(state.total_epochs, start_epoch=first_epoch, history=history)
        return state.finish(history)
    finally:
        directory.release()
        context.close()
