"""The L2-to-pretrained regulariser of GRFT (paper Eq. 8): ``lambda * sum_{l in R} ||W_l - W_l,pre||^2``.

The regularised set R is the last L blocks (stages, for hierarchical models) plus the stem (patch
embedding) plus the head, or every trainable tensor when L is ``'all'`` (Tables 6/7, "Regular Layer
Number"). Frozen tensors contribute nothing, so only the adapter's trained tensors are visited:

- an update stores ``W - W_pre`` on its entries (``delta``, frozen entries included) and ``b - b_pre``
  (``bias_delta``), so its term is their squared norm (:meth:`~grft_vision.tuner.structures.Update.squared_distance`);
- a tensor the adapter trains in full (head, LayerScale, ...) is compared with its pre-trained value, which
  its owner keeps (:mod:`grft_vision.tuner.owned`); for the head that is its initialisation, as in the
  paper. A head of another shape than the model's is compared with its value when the regulariser is built.

On a model without adapters (full fine-tuning and linear-probe baselines), every trainable parameter is
compared with a copy of its value taken when the regulariser is built.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import GRFTConfig
from .anatomy import grft_layers, head_module_names, model_groups, original_name
from .owned import OwnedTensor, owned_tensors
from .structures import Update

__all__ = ["L2ToPretrained", "regularized_names"]


def regularized_names(model: nn.Module, blocks: int | str, head_names: list[str]) -> set[str] | None:
    """Original parameter names in R, or None meaning every parameter (``blocks == 'all'``)."""
    if blocks == "all":
        return None
    groups = model_groups(model, head_names)
    chosen = [name for block in groups.blocks[len(groups.blocks) - blocks:] for name in block] if blocks else []
    return set(groups.stem) | set(chosen) | set(groups.head)


class L2ToPretrained:
    """Callable returning the L2-to-pretrained penalty of the active adapter of a wrapped model (a scalar).

    Args:
        model: the wrapped model (or a plain model whose trainable parameters are regularised).
        config: supplies ``reg_lambda`` (lambda) and ``reg_blocks`` (L or 'all').
    """

    def __init__(self, model: nn.Module, config: GRFTConfig) -> None:
        self.weight = float(config.reg_lambda)
        in_set = regularized_names(model, config.reg_blocks, head_module_names(model, config.head_modules))

        def regularised(name: str) -> bool:
            return in_set is None or name in in_set

        state = getattr(model, "grft_state", None)
        adapter = state.active if state is not None else None
        self.names: list[str] = []
        # updates and owned tensors are read at call time: schedules and loads may replace their tensors
        self.weights: list[Update] = []
        self.biases: list[Update] = []
        for name, layer in grft_layers(model):
            update = layer.grft_updates[adapter] if adapter in layer.grft_updates else None
            if update is not None and regularised(f"{name}.weight"):
                self.weights.append(update)
                self.names.append(f"{name}.delta")
            if update is not None and update.bias_delta is not None and regularised(f"{name}.bias"):
                self.biases.append(update)
                self.names.append(f"{name}.bias_delta")
        self.owned: list[tuple[OwnedTensor, str, torch.Tensor]] = []  # (owned tensor, adapter, reference)
        for name, _, _, owned in owned_tensors(model):
            if adapter in owned.adapters and not owned.is_buffer and regularised(name):
                value, original = owned.adapters[adapter], owned.original
                reference = original if value.shape == original.shape else value.detach().clone()
                self.owned.append((owned, adapter, reference))
                self.names.append(name)
        self.plain: list[tuple[torch.Tensor, torch.Tensor]] = []
        if state is None:
            for name, param in model.named_parameters():
                if param.requires_grad and regularised(original_name(name)):
                    self.plain.append((param, param.detach().clone()))
                    self.names.append(original_name(name))

    @property
    def enabled(self) -> bool:
        """False when lambda is 0 or R holds no trainable tensor (the penalty is then skipped)."""
        return self.weight > 0 and bool(self.weights or self.biases or self.owned or self.plain)

    def __call__(self) -> torch.Tensor:
        """``lambda * (sum ||W - W_pre||^2 + sum ||p - p_pre||^2)`` over R, differentiable, fp32."""
        if not self.enabled:
            return torch.zeros(())
        terms = [update.squared_distance() for update in self.weights]
        terms += [update.bias_delta.float().pow(2).sum() for update in self.biases]
        terms += [(owned.adapters[adapter].float() - reference.float()).pow(2).sum()
                  for owned, adapter, reference in self.owned]
        terms += [(param.float() - reference.float()).pow(2).sum() for param, reference in self.plain]
        return self.weight * sum(terms)
