"""Mixed-adapter batches: one forward pass in which every sample uses its own adapter (or the base model).

::

    with mixed_adapters(model, ["dtd", "cifar100", None, "dtd"]):
        logits = model(images)          # sample i computed with adapter adapter_names[i]

Inside the context, every GRFT layer computes the frozen base output for the whole batch once and adds each
adapter's update to that adapter's rows only (no dense weight is built on the channel paths). A module
owning tensors that adapters train in full (the head, LayerScale, BatchNorm statistics, see
:mod:`grft_vision.owned_tensors`) runs once per group of samples with that group's values, its inputs
split along the first dimension. GRFT layers also accept inputs whose first dimension is a multiple of the
batch when the batch is the leading factor (Swin's windows: ``[B * windows, tokens, C]``).

Each sample's output equals running it alone with its adapter active, up to float rounding. Every adapter
must be unmerged and free of frozen entries (dynamic schedules) for the duration; adapters whose heads
have different numbers of classes cannot share a batch (their outputs differ in shape).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import AdapterError
from .owned_tensors import owned_tensors

__all__ = ["AdapterBatch", "current", "mixed_adapters"]

_state = threading.local()


class AdapterBatch:
    """The adapter of every sample of the batch being computed.

    Args:
        names: one adapter name (or None for the base model) per sample.
    """

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = list(names)
        self.uniform = len(set(self.names)) == 1
        self._groups: dict[tuple[int, torch.device], list[tuple[str | None, torch.Tensor]]] = {}

    def groups(self, length: int, device: torch.device | None = None) -> list[tuple[str | None, torch.Tensor]]:
        """``(adapter name, int64 row indices)`` over a leading dimension of ``length`` rows.

        ``length`` is the batch size or a multiple ``m`` of it, sample ``i`` owning rows ``i*m .. i*m+m-1``.

        Raises:
            AdapterError: ``length`` is not a multiple of the batch size.
        """
        size = len(self.names)
        if length % size:
            raise AdapterError(f"a layer's input has {length} rows in its first dimension, not a multiple of the "
                               f"{size} samples of the mixed-adapter batch; mixed batches need the batch as the "
                               "leading dimension of every wrapped layer's input.")
        key = (length, torch.device(device) if device is not None else torch.device("cpu"))
        if key not in self._groups:
            repeat = length // size
            order: dict[str | None, list[int]] = {}
            for sample, name in enumerate(self.names):
                order.setdefault(name, []).append(sample)
            self._groups[key] = [
                (name, (torch.tensor(samples)[:, None] * repeat + torch.arange(repeat)).reshape(-1).to(key[1]))
                for name, samples in order.items()]
        return self._groups[key]


def current() -> AdapterBatch | None:
    """The mixed-adapter batch being computed in this thread, or None outside :func:`mixed_adapters`."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


@contextmanager
def _pushed(batch: AdapterBatch) -> Iterator[None]:
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(batch)
    try:
        yield
    finally:
        stack.pop()


def _split_args(value: Any, rows: torch.Tensor, size: int) -> Any:
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == size:
        return value.index_select(0, rows.to(value.device))
    return value


def _gather_outputs(parts: list[tuple[torch.Tensor, Any]], size: int) -> Any:
    """Reassemble per-group outputs (tensors, or tuples / lists of them) into batch order."""
    first = parts[0][1]
    if isinstance(first, (tuple, list)):
        return type(first)(_gather_outputs([(rows, out[i]) for rows, out in parts], size) for i in range(len(first)))
    if not torch.is_tensor(first):
        raise AdapterError(f"a module owning adapter tensors returned {type(first).__name__}, which a mixed-adapter "
                           "batch cannot split by sample; run one adapter at a time.")
    shapes = {tuple(out.shape[1:]) for _, out in parts}
    if len(shapes) > 1:
        raise AdapterError(f"the adapters of this batch give outputs of different shapes {sorted(shapes)} (e.g. heads "
                           "with different numbers of classes); put adapters with equal heads in one batch.")
    result = first.new_empty((size, *first.shape[1:]))
    for rows, out in parts:
        result = result.index_copy(0, rows.to(out.device), out)
    return result


def _splitting_forward(owner: nn.Module, forward: Callable, tensors: list) -> Callable:
    """``owner``'s forward, run once per adapter group of the current batch with that group's owned values."""

    def run(*args: Any, **kwargs: Any) -> Any:
        batch = current()
        groups = batch.groups(len(batch.names))
        size = len(batch.names)
        parts = []
        try:
            for name, rows in groups:
                for parametrization in tensors:
                    parametrization.set_override(name)
                sub_args = [_split_args(a, rows, size) for a in args]
                sub_kwargs = {k: _split_args(v, rows, size) for k, v in kwargs.items()}
                if len(groups) == 1:
                    return forward(*sub_args, **sub_kwargs)
                with _pushed(AdapterBatch([name] * len(rows))):
                    parts.append((rows, forward(*sub_args, **sub_kwargs)))
        finally:
            for parametrization in tensors:
                parametrization.clear_override()
        return _gather_outputs(parts, size)

    return run


@contextmanager
def mixed_adapters(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[None]:
    """Compute sample ``i`` of every forward pass inside the context with adapter ``adapter_names[i]``.

    Args:
        model: a model wrapped by :func:`grft_vision.apply_grft` (several adapters loaded).
        adapter_names: one adapter name per sample of the batch, or None for the base model.

    Raises:
        AdapterError: an unknown adapter name, an empty list, or a merged adapter / frozen entries.
    """
    from .layers import grft_layers  # the layers read this module's batch: imported here, not at the top
    from .lifecycle import list_adapters

    names = list(adapter_names)
    known = list_adapters(model)
    unknown = sorted({name for name in names if name is not None and name not in known})
    if not names or unknown:
        raise AdapterError(f"adapter_names must name one loaded adapter (or None) per sample; unknown: {unknown}, "
                           f"loaded: {known}.")
    for layer_name, layer in grft_layers(model):
        if layer.merged or layer._written is not None:
            raise AdapterError(f"layer {layer_name!r} has an adapter merged or frozen entries written into its "
                               "weight; call grft_vision.unmerge_adapter(model) before a mixed-adapter batch.")
    by_owner: dict[int, tuple[nn.Module, list]] = {}
    for _, owner, _, parametrization in owned_tensors(model):
        by_owner.setdefault(id(owner), (owner, []))[1].append(parametrization)
    patched = []
    try:
        for owner, tensors in by_owner.values():
            patched.append((owner, owner.__dict__.get("forward")))
            owner.forward = _splitting_forward(owner, owner.forward, tensors)
        with _pushed(AdapterBatch(names)):
            yield
    finally:
        for owner, previous in patched:
            if previous is None:
                del owner.forward
            else:
                owner.forward = previous
