"""torch.distributed for the training scripts: one process per device under ``torchrun``, or one alone.

``torchrun --nproc_per_node N train_vtab.py ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; the process
group uses NCCL on CUDA and gloo on CPU. Only the main process (rank 0) writes files and TensorBoard.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistributedContext"]


@dataclass
class DistributedContext:
    """Rank, world size and device of this process.

    Attributes:
        rank: global rank (0 when not distributed).
        world_size: number of processes (1 when not distributed).
        device: the device this process computes on.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_environment(cls, device: str | None = None) -> "DistributedContext":
        """Initialise the process group when launched by torchrun; pick the device."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        chosen = torch.device(device)
        if chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device("cuda", local_rank)
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
        rank = dist.get_rank() if dist.is_initialized() else 0
        return cls(rank, world_size, chosen)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value`` on every process."""
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order, on every process."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean of ``tensor`` over processes (a copy)."""
        if not self.distributed:
            return tensor
        reduced = tensor.detach().clone()
        dist.all_reduce(reduced)
        return reduced / self.world_size

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
