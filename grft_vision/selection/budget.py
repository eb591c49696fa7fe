"""How many rows / columns / per-row entries each layer gets: uniform, global, or entropy-guided budgets.

A layer's *unit* is one candidate of its structure: a row (costs ``in/g*kh*kw`` parameters), a column
(``out/g*kh*kw``; a tap column costs ``out``), or, for ``sparse``, one more entry in every row (costs
``out``). A budget assigns every layer a count of units:

- ``uniform`` (GRFT, GPS): ``k`` units per layer (a count, or a fraction of the layer's candidates — SPEFT's
  local, per-layer density).
- ``global`` (SPEFT global): every unit of every layer is ranked by its score per parameter (its reduced
  score divided by its cost) and units are taken greedily from the top until the total budget is spent.
  Sparse units are ranked by the mean over rows of each row's next-best entry.
- ``entropy`` (GEM): layer ``l`` receives ``P * H_l / sum(H)`` parameters, where ``H_l`` is the Shannon
  entropy (nats) of the histogram of its weight values (``entropy_bins`` equal-width bins between the
  layer's minimum and maximum weight); more budget goes to layers whose values are more spread out. (The
  GEM paper's abstract gives the principle, not the formula; this is the formula chosen here.)

The total budget ``P`` is ``budget_params`` parameters, or ``budget_fraction`` of the targeted weights'
parameters, or by default exactly what the uniform budget with ``k`` would spend — so that methods compared
at "the same k" are compared at the same parameter count. A layer may receive 0 units; it then stays frozen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import GRFTConfig
from ..tuner.quantized import weight_numel, weight_shape
from ..tuner.structures import STRUCTURES

__all__ = ["unit_cost", "allocate_units", "weight_entropy"]


def unit_cost(weight_shape: tuple[int, ...], structure: str, groups: int = 1) -> int:
    """Parameters added by one unit of ``structure`` in a weight of ``weight_shape``."""
    return STRUCTURES.get(structure).unit_cost(tuple(weight_shape), groups)


def weight_entropy(weight: torch.Tensor, bins: int = 256) -> float:
    """Shannon entropy (nats) of the histogram of a weight's values over ``bins`` equal-width bins."""
    values = weight.detach().float().flatten().cpu()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return 0.0
    probabilities = torch.histc(values, bins=bins, min=low, max=high) / values.numel()
    probabilities = probabilities[probabilities > 0]
    return float(-(probabilities * probabilities.log()).sum())


@dataclass
class _Candidates:
    """The targeted layers as a budget sees them: structure class, groups, units available, cost of a unit,
    and the units ``k`` gives each (the uniform budget)."""

    layers: dict[str, nn.Module]
    classes: dict[str, type]
    groups: dict[str, int]
    available: dict[str, int]
    costs: dict[str, int]
    uniform: dict[str, int]


def allocate_units(layers: dict[str, nn.Module], scores: dict[str, torch.Tensor], structures: dict[str, str],
                   config: GRFTConfig) -> dict[str, int]:
    """Units per layer under ``config.budget`` (see the module docstring); names as in ``layers``."""
    classes = {name: STRUCTURES.get(structures[name]) for name in layers}
    groups = {name: getattr(layer, "groups", 1) for name, layer in layers.items()}
    shapes = {name: weight_shape(layer) for name, layer in layers.items()}
    candidates = _Candidates(
        layers, classes, groups,
        available={name: classes[name].candidate_count(shapes[name], groups[name]) for name in layers},
        costs={name: classes[name].unit_cost(shapes[name], groups[name]) for name in layers},
        uniform={name: classes[name].resolve_count(config.k, shapes[name], groups[name], layer_name=name,
                                                   clamp=config.clamp_k) for name in layers})
    return _ALLOCATORS[config.budget](candidates, scores, config)


def _total_budget(candidates: _Candidates, config: GRFTConfig) -> int:
    if config.budget_params is not None:
        return config.budget_params
    if config.budget_fraction is not None:
        return int(config.budget_fraction * sum(weight_numel(layer) for layer in candidates.layers.values()))
    return sum(candidates.uniform[name] * candidates.costs[name] for name in candidates.layers)


def _uniform_units(candidates: _Candidates, scores: dict[str, torch.Tensor], config: GRFTConfig) -> dict[str, int]:
    return candidates.uniform


def _entropy_units(candidates: _Candidates, scores: dict[str, torch.Tensor], config: GRFTConfig) -> dict[str, int]:
    total = _total_budget(candidates, config)
    entropies = {name: weight_entropy(layer.weight, config.entropy_bins) for name, layer in candidates.layers.items()}
    normaliser = sum(entropies.values()) or 1.0
    return {name: min(candidates.available[name], int(total * entropies[name] / normaliser // candidates.costs[name]))
            for name in candidates.layers}


def _global_units(candidates: _Candidates, scores: dict[str, torch.Tensor], config: GRFTConfig) -> dict[str, int]:
    total = _total_budget(candidates, config)
    names = list(candidates.layers)
    values, owners = [], []
    for index, name in enumerate(names):
        unit_values = candidates.classes[name].unit_values(scores[f"{name}.weight"], candidates.groups[name])
        values.append(unit_values.double().cpu())
        owners.append(torch.full((len(unit_values),), index, dtype=torch.long))
    order = torch.sort(torch.cat(values), descending=True, stable=True).indices
    owner_of = torch.cat(owners)[order]
    spent = torch.tensor([candidates.costs[name] for name in names], dtype=torch.long)[owner_of].cumsum(0)
    taken = owner_of[spent <= total]
    counts = torch.bincount(taken, minlength=len(names))
    return {name: int(counts[index]) for index, name in enumerate(names)}


_ALLOCATORS = {"uniform": _uniform_units, "global": _global_units, "entropy": _entropy_units}
