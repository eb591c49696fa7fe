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

import math

import torch
from torch import nn

from ..config import GRFTConfig
from .record import candidate_scores
from .topk import candidate_count, resolve_k

__all__ = ["unit_cost", "allocate_units", "weight_entropy"]


def unit_cost(weight_shape: tuple[int, ...], structure: str, groups: int = 1) -> int:
    """Parameters added by one unit of ``structure`` in a weight of ``weight_shape``."""
    out_features, taps = weight_shape[0], math.prod(weight_shape[2:])
    if structure == "row":
        return math.prod(weight_shape[1:])
    if structure == "column":
        return out_features // groups * taps
    return out_features  # tap_column, sparse


def weight_entropy(weight: torch.Tensor, bins: int = 256) -> float:
    """Shannon entropy (nats) of the histogram of a weight's values over ``bins`` equal-width bins."""
    values = weight.detach().float().flatten().cpu()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return 0.0
    probabilities = torch.histc(values, bins=bins, min=low, max=high) / values.numel()
    probabilities = probabilities[probabilities > 0]
    return float(-(probabilities * probabilities.log()).sum())


def _unit_values(score: torch.Tensor, structure: str, groups: int) -> torch.Tensor:
    """Value of a layer's units in the order they would be taken, score per parameter, non-increasing."""
    values = candidate_scores(score, structure, groups)
    if structure == "sparse":  # unit m = every row's m-th best entry
        return values.sort(dim=1, descending=True).values.mean(0)
    return values.sort(descending=True).values / unit_cost(tuple(score.shape), structure, groups)


def allocate_units(layers: dict[str, nn.Module], scores: dict[str, torch.Tensor], structures: dict[str, str],
                   config: GRFTConfig) -> dict[str, int]:
    """Units per layer under ``config.budget`` (see the module docstring); names as in ``layers``."""
    groups = {name: getattr(layer, "groups", 1) for name, layer in layers.items()}
    shapes = {name: tuple(layer.weight.shape) for name, layer in layers.items()}
    available = {name: candidate_count(shapes[name], structures[name], groups[name]) for name in layers}
    costs = {name: unit_cost(shapes[name], structures[name], groups[name]) for name in layers}
    uniform = {name: resolve_k(config.k, available[name], name, structures[name], config.clamp_k) for name in layers}
    if config.budget == "uniform":
        return uniform
    total = _total_budget(config, layers, uniform, costs)
    if config.budget == "entropy":
        entropies = {name: weight_entropy(layer.weight, config.entropy_bins) for name, layer in layers.items()}
        normaliser = sum(entropies.values()) or 1.0
        return {name: min(available[name], int(total * entropies[name] / normaliser // costs[name]))
                for name in layers}
    return _global_units(layers, scores, structures, groups, costs, total)


def _total_budget(config: GRFTConfig, layers: dict[str, nn.Module], uniform: dict[str, int],
                  costs: dict[str, int]) -> int:
    if config.budget_params is not None:
        return config.budget_params
    if config.budget_fraction is not None:
        return int(config.budget_fraction * sum(layer.weight.numel() for layer in layers.values()))
    return sum(uniform[name] * costs[name] for name in layers)


def _global_units(layers: dict[str, nn.Module], scores: dict[str, torch.Tensor], structures: dict[str, str],
                  groups: dict[str, int], costs: dict[str, int], total: int) -> dict[str, int]:
    names = list(layers)
    values, owners = [], []
    for index, name in enumerate(names):
        unit_values = _unit_values(scores[f"{name}.weight"], structures[name], groups[name]).double().cpu()
        values.append(unit_values)
        owners.append(torch.full((len(unit_values),), index, dtype=torch.long))
    order = torch.sort(torch.cat(values), descending=True, stable=True).indices
    owner_of = torch.cat(owners)[order]
    spent = torch.tensor([costs[name] for name in names], dtype=torch.long)[owner_of].cumsum(0)
    taken = owner_of[spent <= total]
    counts = torch.bincount(taken, minlength=len(names))
    return {name: int(counts[index]) for index, name in enumerate(names)}
