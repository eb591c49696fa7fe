"""Writing files all or nothing: a crash, a full disk or Ctrl-C never leaves a half-written file behind.

:func:`atomic_write` writes to a temporary file next to the target, flushes and fsyncs it, renames it over
the target (an atomic step on POSIX and Windows) and fsyncs the directory, so that the target holds either
its old content or the complete new one. The temporary file is removed on every path out of the block,
errors and ``KeyboardInterrupt`` included; only a process killed outright (SIGKILL, power loss) can leave
one, and :func:`remove_temporaries` clears those.
"""
from __future__ import annotations

import functools
import os
import re
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_write", "remove_temporaries"]

# mkstemp(prefix=".<name>.", suffix=".tmp") names: ".<name>.<8 random characters>.tmp"
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file that replaces ``path`` when the ``with`` block ends without an error.

    Args:
        path: the file to write; its folder is created if needed.
        mode: ``"wb"`` (bytes: ``torch.save(obj, handle)``, ``handle.write(safetensors.torch.save(...))``)
            or ``"w"`` (UTF-8 text).

    Yields:
        The open temporary file. It is flushed, fsynced, given the usual permissions (``0o666 & ~umask``)
        and renamed over ``path`` after the block; on an exception it is removed and ``path`` is untouched.

    Raises:
        OSError: writing failed (a full disk, permissions); the error names ``path`` when the writer did not.

    Example::

        with atomic_write(run_dir / "config.yaml", "w") as handle:
            yaml.safe_dump(settings, handle)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode={mode!r} must be 'w' or 'wb'.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    except OSError as error:  # e.g. a full disk: say which file could not be written
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
    finally:
        with suppress(FileNotFoundError):  # gone after a successful rename
            os.remove(temporary)


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writers of :func:`atomic_write` left in ``directory``.

    Returns:
        The removed paths (none when the folder does not exist).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [entry for entry in directory.iterdir() if entry.is_file() and _TEMPORARY.match(entry.name)]
    for entry in removed:
        with suppress(FileNotFoundError):
            entry.unlink()
    return removed
