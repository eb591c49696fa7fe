"""Columns: k input features (linear) or input channels with all their taps (conv) (GRFT's columns).

A unit is one input feature / input channel; for a grouped convolution a global input channel ``c`` covers
the output channels of its group and all taps. Its score is the sum of its column's parameter scores; it
costs ``out/g * kh * kw`` parameters. ``delta`` is ``[out, k]`` (linear) or ``[out/g, k, kh, kw]`` (conv); its
contribution is ``x[..., idx] @ delta^T``, computed from the chosen inputs only. With
``conv_columns='tap'`` a convolution's columns are taken on its ``[out, in/g*kh*kw]`` view instead
(:mod:`.tap_column`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..fused import linear_columns
from .base import ConvFn, Update, register_structure
from .row import group_members

__all__ = ["ColumnUpdate", "reduce_columns"]


def reduce_columns(score: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum a ``[out, in/groups, ...]`` score to one value per global input channel, shape ``[in]``."""
    out_features, in_per_group = score.shape[0], score.shape[1]
    per_tap = score.reshape(out_features, in_per_group, -1).sum(-1)
    return per_tap.reshape(groups, out_features // groups, in_per_group).sum(1).reshape(-1)


@register_structure
class ColumnUpdate(Update):
    """k input features (linear) or input channels with all their taps (conv)."""

    structure = "column"
    unit_label = "columns"
    linear_function = staticmethod(linear_columns)

    @classmethod
    def for_layer(cls, layer: nn.Module, config: Any) -> str:
        """A convolution's columns are ``tap_column`` units when ``config.conv_columns == 'tap'``."""
        is_conv = getattr(getattr(layer, "weight", None), "dim", lambda: 2)() == 4
        return "tap_column" if is_conv and getattr(config, "conv_columns", "channel") == "tap" else cls.structure

    @classmethod
    def candidate_count(cls, weight_shape: tuple[int, ...], groups: int = 1) -> int:
        return weight_shape[1] * groups

    @classmethod
    def unit_scores(cls, score: torch.Tensor, groups: int = 1) -> torch.Tensor:
        return reduce_columns(score.detach().double(), groups)

    @classmethod
    def unit_cost(cls, weight_shape: tuple[int, ...], groups: int = 1) -> int:
        return weight_shape[0] // groups * math.prod(weight_shape[2:])

    @classmethod
    def shape_for(cls, weight_shape: tuple[int, ...], count: int, groups: int = 1) -> tuple[int, ...]:
        if len(weight_shape) == 2:
            return (weight_shape[0], count)
        return (weight_shape[0] // groups, count, *weight_shape[2:])

    def _grouped_view(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``dense`` as ``[groups, out/g, in/g, kh, kw]`` and the (group, local channel) of each index."""
        out_per_group, in_per_group = self.weight_shape[0] // self.groups, self.weight_shape[1]
        view = dense.reshape(self.groups, out_per_group, in_per_group, *self.weight_shape[2:])
        return view, self.indices // in_per_group, self.indices % in_per_group

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        dense = values.new_zeros(self.weight_shape)
        if not self.is_conv:
            return dense.index_copy(1, self.indices, values)
        view, group, local = self._grouped_view(dense)
        view[group, :, local] = values.transpose(0, 1)  # advanced indices first: [k, out/g, kh, kw]
        return view.reshape(self.weight_shape)

    def extract(self, dense: torch.Tensor) -> torch.Tensor:
        if not self.is_conv:
            return dense.index_select(1, self.indices)
        view, group, local = self._grouped_view(dense)
        return view[group, :, local].transpose(0, 1)

    def _derive(self) -> None:
        if self.is_conv and self.groups > 1:  # output channels written by each chosen input channel
            channels = group_members(self.indices, self.weight_shape[1], self.weight_shape[0] // self.groups)
            self.register_buffer("_scatter_channels", channels, persistent=False)

    def add_to(self, y: torch.Tensor, x: torch.Tensor, conv: ConvFn | None = None) -> torch.Tensor:
        delta = self.delta.to(x.dtype)
        if not self.is_conv:
            return y.add_(F.linear(x.index_select(-1, self.indices), delta).to(y.dtype))
        chosen = x.index_select(1, self.indices)
        if self.groups == 1:
            return y.add_(conv(chosen, delta, 1).to(y.dtype))
        kh, kw = self.weight_shape[2:]
        weight = delta.transpose(0, 1).reshape(-1, 1, kh, kw)  # [k * out/g, 1, kh, kw]
        return y.index_add_(1, self._scatter_channels, conv(chosen, weight, self.count).to(y.dtype))
