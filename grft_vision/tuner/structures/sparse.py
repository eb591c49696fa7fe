"""Sparse: k entries of every row of the ``[out, in/g*kh*kw]`` view (GPS's per-neuron masks).

Every row chooses its own k entries (``indices`` ``[out, k]``, :attr:`~.base.Update.per_row`): a unit is "one
more entry in every row", costing ``out`` parameters; a global budget ranks the m-th unit by the mean over
rows of each row's m-th best entry. Linear layers gather the chosen inputs per output (never a dense weight);
a patchifying convolution (stride = kernel: a ViT's patch embedding) is the same map over its
non-overlapping patches; other convolutions have no channel form and run with the materialised weight.
"""
from __future__ import annotations

import torch

from ..fused import linear_sparse, patch_sparse, sparse_map
from .base import ConvFn, LayerGeometry, Update, register_structure

__all__ = ["SparseUpdate"]


@register_structure
class SparseUpdate(Update):
    """k entries of every row of the ``[out, in/g*kh*kw]`` view (GPS)."""

    structure = "sparse"
    unit_label = "entries per row"
    per_row = True
    linear_function = staticmethod(linear_sparse)

    @classmethod
    def candidate_count(cls, weight_shape: tuple[int, ...], groups: int = 1) -> int:
        return int(torch.Size(weight_shape[1:]).numel())

    @classmethod
    def unit_scores(cls, score: torch.Tensor, groups: int = 1) -> torch.Tensor:
        values = score.detach().double()
        return values.reshape(values.shape[0], -1)

    @classmethod
    def unit_cost(cls, weight_shape: tuple[int, ...], groups: int = 1) -> int:
        return weight_shape[0]

    @classmethod
    def unit_values(cls, score: torch.Tensor, groups: int = 1) -> torch.Tensor:
        return cls.unit_scores(score, groups).sort(dim=1, descending=True).values.mean(0)

    @classmethod
    def shape_for(cls, weight_shape: tuple[int, ...], count: int, groups: int = 1) -> tuple[int, ...]:
        return (weight_shape[0], count)

    def has_channel_form(self, geometry: LayerGeometry) -> bool:
        return geometry.plain and (not self.is_conv or geometry.patchify)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        dense = values.new_zeros(self.weight_shape)
        return dense.reshape(self.weight_shape[0], -1).scatter(1, self.indices, values).reshape(self.weight_shape)

    def extract(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.reshape(dense.shape[0], -1).gather(1, self.indices)

    def add_to(self, y: torch.Tensor, x: torch.Tensor, conv: ConvFn | None = None) -> torch.Tensor:
        if self.is_conv:  # a patchifying convolution: a sparse linear map of each non-overlapping patch
            update = patch_sparse(x, self.indices, self.delta, self.weight_shape[2:], y.shape[2:])
            return y.add_(update.to(y.dtype))
        return y.add_(sparse_map(x, self.indices, self.delta).to(y.dtype))
