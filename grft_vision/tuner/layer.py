"""Where the update is applied: wrapper layers that add the active adapter's update to a frozen layer.

A wrapper holds the original layer as ``base_layer`` (its weight and bias frozen, never given a gradient)
and one :class:`~grft_vision.tuner.structures.Update` per adapter in ``grft_updates`` (a ``ModuleDict`` keyed
by adapter name). It reads which adapter is active, merged or disabled from the model's
:class:`~grft_vision.tuner.state.GRFTState` (and a mixed batch from :mod:`.batch_context`) when it computes,
and keeps no copy of it. Its forward computes the base layer's output and adds the active update, over the
chosen channels only where a channel form exists; at zero update it returns exactly what the base layer
returns. Inside :func:`grft_vision.mixed_adapters` every sample gets the update of its own adapter.

Writing into the base weight is physical state that follows the model's state (:meth:`GRFTLayer.sync`): a
merged adapter's update is written, and an update's *frozen entries* (changes that no longer train) are
kept written while their adapter is active and enabled. What is written is undone exactly: the values of
the touched entries are kept, so unmerging, switching adapters, disabling and unloading restore the
pre-trained weight bit for bit, in any dtype. ``state_dict()`` always holds the pre-trained base weight, so
a state dict loaded into a freshly wrapped model never applies an update twice.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, Linear as TimmLinear
from timm.layers.conv2d_same import conv2d_same
from timm.layers.padding import pad_same
from torch import nn

from ..errors import AdapterError
from . import batch_context
from .state import GRFTState
from .structures import LayerGeometry, Update, create_update

__all__ = ["GRFTLayer", "GRFTLinear", "GRFTConv2d", "wrap_layer", "grft_layers", "own_class"]

_PLAIN_LINEAR_TYPES = (nn.Linear, TimmLinear, nn.modules.linear.NonDynamicallyQuantizableLinear)
_PLAIN_CONV_TYPES = (nn.Conv2d, Conv2dSame)


def own_class(module: nn.Module) -> type:
    """The module's class, seen through the class :mod:`grft_vision.tuner.owned` gives modules owning adapter
    tensors."""
    return getattr(type(module), "grft_base_class", type(module))


def _sync_after_load(module: "GRFTLayer", incompatible_keys: Any) -> None:
    module.sync()


class GRFTLayer(nn.Module):
    """Common part of the wrappers: base layer, named updates, writing and restoring.

    Args:
        base_layer: the layer to wrap (its parameters are frozen).
        state: the model's :class:`~grft_vision.tuner.state.GRFTState`.
        name: the layer's name in the model (for messages).
        batch_layout: where the batch is in the layer's input (:mod:`.batch_context`).

    Attributes:
        base_layer: the wrapped ``nn.Linear`` / ``nn.Conv2d`` (or subclass), weight and bias frozen.
        grft_updates: one :class:`~grft_vision.tuner.structures.Update` per adapter name.
    """

    _plain_types: tuple[type, ...] = ()
    merge_may_fail = False  # the weight's format may be unable to store a merge (checked before every merge)

    def __init__(self, base_layer: nn.Module, state: GRFTState, name: str = "",
                 batch_layout: batch_context.BatchLayout = batch_context.BatchLayout()) -> None:
        super().__init__()
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.grft_updates = nn.ModuleDict()
        self.grft_state = state
        self.grft_name = name
        self.batch_layout = batch_layout
        self._plain = own_class(base_layer) in self._plain_types
        # what is written into the base weight: (adapter, with its trainable entries?) and the values it replaced
        self._written: tuple[str, bool] | None = None
        device = base_layer.weight.device
        self.register_buffer("_written_index", torch.empty(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("_written_before", base_layer.weight.new_empty(0), persistent=False)
        self.register_buffer("_written_bias", base_layer.weight.new_empty(0), persistent=False)
        self.register_load_state_dict_post_hook(_sync_after_load)

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, structure: str, indices: torch.Tensor, *, train_bias: bool,
                    keep_float32: bool = True) -> Update:
        """Add the update of adapter ``name`` with the given chosen entries (zero at creation)."""
        base = self.base_layer
        update = create_update(structure, self._update_template(), indices, groups=getattr(base, "groups", 1),
                               train_bias=train_bias and base.bias is not None, keep_float32=keep_float32)
        self.grft_updates[name] = update
        return update

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The base weight's logical shape (``[out, in]`` or ``[out, in/g, kh, kw]``)."""
        return tuple(self.base_layer.weight.shape)

    def _update_template(self) -> torch.Tensor:
        """What an update is made from: a tensor of the weight's shape, dtype and device."""
        return self.base_layer.weight

    def _current_weight(self) -> torch.Tensor:
        """The weight the base layer computes with now (what is written included)."""
        return self.base_layer.weight

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``'s update (restoring whatever of it is written)."""
        if self._written is not None and self._written[0] == name:
            self._restore()
        del self.grft_updates[name]

    def set_frozen(self, name: str, index: torch.Tensor, value: torch.Tensor) -> None:
        """Replace adapter ``name``'s frozen entries (see :meth:`Update.set_frozen`) and rewrite them."""
        self._restore()
        self.grft_updates[name].set_frozen(index, value)
        self.sync()

    @property
    def active_adapter(self) -> str | None:
        """The model's active adapter (this layer may have no update for it)."""
        return self.grft_state.active

    @property
    def update(self) -> Update | None:
        """The active adapter's update in this layer, or None."""
        name = self.grft_state.active
        return self.grft_updates[name] if name is not None and name in self.grft_updates else None

    @property
    def merged(self) -> bool:
        """This layer's active update is merged into the base weight."""
        return self.update is not None and self._written == (self.grft_state.active, True)

    @property
    def disabled(self) -> bool:
        return self.grft_state.disabled

    def _active(self) -> Update:
        update = self.update
        if update is None:
            raise AdapterError(f"layer {self.grft_name!r} has no update of the active adapter "
                               f"({self.grft_state.active!r}; its adapters: {list(self.grft_updates)}).")
        return update

    # the active update's tensors and layout
    @property
    def delta(self) -> nn.Parameter:
        return self._active().delta

    @property
    def indices(self) -> torch.Tensor:
        return self._active().indices

    @property
    def structure(self) -> str:
        return self._active().structure

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        return self._active().scatter(values)

    def extract(self, dense: torch.Tensor) -> torch.Tensor:
        return self._active().extract(dense)

    def delta_weight(self) -> torch.Tensor:
        return self._active().delta_weight()

    # ------------------------------------------------------------------ writing into the base weight
    def _wanted_written(self) -> tuple[str, bool] | None:
        state, update = self.grft_state, self.update
        if update is None or state.disabled:
            return None
        if state.merged:
            return state.active, True
        return (state.active, False) if update.frozen_index.numel() else None

    def _written_values(self, name: str, trainable: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(unique flat positions, new weight values there, new bias or None)`` of writing an update."""
        update = self.grft_updates[name]
        weight = self.base_layer.weight.detach()
        positions, values = update.written_entries(trainable)
        index, inverse = torch.unique(positions, return_inverse=True)
        summed = torch.zeros(len(index), dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32,
                             device=weight.device).index_add_(0, inverse, values.to(weight.device))
        before = self.pristine_weight().reshape(-1)[index].clone()
        new_weight = (before.to(summed.dtype) + summed).to(weight.dtype)
        new_bias = None
        if trainable and update.bias_delta is not None:
            bias = self.pristine_bias()
            new_bias = (bias.to(summed.dtype) + update.bias_delta.detach().to(summed.dtype)).to(bias.dtype)
        return index, new_weight, new_bias

    def check_finite(self, name: str, where: str) -> None:
        """Raise :class:`AdapterError` naming ``where`` if merging adapter ``name`` gives NaN/inf weights."""
        _, new_weight, new_bias = self._written_values(name, trainable=True)
        if not torch.isfinite(new_weight).all() or (new_bias is not None and not torch.isfinite(new_bias).all()):
            raise AdapterError(f"merging adapter {name!r} gives non-finite weights in layer {where!r}; its update "
                               "holds NaN/inf (the run diverged?). Nothing was merged.")

    def _write(self, name: str, trainable: bool) -> None:
        index, new_weight, new_bias = self._written_values(name, trainable)
        weight = self.base_layer.weight
        with torch.no_grad():
            self._written_index = index
            self._written_before = weight.reshape(-1)[index].clone()
            weight.view(-1)[index] = new_weight
        self._write_bias(new_bias)
        self._written = (name, trainable)

    def _restore(self) -> None:
        """Put back the values the written update replaced (exactly)."""
        if self._written is None:
            return
        with torch.no_grad():
            self.base_layer.weight.view(-1)[self._written_index] = self._written_before
        self._restore_bias()
        self._written = None
        self._written_index, self._written_before = self._written_index[:0], self._written_before[:0]

    def _write_bias(self, new_bias: torch.Tensor | None) -> None:
        """Write ``new_bias`` (None: leave the bias) into the base layer, keeping the values it replaces."""
        if new_bias is None:
            return
        with torch.no_grad():
            self._written_bias = self.base_layer.bias.detach().clone()
            self.base_layer.bias.copy_(new_bias)

    def _restore_bias(self) -> None:
        """Put back the bias :meth:`_write_bias` replaced (exactly), if it replaced one."""
        if self._written_bias.numel():
            with torch.no_grad():
                self.base_layer.bias.copy_(self._written_bias)
            self._written_bias = self._written_bias[:0]

    def sync(self, rewrite: bool = False) -> None:
        """Make what is written into the base weight match the model's state (active, merged, disabled, frozen
        entries); ``rewrite`` writes it again even when it already matches (the update's values changed)."""
        wanted = self._wanted_written()
        if wanted != self._written or (rewrite and wanted is not None):
            self._restore()
            if wanted is not None:
                self._write(*wanted)

    @contextmanager
    def unwritten(self) -> Iterator[None]:
        """A context in which nothing is written into the base weight (to change an update safely); on exit
        the base weight holds again what the state asks for."""
        self._restore()
        try:
            yield
        finally:
            self.sync()

    def pristine_weight(self) -> torch.Tensor:
        """The pre-trained base weight, whatever is written into it (a copy when something is)."""
        weight = self.base_layer.weight.detach()
        if self._written is None:
            return weight
        pristine = weight.clone()
        pristine.view(-1)[self._written_index] = self._written_before
        return pristine

    def pristine_bias(self) -> torch.Tensor | None:
        bias = self.base_layer.bias
        if bias is None or not self._written_bias.numel():
            return None if bias is None else bias.detach()
        return self._written_bias.clone()

    def detach_base(self, merge: bool) -> nn.Module:
        """The base layer to put back in the model: with the active update merged, or exactly pre-trained."""
        self._restore()
        if merge and self.update is not None:
            self._write(self.grft_state.active, True)
        self._written = None  # whatever is written stays: the layer leaves the wrapper
        return self.base_layer

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        destination = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self._written is not None:  # the pre-trained values, never the written ones
            destination[prefix + "base_layer.weight"] = self.pristine_weight()
            if self.base_layer.bias is not None:
                destination[prefix + "base_layer.bias"] = self.pristine_bias()
        return destination

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._restore()  # loads into the pre-trained weight; the post hook writes what the new state wants
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ forward
    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, for code that reads ``layer.weight`` directly (BEiT's attention).

        Materialises a dense tensor; the wrapper's own forward never calls this on the channel paths.
        """
        base = self._current_weight()
        batch = None if self.grft_state.disabled else batch_context.current(self.grft_state)
        if batch is None:  # what is written plus the live update
            update = self._live_update()
            return base if update is None else base + update.delta_weight().to(base.dtype)
        update = self._uniform_update(batch, "weight")
        weight = self._base_weight()
        return weight if update is None else weight + update.dense_change().to(weight.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        """The effective bias (base bias plus the bias delta of the adapter that applies)."""
        base = self.base_layer.bias
        if base is None or self.grft_state.disabled:
            return base
        batch = batch_context.current(self.grft_state)
        if batch is None:
            update = self._live_update()
        else:
            update, base = self._uniform_update(batch, "bias"), self.pristine_bias()
        if update is None or update.bias_delta is None:
            return base
        return base + update.bias_delta.to(base.dtype)

    def _uniform_update(self, batch: batch_context.AdapterBatch, name: str) -> Update | None:
        """The update of a uniform batch's adapter, for a direct read of ``weight`` / ``bias``."""
        if not batch.uniform:
            raise AdapterError(f"the model reads layer {self.grft_name!r}'s {name} directly (bypassing its forward), "
                               "so a batch of mixed adapters cannot give each sample its own update; run one adapter "
                               "at a time.")
        return self._group_update(batch.names[0])

    def _live_update(self) -> Update | None:
        """The update the forward adds: the active one, unless it is merged into the weight."""
        update = self.update
        if update is None or self._written != (self.grft_state.active, True):
            return update
        if self.training and torch.is_grad_enabled() and update.delta.requires_grad:
            raise AdapterError(f"adapter {self.grft_state.active!r} is merged into the weights, so a training step "
                               "would change only the tensors it trains in full (the head), not its updates; call "
                               "grft_vision.unmerge_adapter(model) before training.")
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.grft_state
        if state.disabled:  # nothing is written while disabled: the base layer is the base model
            return self.base_layer(x)
        batch = batch_context.current(state)
        if batch is not None:
            return self._mixed_forward(x, batch)
        update = self._live_update()
        return self.base_layer(x) if update is None else self._forward_with(update, x)

    def _forward_with(self, update: Update, x: torch.Tensor) -> torch.Tensor:
        """The base output plus ``update``'s contribution (bias delta included)."""
        if not update.has_channel_form(self.geometry):  # the base's own forward with the materialised weight
            weight = self.base_layer.weight
            tensors = {"weight": weight + update.delta_weight().to(weight.dtype)}
            if update.bias_delta is not None:
                tensors["bias"] = self.base_layer.bias + update.bias_delta.to(weight.dtype)
            return torch.func.functional_call(self.base_layer, tensors, (x,))
        bias = self.base_layer.bias
        if update.bias_delta is not None:
            bias = bias + update.bias_delta.to(bias.dtype)
        if not update.delta.numel():  # nothing chosen yet (incremental schedules): the base layer, bias delta added
            return self.base_layer(x) if update.bias_delta is None else self._base_forward(x, bias)
        return self._update_forward(update, x, bias)

    def _mixed_forward(self, x: torch.Tensor, batch: batch_context.AdapterBatch) -> torch.Tensor:
        """Every row of ``x`` with its own adapter's update: the base output once, then each adapter's part.

        Whatever is written into the weight (the frozen entries of the active adapter's mask schedule) is
        not part of the base here: the base output uses the pre-trained weight, and an update with frozen
        entries runs with its whole dense change.
        """
        dim = self.batch_layout.dim
        groups = batch.groups(x.shape[dim] if x.dim() > dim else 0, x.device, batch_major=self.batch_layout.batch_major,
                              where=f"layer {self.grft_name!r}")
        if len(groups) == 1 and self._written is None:  # one adapter: the layer's own paths, fused included
            update = self._group_update(groups[0][0])
            if update is None:
                return self.base_layer(x)
            return self._dense_forward(update, x) if update.frozen_index.numel() else self._forward_with(update, x)
        y = self._base_output(x)
        for name, rows in groups:
            update = self._group_update(name)
            if update is None:
                continue
            inputs = x.index_select(dim, rows)
            if update.has_channel_form(self.geometry) and not update.frozen_index.numel():
                part = y.index_select(dim, rows)
                part = update.add_bias_to(part) if update.bias_delta is not None else part
                part = update.add_to(part, inputs, self._conv) if update.delta.numel() else part
            else:
                part = self._dense_forward(update, inputs)
            y = y.index_copy(dim, rows, part)
        return y

    def _base_weight(self) -> torch.Tensor:
        """The pre-trained weight as a tensor the forward may use (a copy only when something is written)."""
        return self.base_layer.weight if self._written is None else self.pristine_weight()

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output with the pre-trained weight and bias, whatever is written into them."""
        if self._written is None:
            return self.base_layer(x)
        tensors = {"weight": self.pristine_weight()}
        if self.base_layer.bias is not None:
            tensors["bias"] = self.pristine_bias()
        return torch.func.functional_call(self.base_layer, tensors, (x,))

    def _dense_forward(self, update: Update, x: torch.Tensor) -> torch.Tensor:
        """The base layer's own forward with the pre-trained weight plus ``update``'s whole dense change."""
        weight = self._base_weight()
        tensors = {"weight": weight + update.dense_change().to(weight.dtype)}
        if update.bias_delta is not None:
            bias = self.pristine_bias()
            tensors["bias"] = bias + update.bias_delta.to(bias.dtype)
        return torch.func.functional_call(self.base_layer, tensors, (x,))

    def _group_update(self, name: str | None) -> Update | None:
        return self.grft_updates[name] if name is not None and name in self.grft_updates else None

    @property
    def geometry(self) -> LayerGeometry:
        """What the structures need to know of this layer to pick their computation."""
        return LayerGeometry(plain=self._plain)

    def _base_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _update_forward(self, update: Update, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base output with ``bias`` plus ``update``'s contribution (a channel form exists)."""
        raise NotImplementedError

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        raise NotImplementedError

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "grft_updates"):
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"adapters={list(self.grft_updates)}"


class GRFTLinear(GRFTLayer):
    """GRFT wrapper of an ``nn.Linear`` (weight ``[out, in]``); input ``[..., in]``, output ``[..., out]``."""

    _plain_types = _PLAIN_LINEAR_TYPES

    def _base_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.base_layer.weight, bias)

    def _update_forward(self, update: Update, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return update.linear_forward(x, self.base_layer.weight, bias)


class GRFTConv2d(GRFTLayer):
    """GRFT wrapper of an ``nn.Conv2d`` (weight ``[out, in/g, kh, kw]``, any ``groups`` g, depthwise included).

    Input ``[N, in, H, W]``, output ``[N, out, H', W']``. Row and column updates run as extra small
    convolutions over the chosen channels only. A sparse update of a patchifying convolution (stride equal to
    the kernel, no padding, dilation or groups: a ViT's patch embedding) runs as a sparse linear map over the
    non-overlapping patches; structures without a channel form for a convolution run, like convolution
    subclasses with their own forward (e.g. timm's ``StdConv2d``), the base layer with the materialised
    effective weight.
    """

    _plain_types = _PLAIN_CONV_TYPES

    def __init__(self, base_layer: nn.Module, state: GRFTState, name: str = "",
                 batch_layout: batch_context.BatchLayout = batch_context.BatchLayout()) -> None:
        super().__init__(base_layer, state, name, batch_layout)
        base = base_layer
        unpadded = tuple(base.padding) == (0, 0) and tuple(base.dilation) == (1, 1) and own_class(base) is nn.Conv2d
        self._patchify = unpadded and base.groups == 1 and tuple(base.stride) == tuple(base.kernel_size)
        self._subsampling = unpadded and tuple(base.kernel_size) == (1, 1) and tuple(base.stride) != (1, 1)

    @property
    def geometry(self) -> LayerGeometry:
        return LayerGeometry(plain=self._plain, patchify=self._patchify)

    def _base_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, Conv2dSame):
            return conv2d_same(x, base.weight, bias, base.stride, base.padding, base.dilation, base.groups)
        return base._conv_forward(x, base.weight, bias)

    def _update_forward(self, update: Update, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return update.add_to(self._base_forward(x, bias), x, self._conv)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        """A bias-free convolution with the base layer's stride, padding (mode) and dilation.

        A strided 1x1 convolution without padding (ResNet's downsample) reads every stride-th pixel: it runs
        as the 1x1 convolution of the subsampled input, the same values, because inductor (torch 2.14, CPU)
        compiles the backward of ``conv2d(x.index_select(1, idx), w, stride=2)`` to a wrong weight gradient.
        """
        base = self.base_layer
        padding, stride = base.padding, base.stride
        if isinstance(base, Conv2dSame):
            x, padding = pad_same(x, weight.shape[-2:], base.stride, base.dilation), 0
        elif base.padding_mode != "zeros":
            x, padding = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode), 0
        elif self._subsampling:
            x, stride = x[:, :, ::stride[0], ::stride[1]], 1
        return F.conv2d(x, weight, None, stride, padding, base.dilation, groups)


def wrap_layer(layer: nn.Module, state: GRFTState, name: str = "",
               batch_layout: batch_context.BatchLayout = batch_context.BatchLayout()) -> GRFTLayer:
    """Wrap one ``nn.Linear`` or ``nn.Conv2d`` (subclasses included); it holds no adapter yet."""
    if isinstance(layer, nn.Linear):
        return GRFTLinear(layer, state, name, batch_layout)
    if isinstance(layer, nn.Conv2d):
        return GRFTConv2d(layer, state, name, batch_layout)
    raise TypeError(f"GRFT wraps nn.Linear and nn.Conv2d layers, not {type(layer).__name__}.")


def grft_layers(model: nn.Module) -> Iterator[tuple[str, GRFTLayer]]:
    """Yield ``(module name, wrapper)`` for every GRFT wrapper in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, GRFTLayer):
            yield name, module
