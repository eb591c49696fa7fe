"""Pre-training the ViT on the procedural source task, data-parallel over processes of one thread each,
with a cache keyed by the settings; the hash that identifies the weights."""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .data import make_source, source_num_classes
from .log import line_logger
from .model import build_vit, to_tensor
from .settings import Settings

__all__ = ["pretrain", "state_sha256"]


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 pixels (a circular shift), one shift per batch."""
    dx, dy = (torch.randint(-2, 3, (2,), generator=generator)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def _pretrain_rank(rank: int, world: int, settings_dict: dict, init_file: str, out_dir: str, log_file: str | None,
                   quiet: bool) -> None:
    """One process of the (data-parallel) pre-training; rank 0 evaluates, logs and writes the weights.

    Each process holds the source images whose id is its rank modulo ``world``, runs one thread, and
    averages gradients with the others (DistributedDataParallel over gloo): under load, one thread per
    process is far faster than one process with several OpenMP threads, which spin-wait for each other.
    On a GPU (``settings.device``) it runs as one process, the data held on the device.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    settings = Settings.from_dict(settings_dict)
    log = line_logger(log_file, quiet) if rank == 0 else (lambda _: None)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    start = time.perf_counter()
    seed, size = settings.pretrain_seed, settings.img_size
    images, labels = make_source(settings.source_images, seed, size, shard=(rank, world))
    device = torch.device(settings.device)
    x, y = to_tensor(images).to(device), torch.from_numpy(labels).to(device)
    if rank == 0:
        val_images, val_labels = make_source(settings.source_val_images, seed, size, offset=settings.source_images)
        xv, yv = to_tensor(val_images).to(device), torch.from_numpy(val_labels).to(device)
    data_seconds = time.perf_counter() - start
    torch.manual_seed(seed)
    model = build_vit(settings, source_num_classes()).to(device)
    network = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_lr,
                                  weight_decay=settings.pretrain_weight_decay)
    batch = settings.pretrain_batch_size // world
    steps_per_epoch = (settings.source_images // world) // batch  # the same on every process
    total_steps = settings.pretrain_epochs * steps_per_epoch
    warmup = max(1, steps_per_epoch // 2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / total_steps))))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    generator = torch.Generator().manual_seed(1000 * seed + rank)
    history = []
    for epoch in range(settings.pretrain_epochs):
        network.train()
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            index = order[step * batch:(step + 1) * batch]
            loss = loss_fn(network(_shift(x[index], generator)), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
        if rank == 0:
            val_top1 = _accuracy(model, xv, yv)
            history.append({"epoch": epoch + 1, "train_loss": total / steps_per_epoch, "source_val_top1": val_top1})
            log(f"pre-training epoch {epoch + 1}/{settings.pretrain_epochs}: loss {total / steps_per_epoch:.3f}, "
                f"source val top-1 {val_top1:.3f} ({time.perf_counter() - start:.0f} s)")
        if world > 1:
            dist.barrier()
    if rank == 0:
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, Path(out_dir, "state.pt"))
        Path(out_dir, "info.json").write_text(json.dumps({
            "history": history, "data_seconds": data_seconds, "steps": total_steps, "batch_size": batch * world,
            "source_val_top1": history[-1]["source_val_top1"] if history else None,
            "params": sum(p.numel() for p in model.parameters())}))
    if world > 1:
        dist.destroy_process_group()


def pretrain(settings: Settings, cache_dir: Path | None, log: Callable[[str], None] = print, workers: int = 1,
             log_file: str | Path | None = None, quiet: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Pre-train the ViT on the source task (or load it from ``cache_dir``); returns (state_dict, info).

    ``workers`` > 1 trains data-parallel in that many processes of one thread each (the result depends on
    ``workers``, which is part of the cache key). Epoch lines go to ``log_file`` and, unless ``quiet``, to stdout.
    On a GPU (``settings.device`` not 'cpu') it trains in one process whatever ``workers`` says.
    ``info``: seconds (of the original pre-training, even when loaded), source validation top-1, whether it
    came from the cache, the cache key, the parameter count and ``sha256``, the hash of the weights
    (:func:`state_sha256`, recomputed on every load).
    """
    workers = max(1, workers) if settings.device == "cpu" else 1
    key = settings.pretrain_key(workers)
    if cache_dir is not None:
        weights, meta = cache_dir / f"vit-{key}.pt", cache_dir / f"vit-{key}.json"
        if weights.is_file() and meta.is_file():
            info = json.loads(meta.read_text())
            state = torch.load(weights, map_location="cpu", weights_only=True)
            log(f"pre-training: loaded from cache {weights} (took {info['seconds']:.0f} s when made, "
                f"source val top-1 {info['source_val_top1']:.3f})")
            return state, {**info, "sha256": state_sha256(state), "from_cache": True}
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="grft-pretrain-") as tmp:
        args = (workers, settings.to_dict(), str(Path(tmp, "init")), tmp,
                None if log_file is None else str(log_file), quiet)
        if workers == 1:
            threads = torch.get_num_threads()
            try:
                _pretrain_rank(0, *args)
            finally:
                torch.set_num_threads(threads)
        else:
            import torch.multiprocessing as torch_mp

            torch_mp.spawn(_pretrain_rank, args=args, nprocs=workers, join=True)
        state = torch.load(Path(tmp, "state.pt"), map_location="cpu", weights_only=True)
        made = json.loads(Path(tmp, "info.json").read_text())
    info = {"key": key, "seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu_start, **made,
            "source_classes": source_num_classes(), "workers": workers,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "sha256": state_sha256(state),
            "from_cache": False}
    log(f"pre-training: {info['seconds']:.0f} s, source val top-1 {info['source_val_top1']:.3f}")
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp_file = cache_dir / f".vit-{key}.pt.tmp"
        torch.save(state, tmp_file)
        os.replace(tmp_file, cache_dir / f"vit-{key}.pt")
        (cache_dir / f"vit-{key}.json").write_text(json.dumps(info, indent=1))
    return state, info


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system, seconds): the cost on idle cores."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: every tensor's name, dtype, shape and bytes, in name order (hex digest)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return correct / max(len(y), 1)

