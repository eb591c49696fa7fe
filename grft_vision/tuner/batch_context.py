"""The per-thread, per-model context of a mixed-adapter batch: which adapter each sample uses (a leaf module).

:func:`grft_vision.mixed_adapters` pushes an :class:`AdapterBatch` for one model in the calling thread; the
wrapped layers and the modules owning adapter tensors of that model read it with :func:`current` while they
compute. Nothing shared is patched: another thread, or another model in the same thread, sees no batch.

How a module's input rows map to the batch's samples is known per module, never guessed from shapes: by
default a module's input has the batch as its leading dimension, one row per sample; a module inside a module
class registered with :func:`register_batch_layout` takes that class's layout — the batch in another
dimension (sequence-first code: ``[T, B, C]``), or every sample split into several rows batch-major (Swin's
and MaxViT's window attention: ``[B * windows, tokens, C]``, sample ``i`` owning rows ``i*m .. i*m+m-1``,
registered here). A row count that does not fit the batch is an error naming the module.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import AdapterError

__all__ = ["AdapterBatch", "BatchLayout", "current", "pushed", "split_forward", "register_batch_layout", "layout_of",
           "BATCH_LAYOUTS"]

_local = threading.local()


@dataclass(frozen=True)
class BatchLayout:
    """Where the batch is in a module's input: dimension ``dim``, one row per sample, or several rows per sample
    (a multiple of the batch, batch-major) when ``batch_major``."""

    dim: int = 0
    batch_major: bool = False


# "module.QualName" of module classes whose inner layers see the batch otherwise than one leading row per sample
BATCH_LAYOUTS: dict[str, BatchLayout] = {
    "timm.models.swin_transformer.WindowAttention": BatchLayout(batch_major=True),
    "timm.models.swin_transformer_v2.WindowAttention": BatchLayout(batch_major=True),
    "timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention": BatchLayout(batch_major=True),
    "timm.models.maxxvit.PartitionAttentionCl": BatchLayout(batch_major=True),
    "timm.models.maxxvit.PartitionAttention2d": BatchLayout(batch_major=True),
}


def register_batch_layout(cls: type[nn.Module] | str, *, dim: int = 0, batch_major: bool = False) -> None:
    """Declare where the layers inside modules of class ``cls`` see the batch: in dimension ``dim`` of their
    input (``dim=1`` for sequence-first code), and with several rows per sample, batch-major (``batch_major``:
    a window attention), so that mixed batches give every row its own sample's adapter."""
    BATCH_LAYOUTS[cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"] = BatchLayout(dim, batch_major)


def layout_of(modules: Sequence[nn.Module]) -> BatchLayout:
    """The batch layout of the last of ``modules`` (the root first, the module itself last): the layout of the
    innermost one whose class is registered, else the batch as the leading dimension."""
    for module in reversed(modules):
        for cls in type(module).__mro__:
            layout = BATCH_LAYOUTS.get(f"{cls.__module__}.{cls.__qualname__}")
            if layout is not None:
                return layout
    return BatchLayout()


class AdapterBatch:
    """The adapter of every sample of the batch being computed.

    Args:
        names: one adapter name (or None for the base model) per sample.
    """

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = list(names)
        self.uniform = len(set(self.names)) == 1
        self._groups: dict[tuple[int, bool, torch.device], list[tuple[str | None, torch.Tensor]]] = {}

    def __len__(self) -> int:
        return len(self.names)

    def rows_per_sample(self, length: int, batch_major: bool, where: str) -> int:
        """How many rows of a batch dimension of ``length`` each sample owns (1 unless ``batch_major``).

        Raises:
            AdapterError: ``length`` is not the batch size (or, for batch-major modules, a multiple of it).
        """
        size = len(self.names)
        if length == size:
            return 1
        if batch_major and length % size == 0:
            return length // size
        layout = f"a multiple of the {size} samples (batch-major)" if batch_major else f"the {size} samples"
        raise AdapterError(
            f"{where} gets {length} rows in its input's batch dimension, but a mixed-adapter batch needs {layout}: "
            "pass one adapter name per sample of the batch (len(adapter_names) == batch size). If this module's "
            "input holds the batch in another dimension, or splits every sample into several rows, declare its "
            "enclosing module class with grft_vision.tuner.batch_context.register_batch_layout.")

    def groups(self, length: int, device: torch.device | None = None, *, batch_major: bool = False,
               where: str = "a wrapped layer") -> list[tuple[str | None, torch.Tensor]]:
        """``(adapter name, int64 row indices)`` over a batch dimension of ``length`` rows (see
        :meth:`rows_per_sample`)."""
        repeat = self.rows_per_sample(length, batch_major, where)
        key = (length, batch_major, torch.device(device) if device is not None else torch.device("cpu"))
        if key not in self._groups:
            order: dict[str | None, list[int]] = {}
            for sample, name in enumerate(self.names):
                order.setdefault(name, []).append(sample)
            self._groups[key] = [
                (name, (torch.tensor(samples)[:, None] * repeat + torch.arange(repeat)).reshape(-1).to(key[2]))
                for name, samples in order.items()]
        return self._groups[key]


def _stacks() -> dict[int, list[AdapterBatch]]:
    stacks = getattr(_local, "stacks", None)
    if stacks is None:
        stacks = _local.stacks = {}
    return stacks


def current(state: object) -> AdapterBatch | None:
    """The mixed-adapter batch of the model whose state is ``state``, in this thread (None outside one)."""
    stack = getattr(_local, "stacks", {}).get(id(state))
    return stack[-1] if stack else None


@contextmanager
def pushed(state: object, batch: AdapterBatch) -> Iterator[None]:
    """Make ``batch`` the current batch of the model whose state is ``state``, in this thread, for the block."""
    stack = _stacks().setdefault(id(state), [])
    stack.append(batch)
    try:
        yield
    finally:
        stack.pop()
        if not stack:
            del _stacks()[id(state)]


def _split(value: Any, rows: torch.Tensor, length: int, dim: int) -> Any:
    if torch.is_tensor(value) and value.dim() > dim and value.shape[dim] == length:
        return value.index_select(dim, rows.to(value.device))
    return value


def _gather(parts: list[tuple[torch.Tensor, Any]], length: int, dim: int) -> Any:
    """Reassemble per-group outputs (tensors, or tuples / lists of them) into batch order along ``dim``."""
    first = parts[0][1]
    if isinstance(first, (tuple, list)):
        return type(first)(_gather([(rows, out[i]) for rows, out in parts], length, dim) for i in range(len(first)))
    if not torch.is_tensor(first):
        raise AdapterError(f"a module owning adapter tensors returned {type(first).__name__}, which a mixed-adapter "
                           "batch cannot split by sample; run one adapter at a time.")
    shapes = {tuple(out.shape[:dim] + out.shape[dim + 1:]) for _, out in parts}
    if len(shapes) > 1:
        raise AdapterError(f"the adapters of this batch give outputs of different shapes {sorted(shapes)} (e.g. heads "
                           "with different numbers of classes); put adapters with equal heads in one batch.")
    shape = list(first.shape)
    shape[dim] = length
    result = first.new_empty(shape)
    for rows, out in parts:
        result = result.index_copy(dim, rows.to(out.device), out)
    return result


def split_forward(state: object, batch: AdapterBatch, forward: Callable[..., Any], args: tuple, kwargs: dict, *,
                  layout: BatchLayout, where: str) -> Any:
    """Run ``forward`` once per adapter group of ``batch`` on that group's rows of every batch-sized tensor
    argument (the batch in dimension ``layout.dim``), with the group's adapter as a uniform batch of ``state``'s
    model; the outputs in batch order.

    Raises:
        AdapterError: the first tensor argument does not fit the batch, or the groups' outputs cannot be put
            back together.
    """
    dim = layout.dim
    first = next((value for value in (*args, *kwargs.values()) if torch.is_tensor(value) and value.dim() > dim), None)
    if first is None:
        return forward(*args, **kwargs)
    length = first.shape[dim]
    groups = batch.groups(length, first.device, batch_major=layout.batch_major, where=where)
    parts = []
    for name, rows in groups:
        sub_args = [_split(value, rows, length, dim) for value in args]
        sub_kwargs = {key: _split(value, rows, length, dim) for key, value in kwargs.items()}
        with pushed(state, AdapterBatch([name] * (len(rows) // (length // len(batch))))):
            parts.append((rows, forward(*sub_args, **sub_kwargs)))
    return _gather(parts, length, dim)
