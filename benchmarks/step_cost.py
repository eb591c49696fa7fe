"""Cost of one training step of every fine-tuning method, side by side, for one model and one batch.

Methods (see ``docs/benchmarks.md``):

============  =======================================================================================
full          full fine-tuning, Adam over every parameter
gps-dense     the public GPS way: every parameter trainable, dense gradients zeroed outside a dense
              top-k-per-row mask after backward, Adam over everything (k=1)
grft-row      grft_vision, ``structure='row'``, k=1 (only the chosen rows are parameters)
grft-col      grft_vision, ``structure='column'``, k=1
grft-sparse   grft_vision, ``structure='sparse'``, k=1 (GPS's selection without a dense buffer)
lora          Hugging Face PEFT LoRA, r=8 on every ``qkv``, ``proj``, ``fc1``, ``fc2`` linear, head trained
head          linear probe: only the classifier trains, backward stops at the head
floor         every parameter frozen, the input requires grad, backward of the loss to the input
============  =======================================================================================

Figures per method: trainable parameters, FLOPs of forward + backward (``torch.utils.flop_counter``),
bytes saved for backward (``saved_tensors_hooks``), gradient bytes, optimizer-state bytes,
adapter/checkpoint file bytes, step time (median after warm-up, methods interleaved) with its ratios to
``floor`` and ``full`` from the same run, and on CUDA the peak of ``max_memory_allocated`` of one step.

Run as a script::

    python benchmarks/step_cost.py --model vit_base_patch16_224 --num-classes 47 --batch-size 8 \
        --img-size 224 --repeats 5 --warmup 2 --out step_cost.json

(on a CPU shared with other work add ``--threads 1 --timer cpu``: single-threaded process CPU time hardly
depends on the neighbours), or call :func:`measure` (rows), :func:`check_targets` and :func:`to_markdown` from Python.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file, save_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from grft_vision import GRFTConfig, GRFTLayer, apply_grft, is_grft_model, merge_grft, save_adapter
from grft_vision import trainable_parameters_report

__all__ = ["METHODS", "DESCRIPTIONS", "Setup", "SavedTensorBytes", "train_step", "instrumented_step", "profile_step",
           "time_interleaved", "add_ratios", "measure", "check_targets", "to_markdown", "run", "exit_status", "main"]

METHODS = ("full", "gps-dense", "grft-row", "grft-col", "grft-sparse", "lora", "head", "floor")
GRFT_STRUCTURES = {"grft-row": "row", "grft-col": "column", "grft-sparse": "sparse"}
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
DESCRIPTIONS = {
    "full": "full fine-tuning, Adam over every parameter",
    "gps-dense": "all parameters trainable, dense grads masked to top-k per row after backward, Adam over all",
    "grft-row": "grft_vision structure='row' (only the k chosen rows are parameters)",
    "grft-col": "grft_vision structure='column' (only the k chosen columns are parameters)",
    "grft-sparse": "grft_vision structure='sparse' (k entries per row as parameters, no dense buffer)",
    "lora": "PEFT LoRA r=8 on qkv/proj/fc1/fc2, head trained",
    "head": "linear probe: classifier only, no backprop into the backbone",
    "floor": "all frozen, backward of the loss to the input (no weight gradients)",
}
MB = 1e6
FP32_BYTES = 4
# bytes per trainable fp32 parameter with Adam: gradient + exp_avg + exp_avg_sq
ADAM_BYTES_PER_PARAM = 3 * FP32_BYTES


# --------------------------------------------------------------------------------------------- FLOPs
def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _flop_counter() -> FlopCounterMode:
    """A silent flop counter that also knows the CPU flash-attention kernels (torch counts them as 0)."""
    mapping = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flops),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward_flops)):
        if hasattr(torch.ops.aten, name):
            mapping[getattr(torch.ops.aten, name)] = formula
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _op_counts(counter: FlopCounterMode) -> dict[str, int]:
    return {str(op): int(count) for op, count in counter.get_flop_counts().get("Global", {}).items()}


def inference_flops(model: nn.Module, images: torch.Tensor) -> tuple[int, dict[str, int]]:
    """FLOPs (total and per operator) of one eval-mode forward pass without autograd."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), _flop_counter() as counter:
        model(images)
    model.train(was_training)
    return int(counter.get_total_flops()), _op_counts(counter)


# --------------------------------------------------------------------------------------------- bytes
def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
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
    out. Everything else counts: activations, masks, the input batch when an op keeps it.
    """

    def __init__(self, model: nn.Module) -> None:
        self._exclude = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
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


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> tuple[int, int]:
    """(all tensors in ``optimizer.state``, the scalar ``step`` tensors among them)."""
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


def _path_bytes(path: Path | list[Path]) -> int:
    if isinstance(path, list):
        return sum(_path_bytes(p) for p in path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# --------------------------------------------------------------------------------------------- methods
@dataclass
class Setup:
    """One method, ready to train: model, optimizer, what happens between backward and step, how it saves."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    trainable: int
    input_grad: bool = False
    after_backward: Callable[[], None] = lambda: None
    save: Callable[[Path], Path | list[Path]] | None = None
    extra_bytes: int = 0  # resident tensors the method needs besides model and optimizer (GPS masks)
    notes: list[str] = field(default_factory=list)
    compiled: nn.Module | None = None  # torch.compile(model), used by the timed steps when set

    @property
    def forward_model(self) -> nn.Module:
        """What a training step calls: the compiled model when the run compiles, else the model."""
        return self.compiled if self.compiled is not None else self.model


def _trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _adam(model: nn.Module, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(_trainable_params(model), lr=lr)


def _head_names(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or "head"
    return [classifier] if isinstance(classifier, str) else list(classifier)


def _is_head(name: str, heads: Sequence[str]) -> bool:
    return any(name == head or name.startswith(head + ".") for head in heads)


def random_scores(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A random score for the weight of every ``nn.Linear`` / ``nn.Conv2d`` except the head."""
    generator = torch.Generator().manual_seed(seed)
    heads = _head_names(model)
    return {f"{name}.weight": torch.rand(module.weight.shape, generator=generator).to(module.weight.device)
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and not _is_head(name, heads)}


def _save_full(model: nn.Module, path: Path) -> Path:
    path = path.with_suffix(".safetensors")
    save_model(model, str(path))
    return path


def _setup_full(base: nn.Module, lr: float, **_: Any) -> Setup:
    model = copy.deepcopy(base).requires_grad_(True)
    count = sum(p.numel() for p in model.parameters())
    return Setup("full", model, _adam(model, lr), count, save=lambda p: _save_full(model, p))


def _setup_gps_dense(base: nn.Module, lr: float, scores: dict, k: int, **_: Any) -> Setup:
    """GPS as in its public code: dense gradients everywhere, zeroed outside the mask after backward.

    The mask and the set of fully trained tensors are taken from a ``structure='sparse'`` GRFT wrap of the
    same scores, so gps-dense and grft-sparse update exactly the same entries.
    """
    reference = apply_grft(copy.deepcopy(base), scores, GRFTConfig(structure="sparse", k=k))
    index_of = {f"{name}.weight": layer.indices for name, layer in reference.named_modules()
                if isinstance(layer, GRFTLayer)}
    fully = set(trainable_parameters_report(reference).fully_trainable)
    del reference
    model = copy.deepcopy(base).requires_grad_(True)
    masks: dict[nn.Parameter, torch.Tensor] = {}
    frozen: list[nn.Parameter] = []
    trainable = 0
    for name, param in model.named_parameters():
        if name in index_of:
            rows = torch.zeros(param.shape[0], param[0].numel(), dtype=torch.bool, device=param.device)
            masks[param] = rows.scatter_(1, index_of[name], True).reshape(param.shape)
            trainable += int(masks[param].sum())
        elif name in fully:
            trainable += param.numel()
        else:
            frozen.append(param)

    def zero_outside_mask() -> None:
        with torch.no_grad():
            for param, mask in masks.items():
                if param.grad is not None:
                    param.grad.mul_(mask)
            for param in frozen:
                if param.grad is not None:
                    param.grad.zero_()

    mask_bytes = sum(mask.numel() * mask.element_size() for mask in masks.values())
    return Setup("gps-dense", model, _adam(model, lr), trainable, after_backward=zero_outside_mask,
                 save=lambda p: _save_full(model, p), extra_bytes=mask_bytes,
                 notes=[f"mask (bool) {mask_bytes / MB:.1f} MB resident, not counted in the file"])


def _setup_grft(base: nn.Module, lr: float, scores: dict, k: int, name: str, **_: Any) -> Setup:
    model = apply_grft(copy.deepcopy(base), scores, GRFTConfig(structure=GRFT_STRUCTURES[name], k=k))
    report = trainable_parameters_report(model)
    counted = sum(p.numel() for p in _trainable_params(model))
    notes = [] if counted == report.trainable else [
        f"trainable_parameters_report says {report.trainable}, requires_grad tensors hold {counted}"]
    return Setup(name, model, _adam(model, lr), report.trainable,
                 save=lambda p: save_adapter(model, p.with_suffix(".safetensors")), notes=notes)


def _setup_lora(base: nn.Module, lr: float, lora_rank: int, **_: Any) -> Setup:
    from peft import LoraConfig, get_peft_model

    heads = _head_names(base)
    targets = [name for name, module in base.named_modules()
               if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS
               and not _is_head(name, heads)]
    if not targets:
        raise ValueError(f"no nn.Linear named {LORA_TARGETS} in the model for LoRA")
    config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0, bias="none",
                        target_modules=targets, modules_to_save=heads)
    model = get_peft_model(copy.deepcopy(base), config)
    count = sum(p.numel() for p in _trainable_params(model))

    def save(path: Path) -> list[Path]:
        model.save_pretrained(str(path))
        # what loading needs: the weights and the config (the generated README.md model card is left out)
        return [path / "adapter_model.safetensors", path / "adapter_config.json"]

    return Setup("lora", model, _adam(model, lr), count, save=save,
                 notes=[f"LoRA on {len(targets)} linears; file = adapter_model.safetensors + adapter_config.json"])


def _setup_head(base: nn.Module, lr: float, **_: Any) -> Setup:
    model = copy.deepcopy(base).requires_grad_(False)
    heads = _head_names(model)
    params = {name: p for name, p in model.named_parameters() if _is_head(name, heads)}
    for param in params.values():
        param.requires_grad_(True)

    def save(path: Path) -> Path:
        path = path.with_suffix(".safetensors")
        save_file({name: p.detach().contiguous().cpu() for name, p in params.items()}, str(path))
        return path

    return Setup("head", model, _adam(model, lr), sum(p.numel() for p in params.values()), save=save)


def _setup_floor(base: nn.Module, **_: Any) -> Setup:
    model = copy.deepcopy(base).requires_grad_(False)
    return Setup("floor", model, None, 0, input_grad=True)


_SETUPS = {"full": _setup_full, "gps-dense": _setup_gps_dense, "grft-row": _setup_grft, "grft-col": _setup_grft,
           "grft-sparse": _setup_grft, "lora": _setup_lora, "head": _setup_head, "floor": _setup_floor}


# --------------------------------------------------------------------------------------------- one step
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_loss(setup: Setup, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    inputs = images.detach().requires_grad_(True) if setup.input_grad else images
    return F.cross_entropy(setup.forward_model(inputs), labels)


def _finish_step(setup: Setup) -> None:
    setup.after_backward()
    if setup.optimizer is not None:
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)


def train_step(setup: Setup, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """forward + cross-entropy + backward (+ GPS masking) + Adam step; wall seconds of each phase and in all."""
    device = images.device
    _sync(device)
    cpu_start = time.process_time()
    start = time.perf_counter()
    loss = _forward_loss(setup, images, labels)
    _sync(device)
    forward_end = time.perf_counter()
    loss.backward()
    _sync(device)
    backward_end = time.perf_counter()
    _finish_step(setup)
    _sync(device)
    end = time.perf_counter()
    return {"step": end - start, "forward": forward_end - start, "backward": backward_end - forward_end,
            "update": end - backward_end, "cpu": time.process_time() - cpu_start}


_PROFILE_CATEGORIES = (
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("conv", ("conv",)),
    ("index/gather/scatter", ("index", "gather", "scatter", "masked")),
)


def profile_step(setup: Setup, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Self time (seconds) of one training step by operator category, from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = images.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        train_step(setup, images, labels)
    seconds: dict[str, float] = {}
    for event in prof.key_averages():
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        category = next((cat for cat, keys in _PROFILE_CATEGORIES if any(key in event.key for key in keys)),
                        "other")
        seconds[category] = seconds.get(category, 0.0) + self_us / 1e6
    top = sorted(prof.key_averages(), key=lambda e: -(e.self_device_time_total if cuda else e.self_cpu_time_total))
    seconds["top_ops"] = {e.key: round((e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6, 4)
                          for e in top[:8]}
    return seconds


def _resident_bytes(setup: Setup) -> int:
    tensors = list(setup.model.parameters()) + list(setup.model.buffers())
    if setup.optimizer is not None:
        tensors += [v for state in setup.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return _unique_bytes(tensors) + setup.extra_bytes


def instrumented_step(setup: Setup, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The first training step of a method, with FLOPs, saved bytes, gradient and optimizer bytes."""
    device = images.device
    cuda = device.type == "cuda"
    if cuda:
        _sync(device)
        resident_before = _resident_bytes(setup)
        allocated_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with SavedTensorBytes(setup.model) as saved:
        with _flop_counter() as forward:
            loss = _forward_loss(setup, images, labels)
    with _flop_counter() as backward:
        loss.backward()
    del loss
    grads = [p.grad for p in setup.model.parameters() if p.grad is not None]
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    _finish_step(setup)
    state_bytes, step_bytes = _optimizer_state_bytes(setup.optimizer)
    peak = None
    if cuda:
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - allocated_before + resident_before
    return {
        "forward_flops": int(forward.get_total_flops()),
        "backward_flops": int(backward.get_total_flops()),
        "flops": int(forward.get_total_flops() + backward.get_total_flops()),
        "flops_by_op": {"forward": _op_counts(forward), "backward": _op_counts(backward)},
        "saved_bytes": saved.bytes,
        "grad_bytes": grad_bytes,
        "optimizer_state_bytes": state_bytes,
        "optimizer_step_scalar_bytes": step_bytes,
        "peak_memory_bytes": peak,
    }


# --------------------------------------------------------------------------------------------- measure
def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[step_cost {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def time_interleaved(setups: dict[str, Setup], images: torch.Tensor, labels: torch.Tensor, *, warmup: int,
                     repeats: int, timer: str = "wall", progress: bool = False) -> dict[str, dict[str, Any]]:
    """Time one training step of every method, the methods interleaved round by round.

    ``warmup`` untimed rounds, then ``repeats`` timed ones; in each round every method does one step, the
    starting method rotating so that drift of the machine spreads over all methods. Returns, per method
    (in ``setups`` order), the medians in seconds: ``step_time_s`` (in the ``timer``'s unit: wall-clock or
    process CPU seconds), ``wall_time_s``, ``cpu_time_s``, ``step_time_min_s``, the ``forward`` /
    ``backward`` / ``update`` phases (wall), ``cpu_per_wall``, and every timed step (``step_times_s``).
    """
    order = list(setups)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in order}
    for round_index in range(warmup + repeats):
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            phases = train_step(setups[name], images, labels)
            if round_index >= warmup:
                times[name].append(phases)
        _log(progress, f"timing round {round_index + 1}/{warmup + repeats}"
                       f"{' (warm-up)' if round_index < warmup else ''}")
    figures: dict[str, dict[str, Any]] = {}
    for name in order:
        steps = [t["cpu" if timer == "cpu" else "step"] for t in times[name]]
        row = figures[name] = {"timer": timer}
        row["wall_time_s"] = statistics.median(t["step"] for t in times[name]) if steps else None
        row["cpu_time_s"] = statistics.median(t["cpu"] for t in times[name]) if steps else None
        row["step_times_s"] = steps
        row["step_time_s"] = statistics.median(steps) if steps else None
        row["step_time_min_s"] = min(steps) if steps else None
        for phase in ("forward", "backward", "update"):
            values = [t[phase] for t in times[name]]
            row[f"{phase}_time_s"] = statistics.median(values) if values else None
        # process CPU seconds per wall second: about the thread count when the cores are not shared
        row["cpu_per_wall"] = statistics.median(t["cpu"] / t["step"] for t in times[name]) if times[name] else None
    return figures


RATIO_FIGURES = {"flops": "flops", "saved": "saved_bytes", "time": "step_time_s"}


def add_ratios(rows: dict[str, dict[str, Any]], references: Sequence[str] = ("floor", "full"),
               figures: Mapping[str, str] = RATIO_FIGURES) -> None:
    """Add ``<figure>_vs_<reference>`` ratios to every row, for each reference method present in ``rows``.

    ``figures`` maps the ratio's name to the row key it divides (default: FLOPs, saved bytes, step time).
    A step-time ratio also comes as ``time_vs_<reference>_paired``: the ratio taken round by round (both
    steps from the same round), then the median.
    """
    for ref_name in references:
        ref = rows.get(ref_name)
        if ref is None:
            continue
        for row in rows.values():
            for label, key in figures.items():
                row[f"{label}_vs_{ref_name}"] = _ratio(row.get(key), ref.get(key))
            if "time" in figures:
                paired = [a / b for a, b in zip(row["step_times_s"], ref["step_times_s"]) if b > 0]
                row[f"time_vs_{ref_name}_paired"] = statistics.median(paired) if paired else None


def measure(
    model_name: str = "vit_base_patch16_224",
    *,
    num_classes: int = 47,
    img_size: int = 224,
    batch_size: int = 8,
    methods: Sequence[str] = METHODS,
    repeats: int = 5,
    warmup: int = 2,
    k: int = 1,
    lora_rank: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    model_kwargs: dict[str, Any] | None = None,
    save_dir: str | os.PathLike | None = None,
    profile: bool = False,
    timer: str = "wall",
    threads: int | None = None,
    compile: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Measure every method on one model and one batch; one dict of figures per method, in ``methods`` order.

    Every method starts from a deep copy of the same randomly initialised model (``pretrained=False``:
    weights do not change the cost) and trains on the same random batch. Step times are the median of
    ``repeats`` steps after ``warmup`` steps, the methods interleaved round by round (the starting method
    rotates) so that drift of the machine spreads evenly. ``timer='wall'`` times wall-clock seconds (the
    default); ``timer='cpu'`` times the process's CPU seconds instead, which hardly depend on other work
    sharing the cores when ``threads=1`` (``threads``: ``torch.set_num_threads`` for the run, None leaves
    the default). Each step is also split into forward (+ loss),
    backward and update (GPS masking + Adam + zero_grad) phases. With ``profile=True`` one more step per
    method runs under ``torch.profiler`` and its self time is split by operator category. With
    ``compile=True`` every method's timed (and profiled) steps run its ``torch.compile``-d model (inductor; the
    warm-up rounds compile it, so keep ``warmup >= 2``), so the ratios are to the compiled floor; FLOPs, bytes
    and files are those of the eager model. Ratios to ``floor`` and ``full`` are filled in when those methods
    are part of the run.
    """
    unknown = [m for m in methods if m not in _SETUPS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if timer not in ("wall", "cpu"):
        raise ValueError(f"timer={timer!r} must be 'wall' or 'cpu'")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(model_name, num_classes=num_classes, img_size=img_size, batch_size=batch_size,
                        methods=methods, repeats=repeats, warmup=warmup, k=k, lora_rank=lora_rank, lr=lr,
                        seed=seed, device=device, model_kwargs=model_kwargs, save_dir=save_dir,
                        profile=profile, timer=timer, compile=compile, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)


def _measure(model_name: str, *, num_classes: int, img_size: int, batch_size: int, methods: Sequence[str],
             repeats: int, warmup: int, k: int, lora_rank: int, lr: float, seed: int,
             device: str | torch.device, model_kwargs: dict[str, Any] | None,
             save_dir: str | os.PathLike | None, profile: bool, timer: str, compile: bool,
             progress: bool) -> list[dict[str, Any]]:
    device = torch.device(device)
    torch.manual_seed(seed)
    kwargs = dict(model_kwargs or {})
    try:
        base = timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=img_size, **kwargs)
    except TypeError:  # convolutional models take any input size and no img_size argument
        base = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    base = base.to(device).train()
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    scores = random_scores(base, seed)
    total_params = sum(p.numel() for p in base.parameters())
    plain_flops, plain_by_op = inference_flops(base, images)

    setups: dict[str, Setup] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in methods:
        _log(progress, f"set up {name}")
        setup = _SETUPS[name](base, lr=lr, scores=scores, k=k, name=name, lora_rank=lora_rank)
        setups[name] = setup
        _log(progress, f"instrumented step {name}")
        figures = instrumented_step(setup, images, labels)
        rows[name] = {
            "method": name,
            "description": DESCRIPTIONS[name],
            "trainable_params": setup.trainable,
            "requires_grad_params": sum(p.numel() for p in _trainable_params(setup.model)),
            "total_params": total_params,
            **figures,
            "extra_resident_bytes": setup.extra_bytes,
            "notes": list(setup.notes),
        }

    if compile:
        torch._dynamo.reset()
        for setup in setups.values():
            setup.compiled = torch.compile(setup.model)
    timing = time_interleaved(setups, images, labels, warmup=warmup, repeats=repeats, timer=timer, progress=progress)
    for name, figures in timing.items():
        rows[name].update(figures)
    if profile:
        for name in methods:
            _log(progress, f"profile {name}")
            rows[name]["profile_s"] = profile_step(setups[name], images, labels)

    # files
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(save_dir) if save_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in methods:
            setup = setups[name]
            if setup.save is None:
                rows[name]["file_bytes"] = None
                continue
            path = setup.save(folder / name)
            rows[name]["file_bytes"] = _path_bytes(path)

    # merged inference: the same FLOPs as the plain model
    for name in methods:
        if name in GRFT_STRUCTURES:
            merged = merge_grft(setups[name].model)
            flops, by_op = inference_flops(merged, images)
            rows[name]["merged_inference_flops"] = flops
            rows[name]["plain_inference_flops"] = plain_flops
            rows[name]["merged_flops_by_op_equal"] = by_op == plain_by_op
            rows[name]["merged_is_plain"] = (not is_grft_model(merged)
                                             and list(merged.state_dict()) == list(base.state_dict()))
        setups[name].optimizer = None
    del setups

    add_ratios(rows)
    return [rows[name] for name in methods]


# --------------------------------------------------------------------------------------------- targets
def _check(target: str, value: Any, limit: str, passed: bool | None) -> dict[str, Any]:
    return {"target": target, "value": value, "limit": limit, "passed": passed}


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets of the efficiency claim, each with the measured value and pass/fail.

    A target whose methods were not measured is left out.
    """
    by = {row["method"]: row for row in rows}
    checks: list[dict[str, Any]] = []

    def have(*names: str) -> bool:
        return all(name in by for name in names)

    for name, limit in (("grft-col", 1.01), ("grft-row", 1.02), ("grft-sparse", 1.03)):
        if have(name, "floor"):
            ratio = by[name]["flops_vs_floor"]
            checks.append(_check(f"FLOPs {name} / floor", ratio, f"<= {limit}", ratio <= limit))
    if have("full", "floor"):
        ratio = by["full"]["flops_vs_floor"]
        checks.append(_check("FLOPs full / floor", ratio, "~1.5 (1.45..1.55)", 1.45 <= ratio <= 1.55))
    # GRFT holds gradient + moments for its trainable entries only; full and gps-dense for every parameter
    adam_counts = {"grft-row": ("trainable_params", "trainable"), "grft-col": ("trainable_params", "trainable"),
                   "grft-sparse": ("trainable_params", "trainable"), "full": ("total_params", "all params"),
                   "gps-dense": ("total_params", "all params")}
    for name, (count, label) in adam_counts.items():
        if have(name):
            row = by[name]
            value = row["grad_bytes"] + row["optimizer_state_bytes"] - row["optimizer_step_scalar_bytes"]
            analytic = ADAM_BYTES_PER_PARAM * row[count]
            checks.append(_check(f"grad + Adam moments {name} = 12 B x {label}", value,
                                 f"== {analytic}", value == analytic))
    if have("grft-col", "floor"):
        ratio = by["grft-col"]["saved_vs_floor"]
        checks.append(_check("saved-for-backward grft-col / floor", ratio, "<= 1.02", ratio <= 1.02))
    if have("grft-sparse", "grft-row"):  # GPS's entries without keeping a [tokens, out, k] gather
        value, limit = by["grft-sparse"]["saved_bytes"], by["grft-row"]["saved_bytes"]
        checks.append(_check("saved-for-backward grft-sparse <= grft-row (bytes)", value, f"<= {limit}",
                             value <= limit))
    # step time over the floor (the floor itself is 0.67-0.77 x full depending on the CPU: no target against full)
    for name, limit in (("grft-row", 1.05), ("grft-col", 1.05), ("grft-sparse", 1.15)):
        row = by.get(name)
        if row is None or row["step_time_s"] is None:
            continue
        if have("floor"):
            ratio = row["time_vs_floor"]
            checks.append(_check(f"step time {name} / floor", ratio, f"<= {limit:.2f}", ratio <= limit))
        if have("lora") and name != "grft-sparse":
            ratio = row["step_time_s"] / by["lora"]["step_time_s"]
            checks.append(_check(f"step time {name} / lora", ratio, "<= 1.00", ratio <= 1.0))
    if have("grft-row") and by["grft-row"]["file_bytes"] is not None:
        size = by["grft-row"]["file_bytes"]
        checks.append(_check("adapter file grft-row (bytes)", size, "< 1 MB", size < MB))
    for name in ("grft-row", "grft-col", "grft-sparse"):
        if have(name) and "merged_inference_flops" in by[name]:
            row = by[name]
            equal = (row["merged_inference_flops"] == row["plain_inference_flops"] and row["merged_flops_by_op_equal"]
                     and row["merged_is_plain"])
            checks.append(_check(f"inference FLOPs after merge_grft ({name}) == plain model",
                                 row["merged_inference_flops"], f"== {row['plain_inference_flops']}", equal))
    return checks


# --------------------------------------------------------------------------------------------- output
def _fmt(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    if value is None:
        return "–"
    return f"{value / scale:,.{digits}f}"


def _fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def step_detail_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The step-detail table (wall / CPU time, phases, profile split) as markdown lines; none without timings."""
    if all(row.get("forward_time_s") is None for row in rows):
        return []
    profiled = any("profile_s" in row for row in rows)
    categories = [cat for cat, _ in _PROFILE_CATEGORIES] + ["other"]
    header = ["method", "wall step s", "CPU step s", "CPU s / wall s", "min step s", "forward s", "backward s",
              "update s"]
    if profiled:
        header += [f"prof. {cat} s" for cat in categories]
    lines = ["", "Step detail (medians; min step in the timer's unit; phases in wall-clock seconds, "
             "update = GPS masking + Adam step + zero_grad)"
             + (" and one profiled step's self time by operator category" if profiled else ""), "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [row["method"], _fmt(row.get("wall_time_s"), 3), _fmt(row.get("cpu_time_s"), 3),
                 _fmt(row.get("cpu_per_wall"), 2), _fmt(row.get("step_time_min_s"), 3),
                 _fmt(row.get("forward_time_s"), 3), _fmt(row.get("backward_time_s"), 3),
                 _fmt(row.get("update_time_s"), 3)]
        if profiled:
            profile = row.get("profile_s") or {}
            cells += [_fmt(profile.get(cat), 3) for cat in categories]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def targets_markdown(checks: list[dict[str, Any]]) -> list[str]:
    """The target checks (target, measured value, limit, pass/fail) as markdown lines."""
    lines = ["", "| target | measured | limit | result |", "|---|---:|---|---|"]
    for check in checks:
        value = check["value"]
        shown = f"{value:.4f}" if isinstance(value, float) else f"{value:,}"
        result = {True: "pass", False: "**FAIL**", None: "–"}[check["passed"]]
        lines.append(f"| {check['target']} | {shown} | {check['limit']} | {result} |")
    return lines


def to_markdown(rows: list[dict[str, Any]], checks: list[dict[str, Any]] | None = None,
                meta: dict[str, Any] | None = None) -> str:
    """The figures as a markdown table, then the target checks."""
    cuda = any(row.get("peak_memory_bytes") is not None for row in rows)
    header = ["method", "trainable", "GFLOPs fwd+bwd", "× floor", "saved MB", "× floor", "grad MB",
              "opt state MB", "file MB", "step s", "× floor", "× full"]
    if cuda:
        header.append("peak MB")
    lines = []
    if meta:
        lines.append(f"model `{meta['model']}` ({meta['total_params']:,} params), batch {meta['batch_size']} at "
                     f"{meta['img_size']}px, {meta['num_classes']} classes, device {meta['device_name']}, "
                     f"{meta['torch_threads']} torch thread(s), step time = median "
                     f"{'process CPU' if meta.get('timer') == 'cpu' else 'wall-clock'} seconds"
                     f"{' under torch.compile (inductor)' if meta.get('compiled') else ''} of "
                     f"{meta['repeats']} steps after {meta['warmup']} warm-up rounds, torch {meta['torch']}, "
                     f"{meta['date']}")
        if meta.get("loadavg_before") is not None:
            lines.append(f"(1-minute load average {meta['loadavg_before'][0]:.2f} before, "
                         f"{meta['loadavg_after'][0]:.2f} after the run)")
        lines.append("")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in rows:
        cells = [row["method"], f"{row['trainable_params']:,}", _fmt(row["flops"], 1, 1e9),
                 _fmt_ratio(row.get("flops_vs_floor")), _fmt(row["saved_bytes"], 1, MB),
                 _fmt_ratio(row.get("saved_vs_floor")), _fmt(row["grad_bytes"], 2, MB),
                 _fmt(row["optimizer_state_bytes"], 2, MB), _fmt(row["file_bytes"], 2, MB),
                 _fmt(row["step_time_s"], 3), _fmt_ratio(row.get("time_vs_floor")),
                 _fmt_ratio(row.get("time_vs_full"))]
        if cuda:
            cells.append(_fmt(row.get("peak_memory_bytes"), 0, MB))
        lines.append("| " + " | ".join(cells) + " |")
    lines += step_detail_markdown(rows)
    if checks:
        lines += targets_markdown(checks)
    return "\n".join(lines) + "\n"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure, check and write the outputs named in ``args``; return the whole report."""
    device = torch.device(args.device)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = measure(args.model, num_classes=args.num_classes, img_size=args.img_size, batch_size=args.batch_size,
                   methods=args.methods, repeats=args.repeats, warmup=args.warmup, k=args.k,
                   lora_rank=args.lora_rank, seed=args.seed, device=device, model_kwargs=args.model_kwargs,
                   save_dir=args.save_dir, profile=args.profile, timer=args.timer, threads=args.threads,
                   compile=args.compile, progress=not args.quiet)
    checks = check_targets(rows)
    import peft  # noqa: F401 - version only

    meta = {
        "model": args.model, "model_kwargs": args.model_kwargs, "num_classes": args.num_classes,
        "img_size": args.img_size,
        "batch_size": args.batch_size, "repeats": args.repeats, "warmup": args.warmup, "k": args.k,
        "total_params": rows[0]["total_params"], "device": str(device), "device_name": _device_name(device),
        "torch": torch.__version__, "timm": timm.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch_threads": args.threads or torch.get_num_threads(), "timer": args.timer,
        "compiled": args.compile,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]) if sys.argv else "",
        "flop_counter": "torch.utils.flop_counter (matmul/conv/attention only; optimizer and elementwise ops "
                        "are not counted)",
    }
    report = {"meta": meta, "methods": rows, "targets": checks}
    markdown = to_markdown(rows, checks, meta)
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown, encoding="utf-8")
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm architecture (pretrained=False)")
    parser.add_argument("--model-kwargs", type=json.loads, default=None,
                        help='extra timm.create_model arguments as JSON, e.g. \'{"depth": 2}\'')
    parser.add_argument("--num-classes", type=int, default=47)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per method (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    parser.add_argument("--k", type=int, default=1, help="rows / columns / entries per row")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON report path")
    parser.add_argument("--markdown", default=None, help="also write the markdown table to this path")
    parser.add_argument("--save-dir", default=None, help="keep the adapter/checkpoint files here")
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                        help="time steps in wall-clock seconds, or in process CPU seconds (robust to other "
                             "work on the machine with --threads 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: leave torch's default)")
    parser.add_argument("--compile", action="store_true",
                        help="time every method under torch.compile (inductor); ratios to the compiled floor")
    parser.add_argument("--profile", action="store_true",
                        help="one extra profiled step per method: time by operator category (in the JSON)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 64 if torch.device(args.device).type == "cuda" else 8
    return args


def exit_status(report: dict[str, Any], strict: bool) -> int:
    """Print the missed targets of ``report`` to stderr; 1 when some were missed and ``strict``, else 0."""
    missed = [check["target"] for check in report["targets"] if check["passed"] is False]
    if missed:
        print(f"{len(missed)} target(s) missed: {'; '.join(missed)}", file=sys.stderr)
    return 1 if (missed and strict) else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(run(args), args.strict)


if __name__ == "__main__":
    sys.exit(main())
