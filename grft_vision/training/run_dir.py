"""A run directory belongs to one run: claimed atomically, recognised by its marker, bound to its checkpoint.

- Nothing is written before the run's inputs are known to be usable: :meth:`RunDirectory.check` only reads
  (it refuses a folder that cannot take the run), :meth:`RunDirectory.claim` creates and takes the folder once
  the data, the model and ``k`` have loaded.
- Claiming is exclusive: the folder's marker file ``.grft-run`` is locked (``flock``) for as long as the run
  lives, so a second run started on the same folder is refused in one line instead of mixing its files with
  the first's; the lock goes with the process, whatever ends it.
- The marker says the folder holds a run of grft-vision. ``--overwrite`` replaces only such a run (the files
  of :data:`RUN_FILES` and ``tb/``); a folder holding anything else is refused, never emptied. Run directories
  of earlier versions (no marker) are recognised by their ``config.yaml``.
- ``--resume`` continues the run only when ``config.yaml`` and the checkpoint agree with the command's settings
  (a stale checkpoint of an earlier run, or another run's folder, is refused).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import IO, Any

import yaml

from ..errors import ConfigError
from ..files import atomic_write, remove_temporaries
from ..version import __version__
from .checkpoint import load_checkpoint
from .config import yaml_problem

__all__ = ["RunDirectory", "RUN_FILES", "RESUME_FREE", "MARKER"]

MARKER = ".grft-run"
# what a run writes into its directory (besides the TensorBoard folder tb/); --overwrite deletes these
RUN_FILES = ("config.yaml", "selection.json", "adapter.safetensors", "trainable.safetensors", "checkpoint.pt",
             "metrics.json")
# settings that may differ between a run and its resumption
RESUME_FREE = {"run_dir", "logdir", "quiet", "workers", "device", "eval_every", "divergence_factor",
               "divergence_window", "fsdp", "download"}
# settings added since runs were first written, and the value their absence means (what older runs did)
ADDED_SETTINGS = {"quantize": None}


def _lock(handle: IO) -> bool:
    """Take an exclusive, non-blocking lock on an open file; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_settings(path: Path, fix: str) -> dict[str, Any]:
    """The settings of a ``config.yaml``; a missing, empty or unreadable file is a ConfigError ending in ``fix``."""
    if not path.is_file():
        raise ConfigError(f"--resume: {path} is missing, so the run's settings are unknown; {fix}.")
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"--resume: {path} is not valid YAML ({yaml_problem(error)}); {fix}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--resume: {path} is not a text file; {fix}.") from None
    if not saved:
        raise ConfigError(f"--resume: {path} is empty; {fix}.")
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume: {path} is not a mapping of settings; {fix}.")
    return saved


def _differences(saved: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    return sorted(key for key in set(saved) | set(settings)
                  if key not in RESUME_FREE and saved.get(key) != settings.get(key))


class RunDirectory:
    """The output folder of one run (see the module docstring).

    Args:
        path: the folder.
        settings: the run's resolved settings (what ``config.yaml`` holds).
        resume: continue the run in it; overwrite: replace the run in it.
    """

    def __init__(self, path: str | os.PathLike, settings: dict[str, Any], *, resume: bool = False,
                 overwrite: bool = False) -> None:
        self.path = Path(path)
        self.settings = settings
        self.resume, self.overwrite = resume, overwrite
        self._handle: IO | None = None

    # ------------------------------------------------------------------ what the folder holds
    def _entries(self) -> list[str]:
        return sorted(entry.name for entry in self.path.iterdir()) if self.path.is_dir() else []

    def holds_our_run(self) -> bool:
        """The folder holds a run of grft-vision: its marker, or (earlier versions) a ``config.yaml`` of our settings."""
        marker = self.path / MARKER
        if marker.is_file() and marker.stat().st_size:
            return True
        try:
            saved = yaml.safe_load((self.path / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return False
        return isinstance(saved, dict) and set(self.settings) - RESUME_FREE <= set(saved)

    def _refusal(self) -> str | None:
        """Why the folder cannot take this run now (None: it can); reads only."""
        if self.resume and self.overwrite:
            return "--resume continues the run in --run-dir and --overwrite replaces it; pass only one of them."
        existing = next(parent for parent in (self.path, *self.path.parents) if parent.exists())
        if not existing.is_dir():
            return f"--run-dir {self.path}: {existing} is a file, not a directory; choose another --run-dir."
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"--run-dir {self.path}: {existing} is not writable; choose a writable --run-dir."
        held = [name for name in self._entries() if name != MARKER]
        if self.resume or not held:
            return None
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        if not self.holds_our_run():
            return (f"--run-dir {self.path} holds files that are not a grft-vision run ({shown}); nothing there is "
                    "deleted or overwritten: choose another --run-dir (or empty it yourself).")
        if self.overwrite:
            return None
        return (f"--run-dir {self.path} already holds a run ({shown}); continue it with --resume, replace it with "
                "--overwrite, or choose another --run-dir.")

    def check(self) -> dict[str, Any] | None:
        """Refuse a folder that cannot take this run, before anything is loaded or written; returns the checkpoint
        to resume from (None for a new run).

        Raises:
            ConfigError: the folder holds another run (or foreign files), is not writable, or (resume) its
                checkpoint does not belong to this run.
        """
        refusal = self._refusal()
        if refusal is not None:
            raise ConfigError(refusal)
        return self._resumable() if self.resume else None

    def _resumable(self) -> dict[str, Any]:
        """The checkpoint to resume from, once ``config.yaml`` and the checkpoint agree with the settings."""
        path, config_path = self.path / "checkpoint.pt", self.path / "config.yaml"
        if not path.is_file():
            if config_path.is_file():
                raise ConfigError(f"--resume: {self.path} holds no checkpoint yet (the run stopped before its first "
                                  "epoch ended); start it again with --overwrite.")
            raise ConfigError(f"--resume: no run in {self.path} (no checkpoint.pt); start the run without --resume.")
        saved = {**ADDED_SETTINGS, **_read_settings(config_path, "restore it, or start the run again with --overwrite")}
        missing = sorted(set(self.settings) - set(saved) - RESUME_FREE)
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ConfigError(f"--resume: {config_path} lacks {len(missing)} settings ({shown}): it is truncated or "
                              "from another version; restore it, or start the run again with --overwrite.")
        changed = _differences(saved, self.settings)
        if changed:
            raise ConfigError(f"--resume: settings differ from the run in {self.path}: {', '.join(changed)}; resume "
                              "with the same settings, or start a new run directory.")
        checkpoint = load_checkpoint(path)
        if checkpoint.get("settings") is None:
            raise ConfigError(f"--resume: {path} does not record the settings it was trained with (written by an "
                              "older version), so it cannot be matched to this run; start again with --overwrite.")
        stale = _differences({**ADDED_SETTINGS, **checkpoint["settings"]}, self.settings)
        if stale:
            raise ConfigError(f"--resume: {path} belongs to an earlier run in {self.path} (its {', '.join(stale)} "
                              "differ from config.yaml's); start this run again with --overwrite.")
        return checkpoint

    # ------------------------------------------------------------------ taking the folder
    def claim(self, logdir: str | None = None) -> None:
        """Create the folder and take it for this run: lock its marker, check again under the lock, then (a new
        run) delete the replaced run's files and write the marker and ``config.yaml``.

        Args:
            logdir: the run's TensorBoard folder when it is not ``tb/`` inside the run directory (then ``tb/``
                is not deleted by ``--overwrite``).

        Raises:
            ConfigError: another run holds the folder, or it changed since :meth:`check`.
        """
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        marker = self.path / MARKER
        had_marker = marker.exists()
        handle = open(marker, "a+", encoding="utf-8")
        if not _lock(handle):
            handle.close()
            raise ConfigError(f"--run-dir {self.path} is being written by another run right now (it holds the lock "
                              f"on {marker}); wait for it to end, or choose another --run-dir.")
        self._handle = handle
        try:
            refusal = self._refusal()
            if refusal is not None:  # another run finished in between
                raise ConfigError(refusal)
            self._start(logdir)
        except BaseException:  # refused, or the disk is full: leave the folder as it was found
            self.release()
            if not had_marker:
                marker.unlink(missing_ok=True)
            if created and not any(self.path.iterdir()):
                self.path.rmdir()
            raise

    def _start(self, logdir: str | None) -> None:
        remove_temporaries(self.path)  # left by a process killed while writing
        if self.resume:
            if not (self.path / MARKER).stat().st_size:  # a run of an earlier version: mark it now
                self._write_marker()
            return
        if self.overwrite:
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
            if logdir is None and (self.path / "tb").is_dir():
                shutil.rmtree(self.path / "tb")
        with atomic_write(self.path / "config.yaml", "w") as handle:
            yaml.safe_dump(self.settings, handle, sort_keys=True)
        self._write_marker()

    def _write_marker(self) -> None:
        """Write the marker's content in place (the lock is on this file; replacing it would drop the lock)."""
        try:
            self._handle.seek(0)
            self._handle.truncate()
            json.dump({"grft_vision_run": True, "library_version": __version__, "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, self._handle)
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as error:  # e.g. a full disk: say which file could not be written
            raise OSError(error.errno, error.strerror or str(error), str(self.path / MARKER)) from error

    def release(self) -> None:
        """Let the folder go (the lock is released; the marker stays)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name
