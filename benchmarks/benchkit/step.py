"""A method of a step-cost table (:class:`StepCostMethod`), one method ready to train (:class:`Setup`) and
one training step of it: plain (:func:`train_step`), instrumented (:func:`instrumented_step`: FLOPs and
bytes) and profiled (:func:`profile_step`).

A training step = forward + cross-entropy + backward (+ ``Setup.after_backward``, e.g. GPS's masking) +
``optimizer.step()`` + ``optimizer.zero_grad(set_to_none=True)``. ``inputs`` is whatever the setup's model
takes (images ``[N, 3, H, W]``, token ids ``[N, T]``); ``labels`` are the class indices
``F.cross_entropy`` takes with the model's output (``-100`` is ignored).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .flops import flop_counter, op_counts
from .memory import SavedTensorBytes, optimizer_state_bytes, unique_bytes
from .registry import RegisteredMethod

__all__ = ["StepCostMethod", "Setup", "PROFILE_CATEGORIES", "train_step", "instrumented_step", "profile_step"]


@dataclass(frozen=True)
class StepCostMethod(RegisteredMethod):
    """A method of a step-cost table: ``build(model, context) -> Setup``, ``model`` a fresh copy of the run's
    base model (train mode, every parameter as created), ``context`` the script's ``SetupContext``."""

    description: str  # the row's ``description`` in the JSON
    structure: str | None = None  # GRFT's structure ('row', 'column', 'sparse'); None for the other methods
    imports: tuple[str, ...] = ()  # modules ``build`` imports (a process measuring its memory imports them first)


@dataclass
class Setup:
    """One method, ready to train: model, optimizer, what happens between backward and step, how it saves."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    trainable: int  # parameters that change (GPS: the mask's entries, not every requires_grad parameter)
    input_grad: bool = False  # the input requires grad (the floor: backward runs down to it)
    after_backward: Callable[[], None] = lambda: None
    save: Callable[[Path], Path | list[Path]] | None = None  # writes the method's file(s), returns their paths
    extra_bytes: int = 0  # resident tensors the method needs besides model and optimizer (GPS masks)
    notes: list[str] = field(default_factory=list)
    compiled: nn.Module | None = None  # torch.compile(model), used by the timed steps when set
    details: dict[str, Any] = field(default_factory=dict)  # method-specific figures copied into the method's row

    @property
    def forward_model(self) -> nn.Module:
        """What a training step calls: the compiled model when the run compiles, else the model."""
        return self.compiled if self.compiled is not None else self.model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_loss(setup: Setup, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    inputs = inputs.detach().requires_grad_(True) if setup.input_grad else inputs
    return F.cross_entropy(setup.forward_model(inputs), labels)


def _finish_step(setup: Setup) -> None:
    setup.after_backward()
    if setup.optimizer is not None:
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)


def train_step(setup: Setup, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """One training step; wall seconds of each phase (``forward`` + loss, ``backward``, ``update``) and in all
    (``step``), and the process CPU seconds of the step (``cpu``)."""
    device = inputs.device
    _sync(device)
    cpu_start = time.process_time()
    start = time.perf_counter()
    loss = _forward_loss(setup, inputs, labels)
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


PROFILE_CATEGORIES = (
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("conv", ("conv",)),
    ("index/gather/scatter", ("index", "gather", "scatter", "masked")),
)


def profile_step(setup: Setup, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Self time (seconds) of one training step by operator category (:data:`PROFILE_CATEGORIES` and
    ``other``), from ``torch.profiler``; ``top_ops``: the 8 operators with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = inputs.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        train_step(setup, inputs, labels)
    seconds: dict[str, Any] = {}
    for event in prof.key_averages():
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        category = next((cat for cat, keys in PROFILE_CATEGORIES if any(key in event.key for key in keys)),
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
    return unique_bytes(tensors) + setup.extra_bytes


def instrumented_step(setup: Setup, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The first training step of a method, with FLOPs, saved bytes, gradient and optimizer bytes.

    ``peak_memory_bytes`` (CUDA only, else None): ``torch.cuda.max_memory_allocated`` during the step, minus
    what was allocated before it, plus the method's own resident tensors (the peak it would reach alone).
    """
    device = inputs.device
    cuda = device.type == "cuda"
    if cuda:
        _sync(device)
        resident_before = _resident_bytes(setup)
        allocated_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with SavedTensorBytes(setup.model) as saved:
        with flop_counter() as forward:
            loss = _forward_loss(setup, inputs, labels)
    with flop_counter() as backward:
        loss.backward()
    del loss
    grads = [p.grad for p in setup.model.parameters() if p.grad is not None]
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    _finish_step(setup)
    state_bytes, step_bytes = optimizer_state_bytes(setup.optimizer)
    peak = None
    if cuda:
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - allocated_before + resident_before
    return {
        "forward_flops": int(forward.get_total_flops()),
        "backward_flops": int(backward.get_total_flops()),
        "flops": int(forward.get_total_flops() + backward.get_total_flops()),
        "flops_by_op": {"forward": op_counts(forward), "backward": op_counts(backward)},
        "saved_bytes": saved.bytes,
        "grad_bytes": grad_bytes,
        "optimizer_state_bytes": state_bytes,
        "optimizer_step_scalar_bytes": step_bytes,
        "peak_memory_bytes": peak,
    }
