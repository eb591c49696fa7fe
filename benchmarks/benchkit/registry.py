"""The one method registry of the benchmarks: a method's name -> the function that prepares it, with the
metadata its script reports.

Each script subclasses :class:`RegisteredMethod` with its metadata (a description, a table label, a
learning-rate family, ...) and keeps one :class:`MethodRegistry` of that class; a method is one
registration::

    METHODS = MethodRegistry(VisionMethod)

    @METHODS.register("head", description="linear probe: classifier only")
    def setup_head(model: nn.Module, context: SetupContext) -> Setup:
        ...

The registration order is the order of the script's tables and of its ``--methods`` default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

__all__ = ["RegisteredMethod", "MethodRegistry"]


@dataclass(frozen=True, kw_only=True)
class RegisteredMethod:
    """A registered method: its name (the ``--methods`` choice) and ``build``, the function that prepares it
    (a script's own signature, e.g. ``(model, context) -> Setup``). Scripts subclass it with their metadata."""

    name: str
    build: Callable[..., Any]


M = TypeVar("M", bound=RegisteredMethod)
F = TypeVar("F", bound=Callable[..., Any])


class MethodRegistry(Generic[M]):
    """The methods of one script by name, in registration order; iterating yields the names.

    Args:
        record: the script's method class; ``register(name, **metadata)`` stores
            ``record(name=name, build=function, **metadata)``.
    """

    def __init__(self, record: type[M]) -> None:
        self.record = record
        self._methods: dict[str, M] = {}

    def register(self, name: str, **metadata: Any) -> Callable[[F], F]:
        """Decorator adding ``name`` with the decorated function as its ``build`` (returned unchanged).

        Raises:
            ValueError: ``name`` is already registered.
        """

        def add(build: F) -> F:
            if name in self._methods:
                raise ValueError(f"method {name!r} is already registered")
            self._methods[name] = self.record(name=name, build=build, **metadata)
            return build

        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a method registered for a while, e.g. by a test)."""
        del self._methods[name]

    def check(self, names: Iterable[str]) -> None:
        """Raise ``ValueError`` naming every entry of ``names`` that is not registered, and the choices."""
        unknown = [name for name in names if name not in self._methods]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(self._methods)}")

    def names(self) -> tuple[str, ...]:
        return tuple(self._methods)

    def values(self) -> list[M]:
        return list(self._methods.values())

    def __getitem__(self, name: str) -> M:
        return self._methods[name]

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)

    def __repr__(self) -> str:
        return f"MethodRegistry({self.record.__name__}: {', '.join(self._methods)})"
