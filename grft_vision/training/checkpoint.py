"""Training checkpoints: the adapter plus optimizer, scheduler and RNG state, written atomically.

A checkpoint never holds the frozen backbone: only the adapter (the same tensors and metadata as an
adapter ``.safetensors`` file), the optimizer and scheduler state, the epoch counter, the evaluation
history and every RNG state — enough to continue bit-for-bit. It is one ``torch.save`` file written to a
temporary name and renamed into place, so an interrupted write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    """``torch.save`` to a temporary file in the same directory, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, tmp_name)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
    return path


def save_checkpoint(path: str | os.PathLike, *, epoch: int, adapter: tuple[dict, dict] | None,
                    trainable: dict[str, torch.Tensor] | None, optimizer: torch.optim.Optimizer,
                    scheduler: Any, history: list[dict], scaler: Any = None,
                    mask_schedule: dict | None = None) -> Path:
    """Write a checkpoint after ``epoch`` (0-based, completed).

    Args:
        path: the checkpoint file.
        epoch: the last completed epoch.
        adapter: ``(tensors, metadata)`` from :func:`grft_vision.adapter.adapter_state` (GRFT runs).
        trainable: the trainable tensors by name (full and head-only runs, which have no adapter).
        optimizer, scheduler, scaler: objects with ``state_dict()``.
        history: evaluation records so far.
        mask_schedule: the state of a dynamic or incremental mask schedule.
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
    }
    return atomic_torch_save(payload, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=True)
