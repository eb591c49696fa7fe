"""PEP 562 lazy public names for a package: each loads its submodule on first use.

The same contract as scientific-python's ``lazy_loader.attach``, written out here so that ``import
grft_vision`` needs nothing beyond torch, timm and safetensors.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence

__all__ = ["attach"]


def attach(package: str, submodule_names: Mapping[str, Sequence[str]]
           ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` exporting ``{submodule: [names]}`` lazily.

    Usage, in a package's ``__init__.py``::

        __getattr__, __dir__, __all__ = attach(__name__, {"budget": ["allocate_units"], ...})
    """
    owner = {name: submodule for submodule, names in submodule_names.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in owner:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{owner[name]}")
        value = getattr(module, name)
        setattr(importlib.import_module(package), name, value)  # later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(importlib.import_module(package)), *owner})

    return __getattr__, __dir__, sorted(owner)
