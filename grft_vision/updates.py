"""What one adapter changes in one frozen weight: the chosen entries, their trained values, a bias delta.

An :class:`Update` belongs to one adapter of one wrapped layer (:mod:`grft_vision.layers`). It holds an
int64 buffer ``indices`` naming the chosen rows / columns / entries, one trainable parameter ``delta``
with exactly the chosen entries (zero at creation), an optional trainable ``bias_delta`` (the change of
the layer's bias, zero at creation), and *frozen entries*: changes at flat weight positions that no longer
train (``frozen_index`` int64, ``frozen_value`` fp32; empty unless a mask schedule moved the trainable
entries). The changed weight is ``W + scatter(delta) + frozen``; an update never builds it during training
when a channel form exists:

==========  ========================  ======================  =================================
structure   delta shape (linear)      delta shape (conv)      contribution to the output
==========  ========================  ======================  =================================
row         ``[k, in]``               ``[k, in/g, kh, kw]``   ``x @ delta^T`` added into the k outputs
column      ``[out, k]``              ``[out/g, k, kh, kw]``  ``x[..., idx] @ delta^T``
sparse      ``[out, k]``              ``[out, k]``            linear: a gather of the chosen inputs;
                                                              conv: none (materialised weight)
tap_column  (conv only)               ``[out, k]``            a column of the ``[out, in/g*kh*kw]``
                                                              view: a conv over the chosen channels
==========  ========================  ======================  =================================

Index tensors derived from ``indices`` (channel lists of grouped convolutions, tap slots) are rebuilt
whenever ``indices`` changes, including by ``load_state_dict``.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .dtypes import Float32Masters, adapter_dtype
from .fused import linear_columns, linear_rows, linear_sparse, patch_sparse

__all__ = ["Update", "RowUpdate", "ColumnUpdate", "SparseUpdate", "TapColumnUpdate", "create_update", "STRUCTURES"]

ConvFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (input, weight, groups) -> output


def _group_members(indices: torch.Tensor, per_group: int, other_per_group: int) -> torch.Tensor:
    """For channels ``indices`` of one side of a grouped convolution (``per_group`` channels per group), the
    channels of the other side (``other_per_group`` per group) that their groups connect, flattened ``[k * other]``."""
    first = (indices // per_group) * other_per_group
    return (first[:, None] + torch.arange(other_per_group, device=indices.device)).reshape(-1)


class Update(Float32Masters):
    """One adapter's change to one weight (see the module docstring).

    Args:
        weight: the frozen weight, ``[out, in]`` or ``[out, in/g, kh, kw]`` (only its shape, dtype, device are read).
        indices: the chosen entries, int64 ``[k]`` or ``[out, k]`` (sparse).
        groups: the convolution's ``groups`` (1 for linear layers).
        train_bias: also train a ``bias_delta`` of shape ``[out]``.
        keep_float32: keep the trained tensors fp32 for a half-precision weight (:mod:`grft_vision.dtypes`).
    """

    structure: ClassVar[str]
    channel_form: ClassVar[bool] = True  # the contribution can be computed without the dense weight
    # base matmul and update in one autograd node, for linear layers (grft_vision.fused)
    linear_function: ClassVar[Callable | None] = None

    def __init__(self, weight: torch.Tensor, indices: torch.Tensor, *, groups: int = 1, train_bias: bool = False,
                 keep_float32: bool = True) -> None:
        super().__init__()
        self.weight_shape = tuple(weight.shape)
        self.groups = groups
        self.keep_float32 = keep_float32
        dtype = adapter_dtype(weight.dtype, keep_float32)
        self.register_buffer("indices", torch.empty(0, dtype=torch.long, device=weight.device))
        self.delta = nn.Parameter(torch.empty(0, dtype=dtype, device=weight.device))
        bias = torch.zeros(self.weight_shape[0], dtype=dtype, device=weight.device) if train_bias else None
        self.bias_delta = nn.Parameter(bias) if train_bias else None
        self.register_buffer("frozen_index", torch.empty(0, dtype=torch.long, device=weight.device))
        self.register_buffer("frozen_value", torch.empty(0, dtype=torch.float32, device=weight.device))
        self._overlap: tuple[torch.Tensor, torch.Tensor] | None = None
        self.set_indices(indices)
        self.register_load_state_dict_post_hook(lambda module, _: module._indices_changed())

    @property
    def is_conv(self) -> bool:
        return len(self.weight_shape) == 4

    @property
    def count(self) -> int:
        """k: the number of chosen rows / columns / entries per row."""
        return int(self.indices.shape[-1])

    # ------------------------------------------------------------------ layout (per structure)
    @classmethod
    def shape_for(cls, weight_shape: tuple[int, ...], count: int, groups: int = 1) -> tuple[int, ...]:
        """``delta``'s shape for ``count`` chosen units of a weight of ``weight_shape``."""
        raise NotImplementedError

    def delta_shape(self, count: int) -> tuple[int, ...]:
        return self.shape_for(self.weight_shape, count, self.groups)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """A dense tensor of the weight's shape holding ``values`` (``delta``'s layout) at the chosen entries."""
        raise NotImplementedError

    def extract(self, dense: torch.Tensor) -> torch.Tensor:
        """The entries of a weight-shaped tensor that the update covers, in ``delta``'s layout.

        The adjoint of :meth:`scatter`: ``extract(scatter(values)) == values``.
        """
        raise NotImplementedError

    def _derive(self) -> None:
        """Precompute index tensors from ``indices`` (structures that need them)."""

    def add_to(self, y: torch.Tensor, x: torch.Tensor, conv: ConvFn | None = None) -> torch.Tensor:
        """Add the contribution of ``delta`` to the base output ``y`` of input ``x``, in place; returns ``y``.

        ``conv(input, weight, groups)`` is the base convolution's geometry (stride, padding, dilation) without bias.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ shared behaviour
    def set_indices(self, indices: torch.Tensor) -> None:
        """Choose new entries; ``delta`` becomes a new zero parameter of the matching shape."""
        device = self.indices.device
        self.indices = indices.to(device=device, dtype=torch.long)
        self.delta = nn.Parameter(torch.zeros(self.delta_shape(self.count), dtype=self.delta.dtype, device=device))
        self._indices_changed()

    def _indices_changed(self) -> None:
        self._derive()
        self._overlap = None

    def set_frozen(self, index: torch.Tensor, value: torch.Tensor) -> None:
        """Replace the frozen entries: sorted unique flat weight positions ``[n]`` and their values ``[n]``."""
        self.frozen_index = index.to(self.frozen_index.device, torch.long)
        self.frozen_value = value.to(self.frozen_index.device, torch.float32)
        self._overlap = None

    def delta_weight(self) -> torch.Tensor:
        """The trainable part of the update as a dense tensor of the weight's shape."""
        return self.scatter(self.delta)

    def positions(self) -> torch.Tensor:
        """Flat positions in the weight of ``delta``'s entries, in ``delta``'s layout (int64)."""
        numel = torch.Size(self.weight_shape).numel()
        return self.extract(torch.arange(numel, device=self.indices.device).view(self.weight_shape))

    def written_entries(self, trainable: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flat positions, fp32 values)`` this update adds to the weight when written into it: the frozen
        entries, plus ``delta`` when ``trainable``. Positions may repeat (their values add)."""
        if not trainable:
            return self.frozen_index, self.frozen_value
        return (torch.cat([self.frozen_index, self.positions().reshape(-1)]),
                torch.cat([self.frozen_value, self.delta.detach().float().reshape(-1)]))

    def squared_distance(self) -> torch.Tensor:
        """``||W - W_pre||^2`` of this update's weight change (frozen entries included), differentiable, fp32."""
        update = self.delta.float()
        if self.frozen_index.numel() == 0:
            return update.pow(2).sum()
        if self._overlap is None:
            flat = self.positions()
            slot = torch.searchsorted(self.frozen_index, flat).clamp(max=len(self.frozen_index) - 1)
            found = self.frozen_index[slot] == flat
            at_delta = torch.where(found, self.frozen_value[slot], torch.zeros((), device=flat.device))
            self._overlap = (at_delta, self.frozen_value.pow(2).sum() - at_delta.pow(2).sum())
        at_delta, rest = self._overlap
        return (update + at_delta).pow(2).sum() + rest

    def linear_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` plus this update's contribution, as one autograd node (linear layers).

        The same values as ``add_to(F.linear(x, weight, bias), x)``, with a leaner backward pass
        (:mod:`grft_vision.fused`).
        """
        return self.linear_function(x, weight, bias, self.indices, self.delta)

    def add_bias_to(self, y: torch.Tensor) -> torch.Tensor:
        """Add ``bias_delta`` to an output ``[..., out]`` (linear) or ``[N, out, H, W]`` (conv), out of place."""
        bias = self.bias_delta.to(y.dtype)
        return y + (bias[:, None, None] if self.is_conv else bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("frozen_index", "frozen_value"):  # their length is data, not structure
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape != getattr(self, name).shape:
                setattr(self, name, getattr(self, name).new_empty(incoming.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        bias = ", bias_delta" if self.bias_delta is not None else ""
        frozen = f", frozen={self.frozen_index.numel()}" if self.frozen_index.numel() else ""
        return f"structure={self.structure}, k={self.count}, delta={tuple(self.delta.shape)}{bias}{frozen}"


class RowUpdate(Update):
    """k output rows (linear) or output channels (conv) with all their inputs and taps."""

    structure = "row"
    linear_function = staticmethod(linear_rows)

    @classmethod
    def shape_for(cls, weight_shape: tuple[int, ...], count: int, groups: int = 1) -> tuple[int, ...]:
        return (count, *weight_shape[1:])

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(self.weight_shape).index_copy(0, self.indices, values)

    def extract(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.index_select(0, self.indices)

    def _derive(self) -> None:
        if self.is_conv and self.groups > 1:  # input channels read by each chosen output channel
            channels = _group_members(self.indices, self.weight_shape[0] // self.groups, self.weight_shape[1])
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


class ColumnUpdate(Update):
    """k input features (linear) or input channels with all their taps (conv); grouped convolutions: a
    global input channel ``c`` covers the output channels of its group."""

    structure = "column"
    linear_function = staticmethod(linear_columns)

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
            channels = _group_members(self.indices, self.weight_shape[1], self.weight_shape[0] // self.groups)
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


class SparseUpdate(Update):
    """k entries of every row of the ``[out, in/g*kh*kw]`` view (GPS). Linear layers gather the chosen inputs
    per output; a patchifying convolution (stride = kernel) is the same over its non-overlapping patches; other
    convolutions have no channel form and run with the materialised weight (see :class:`~grft_vision.layers.GRFTConv2d`)."""

    structure = "sparse"
    linear_function = staticmethod(linear_sparse)

    @property
    def channel_form(self) -> bool:  # type: ignore[override]
        return not self.is_conv  # convolutions: only patchifying ones, which the layer recognises

    @classmethod
    def shape_for(cls, weight_shape: tuple[int, ...], count: int, groups: int = 1) -> tuple[int, ...]:
        return (weight_shape[0], count)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        dense = values.new_zeros(self.weight_shape)
        return dense.reshape(self.weight_shape[0], -1).scatter(1, self.indices, values).reshape(self.weight_shape)

    def extract(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.reshape(dense.shape[0], -1).gather(1, self.indices)

    def add_to(self, y: torch.Tensor, x: torch.Tensor, conv: ConvFn | None = None) -> torch.Tensor:
        if self.is_conv:  # a patchifying convolution: a sparse linear map of each non-overlapping patch
            update = patch_sparse(x, self.indices, self.delta, self.weight_shape[2:], y.shape[2:])
            return y.add_(update.to(y.dtype))
        # x[..., indices] is [..., out, k]; each output sums its own k chosen inputs (autograd keeps it: the
        # training forward uses linear_forward, which does not)
        return y.add_(torch.einsum("...ok,ok->...o", x[..., self.indices], self.delta.to(x.dtype)).to(y.dtype))


class TapColumnUpdate(Update):
    """k columns of a convolution's ``[out, in/g*kh*kw]`` view: one input channel at one kernel tap each (as GPS
    and the GRFT paper count conv parameters). Computed as a conv over the chosen channels with a kernel
    that is zero except at the chosen taps; grouped convolutions run with the materialised weight."""

    structure = "tap_column"

    @property
    def channel_form(self) -> bool:  # type: ignore[override]
        return self.groups == 1

    @classmethod
    def shape_for(cls, weight_shape: tuple[int, ...], count: int, groups: int = 1) -> tuple[int, ...]:
        return (weight_shape[0], count)

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


STRUCTURES: dict[str, type[Update]] = {cls.structure: cls for cls in (RowUpdate, ColumnUpdate, SparseUpdate,
                                                                      TapColumnUpdate)}


def create_update(structure: str, weight: torch.Tensor, indices: torch.Tensor, **options) -> Update:
    """The :class:`Update` of ``structure`` ('row', 'column', 'sparse', 'tap_column') for ``weight``."""
    if structure == "tap_column" and weight.dim() != 4:
        raise ValueError("structure 'tap_column' applies to convolutions only.")
    return STRUCTURES[structure](weight, indices, **options)
