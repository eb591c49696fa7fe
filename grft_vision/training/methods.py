"""The training methods of a run, and the registry that names them: ``grft`` (the adapter), and the baselines
``full`` (full fine-tuning) and ``head`` (linear probe).

A :class:`Method` decides how a run makes its model trainable, how a checkpoint holds and restores what it
trains, and what the run writes at the end; the runner asks :data:`METHODS` and never branches on a name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.utils.data import Dataset

from ..api import apply_grft
from ..config import GRFTConfig
from ..errors import ConfigError
from ..files import atomic_write
from ..io.adapter_format import adapter_state, adapter_tensors
from ..io.adapters import apply_adapter_state
from ..registry import Registry
from ..selection.schedules import MaskSchedule, create_schedule
from ..tuner.anatomy import head_module_names
from ..tuner.layer import grft_layers
from ..tuner.model import inject
from ..tuner.state import DEFAULT_ADAPTER, grft_state
from ..tuner.targets import check_targets
from .distributed import DistributedContext
from .monitor import Monitor

if TYPE_CHECKING:  # the settings validate a method name against this module's registry
    from .config import TrainConfig
    from .task import Task

__all__ = ["Method", "GRFTMethod", "FullFineTuning", "HeadOnly", "METHODS", "RunSetup"]


@dataclass
class RunSetup:
    """What a method works with: the run's model, settings, task, data, process and outputs."""

    model: nn.Module
    train: "TrainConfig"
    grft: GRFTConfig
    task: "Task"
    train_set: Dataset
    context: DistributedContext
    run_dir: Path
    monitor: Monitor


class Method:
    """How a run trains (see the module docstring). Subclasses set :attr:`name` and override what differs."""

    name: str
    output_name: str  # the file the run writes its trained tensors to
    selects = False  # preparing a new run selects entries (its time is the run's selection time)
    trains_base = False  # trains the frozen base's own weights (FSDP shards only a frozen base)

    def check(self, model: nn.Module, grft: GRFTConfig) -> None:
        """Refuse settings that do not fit the model before anything is written (patterns, k)."""
        head_module_names(model, grft.head_modules)

    def prepare(self, setup: RunSetup) -> None:
        """Make the model trainable for a new run."""
        raise NotImplementedError

    def restore(self, setup: RunSetup, checkpoint: dict[str, Any]) -> None:
        """Make the model trainable as the checkpoint's run made it (before its values are loaded)."""
        self.prepare(setup)

    def mask_schedule(self, setup: RunSetup, total_steps: int) -> MaskSchedule | None:
        """What changes the trainable entries during training (None: nothing)."""
        return None

    def checkpoint_state(self, model: nn.Module) -> dict[str, Any]:
        """``{"adapter": (tensors, metadata) or None, "trainable": {name: tensor} or None}`` for a checkpoint."""
        raise NotImplementedError

    def load_values(self, model: nn.Module, checkpoint: dict[str, Any], source: str) -> None:
        """Copy a checkpoint's trained values into the model's tensors (in place)."""
        raise NotImplementedError

    def save_outputs(self, model: nn.Module, run_dir: Path, state: dict[str, Any]) -> None:
        """Write the run's trained tensors (``state`` is :meth:`checkpoint_state`'s)."""
        raise NotImplementedError


class GRFTMethod(Method):
    """GRFT: select on the main process, broadcast the indices, wrap identically on every process; the adapter
    is what a checkpoint holds and what the run writes (``adapter.safetensors``)."""

    name = "grft"
    output_name = "adapter.safetensors"
    selects = True

    def __init__(self) -> None:
        self._metadata: dict[str, str] | None = None  # under FSDP, taken before the base is sharded

    def check(self, model: nn.Module, grft: GRFTConfig) -> None:
        check_targets(model, grft)

    def prepare(self, setup: RunSetup) -> None:
        chosen = None
        if setup.context.is_main:
            task, train, grft = setup.task, setup.train, setup.grft
            apply_grft(setup.model, config=grft, dataloader=task.selection_loader(train, grft, setup.train_set),
                       features=task.selection_features(grft), device=setup.context.device, amp=train.amp,
                       progress=not train.quiet)
            record = grft_state(setup.model).selection
            record.save_json(setup.run_dir / "selection.json")
            setup.monitor.selection(record)
            chosen = {name: (layer.structure, layer.indices.cpu()) for name, layer in grft_layers(setup.model)}
        chosen = setup.context.broadcast(chosen)
        if not setup.context.is_main:
            inject(setup.model, DEFAULT_ADAPTER, {n: i for n, (_, i) in chosen.items()},
                   {n: s for n, (s, _) in chosen.items()}, setup.grft)
        setup.model.to(setup.context.device)
        self._remember_metadata(setup)

    def restore(self, setup: RunSetup, checkpoint: dict[str, Any]) -> None:
        tensors, metadata = checkpoint["adapter"]
        structures = json.loads(metadata["structures"])
        inject(setup.model, DEFAULT_ADAPTER, {n: tensors[f"{n}.grft_indices"].long() for n in structures}, structures,
               setup.grft)
        setup.model.to(setup.context.device)
        self._remember_metadata(setup)

    def mask_schedule(self, setup: RunSetup, total_steps: int) -> MaskSchedule | None:
        """The dynamic or incremental schedule of the chosen entries (None when they are static).

        Raises:
            ConfigError: a schedule in a distributed run (it replaces trainable tensors, which DDP / FSDP forbid).
        """
        grft = setup.grft
        if grft.schedule == "static":
            return None
        if setup.context.distributed:
            wrapper = "FSDP" if setup.train.fsdp else "DistributedDataParallel"
            raise ConfigError(f"schedule={grft.schedule!r} replaces the trainable tensors during training, which "
                              f"{wrapper} does not allow; run it in a single process.")
        return create_schedule(setup.model, grft, setup.task.selection_loader(setup.train, grft, setup.train_set),
                               total_steps=total_steps, budgets=grft_state(setup.model).budgets,
                               features=setup.task.selection_features(grft), device=setup.context.device,
                               amp=setup.train.amp)

    def _remember_metadata(self, setup: RunSetup) -> None:
        if setup.train.fsdp:  # the backbone's fingerprints are taken before it is sharded (the base never changes)
            self._metadata = adapter_state(setup.model)[1]

    def checkpoint_state(self, model: nn.Module) -> dict[str, Any]:
        if self._metadata is None:
            return {"adapter": adapter_state(model), "trainable": None}
        return {"adapter": (adapter_tensors(model, grft_state(model).active), self._metadata), "trainable": None}

    def load_values(self, model: nn.Module, checkpoint: dict[str, Any], source: str) -> None:
        apply_adapter_state(model, *checkpoint["adapter"], source=source)

    def save_outputs(self, model: nn.Module, run_dir: Path, state: dict[str, Any]) -> None:
        tensors, metadata = state["adapter"]
        with atomic_write(run_dir / self.output_name, "wb") as handle:
            handle.write(safetensors_bytes(tensors, metadata=metadata))


class _DenseBaseline(Method):
    """A baseline that trains tensors of the model itself; its checkpoint and output hold them by name."""

    output_name = "trainable.safetensors"

    def checkpoint_state(self, model: nn.Module) -> dict[str, Any]:
        return {"adapter": None, "trainable": {name: param.detach().cpu() for name, param in model.named_parameters()
                                               if param.requires_grad}}

    def load_values(self, model: nn.Module, checkpoint: dict[str, Any], source: str) -> None:
        with torch.no_grad():
            for name, value in checkpoint["trainable"].items():
                model.get_parameter(name).copy_(value)

    def save_outputs(self, model: nn.Module, run_dir: Path, state: dict[str, Any]) -> None:
        with atomic_write(run_dir / self.output_name) as handle:
            handle.write(safetensors_bytes({k: v.contiguous() for k, v in state["trainable"].items()}))


class FullFineTuning(_DenseBaseline):
    """Every parameter trains."""

    name = "full"
    trains_base = True

    def prepare(self, setup: RunSetup) -> None:
        setup.model.requires_grad_(True)


class HeadOnly(_DenseBaseline):
    """The classification head alone trains (a linear probe)."""

    name = "head"

    def prepare(self, setup: RunSetup) -> None:
        setup.model.requires_grad_(False)
        for name in head_module_names(setup.model, setup.grft.head_modules):
            setup.model.get_submodule(name).requires_grad_(True)


METHODS: Registry[type[Method]] = Registry("method")
for _method in (GRFTMethod, FullFineTuning, HeadOnly):
    METHODS.register(_method.name, _method)
