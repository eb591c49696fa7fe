"""Where a run's results come from: the machine, the code version and the command line."""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import timm
import torch

__all__ = ["machine", "code_version", "command_line"]

REPOSITORY = Path(__file__).resolve().parents[2]  # benchmarks/transfer_bench/ -> the checkout


def machine() -> dict[str, Any]:
    """The platform, CPU count and the versions of Python, torch and timm."""
    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}


def code_version() -> dict[str, Any]:
    """The git commit of this checkout and whether the benchmark or the package differ from it (None: no git)."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--", "benchmarks", "grft_vision")
    return {"commit": commit, "dirty": None if changes is None else bool(changes)}


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command line that ran this benchmark: ``python benchmarks/transfer.py`` and ``argv`` (default: this
    process's arguments), run from the repository root."""
    return shlex.join(["python", "benchmarks/transfer.py", *(sys.argv[1:] if argv is None else argv)])
