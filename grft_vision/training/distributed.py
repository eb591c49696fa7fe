"""torch.distributed for the training scripts: one process per device under ``torchrun``, or one alone.

``torchrun --nproc_per_node N train_vtab.py ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; the process
group uses NCCL on CUDA and gloo on CPU. Only the main process (rank 0) writes files and TensorBoard.

Data parallelism is DistributedDataParallel, or, for language models (``train_glue.py --fsdp``),
:func:`shard_frozen_base`: FSDP2 (``torch.distributed.fsdp.fully_shard``) over the frozen base only. Every
decoder layer, the token embedding and the root are sharded, but the adapter's tensors (fp32 updates, the
head's copy), the originals of the tensors an adapter owns, and frozen tensors of another dtype than the
body's (the fp32 head) stay whole on every process (``ignored_params``), and their gradients are averaged
over the processes as DistributedDataParallel averages them (a hook per parameter, before any clipping).
So FSDP only ever all-gathers frozen weights of one dtype, never reduces a gradient, and the adapter code
(updates whose tensors are replaced when entries move, fp32 masters beside bf16 weights, adapter-owned
owners) sees plain tensors, as without FSDP.
"""
from __future__ import annotations

import inspect
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..tuner.owned import owned_tensors

__all__ = ["DistributedContext", "replicated_parameters", "shard_frozen_base"]


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

    def average_gradient(self, param: torch.Tensor) -> None:
        """Replace ``param.grad`` by its mean over processes, in place (a post-accumulate-grad hook)."""
        if self.distributed and param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad.div_(self.world_size)

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def replicated_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The parameters :func:`shard_frozen_base` leaves whole on every process: the trainable ones, the originals of
    owned tensors, and frozen ones of another dtype than most frozen weights (e.g. an fp32 head of a bf16 body)."""
    trainable = {param for param in model.parameters() if param.requires_grad}
    originals = {owned.original for *_, owned in owned_tensors(model) if not owned.is_buffer}
    frozen = [param for param in model.parameters() if param not in trainable and param not in originals]
    sizes = Counter()
    for param in frozen:
        sizes[param.dtype] += param.numel()
    body = sizes.most_common(1)[0][0] if sizes else None
    return trainable | originals | {param for param in frozen if param.dtype != body}


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer layers (the modules of the classes Hugging Face names in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if module is not model
            and any(cls.__name__ in names for cls in type(module).__mro__)]


def _input_embeddings(model: nn.Module, replicated: set[nn.Parameter]) -> list[nn.Module]:
    """The token embedding as a group of its own (the root's group stays gathered from forward to backward)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or not any(param not in replicated for param in embeddings.parameters()):
        return []
    return [embeddings]


def shard_frozen_base(model: nn.Module, context: DistributedContext) -> nn.Module:
    """Shard ``model``'s frozen base over the processes with FSDP2, in place (see the module docstring).

    ``model`` is on ``context.device``, wrapped and with its trainable set final (the adapter's values may be
    loaded before or after). Returns the same model.

    Raises:
        ConfigError: a torch without FSDP2's ``ignored_params``, a single process (FSDP shards over torchrun's
            processes), or a model whose layers are unknown.
    """
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        fully_shard = None
    if fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise ConfigError(f"fsdp=true needs torch.distributed.fsdp.fully_shard with ignored_params (torch >= 2.7); "
                          f"this is torch {torch.__version__}: upgrade torch, or leave --fsdp out (DDP).")
    if not context.distributed:
        raise ConfigError("fsdp=true shards the model over the processes of torchrun; launch it with torchrun "
                          "--nproc_per_node N (N >= 2), or leave --fsdp out on one device.")
    blocks = _blocks(model)
    if not blocks:
        raise ConfigError(f"fsdp=true shards a Hugging Face model's decoder layers (its _no_split_modules); "
                          f"{type(model).__name__} names none. Train it without --fsdp.")
    mesh = init_device_mesh(context.device.type, (context.world_size,))
    replicated = replicated_parameters(model)
    for block in _input_embeddings(model, replicated) + blocks:
        fully_shard(block, mesh=mesh, ignored_params=replicated)
    fully_shard(model, mesh=mesh, ignored_params=replicated)
    for param in model.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(context.average_gradient)
    return model
