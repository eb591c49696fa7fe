"""Bytes a training step holds: saved for backward, optimizer state, resident and trainable tensors; and the
bytes of the files a method writes.

Every figure is in bytes; :data:`MB` (10^6 bytes) is the unit of the tables.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_model
from torch import nn

__all__ = ["MB", "FP32_BYTES", "ADAM_BYTES_PER_PARAM", "unique_bytes", "SavedTensorBytes", "optimizer_state_bytes",
           "trainable_bytes", "save_whole_model", "file_bytes"]

MB = 1e6
FP32_BYTES = 4
# bytes per trainable fp32 parameter with Adam: gradient + exp_avg + exp_avg_sq
ADAM_BYTES_PER_PARAM = 3 * FP32_BYTES


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage shared by views counts once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
    return sum(seen.values())


class SavedTensorBytes:
    """Context manager: bytes of the distinct storages autograd saves for backward.

    Convention: each storage counts once (its full ``nbytes``, so views of a larger activation count the
    activation), and storages of the model's own parameters and buffers (frozen weights, GRFT deltas and
    indices, which autograd saves by reference and which exist whether or not anything trains) are left
    out. Everything else counts: activations, masks, the input batch when an op keeps it; a sparse COO tensor
    counts the storages of its indices and values.
    """

    def __init__(self, model: nn.Module) -> None:
        self._exclude = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        # a sparse COO tensor (SHiRA's update) has no storage of its own: its indices and values count
        for part in (tensor._indices(), tensor._values()) if tensor.layout == torch.sparse_coo else (tensor,):
            storage = part.untyped_storage()
            key = storage.data_ptr()
            if key not in self._exclude:
                self._seen.setdefault(key, storage.nbytes())
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> tuple[int, int]:
    """(all tensors in ``optimizer.state``, the scalar ``step`` tensors among them); (0, 0) without optimizer."""
    if optimizer is None:
        return 0, 0
    total = step = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
                if key == "step":
                    step += value.numel() * value.element_size()
    return total, step


def trainable_bytes(model: nn.Module) -> int:
    """Bytes of the parameters of ``model`` that require grad."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def save_whole_model(model: nn.Module, path: Path) -> Path:
    """The file of a method that trains every weight: the whole model at ``path`` (``.safetensors``; tied tensors
    once, ``safetensors.torch.save_model``); returns the file's path."""
    path = path.with_suffix(".safetensors")
    save_model(model, str(path))
    return path


def file_bytes(path: Path | list[Path]) -> int:
    """Bytes of the file ``path``, of every file below a folder, or the sum over a list of such paths."""
    if isinstance(path, list):
        return sum(file_bytes(p) for p in path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
