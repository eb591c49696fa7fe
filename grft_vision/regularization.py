"""The L2-to-pretrained regulariser of GRFT (paper Eq. 8): ``lambda * sum_{l in R} ||W_l - W_l,pre||^2``.

The regularised set R is the last L blocks (stages, for hierarchical models) plus the stem (patch
embedding) plus the head, or every trainable tensor when L is ``'all'`` (Tables 6/7, "Regular Layer
Number"). Frozen tensors contribute nothing, so only trainable tensors are visited:

- a GRFT update ``delta`` stores ``W - W_pre`` on its entries, so its term is ``||delta||^2`` (plus, after
  dynamic re-selections, the residue of entries chosen earlier: see ``GRFTLayer.distance_terms``);
- a fully trainable tensor (head, bias, LayerScale) is compared with a copy of its value taken when the
  regulariser is built (for the head: its initialisation, as in the paper).
"""
from __future__ import annotations

import torch
from torch import nn

from .anatomy import grft_layers, head_module_names, model_groups, original_name
from .config import GRFTConfig
from .layers import GRFTLayer

__all__ = ["L2ToPretrained", "regularized_names"]


def regularized_names(model: nn.Module, blocks: int | str, head_names: list[str]) -> set[str] | None:
    """Original parameter names in R, or None meaning every parameter (``blocks == 'all'``)."""
    if blocks == "all":
        return None
    groups = model_groups(model, head_names)
    chosen = [name for block in groups.blocks[len(groups.blocks) - blocks:] for name in block] if blocks else []
    return set(groups.stem) | set(chosen) | set(groups.head)


class L2ToPretrained:
    """Callable returning the L2-to-pretrained penalty of a wrapped model (a scalar tensor).

    Build it after :func:`~grft_vision.apply_grft` and before loading any trained values (e.g. when
    resuming), so that the reference copies hold the pre-trained / initial values.

    Args:
        model: the wrapped model.
        config: supplies ``reg_lambda`` (lambda) and ``reg_blocks`` (L or 'all').
    """

    def __init__(self, model: nn.Module, config: GRFTConfig) -> None:
        self.weight = float(config.reg_lambda)
        in_set = regularized_names(model, config.reg_blocks, head_module_names(model, config.head_modules))
        self.layers: list[GRFTLayer] = []  # read at call time: schedules may replace their deltas
        self.names: list[str] = []
        delta_ids = set()
        for name, layer in grft_layers(model):
            delta_ids.add(id(layer.delta))
            if layer.delta.requires_grad and (in_set is None or f"{name}.weight" in in_set):
                self.layers.append(layer)
                self.names.append(f"{name}.delta")
        self.tensors: list[torch.Tensor] = []
        self.references: list[torch.Tensor] = []
        for name, param in model.named_parameters():
            if id(param) in delta_ids or not param.requires_grad:
                continue
            if in_set is None or original_name(name) in in_set:
                self.tensors.append(param)
                self.references.append(param.detach().clone())
                self.names.append(original_name(name))

    @property
    def enabled(self) -> bool:
        """False when lambda is 0 or R holds no trainable tensor (the penalty is then skipped)."""
        return self.weight > 0 and bool(self.layers or self.tensors)

    @staticmethod
    def _distance(layer: GRFTLayer) -> torch.Tensor:
        """``||W - W_pre||^2`` of a wrapped weight: ``||delta||^2``, plus any residue of earlier entries."""
        at_delta, rest = layer.distance_terms()
        update = layer.delta.float() if at_delta is None else layer.delta.float() + at_delta
        return update.pow(2).sum() + rest

    def __call__(self) -> torch.Tensor:
        """``lambda * (sum ||W - W_pre||^2 + sum ||p - p_ref||^2)`` over R, differentiable, fp32."""
        if not self.enabled:
            return torch.zeros(())
        total = sum(self._distance(layer) for layer in self.layers)
        total = total + sum((param.float() - ref.float()).pow(2).sum()
                            for param, ref in zip(self.tensors, self.references))
        return self.weight * total
