"""What a structure is: one class that owns every rule about one shape of update, and the registry of them.

A structure (row, column, sparse, tap column, or one registered by a user) is a subclass of :class:`Update`.
Its class methods are the rules selection and file code ask for — how many candidate units a weight offers,
one score per unit from a per-parameter score tensor, the top-k choice, what one unit costs in parameters,
how indices look and when they are valid, which ``delta`` shape they give — and an instance is one adapter's
change to one frozen weight: an int64 buffer ``indices`` naming the chosen units, one trainable parameter
``delta`` holding exactly the chosen entries (zero at creation), an optional trainable ``bias_delta`` (the
change of the layer's bias), and *frozen entries*: changes at flat weight positions that no longer train
(``frozen_index`` int64, ``frozen_value`` fp32; empty unless a mask schedule moved the trainable entries).
The changed weight is ``W + scatter(delta) + frozen``; an update never builds it during training when a
channel form exists (:meth:`Update.add_to`, :meth:`Update.linear_forward`).

No code outside a structure branches on its name: it asks :data:`STRUCTURES` for the class and calls these
methods. Adding a structure is one subclass registered with :func:`register_structure`.

Parameters an optimizer may hold are never replaced by loading: :meth:`Update.load_values` copies indices and
values into the existing tensors and refuses a change of shape; only :meth:`Update.set_indices` (the mask
schedules, which carry the optimizer state over themselves) makes a new ``delta``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ...errors import AdapterError, SelectionError
from ...registry import Registry
from ..dtypes import Float32Masters, adapter_dtype

__all__ = ["Update", "LayerGeometry", "STRUCTURES", "register_structure", "top_k_sorted", "ConvFn",
           "FILE_SUFFIXES"]

ConvFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (input, weight, groups) -> output
STRUCTURES: Registry[type["Update"]] = Registry("structure")
# an update's tensors in an adapter file, under "<layer name><suffix>"
FILE_SUFFIXES = {"indices": ".grft_indices", "delta": ".grft_delta", "bias_delta": ".grft_bias_delta",
                 "frozen_index": ".grft_frozen_index", "frozen_value": ".grft_frozen_value"}


def register_structure(cls: type["Update"]) -> type["Update"]:
    """Add a structure class to :data:`STRUCTURES` under ``cls.structure`` (usable as a class decorator).

    Raises:
        ConfigError: the name is taken, or ``cls`` is not an :class:`Update` subclass with a ``structure`` name.
    """
    if not (isinstance(cls, type) and issubclass(cls, Update) and isinstance(getattr(cls, "structure", None), str)):
        from ...errors import ConfigError

        raise ConfigError(f"{cls!r} is not a structure: subclass grft_vision.tuner.structures.Update and set "
                          "its class attribute `structure` to the name.")
    STRUCTURES.register(cls.structure, cls)
    return cls


def top_k_sorted(values: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest values along the last dim, ties to the lower index, ascending."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :count]
    return torch.sort(order, dim=-1).values


@dataclass(frozen=True)
class LayerGeometry:
    """What a structure needs to know of the layer it runs in to pick its computation.

    Attributes:
        plain: the layer's class computes exactly ``F.linear`` / ``F.conv2d`` (no own forward such as timm's
            ``StdConv2d``), so an update's contribution can be added to its output.
        patchify: a convolution with stride = kernel, no padding, dilation or groups (a ViT's patch embedding).
    """

    plain: bool
    patchify: bool = False


class Update(Float32Masters):
    """One adapter's change to one weight, and (as class methods) the rules of its structure.

    Args:
        weight: the frozen weight, ``[out, in]`` or ``[out, in/g, kh, kw]`` (only its shape, dtype, device are read).
        indices: the chosen units (:meth:`choose`'s layout).
        groups: the convolution's ``groups`` (1 for linear layers).
        train_bias: also train a ``bias_delta`` of shape ``[out]``.
        keep_float32: keep the trained tensors fp32 for a half-precision weight (:mod:`grft_vision.tuner.dtypes`).
    """

    structure: ClassVar[str]
    unit_label: ClassVar[str] = "units"  # what one candidate is called in messages ("rows", ...)
    per_row: ClassVar[bool] = False  # indices [out, k] (every row chooses its own) instead of [k]
    # base matmul and update in one autograd node, for linear layers (grft_vision.tuner.fused)
    linear_function: ClassVar[Callable | None] = None

    # ------------------------------------------------------------------ rules of the structure (class methods)
    @classmethod
    def for_layer(cls, layer: nn.Module, config: Any) -> str:
        """The structure a layer gets when a config asks for this one (a variant may be chosen per layer)."""
        return cls.structure

    @classmethod
    def applies_to(cls, weight_shape: tuple[int, ...]) -> bool:
        """True when this structure can hold an update of a weight of ``weight_shape``."""
        return True

    @classmethod
    def candidate_count(cls, weight_shape: tuple[int, ...], groups: int = 1) -> int:
        """Number of candidate units one weight offers (rows, input channels, entries per row, ...)."""
        raise NotImplementedError

    @classmethod
    def unit_scores(cls, score: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """One score per candidate unit, float64: ``[candidates]``, or ``[out, candidates]`` when :attr:`per_row`.

        ``score`` is a per-parameter importance of the weight's shape; units score the sum of their entries.
        """
        raise NotImplementedError

    @classmethod
    def unit_cost(cls, weight_shape: tuple[int, ...], groups: int = 1) -> int:
        """Trainable parameters one unit adds."""
        raise NotImplementedError

    @classmethod
    def unit_values(cls, score: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The value of a layer's units in the order they would be taken, per parameter, non-increasing (``[n]``):
        what a global budget ranks across layers."""
        return cls.unit_scores(score, groups).sort(descending=True).values / cls.unit_cost(tuple(score.shape), groups)

    @classmethod
    def resolve_count(cls, k: int | float, weight_shape: tuple[int, ...], groups: int = 1, *,
                      layer_name: str = "<layer>", clamp: bool = False) -> int:
        """Turn ``k`` (a count, or a fraction of the candidates) into a number of units for one weight.

        Raises:
            SelectionError: k is larger than the layer's dimension and ``clamp`` is False.
        """
        dimension = cls.candidate_count(weight_shape, groups)
        count = max(1, int(k * dimension + 0.5)) if isinstance(k, float) else int(k)
        if count > dimension:
            if clamp:
                return dimension
            raise SelectionError(
                f"k={k} is larger than layer {layer_name!r}, which has {dimension} {cls.unit_label}. Use k <= "
                f"{dimension}, a fraction such as k=0.01, set clamp_k=True, or exclude the layer with "
                f"exclude_modules=['{layer_name}'].")
        return count

    @classmethod
    def choose(cls, score: torch.Tensor, count: int, groups: int = 1) -> torch.Tensor:
        """The ``count`` best units, int64 ascending (``[count]``, or ``[out, count]`` when :attr:`per_row`);
        ties go to the lower index."""
        return top_k_sorted(cls.unit_scores(score, groups), count)

    @classmethod
    def shape_for(cls, weight_shape: tuple[int, ...], count: int, groups: int = 1) -> tuple[int, ...]:
        """``delta``'s shape for ``count`` chosen units of a weight of ``weight_shape``."""
        raise NotImplementedError

    @classmethod
    def index_problem(cls, indices: torch.Tensor, weight_shape: tuple[int, ...], groups: int = 1) -> str | None:
        """Why ``indices`` cannot be this structure's indices of a weight (None: they can)."""
        wanted_dim = 2 if cls.per_row else 1
        dimension = cls.candidate_count(weight_shape, groups)
        if indices.dtype not in (torch.int16, torch.int32, torch.int64) or indices.dim() != wanted_dim:
            return f"has dtype {indices.dtype} and {indices.dim()} dimensions (expected int, {wanted_dim})"
        if cls.per_row and indices.shape[0] != weight_shape[0]:
            return f"has {indices.shape[0]} rows for a weight with {weight_shape[0]}"
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= dimension):
            return f"holds values outside [0, {dimension})"
        if indices.numel() and bool((indices.sort(dim=-1).values.diff(dim=-1) == 0).any()):
            return "holds duplicates"
        return None

    @classmethod
    def fits(cls, weight_shape: tuple[int, ...], groups: int, indices_shape: tuple[int, ...],
             delta_shape: tuple[int, ...]) -> bool:
        """True when an update with these ``indices`` / ``delta`` shapes can be this structure's for the weight
        (how a wrapped state dict, which records no structure, is read)."""
        return (cls.applies_to(weight_shape) and len(indices_shape) == (2 if cls.per_row else 1)
                and tuple(cls.shape_for(weight_shape, indices_shape[-1], groups)) == tuple(delta_shape))

    # ------------------------------------------------------------------ one adapter's update of one weight
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

    @property
    def is_conv(self) -> bool:
        return len(self.weight_shape) == 4

    @property
    def count(self) -> int:
        """k: the number of chosen units (per row, when :attr:`per_row`)."""
        return int(self.indices.shape[-1])

    def delta_shape(self, count: int) -> tuple[int, ...]:
        return self.shape_for(self.weight_shape, count, self.groups)

    def has_channel_form(self, geometry: LayerGeometry) -> bool:
        """True when the contribution can be added to the base output without building the dense weight."""
        return geometry.plain

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """A dense tensor of the weight's shape holding ``values`` (``delta``'s layout) at the chosen entries."""
        raise NotImplementedError

    def extract(self, dense: torch.Tensor) -> torch.Tensor:
        """The entries of a weight-shaped tensor that the update covers, in ``delta``'s layout (the adjoint of
        :meth:`scatter`: ``extract(scatter(values)) == values``)."""
        raise NotImplementedError

    def _derive(self) -> None:
        """Precompute index tensors from ``indices`` (structures that need them)."""

    def add_to(self, y: torch.Tensor, x: torch.Tensor, conv: ConvFn | None = None) -> torch.Tensor:
        """Add the contribution of ``delta`` to the base output ``y`` of input ``x``, in place; returns ``y``.

        ``conv(input, weight, groups)`` is the base convolution's geometry (stride, padding, dilation) without bias.
        """
        raise NotImplementedError

    def linear_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` plus this update's contribution, as one autograd node (linear layers).

        The same values as ``add_to(F.linear(x, weight, bias), x)``, with a leaner backward pass
        (:mod:`grft_vision.tuner.fused`); structures without a fused function compose the two.
        """
        if self.linear_function is None:
            return self.add_to(torch.nn.functional.linear(x, weight, bias), x)
        return self.linear_function(x, weight, bias, self.indices, self.delta)

    # ------------------------------------------------------------------ indices and values
    def set_indices(self, indices: torch.Tensor) -> None:
        """Choose new entries; ``delta`` becomes a *new* zero parameter of the matching shape.

        Only for code that carries the optimizer over itself (mask schedules); loading uses :meth:`load_values`.
        """
        device = self.indices.device
        self.indices = indices.to(device=device, dtype=torch.long)
        self.delta = nn.Parameter(torch.zeros(self.delta_shape(self.count), dtype=self.delta.dtype, device=device),
                                  requires_grad=self.delta.requires_grad)
        self._indices_changed()

    def load_values(self, indices: torch.Tensor, delta: torch.Tensor, bias_delta: torch.Tensor | None,
                    frozen_index: torch.Tensor, frozen_value: torch.Tensor, *, where: str) -> None:
        """Copy loaded indices and values into the existing tensors: ``delta`` and ``bias_delta`` stay the same
        parameters (an optimizer built on them stays valid), whatever the indices.

        Raises:
            AdapterError: the loaded update has another shape (another k) than this one, or a bias delta where
                this one has none (or the reverse); nothing is changed.
        """
        if tuple(indices.shape) != tuple(self.indices.shape) or tuple(delta.shape) != tuple(self.delta.shape):
            raise AdapterError(
                f"{where}: the loaded update chooses {indices.shape[-1]} {self.unit_label} where the model's adapter "
                f"chooses {self.count} (delta {list(delta.shape)} vs {list(self.delta.shape)}); loading it would replace "
                "parameters an optimizer may hold. Load it under another adapter_name, or delete the adapter first.")
        if (bias_delta is None) != (self.bias_delta is None):
            raise AdapterError(f"{where}: the loaded update {'lacks' if bias_delta is None else 'has'} a bias delta, "
                               "which the model's adapter (and its config) contradict; save it again.")
        with torch.no_grad():
            if not torch.equal(self.indices, indices.to(self.indices.device, torch.long)):
                self.indices.copy_(indices)
                self._indices_changed()
            self.delta.copy_(delta)
            if bias_delta is not None:
                self.bias_delta.copy_(bias_delta)
        self.set_frozen(frozen_index, frozen_value)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """This update's tensors in an adapter file, keyed by :data:`FILE_SUFFIXES` name (indices in the smallest
        integer type that holds them: int16 below 32768, int32 above; the sparse structure's indices are as many
        as its entries, so this is a quarter of its file)."""
        small = not self.indices.numel() or int(self.indices.max()) <= torch.iinfo(torch.int16).max
        tensors = {"indices": self.indices.to(torch.int16 if small else torch.int32), "delta": self.delta.detach()}
        if self.bias_delta is not None:
            tensors["bias_delta"] = self.bias_delta.detach()
        if self.frozen_index.numel():
            tensors["frozen_index"] = self.frozen_index
            tensors["frozen_value"] = self.frozen_value
        return tensors

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

    def dense_change(self) -> torch.Tensor:
        """The whole change of the weight, ``scatter(delta) + frozen``, dense, in ``delta``'s dtype."""
        change = self.delta_weight()
        if self.frozen_index.numel():
            frozen = torch.zeros(change.numel(), dtype=change.dtype, device=change.device)
            frozen = frozen.index_add(0, self.frozen_index, self.frozen_value.to(change.dtype))
            change = change + frozen.view(change.shape)
        return change

    def positions(self) -> torch.Tensor:
        """Flat positions in the weight of ``delta``'s entries, in ``delta``'s layout (int64)."""
        numel = math.prod(self.weight_shape)
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
        self._indices_changed()  # the loaded indices (derived index tensors, L2 overlap) are the ones used

    def extra_repr(self) -> str:
        bias = ", bias_delta" if self.bias_delta is not None else ""
        frozen = f", frozen={self.frozen_index.numel()}" if self.frozen_index.numel() else ""
        return f"structure={self.structure}, k={self.count}, delta={tuple(self.delta.shape)}{bias}{frozen}"
