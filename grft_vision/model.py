"""Turning a model into a GRFT model and back: target discovery, wrapping, merging, unloading.

``apply_grft`` walks the model, picks every targeted ``nn.Linear`` / ``nn.Conv2d`` (the head excluded),
chooses its rows / columns / entries from the scores, replaces it in place by a wrapper from
:mod:`grft_vision.layers`, and marks the trainable set (:mod:`grft_vision.trainable`).
``merge_grft`` folds the updates back and removes every wrapper, leaving the plain model.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .anatomy import find_target_layers, grft_layers, head_module_names
from .config import GRFTConfig, resolve_config
from .layers import wrap_layer
from .selection.budget import allocate_units
from .selection.gradients import compute_scores
from .selection.record import LayerSelection, SelectionRecord
from .selection.topk import SelectionError, choose_indices
from .trainable import mark_trainable

__all__ = ["apply_grft", "merge_grft", "unload_grft", "wrap_with_indices"]


def _check_score(name: str, layer: nn.Module, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    key = f"{name}.weight"
    if key not in scores:
        raise SelectionError(f"scores has no entry for {key!r}. Compute scores for every targeted layer "
                             f"(grft_vision.selection) or exclude it with exclude_modules=['{name}'].")
    score = scores[key]
    if tuple(score.shape) != tuple(layer.weight.shape):
        raise SelectionError(f"score for {key!r} has shape {tuple(score.shape)}, but the weight has shape "
                             f"{tuple(layer.weight.shape)}; scores must match the weight they rank.")
    return score


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)


def wrap_with_indices(model: nn.Module, indices: Mapping[str, torch.Tensor], structures: Mapping[str, str],
                      config: GRFTConfig) -> nn.Module:
    """Wrap the named layers with given indices and structures, then mark the trainable set.

    The low-level step shared by :func:`apply_grft` and :func:`grft_vision.load_adapter`.
    """
    for name, layer_indices in indices.items():
        _replace_module(model, name, wrap_layer(model.get_submodule(name), structures[name], layer_indices))
    mark_trainable(model, config, head_module_names(model, config.head_modules))
    model.grft_config = config
    return model


def apply_grft(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor] | None = None,
    config: GRFTConfig | Mapping[str, Any] | None = None,
    *,
    dataloader: Iterable[Any] | None = None,
    **selection_options: Any,
) -> nn.Module:
    """Wrap every targeted layer of ``model`` in place so that only the chosen entries train.

    Either pass ``scores`` or a ``dataloader``: with a loader, the scores are computed first by
    :func:`grft_vision.selection.compute_scores` (SupCon gradients on the lowest-loss subset).

    Args:
        model: a timm model or any ``nn.Module`` with ``nn.Linear`` / ``nn.Conv2d`` layers.
        scores: per-parameter importance keyed by weight name (``"blocks.0.attn.qkv.weight"``), each of
            the weight's shape; the top-k rows / columns / per-row entries are chosen
            (:func:`grft_vision.selection.choose_indices`).
        config: a :class:`GRFTConfig` or a mapping of its fields; None for the defaults.
        dataloader: training data yielding ``(images, labels)``, used to compute the scores.
        **selection_options: passed to :func:`~grft_vision.selection.compute_scores` (``features``,
            ``device``, ``amp``, ``progress``).

    Returns:
        The same model object, with wrappers in place, ``requires_grad`` set per the trainable-set rules,
        the config stored as ``model.grft_config``, a :class:`~grft_vision.selection.SelectionRecord` as
        ``model.grft_selection`` and the units per layer as ``model.grft_budgets`` (with
        ``schedule='incremental'`` every layer starts with none chosen and the schedule unmasks its budget).

    Raises:
        SelectionError: a score is missing or has the wrong shape, k exceeds a layer's dimension, or
            the selection data is unusable.
        ValueError: neither or both of scores / dataloader, no layer targeted, or the model is already wrapped.
    """
    config = resolve_config(config)
    if (scores is None) == (dataloader is None):
        raise ValueError("apply_grft needs exactly one of scores= (weight name -> importance tensor) or "
                         "dataloader= (training batches to compute the scores from).")
    record = SelectionRecord(config.structure, config.k)
    if dataloader is not None:
        result = compute_scores(model, dataloader, config, **selection_options)
        scores = result.scores
        record = SelectionRecord(config.structure, config.k, config.num_subsets, result.subset_losses,
                                 result.chosen_subset, result.subset_size, result.seconds)
    targets = find_target_layers(model, config)
    checked = {f"{name}.weight": _check_score(name, layer, scores) for name, layer in targets.items()}
    structures = {name: config.layer_structure(layer) for name, layer in targets.items()}
    units = allocate_units(targets, checked, structures, config)
    indices = {}
    incremental = config.schedule == "incremental"  # starts from nothing; the schedule unmasks the budget
    for name, layer in targets.items():
        if units[name] == 0:  # a global or entropy budget left this layer frozen
            continue
        groups = getattr(layer, "groups", 1)
        score = checked[f"{name}.weight"]
        indices[name] = choose_indices(score, structures[name], 0 if incremental else units[name], groups=groups,
                                       layer_name=name)
        record.layers.append(LayerSelection.build(name, structures[name], score, indices[name], groups))
    wrap_with_indices(model, indices, {name: structures[name] for name in indices}, config)
    model.grft_selection = record
    model.grft_budgets = {name: units[name] for name in indices}
    return model


def _unwrap(model: nn.Module, merge: bool) -> nn.Module:
    for name, layer in list(grft_layers(model)):
        _replace_module(model, name, layer.merge() if merge else layer.unload())
    for attribute in ("grft_config", "grft_selection", "grft_budgets"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model


def merge_grft(model: nn.Module) -> nn.Module:
    """Fold every update into its weight and remove every wrapper.

    Returns the same model object, now a plain model: a timm model stays a timm model, with the
    original ``state_dict`` keys and no inference overhead.
    """
    return _unwrap(model, merge=True)


def unload_grft(model: nn.Module) -> nn.Module:
    """Remove every wrapper without merging, restoring the original weights."""
    return _unwrap(model, merge=False)
