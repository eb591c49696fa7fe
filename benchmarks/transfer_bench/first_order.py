"""The first-order share of a row / column choice: how much of the task loss's first-order decrease the chosen
rows or columns capture, relative to the best ones of each layer (:func:`measure`); its summary over runs
(:func:`summarise_first_order`) and table (:func:`first_order_markdown`).

A small gradient step ``-eta * g`` restricted to a set S of entries lowers the loss by ``eta * sum_S g**2`` to
first order, so the squared task-loss gradient a choice holds is what it can decrease the loss by, and the
best choice of the same size (the *oracle*) is, per layer, the rows (columns) with the largest sums of
``g**2``. Here ``g`` is the gradient of the mean cross-entropy over the whole training set, at the
pre-trained weights with the head freshly initialised exactly as the fine-tuning job initialises it; the
L2-to-pretrained term has zero gradient there. The share aggregates layers as a ratio of sums::

    share = sum over layers of (g**2 held by the chosen units) / sum over layers of (g**2 of the oracle's),

the oracle choosing in each layer as many units as the method chose there. Adam's first steps move every
entry by about ``eta`` (sign descent), whose first-order decrease is ``eta * sum_S |g|``: the same ratio
with ``|g|`` (its own oracle) is recorded too.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from grft_vision.selection.record import candidate_scores
from grft_vision.tuner.anatomy import head_module_names
from grft_vision.tuner.structures import STRUCTURES

from .model import to_tensor

__all__ = ["FIGURES", "task_gradients", "measure", "summarise_first_order", "first_order_markdown"]

# the figures of a measurement that its summary and table report (:func:`measure` defines them)
FIGURES = ("share", "uniform_share", "share_abs", "rows_part")


def task_gradients(model: nn.Module, images: np.ndarray, labels: np.ndarray,
                   batch_size: int = 250) -> dict[str, torch.Tensor]:
    """The gradient of the mean cross-entropy over all of ``images`` (one full-batch gradient, accumulated over
    chunks of ``batch_size``) for every parameter of ``model``, by name; ``model``'s ``.grad`` are cleared."""
    device = next(model.parameters()).device
    x, y = to_tensor(images).to(device), torch.from_numpy(labels).long().to(device)
    model.train()  # as in fine-tuning (the ViT has no dropout: the same function as in eval mode)
    model.zero_grad(set_to_none=True)
    for start in range(0, len(y), batch_size):
        loss = F.cross_entropy(model(x[start:start + batch_size]), y[start:start + batch_size], reduction="sum")
        (loss / len(y)).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _chosen_and_oracle(values: torch.Tensor, indices: Sequence[int]) -> tuple[float, float, float]:
    """(value held by ``indices``, by the same number of best units, expected for as many uniform random units)."""
    count = len(indices)
    chosen = float(values[torch.as_tensor(indices, dtype=torch.long)].sum()) if count else 0.0
    oracle = float(values.topk(count).values.sum()) if count else 0.0
    return chosen, oracle, float(values.mean()) * count


def measure(selected: nn.Module, fresh: nn.Module, images: np.ndarray, labels: np.ndarray,
            train_bias: bool) -> dict[str, Any] | None:
    """The first-order share of the row / column choice of ``selected`` (a model wrapped by ``apply_grft``),
    from the task-loss gradients of ``fresh`` (the same pre-trained model and head, unwrapped) on the training
    set ``images`` / ``labels``; None when ``selected`` has no static row / column choice (sparse entries, an
    incremental schedule's empty start).

    Returns ``share`` and ``share_abs`` (with ``g**2`` and ``|g|``), ``uniform_share`` (what a uniformly random
    choice of the same sizes holds in expectation, relative to the same oracle), the sums behind them
    (``chosen_sq``, ``oracle_sq``, ``uniform_sq``, ``chosen_abs``, ``oracle_abs``), the ``g**2`` of the
    targeted layers' biases and of the head (``bias_sq``, ``head_sq``), ``train_bias``, ``rows_part`` (the
    chosen units' part of the whole trainable set's ``g**2``: chosen / (chosen + head + biases when trained))
    and ``per_layer`` (each layer's chosen / oracle ``g**2``, 4 significant digits).
    """
    state = getattr(selected, "grft_state", None)
    layers = [] if state is None or state.selection is None else state.selection.layers
    layers = [layer for layer in layers if not STRUCTURES.get(layer.structure).per_row]
    if not any(layer.indices for layer in layers):
        return None
    grads = task_gradients(fresh, images, labels)
    sums = dict.fromkeys(("chosen_sq", "oracle_sq", "uniform_sq", "chosen_abs", "oracle_abs", "bias_sq"), 0.0)
    per_layer = {}
    for layer in layers:
        grad, groups = grads[f"{layer.name}.weight"].double(), getattr(fresh.get_submodule(layer.name), "groups", 1)
        chosen, oracle, uniform = _chosen_and_oracle(candidate_scores(grad.square(), layer.structure, groups),
                                                     layer.indices)
        chosen_abs, oracle_abs, _ = _chosen_and_oracle(candidate_scores(grad.abs(), layer.structure, groups),
                                                       layer.indices)
        for key, value in zip(("chosen_sq", "oracle_sq", "uniform_sq", "chosen_abs", "oracle_abs"),
                              (chosen, oracle, uniform, chosen_abs, oracle_abs)):
            sums[key] += value
        bias = grads.get(f"{layer.name}.bias")
        sums["bias_sq"] += 0.0 if bias is None else float(bias.double().square().sum())
        per_layer[layer.name] = float(f"{chosen / oracle:.4g}") if oracle > 0 else None
    head = {f"{module}.{name}" for module in head_module_names(fresh)
            for name, _ in fresh.get_submodule(module).named_parameters()}
    head_sq = sum(float(grads[name].double().square().sum()) for name in head if name in grads)
    trainable = sums["chosen_sq"] + head_sq + (sums["bias_sq"] if train_bias else 0.0)
    return {"share": sums["chosen_sq"] / sums["oracle_sq"], "share_abs": sums["chosen_abs"] / sums["oracle_abs"],
            "uniform_share": sums["uniform_sq"] / sums["oracle_sq"], **sums, "head_sq": head_sq,
            "train_bias": train_bias, "rows_part": sums["chosen_sq"] / trainable, "per_layer": per_layer}


def _spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, min and max."""
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def summarise_first_order(runs: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Per method (in the order of ``methods``, those with a measurement): mean, min and max over its runs
    (targets x seeds) of every figure of :data:`FIGURES`, and the number of runs."""
    summary = {}
    for method in methods:
        records = [r["first_order"] for r in runs if r["method"] == method and r.get("first_order")]
        if records:
            summary[method] = {"runs": len(records), **{key: _spread([r[key] for r in records]) for key in FIGURES}}
    return summary


def _cell(spread: dict[str, float], percent: bool = False) -> str:
    if percent:
        return f"{100 * spread['mean']:.2f} % ({100 * spread['min']:.2f}-{100 * spread['max']:.2f})"
    return f"{spread['mean']:.3f} ({spread['min']:.3f}-{spread['max']:.3f})"


def first_order_markdown(summary: dict[str, Any]) -> str:
    """The first-order table: one row per method, mean (min-max) over its runs."""
    lines = ["| method | runs | first-order share, g² (chosen / oracle) | a uniform random choice, g² (expected) | "
             "same share with abs(g) (Adam's first steps) | chosen units' part of the trainable set's g² |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, entry in summary.items():
        cells = [_cell(entry[key], percent=key == "rows_part") for key in FIGURES]
        lines.append(f"| {method} | {entry['runs']} | " + " | ".join(cells) + " |")
    lines += ["", "Mean (min-max) over the targets x seeds. g: the gradient of the mean cross-entropy over the whole "
                  "training set at the pre-trained weights, head initialised as in fine-tuning; share = Σ over "
                  "layers of the chosen rows' (columns') Σg² / Σ over layers of the top rows' (as many per layer "
                  "as chosen); last column: chosen rows' Σg² / (that + head's + the trained biases')."]
    return "\n".join(lines) + "\n"
