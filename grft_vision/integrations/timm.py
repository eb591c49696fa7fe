"""GRFT in timm's ``train.py``: adapter-only checkpoints for timm's ``CheckpointSaver``, and their resume.

timm's saver writes ``unwrap_fn(model).state_dict()`` for the model and for its EMA. With
``CheckpointSaver(..., unwrap_fn=adapter_only)`` that is the active adapter (indices, updates, head,
BatchNorm statistics, and its metadata under :data:`ADAPTER_METADATA_KEY`) instead of the whole frozen
backbone; everything else timm saves (optimizer, loss scaler, ``args``, epoch, metric, the saver's
history) is unchanged. :func:`resume_checkpoint` and :func:`load_ema_checkpoint` are timm's resume
functions for checkpoints of a GRFT model, adapter-only or full. ``python -m grft_vision.export`` turns
either kind into plain timm weights (:mod:`grft_vision.export`).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from timm.models import clean_state_dict
from timm.utils import unwrap_model
from torch import nn

from ..errors import ModelLoadError
from ..io.adapter_format import adapter_state
from ..io.adapters import apply_adapter_state
from ..io.checkpoints import ADAPTER_METADATA_KEY, load_training_checkpoint, split_adapter_state

__all__ = ["ADAPTER_METADATA_KEY", "adapter_only", "split_adapter_state", "load_training_checkpoint",
           "resume_checkpoint", "load_ema_checkpoint"]



class _AdapterOnly:
    """A GRFT model as :func:`adapter_only` shows it to timm's saver: its active adapter is its state dict."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        """The adapter's tensors (keys as in an adapter file) and, under ``ADAPTER_METADATA_KEY``, its metadata."""
        tensors, metadata = adapter_state(self.model)
        return {**tensors, ADAPTER_METADATA_KEY: metadata}


def adapter_only(model: nn.Module) -> _AdapterOnly:
    """timm's ``unwrap_model`` (DDP, ``torch.compile``, model EMA), then the GRFT model's active adapter in place
    of its state dict: pass it as ``CheckpointSaver(..., unwrap_fn=adapter_only)``."""
    return _AdapterOnly(unwrap_model(model))


def _load_state(model: nn.Module, state: Mapping[str, Any], source: str) -> None:
    """An adapter-only state dict through the adapter loader (validated, values copied in place), any other
    state dict with ``load_state_dict`` (strict)."""
    adapter = split_adapter_state(state)
    if adapter is None:
        model.load_state_dict(clean_state_dict(dict(state)))
    else:
        apply_adapter_state(model, *adapter, source=source)


def resume_checkpoint(model: nn.Module, checkpoint_path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None,
                      loss_scaler: Any = None) -> int | None:
    """timm's ``resume_checkpoint`` for a GRFT model: the model's state (adapter-only or full), the optimizer's
    and the loss scaler's; returns the epoch to continue from (None if the checkpoint has none).

    ``model`` is the wrapped model, built as for training (``create_model`` then ``apply_grft``); the adapter's
    values are copied into its parameters in place, so an optimizer built on them stays valid.

    Raises:
        ModelLoadError: the file is missing, unreadable, or not a training checkpoint.
        AdapterError: the adapter does not fit the model (another architecture or other base weights).
    """
    checkpoint = load_training_checkpoint(checkpoint_path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ModelLoadError(f"{str(checkpoint_path)!r} holds no 'state_dict', so it is not a timm training "
                             "checkpoint; pass a last.pth.tar / checkpoint-N.pth.tar written by CheckpointSaver.")
    _load_state(unwrap_model(model), checkpoint["state_dict"], str(checkpoint_path))
    if optimizer is not None and "optimizer" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
        loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
    if "epoch" not in checkpoint:
        return None
    return checkpoint["epoch"] + 1 if checkpoint.get("version", 1) > 1 else checkpoint["epoch"]


def load_ema_checkpoint(model_ema: nn.Module, checkpoint_path: str | os.PathLike) -> None:
    """The EMA state of a GRFT checkpoint (``state_dict_ema``, else ``state_dict``) into timm's ``ModelEma*``
    (or any module around the wrapped model that ``unwrap_model`` sees through): timm's
    ``load_task_ema_checkpoint`` for GRFT models.

    Raises:
        ModelLoadError, AdapterError: as :func:`resume_checkpoint`.
    """
    checkpoint = load_training_checkpoint(checkpoint_path)
    state = checkpoint.get("state_dict_ema") if isinstance(checkpoint, dict) else None
    if state is None:
        state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if state is None:
        raise ModelLoadError(f"{str(checkpoint_path)!r} holds neither 'state_dict_ema' nor 'state_dict'; pass a "
                             "checkpoint written by timm's CheckpointSaver.")
    _load_state(unwrap_model(model_ema), state, str(checkpoint_path))
