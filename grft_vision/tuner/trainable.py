"""Which tensors an adapter trains, and how many parameters that is.

The trainable set follows the GRFT/GPS convention (``shared/reference/benchmark-protocols.md`` §3) with
each rule a :class:`~grft_vision.config.GRFTConfig` switch: the chosen entries of every targeted weight
(``delta``), the biases of targeted layers (``bias_delta``), the classification head and LayerScale gammas
train; norms, position embeddings and class tokens stay frozen. Every tensor trained in full is owned by
the adapter (:mod:`grft_vision.tuner.owned`), as are the running statistics of BatchNorm layers (they
change in train mode even when the layer is frozen): the pre-trained values are never overwritten.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from torch import nn

from ..config import GRFTConfig
from .anatomy import (base_tensors, grft_layers, in_modules, is_norm, logical_tensors, matches_any,
                      original_name)
from .owned import owned_tensors
from .quantized import quantized_layers, weight_numel

__all__ = ["fully_trained_tensors", "tracked_statistics", "set_trainable", "adapter_parameters", "LayerReport",
           "TrainableReport", "trainable_parameters_report", "print_trainable_parameters", "get_nb_trainable_parameters"]

_POS_EMBED_NAMES = ("pos_embed", "absolute_pos_embed")
_TOKEN_NAMES = ("cls_token", "reg_token", "dist_token")
_LAYER_SCALE = re.compile(r"gamma(_\d+)?")
_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _fully_trainable(module: nn.Module, module_name: str, param_name: str, config: GRFTConfig,
                     head_names: list[str]) -> bool:
    if config.train_head and in_modules(module_name, head_names):
        return True
    if config.train_norm and is_norm(module):
        return True
    if config.train_pos_embed and param_name in _POS_EMBED_NAMES:
        return True
    if config.train_tokens and param_name in _TOKEN_NAMES:
        return True
    if config.train_layer_scale and _LAYER_SCALE.fullmatch(param_name) and not is_norm(module):
        return True
    full_name = f"{module_name}.{param_name}" if module_name else param_name
    return matches_any(full_name, config.extra_trainable)


def fully_trained_tensors(model: nn.Module, config: GRFTConfig,
                          head_names: list[str]) -> list[tuple[str, nn.Module, str]]:
    """``(module name, owner module, parameter name)`` of every parameter ``config`` trains in full.

    Parameters of wrapped layers are never trained in full (their biases train as ``bias_delta``).
    """
    return [(module_name, module, name) for module_name, module, name, is_buffer in logical_tensors(model)
            if not is_buffer and _fully_trainable(module, module_name, name, config, head_names)]


def tracked_statistics(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(module name, BatchNorm module, buffer name)`` of every running statistic of the model."""
    return [(module_name, module, name) for module_name, module, name, is_buffer in logical_tensors(model)
            if is_buffer and isinstance(module, nn.modules.batchnorm._BatchNorm) and name in _STAT_BUFFERS]


def adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """The parameters adapter ``adapter_name`` trains, by readable name.

    Keys: ``<layer>.delta`` and ``<layer>.bias_delta`` of its updates, and the original names of the
    tensors it trains in full (``head.weight``, ``blocks.0.ls1.gamma``, ...).
    """
    parameters: dict[str, nn.Parameter] = {}
    for name, layer in grft_layers(model):
        update = layer.grft_updates[adapter_name] if adapter_name in layer.grft_updates else None
        if update is not None:
            parameters[f"{name}.delta"] = update.delta
            if update.bias_delta is not None:
                parameters[f"{name}.bias_delta"] = update.bias_delta
    for name, _, _, owned in owned_tensors(model):
        if not owned.is_buffer and adapter_name in owned.adapters:
            parameters[name] = owned.adapters[adapter_name]
    return parameters


def set_trainable(model: nn.Module, adapter_name: str | None) -> None:
    """``requires_grad`` True for exactly the parameters of ``adapter_name`` (None: nothing trains).

    Frozen tensors get ``requires_grad=False``, so autograd never computes a gradient for them and an
    optimizer built from ``filter(lambda p: p.requires_grad, model.parameters())`` holds no state for them.
    """
    model.requires_grad_(False)
    if adapter_name is not None:
        for param in adapter_parameters(model, adapter_name).values():
            param.requires_grad_(True)


@dataclass
class LayerReport:
    """One wrapped layer: its name, type, structure, weight shape, k, and parameter counts."""

    name: str
    layer_type: str
    structure: str
    weight_shape: tuple[int, ...]
    k: int
    trainable: int
    total: int


@dataclass
class TrainableReport:
    """Trainable vs total parameters of a model, with a per-layer table.

    ``total`` counts the parameters of the base model (GRFT updates are not extra capacity: they live
    inside existing weights); ``trainable`` counts the updates plus every fully trainable tensor, listed in
    ``fully_trainable`` under its own name (``blocks.0.attn.qkv.bias``, ``head.weight``).
    """

    trainable: int
    total: int
    layers: list[LayerReport] = field(default_factory=list)
    fully_trainable: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        """Trainable share of the base model, in percent."""
        return 100.0 * self.trainable / max(self.total, 1)

    def to_dict(self) -> dict:
        """Plain-Python form (for JSON and TensorBoard)."""
        return {**asdict(self), "percent": self.percent}

    def __str__(self) -> str:
        lines = [f"{'layer':<48} {'type':<7} {'structure':<9} {'shape':<22} {'k':>5} {'trainable':>10}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<48} {layer.layer_type:<7} {layer.structure:<9} "
                         f"{str(layer.weight_shape):<22} {layer.k:>5} {layer.trainable:>10,}")
        lines.append(f"fully trainable tensors: {len(self.fully_trainable)} "
                     f"({sum(self.fully_trainable.values()):,} parameters)")
        lines.append(f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                     f"trainable%: {self.percent:.4f}")
        return "\n".join(lines)


def trainable_parameters_report(model: nn.Module) -> TrainableReport:
    """Count the trainable parameters (``requires_grad``) against the base model's, per wrapped layer.

    On a wrapped model the trainable ones are the active adapter's; on a plain model, whatever requires grad.
    """
    layers = []
    for name, layer in grft_layers(model):
        update = layer.update
        if update is None:
            continue
        shape = layer.weight_shape
        layers.append(LayerReport(name, type(layer.base_layer).__name__, update.structure, shape,
                                  update.count, update.delta.numel() if update.delta.requires_grad else 0,
                                  math.prod(shape)))
    stored = {original_name(f"{name}.weight"): weight_numel(layer) for name, layer in quantized_layers(model)}
    total = sum(stored.get(name, tensor.numel()) for name, tensor in base_tensors(model).items())
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    active = getattr(getattr(model, "grft_state", None), "active", None)
    if active is not None:  # by the name of the tensor trained in full (a bias delta trains its layer's bias)
        fully = {name.removesuffix("_delta"): p.numel() for name, p in adapter_parameters(model, active).items()
                 if p.requires_grad and not name.endswith(".delta")}
    else:
        fully = {name: p.numel() for name, p in base_tensors(model).items() if p.requires_grad}
    return TrainableReport(trainable, total, layers, fully)


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable parameters, all parameters of the base model)``, as PEFT's ``get_nb_trainable_parameters``."""
    report = trainable_parameters_report(model)
    return report.trainable, report.total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's one-line summary: trainable params, all params, trainable%."""
    report = trainable_parameters_report(model)
    print(f"trainable params: {report.trainable:,} || all params: {report.total:,} || "
          f"trainable%: {report.percent:.4f}")
