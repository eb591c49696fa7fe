"""The console scripts ``grft-train-vtab``, ``grft-train-fgvc`` and ``grft-train-glue``.

Each reads the built-in configs of its benchmark (package data, :func:`~grft_vision.training.config.builtin_config_dir`)
and returns the exit code of :func:`grft_vision.training.cli.main` (0 done, 1 failed run, 2 invalid input or a
missing optional dependency). The top-level ``train_vtab.py``, ``train_fgvc.py`` and ``train_glue.py`` call
these same functions.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from .extras import MissingDependencyError

__all__ = ["train_vtab", "train_fgvc", "train_glue"]


def _exit_code(run: Callable[[], int]) -> int:
    try:
        return run()
    except MissingDependencyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def train_vtab(argv: Sequence[str] | None = None) -> int:
    """``grft-train-vtab``: GRFT on a VTAB-1k task (``argv``: the arguments; None: ``sys.argv[1:]``)."""
    from .training.cli import main

    return main("vtab", argv)


def train_fgvc(argv: Sequence[str] | None = None) -> int:
    """``grft-train-fgvc``: GRFT on an FGVC dataset (``argv``: the arguments; None: ``sys.argv[1:]``)."""
    from .training.cli import main

    return main("fgvc", argv)


def train_glue(argv: Sequence[str] | None = None) -> int:
    """``grft-train-glue``: GRFT on a GLUE task with a language model (``argv``: None: ``sys.argv[1:]``)."""
    from .llm.cli import main

    return _exit_code(lambda: main(argv))
