"""Turning a model into a GRFT model and back: target discovery, wrapping, merging, unloading.

``apply_grft`` walks the model, picks every targeted ``nn.Linear`` / ``nn.Conv2d`` (the head excluded),
chooses its rows / columns / entries from the scores, replaces it in place by a wrapper from
:mod:`grft_vision.layers`, and marks the trainable set (:mod:`grft_vision.trainable`).
``merge_grft`` folds the updates back and removes every wrapper, leaving the plain model.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn

from .anatomy import architecture_name, grft_layers, head_module_names, in_modules, matches_any
from .config import GRFTConfig
from .layers import GRFTLayer, wrap_layer
from .selection.topk import SelectionError, choose_indices
from .trainable import mark_trainable

__all__ = ["apply_grft", "merge_grft", "unload_grft", "is_grft_model", "find_target_layers", "resolve_config",
           "wrap_with_indices"]

_logger = logging.getLogger(__name__)


def resolve_config(config: GRFTConfig | Mapping[str, Any] | None) -> GRFTConfig:
    """Accept a :class:`GRFTConfig`, a plain mapping of its fields, or None (the defaults)."""
    if config is None:
        return GRFTConfig()
    if isinstance(config, GRFTConfig):
        return config
    return GRFTConfig.from_dict(config)


def find_target_layers(model: nn.Module, config: GRFTConfig) -> dict[str, nn.Module]:
    """The ``nn.Linear`` / ``nn.Conv2d`` modules that ``config`` targets, by module name.

    The head, modules matched by ``exclude_modules`` and the projections owned by
    ``nn.MultiheadAttention`` (which reads their weights directly, bypassing any wrapper) are skipped.

    Raises:
        ValueError: the model already holds GRFT layers, or no layer is targeted.
    """
    if is_grft_model(model):
        raise ValueError("the model already has GRFT layers; call merge_grft(model) or unload_grft(model) "
                         "before applying GRFT again.")
    head_names = head_module_names(model, config.head_modules)
    targets = {}
    attention_owned = {f"{name}.{child}" if name else child
                       for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)
                       for child, _ in module.named_children()}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or in_modules(name, head_names):
            continue
        if not matches_any(name, config.target_modules) or matches_any(name, config.exclude_modules):
            continue
        if name in attention_owned:
            _logger.warning("GRFT skips %s: nn.MultiheadAttention reads its weight directly.", name)
            continue
        targets[name] = module
    if not targets:
        raise ValueError(f"no nn.Linear / nn.Conv2d of {architecture_name(model)} matches "
                         f"target_modules={config.target_modules} minus exclude_modules={config.exclude_modules} "
                         f"(head {head_names} excluded). Check the patterns against model.named_modules().")
    return targets


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
) -> nn.Module:
    """Wrap every targeted layer of ``model`` in place so that only the chosen entries train.

    Args:
        model: a timm model or any ``nn.Module`` with ``nn.Linear`` / ``nn.Conv2d`` layers.
        scores: per-parameter importance keyed by weight name (``"blocks.0.attn.qkv.weight"``), each of
            the weight's shape; the top-k rows / columns / per-row entries are chosen
            (:func:`grft_vision.selection.topk.choose_indices`).
        config: a :class:`GRFTConfig` or a mapping of its fields; None for the defaults.

    Returns:
        The same model object, with wrappers in place, ``requires_grad`` set per the trainable-set rules,
        and the config stored as ``model.grft_config``.

    Raises:
        SelectionError: a score is missing or has the wrong shape, or k exceeds a layer's dimension.
        ValueError: no layer is targeted, or the model is already wrapped.
    """
    config = resolve_config(config)
    if scores is None:
        raise ValueError("apply_grft needs scores: a mapping from weight names to importance tensors.")
    targets = find_target_layers(model, config)
    indices = {}
    for name, layer in targets.items():
        score = _check_score(name, layer, scores)
        groups = getattr(layer, "groups", 1)
        indices[name] = choose_indices(score, config.structure, config.k, groups=groups, layer_name=name,
                                       clamp=config.clamp_k)
    return wrap_with_indices(model, indices, dict.fromkeys(indices, config.structure), config)


def _unwrap(model: nn.Module, merge: bool) -> nn.Module:
    for name, layer in list(grft_layers(model)):
        _replace_module(model, name, layer.merge() if merge else layer.base_layer)
    if hasattr(model, "grft_config"):
        del model.grft_config
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


def is_grft_model(model: nn.Module) -> bool:
    """True when ``model`` holds at least one GRFT wrapper."""
    return any(isinstance(module, GRFTLayer) for module in model.modules())
