"""Transfer benchmark, offline: pre-train a small timm ViT on a procedural many-class source task, then
fine-tune it on few-shot targets with every method at matched budgets, and report accuracy vs trainable %.

Why: ImageNet-21k weights and the VTAB/FGVC images cannot be downloaded here, yet the claims to check are
about *transfer*: gradient-chosen rows beat random rows at the same budget, GRFT beats a linear probe and
approaches full fine-tuning. A real pre-train -> fine-tune pipeline at small scale tests exactly that.

Stages (each timed, see ``docs/results.md``):

1. source data + pre-training (``transfer_data.make_source``: shapes x textures x side of the image, 128
   classes); the checkpoint is cached under ``--cache-dir`` keyed by its settings (``--quick`` never reads
   or writes the cache);
2. target data (``transfer_data.make_target``: scikit-learn digits, count, location, orientation, texture;
   each with <= 1000 training images, as VTAB-1k);
3. fine-tuning: every (target, method, seed) job, in ``--workers`` processes of one thread each;
4. report: ``results.json``, ``table.md`` and ``accuracy_vs_trainable.png`` in ``--out``.

Methods come from a registry (:data:`METHODS`): a name maps to a function that prepares a fresh copy of
the pre-trained model for training and returns its trainable parameters (:class:`Prepared`). New methods
are one :func:`register` call; see :func:`grft_method` for the GRFT family (selection, wrapping and the
regulariser all come from ``grft_vision``).

The width sweep (``--sweep``, :class:`Sweep`) runs the benchmark at several widths and pre-training seeds
(one checkpoint each) with a few methods, and reports the paired differences per checkpoint and pooled
(:func:`summarise_sweep`, ``sweep.json``, ``sweep.md``, ``width_sweep.png``).

    python benchmarks/transfer.py --out runs/transfer             # the full benchmark (< 30 min, 2 cores)
    python benchmarks/transfer.py --quick --out /tmp/transfer      # pipeline check (seconds)
    python benchmarks/transfer.py --tune --out runs/transfer-tune  # learning-rate / lambda choice on val splits
    python benchmarks/transfer.py --sweep --out runs/width-sweep   # widths 64, 128 x 2 checkpoints (CPU, 90 min)
    python benchmarks/transfer.py --sweep --widths 192 384 --methods grft-row-k1 grft-row-k1-plain random-row-k1 \\
        lowest-row-k1 score-grasp linear bias --device cuda --out runs/width-sweep-gpu   # on a GPU machine
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import transfer_data  # noqa: E402

from grft_vision import GRFTConfig, L2ToPretrained, apply_grft, trainable_parameters_report  # noqa: E402
from grft_vision.tuner.anatomy import head_module_names
from grft_vision.tuner.targets import find_target_layers  # noqa: E402
from grft_vision.data import TwoViews, contrastive_transform, create_transforms  # noqa: E402
from grft_vision.selection import LayerSelection, compute_scores  # noqa: E402
from grft_vision.selection.schedules import MaskSchedule, create_schedule  # noqa: E402
from grft_vision.training import DistributedContext, TrainStep, evaluate, train_one_epoch  # noqa: E402

__all__ = [
    "Settings", "FULL", "QUICK", "Method", "MethodContext", "Prepared", "METHODS", "register", "grft_method",
    "pretrain", "state_sha256", "random_generator", "finetune", "run_benchmark", "tune", "summarise", "to_markdown",
    "plot", "Sweep", "SWEEP", "QUICK_SWEEP", "SWEEP_METHODS", "SWEEP_CORE", "SWEEP_PAIRS", "checkpoint_name",
    "run_sweep", "load_sweep", "paired_difference", "summarise_sweep", "sweep_markdown", "plot_sweep", "main",
]

PRETRAIN_VERSION = 2  # bump when the source data or the pre-training recipe changes (invalidates the cache)
MEAN = STD = (0.5, 0.5, 0.5)

# Learning rate per method family and the L2 lambda of GRFT, chosen once with ``--tune`` on validation
# splits carved from the target training sets (train[:80%] -> val[80%:], seed 0, never the test split);
# the grids and the validation accuracies are in docs/results.md.
DEFAULT_LR = {"head": 1e-1, "full": 3e-3, "grft": 3e-2, "lora": 1e-2}
DEFAULT_REG_LAMBDA = 1e-4
TUNE_LR_GRID = {"head": (3e-2, 1e-1, 3e-1), "full": (1e-3, 3e-3, 1e-2), "grft": (1e-2, 3e-2, 1e-1),
                "lora": (3e-3, 1e-2, 3e-2)}
TUNE_LR_METHOD = {"head": "linear", "full": "full", "grft": "grft-row-k1-noL2", "lora": "lora"}
TUNE_LAMBDA_GRID = (1e-4, 1e-3, 1e-2)


# ------------------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    """Everything that sizes the benchmark; :data:`FULL` and :data:`QUICK` are the two presets."""

    # model: a timm ViT (vit_tiny_patch16_224's architecture, resized)
    img_size: int = 32
    patch_size: int = 8
    embed_dim: int = 64
    depth: int = 6
    num_heads: int = 4
    # source task / pre-training
    source_images: int = 48000
    source_val_images: int = 2000
    pretrain_epochs: int = 10
    pretrain_batch_size: int = 64
    pretrain_lr: float = 3e-3
    pretrain_weight_decay: float = 0.05
    pretrain_seed: int = 0
    # targets / fine-tuning
    targets: tuple[str, ...] = transfer_data.TARGETS
    num_train: int = 500
    num_test: int | None = None  # None: 1000 (digits: the rest of the 1,797 images)
    data_seed: int = 0
    epochs: int = 15  # cosine epochs, after the warm-up
    warmup_epochs: int = 2
    batch_size: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    num_subsets: int = 4  # the n > 1 variant of the lowest-loss subset
    methods: tuple[str, ...] | None = None  # None: DEFAULT_METHODS
    device: str = "cpu"  # where pre-training and fine-tuning run ("cuda" on a GPU machine)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Settings":
        tuples = {k: tuple(v) for k, v in values.items() if k in ("targets", "seeds", "methods") and v is not None}
        return cls(**{**values, **tuples})

    def pretrain_key(self, workers: int = 1) -> str:
        """Cache key of the pre-trained weights: every setting that changes them, and the process count."""
        fields = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "source_images", "source_val_images",
                  "pretrain_epochs", "pretrain_batch_size", "pretrain_lr", "pretrain_weight_decay", "pretrain_seed",
                  "device")
        payload = json.dumps({"version": PRETRAIN_VERSION, "workers": workers,
                              **{f: getattr(self, f) for f in fields}}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:16]


FULL = Settings()
QUICK = Settings(embed_dim=32, depth=2, num_heads=2, source_images=1024, source_val_images=256, pretrain_epochs=1,
                 targets=("digits", "count"), num_train=64, num_test=64, epochs=1, warmup_epochs=1, seeds=(0, 1),
                 num_subsets=2)


def data_config(settings: Settings) -> dict[str, Any]:
    """The timm data config of the small ViT (timm's own resolves to 224 px for a resized model)."""
    return {"input_size": (3, settings.img_size, settings.img_size), "mean": MEAN, "std": STD,
            "interpolation": "bicubic", "crop_pct": 1.0}


# -------------------------------------------------------------------------------------------- data
def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> normalised float ``[N, 3, H, W]`` (mean = std = 0.5, as the in21k ViT)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - 0.5) / 0.5


class ArrayImages(Dataset):
    """uint8 images as PIL images through a transform (for the selection views)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


# ------------------------------------------------------------------------------------------- model
def build_vit(settings: Settings, num_classes: int) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                             img_size=settings.img_size, patch_size=settings.patch_size,
                             embed_dim=settings.embed_dim, depth=settings.depth, num_heads=settings.num_heads)


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy every pre-trained tensor except the head (the new head keeps timm's init, as GPS)."""
    body = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise RuntimeError(f"backbone mismatch: missing {missing}, unexpected {unexpected}")
    return model


# ------------------------------------------------------------------------------------- pre-training
def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 pixels (a circular shift), one shift per batch."""
    dx, dy = (torch.randint(-2, 3, (2,), generator=generator)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def _line_logger(log_file: str | None, quiet: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        line = f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {message}"
        if not quiet:
            print(line, flush=True)
        if log_file is not None:
            with open(log_file, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    return log


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
    log = _line_logger(log_file, quiet) if rank == 0 else (lambda _: None)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    start = time.perf_counter()
    seed, size = settings.pretrain_seed, settings.img_size
    images, labels = transfer_data.make_source(settings.source_images, seed, size, shard=(rank, world))
    device = torch.device(settings.device)
    x, y = to_tensor(images).to(device), torch.from_numpy(labels).to(device)
    if rank == 0:
        val_images, val_labels = transfer_data.make_source(settings.source_val_images, seed, size,
                                                           offset=settings.source_images)
        xv, yv = to_tensor(val_images).to(device), torch.from_numpy(val_labels).to(device)
    data_seconds = time.perf_counter() - start
    torch.manual_seed(seed)
    model = build_vit(settings, transfer_data.source_num_classes()).to(device)
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
            "source_classes": transfer_data.source_num_classes(), "workers": workers,
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


# ------------------------------------------------------------------------------------ method registry
@dataclass
class Prepared:
    """A model ready to train: the module to call, its trainable parameters, an optional regulariser
    (a callable returning a scalar added to the loss, e.g. :class:`grft_vision.L2ToPretrained`), and
    free-form diagnostics (selection statistics, ...) stored with the run's result."""

    model: nn.Module
    params: list[nn.Parameter]
    regularizer: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    schedule: MaskSchedule | None = None  # dynamic / incremental: called before every optimizer step


@dataclass
class MethodContext:
    """What a method may use to prepare a model: the target's name and training data (never its test
    split), the seed, the data config, and the benchmark-wide choices (L2 lambda, LoRA rank, subsets)."""

    target: str
    seed: int
    num_classes: int
    train_images: np.ndarray
    train_labels: np.ndarray
    data_config: dict[str, Any]
    batch_size: int
    reg_lambda: float
    lora_rank: int
    num_subsets: int
    total_steps: int  # optimizer steps of the fine-tuning run (the incremental schedule spreads its budget over them)

    def selection_loader(self, views: int = 2, augment: bool = True) -> DataLoader:
        """The training set with GPS's contrastive augmentation, ``views`` views per image (library transforms);
        ``augment=False``: the plain evaluation transform, one view (a diagnostic, not the paper's protocol)."""
        if not augment:
            transform = create_transforms(self.data_config, "vtab", train=False)
        else:
            transform = contrastive_transform(self.data_config)
            transform = TwoViews(transform) if views == 2 else transform
        dataset = ArrayImages(self.train_images, self.train_labels, transform)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)

    def grft_config(self, **overrides: Any) -> GRFTConfig:
        """GRFT settings of the benchmark: conv columns by tap (as the VTAB configs), regulariser on every
        trainable tensor (reg_blocks='all'), selection seeded by the run's seed."""
        values = dict(structure="row", k=1, conv_columns="tap", reg_lambda=self.reg_lambda, reg_blocks="all",
                      selection_views=2, num_subsets=1, selection_seed=self.seed)
        values.update(overrides)
        return GRFTConfig(**values)


PrepareFn = Callable[[nn.Module, MethodContext], Prepared]


@dataclass
class Method:
    """One row of the results table.

    Attributes:
        name: registry key (``--methods``).
        label: text in the table and the plot.
        family: learning-rate family (a key of the lr table: head, full, grft, lora).
        group: colour in the plot: baseline, grft, control, ablation.
        prepare: ``(model copy, context) -> Prepared``.
        cost: relative cost, used only to schedule the longest jobs first.
    """

    name: str
    label: str
    family: str
    group: str
    prepare: PrepareFn
    cost: float = 1.0


METHODS: dict[str, Method] = {}


def register(name: str, label: str, family: str, group: str, cost: float = 1.0) -> Callable[[PrepareFn], PrepareFn]:
    """Decorator adding a method to :data:`METHODS` (keeps registration order: the table's row order)."""

    def add(prepare: PrepareFn) -> PrepareFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = Method(name, label, family, group, prepare, cost)
        return prepare

    return add


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _head_only(model: nn.Module) -> list[nn.Parameter]:
    model.requires_grad_(False)
    for name in head_module_names(model):
        model.get_submodule(name).requires_grad_(True)
    return _trainable(model)


@register("linear", "Linear probe (head only)", "head", "baseline", cost=0.35)
def prepare_linear(model: nn.Module, ctx: MethodContext) -> Prepared:
    return Prepared(model, _head_only(model))


@register("full", "Full fine-tuning", "full", "baseline", cost=1.6)
def prepare_full(model: nn.Module, ctx: MethodContext) -> Prepared:
    model.requires_grad_(True)
    return Prepared(model, _trainable(model))


@register("bias", "Biases + head (GRFT's fully-trained set, no rows)", "grft", "baseline", cost=0.9)
def prepare_bias(model: nn.Module, ctx: MethodContext) -> Prepared:
    """The tensors GRFT trains fully (biases of targeted layers, head), without any row: what rows add."""
    targets = find_target_layers(model, ctx.grft_config())
    _head_only(model)
    for layer in targets.values():
        if layer.bias is not None:
            layer.bias.requires_grad_(True)
    regularizer = L2ToPretrained(model, ctx.grft_config())  # same lambda on the same tensors as GRFT
    return Prepared(model, _trainable(model), regularizer if regularizer.enabled else None)


LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


def lora_targets(model: nn.Module) -> list[str]:
    heads = head_module_names(model)
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS
            and not any(name == h or name.startswith(h + ".") for h in heads)]


def lora_count(model: nn.Module, rank: int) -> int:
    """Trainable parameters of LoRA rank ``rank`` on :func:`lora_targets`, plus the head."""
    adapters = sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules() if n in set(lora_targets(model)))
    return adapters + sum(p.numel() for n in head_module_names(model) for p in model.get_submodule(n).parameters())


@register("lora", "LoRA (PEFT, qkv/proj/fc1/fc2, r matched to GRFT row k=1)", "lora", "baseline", cost=1.1)
def prepare_lora(model: nn.Module, ctx: MethodContext) -> Prepared:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=ctx.lora_rank, lora_alpha=ctx.lora_rank, lora_dropout=0.0, bias="none",
                        target_modules=lora_targets(model), modules_to_save=head_module_names(model))
    wrapped = get_peft_model(model, config)
    return Prepared(wrapped, _trainable(wrapped), info={"lora_rank": ctx.lora_rank})


def _layer_stats(layers: Iterable[LayerSelection]) -> dict[str, Any]:
    layers = list(layers)
    shares = [layer.chosen_share for layer in layers]
    ratios = [layer.chosen_mean / layer.rest_mean for layer in layers if layer.rest_mean > 0]
    return {
        "chosen_share_mean": float(np.mean(shares)),
        "chosen_vs_rest_geomean": float(np.exp(np.mean(np.log(np.maximum(ratios, 1e-12))))) if ratios else None,
        "indices": {layer.name: layer.indices for layer in layers if layer.structure != "sparse"},
        "per_layer_share": {layer.name: layer.chosen_share for layer in layers},
    }


def _uniform_share(model: nn.Module, config: GRFTConfig) -> float:
    """Mean over layers of the score share a uniformly random choice gets in expectation (k / candidates)."""
    from grft_vision.selection import candidate_count, resolve_k

    shares = []
    for name, layer in find_target_layers(model, config).items():
        structure = config.layer_structure(layer)
        count = candidate_count(layer.weight.shape, structure, getattr(layer, "groups", 1))
        shares.append(resolve_k(config.k, count, name, structure) / count)
    return float(np.mean(shares))


def random_generator(target: str, seed: int) -> torch.Generator:
    """The generator of the random-rows control: its own stream per (target, seed), so that the rows are
    drawn independently for every target and every seed (a stable hash, not Python's salted ``hash``)."""
    digest = hashlib.sha256(f"random-rows/{target}/{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _chooser_scores(model: nn.Module, config: GRFTConfig, real: dict[str, torch.Tensor], chooser: str,
                    target: str, seed: int) -> dict[str, torch.Tensor]:
    """CPU scores that make ``apply_grft`` pick random candidates (drawn per target and seed, layer after
    layer from one stream) or the lowest-scored ones."""
    generator = random_generator(target, seed)
    scores = {}
    for name, layer in find_target_layers(model, config).items():
        key = f"{name}.weight"
        if chooser == "random":
            scores[key] = torch.rand(layer.weight.shape, generator=generator)
            continue
        # lowest: a per-row (row) or per-column constant score whose reduction is max - S_i
        score = real[key].double()
        flat = score.reshape(score.shape[0], -1)
        if config.layer_structure(layer) == "row":
            sums = flat.sum(1)
            value = (sums.max() - sums)[:, None].expand_as(flat) / flat.shape[1]
        elif config.layer_structure(layer) == "tap_column":
            sums = flat.sum(0)
            value = (sums.max() - sums)[None, :].expand_as(flat) / flat.shape[0]
        else:
            raise ValueError(f"chooser 'lowest' supports rows and tap columns, not {config.layer_structure(layer)}")
        scores[key] = value.reshape(score.shape).float().contiguous()
    return scores


ScoreFn = Callable[[nn.Module, "MethodContext", GRFTConfig], dict[str, torch.Tensor]]


def grft_method(structure: str, k: int, *, chooser: str | ScoreFn = "gradient", num_subsets: int | None = 1,
                l2: bool = True, bias: bool = True, augment: bool = True, schedule_events: int | None = None,
                **selection: Any) -> PrepareFn:
    """A GRFT-family method: rows / columns / sparse entries chosen by ``chooser``.

    Args:
        structure: 'row', 'column' or 'sparse' (GPS).
        k: rows / columns / entries per row per weight.
        chooser: 'gradient' (the library's SupCon selection, ``apply_grft(..., dataloader=...)``), 'random'
            (uniformly random candidates at the same k, drawn independently per target and seed), 'lowest'
            (the lowest-scored candidates), or a salience function
            ``(model, ctx, config) -> {weight name: score of the weight's shape}`` (e.g. another
            paper's importance measure; the chosen candidates are then the top-k of its scores, wrapped and
            trained exactly as GRFT's). For every chooser but 'gradient' the SupCon gradient scores are still
            computed, to record how much of them the choice holds.
        num_subsets: lowest-loss subsets n; None takes the benchmark's n > 1 setting.
        l2: L2-to-pretrained on (the benchmark's lambda) or off.
        bias: train the biases of the targeted layers (GRFT/GPS convention) or not.
        augment: select on GPS's two augmented views (the protocol) or, as a diagnostic, on one plain view.
        schedule_events: with a dynamic / incremental ``schedule``, how many schedule events the run holds
            (``schedule_interval`` = the run's optimizer steps / events, rounded up).
        selection: further :class:`GRFTConfig` fields of the selection (``score``, ``selection_loss``,
            ``budget``, ``schedule``, ``schedule_interval``, ...): the beyond-GRFT options, used as a user
            would set them. A dynamic or incremental ``schedule`` is returned in :attr:`Prepared.schedule`.
    """

    def prepare(model: nn.Module, ctx: MethodContext) -> Prepared:
        options = dict(selection)
        if schedule_events:
            options["schedule_interval"] = max(1, math.ceil(ctx.total_steps / schedule_events))
        config = ctx.grft_config(structure=structure, k=k, num_subsets=num_subsets or ctx.num_subsets,
                                 reg_lambda=ctx.reg_lambda if l2 else 0.0, train_bias=bias,
                                 selection_views=2 if augment else 1, **options)
        start = time.perf_counter()
        info: dict[str, Any] = {"uniform_share_mean": _uniform_share(model, config)}
        schedule = None
        if chooser == "gradient":
            loader = ctx.selection_loader(config.selection_views, augment)
            apply_grft(model, config=config, dataloader=loader, progress=False)
            record = model.grft_state.selection
            info.update(subset_losses=record.subset_losses, chosen_subset=record.chosen_subset,
                        subset_size=record.subset_size)
            if config.schedule == "static":  # a schedule moves the choice: its first record says little
                info.update(_layer_stats(record.layers))
            else:
                schedule = create_schedule(model, config, loader, total_steps=ctx.total_steps,
                                           budgets=model.grft_state.budgets)
        else:
            # the gradient scores are computed anyway, to measure how much of them the control captures
            real = {name: score.cpu() for name, score in compute_scores(
                model, ctx.selection_loader(config.selection_views, augment), config, progress=False).scores.items()}
            scores = chooser(model, ctx, config) if callable(chooser) else _chooser_scores(
                model, config, real, chooser, ctx.target, ctx.seed)
            device = next(model.parameters()).device
            apply_grft(model, scores={name: score.to(device) for name, score in scores.items()}, config=config)
            layers = [LayerSelection.build(layer.name, layer.structure, real[f"{layer.name}.weight"],
                                           torch.as_tensor(layer.indices))
                      for layer in model.grft_state.selection.layers]
            info.update(_layer_stats(layers))
        info["selection_seconds"] = time.perf_counter() - start
        report = trainable_parameters_report(model)
        info["report_trainable"] = report.trainable
        regularizer = L2ToPretrained(model, config)
        return Prepared(model, _trainable(model), regularizer if regularizer.enabled else None, info, schedule)

    return prepare


_GRFT_ROWS = [
    # name, label, group, structure, k, options
    ("grft-row-k1", "GRFT row k=1 (n=1, L2)", "grft", "row", 1, {}),
    ("grft-row-k2", "GRFT row k=2 (n=1, L2)", "grft", "row", 2, {}),
    ("grft-col-k1", "GRFT column k=1 (n=1, L2)", "grft", "column", 1, {}),
    ("grft-col-k2", "GRFT column k=2 (n=1, L2)", "grft", "column", 2, {}),
    ("gps-sparse-k1", "GPS sparse k=1 per row (GRFT-Sparse, L2)", "grft", "sparse", 1, {}),
    ("random-row-k1", "Random rows k=1 (control, L2)", "control", "row", 1, {"chooser": "random"}),
    ("random-row-k2", "Random rows k=2 (control, L2)", "control", "row", 2, {"chooser": "random"}),
    ("grft-row-k1-n4", "GRFT row k=1, lowest-loss subset n>1", "ablation", "row", 1, {"num_subsets": None}),
    ("grft-row-k1-noL2", "GRFT row k=1, L2 off", "ablation", "row", 1, {"l2": False}),
    ("grft-row-k1-nobias", "GRFT row k=1, biases frozen", "ablation", "row", 1, {"bias": False}),
    ("random-row-k1-nobias", "Random rows k=1, biases frozen (control)", "control", "row", 1,
     {"chooser": "random", "bias": False}),
    ("lowest-row-k1", "Lowest-scored rows k=1 (control)", "control", "row", 1, {"chooser": "lowest"}),
    ("grft-row-k1-plain", "GRFT row k=1, selected on plain images (diagnostic)", "ablation", "row", 1,
     {"augment": False}),
]
for _name, _label, _group, _structure, _k, _options in _GRFT_ROWS:
    register(_name, _label, "grft", _group, cost=1.0)(grft_method(_structure, _k, **_options))

# Beyond GRFT (SPEFT, ID3, GEM): other importance scores, budgets and schedules, every one on GRFT's row
# structure at the budget of GRFT row k=1 (k=2 for the incremental schedule, so that it has something to
# unmask step by step) and otherwise exactly GRFT's protocol: same trainable set, regulariser, learning rate.
_BEYOND_ROWS = [
    ("score-magnitude", "Row k=1 by magnitude |θ| (SPEFT, data-free)", {"score": "magnitude"}),
    ("score-gradient", "Row k=1 by |g| (SPEFT gradient)", {"score": "gradient"}),
    ("score-snip", "Row k=1 by SNIP |g·θ| (SPEFT)", {"score": "snip"}),
    ("score-force", "Row k=1 by FORCE −g·θ (SPEFT)", {"score": "force"}),
    ("score-taylor", "Row k=1 by Taylor-FO (g·θ)² (SPEFT)", {"score": "taylor_fo"}),
    ("score-synflow", "Row k=1 by SynFlow (SPEFT, data-free)", {"score": "synflow"}),
    ("score-grasp", "Row k=1 by GraSP −(Hg)·θ (SPEFT)", {"score": "grasp"}),
    ("score-fisher", "Row k=1 by Fisher Σ per-sample g² (SPEFT)", {"score": "fisher"}),
    ("score-d3", "Row k=1 by D3 |g|/(|θ|+1)² (ID3)", {"score": "d3"}),
    ("score-gem", "Row k=1 by |g|/|θ| (GEM ratio)", {"score": "gem"}),
    ("loss-ce", "Row k=1 by g² of cross-entropy (task loss, not SupCon)", {"selection_loss": "cross_entropy"}),
    ("budget-global", "Rows, global budget = row k=1's count (SPEFT global)", {"budget": "global"}),
    ("budget-entropy", "Rows, entropy budget = row k=1's count (GEM)", {"budget": "entropy"}),
    ("schedule-dynamic", "Row k=1, re-selected every 1/4 of training (SPEFT dynamic)",
     {"schedule": "dynamic", "schedule_events": 4}),
]
for _name, _label, _options in _BEYOND_ROWS:
    register(_name, _label, "grft", "beyond", cost=1.0)(grft_method("row", 1, **_options))
register("schedule-incremental-k2", "Rows unmasked 0→2 in 4 steps (ID3 increment-S), vs GRFT row k=2", "grft",
         "beyond", cost=1.0)(grft_method("row", 2, schedule="incremental", schedule_events=4))

# A run without --methods runs one suite; each finishes in < 30 min on 2 CPU cores (pre-training included).
SUITES: dict[str, tuple[str, ...]] = {
    "paper": tuple(name for name in METHODS if METHODS[name].group != "beyond"),
    "beyond": ("grft-row-k1", "grft-row-k2", "random-row-k1", "random-row-k2",
               *(name for name in METHODS if METHODS[name].group == "beyond")),
}
DEFAULT_METHODS = SUITES["paper"]


# ----------------------------------------------------------------------------------------- one job
@dataclass(frozen=True)
class Job:
    target: str
    method: str
    seed: int
    lr: float
    reg_lambda: float
    split: str = "test"  # "test": train on the training set, report test; "val": train[:80%] -> train[80%:]


_WORKER: dict[str, Any] = {}


def _init_worker(settings: dict, state: dict[str, torch.Tensor], targets: dict[str, transfer_data.TargetData],
                 lora_rank: int, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    _WORKER.update(settings=Settings.from_dict(settings), state=state, targets=targets, lora_rank=lora_rank)


def _run_job(job: Job) -> dict[str, Any]:
    return finetune(job, _WORKER["settings"], _WORKER["state"], _WORKER["targets"][job.target], _WORKER["lora_rank"])


def finetune(job: Job, settings: Settings, state: dict[str, torch.Tensor], data: transfer_data.TargetData,
             lora_rank: int) -> dict[str, Any]:
    """Prepare a fresh copy of the pre-trained model with ``job.method``, train it, return its test top-1."""
    start, cpu_start = time.perf_counter(), time.process_time()
    if job.split == "val":
        data = data.split_validation()
    torch.manual_seed(job.seed)  # the head's initialisation
    device = torch.device(settings.device)
    model = load_backbone(build_vit(settings, data.num_classes), state).to(device)
    base_total = sum(p.numel() for p in model.parameters())
    head_params = sum(p.numel() for n in head_module_names(model) for p in model.get_submodule(n).parameters())
    x, y = to_tensor(data.train_images), torch.from_numpy(data.train_labels)
    loader = DataLoader(TensorDataset(x, y), batch_size=settings.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(job.seed))
    total_steps = (settings.warmup_epochs + settings.epochs) * len(loader)
    ctx = MethodContext(job.target, job.seed, data.num_classes, data.train_images, data.train_labels,
                        data_config(settings), settings.batch_size, job.reg_lambda, lora_rank, settings.num_subsets,
                        total_steps)
    method = METHODS[job.method]
    prepared = method.prepare(model, ctx)
    prepare_seconds = time.perf_counter() - start
    test_loader = DataLoader(TensorDataset(to_tensor(data.test_images), torch.from_numpy(data.test_labels)),
                             batch_size=256)
    optimizer = torch.optim.Adam(prepared.params, lr=job.lr)
    from timm.scheduler import create_scheduler_v2

    scheduler, total_epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=settings.epochs,
                                                  warmup_epochs=settings.warmup_epochs, warmup_lr=job.lr * 1e-3,
                                                  min_lr=job.lr * 1e-3, warmup_prefix=True)
    context = DistributedContext(device=device)
    before_step = None
    if prepared.schedule is not None:
        def before_step(global_step: int) -> None:
            prepared.schedule.before_step(global_step, optimizer)

    train_step = TrainStep(prepared.model, optimizer, nn.CrossEntropyLoss(), regularizer=prepared.regularizer,
                           before_step=before_step, context=context)
    losses = {}
    for epoch in range(total_epochs):
        losses = train_one_epoch(train_step, loader, epoch, progress=False)
        scheduler.step(epoch + 1)
    step = train_step.global_step
    # counted after training: a schedule swaps the optimizer's tensors (incremental ones grow to the budget)
    trainable = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    if prepared.schedule is not None:
        prepared.info.update(report_trainable=trainable_parameters_report(prepared.model).trainable,
                             schedule_events=prepared.schedule.events, entry_updates=prepared.schedule.updates,
                             mean_trainable_per_step=prepared.schedule.updates / max(step, 1))
    predictions, targets = evaluate(prepared.model, test_loader, context=context, progress=False)
    top1 = float((predictions == targets).float().mean())
    return {
        "target": job.target, "method": job.method, "seed": job.seed, "split": job.split, "lr": job.lr,
        "reg_lambda": job.reg_lambda if METHODS[job.method].family == "grft" else None,
        "top1": top1, "trainable": trainable, "head_params": head_params, "total": base_total,
        "trainable_percent": 100.0 * trainable / base_total, "final_train_loss": losses.get("task_loss"),
        "final_reg_loss": losses.get("reg_loss"), "epochs": total_epochs, "train_images": len(y),
        "test_images": len(targets), "prepare_seconds": prepare_seconds,
        "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start, "info": prepared.info,
    }


# ------------------------------------------------------------------------------------ orchestration
def choose_lora_rank(settings: Settings) -> dict[str, int]:
    """The LoRA rank whose trainable count is closest to GRFT row k=1's (both include the same head)."""
    torch.manual_seed(0)
    model = build_vit(settings, 10)
    lora = {r: lora_count(model, r) for r in range(1, 33)}
    config = GRFTConfig(structure="row", k=1, conv_columns="tap")
    scores = {f"{n}.weight": torch.rand(m.weight.shape) for n, m in find_target_layers(model, config).items()}
    grft = trainable_parameters_report(apply_grft(model, scores=scores, config=config)).trainable
    rank = min(lora, key=lambda r: (abs(lora[r] - grft), r))
    return {"rank": rank, "lora_trainable": lora[rank], "grft_row_k1_trainable": grft, "num_classes": 10}


def _logger(path: Path | None, quiet: bool) -> Callable[[str], None]:
    handle = open(path, "a", encoding="utf-8") if path is not None else None

    def log(message: str) -> None:
        line = f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {message}"
        if not quiet:
            print(line, flush=True)
        if handle is not None:
            handle.write(line + "\n")
            handle.flush()

    return log


def _run_jobs(jobs: list[Job], settings: Settings, state: dict, targets: dict, lora_rank: int, workers: int,
              log: Callable[[str], None]) -> list[dict[str, Any]]:
    jobs = sorted(jobs, key=lambda j: -METHODS[j.method].cost)  # longest first: better packing
    results = []
    start = time.perf_counter()

    def done(result: dict[str, Any]) -> None:
        results.append(result)
        log(f"[{len(results):>3}/{len(jobs)}] {result['target']:<11} {result['method']:<22} seed {result['seed']} "
            f"({result['split']}): top-1 {result['top1']:.3f}, {result['trainable']:,} trainable, "
            f"{result['seconds']:.1f} s (elapsed {time.perf_counter() - start:.0f} s)")

    if workers <= 1:  # in this process, one thread (the model is small: more threads mostly add overhead)
        threads = torch.get_num_threads()
        _init_worker(settings.to_dict(), state, targets, lora_rank, 1)
        try:
            for job in jobs:
                done(_run_job(job))
        finally:
            torch.set_num_threads(threads)
        return results
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker,
                      initargs=(settings.to_dict(), state, targets, lora_rank, 1)) as pool:
        for result in pool.imap_unordered(_run_job, jobs):
            done(result)
    return results


def _make_targets(settings: Settings) -> dict[str, transfer_data.TargetData]:
    return {name: transfer_data.make_target(name, settings.num_train, settings.num_test, settings.data_seed,
                                            settings.img_size) for name in settings.targets}


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}


def _code_version() -> dict[str, Any]:
    """The git commit of this checkout and whether the benchmark or the package differ from it (None: no git)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--", "benchmarks", "grft_vision")
    return {"commit": commit, "dirty": None if changes is None else bool(changes)}


def _command(argv: Sequence[str] | None = None) -> str:
    """The command line that ran this benchmark: ``python benchmarks/transfer.py`` and ``argv`` (default: this
    process's arguments), run from the repository root."""
    return shlex.join(["python", "benchmarks/transfer.py", *(sys.argv[1:] if argv is None else argv)])


def run_benchmark(settings: Settings, out_dir: Path, cache_dir: Path | None, workers: int = 2,
                  lr: dict[str, float] | None = None, reg_lambda: float = DEFAULT_REG_LAMBDA,
                  quiet: bool = False, plot_file: str | None = "accuracy_vs_trainable.png",
                  command: str | None = None) -> dict[str, Any]:
    """Pre-train (or load), fine-tune every (target, method, seed), write results.json, table.md and, unless
    ``plot_file`` is None, the plot. ``command``: the command line to record (default: this process's)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = _logger(out_dir / "log.txt", quiet)
    lr = {**DEFAULT_LR, **(lr or {})}
    methods = settings.methods or DEFAULT_METHODS
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered: {', '.join(METHODS)}")
    begin, code = time.perf_counter(), _code_version()  # the code that runs, not the checkout at the end
    state, pre = pretrain(settings, cache_dir, log, workers, out_dir / "log.txt", quiet)
    t_targets = time.perf_counter()
    targets = _make_targets(settings)
    target_seconds = time.perf_counter() - t_targets
    lora = choose_lora_rank(settings)
    log(f"targets ready in {target_seconds:.1f} s; LoRA rank {lora['rank']} ({lora['lora_trainable']:,} trainable) "
        f"matches GRFT row k=1 ({lora['grft_row_k1_trainable']:,}) at 10 classes")
    jobs = [Job(t, m, s, lr[METHODS[m].family], reg_lambda) for t in settings.targets for m in methods
            for s in settings.seeds]
    t_fine = time.perf_counter()
    runs = _run_jobs(jobs, settings, state, targets, lora["rank"], workers, log)
    finetune_seconds = time.perf_counter() - t_fine
    results = {
        "benchmark": "transfer", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command or _command(), "code": code, "machine": _machine(), "workers": workers,
        "settings": settings.to_dict(), "methods": list(methods),
        "lr": lr, "reg_lambda": reg_lambda, "lora": lora, "pretrain": pre,
        "timing": {"pretrain_seconds": 0.0 if pre["from_cache"] else pre["seconds"],
                   "pretrain_seconds_when_made": pre["seconds"], "pretrain_from_cache": pre["from_cache"],
                   "target_data_seconds": target_seconds, "finetune_seconds": finetune_seconds,
                   "finetune_jobs": len(runs), "finetune_job_seconds_sum": sum(r["seconds"] for r in runs)},
        "runs": sorted(runs, key=lambda r: (r["target"], list(METHODS).index(r["method"]), r["seed"])),
    }
    results["summary"] = summarise(results)
    t_report = time.perf_counter()
    (out_dir / "table.md").write_text(to_markdown(results))
    if plot_file is not None:
        plot(results, out_dir / plot_file)
    results["timing"]["report_seconds"] = time.perf_counter() - t_report
    results["timing"]["total_seconds"] = time.perf_counter() - begin
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    log(f"done in {results['timing']['total_seconds']:.0f} s: {out_dir / 'table.md'}")
    return results


def tune(settings: Settings, out_dir: Path, cache_dir: Path | None, workers: int = 2, quiet: bool = False) -> dict:
    """Choose the learning rate of each family, then GRFT's lambda, on validation splits (seed 0).

    Each target's training set is split train[:80%] -> val[80%:]; the test split is never read. The score
    of a setting is its mean validation top-1 over the targets.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    log = _logger(out_dir / "log.txt", quiet)
    begin, code = time.perf_counter(), _code_version()  # the code that runs, not the checkout at the end
    state, pre = pretrain(settings, cache_dir, log, workers, out_dir / "log.txt", quiet)
    targets = _make_targets(settings)
    lora = choose_lora_rank(settings)
    seed = settings.seeds[0]
    jobs = [Job(t, TUNE_LR_METHOD[family], seed, value, 0.0, split="val")
            for family, grid in TUNE_LR_GRID.items() for value in grid for t in settings.targets]
    runs = _run_jobs(jobs, settings, state, targets, lora["rank"], workers, log)
    table: dict[str, dict[float, float]] = {}
    for family, grid in TUNE_LR_GRID.items():
        table[family] = {value: float(np.mean([r["top1"] for r in runs if r["method"] == TUNE_LR_METHOD[family]
                                               and r["lr"] == value])) for value in grid}
    chosen_lr = {family: max(scores, key=scores.get) for family, scores in table.items()}
    log(f"chosen learning rates: {chosen_lr}")
    lambda_jobs = [Job(t, "grft-row-k1", seed, chosen_lr["grft"], value, split="val")
                   for value in TUNE_LAMBDA_GRID for t in settings.targets]
    lambda_runs = _run_jobs(lambda_jobs, settings, state, targets, lora["rank"], workers, log)
    lambdas = {value: float(np.mean([r["top1"] for r in lambda_runs if r["reg_lambda"] == value]))
               for value in TUNE_LAMBDA_GRID}
    lambdas_zero = table["grft"][chosen_lr["grft"]]  # the lr search ran GRFT row k=1 with L2 off
    chosen_lambda = max(lambdas, key=lambdas.get)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "code": code, "machine": _machine(),
              "settings": settings.to_dict(), "pretrain": pre, "lr_grid": {f: list(g) for f, g in TUNE_LR_GRID.items()},
              "lr_method": TUNE_LR_METHOD, "val_top1_by_lr": {f: {str(k): v for k, v in s.items()} for f, s in table.items()},
              "chosen_lr": chosen_lr, "val_top1_by_lambda": {str(k): v for k, v in lambdas.items()},
              "val_top1_lambda_0": lambdas_zero, "chosen_lambda": chosen_lambda,
              "per_target": runs + lambda_runs, "seconds": time.perf_counter() - begin}
    (out_dir / "tune.json").write_text(json.dumps(result, indent=1))
    log(f"chosen lambda: {chosen_lambda} (val top-1 {lambdas}, lambda 0: {lambdas_zero:.4f}); "
        f"{result['seconds']:.0f} s")
    return result


# ------------------------------------------------------------------------------------------ report
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / max(len(a | b), 1)


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per method: per-target and overall mean ± std over seeds, trainable counts; selection vs random."""
    runs = [r for r in results["runs"] if r["split"] == "test"]
    targets = list(results["settings"]["targets"])
    seeds = list(results["settings"]["seeds"])
    by = {(r["method"], r["target"], r["seed"]): r for r in runs}
    methods = [m for m in results["methods"] if any(r["method"] == m for r in runs)]
    rows = {}
    for method in methods:
        per_target = {}
        for target in targets:
            values = [by[(method, target, s)]["top1"] for s in seeds if (method, target, s) in by]
            if values:
                per_target[target] = _mean_std([100 * v for v in values])
        complete = [s for s in seeds if all((method, t, s) in by for t in targets)]
        seed_means = [100 * float(np.mean([by[(method, t, s)]["top1"] for t in targets])) for s in complete]
        mine = [r for r in runs if r["method"] == method]
        rows[method] = {
            "label": METHODS[method].label if method in METHODS else method,
            "group": METHODS[method].group if method in METHODS else "other",
            "per_target": per_target,
            "mean": _mean_std(seed_means) if seed_means else None,
            "trainable_mean": float(np.mean([r["trainable"] for r in mine])),
            "backbone_trainable": float(np.mean([r["trainable"] - r["head_params"] for r in mine])),
            "trainable_percent": float(np.mean([r["trainable_percent"] for r in mine])),
            "seconds_mean": float(np.mean([r["seconds"] for r in mine])),
        }
    summary: dict[str, Any] = {"methods": rows, "paired": {}, "selection": {}}
    pairs = [("grft-row-k1", "random-row-k1"), ("grft-row-k2", "random-row-k2"),
             ("grft-row-k1-nobias", "random-row-k1-nobias"), ("grft-row-k1", "lowest-row-k1"),
             ("grft-row-k1-plain", "random-row-k1"), ("grft-row-k1-plain", "grft-row-k1"),
             ("grft-row-k1-n4", "grft-row-k1"), ("grft-row-k1", "grft-row-k1-noL2"), ("grft-row-k1", "bias"),
             ("grft-row-k1", "linear"), ("full", "grft-row-k1"), ("grft-row-k1", "lora")]
    for method in methods:  # every beyond-GRFT row against GRFT and against random rows at its budget
        if METHODS.get(method) and METHODS[method].group == "beyond":
            k = "k2" if method.endswith("-k2") else "k1"
            pairs += [(method, f"grft-row-{k}"), (method, f"random-row-{k}")]
    for a, b in pairs:
        diffs = {t: [100 * (by[(a, t, s)]["top1"] - by[(b, t, s)]["top1"]) for s in seeds
                     if (a, t, s) in by and (b, t, s) in by] for t in targets}
        flat = [d for v in diffs.values() for d in v]
        if flat:
            summary["paired"][f"{a} - {b}"] = {
                "per_target": {t: _mean_std(v) for t, v in diffs.items() if v},
                "mean": float(np.mean(flat)), "wins": sum(d > 0 for d in flat), "ties": sum(d == 0 for d in flat),
                "losses": sum(d < 0 for d in flat), "pairs": len(flat)}
    for method in methods:
        mine = [r for r in runs if r["method"] == method and "chosen_share_mean" in r["info"]]
        if not mine:
            continue
        entry = {"chosen_share": float(np.mean([r["info"]["chosen_share_mean"] for r in mine])),
                 "uniform_share": float(np.mean([r["info"]["uniform_share_mean"] for r in mine]))}
        ratios = [r["info"]["chosen_vs_rest_geomean"] for r in mine if r["info"].get("chosen_vs_rest_geomean")]
        entry["chosen_vs_rest"] = float(np.mean(ratios)) if ratios else None
        seed_overlap, target_overlap = [], []
        for target in targets:
            for i, s in enumerate(seeds):
                for s2 in seeds[i + 1:]:
                    if (method, target, s) in by and (method, target, s2) in by:
                        a, b = by[(method, target, s)]["info"]["indices"], by[(method, target, s2)]["info"]["indices"]
                        seed_overlap += [_jaccard(a[n], b[n]) for n in a if n in b]
        for s in seeds:
            for i, t in enumerate(targets):
                for t2 in targets[i + 1:]:
                    if (method, t, s) in by and (method, t2, s) in by:
                        a, b = by[(method, t, s)]["info"]["indices"], by[(method, t2, s)]["info"]["indices"]
                        target_overlap += [_jaccard(a[n], b[n]) for n in a if n in b]
        entry["jaccard_across_seeds"] = float(np.mean(seed_overlap)) if seed_overlap else None
        entry["jaccard_across_targets"] = float(np.mean(target_overlap)) if target_overlap else None
        summary["selection"][method] = entry
    return summary


def _cell(value: tuple[float, float] | None) -> str:
    return "—" if value is None else f"{value[0]:.1f} ± {value[1]:.1f}"


def to_markdown(results: dict[str, Any]) -> str:
    """The results table (mean ± std over seeds, top-1 %), the paired differences and the selection record."""
    summary = results.get("summary") or summarise(results)
    targets = list(results["settings"]["targets"])
    lines = ["| method | trainable params | trainable % | " + " | ".join(targets) + " | mean |",
             "|---|---:|---:|" + "---:|" * (len(targets) + 1)]
    for method, row in summary["methods"].items():
        cells = [_cell(row["per_target"].get(t)) for t in targets]
        lines.append(f"| {row['label']} | {row['trainable_mean']:,.0f} | {row['trainable_percent']:.2f} | "
                     + " | ".join(cells) + f" | **{_cell(row['mean'])}** |")
    seeds = results["settings"]["seeds"]
    lines += ["", f"Top-1 accuracy (%) on each target's test split, mean ± std over seeds {list(seeds)}; "
                  "trainable params = mean over targets (the head differs by class count); trainable % of the "
                  "model's own parameters.", ""]
    if summary["paired"]:
        lines += ["| paired difference (same target, same seed) | " + " | ".join(targets)
                  + " | mean | wins / ties / losses |", "|---|" + "---:|" * (len(targets) + 2)]
        for name, entry in summary["paired"].items():
            cells = [_cell(entry["per_target"].get(t)) for t in targets]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {entry['mean']:+.2f} | "
                         f"{entry['wins']} / {entry['ties']} / {entry['losses']} |")
        lines.append("")
    if summary["selection"]:
        lines += ["| selection record | share of the selection score held by the chosen candidates (controls: "
                  "of GRFT's SupCon gradient score) | "
                  "same for a uniform random choice (k / candidates) | chosen / rest mean score | "
                  "index overlap across seeds (Jaccard) | across targets |", "|---|---:|---:|---:|---:|---:|"]
        fmt = lambda v, p=3: "—" if v is None else f"{v:.{p}f}"  # noqa: E731
        for method, entry in summary["selection"].items():
            lines.append(f"| {method} | {fmt(entry['chosen_share'])} | {fmt(entry['uniform_share'])} | "
                         f"{fmt(entry['chosen_vs_rest'], 2)} | {fmt(entry['jaccard_across_seeds'])} | "
                         f"{fmt(entry['jaccard_across_targets'])} |")
    return "\n".join(lines) + "\n"


_GROUP_STYLE = {"baseline": ("tab:gray", "s"), "grft": ("tab:blue", "o"), "control": ("tab:red", "x"),
                "ablation": ("tab:green", "^"), "beyond": ("tab:orange", "v"), "other": ("tab:purple", "D")}


def plot(results: dict[str, Any], path: Path) -> Path:
    """Mean top-1 over targets vs trainable % (log x), error bars = std over seeds; and per-target bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results.get("summary") or summarise(results)
    targets = list(results["settings"]["targets"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.2), gridspec_kw={"width_ratios": [1.25, 1]})
    for method, row in summary["methods"].items():
        if row["mean"] is None:
            continue
        colour, marker = _GROUP_STYLE.get(row["group"], _GROUP_STYLE["other"])
        left.errorbar(row["trainable_percent"], row["mean"][0], yerr=row["mean"][1], fmt=marker, color=colour,
                      capsize=3, markersize=7)
        left.annotate(method, (row["trainable_percent"], row["mean"][0]), textcoords="offset points",
                      xytext=(5, 3), fontsize=7)
    left.set_xscale("log")
    left.set_xlabel("trainable parameters (% of the model)")
    left.set_ylabel(f"top-1 (%), mean over {len(targets)} targets")
    left.set_title("accuracy vs trainable % (error bar: std over seeds)")
    left.grid(True, which="both", alpha=0.3)
    for group, (colour, marker) in _GROUP_STYLE.items():
        if any(row["group"] == group for row in summary["methods"].values()):
            left.plot([], [], marker, color=colour, label=group)
    left.legend(loc="lower right", fontsize=8)
    key = [m for m in ("linear", "bias", "grft-row-k1", "random-row-k1", "lowest-row-k1", "lora", "full")
           if m in summary["methods"]]
    width = 0.8 / max(len(key), 1)
    for i, method in enumerate(key):
        row = summary["methods"][method]
        means = [row["per_target"].get(t, (np.nan, 0))[0] for t in targets]
        stds = [row["per_target"].get(t, (0, 0))[1] for t in targets]
        right.bar(np.arange(len(targets)) + (i - (len(key) - 1) / 2) * width, means, width, yerr=stds,
                  label=method, capsize=2)
    right.set_xticks(np.arange(len(targets)), targets)
    right.set_ylabel("top-1 (%)")
    right.set_title("per target")
    if key:
        right.legend(fontsize=7, ncol=2)
    right.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ width sweep
# Does gradient selection beat random rows as the model widens? The same source task, targets and protocol at
# several widths (depth fixed, head width fixed: heads scale with the width), each width pre-trained from
# several seeds, so that no single checkpoint decides (the GRFT - random sign flips between checkpoints).
SWEEP_METHODS = ("grft-row-k1", "grft-row-k1-plain", "random-row-k1", "lowest-row-k1", "score-grasp", "linear",
                 "bias")
SWEEP_PAIRS = (("grft-row-k1", "random-row-k1"), ("grft-row-k1", "lowest-row-k1"),
               ("grft-row-k1-plain", "random-row-k1"), ("score-grasp", "random-row-k1"), ("grft-row-k1", "bias"),
               ("grft-row-k1", "linear"))
PLOTTED_PAIRS = SWEEP_PAIRS[:2]  # the question: GRFT - random and GRFT - lowest against width
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Sweep:
    """The width sweep: one benchmark run (:func:`run_benchmark`) per (width, pre-training seed).

    The pre-training learning rate scales as ``1 / width`` from the base settings' (AdamW's rule for hidden
    weights in muP): with the width-64 recipe's 3e-3, a width-192 model stays at chance loss for longer
    than one at 1e-3. The fine-tuning learning rates and lambda are the benchmark's, tuned at width 64.

    Attributes:
        widths: embedding widths; ``num_heads = width / head_dim``, the depth stays the base settings'.
        pretrain_seeds: one pre-trained checkpoint per seed at every width.
        head_dim: width of one attention head (16: the width-64, 4-head model's).
        methods: the fine-tuning methods, :data:`SWEEP_METHODS` by default.
        overrides: :class:`Settings` overrides at every width.
        per_width: :class:`Settings` overrides by width, applied last (fewer source epochs or methods at the
            wider models); a width not listed runs the base settings (with the scaled learning rate).
    """

    widths: tuple[int, ...] = (64, 128, 192)
    pretrain_seeds: tuple[int, ...] = (0, 1)
    head_dim: int = 16
    methods: tuple[str, ...] = SWEEP_METHODS
    overrides: dict[str, Any] = field(default_factory=dict)
    per_width: dict[int, dict[str, Any]] = field(default_factory=dict)

    def settings_at(self, base: Settings, width: int, pretrain_seed: int) -> Settings:
        """The benchmark settings of one checkpoint: ``base`` resized to ``width``, then the overrides."""
        if width <= 0 or width % self.head_dim:
            raise ValueError(f"width {width} is not a positive multiple of the head width {self.head_dim}; "
                             f"pick widths like {self.head_dim * 4}, {self.head_dim * 8}")
        values = {"embed_dim": width, "num_heads": width // self.head_dim, "pretrain_seed": pretrain_seed,
                  "pretrain_lr": base.pretrain_lr * base.embed_dim / width, "methods": self.methods,
                  **self.overrides, **self.per_width.get(width, {})}
        return dataclasses.replace(base, **values)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # int keys -> str, tuples -> lists


# About 90 minutes on 2 idle cores (docs/results.md): widths 64 and 128, GRFT / random / lowest rows only. Width
# 128 keeps the 10 source epochs: with 7 it ended at 15.5 % source top-1 against width 64's 35.5 % (the accuracy
# jumps in the last, low-learning-rate epochs), and widths must be compared at a comparable source accuracy.
# Widths 192 and 384 with every method are the GPU command in the module docstring.
SWEEP_CORE = ("grft-row-k1", "random-row-k1", "lowest-row-k1")
SWEEP = Sweep(widths=(64, 128), methods=SWEEP_CORE)
# the pipeline check: two tiny widths, one target, two seeds (two units per checkpoint for an interval)
QUICK_SWEEP = Sweep(widths=(16, 32), overrides={"targets": ("count",), "source_images": 512,
                                                "source_val_images": 128})


def checkpoint_name(width: int, pretrain_seed: int) -> str:
    """The folder of one checkpoint's benchmark run inside the sweep's output folder."""
    return f"width{width}-pretrain{pretrain_seed}"


def _finished(path: Path, settings: Settings) -> dict[str, Any] | None:
    """A checkpoint's earlier ``results.json`` if it ran with exactly these settings (a resumed sweep)."""
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("settings") == json.loads(json.dumps(settings.to_dict())) else None


def run_sweep(sweep: Sweep, base: Settings, out_dir: Path, cache_dir: Path | None, workers: int = 2,
              lr: dict[str, float] | None = None, reg_lambda: float = DEFAULT_REG_LAMBDA,
              quiet: bool = False, command: str | None = None) -> dict[str, Any]:
    """Run the benchmark at every (width, pre-training seed) of ``sweep``; write ``sweep.json`` (settings,
    code version, command, summary; the per-job results stay in each checkpoint's ``results.json``),
    ``sweep.md`` and ``width_sweep.png``. A checkpoint whose ``results.json`` already holds the same settings
    is not run again (an interrupted sweep resumes). ``command``: the command line to record."""
    command, code = command or _command(), _code_version()
    out_dir.mkdir(parents=True, exist_ok=True)
    log = _logger(out_dir / "log.txt", quiet)
    begin = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    resumed: list[str] = []
    for width in sweep.widths:
        for seed in sweep.pretrain_seeds:
            settings, name = sweep.settings_at(base, width, seed), checkpoint_name(width, seed)
            done = _finished(out_dir / name / "results.json", settings)
            if done is not None:
                log(f"{name}: already done ({out_dir / name / 'results.json'}), kept")
                runs[name] = done
                resumed.append(name)
                continue
            log(f"{name}: width {width}, {settings.num_heads} heads, pre-training seed {seed}, "
                f"{settings.pretrain_epochs} source epochs, {len(settings.methods)} methods")
            runs[name] = run_benchmark(settings, out_dir / name, cache_dir, workers, lr, reg_lambda, quiet,
                                       plot_file=None, command=command)
            timing = runs[name]["timing"]
            log(f"{name}: source val top-1 {runs[name]['pretrain']['source_val_top1']:.3f}, "
                f"pre-training {timing['pretrain_seconds']:.0f} s, fine-tuning {timing['finetune_seconds']:.0f} s")
    results = {
        "benchmark": "transfer-width-sweep", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command, "code": code, "machine": _machine(), "workers": workers,
        "sweep": sweep.to_dict(), "base_settings": base.to_dict(),
        "checkpoints": {name: f"{name}/results.json" for name in runs},
        "timing": {"total_seconds": time.perf_counter() - begin,
                   "pretrain_seconds": sum(r["timing"]["pretrain_seconds"] for r in runs.values()),
                   "finetune_seconds": sum(r["timing"]["finetune_seconds"] for r in runs.values()),
                   "checkpoint_seconds": {n: r["timing"]["total_seconds"] for n, r in runs.items()},
                   # CPU time (pre-trainings made in this sweep, all fine-tuning jobs): what it costs on idle cores
                   "cpu_seconds": sum(r["pretrain"].get("cpu_seconds", 0.0) for r in runs.values()
                                      if not r["pretrain"]["from_cache"])
                   + sum(j.get("cpu_seconds", 0.0) for r in runs.values() for j in r["runs"]),
                   "resumed": resumed},
    }
    results["summary"] = summarise_sweep(runs)
    (out_dir / "sweep.json").write_text(json.dumps(results, indent=1))
    (out_dir / "sweep.md").write_text(sweep_markdown(results["summary"]))
    plot_sweep(results["summary"], out_dir / "width_sweep.png")
    log(f"sweep done in {results['timing']['total_seconds']:.0f} s: {out_dir / 'sweep.md'}")
    return results


def load_sweep(out_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``(sweep.json, {checkpoint name: its results.json})`` of a finished sweep folder."""
    results = json.loads((out_dir / "sweep.json").read_text())
    return results, {name: json.loads((out_dir / path).read_text()) for name, path in results["checkpoints"].items()}


def _confidence_interval(values: Sequence[float]) -> list[float] | None:
    """Student-t interval of the mean (:data:`CONFIDENCE`); None for fewer than two values."""
    from scipy import stats

    if len(values) < 2:
        return None
    mean, sem = float(np.mean(values)), float(np.std(values, ddof=1)) / math.sqrt(len(values))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)) * sem
    return [mean - half, mean + half]


def _test_top1(results: dict[str, Any]) -> dict[tuple[str, str, int], float]:
    return {(r["method"], r["target"], r["seed"]): 100 * r["top1"] for r in results["runs"] if r["split"] == "test"}


def _units(results: Sequence[dict[str, Any]], value: Callable[[dict, str, int], float | None]) -> list[float]:
    """One value per (checkpoint, seed): ``value(top1 by key, target, seed)`` averaged over the targets,
    for the seeds where every target has one."""
    units = []
    for result in results:
        by, targets = _test_top1(result), result["settings"]["targets"]
        for seed in result["settings"]["seeds"]:
            values = [value(by, t, seed) for t in targets]
            if all(v is not None for v in values):
                units.append(float(np.mean(values)))
    return units


def paired_difference(results: Sequence[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """``a - b`` top-1 (points) over one or more checkpoints' runs, paired on (checkpoint, target, seed).

    ``mean`` and ``ci95`` (Student t) are over the units of replication, the (checkpoint, seed) runs of the
    whole target set (the difference averaged over the targets); ``wins`` / ``ties`` / ``losses`` count the
    single (checkpoint, target, seed) pairs. None when no pair exists (a method missing at this width).
    """
    def diff(by: dict, target: str, seed: int) -> float | None:
        if (a, target, seed) in by and (b, target, seed) in by:
            return by[(a, target, seed)] - by[(b, target, seed)]
        return None

    units = _units(results, diff)
    if not units:
        return None
    flat = [d for r in results for t in r["settings"]["targets"] for s in r["settings"]["seeds"]
            if (d := diff(_test_top1(r), t, s)) is not None]
    return {"mean": float(np.mean(units)), "ci95": _confidence_interval(units), "units": len(units),
            "wins": sum(d > 0 for d in flat), "ties": sum(d == 0 for d in flat), "losses": sum(d < 0 for d in flat),
            "pairs": len(flat)}


def _method_means(results: Sequence[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per method: mean ± std over the (checkpoint, seed) units of the top-1 averaged over the targets."""
    methods = list(dict.fromkeys(m for r in results for m in r["methods"]))
    means = {}
    for method in methods:
        units = _units(results, lambda by, t, s: by.get((method, t, s)))
        if units:
            means[method] = _mean_std(units)
    return means


def summarise_sweep(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per width: every checkpoint (pre-training seed, weight hash, source accuracy, method means, paired
    differences) and all checkpoints pooled; the figures of ``sweep.md`` and the plot, from per-job results."""
    widths: dict[str, Any] = {}
    for name, result in runs.items():
        width = str(result["settings"]["embed_dim"])
        entry = widths.setdefault(width, {"params": result["pretrain"]["params"],
                                          "num_heads": result["settings"]["num_heads"], "checkpoints": {}})
        entry["checkpoints"][name] = {
            "pretrain_seed": result["settings"]["pretrain_seed"], "sha256": result["pretrain"]["sha256"],
            "source_val_top1": 100 * result["pretrain"]["source_val_top1"],
            "pretrain_epochs": result["settings"]["pretrain_epochs"], "methods": _method_means([result]),
            "paired": {f"{a} - {b}": paired_difference([result], a, b) for a, b in SWEEP_PAIRS}}
    for width, entry in widths.items():
        results = [r for r in runs.values() if str(r["settings"]["embed_dim"]) == width]
        entry["pooled"] = {"methods": _method_means(results),
                           "paired": {f"{a} - {b}": paired_difference(results, a, b) for a, b in SWEEP_PAIRS}}
    return {"confidence": CONFIDENCE, "pairs": [f"{a} - {b}" for a, b in SWEEP_PAIRS],
            "widths": dict(sorted(widths.items(), key=lambda item: int(item[0])))}


def _pair_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "—"
    interval = "" if entry["ci95"] is None else f" [{entry['ci95'][0]:+.1f}, {entry['ci95'][1]:+.1f}]"
    return f"{entry['mean']:+.2f}{interval} ({entry['wins']}/{entry['ties']}/{entry['losses']})"


def sweep_markdown(summary: dict[str, Any]) -> str:
    """The sweep's two tables: accuracy per method, and the paired differences, per checkpoint and pooled
    (the methods and pairs that ran at some width)."""
    methods = [m for m in SWEEP_METHODS if any(m in w["pooled"]["methods"] for w in summary["widths"].values())]
    pairs = [p for p in summary["pairs"] if any(w["pooled"]["paired"].get(p) for w in summary["widths"].values())]
    names = [pair.replace(" - ", " − ") for pair in pairs]
    lines = ["| width (heads) | checkpoint: pre-training seed, weights sha256 | source epochs | source val top-1 | "
             + " | ".join(methods) + " |", "|---|---|---:|---:|" + "---:|" * len(methods)]
    diffs = ["| width | checkpoint | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for width, entry in summary["widths"].items():
        for name, ckpt in entry["checkpoints"].items():
            head = f"| {width} ({entry['num_heads']}) | seed {ckpt['pretrain_seed']}, `{ckpt['sha256'][:12]}`"
            lines.append(f"{head} | {ckpt['pretrain_epochs']} | {ckpt['source_val_top1']:.1f} | "
                         + " | ".join(_cell(ckpt["methods"].get(m)) for m in methods) + " |")
            diffs.append(f"| {width} | seed {ckpt['pretrain_seed']} | "
                         + " | ".join(_pair_cell(ckpt["paired"].get(p)) for p in pairs) + " |")
        seeds = ", ".join(str(c["pretrain_seed"]) for c in entry["checkpoints"].values())
        lines.append(f"| **{width}** ({entry['num_heads']}) | **pooled** (seeds {seeds}) | | | "
                     + " | ".join(f"**{_cell(entry['pooled']['methods'].get(m))}**" for m in methods) + " |")
        diffs.append(f"| **{width}** | **pooled** | "
                     + " | ".join(f"**{_pair_cell(entry['pooled']['paired'].get(p))}**" for p in pairs)
                     + " |")
    level = f"{100 * summary['confidence']:.0f}"
    lines += ["", "Top-1 (%) averaged over the targets, mean ± std over the (checkpoint, seed) runs.", ""]
    diffs += ["", f"Paired difference in top-1 points (same checkpoint, target and seed): mean [{level} % confidence "
                  "interval, Student t over the (checkpoint, seed) runs of the whole target set] (wins/ties/losses "
                  "over the single target × seed pairs)."]
    return "\n".join(lines + diffs) + "\n"


def plot_sweep(summary: dict[str, Any], path: Path) -> Path:
    """Left: the paired differences of :data:`PLOTTED_PAIRS` against width (pooled mean, confidence interval
    as error bar, each checkpoint's mean as a small marker); right: each method's mean top-1 against width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [int(w) for w in summary["widths"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    for i, (a, b) in enumerate(PLOTTED_PAIRS):
        pair, offset = f"{a} - {b}", (i - (len(PLOTTED_PAIRS) - 1) / 2) * 0.03 * (max(widths) - min(widths) or 1)
        xs, means, low, high = [], [], [], []
        for width, entry in summary["widths"].items():
            pooled = entry["pooled"]["paired"].get(pair)
            if pooled is None:
                continue
            xs.append(int(width) + offset)
            means.append(pooled["mean"])
            interval = pooled["ci95"] or [pooled["mean"]] * 2
            low.append(pooled["mean"] - interval[0])
            high.append(interval[1] - pooled["mean"])
            for ckpt in entry["checkpoints"].values():
                if ckpt["paired"].get(pair) is not None:
                    left.plot(int(width) + offset, ckpt["paired"][pair]["mean"], "o", mfc="none", ms=5,
                              color=f"C{i}", alpha=0.7)
        left.errorbar(xs, means, yerr=[low, high], fmt="-s", color=f"C{i}", capsize=4,
                      label=pair.replace(" - ", " − "))
    left.plot([], [], "o", mfc="none", color="gray", label="one checkpoint (mean over its seeds)")
    left.axhline(0.0, color="black", lw=0.8)
    left.set_xticks(widths)
    left.set_xlabel("model width (embedding dimension)")
    left.set_ylabel("paired difference in top-1 (points)")
    left.set_title(f"pooled over checkpoints, {100 * summary['confidence']:.0f} % confidence interval")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    spread = 0.012 * (max(widths) - min(widths) or 1)
    for i, method in enumerate(SWEEP_METHODS):
        points = [(int(w), e["pooled"]["methods"][method]) for w, e in summary["widths"].items()
                  if method in e["pooled"]["methods"]]
        if points:
            shift = (i - (len(SWEEP_METHODS) - 1) / 2) * spread
            right.errorbar([p[0] + shift for p in points], [p[1][0] for p in points], yerr=[p[1][1] for p in points],
                           fmt="-o", capsize=3, color=f"C{i}", label=method)
    right.set_xticks(widths)
    right.set_xlabel("model width (embedding dimension)")
    right.set_ylabel("top-1 (%), mean over targets")
    right.set_title("accuracy (error bar: std over checkpoints × seeds)")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- CLI
def _parse_lr(values: list[str]) -> dict[str, float]:
    parsed = {}
    for text in values:
        family, _, value = text.partition("=")
        if family not in DEFAULT_LR or not value:
            raise SystemExit(f"--lr expects FAMILY=VALUE with FAMILY in {sorted(DEFAULT_LR)}, got {text!r}")
        parsed[family] = float(value)
    return parsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings, no cache: a pipeline check")
    parser.add_argument("--tune", action="store_true", help="choose learning rates and lambda on validation splits")
    parser.add_argument("--sweep", action="store_true",
                        help="the width sweep: the benchmark at every width and pre-training seed (--widths, "
                             "--pretrain-seeds), with the sweep's methods unless --methods")
    parser.add_argument("--widths", nargs="+", type=int, default=None,
                        help=f"sweep widths (default {' '.join(map(str, SWEEP.widths))}; "
                             f"heads = width / {SWEEP.head_dim})")
    parser.add_argument("--pretrain-seeds", nargs="+", type=int, default=None,
                        help=f"sweep: one checkpoint per seed (default {' '.join(map(str, SWEEP.pretrain_seeds))})")
    parser.add_argument("--device", default="cpu", help="where to pre-train and fine-tune: cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", type=Path, default=Path("runs/transfer"), help="output directory")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/grft_vision/transfer").expanduser(),
                        help="where the pre-trained checkpoint is cached")
    parser.add_argument("--no-cache", action="store_true", help="pre-train again and do not cache")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="fine-tuning processes (one thread each); 1 = in this process")
    parser.add_argument("--suite", choices=sorted(SUITES), default="paper",
                        help="the methods to run: 'paper' (GRFT, baselines, controls, ablations) or 'beyond' "
                             "(the SPEFT / ID3 / GEM scores, budgets and schedules, with GRFT and random rows)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"instead of a suite, any of: {' '.join(METHODS)}")
    parser.add_argument("--targets", nargs="+", default=None, help=f"subset of: {' '.join(transfer_data.TARGETS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning cosine epochs (after warm-up)")
    parser.add_argument("--lr", action="append", default=[], metavar="FAMILY=VALUE",
                        help="override a family's learning rate (head, full, grft, lora)")
    parser.add_argument("--reg-lambda", type=float, default=DEFAULT_REG_LAMBDA, help="GRFT's L2 lambda")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        raise SystemExit(f"--device {args.device}: torch sees no such device (CUDA available: "
                         f"{torch.cuda.is_available()}); use --device cpu or run on a GPU machine")
    if args.sweep and args.tune:
        raise SystemExit("--sweep and --tune are separate runs; pick one")
    settings = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {"device": args.device}
    overrides["methods"] = tuple(args.methods) if args.methods else SUITES[args.suite]
    if args.targets:
        overrides["targets"] = tuple(args.targets)
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    if args.epochs:
        overrides["epochs"] = args.epochs
    settings = dataclasses.replace(settings, **overrides)
    cache_dir = None if (args.no_cache or args.quick) else args.cache_dir
    if args.sweep:
        sweep = QUICK_SWEEP if args.quick else SWEEP
        sweep = dataclasses.replace(sweep, widths=tuple(args.widths or sweep.widths),
                                    pretrain_seeds=tuple(args.pretrain_seeds or sweep.pretrain_seeds),
                                    methods=tuple(args.methods or sweep.methods))
        results = run_sweep(sweep, settings, args.out, cache_dir, args.workers, _parse_lr(args.lr), args.reg_lambda,
                            args.quiet, _command(argv))
        if not args.quiet:
            print(sweep_markdown(results["summary"]))
        return 0
    if args.widths or args.pretrain_seeds:
        raise SystemExit("--widths and --pretrain-seeds belong to the width sweep; add --sweep")
    if args.tune:
        tune(settings, args.out, cache_dir, args.workers, args.quiet)
        return 0
    results = run_benchmark(settings, args.out, cache_dir, args.workers, _parse_lr(args.lr), args.reg_lambda,
                            args.quiet, command=_command(argv))
    if not args.quiet:
        print(to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
