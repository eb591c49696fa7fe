"""The per-thread, per-model context of a mixed-adapter batch: which adapter each sample uses (a leaf module).

:func:`grft_vision.mixed_adapters` pushes an :class:`AdapterBatch` for one model in the calling thread; the
wrapped layers and the modules owning adapter tensors of that model read it with :func:`current` while they
compute. Nothing shared is patched: another thread, or another model in the same thread, sees no batch.

How a module's input rows map to the batch's samples is known per module, never guessed from shapes:
a module's input has the batch as its leading dimension, one row per sample, unless the module lies inside
a module class registered with :func:`register_batch_major` — modules that split every sample into several
rows batch-major (Swin's and MaxViT's window attention: ``[B * windows, tokens, C]``, sample ``i`` owning
rows ``i*m .. i*m+m-1``). Any other row count is an error naming the module.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import AdapterError

__all__ = ["AdapterBatch", "current", "pushed", "split_forward", "register_batch_major", "is_batch_major",
           "BATCH_MAJOR_MODULES"]

_local = threading.local()
# "module.QualName" of module classes whose inner layers see each sample as several rows, batch-major
BATCH_MAJOR_MODULES: set[str] = {
    "timm.models.swin_transformer.WindowAttention",
    "timm.models.swin_transformer_v2.WindowAttention",
    "timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention",
    "timm.models.maxxvit.PartitionAttentionCl",
    "timm.models.maxxvit.PartitionAttention2d",
}


def register_batch_major(cls: type[nn.Module] | str) -> None:
    """Declare that the layers inside modules of class ``cls`` see every sample of a batch as several rows of
    their input's leading dimension, batch-major (e.g. a window attention), so mixed batches can serve them."""
    BATCH_MAJOR_MODULES.add(cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}")


def is_batch_major(ancestors: Sequence[nn.Module]) -> bool:
    """True when one of ``ancestors`` (the modules containing a module) is of a registered batch-major class."""
    return any(f"{cls.__module__}.{cls.__qualname__}" in BATCH_MAJOR_MODULES
               for module in ancestors for cls in type(module).__mro__)


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
        """How many rows of a leading dimension of ``length`` each sample owns (1 unless ``batch_major``).

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
            f"{where} gets {length} rows in its input's first dimension, but a mixed-adapter batch needs {layout}: "
            f"pass one adapter name per sample of the batch (len(adapter_names) == batch size). If this module's "
            "input splits every sample into several rows batch-major, declare its enclosing module class with "
            "grft_vision.tuner.batch_context.register_batch_major.")

    def groups(self, length: int, device: torch.device | None = None, *, batch_major: bool = False,
               where: str = "a wrapped layer") -> list[tuple[str | None, torch.Tensor]]:
        """``(adapter name, int64 row indices)`` over a leading dimension of ``length`` rows (see
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


def _split(value: Any, rows: torch.Tensor, length: int) -> Any:
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == length:
        return value.index_select(0, rows.to(value.device))
    return value


def _gather(parts: list[tuple[torch.Tensor, Any]], length: int) -> Any:
    """Reassemble per-group outputs (tensors, or tuples / lists of them) into batch order."""
    first = parts[0][1]
    if isinstance(first, (tuple, list)):
        return type(first)(_gather([(rows, out[i]) for rows, out in parts], length) for i in range(len(first)))
    if not torch.is_tensor(first):
        raise AdapterError(f"a module owning adapter tensors returned {type(first).__name__}, which a mixed-adapter "
                           "batch cannot split by sample; run one adapter at a time.")
    shapes = {tuple(out.shape[1:]) for _, out in parts}
    if len(shapes) > 1:
        raise AdapterError(f"the adapters of this batch give outputs of different shapes {sorted(shapes)} (e.g. heads "
                           "with different numbers of classes); put adapters with equal heads in one batch.")
    result = first.new_empty((length, *first.shape[1:]))
    for rows, out in parts:
        result = result.index_copy(0, rows.to(out.device), out)
    return result


def split_forward(state: object, batch: AdapterBatch, forward: Callable[..., Any], args: tuple, kwargs: dict, *,
                  batch_major: bool, where: str) -> Any:
    """Run ``forward`` once per adapter group of ``batch`` on that group's rows of every batch-sized tensor
    argument, with the group's adapter as a uniform batch of ``state``'s model; the outputs in batch order.

    Raises:
        AdapterError: the first tensor argument's leading dimension does not fit the batch, or the groups'
            outputs cannot be put back together.
    """
    first = next((value for value in (*args, *kwargs.values()) if torch.is_tensor(value) and value.dim() > 0), None)
    if first is None:
        return forward(*args, **kwargs)
    length = first.shape[0]
    groups = batch.groups(length, first.device, batch_major=batch_major, where=where)
    parts = []
    for name, rows in groups:
        sub_args = [_split(value, rows, length) for value in args]
        sub_kwargs = {key: _split(value, rows, length) for key, value in kwargs.items()}
        with pushed(state, AdapterBatch([name] * (len(rows) // (length // len(batch))))):
            parts.append((rows, forward(*sub_args, **sub_kwargs)))
    return _gather(parts, length)
