"""Optional dependencies: which extra of grft-vision installs each, and the import that says so when one is missing.

``import grft_vision`` and ``apply_grft(model, scores=...)`` need only torch, timm and safetensors (with
what those bring: PyYAML, NumPy, tqdm, Pillow). Everything else is imported where it is used, through
:func:`import_optional`, so that a missing package ends in one message naming the extra to install::

    MissingDependencyError: the SupCon selection loss needs pytorch-metric-learning, which is not installed:
    pip install 'grft-vision[selection]'

The extras of ``setup.cfg`` are named after what they enable; :data:`OPTIONAL` lists the imports each
extra provides (a test checks the two agree).
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["OPTIONAL", "MissingDependencyError", "import_optional"]

# top-level import name -> (distribution on PyPI, the extra that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "pytorch_metric_learning": ("pytorch-metric-learning", "selection"),  # scores from data (SupCon)
    "tensorboard": ("tensorboard", "train"),  # the training scripts' event files
    "tensorflow_datasets": ("tensorflow-datasets", "vtab"),  # VTAB-1k from TFDS
    "scipy": ("scipy", "fgvc"),  # the .mat metadata of Stanford Cars / Dogs / Oxford Flowers
    "transformers": ("transformers", "llm"),  # language models
    "sklearn": ("scikit-learn", "llm"),  # GLUE metrics
    "datasets": ("datasets", "llm"),  # GLUE from the Hugging Face hub
    "bitsandbytes": ("bitsandbytes", "quant"),  # 4-bit / 8-bit frozen bases
}


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def import_optional(name: str, purpose: str) -> ModuleType:
    """Import module ``name`` (a package of :data:`OPTIONAL` or one of its submodules).

    Args:
        name: the module, e.g. ``"tensorflow_datasets"`` or ``"sklearn.metrics"``.
        purpose: what needs it, for the message (``"the SupCon selection loss"``).

    Raises:
        MissingDependencyError: the package is not installed (the message says ``pip install 'grft-vision[X]'``).
            A module missing *inside* an installed package is re-raised unchanged: it is that package's problem.
    """
    package = name.partition(".")[0]
    if package not in OPTIONAL:
        raise KeyError(f"{package!r} is not an optional dependency of grft-vision; known: {', '.join(OPTIONAL)}.")
    try:
        importlib.import_module(package)
    except ModuleNotFoundError as error:
        if error.name != package:
            raise
        distribution, extra = OPTIONAL[package]
        raise MissingDependencyError(f"{purpose} needs {distribution}, which is not installed: "
                                     f"pip install 'grft-vision[{extra}]'") from error
    return importlib.import_module(name)
