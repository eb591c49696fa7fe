"""Which tensors train, and how many parameters that is.

The trainable set follows the GRFT/GPS convention (``shared/reference/benchmark-protocols.md`` §3) with
each rule a :class:`~grft_vision.config.GRFTConfig` switch: the chosen entries of every targeted weight
(``delta``), the biases of targeted layers, the classification head and LayerScale gammas train; norms,
position embeddings and class tokens stay frozen.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from torch import nn

from .anatomy import grft_layers, in_modules, is_norm, matches_any, original_name
from .config import GRFTConfig
from .layers import GRFTLayer

__all__ = ["mark_trainable", "LayerReport", "TrainableReport", "trainable_parameters_report",
           "print_trainable_parameters"]

_POS_EMBED_NAMES = ("pos_embed", "absolute_pos_embed")
_TOKEN_NAMES = ("cls_token", "reg_token", "dist_token")
_LAYER_SCALE = re.compile(r"gamma(_\d+)?")


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
    return matches_any(original_name(full_name), config.extra_trainable)


def mark_trainable(model: nn.Module, config: GRFTConfig, head_names: list[str]) -> None:
    """Set ``requires_grad`` on every parameter of a wrapped model according to ``config``.

    Frozen tensors get ``requires_grad=False``, so autograd never computes a gradient for them and an
    optimizer built from ``filter(lambda p: p.requires_grad, model.parameters())`` holds no state for them.
    """
    model.requires_grad_(False)
    wrapped = []
    for name, layer in grft_layers(model):
        wrapped.append(name)
        layer.delta.requires_grad_(True)
        if config.train_bias and layer.base_layer.bias is not None:
            layer.base_layer.bias.requires_grad_(True)
    for module_name, module in model.named_modules():
        if isinstance(module, GRFTLayer) or in_modules(module_name, wrapped):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if _fully_trainable(module, module_name, param_name, config, head_names):
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
    inside existing weights); ``trainable`` counts the updates plus every fully trainable tensor.
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
    """Count trainable and total parameters of a (wrapped) model, per layer."""
    layers, delta_ids = [], set()
    for name, layer in grft_layers(model):
        delta_ids.add(id(layer.delta))
        weight = layer.base_layer.weight
        layers.append(LayerReport(name, type(layer.base_layer).__name__, layer.structure, tuple(weight.shape),
                                  int(layer.indices.shape[-1]), layer.delta.numel(), weight.numel()))
    total = trainable = 0
    fully = {}
    for name, param in model.named_parameters():
        if id(param) in delta_ids:
            trainable += param.numel() if param.requires_grad else 0
            continue
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            fully[original_name(name)] = param.numel()
    return TrainableReport(trainable, total, layers, fully)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's one-line summary: trainable params, all params, trainable%."""
    report = trainable_parameters_report(model)
    print(f"trainable params: {report.trainable:,} || all params: {report.total:,} || "
          f"trainable%: {report.percent:.4f}")
