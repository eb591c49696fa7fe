"""Where the update is applied to a quantized base: the wrapper of a bitsandbytes 4-bit / 8-bit linear layer.

The frozen weight stays quantized and is never copied: the forward is the quantized layer's own output plus
the adapter's update, computed from the chosen entries only (the same channel forms as a full-precision
layer), so at zero update the wrapped model computes exactly what the quantized model computes, and the
quantized bytes never get a gradient. The update is made in the dtype the weight dequantizes to (fp32
masters for half-precision ones, :mod:`.dtypes`).

Writing an update into the weight (:func:`grft_vision.merge_adapter`, an unload with merge) dequantizes,
adds and quantizes again with the layer's own settings: the merged layer is a quantized layer like the
others, and the rounding of re-quantization applies to the whole weight (docs/llm.md measures it). The
quantized weight it replaced is kept, so unmerging, switching adapters, disabling and unloading restore the
original quantized bytes exactly; ``state_dict()`` holds them too. Merges that would overflow the format
are refused, naming the layer. Mask schedules (which write frozen entries during training) are not offered
on quantized layers.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError
from . import batch_context
from .layer import GRFTLinear
from .quantized import quantized_format
from .state import GRFTState
from .structures import LayerGeometry, Update

__all__ = ["GRFTQuantizedLinear"]


class GRFTQuantizedLinear(GRFTLinear):
    """GRFT wrapper of a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (logical weight ``[out, in]``).

    Input ``[..., in]``, output ``[..., out]``; the base layer's weight is its quantized storage.
    """

    merge_may_fail = True

    def __init__(self, base_layer: nn.Module, state: GRFTState, name: str = "",
                 batch_layout: batch_context.BatchLayout = batch_context.BatchLayout()) -> None:
        super().__init__(base_layer, state, name, batch_layout)
        self.quantization = quantized_format(base_layer)
        self._stored: Any = None  # the quantized weight a written update replaced (restored exactly)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.quantization.shape(self.base_layer)

    def _update_template(self) -> torch.Tensor:
        """A stand-in of the logical weight (shape, dtype, device; no memory) to make updates from."""
        return torch.zeros((), dtype=self.quantization.dtype(self.base_layer),
                           device=self.base_layer.weight.device).expand(self.weight_shape)

    @property
    def geometry(self) -> LayerGeometry:
        return LayerGeometry(plain=True)  # the base output is x @ dequantized(W)^T + b: updates add to it

    # ------------------------------------------------------------------ forward
    def _forward_with(self, update: Update, x: torch.Tensor) -> torch.Tensor:
        if not update.has_channel_form(self.geometry):
            return self._dense_forward(update, x, self._current_weight())
        y = self.base_layer(x)  # bitsandbytes' output may not be changed in place: each path below copies once
        if update.bias_delta is not None:
            y = update.add_bias_to(y)
        elif update.delta.numel():
            y = y.clone()
        return update.add_to(y, x) if update.delta.numel() else y

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)  # nothing is ever written inside a mixed batch (no merges, no schedules)

    def _dense_forward(self, update: Update, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.pristine_weight() if weight is None else weight
        weight = weight + update.dense_change().to(weight.dtype)
        bias = self.pristine_bias()
        if update.bias_delta is not None:
            bias = bias + update.bias_delta.to(bias.dtype)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def _base_weight(self) -> torch.Tensor:
        return self.pristine_weight()

    def _current_weight(self) -> torch.Tensor:
        return self.quantization.dequantize(self.base_layer)

    def pristine_weight(self) -> torch.Tensor:
        """The pre-trained weight, dequantized (a new tensor)."""
        with self._pristine_installed():
            return self.quantization.dequantize(self.base_layer)

    # ------------------------------------------------------------------ writing into the quantized weight
    def _merged_weight(self, name: str, trainable: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dequantized pre-trained weight with adapter ``name``'s written entries added (fp32), and the new
        bias (or None); nothing is written."""
        update = self.grft_updates[name]
        positions, values = update.written_entries(trainable)
        dense = self.pristine_weight().float()
        dense.view(-1).index_add_(0, positions.to(dense.device), values.to(dense.device))
        new_bias = None
        if trainable and update.bias_delta is not None:
            bias = self.pristine_bias()
            new_bias = (bias.float() + update.bias_delta.detach().float()).to(bias.dtype)
        return dense, new_bias

    def check_finite(self, name: str, where: str) -> None:
        """Raise :class:`AdapterError` naming ``where`` if adapter ``name`` cannot be merged into this layer's
        quantized format (NaN/inf, or values beyond the format's range)."""
        dense, new_bias = self._merged_weight(name, trainable=True)
        problem = self.quantization.storable(self.base_layer, dense)
        if problem is None and new_bias is not None and not torch.isfinite(new_bias).all():
            problem = "its bias holds NaN/inf"
        if problem:
            raise AdapterError(f"merging adapter {name!r} into the quantized layer {where!r} is refused: {problem}. "
                               "Nothing was merged; export a full-precision merge instead (grft_vision.export "
                               "--dtype bfloat16).")

    def _write(self, name: str, trainable: bool) -> None:
        self.check_finite(name, self.grft_name)
        dense, new_bias = self._merged_weight(name, trainable)
        self._stored = self.quantization.snapshot(self.base_layer)
        self.quantization.store(self.base_layer, dense)
        self._write_bias(new_bias)
        self._written = (name, trainable)

    def _restore(self) -> None:
        if self._written is None:
            return
        self.quantization.restore(self.base_layer, self._stored)
        self._restore_bias()
        self._written, self._stored = None, None

    @contextmanager
    def _pristine_installed(self) -> Iterator[None]:
        """The pre-trained quantized weight installed for the duration, whatever is written."""
        if self._written is None:
            yield
            return
        written = self.quantization.snapshot(self.base_layer)
        self.quantization.restore(self.base_layer, self._stored)
        try:
            yield
        finally:
            self.quantization.restore(self.base_layer, written)

    def detach_base(self, merge: bool) -> nn.Module:
        base = super().detach_base(merge)
        self._stored = None
        return base

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        with self._pristine_installed():  # the pre-trained quantized bytes, never the written ones
            destination = nn.Module.state_dict(self, *args, destination=destination, prefix=prefix,
                                               keep_vars=keep_vars)
        if self._written_bias.numel():
            destination[prefix + "base_layer.bias"] = self.pristine_bias()
        return destination
