"""Named registries: how structures, scores, selection losses and training methods are looked up.

Every extensible concept of grft-vision is a :class:`Registry` of classes or objects keyed by name, so
that the code that uses them asks the registry instead of branching on names, and a user can add one from
their own code without editing the package::

    from grft_vision.tuner.structures import STRUCTURES, RowUpdate

    @STRUCTURES.register("block")
    class BlockUpdate(RowUpdate): ...
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError, did_you_mean

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping of names to entries of one kind, with "did you mean" errors.

    Args:
        kind: what the entries are, for messages ("structure", "score", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None, *, replace: bool = False) -> Callable[[T], T] | T:
        """Add ``entry`` under ``name``; without ``entry``, a decorator that adds what it decorates.

        Raises:
            ConfigError: ``name`` is taken (pass ``replace=True`` to replace it on purpose) or not a string.
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} needs a non-empty string name, not {name!r}.")

        def add(item: T) -> T:
            if name in self._entries and not replace and self._entries[name] is not item:
                raise ConfigError(f"a {self.kind} named {name!r} is already registered; choose another name or pass "
                                  "replace=True.")
            self._entries[name] = item
            return item

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests and plug-ins that clean up after themselves)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry named ``name``.

        Raises:
            ConfigError: no such entry; the message lists the known names and the closest one.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(f"{self.kind}={name!r} is not known.{did_you_mean(str(name), self._entries)} Use one of "
                              f"{', '.join(self._entries)}.") from None

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
