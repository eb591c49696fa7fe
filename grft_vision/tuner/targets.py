"""Which layers an adapter targets, and whether k fits every one of them (checked before any score is computed).

A target is an ``nn.Linear`` / ``nn.Conv2d`` whose name matches ``target_modules`` and not
``exclude_modules``, outside the classification head; on a wrapped model a wrapped layer is a candidate
under its own name and stands for its base layer. The projections owned by ``nn.MultiheadAttention`` are
skipped: it reads their weights directly, bypassing any wrapper.
"""
from __future__ import annotations

import logging

from torch import nn

from ..config import GRFTConfig
from ..errors import ConfigError
from .anatomy import architecture_name, head_module_names, in_modules, logical_modules, matches_any
from .quantized import weight_shape
from .structures import STRUCTURES

__all__ = ["find_target_layers", "check_targets"]

_logger = logging.getLogger(__name__)


def find_target_layers(model: nn.Module, config: GRFTConfig) -> dict[str, nn.Module]:
    """The ``nn.Linear`` / ``nn.Conv2d`` modules that ``config`` targets, by module name (see the module docstring).

    Raises:
        ConfigError: no layer is targeted, or the head patterns match nothing.
    """
    head_names = head_module_names(model, config.head_modules)
    targets = {}
    attention_owned = {f"{name}.{child}" if name else child
                       for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)
                       for child, _ in module.named_children()}
    for name, module in logical_modules(model):
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or in_modules(name, head_names):
            continue
        if not matches_any(name, config.target_modules) or matches_any(name, config.exclude_modules):
            continue
        if name in attention_owned:
            _logger.warning("GRFT skips %s: nn.MultiheadAttention reads its weight directly.", name)
            continue
        targets[name] = module
    if not targets:
        raise ConfigError(f"no nn.Linear / nn.Conv2d of {architecture_name(model)} matches "
                          f"target_modules={config.target_modules} minus exclude_modules={config.exclude_modules} "
                          f"(head {head_names} excluded). Check the patterns against model.named_modules().")
    return targets


def check_targets(model: nn.Module, config: GRFTConfig) -> dict[str, nn.Module]:
    """The layers ``config`` targets (:func:`find_target_layers`), once k is known to fit every one of them.

    Raises:
        ConfigError: no layer is targeted, or the head patterns match nothing.
        SelectionError: k is larger than a targeted layer's dimension.
    """
    targets = find_target_layers(model, config)
    for name, layer in targets.items():
        structure = STRUCTURES.get(config.layer_structure(layer))
        structure.resolve_count(config.k, weight_shape(layer), getattr(layer, "groups", 1), layer_name=name,
                                clamp=config.clamp_k)
    return targets
