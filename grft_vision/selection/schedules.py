"""When the chosen entries change during training: static, dynamic (SPEFT §3.4), incremental (ID3 §3.2).

- ``static`` (default, GRFT/GPS): chosen once before training.
- ``dynamic`` (SPEFT): every ``schedule_interval`` optimizer steps the current update becomes frozen entries of
  the adapter (changes that no longer train, folded into the weight while the adapter is active, see
  :mod:`grft_vision.tuner.structures`), the scores are recomputed on
  ``schedule_batches`` batches of training data with the merged weights, and the same budget is chosen anew;
  the optimizer state of entries that stay chosen is carried over, that of new entries starts at zero.
- ``incremental`` (ID3's increment-S): training starts with nothing chosen; at every event (every
  ``schedule_interval`` steps, from step 0) each layer unmasks its share of a uniform scheduler — after event
  ``e`` of ``E`` a layer holds ``floor(B_l * e / E)`` units of its budget ``B_l`` — picking the best-scoring
  units not chosen yet. Chosen units keep their values and optimizer state. :attr:`IncrementalSchedule.updates`
  counts the entry updates performed, ID3's ``U = sum_t |Lambda_t|``.

Between events nothing dense exists: scores (one dense gradient buffer per weight) live only during an event.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import GRFTConfig
from ..tuner.layer import GRFTLayer, grft_layers
from .features import BatchFeatures
from .gradients import compute_scores
from .subsets import subset_loader
from .topk import choose_indices

__all__ = ["MaskSchedule", "DynamicSchedule", "IncrementalSchedule", "create_schedule", "remap_optimizer_state",
           "reselect"]


def remap_optimizer_state(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
                          mapping: torch.Tensor) -> None:
    """Put ``new`` in place of ``old`` in ``optimizer``, carrying the per-entry state of kept entries.

    ``mapping[i]`` is the position in ``old`` (flattened) of entry ``i`` of ``new``, or -1 for a new entry
    (its state starts at zero). Scalar state such as Adam's ``step`` is kept.
    """
    for group in optimizer.param_groups:
        group["params"] = [new if param is old else param for param in group["params"]]
    state = optimizer.state.pop(old, None)
    if not state:
        return
    kept = mapping >= 0
    carried = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            fresh = torch.zeros(new.shape, dtype=value.dtype, device=value.device)
            fresh.view(-1)[kept] = value.reshape(-1)[mapping[kept]]
            carried[key] = fresh
        else:
            carried[key] = value
    optimizer.state[new] = carried


def _fold(update, positions: torch.Tensor, values: torch.Tensor) -> None:
    """Add ``values`` at flat weight ``positions`` to the update's frozen entries (summing where they meet)."""
    index, inverse = torch.unique(torch.cat([update.frozen_index, positions]), return_inverse=True)
    summed = torch.zeros(len(index), device=index.device).index_add_(
        0, inverse, torch.cat([update.frozen_value, values.float().to(index.device)]))
    update.set_frozen(index, summed)


def reselect(layer: GRFTLayer, indices: torch.Tensor, *, keep: bool) -> torch.Tensor:
    """Move the active adapter's update of ``layer`` to newly chosen entries.

    Args:
        layer: a wrapped layer with an active update.
        indices: the new chosen entries (same structure).
        keep: True (incremental): entries chosen before and now keep their value. False (dynamic, as SPEFT):
            the whole update first becomes frozen entries and the new update starts from zero.

    Returns:
        For every entry of the new update (flattened), its position in the old flattened update, or -1.
        Used to carry optimizer state over.
    """
    update = layer.update
    old_positions = update.scatter(torch.arange(1, update.delta.numel() + 1, device=update.delta.device)
                                   .view(update.delta.shape)) - 1
    old_values = update.delta.detach().flatten()
    with layer.unwritten():
        if not keep:
            _fold(update, update.positions().flatten(), old_values)
        update.set_indices(indices)
        mapping = update.extract(old_positions).flatten()
        if keep:
            with torch.no_grad():
                kept = mapping >= 0
                update.delta.view(-1)[kept] = old_values[mapping[kept]]
    return mapping


def _adapter_layers(model: nn.Module) -> list[tuple[str, GRFTLayer]]:
    """The wrapped layers the active adapter has an update in."""
    return [(name, layer) for name, layer in grft_layers(model) if layer.update is not None]


class MaskSchedule:
    """The static schedule, and the shared machinery of the others.

    Args:
        model: the wrapped model.
        config: its GRFT config (``schedule_interval``, ``schedule_batches``, the score settings).
        loader: the selection data (``apply_grft``'s kind of loader); unused by the static schedule.
        features, device, amp: as for :func:`compute_scores`.
    """

    def __init__(self, model: nn.Module, config: GRFTConfig, loader: DataLoader | None = None, *,
                 features: BatchFeatures | None = None, device: torch.device | None = None, amp: bool = True):
        self.model, self.config, self.loader = model, config, loader
        self.options = {"features": features, "device": device, "amp": amp, "progress": False}
        self.events = 0
        self.updates = 0

    def due(self, step: int) -> bool:
        return False

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Called before optimizer step ``step`` (0-based); returns True when the chosen entries changed."""
        changed = self.due(step)
        if changed:
            self._event(optimizer)
            self.events += 1
        self.updates += sum(layer.delta.numel() for _, layer in _adapter_layers(self.model))
        return changed

    def _event(self, optimizer: torch.optim.Optimizer) -> None:
        raise NotImplementedError

    def _scores(self) -> dict[str, torch.Tensor]:
        """Scores of every wrapped weight on ``schedule_batches`` fresh batches of the selection data."""
        batch_size = self.config.selection_batch_size or self.loader.batch_size
        count = min(len(self.loader.dataset), self.config.schedule_batches * batch_size)
        seed = self.config.selection_seed + self.events + 1
        sample = torch.randperm(len(self.loader.dataset), generator=torch.Generator().manual_seed(seed))[:count]
        config = GRFTConfig.from_dict({**self.config.to_dict(), "num_subsets": 1, "selection_seed": seed})
        batches = subset_loader(self.loader, sample, seed, batch_size)
        return compute_scores(self.model, batches, config, **self.options).scores

    def _move(self, name: str, indices: torch.Tensor, keep: bool, optimizer: torch.optim.Optimizer) -> None:
        layer = self.model.get_submodule(name)
        old = layer.delta
        mapping = reselect(layer, indices, keep=keep)
        remap_optimizer_state(optimizer, old, layer.delta, mapping)

    def state_dict(self) -> dict[str, Any]:
        return {"events": self.events, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events, self.updates = state["events"], state["updates"]


class DynamicSchedule(MaskSchedule):
    """SPEFT's dynamic masks: re-select the same number of units every ``schedule_interval`` steps."""

    def due(self, step: int) -> bool:
        return step > 0 and step % self.config.schedule_interval == 0

    def _event(self, optimizer: torch.optim.Optimizer) -> None:
        scores = self._scores()
        for name, layer in _adapter_layers(self.model):
            units = layer.indices.shape[-1]
            groups = getattr(layer.base_layer, "groups", 1)
            indices = choose_indices(scores[f"{name}.weight"], layer.structure, units, groups=groups, layer_name=name)
            self._move(name, indices, keep=False, optimizer=optimizer)


class IncrementalSchedule(MaskSchedule):
    """ID3's increment-S: unmask every layer's budget step by step with a uniform scheduler.

    Args:
        budgets: units per layer at the end (``B_l``).
        total_steps: optimizer steps of the whole run (``T``); events happen every ``schedule_interval``.
    """

    def __init__(self, model: nn.Module, config: GRFTConfig, loader: DataLoader, budgets: dict[str, int],
                 total_steps: int, **options: Any) -> None:
        super().__init__(model, config, loader, **options)
        self.budgets = budgets
        self.total_events = max(1, math.ceil(total_steps / config.schedule_interval))

    def due(self, step: int) -> bool:
        return step % self.config.schedule_interval == 0 and self.events < self.total_events

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "budgets": dict(self.budgets)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.budgets = dict(state["budgets"])

    def target(self, name: str, event: int) -> int:
        """Units layer ``name`` holds after event ``event`` (1-based): ``floor(B_l * event / E)``."""
        return self.budgets[name] * event // self.total_events

    def _event(self, optimizer: torch.optim.Optimizer) -> None:
        scores = self._scores()
        for name, layer in _adapter_layers(self.model):
            wanted = self.target(name, self.events + 1)
            if wanted == layer.indices.shape[-1]:
                continue
            score = scores[f"{name}.weight"].clone()
            groups = getattr(layer.base_layer, "groups", 1)
            indices = choose_indices(_without(score, layer), layer.structure, wanted, groups=groups, layer_name=name)
            self._move(name, indices, keep=True, optimizer=optimizer)


def _without(score: torch.Tensor, layer) -> torch.Tensor:
    """``score`` with the layer's chosen entries moved to the top, so that they stay chosen."""
    top = score.max() + 1 if score.numel() else 0
    boosted = layer.scatter(torch.ones_like(layer.delta, dtype=torch.bool)).to(score.device)
    return torch.where(boosted, top + score.abs(), score)


def create_schedule(model: nn.Module, config: GRFTConfig, loader: DataLoader | None, *, total_steps: int,
                    budgets: dict[str, int] | None = None, **options: Any) -> MaskSchedule:
    """The schedule named by ``config.schedule`` for a wrapped model."""
    if config.schedule == "incremental":
        return IncrementalSchedule(model, config, loader, budgets or {}, total_steps, **options)
    return _SCHEDULES[config.schedule](model, config, loader, **options)


_SCHEDULES = {"static": MaskSchedule, "dynamic": DynamicSchedule, "incremental": IncrementalSchedule}
