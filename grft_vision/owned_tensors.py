"""Tensors an adapter trains in full (head, LayerScale gammas, norms, ...) or tracks (BatchNorm statistics),
kept per adapter so that the pre-trained values are never overwritten: PEFT's ``modules_to_save``, at the
granularity of single tensors.

Each such tensor of an *owner* module is replaced by a ``torch.nn.utils.parametrize`` parametrization,
:class:`AdapterTensor`: the pre-trained value stays in ``<owner>.parametrizations.<name>.original`` (frozen),
every adapter has its own copy in ``<owner>.parametrizations.<name>.0.adapters.<adapter>``, and reading
``owner.<name>`` gives the active adapter's copy (or the original when no adapter is active, or inside
:func:`grft_vision.disable_adapter`). Trained copies of half-precision tensors are fp32 masters, cast to the
tensor's dtype where read (:mod:`grft_vision.dtypes`); statistics follow the model's dtype, and in-place
updates of them (BatchNorm in train mode) land in the active adapter's copy.

Costs: every read of an owned tensor runs the parametrization (about 20 µs on a CPU), i.e. a few per
forward pass for a ViT's head, three per BatchNorm layer for a ResNet. Parametrized modules cannot be
pickled whole (``torch.save(model)``); save state dicts or adapter files instead.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from .dtypes import Float32Masters, adapter_dtype

__all__ = ["AdapterTensor", "adapter_tensor_of", "own_tensor", "owned_tensors", "release_tensor"]

_KEY_ORDER = "_grft_key_order"  # attribute of an owner: its tensor names in their order before parametrization


class _Buffers(nn.Module):
    """A dict of buffers keyed by adapter name (``nn.ParameterDict``'s twin for tensors that do not train)."""

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value)

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def keys(self):
        return self._buffers.keys()


class AdapterTensor(Float32Masters):
    """The parametrization of one owned tensor: one value per adapter, the original when none applies.

    Attributes:
        adapters: ``nn.ParameterDict`` (trained tensors) or a dict of buffers (statistics), by adapter name.
        active: the adapter whose value a read returns (None: the original).
        disabled: True inside :func:`grft_vision.disable_adapter`: reads return the original.
        override: set by mixed-adapter batches for one group of samples: ``(adapter name or None,)``, or None.
    """

    def __init__(self, is_buffer: bool, keep_float32: bool = True) -> None:
        super().__init__()
        self.is_buffer = is_buffer
        self.keep_float32 = keep_float32 and not is_buffer
        self.adapters = _Buffers() if is_buffer else nn.ParameterDict()
        self.active: str | None = None
        self.disabled = False
        self.override: tuple[str | None] | None = None

    def current(self) -> str | None:
        """The adapter whose value a read returns now, or None for the original."""
        if self.override is not None:
            name = self.override[0]
        else:
            name = None if self.disabled else self.active
        return name if name is not None and name in self.adapters else None

    def set_override(self, name: str | None) -> None:
        """Return adapter ``name``'s value (None: the original) whatever is active, until :meth:`clear_override`."""
        self.override = (name,)

    def clear_override(self) -> None:
        self.override = None

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        name = self.current()
        if name is None:
            return original
        value = self.adapters[name]
        return value if value.dtype == original.dtype else value.to(original.dtype)

    def add(self, name: str, original: torch.Tensor) -> torch.Tensor:
        """Give adapter ``name`` its own copy of ``original`` (fp32 master for a trained half tensor)."""
        copy = original.detach().clone()
        if self.is_buffer:
            self.adapters[name] = copy
        else:
            self.adapters[name] = nn.Parameter(copy.to(adapter_dtype(copy.dtype, self.keep_float32)),
                                               requires_grad=False)
        return self.adapters[name]


def adapter_tensor_of(owner: nn.Module, name: str) -> AdapterTensor | None:
    """The :class:`AdapterTensor` parametrizing ``owner.<name>``, or None."""
    if not parametrize.is_parametrized(owner, name):
        return None
    return next((p for p in owner.parametrizations[name] if isinstance(p, AdapterTensor)), None)


def _own_class(owner: nn.Module) -> None:
    """Give a parametrized module a class of its own before its parametrizations change.

    ``parametrize`` keeps a module's parametrized tensors as properties of a class it creates for the module,
    and ``copy.deepcopy`` (timm's model EMA, for one) shares that class between the copies: adding or removing
    a parametrization on one copy would add or remove the property on every other copy.
    """
    cls = type(owner)
    if parametrize.is_parametrized(owner):
        namespace = {key: value for key, value in cls.__dict__.items() if key not in ("__dict__", "__weakref__")}
        owner.__class__ = type(cls.__name__, cls.__bases__, namespace)


def own_tensor(owner: nn.Module, name: str, adapter: str, *, keep_float32: bool = True) -> torch.Tensor:
    """Give ``adapter`` its own copy of ``owner.<name>`` (a parameter or a buffer); returns the copy.

    The copy starts as the original (pre-trained) value.
    """
    parametrization = adapter_tensor_of(owner, name)
    if parametrization is None:
        _own_class(owner)
        if not hasattr(owner, _KEY_ORDER):
            object.__setattr__(owner, _KEY_ORDER, {"_parameters": list(owner._parameters),
                                                    "_buffers": list(owner._buffers)})
        parametrization = AdapterTensor(name in owner._buffers, keep_float32)
        parametrize.register_parametrization(owner, name, parametrization, unsafe=True)
    return parametrization.add(adapter, owner.parametrizations[name].original)


def owned_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, AdapterTensor]]:
    """Yield ``(qualified tensor name, owner module, tensor name, parametrization)`` for every owned tensor."""
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations):
            parametrization = adapter_tensor_of(module, name)
            if parametrization is not None:
                yield (f"{module_name}.{name}" if module_name else name), module, name, parametrization


def release_tensor(owner: nn.Module, name: str, keep_active: bool) -> None:
    """Make ``owner.<name>`` a plain tensor again: the active adapter's value (``keep_active``) or the original.

    The owner's tensor order (hence its ``state_dict`` key order) is restored.
    """
    parametrization = adapter_tensor_of(owner, name)
    if parametrization is None:
        return
    if not keep_active:
        parametrization.active = None
    parametrization.clear_override()
    _own_class(owner)
    parametrize.remove_parametrizations(owner, name, leave_parametrized=keep_active)
    order = getattr(owner, _KEY_ORDER, None)
    if order is not None:
        for slot, names in order.items():
            tensors = getattr(owner, slot)
            ordered = {key: tensors[key] for key in names if key in tensors}
            ordered.update({key: value for key, value in tensors.items() if key not in ordered})
            tensors.clear()
            tensors.update(ordered)
        if not parametrize.is_parametrized(owner):
            object.__delattr__(owner, _KEY_ORDER)
