"""Tap columns: k columns of a convolution's ``[out, in/g*kh*kw]`` view, one input channel at one kernel tap
each (how GPS and the GRFT paper count a convolution's columns; ``GRFTConfig(structure='column',
conv_columns='tap')``).

A unit costs ``out`` parameters and scores the sum of its column. Computed as a convolution over the chosen
input channels with a kernel that is zero except at the chosen taps; grouped convolutions run with the
materialised weight.
"""
from __future__ import annotations

import torch

from .base import ConvFn, LayerGeometry, Update, register_structure

__all__ = ["TapColumnUpdate"]


@register_structure
class TapColumnUpdate(Update):
    """k columns of a convolution's ``[out, in/g*kh*kw]`` view."""

    structure = "tap_column"
    unit_label = "columns"

    @classmethod
    def applies_to(cls, weight_shape: tuple[int, ...]) -> bool:
        return len(weight_shape) == 4

    @classmethod
    def candidate_count(cls, weight_shape: tuple[int, ...], groups: int = 1) -> int:
        return int(torch.Size(weight_shape[1:]).numel())

    @classmethod
    def unit_scores(cls, score: torch.Tensor, groups: int = 1) -> torch.Tensor:
        values = score.detach().double()
        return values.reshape(values.shape[0], -1).sum(0)

    @classmethod
    def unit_cost(cls, weight_shape: tuple[int, ...], groups: int = 1) -> int:
        return weight_shape[0]

    @classmethod
    def shape_for(cls, weight_shape: tuple[int, ...], count: int, groups: int = 1) -> tuple[int, ...]:
        return (weight_shape[0], count)

    def has_channel_form(self, geometry: LayerGeometry) -> bool:
        return geometry.plain and self.groups == 1

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        dense = values.new_zeros(self.weight_shape)
        return dense.reshape(self.weight_shape[0], -1).index_copy(1, self.indices, values).reshape(self.weight_shape)

    def extract(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.reshape(dense.shape[0], -1).index_select(1, self.indices)

    def _derive(self) -> None:  # the input channels read, and each entry's slot among their taps
        taps = self.weight_shape[2] * self.weight_shape[3]
        channels, position = torch.unique(self.indices // taps, sorted=True, return_inverse=True)
        self.register_buffer("_tap_channels", channels, persistent=False)
        self.register_buffer("_tap_slots", position * taps + self.indices % taps, persistent=False)

    def add_to(self, y: torch.Tensor, x: torch.Tensor, conv: ConvFn | None = None) -> torch.Tensor:
        out_channels, _, kh, kw = self.weight_shape
        delta = self.delta.to(x.dtype)
        kernel = delta.new_zeros(out_channels, len(self._tap_channels) * kh * kw)
        kernel = kernel.index_copy(1, self._tap_slots, delta).reshape(out_channels, -1, kh, kw)
        return y.add_(conv(x.index_select(1, self._tap_channels), kernel, 1).to(y.dtype))
