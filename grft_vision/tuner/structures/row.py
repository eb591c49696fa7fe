"""Rows: k output rows (linear) or output channels (conv) with all their inputs and taps (GRFT's rows).

A unit is one output row; its score is the row sum of the parameter scores (the paper's Eq. 4, ``S_i =
sum_j s_ij``); it costs ``in/g * kh * kw`` parameters. ``delta`` is ``[k, in]`` (linear) or ``[k, in/g, kh, kw]``
(conv); its contribution is ``x @ delta^T`` added into the k outputs (a small convolution for conv layers,
over each chosen channel's group only for grouped ones).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..fused import linear_rows
from .base import ConvFn, Update, register_structure

__all__ = ["RowUpdate", "group_members"]


def group_members(indices: torch.Tensor, per_group: int, other_per_group: int) -> torch.Tensor:
    """For channels ``indices`` of one side of a grouped convolution (``per_group`` channels per group), the
    channels of the other side (``other_per_group`` per group) that their groups connect, flattened ``[k * other]``."""
    first = (indices // per_group) * other_per_group
    return (first[:, None] + torch.arange(other_per_group, device=indices.device)).reshape(-1)


@register_structure
class RowUpdate(Update):
    """k output rows (linear) or output channels (conv) with all their inputs and taps."""

    structure = "row"
    unit_label = "rows"
    linear_function = staticmethod(linear_rows)

    @classmethod
    def candidate_count(cls, weight_shape: tuple[int, ...], groups: int = 1) -> int:
        return weight_shape[0]

    @classmethod
    def unit_scores(cls, score: torch.Tensor, groups: int = 1) -> torch.Tensor:
        values = score.detach().double()
        return values.reshape(values.shape[0], -1).sum(1)

    @classmethod
    def unit_cost(cls, weight_shape: tuple[int, ...], groups: int = 1) -> int:
        return math.prod(weight_shape[1:])

    @classmethod
    def shape_for(cls, weight_shape: tuple[int, ...], count: int, groups: int = 1) -> tuple[int, ...]:
        return (count, *weight_shape[1:])

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(self.weight_shape).index_copy(0, self.indices, values)

    def extract(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.index_select(0, self.indices)

    def _derive(self) -> None:
        if self.is_conv and self.groups > 1:  # input channels read by each chosen output channel
            channels = group_members(self.indices, self.weight_shape[0] // self.groups, self.weight_shape[1])
            self.register_buffer("_gather_channels", channels, persistent=False)

    def add_to(self, y: torch.Tensor, x: torch.Tensor, conv: ConvFn | None = None) -> torch.Tensor:
        delta = self.delta.to(x.dtype)
        if not self.is_conv:
            return y.index_add_(-1, self.indices, F.linear(x, delta).to(y.dtype))
        if self.groups == 1:
            update = conv(x, delta, 1)
        else:
            update = conv(x.index_select(1, self._gather_channels), delta, self.count)
        return y.index_add_(1, self.indices, update.to(y.dtype))
