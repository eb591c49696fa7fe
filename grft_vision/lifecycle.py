"""The adapters of a wrapped model: list, switch, delete, merge and unmerge, disable (PEFT's tuner API).

Every function takes the wrapped model itself (for ``DistributedDataParallel`` or a compiled model, the
module inside). Only the active adapter trains: switching moves ``requires_grad`` to the new adapter's
parameters, so build the optimizer after :func:`set_adapter`.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from torch import nn

from .errors import AdapterError
from .layers import grft_layers
from .owned_tensors import owned_tensors, release_tensor
from .trainable import set_trainable

if TYPE_CHECKING:
    from .model import GRFTState

__all__ = ["list_adapters", "set_adapter", "delete_adapter", "merge_adapter", "unmerge_adapter", "disable_adapter"]


def _state(model: nn.Module) -> "GRFTState":
    from .model import grft_state

    return grft_state(model)


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added (empty for a plain model)."""
    state = getattr(model, "grft_state", None)
    return list(state.adapters) if state is not None else []


def _known(model: nn.Module, name: str) -> None:
    if name not in _state(model).adapters:
        raise AdapterError(f"the model has no adapter named {name!r}; its adapters are {list_adapters(model)}.")


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter (None: the model computes the base model); only its parameters train.

    A merged adapter is unmerged first (with a warning).
    """
    state = _state(model)
    if name is not None:
        _known(model, name)
    if name != state.active and any(layer.merged for _, layer in grft_layers(model)):
        warnings.warn(f"adapter {state.active!r} is merged; unmerging it before switching to {name!r}.", stacklevel=2)
    for _, layer in grft_layers(model):
        layer.set_adapter(name)
    for _, _, _, parametrization in owned_tensors(model):
        parametrization.active = name
    state.active = name
    set_trainable(model, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and everything it owns; layers and tensors no adapter uses any more go back to
    their plain form. Deleting the active adapter activates the first remaining one (or none)."""
    from .model import _replace_module

    state = _state(model)
    _known(model, name)
    for layer_name, layer in list(grft_layers(model)):
        if name in layer.grft_updates:
            layer.delete_adapter(name)
        if not len(layer.grft_updates):
            _replace_module(model, layer_name, layer.detach_base(merge=False))
    for _, owner, tensor_name, parametrization in list(owned_tensors(model)):
        if name in parametrization.adapters:
            del parametrization.adapters[name]
        if not len(list(parametrization.adapters.keys())):
            release_tensor(owner, tensor_name, keep_active=False)
    del state.adapters[name]
    if state.active == name:
        set_adapter(model, next(iter(state.adapters), None))


def merge_adapter(model: nn.Module, safe: bool = False) -> None:
    """Fold the active adapter's updates into the frozen weights, keeping the wrappers (PEFT's ``merge_adapter``).

    The forward then adds nothing: inference runs at the base model's cost. Merging twice is a no-op. The
    values the updates replace are kept (as many as the updates hold), so :func:`unmerge_adapter` restores
    the weights bit for bit, for fp32 and half-precision weights alike; with half-precision weights the merged
    weights are rounded to that precision, so merged outputs differ from unmerged ones by that rounding.

    Args:
        safe: check every merged weight for NaN/inf before writing anything; raise naming the layer.

    Raises:
        AdapterError: no adapter is active, or (``safe``) merging gives non-finite weights (nothing is merged).
    """
    state = _state(model)
    if state.active is None:
        raise AdapterError("no adapter is active; call grft_vision.set_adapter(model, name) before merging.")
    layers = [(name, layer) for name, layer in grft_layers(model) if layer.update is not None]
    if safe:
        for name, layer in layers:
            layer.check_finite(state.active, name)
    for _, layer in layers:
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Take the merged adapter out of the weights again (bit for bit); a no-op when nothing is merged."""
    _state(model)
    for _, layer in grft_layers(model):
        layer.unmerge()


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """A context inside which the model computes exactly the base model (adapters off, merged ones taken out).

    On exit the previous state (active adapter, merged or not) is back.
    """
    _state(model)
    layers = [layer for _, layer in grft_layers(model)]
    tensors = [parametrization for _, _, _, parametrization in owned_tensors(model)]
    previous = [layer.disabled for layer in layers], [parametrization.disabled for parametrization in tensors]
    for item in (*layers, *tensors):
        _set_disabled(item, True)
    try:
        yield
    finally:
        for item, flag in zip((*layers, *tensors), (*previous[0], *previous[1])):
            _set_disabled(item, flag)


def _set_disabled(item: nn.Module, disabled: bool) -> None:
    if hasattr(item, "set_disabled"):
        item.set_disabled(disabled)
    else:
        item.disabled = disabled
