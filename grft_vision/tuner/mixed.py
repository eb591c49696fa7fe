"""Mixed-adapter batches: one forward pass in which every sample uses its own adapter (or the base model).

::

    with mixed_adapters(model, ["dtd", "cifar100", None, "dtd"]):
        logits = model(images)          # sample i computed with adapter adapter_names[i]

Inside the context every wrapped layer computes the frozen base output for the whole batch once and adds each
adapter's update to that adapter's rows only (no dense weight is built on the channel paths); a module
owning tensors that adapters train in full (the head, LayerScale, BatchNorm statistics) runs once per group
of samples with that group's values. The context belongs to the calling thread and to this model only
(:mod:`.batch_context`): nothing shared is patched, so other threads compute as usual meanwhile.

Each sample's output equals running it alone with its adapter active, up to float rounding. There must be
one name per sample, and every wrapped layer's input must have the batch as its leading dimension (or be a
registered batch-major module: Swin's windows); no adapter may be merged (frozen entries of a mask
schedule are fine: such an update runs with its dense change); adapters whose heads have different numbers
of classes cannot share a batch. Inside :func:`~grft_vision.disable_adapter` every sample computes the base
model.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from torch import nn

from ..errors import AdapterError
from . import batch_context
from .state import grft_state

__all__ = ["mixed_adapters"]


@contextmanager
def mixed_adapters(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[None]:
    """Compute sample ``i`` of every forward pass inside the context with adapter ``adapter_names[i]``.

    Args:
        model: a model wrapped by :func:`grft_vision.apply_grft` (several adapters loaded).
        adapter_names: one adapter name per sample of the batch, or None for the base model.

    Raises:
        AdapterError: an unknown adapter name, an empty list, a merged adapter, or a mixed batch already open in
            this thread.
    """
    state = grft_state(model)
    names = list(adapter_names)
    unknown = sorted({name for name in names if name is not None and name not in state.adapters})
    if not names or unknown:
        raise AdapterError(f"adapter_names must name one loaded adapter (or None) per sample; unknown: {unknown}, "
                           f"loaded: {list(state.adapters)}.")
    if batch_context.current(state) is not None:
        raise AdapterError("mixed_adapters is already open for this model in this thread; mixed batches do not nest.")
    with state.mixed_block():  # from here on the adapters cannot change (check_changeable)
        if state.merged and not state.disabled:
            raise AdapterError(f"adapter {state.active!r} is merged into the weights, which every sample would "
                               "then share; call grft_vision.unmerge_adapter(model) before a mixed-adapter batch.")
        with batch_context.pushed(state, batch_context.AdapterBatch(names)):
            yield
