"""The run's log: timestamped lines to stdout (unless quiet) and appended to a file."""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Callable

__all__ = ["line_logger"]


def line_logger(log_file: str | Path | None, quiet: bool) -> Callable[[str], None]:
    """A function logging ``[HH:MM:SS] message`` to stdout unless ``quiet`` and to ``log_file`` (appended, one
    open per line, so that several processes may log to the same file)."""

    def log(message: str) -> None:
        line = f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {message}"
        if not quiet:
            print(line, flush=True)
        if log_file is not None:
            with open(log_file, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    return log
