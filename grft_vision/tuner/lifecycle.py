"""The adapters of a wrapped model: list, switch, delete, merge and unmerge, disable (PEFT's tuner API).

Every function takes the wrapped model itself (for ``DistributedDataParallel`` or a compiled model, the
module inside) and changes :class:`~grft_vision.tuner.state.GRFTState`, then makes the layers' written
weights follow it. Only the active adapter trains: switching moves ``requires_grad`` to the new adapter's
parameters, so build the optimizer after :func:`set_adapter`. Changing the adapters inside an open
``disable_adapter`` or ``mixed_adapters`` block is an error (see :mod:`grft_vision.tuner.state`).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from ..errors import AdapterError
from .layer import grft_layers
from .owned import owned_tensors, release_tensor
from .state import GRFTState, grft_state
from .trainable import set_trainable

__all__ = ["list_adapters", "set_adapter", "delete_adapter", "merge_adapter", "unmerge_adapter", "disable_adapter",
           "sync_layers", "replace_module"]


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added (empty for a plain model)."""
    state = getattr(model, "grft_state", None)
    return list(state.adapters) if isinstance(state, GRFTState) else []


def _known(state: GRFTState, name: str) -> None:
    if name not in state.adapters:
        raise AdapterError(f"the model has no adapter named {name!r}; its adapters are {list(state.adapters)}.")


def sync_layers(model: nn.Module, rewrite: bool = False) -> None:
    """Make every wrapped layer's written weight follow the model's state (see :meth:`GRFTLayer.sync`)."""
    for _, layer in grft_layers(model):
        layer.sync(rewrite)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in the place of the submodule called ``name``."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter (None: the model computes the base model); only its parameters train.

    A merged adapter is unmerged first (with a warning).

    Raises:
        AdapterError: no such adapter, or a context is open.
    """
    state = grft_state(model)
    state.check_changeable("set_adapter")
    if name is not None:
        _known(state, name)
    if name != state.active and state.merged:
        warnings.warn(f"adapter {state.active!r} is merged; unmerging it before switching to {name!r}.", stacklevel=2)
    if name != state.active:
        state.merged = False
    state.active = name
    sync_layers(model)
    set_trainable(model, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and everything it owns; layers and tensors no adapter uses any more go back to
    their plain form. Deleting the active adapter activates the first remaining one (or none)."""
    state = grft_state(model)
    state.check_changeable("delete_adapter")
    _known(state, name)
    for layer_name, layer in list(grft_layers(model)):
        if name in layer.grft_updates:
            layer.delete_adapter(name)
        if not len(layer.grft_updates):
            replace_module(model, layer_name, layer.detach_base(merge=False))
    for _, owner, tensor_name, owned in list(owned_tensors(model)):
        if name in owned.adapters:
            del owned.adapters[name]
        if not owned.adapters.keys():
            release_tensor(owner, tensor_name, keep=None)
    del state.adapters[name]
    if state.active == name:
        state.active, state.merged = None, False
        set_adapter(model, next(iter(state.adapters), None))


def merge_adapter(model: nn.Module, safe: bool = False) -> None:
    """Fold the active adapter's updates into the frozen weights, keeping the wrappers (PEFT's ``merge_adapter``).

    The forward then adds nothing: inference runs at the base model's cost. Merging again writes the
    current values again (an update changed since the last merge is not left stale). The values the updates
    replace are kept (as many as the updates hold), so :func:`unmerge_adapter` restores the weights bit for
    bit, for fp32 and half-precision weights alike; with half-precision weights the merged weights are
    rounded to that precision. A training step of a merged adapter is an error (its updates would not
    train): unmerge first.

    Args:
        safe: check every merged weight for NaN/inf before writing anything; raise naming the layer. Quantized
            layers are always checked (a merge they cannot store is refused before anything is written).

    Raises:
        AdapterError: no adapter is active, a context is open, or (``safe``) merging gives non-finite weights
            (nothing is merged).
    """
    state = grft_state(model)
    state.check_changeable("merge_adapter")
    if state.active is None:
        raise AdapterError("no adapter is active; call grft_vision.set_adapter(model, name) before merging.")
    for name, layer in grft_layers(model):  # layers whose format may refuse a merge are always checked first
        if layer.update is not None and (safe or layer.merge_may_fail):
            layer.check_finite(state.active, name)
    state.merged = True
    try:
        sync_layers(model, rewrite=True)
    except BaseException:
        state.merged = False
        sync_layers(model)
        raise


def unmerge_adapter(model: nn.Module) -> None:
    """Take the merged adapter out of the weights again (bit for bit); a no-op when nothing is merged."""
    state = grft_state(model)
    state.check_changeable("unmerge_adapter")
    state.merged = False
    sync_layers(model)


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """A context inside which the model computes exactly the base model (adapters off, merged ones taken out).

    Model-wide, as PEFT's: every forward of the model inside the block computes the base model, in any
    thread and whatever other context encloses it or it encloses (a mixed batch included); train-mode
    forwards leave the pre-trained BatchNorm statistics untouched. Blocks nest. On exit the previous state
    (active adapter, merged or not) is back. Changing the adapters inside is an error.
    """
    state = grft_state(model)
    with state.disabled_block(lambda: sync_layers(model)):
        yield
