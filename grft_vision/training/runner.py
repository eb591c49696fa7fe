"""One fine-tuning run, start to finish (what the training scripts execute), for any :class:`Task`.

data -> model -> selection (SupCon gradients, main process) -> ``apply_grft`` -> optimizer on the trainable
tensors + L2-to-pretrained -> schedule with warm-up -> evaluation -> outputs. The run directory
receives ``config.yaml``, ``selection.json``, ``adapter.safetensors``, ``checkpoint.pt`` (every epoch),
``metrics.json`` and TensorBoard events, every file written atomically; ``resume=True`` continues from the
checkpoint to the result an uninterrupted run gives.

A run directory belongs to one run: a new run refuses a directory that holds files unless
``overwrite=True`` (which deletes the old run's files), and a resume refuses a checkpoint whose settings
are not the run's (a stale checkpoint of an earlier run in the same directory).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import save as safetensors_bytes
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..api import apply_grft
from ..io.adapter_format import adapter_state, adapter_tensors
from ..io.adapters import apply_adapter_state
from ..tuner.anatomy import grft_layers, head_module_names
from ..config import GRFTConfig
from ..errors import ConfigError
from ..files import atomic_write, remove_temporaries
from ..tuner.model import inject
from ..tuner.regularization import L2ToPretrained
from ..tuner.state import DEFAULT_ADAPTER, grft_state
from ..tuner.targets import check_targets
from ..selection.record import write_json_atomic
from ..selection.schedules import MaskSchedule, create_schedule
from ..tuner.trainable import trainable_parameters_report
from .checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from .config import TrainConfig, resolved_settings, yaml_problem
from .distributed import DistributedContext, shard_frozen_base
from .loop import DivergenceWatch, Precision, check_finite_parameters, evaluate, train_one_epoch
from .monitor import Monitor
from .task import Task, VisionTask

__all__ = ["run", "seed_everything", "create_scheduler", "RUN_FILES"]

# settings that may differ between a run and its resumption
_RESUME_FREE = {"run_dir", "logdir", "quiet", "workers", "device", "eval_every", "divergence_factor",
                "divergence_window", "fsdp"}
# what a run writes into its directory (besides the TensorBoard folder tb/); --overwrite deletes these
RUN_FILES = ("config.yaml", "selection.json", "adapter.safetensors", "trainable.safetensors", "checkpoint.pt",
             "metrics.json")


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
    """Every N-th sample; under FSDP every shard is padded (with its own first sample) to the length of the
    longest, because every process must run every forward pass (``_Loop.evaluate`` drops the padding)."""
    indices = list(range(context.rank, len(dataset), context.world_size))
    if train.fsdp and len(dataset):
        indices += (indices[:1] or [0]) * (-(-len(dataset) // context.world_size) - len(indices))
    return DataLoader(Subset(dataset, indices), batch_size=train.batch_size, shuffle=False, num_workers=train.workers,
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
        inject(model, DEFAULT_ADAPTER, {n: i for n, (_, i) in chosen.items()},
                    {n: s for n, (s, _) in chosen.items()}, grft)


def _prepare_method(model: nn.Module, train: TrainConfig, grft: GRFTConfig) -> None:
    """Trainable set of the baselines: everything (full) or the head only (head)."""
    model.requires_grad_(train.method == "full")
    if train.method == "head":
        for name in head_module_names(model, grft.head_modules):
            model.get_submodule(name).requires_grad_(True)


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


def _run_dir_refusal(run_dir: Path, resume: bool, overwrite: bool) -> str | None:
    """Why ``run_dir`` cannot take this run (None: it can): a file, unwritable, or another run's."""
    if resume and overwrite:
        return "--resume continues the run in --run-dir and --overwrite replaces it; pass only one of them."
    existing = next(parent for parent in (run_dir, *run_dir.parents) if parent.exists())
    if not existing.is_dir():
        return f"--run-dir {run_dir}: {existing} is a file, not a directory; choose another --run-dir."
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"--run-dir {run_dir}: {existing} is not writable; choose a writable --run-dir."
    if resume or overwrite or existing != run_dir:
        return None
    held = sorted(entry.name for entry in run_dir.iterdir())
    if held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        return (f"--run-dir {run_dir} already holds files ({shown}); continue that run with --resume, replace it "
                "with --overwrite, or choose another --run-dir.")
    return None


def _read_saved_settings(path: Path) -> dict[str, Any]:
    """The settings of ``config.yaml`` on resume; a missing, empty or unreadable file is a ConfigError."""
    fix = "restore it, or start the run again with --overwrite"
    if not path.is_file():
        raise ConfigError(f"--resume: {path} is missing, so the run's settings are unknown; {fix}.")
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"--resume: {path} is not valid YAML ({yaml_problem(error)}); {fix}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--resume: {path} is not a text file; {fix}.") from None
    if not saved:
        raise ConfigError(f"--resume: {path} is empty; {fix}.")
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {path} is not a mapping of settings; {fix}.")
    return saved


def _differences(saved: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    return sorted(key for key in set(saved) | set(settings)
                  if key not in _RESUME_FREE and saved.get(key) != settings.get(key))


def _check_resumable(run_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint to resume from, once ``config.yaml`` and the checkpoint agree with ``settings``."""
    path, config_path = run_dir / "checkpoint.pt", run_dir / "config.yaml"
    if not path.is_file():
        if config_path.is_file():
            raise ConfigError(f"--resume: {run_dir} holds no checkpoint yet (the run stopped before its first "
                              "epoch ended); start it again with --overwrite.")
        raise ConfigError(f"--resume: no run in {run_dir} (no checkpoint.pt); start the run without --resume.")
    saved = _read_saved_settings(config_path)
    missing = sorted(set(settings) - set(saved) - _RESUME_FREE)
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ConfigError(f"--resume: {config_path} lacks {len(missing)} settings ({shown}): it is truncated or "
                          "from another version; restore it, or start the run again with --overwrite.")
    changed = _differences(saved, settings)
    if changed:
        raise ConfigError(f"--resume: settings differ from the run in {run_dir}: {', '.join(changed)}; resume "
                          "with the same settings, or start a new run directory.")
    checkpoint = load_checkpoint(path)
    if checkpoint.get("settings") is None:
        raise ConfigError(f"--resume: {path} does not record the settings it was trained with (written by an "
                          "older version), so it cannot be matched to this run; start again with --overwrite.")
    stale = _differences(checkpoint["settings"], settings)
    if stale:
        raise ConfigError(f"--resume: {path} belongs to an earlier run in {run_dir} (its {', '.join(stale)} "
                          "differ from config.yaml's); start this run again with --overwrite.")
    return checkpoint


def _open_run_dir(train: TrainConfig, grft: GRFTConfig, resume: bool, overwrite: bool,
                  context: DistributedContext) -> tuple[Path, dict[str, Any], dict[str, Any] | None]:
    """``(run directory, resolved settings, checkpoint or None)`` once the directory may take this run."""
    run_dir = _run_dir(train, context)
    settings = resolved_settings(train, grft)
    refusal = context.broadcast(_run_dir_refusal(run_dir, resume, overwrite) if context.is_main else None)
    if refusal is not None:
        raise ConfigError(refusal)
    checkpoint = _check_resumable(run_dir, settings) if resume else None
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(run_dir)  # left by a process killed while writing
    return run_dir, settings, checkpoint


def _start_run_dir(run_dir: Path, train: TrainConfig, settings: dict[str, Any], overwrite: bool) -> None:
    """A new run: with ``overwrite`` delete the old run's files, then write ``config.yaml``."""
    if overwrite:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        if train.logdir is None and (run_dir / "tb").is_dir():
            shutil.rmtree(run_dir / "tb")
    with atomic_write(run_dir / "config.yaml", "w") as handle:
        yaml.safe_dump(settings, handle, sort_keys=True)


def _check_targets(model: nn.Module, train: TrainConfig, grft: GRFTConfig) -> None:
    """Refuse module patterns that match nothing, and a k larger than a targeted layer, before anything is
    written to the run directory."""
    if train.method == "grft":
        check_targets(model, grft)
    else:
        head_module_names(model, grft.head_modules)


def _trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().cpu() for name, param in model.named_parameters() if param.requires_grad}


def _save_outputs(model: nn.Module, train: TrainConfig, run_dir: Path, adapter: tuple[dict, dict] | None) -> None:
    """``adapter.safetensors`` (GRFT: ``adapter`` is its ``(tensors, metadata)``) or ``trainable.safetensors``."""
    if train.method == "grft":
        with atomic_write(run_dir / "adapter.safetensors", "wb") as handle:
            handle.write(safetensors_bytes(adapter[0], metadata=adapter[1]))
        return
    with atomic_write(run_dir / "trainable.safetensors") as handle:
        handle.write(safetensors_bytes({k: v.contiguous() for k, v in _trainable_tensors(model).items()}))


def run(train: TrainConfig, grft: GRFTConfig, *, resume: bool = False, overwrite: bool = False,
        task: Task | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration; returns the final metrics (also written to ``metrics.json``).

    Args:
        train, grft: the run's settings.
        resume: continue the run in ``train.run_dir`` from its checkpoint.
        overwrite: start a new run in ``train.run_dir`` even though it holds one (its files are deleted once
            the new run's data and model are ready). Without it a run directory that holds files is refused.
        task: supplies data, model and metrics (default :class:`VisionTask`).

    Raises:
        ConfigError: inconsistent settings (e.g. resuming with other settings), a run directory that holds
            another run, a stale or unreadable checkpoint, an unavailable device.
        DataNotFoundError, ModelLoadError, SelectionError: missing data or weights, unusable selection data.
        TrainingError: a non-finite loss, or a diverging run (the last good checkpoint stays in place).
    """
    _check_device(train.device)
    context = DistributedContext.from_environment(train.device)
    try:
        return _run(train, grft, resume, overwrite, context, task or VisionTask())
    finally:
        context.close()


def _run(train: TrainConfig, grft: GRFTConfig, resume: bool, overwrite: bool, context: DistributedContext,
         task: Task) -> dict[str, Any]:
    start = time.perf_counter()
    seed_everything(train.seed)
    run_dir, settings, checkpoint = _open_run_dir(train, grft, resume, overwrite, context)
    train_set, eval_set, num_classes = task.datasets(train)
    model = task.build_model(train, num_classes).to(context.device)
    task.prepare_data(train, model, train_set, eval_set)
    if checkpoint is None:  # nothing is written before the data, the model and k are known to be usable
        _check_targets(model, train, grft)
        if context.is_main:
            _start_run_dir(run_dir, train, settings, overwrite)
    monitor = Monitor(str(train.logdir or run_dir / "tb") if context.is_main else None)
    begin = time.perf_counter()
    _make_trainable(model, train, grft, task, train_set, checkpoint, context, run_dir, monitor)
    selection_seconds = time.perf_counter() - begin if train.method == "grft" else 0.0
    if checkpoint is not None:  # the original selection's time, not that of re-wrapping
        selection_seconds = checkpoint["seconds"]["selection"]
    regularizer = L2ToPretrained(model, grft)  # references taken before any trained value is loaded
    if checkpoint is not None:
        _load_trained_values(model, train, checkpoint, run_dir)
    report = trainable_parameters_report(model)
    monitor.scalars({"params/trainable": report.trainable, "params/trainable_percent": report.percent}, 0)

    loop = _Loop(train, grft, task, context, monitor, run_dir, model, regularizer, train_set, eval_set, num_classes,
                 settings=settings, selection_seconds=selection_seconds)
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
        _save_outputs(model, train, run_dir, loop.adapter_state())
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
        inject(model, DEFAULT_ADAPTER, {n: tensors[f"{n}.grft_indices"].long() for n in structures}, structures,
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
    """Optimizer, schedule, loaders and the epoch loop of one run, with checkpointing after every epoch.

    ``settings`` (the run's resolved settings) and ``selection_seconds`` go into every checkpoint: the
    first binds it to its run, the second survives into a resumed run's metrics.
    """

    def __init__(self, train: TrainConfig, grft: GRFTConfig, task: Task, context: DistributedContext,
                 monitor: Monitor, run_dir: Path, model: nn.Module, regularizer: L2ToPretrained, train_set: Dataset,
                 eval_set: Dataset, num_classes: int, *, settings: dict[str, Any], selection_seconds: float) -> None:
        self.train, self.task, self.context, self.monitor, self.run_dir = train, task, context, monitor, run_dir
        self.settings, self.selection_seconds = settings, selection_seconds
        self.divergence = DivergenceWatch(train.divergence_factor, train.divergence_window)
        self.model, self.regularizer = model, regularizer
        # under FSDP the backbone's fingerprints are taken before it is sharded (the base never changes)
        self._adapter_metadata = adapter_state(model)[1] if train.fsdp and train.method == "grft" else None
        if train.fsdp:
            self.network = shard_frozen_base(model, context)
        else:
            self.network = DistributedDataParallel(model) if context.distributed else model
        trainable = [param for param in model.parameters() if param.requires_grad]
        self.optimizer = create_optimizer_v2(trainable, opt=train.opt, lr=train.lr, weight_decay=train.weight_decay)
        self.precision = Precision(context.device, train.amp)
        self.train_loader = _train_loader(train, train_set, context, task)
        self.scheduler, self.total_epochs = create_scheduler(self.optimizer, train, len(self.train_loader))
        self.eval_loader = _eval_loader(train, eval_set, context, task)
        self.loss_fn, self.mixup = task.loss_and_mixup(train, num_classes)
        self.progress = not train.quiet and context.is_main
        self.seconds = 0.0  # training time, of earlier sessions too
        self.mask_schedule = self._mask_schedule(grft, train_set) if train.method == "grft" else None

    def _mask_schedule(self, grft: GRFTConfig, train_set: Dataset) -> MaskSchedule | None:
        """The dynamic or incremental schedule of the chosen entries (None when they are static)."""
        if grft.schedule == "static":
            return None
        if self.context.distributed:
            wrapper = "FSDP" if self.train.fsdp else "DistributedDataParallel"
            raise ConfigError(f"schedule={grft.schedule!r} replaces the trainable tensors during training, which "
                              f"{wrapper} does not allow; run it in a single process.")
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
        self.divergence.load_state_dict(checkpoint["divergence"])
        self.seconds = checkpoint["seconds"]["train"]
        restore_rng_state(checkpoint["rng"])
        return checkpoint["epoch"] + 1, checkpoint["history"]

    def _train_seconds(self) -> float:
        """Training time so far, earlier sessions included (``_began``: when this session's epochs began)."""
        return self.seconds + time.perf_counter() - self._began

    def fit(self, checkpoint: dict | None) -> list[dict[str, Any]]:
        """Run the remaining epochs; returns the evaluation history."""
        first_epoch, history = self._restore(checkpoint) if checkpoint is not None else (0, [])
        global_step = first_epoch * len(self.train_loader)
        self._began = time.perf_counter()
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
                before_step=self._before_step if self.mask_schedule is not None else None,
                divergence=self.divergence)
            if self.scheduler is not None:  # sched='none' keeps the learning rate constant
                self.scheduler.step(epoch + 1)
            if (epoch + 1) % self.train.eval_every == 0 or epoch + 1 == self.total_epochs:
                history.append({"epoch": epoch + 1, **self.evaluate(epoch + 1), **losses})
            self._checkpoint(epoch, history)
        self.seconds = self._train_seconds()
        return history

    def adapter_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The active adapter's ``(tensors, metadata)`` (:func:`~grft_vision.adapter.adapter_state`); None for the
        baselines."""
        if self.train.method != "grft":
            return None
        if self._adapter_metadata is None:
            return adapter_state(self.model)
        return adapter_tensors(self.model, grft_state(self.model).active), self._adapter_metadata

    def _predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions and targets of the whole eval set; under FSDP without the padding of ``_eval_loader``."""
        if not self.train.fsdp:
            return evaluate(self.network, self.eval_loader, batches=self.task.batches, precision=self.precision,
                            context=self.context, progress=self.progress)
        alone = DistributedContext(0, 1, self.context.device)  # gather after dropping the padding
        predictions, targets = evaluate(self.network, self.eval_loader, batches=self.task.batches,
                                        precision=self.precision, context=alone, progress=self.progress)
        own = len(range(self.context.rank, len(self.eval_loader.dataset.dataset), self.context.world_size))
        gathered = self.context.gather((predictions[:own], targets[:own]))
        return torch.cat([p for p, _ in gathered]), torch.cat([t for _, t in gathered])

    def evaluate(self, step: int) -> dict[str, float]:
        predictions, targets = self._predictions()
        scores = self.task.metrics(predictions, targets)
        self.monitor.scalars({f"{self.train.eval_split}/{name}": value for name, value in scores.items()}, step)
        return scores

    def _checkpoint(self, epoch: int, history: list[dict[str, Any]]) -> None:
        """Save the epoch's state, unless a parameter is no longer finite (the last good one then stays)."""
        check_finite_parameters(self.model, epoch)
        if self.context.is_main:
            grft = self.train.method == "grft"
            save_checkpoint(self.run_dir / "checkpoint.pt", epoch=epoch,
                            adapter=self.adapter_state(),
                            trainable=None if grft else _trainable_tensors(self.model),
                            optimizer=self.optimizer, scheduler=self.scheduler, history=history,
                            scaler=self.precision.scaler,
                            mask_schedule=self.mask_schedule.state_dict() if self.mask_schedule else None,
                            settings=self.settings, divergence=self.divergence.state_dict(),
                            seconds={"selection": self.selection_seconds, "train": self._train_seconds()})
        self.context.barrier()
