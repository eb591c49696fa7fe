"""Training checkpoints: the adapter plus optimizer, scheduler and RNG state, written atomically.

A checkpoint never holds the frozen backbone: only the adapter (the same tensors and metadata as an
adapter ``.safetensors`` file), the optimizer and scheduler state, the epoch counter, the evaluation
history and every RNG state — enough to continue bit-for-bit — plus what binds it to its run: the resolved
settings it was trained with (a resume with other settings, or into another run's directory, is refused),
the selection and training time spent so far, and the divergence watch's state. It is one ``torch.save``
file written by :func:`grft_vision.files.atomic_write` (temporary file, fsync, rename), so an interrupted
write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..config import ConfigError
from ..files import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "restore_rng_state", "atomic_torch_save"]


def rng_state() -> dict[str, Any]:
    """Every global RNG state (torch CPU and CUDA, NumPy, Python) in a ``weights_only``-loadable form."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` all or nothing (:func:`grft_vision.files.atomic_write`)."""
    with atomic_write(path, "wb") as handle:
        torch.save(payload, handle)
    return Path(path)


def save_checkpoint(path: str | os.PathLike, *, epoch: int, adapter: tuple[dict, dict] | None,
                    trainable: dict[str, torch.Tensor] | None, optimizer: torch.optim.Optimizer,
                    scheduler: Any, history: list[dict], scaler: Any = None,
                    mask_schedule: dict | None = None, settings: Mapping[str, Any] | None = None,
                    seconds: Mapping[str, float] | None = None, divergence: dict | None = None) -> Path:
    """Write a checkpoint after ``epoch`` (0-based, completed).

    Args:
        path: the checkpoint file.
        epoch: the last completed epoch.
        adapter: ``(tensors, metadata)`` from :func:`grft_vision.io.adapter_format.adapter_state` (GRFT runs).
        trainable: the trainable tensors by name (full and head-only runs, which have no adapter).
        optimizer, scheduler, scaler: objects with ``state_dict()``.
        history: evaluation records so far.
        mask_schedule: the state of a dynamic or incremental mask schedule.
        settings: the run's resolved settings (``config.yaml``); a resume compares them with its own.
        seconds: time spent so far, ``{"selection": s, "train": s}``, carried into a resumed run's metrics.
        divergence: the state of the run's :class:`~grft_vision.training.divergence.DivergenceWatch`.
    """
    payload = {
        "epoch": epoch,
        "adapter": adapter,
        "trainable": trainable,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "history": history,
        "mask_schedule": mask_schedule,
        "rng": rng_state(),
        "settings": dict(settings) if settings is not None else None,
        "seconds": dict(seconds) if seconds is not None else None,
        "divergence": divergence,
    }
    return atomic_torch_save(payload, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on the CPU).

    Raises:
        ConfigError: the file is not a readable checkpoint (truncated, corrupt, or not written by this package).
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{path} is not a readable checkpoint ({reason}); it is truncated or corrupt: restore "
                          "it, or start the run again with --overwrite.") from None
    if not isinstance(payload, dict) or "epoch" not in payload:
        raise ConfigError(f"{path} is not a grft-vision training checkpoint; start the run again with --overwrite.")
    return payload
