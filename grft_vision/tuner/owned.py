"""Tensors an adapter trains in full (head, LayerScale gammas, norms, ...) or tracks (BatchNorm statistics), kept
per adapter so that the pre-trained values are never overwritten: PEFT's ``modules_to_save``, at the
granularity of single tensors.

Each such tensor of an *owner* module moves into ``owner.grft_owned.<name>`` (an :class:`OwnedTensor`): the
pre-trained value as ``original`` (frozen), every adapter's copy in ``adapters.<adapter>``. The owner's class
becomes a subclass of its own (:func:`owning_class`, one per base class and set of owned names) whose
attribute ``owner.<name>`` reads the value the model's state asks for: the active adapter's copy, the
original when no adapter applies (no adapter active, inside :func:`grft_vision.disable_adapter`, a ``None``
sample of a mixed batch), or a uniform mixed batch's adapter. Inside :func:`grft_vision.mixed_adapters` the
owner's forward runs once per group of samples (:func:`~.batch_context.split_forward`). The owning classes are
ordinary module-level classes to ``pickle`` and ``copy`` (:meth:`OwnerMixin.__reduce_ex__`), so a wrapped model
pickles, deep-copies (timm's model EMA) and spawns into worker processes.

The pre-trained tensors are never written: a statistic read in train mode with no adapter applying is a
scratch copy (BatchNorm updates it and it is dropped). Trained copies of half-precision tensors are fp32
masters, cast to the tensor's dtype where read (:mod:`.dtypes`); statistics follow the model's dtype.
State dicts written by earlier versions (keys ``<owner>.parametrizations.<name>.original`` and
``.0.adapters.<adapter>``) load into these keys.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import AdapterError
from . import batch_context
from .dtypes import Float32Masters, adapter_dtype
from .state import GRFTState

__all__ = ["OwnedTensor", "OwnerMixin", "owning_class", "own_tensor", "owned_tensors", "release_tensor",
           "owned_tensor_of"]

_KEY_ORDER = "_grft_key_order"  # attribute of an owner: its tensor names in their order before owning
_LEGACY_KEY = re.compile(r"parametrizations\.(?P<tensor>[^.]+)\.(?:original|0\.adapters\.(?P<adapter>[^.]+))$")


class AdapterCopies(Float32Masters):
    """One tensor's copies, by adapter name: parameters (trained) or buffers (statistics)."""

    def __init__(self, is_buffer: bool, keep_float32: bool) -> None:
        super().__init__()
        self.is_buffer = is_buffer
        self.keep_float32 = keep_float32 and not is_buffer

    def __getitem__(self, name: str) -> torch.Tensor:
        return (self._buffers if self.is_buffer else self._parameters)[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        if self.is_buffer:
            self.register_buffer(name, value)
        else:
            self.register_parameter(name, value)

    def __delitem__(self, name: str) -> None:
        del (self._buffers if self.is_buffer else self._parameters)[name]

    def __contains__(self, name: object) -> bool:
        return name in (self._buffers if self.is_buffer else self._parameters)

    def keys(self) -> list[str]:
        return list(self._buffers if self.is_buffer else self._parameters)


class OwnedTensor(nn.Module):
    """One owned tensor: the original and one copy per adapter; :meth:`value` is what a read returns now.

    Args:
        original: the pre-trained tensor (moved here, not copied).
        is_buffer: a buffer (statistics) rather than a parameter.
        state: the model's :class:`~grft_vision.tuner.state.GRFTState`.
        keep_float32: keep trained copies of half-precision tensors fp32.
    """

    def __init__(self, original: torch.Tensor, is_buffer: bool, state: GRFTState, keep_float32: bool = True) -> None:
        super().__init__()
        self.is_buffer = is_buffer
        if is_buffer:
            self.register_buffer("original", original)
        else:
            self.original = original if isinstance(original, nn.Parameter) else nn.Parameter(original)
            self.original.requires_grad_(False)
        self.adapters = AdapterCopies(is_buffer, keep_float32)
        self.grft_state = state

    def adapter_in_use(self) -> str | None:
        """The adapter whose copy a read returns now, or None for the original."""
        state = self.grft_state
        if state.disabled:
            return None
        batch = batch_context.current(state)
        if batch is None:
            name = state.active
        elif batch.uniform:
            name = batch.names[0]
        else:
            raise AdapterError("a module reads an adapter-owned tensor outside its owner's forward, so a batch of mixed "
                               "adapters cannot give each sample its own value; run one adapter at a time.")
        return name if name is not None and name in self.adapters else None

    def value(self) -> torch.Tensor:
        """The tensor a read of ``owner.<name>`` returns (see the module docstring)."""
        name = self.adapter_in_use()
        original = self.original
        if name is None:
            return original.clone() if self.is_buffer and self.training else original
        value = self.adapters[name]
        return value if value.dtype == original.dtype else value.to(original.dtype)

    def add(self, name: str) -> torch.Tensor:
        """Give adapter ``name`` its own copy of the original (an fp32 master for a trained half tensor)."""
        copy = self.original.detach().clone()
        if self.is_buffer:
            self.adapters[name] = copy
        else:
            dtype = adapter_dtype(copy.dtype, self.adapters.keep_float32)
            self.adapters[name] = nn.Parameter(copy.to(dtype), requires_grad=False)
        return self.adapters[name]

    def load(self, name: str, value: torch.Tensor, *, fresh: bool, where: str) -> None:
        """Copy ``value`` into adapter ``name``'s copy; a copy of another shape (a head with another number of
        classes) replaces it only when ``fresh`` (the adapter was just created, no optimizer can hold it).

        Raises:
            AdapterError: another shape, and not ``fresh``.
        """
        current = self.adapters[name]
        value = value.to(device=current.device)
        if value.shape == current.shape:
            with torch.no_grad():
                current.copy_(value)
            return
        if not fresh:
            raise AdapterError(f"{where}: the loaded value has shape {list(value.shape)}, the model's adapter "
                               f"{name!r} holds {list(current.shape)}; loading it would replace a parameter an "
                               "optimizer may hold. Load it under another adapter_name, or delete the adapter first.")
        if self.is_buffer:
            self.adapters[name] = value.to(current.dtype)
        else:
            self.adapters[name] = nn.Parameter(value.to(current.dtype), requires_grad=current.requires_grad)


class OwnerMixin:
    """The part every owning class adds to its base class: a mixed batch runs the forward per adapter group,
    and copies / pickles rebuild the owning class (:func:`owning_class`)."""

    grft_base_class: type
    grft_owned_names: tuple[str, ...]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        owned = self._modules["grft_owned"]
        state = owned.grft_state
        batch = None if state.disabled else batch_context.current(state)
        if batch is None or batch.uniform:
            return super().forward(*args, **kwargs)
        return batch_context.split_forward(state, batch, super().forward, args, kwargs, layout=owned.batch_layout,
                                           where=f"module {owned.owner_name!r}")

    def __reduce_ex__(self, protocol: int) -> tuple:
        return _rebuild_owner, (self.grft_base_class, self.grft_owned_names), self.__getstate__()


def _owned_property(name: str) -> property:
    def read(self: nn.Module) -> torch.Tensor:
        return self._modules["grft_owned"][name].value()

    def write(self: nn.Module, value: Any) -> None:
        raise AdapterError(f"{name!r} of {type(self).__name__} is owned by the model's adapters; change an adapter's "
                           f"copy (grft_vision.adapter_parameters) or unload the adapters first.")

    return property(read, write, doc=f"``{name}``: the value the model's adapter state gives (see grft_vision.tuner.owned).")


@functools.lru_cache(maxsize=None)
def owning_class(base: type, names: tuple[str, ...]) -> type:
    """The subclass of ``base`` whose modules own the tensors ``names`` (one class per base and names)."""
    namespace = {name: _owned_property(name) for name in names}
    namespace.update(grft_base_class=base, grft_owned_names=names, __module__=base.__module__)
    return type(f"Owning{base.__name__}", (OwnerMixin, base), namespace)


def _rebuild_owner(base: type, names: tuple[str, ...]) -> nn.Module:
    cls = owning_class(base, names)
    return cls.__new__(cls)


class _OwnedTensors(nn.ModuleDict):
    """``owner.grft_owned``: the owner's :class:`OwnedTensor` modules by tensor name."""

    def __init__(self, state: GRFTState, owner_name: str, batch_layout: batch_context.BatchLayout) -> None:
        super().__init__()
        self.grft_state = state
        self.owner_name = owner_name
        self.batch_layout = batch_layout


def _legacy_keys(owner: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Rename the keys earlier versions wrote (``torch.nn.utils.parametrize``) to today's."""
    for key in [key for key in state_dict if key.startswith(prefix + "parametrizations.")]:
        match = _LEGACY_KEY.match(key[len(prefix):])
        if match is not None:
            tail = "original" if match["adapter"] is None else f"adapters.{match['adapter']}"
            state_dict[f"{prefix}grft_owned.{match['tensor']}.{tail}"] = state_dict.pop(key)


def owned_tensor_of(owner: nn.Module, name: str) -> OwnedTensor | None:
    """The :class:`OwnedTensor` of ``owner.<name>``, or None when it is not owned."""
    owned = owner._modules.get("grft_owned")
    return owned[name] if owned is not None and name in owned else None


def own_tensor(owner: nn.Module, name: str, adapter: str, state: GRFTState, *, owner_name: str = "",
               batch_layout: batch_context.BatchLayout = batch_context.BatchLayout(),
               keep_float32: bool = True) -> torch.Tensor:
    """Give ``adapter`` its own copy of ``owner.<name>`` (a parameter or a buffer); returns the copy, which
    starts as the original (pre-trained) value."""
    owned_tensor = owned_tensor_of(owner, name)
    if owned_tensor is None:
        if "grft_owned" not in owner._modules:
            object.__setattr__(owner, _KEY_ORDER, {"_parameters": list(owner._parameters),
                                                   "_buffers": list(owner._buffers)})
            owner.grft_owned = _OwnedTensors(state, owner_name, batch_layout)
            handle = owner._register_load_state_dict_pre_hook(_legacy_keys, with_module=True)
            object.__setattr__(owner, "_grft_legacy_hook", handle.id)
        is_buffer = name in owner._buffers
        original = owner._buffers.pop(name) if is_buffer else owner._parameters.pop(name)
        owner.grft_owned[name] = OwnedTensor(original, is_buffer, state, keep_float32)
        base = getattr(type(owner), "grft_base_class", type(owner))
        owner.__class__ = owning_class(base, tuple(owner.grft_owned.keys()))
        owned_tensor = owner.grft_owned[name]
    return owned_tensor.add(adapter)


def owned_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, OwnedTensor]]:
    """Yield ``(qualified tensor name, owner module, tensor name, owned tensor)`` for every owned tensor."""
    for module_name, module in model.named_modules():
        owned = module._modules.get("grft_owned")
        if not isinstance(owned, _OwnedTensors):
            continue
        for name, owned_tensor in owned.items():
            yield (f"{module_name}.{name}" if module_name else name), module, name, owned_tensor


def release_tensor(owner: nn.Module, name: str, keep: str | None) -> None:
    """Make ``owner.<name>`` a plain tensor again: adapter ``keep``'s value, or the original (None).

    The owner's tensor order (hence its ``state_dict`` key order) and, once nothing is owned, its class are
    restored.
    """
    owned_tensor = owned_tensor_of(owner, name)
    if owned_tensor is None:
        return
    value = owned_tensor.original
    if keep is not None and keep in owned_tensor.adapters:  # the adapter's value, in the original's dtype
        value = owned_tensor.adapters[keep].detach().to(owned_tensor.original.dtype)
        if not owned_tensor.is_buffer:
            value = nn.Parameter(value, requires_grad=False)
    del owner.grft_owned[name]
    if owned_tensor.is_buffer:
        owner._buffers[name] = value
    else:
        owner._parameters[name] = value
    base = type(owner).grft_base_class
    remaining = tuple(owner.grft_owned.keys())
    owner.__class__ = owning_class(base, remaining) if remaining else base
    order = owner.__dict__[_KEY_ORDER]
    for slot, names in order.items():
        tensors = getattr(owner, slot)
        ordered = {key: tensors[key] for key in names if key in tensors}
        ordered.update({key: value for key, value in tensors.items() if key not in ordered})
        tensors.clear()
        tensors.update(ordered)
    if not remaining:
        del owner._modules["grft_owned"]
        owner._load_state_dict_pre_hooks.pop(owner.__dict__.pop("_grft_legacy_hook"), None)
        object.__delattr__(owner, _KEY_ORDER)
