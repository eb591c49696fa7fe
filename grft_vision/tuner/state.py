"""The one place the state of a GRFT model lives: its adapters, which one is active, merged, disabled.

``model.grft_state`` (:class:`GRFTState`) is shared by every wrapped layer and every module owning adapter
tensors of the model; none of them keeps a copy of which adapter is active or whether it is merged, they
read it here when they compute. What each layer has *written* into its frozen weight (a merged update, the
frozen entries of a mask schedule) is physical and follows this state (:meth:`GRFTLayer.sync
<grft_vision.tuner.layer.GRFTLayer.sync>`).

How the contexts compose (``docs/architecture.md``, "what composes"):

- :func:`~grft_vision.disable_adapter` is model-wide (every thread computes the base model inside it, as in
  PEFT); inside it the model is the base model whatever encloses it or it encloses (a mixed batch included).
  Nested ``disable_adapter`` blocks are counted.
- :func:`~grft_vision.mixed_adapters` is per thread and per model (another thread or another model sees no
  batch); it cannot be nested in one thread, and needs nothing merged.
- Changing the adapters (set, add, load, delete, merge, unmerge, unload) while any of these contexts is
  open, in any thread, is an :class:`~grft_vision.AdapterError`: the change would apply to computations
  already under way.

A parameter an optimizer may hold is never replaced by a load, only copied into
(:meth:`Update.load_values <grft_vision.tuner.structures.Update.load_values>`, :meth:`OwnedTensor.load
<grft_vision.tuner.owned.OwnedTensor.load>`); a load that would need another shape is refused.
"""
from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from torch import nn

from ..errors import AdapterError, ConfigError

if TYPE_CHECKING:
    from ..config import GRFTConfig

__all__ = ["AdapterRecord", "GRFTState", "DEFAULT_ADAPTER", "grft_state", "check_adapter_name"]

DEFAULT_ADAPTER = "default"
_ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")
_RESERVED_NAMES = set(dir(nn.ModuleDict())) | set(dir(nn.ParameterDict()))


@dataclass
class AdapterRecord:
    """What one adapter is: its config, its selection record (None when loaded from a file), units per layer."""

    config: "GRFTConfig"
    selection: Any = None
    budgets: dict[str, int] = field(default_factory=dict)


class GRFTState:
    """The adapters of a wrapped model (``model.grft_state``), the active one, and the open contexts.

    Attributes:
        adapters: one :class:`AdapterRecord` per adapter name, in the order they were added.
        active: the active adapter's name (None: the model computes the base model).
        merged: the active adapter is folded into the frozen weights.
        requires_grad: the base parameters' ``requires_grad`` before wrapping (restored by unwrapping).
    """

    def __init__(self, requires_grad: dict[str, bool] | None = None) -> None:
        self.adapters: dict[str, AdapterRecord] = {}
        self.active: str | None = None
        self.merged = False
        self.requires_grad = dict(requires_grad or {})
        self._disabled = 0  # open disable_adapter blocks (model-wide)
        self._mixed = 0  # open mixed_adapters blocks, over every thread
        self._lock = threading.RLock()

    # contexts are not part of what a copy or a pickle holds: a copy starts outside every context
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        state["_disabled"] = state["_mixed"] = 0
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ the active adapter
    def _record(self) -> AdapterRecord:
        if self.active is None:
            raise AdapterError(f"no adapter is active (adapters: {list(self.adapters)}); call "
                               "grft_vision.set_adapter(model, name).")
        return self.adapters[self.active]

    @property
    def config(self) -> "GRFTConfig":
        """The active adapter's config."""
        return self._record().config

    @property
    def selection(self) -> Any:
        """The active adapter's selection record (None when it was loaded from a file)."""
        return self._record().selection

    @property
    def budgets(self) -> dict[str, int]:
        """Units per layer of the active adapter (its final budget, for incremental schedules)."""
        return self._record().budgets

    # ------------------------------------------------------------------ contexts
    @property
    def disabled(self) -> bool:
        """Inside :func:`~grft_vision.disable_adapter`: the model computes the base model."""
        return self._disabled > 0

    def open_contexts(self) -> str | None:
        """A description of the contexts open on this model (None when there are none)."""
        open_ = [name for name, count in (("disable_adapter", self._disabled), ("mixed_adapters", self._mixed))
                 if count]
        return " and ".join(open_) or None

    def check_changeable(self, action: str) -> None:
        """Raise :class:`AdapterError` when the adapters cannot change now (a context is open).

        Args:
            action: what was attempted, for the message ("merge_adapter", ...).
        """
        where = self.open_contexts()
        if where is not None:
            raise AdapterError(f"{action} inside {where} (in this or another thread) would change the model while "
                               "it computes in that context; leave the context first.")

    @contextmanager
    def disabled_block(self, sync: Callable[[], None]) -> Iterator[None]:
        """Count one open ``disable_adapter`` block; ``sync`` (make the layers' written weights follow the state)
        runs under the state's lock after the count changes on entry and on exit."""
        with self._lock:
            self._disabled += 1
            sync()
        try:
            yield
        finally:
            with self._lock:
                self._disabled -= 1
                sync()

    @contextmanager
    def mixed_block(self) -> Iterator[None]:
        """Count one open ``mixed_adapters`` block (over every thread)."""
        with self._lock:
            self._mixed += 1
        try:
            yield
        finally:
            with self._lock:
                self._mixed -= 1

    def __repr__(self) -> str:
        return (f"GRFTState(adapters={list(self.adapters)}, active={self.active!r}, merged={self.merged}, "
                f"disabled={self.disabled})")


def grft_state(model: nn.Module) -> GRFTState:
    """The :class:`GRFTState` of a wrapped model.

    Raises:
        AdapterError: the model is not wrapped by :func:`grft_vision.apply_grft`.
    """
    state = getattr(model, "grft_state", None)
    if not isinstance(state, GRFTState):
        raise AdapterError(f"{type(model).__name__} is not a GRFT model; wrap it with grft_vision.apply_grft first.")
    return state


def check_adapter_name(model: nn.Module, name: str) -> None:
    """Refuse a name that is not a valid adapter name, or one the model already has.

    Raises:
        ConfigError: not a valid name (letters, digits, ``_``, ``-``; at most 64 characters; not reserved).
        AdapterError: the model has an adapter of that name.
    """
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name in _RESERVED_NAMES:
        raise ConfigError(f"adapter_name={name!r} must start with a letter or '_', hold only letters, digits, '_' and "
                          "'-', be at most 64 characters long, and not be a reserved name such as 'keys' or 'update'.")
    state = getattr(model, "grft_state", None)
    if state is not None and name in state.adapters:
        raise AdapterError(f"the model already has an adapter named {name!r}; pass another adapter_name=, or call "
                           f"grft_vision.delete_adapter(model, {name!r}) first.")
