"""The command line of ``train_glue.py``: the shared training command line with the GLUE settings.

Same layering, run directory, exit codes and flags as the vision scripts (:mod:`grft_vision.training.cli`),
without the image flags, plus ``--max-length``, ``--dtype``, ``--gradient-checkpointing``, ``--pooling``,
``--warmup-ratio``, ``--fsdp`` and ``--data-dir`` for GLUE's files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..training import cli
from ..training.config import builtin_config_dir
from .config import DTYPES, POOLINGS, GlueTrainConfig
from .data import GLUE_LAYOUTS, GLUE_TASK_NAMES

__all__ = ["GLUE_FLAGS", "main", "resolve_settings", "CONFIG_DIR"]

CONFIG_DIR = builtin_config_dir("glue")
_IMAGE_FLAGS = {"--img-size", "--drop-path", "--checkpoint", "--layout"}
GLUE_FLAGS = {
    **{flag: spec for flag, spec in cli.FLAGS.items() if flag not in _IMAGE_FLAGS},
    "--layout": ("layout", {"choices": GLUE_LAYOUTS}),
    "--max-length": ("max_length", {"type": int}),
    "--dtype": ("dtype", {"choices": DTYPES}),
    "--gradient-checkpointing": ("gradient_checkpointing", {"action": "store_const", "const": True}),
    "--pooling": ("pooling", {"choices": POOLINGS}),
    "--warmup-ratio": ("warmup_ratio", {"type": float}),
    "--fsdp": ("fsdp", {"action": "store_const", "const": True}),
}


def resolve_settings(argv: Sequence[str] | None, config_dir: str | Path = CONFIG_DIR):
    """``(GlueTrainConfig, GRFTConfig, start)`` from ``argv`` (see :func:`grft_vision.training.cli.resolve_settings`)."""
    return cli.resolve_settings("glue", argv, config_dir, config_cls=GlueTrainConfig, dataset_names=GLUE_TASK_NAMES,
                                flags=GLUE_FLAGS)


def main(argv: Sequence[str] | None, config_dir: str | Path = CONFIG_DIR) -> int:
    """Run ``train_glue.py`` with ``argv``; returns the exit code (0 done, 1 failed run, 2 invalid input,
    130 interrupted)."""
    from .task import GlueTask  # transformers is imported once the command line is read

    return cli.main("glue", argv, config_dir, config_cls=GlueTrainConfig, dataset_names=GLUE_TASK_NAMES,
                    flags=GLUE_FLAGS, task=GlueTask())
