"""Where the update is applied: wrapper layers that add a compact trainable update to a frozen weight.

A wrapper holds the original layer as ``base_layer`` (its weight frozen, never given a gradient), an
int64 buffer ``indices`` naming the chosen rows / columns / entries, and one trainable parameter
``delta`` holding exactly the chosen entries (initialised to zero). The effective weight is
``W + scatter(delta)``, but it is never built during training where a channel form exists:

==========  ========================  ======================  =================================
structure   delta shape (linear)      delta shape (conv)      forward
==========  ========================  ======================  =================================
row         ``[k, in]``               ``[k, in/g, kh, kw]``   ``y = base(x)``, then ``x @ delta^T``
                                                              added into the k output features
column      ``[out, k]``              ``[out/g, k, kh, kw]``  ``y = base(x) + x[..., idx] @ delta^T``
sparse      ``[out, k]``              ``[out, k]``            linear: a gather of the chosen inputs;
                                                              conv: materialised (no channel form)
tap_column  (conv only)               ``[out, k]``            a column of the ``[out, in/g*kh*kw]`` view
                                                              (one input channel at one tap): a conv
                                                              over the chosen channels only
==========  ========================  ======================  =================================

At zero update the wrapped layer returns exactly what the original returns (the update adds zeros).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Conv2dSame, Linear as TimmLinear
from timm.layers.padding import pad_same

__all__ = ["GRFTLayer", "GRFTLinear", "GRFTConv2d", "wrap_layer"]

_PLAIN_LINEAR_TYPES = (nn.Linear, TimmLinear, nn.modules.linear.NonDynamicallyQuantizableLinear)
_PLAIN_CONV_TYPES = (nn.Conv2d, Conv2dSame)


def _update_dtype(weight: torch.Tensor) -> torch.dtype:
    """Updates are kept in fp32 (or fp64) even when the frozen weight is half precision."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class GRFTLayer(nn.Module):
    """Common part of the wrappers: base layer, chosen indices, trainable update, merging.

    Attributes:
        base_layer: the wrapped ``nn.Linear`` / ``nn.Conv2d`` (or subclass), weight frozen.
        structure: 'row', 'column', 'sparse' or (convolutions) 'tap_column'.
        indices: int64 buffer, ``[k]`` (row, column, tap_column) or ``[out, k]`` (sparse).
        delta: trainable parameter with exactly the chosen entries, shape given in the module docstring.
    """

    def __init__(self, base_layer: nn.Module, structure: str, indices: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.structure = structure
        device = base_layer.weight.device
        base_layer.weight.requires_grad_(False)
        self.register_buffer("indices", torch.empty(0, dtype=torch.long, device=device))
        # updates of entries no longer chosen (dynamic schedules): folded into the base weight, recorded as flat
        # weight positions, values and the pre-trained values there, so that W_pre, adapters, unloading and the
        # regulariser stay exact
        self.register_buffer("residue_index", torch.empty(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("residue_value", torch.empty(0, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("residue_base", torch.empty(0, dtype=base_layer.weight.dtype, device=device),
                             persistent=False)
        self.delta = nn.Parameter(torch.empty(0))
        self.set_indices(indices)

    # ------------------------------------------------------------------ layout (per subclass)
    def _delta_shape(self, count: int) -> tuple[int, ...]:
        raise NotImplementedError

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """A dense tensor of the weight's shape holding ``values`` (``delta``'s layout) at the chosen entries."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense tensor of the weight's shape (zeros outside the chosen entries)."""
        return self.scatter(self.delta)

    def extract(self, dense: torch.Tensor) -> torch.Tensor:
        """The entries of a weight-shaped tensor that the update covers, in ``delta``'s layout.

        The adjoint of :meth:`scatter`: ``extract(scatter(values)) == values``. Used to read the slice of a
        dense gradient or of a dense weight difference that corresponds to this update.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ shared behaviour
    def set_indices(self, indices: torch.Tensor) -> None:
        """Choose new entries and reset the update to zero (merge first to keep a trained update)."""
        weight = self.base_layer.weight
        indices = indices.to(device=weight.device, dtype=torch.long)
        count = indices.shape[-1]
        self.indices = indices
        self.delta = nn.Parameter(torch.zeros(self._delta_shape(count), dtype=_update_dtype(weight),
                                              device=weight.device))
        self._distance_cache = None
        self._on_indices_changed()

    def _on_indices_changed(self) -> None:
        """Hook for subclasses that precompute index tensors from ``indices``."""

    def _flat_positions(self) -> torch.Tensor:
        """Flat positions in the weight of the update's entries, in ``delta``'s layout (int64)."""
        weight = self.base_layer.weight
        return self.extract(torch.arange(weight.numel(), device=weight.device).view(weight.shape))

    def reselect(self, indices: torch.Tensor, *, keep: bool) -> torch.Tensor:
        """Move the update to newly chosen entries (dynamic and incremental schedules).

        Args:
            indices: the new chosen entries (same structure).
            keep: True (incremental): entries chosen before and now keep their value. False (dynamic, as
                SPEFT): the whole update is first folded into the weight (and recorded as residue) and the new
                update starts from zero.

        Returns:
            For every entry of the new update (flattened), its position in the old flattened update, or -1.
            Used to carry optimizer state over.
        """
        old_positions = self.scatter(torch.arange(1, self.delta.numel() + 1, device=self.delta.device)
                                     .view(self.delta.shape)) - 1
        old_values = self.delta.detach().flatten()
        if not keep:
            self.add_residue(self._flat_positions().flatten(), old_values)
        self.set_indices(indices)
        mapping = self.extract(old_positions).flatten()
        if keep:
            with torch.no_grad():
                kept = mapping >= 0
                self.delta.view(-1)[kept] = old_values[mapping[kept]]
        return mapping

    def add_residue(self, flat: torch.Tensor, values: torch.Tensor) -> None:
        """Add a sparse change (flat weight positions, values) to the recorded residue and to the base weight.

        The weight at a residue position is always ``pre-trained value + total residue`` computed afresh, so
        the result does not depend on how the residue was accumulated (a resumed run matches bit for bit).
        """
        weight = self.base_layer.weight.data.view(-1)
        flat, values = flat.to(weight.device), values.to(weight.device, torch.float32)
        known = len(self.residue_index)
        index, inverse = torch.unique(torch.cat([self.residue_index, flat]), return_inverse=True)
        summed = torch.zeros(len(index), device=weight.device).index_add_(0, inverse,
                                                                          torch.cat([self.residue_value, values]))
        base = torch.empty(len(index), dtype=weight.dtype, device=weight.device)
        base[inverse[known:]] = weight[flat]  # pre-trained where new ...
        base[inverse[:known]] = self.residue_base  # ... and as recorded where already changed
        weight[index] = (base.float() + summed).to(weight.dtype)
        self.residue_index, self.residue_value, self.residue_base = index, summed, base
        self._distance_cache = None

    def distance_terms(self) -> tuple[torch.Tensor | None, float]:
        """``(residue at the update's entries in delta's layout, sum of squares of the rest of the residue)``.

        ``W - W_pre`` is ``residue + scatter(delta)``, so ``||W - W_pre||^2`` is
        ``||delta + residue_at_delta||^2 + rest``. Without residue: ``(None, 0.0)``. Cached until the
        entries or the residue change.
        """
        if self.residue_index.numel() == 0:
            return None, 0.0
        if self._distance_cache is None:
            flat = self._flat_positions()
            position = torch.searchsorted(self.residue_index, flat).clamp(max=len(self.residue_index) - 1)
            found = self.residue_index[position] == flat
            at_delta = torch.where(found, self.residue_value[position], torch.zeros((), device=flat.device))
            rest = float(self.residue_value.pow(2).sum() - at_delta.pow(2).sum())
            self._distance_cache = (at_delta, rest)
        return self._distance_cache

    def pristine_weight(self) -> torch.Tensor:
        """The base weight without the residue: exactly the pre-trained weight."""
        weight = self.base_layer.weight.detach()
        if self.residue_index.numel() == 0:
            return weight
        pristine = weight.clone()
        pristine.view(-1)[self.residue_index] = self.residue_base
        return pristine

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``W + delta_weight()``, for code that reads ``layer.weight`` directly.

        Materialises a dense tensor; the wrapper's own forward never calls this on the channel paths.
        """
        base = self.base_layer.weight
        return base + self.delta_weight().to(base.dtype)

    def merge(self) -> nn.Module:
        """Fold the update into the base weight in place and return the (now plain) base layer.

        With a half-precision base weight the sum is rounded to that precision.
        """
        with torch.no_grad():
            weight = self.base_layer.weight
            weight.add_(self.delta_weight().to(weight.dtype))
        return self.base_layer

    def unload(self) -> nn.Module:
        """Return the base layer with its pre-trained weight (any residue removed), discarding the update."""
        if self.residue_index.numel():
            with torch.no_grad():
                self.base_layer.weight.copy_(self.pristine_weight())
            self.residue_index, self.residue_value = self.residue_index[:0], self.residue_value[:0]
            self.residue_base = self.residue_base[:0]
            self._distance_cache = None
        return self.base_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delta.numel() == 0:  # nothing chosen (yet): the base layer alone
            return self.base_layer(x)
        if not self._channel_form:  # the base layer's own forward with the materialised effective weight
            return torch.func.functional_call(self.base_layer, {"weight": self.weight}, (x,))
        return self._channel_forward(x)

    def _channel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output plus the update, computed over the chosen channels only.

        The update is added into the base output in place: no layer saves its own output for backward, and
        a fresh output-sized tensor per wrapped layer is the largest avoidable cost of a training step.
        """
        raise NotImplementedError

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"structure={self.structure}, k={self.indices.shape[-1]}, delta={tuple(self.delta.shape)}"


class GRFTLinear(GRFTLayer):
    """GRFT wrapper of an ``nn.Linear`` (weight ``[out, in]``); input ``[..., in]``, output ``[..., out]``."""

    def __init__(self, base_layer: nn.Linear, structure: str, indices: torch.Tensor) -> None:
        super().__init__(base_layer, structure, indices)
        self._channel_form = type(base_layer) in _PLAIN_LINEAR_TYPES

    def _delta_shape(self, count: int) -> tuple[int, ...]:
        out_features, in_features = self.base_layer.weight.shape
        return (count, in_features) if self.structure == "row" else (out_features, count)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        dense = values.new_zeros(self.base_layer.weight.shape)
        if self.structure == "row":
            return dense.index_copy(0, self.indices, values)
        if self.structure == "column":
            return dense.index_copy(1, self.indices, values)
        return dense.scatter(1, self.indices, values)

    def extract(self, dense: torch.Tensor) -> torch.Tensor:
        if self.structure == "row":
            return dense.index_select(0, self.indices)
        if self.structure == "column":
            return dense.index_select(1, self.indices)
        return dense.gather(1, self.indices)

    def _channel_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        delta = self.delta.to(x.dtype)
        if self.structure == "row":
            return y.index_add_(-1, self.indices, F.linear(x, delta).to(y.dtype))
        if self.structure == "column":
            return y.add_(F.linear(x.index_select(-1, self.indices), delta).to(y.dtype))
        # sparse: x[..., indices] is [..., out, k]; each output sums its own k chosen inputs
        return y.add_(torch.einsum("...ok,ok->...o", x[..., self.indices], delta).to(y.dtype))


class GRFTConv2d(GRFTLayer):
    """GRFT wrapper of an ``nn.Conv2d`` (weight ``[out, in/g, kh, kw]``, any ``groups`` g, depthwise included).

    Input ``[N, in, H, W]``, output ``[N, out, H', W']``. Row and column updates run as extra small
    convolutions over the chosen channels only. The sparse structure has no channel form and, like
    convolution subclasses with their own forward (e.g. timm's ``StdConv2d``), runs the base layer with
    the materialised effective weight.
    """

    def __init__(self, base_layer: nn.Conv2d, structure: str, indices: torch.Tensor) -> None:
        super().__init__(base_layer, structure, indices)
        grouped_taps = structure == "tap_column" and base_layer.groups > 1
        self._channel_form = type(base_layer) in _PLAIN_CONV_TYPES and structure != "sparse" and not grouped_taps

    @property
    def _group_sizes(self) -> tuple[int, int, int]:
        """(groups, output channels per group, input channels per group)."""
        base = self.base_layer
        return base.groups, base.out_channels // base.groups, base.in_channels // base.groups

    def _delta_shape(self, count: int) -> tuple[int, ...]:
        out_channels, in_per_group, kh, kw = self.base_layer.weight.shape
        if self.structure == "row":
            return (count, in_per_group, kh, kw)
        if self.structure == "column":
            return (out_channels // self.base_layer.groups, count, kh, kw)
        return (out_channels, count)  # sparse, tap_column

    def _on_indices_changed(self) -> None:
        groups, out_per_group, in_per_group = self._group_sizes
        if self.structure == "row":  # input channels read by each chosen output channel
            first = (self.indices // out_per_group) * in_per_group
            channels = first[:, None] + torch.arange(in_per_group, device=first.device)
            self.register_buffer("_gather_channels", channels.reshape(-1), persistent=False)
        elif self.structure == "column":  # output channels written by each chosen input channel
            first = (self.indices // in_per_group) * out_per_group
            channels = first[:, None] + torch.arange(out_per_group, device=first.device)
            self.register_buffer("_scatter_channels", channels.reshape(-1), persistent=False)
        elif self.structure == "tap_column":  # the input channels read, and each entry's slot among their taps
            taps = self.base_layer.kernel_size[0] * self.base_layer.kernel_size[1]
            channels, position = torch.unique(self.indices // taps, sorted=True, return_inverse=True)
            self.register_buffer("_tap_channels", channels, persistent=False)
            self.register_buffer("_tap_slots", position * taps + self.indices % taps, persistent=False)

    def _column_view(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``dense`` viewed as ``[groups, out/g, in/g, kh, kw]`` plus the (group, local channel) of each index."""
        groups, out_per_group, in_per_group = self._group_sizes
        view = dense.reshape(groups, out_per_group, in_per_group, *dense.shape[2:])
        return view, self.indices // in_per_group, self.indices % in_per_group

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        shape = self.base_layer.weight.shape
        dense = values.new_zeros(shape)
        if self.structure == "row":
            return dense.index_copy(0, self.indices, values)
        if self.structure == "sparse":
            return dense.reshape(shape[0], -1).scatter(1, self.indices, values).reshape(shape)
        if self.structure == "tap_column":
            return dense.reshape(shape[0], -1).index_copy(1, self.indices, values).reshape(shape)
        view, group, local = self._column_view(dense)
        view[group, :, local] = values.transpose(0, 1)  # advanced indices first: [k, out/g, kh, kw]
        return view.reshape(shape)

    def extract(self, dense: torch.Tensor) -> torch.Tensor:
        if self.structure == "row":
            return dense.index_select(0, self.indices)
        if self.structure == "sparse":
            return dense.reshape(dense.shape[0], -1).gather(1, self.indices)
        if self.structure == "tap_column":
            return dense.reshape(dense.shape[0], -1).index_select(1, self.indices)
        view, group, local = self._column_view(dense)
        return view[group, :, local].transpose(0, 1)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        """A bias-free convolution with the base layer's stride, padding (mode) and dilation."""
        base = self.base_layer
        padding = base.padding
        if isinstance(base, Conv2dSame):
            x, padding = pad_same(x, weight.shape[-2:], base.stride, base.dilation), 0
        elif base.padding_mode != "zeros":
            x, padding = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode), 0
        return F.conv2d(x, weight, None, base.stride, padding, base.dilation, groups)

    def _channel_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        delta = self.delta.to(x.dtype)
        count = self.indices.shape[0]
        groups = self.base_layer.groups
        if self.structure == "row":
            if groups == 1:
                update = self._conv(x, delta, 1)
            else:
                update = self._conv(x.index_select(1, self._gather_channels), delta, count)
            return y.index_add_(1, self.indices, update.to(y.dtype))
        if self.structure == "tap_column":  # a small kernel over the chosen channels, zero but at the chosen taps
            out_channels, _, kh, kw = self.base_layer.weight.shape
            kernel = delta.new_zeros(out_channels, len(self._tap_channels) * kh * kw)
            kernel = kernel.index_copy(1, self._tap_slots, delta).reshape(out_channels, -1, kh, kw)
            return y.add_(self._conv(x.index_select(1, self._tap_channels), kernel, 1).to(y.dtype))
        chosen = x.index_select(1, self.indices)
        if groups == 1:
            return y.add_(self._conv(chosen, delta, 1).to(y.dtype))
        kh, kw = delta.shape[-2:]
        weight = delta.transpose(0, 1).reshape(-1, 1, kh, kw)  # [k * out/g, 1, kh, kw]
        return y.index_add_(1, self._scatter_channels, self._conv(chosen, weight, count).to(y.dtype))


def wrap_layer(layer: nn.Module, structure: str, indices: torch.Tensor) -> GRFTLayer:
    """Wrap one ``nn.Linear`` or ``nn.Conv2d`` (subclasses included) with the given chosen indices."""
    if isinstance(layer, nn.Linear):
        return GRFTLinear(layer, structure, indices)
    if isinstance(layer, nn.Conv2d):
        return GRFTConv2d(layer, structure, indices)
    raise TypeError(f"GRFT wraps nn.Linear and nn.Conv2d layers, not {type(layer).__name__}.")
