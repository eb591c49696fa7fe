"""The dtype rule of adapter tensors: fp32 masters, even in a half-precision model.

An adapter's trained tensors (GRFT updates, and its copies of the tensors it trains in full) are created
in fp32 when the frozen weight they belong to is bf16/fp16, and they stay fp32 when the model is cast with
``model.to(torch.bfloat16)`` / ``.half()``: Adam steps of ~lr x 1e-3 are lost when rounded to bf16. They
are cast to the compute dtype where they are used. This is PEFT's ``autocast_adapter_dtype`` behaviour;
``GRFTConfig(autocast_adapter_dtype=False)`` makes adapter tensors follow the model's dtype instead.
Device moves always apply.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["FULL_PRECISION", "adapter_dtype", "Float32Masters"]

FULL_PRECISION = (torch.float32, torch.float64)


def adapter_dtype(base_dtype: torch.dtype, keep_float32: bool) -> torch.dtype:
    """The dtype of an adapter tensor whose frozen counterpart has ``base_dtype``."""
    if keep_float32 and base_dtype.is_floating_point and base_dtype not in FULL_PRECISION:
        return torch.float32
    return base_dtype


class Float32Masters(nn.Module):
    """A module whose floating tensors keep fp32 (or fp64) under half-precision casts when
    ``self.keep_float32`` is True; device moves and casts between full precisions apply as usual."""

    keep_float32: bool = True

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        if not self.keep_float32:
            return super()._apply(fn, recurse)
        reference = next(iter(self._parameters.values()), None)
        if reference is None:
            reference = next((b for b in self._buffers.values() if b is not None), None)
        device = reference.device if reference is not None else torch.device("cpu")
        probe = fn(torch.zeros((), dtype=torch.float32, device=device))
        if probe.dtype in FULL_PRECISION:
            return super()._apply(fn, recurse)

        def move_only(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(probe.device) if tensor.is_floating_point() else fn(tensor)

        return super()._apply(move_only, recurse)
