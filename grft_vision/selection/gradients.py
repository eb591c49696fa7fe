"""Where parameters are scored: the summed SupCon gradient of every targeted weight (GRFT Alg. 1, steps 1-3).

``H = sum over the batches of the chosen subset of grad(mean SupCon loss of the batch)`` — one streaming
pass, gradients accumulated in fp32, only the targeted weights requiring grad (so only they get a
buffer). The returned score of every weight is ``H ** 2`` elementwise, computed in place in that buffer:
its row sums are the paper's ``S_i`` (Eq. 4), its column sums the column scores, and its per-row top-k
is GPS's top-k of ``|H|``. The model comes back exactly as it was (mode, ``requires_grad``, gradients,
buffers such as BatchNorm running statistics, and the global RNG state).
"""
from __future__ import annotations

import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..anatomy import find_target_layers
from ..config import GRFTConfig, resolve_config
from .features import BatchFeatures, VisionFeatures
from .losses import SupConSelectionLoss
from .subsets import mean_subset_loss, split_subsets, subset_loader
from .topk import SelectionError

__all__ = ["SelectionResult", "compute_scores"]


@dataclass
class SelectionResult:
    """Scores and how they were obtained.

    Attributes:
        scores: ``{weight name: H**2}``, each of the weight's shape, fp32.
        subset_losses: mean selection loss of every subset (no gradient), in subset order.
        chosen_subset: index of the lowest-loss subset (the one the gradient was computed on).
        subset_size: number of training examples in that subset.
        num_batches: batches in the gradient pass.
        seconds: wall time of the whole selection.
    """

    scores: dict[str, torch.Tensor]
    subset_losses: list[float]
    chosen_subset: int
    subset_size: int
    num_batches: int
    seconds: float


@contextmanager
def _selection_state(model: nn.Module, weights: list[nn.Parameter], mode: str, seed: int,
                     device: torch.device) -> Iterator[None]:
    """Only ``weights`` require grad; mode set; everything restored afterwards, RNGs forked and seeded."""
    flags = [(param, param.requires_grad, param.grad) for param in model.parameters()]
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    was_training = model.training
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            model.train(mode == "train")
            model.requires_grad_(False)
            for weight in weights:
                weight.requires_grad_(True)
                weight.grad = None
            yield
        finally:
            model.train(was_training)
            for param, requires_grad, grad in flags:
                param.requires_grad_(requires_grad)
                param.grad = grad
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    buffer.copy_(buffers[name])
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class _BatchLoss:
    """``(model, batch, index) -> loss``: features under autocast, SupCon in fp32, finite-checked."""

    def __init__(self, features: BatchFeatures, loss: SupConSelectionLoss, device: torch.device, amp: bool):
        self.features, self.loss, self.device = features, loss, device
        self.amp = amp and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16

    def __call__(self, model: nn.Module, batch: Any, index: int) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            features, labels = self.features(model, batch, self.device)
        value = self.loss(features, labels, index)
        if not torch.isfinite(value):
            raise SelectionError(f"the selection loss is not finite at batch {index} ({float(value.detach())}); "
                                 "check the inputs and the model's features for NaN/inf.")
        return value


def _accumulate(model: nn.Module, batches: Iterable[Any], batch_loss: _BatchLoss, weights: dict[str, nn.Parameter],
                progress: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Sum of per-batch mean-loss gradients of ``weights``, fp32, one buffer per weight."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for index, batch in enumerate(tqdm(batches, desc="selection: gradients", leave=False, disable=not progress)):
        batch_loss(model, batch, index).backward()
        count += 1
        for name, weight in weights.items():
            if weight.grad is None:
                continue
            if weight.grad.dtype == torch.float32:  # autograd already sums into the fp32 .grad
                sums[name] = weight.grad
            else:  # half-precision weights: keep an fp32 sum, release the half gradient
                sums[name] = sums[name] + weight.grad.float() if name in sums else weight.grad.float()
                weight.grad = None
    if count == 0:
        raise SelectionError("the selection data loader yielded no batch.")
    for name, weight in weights.items():
        sums.setdefault(name, torch.zeros(weight.shape, dtype=torch.float32, device=weight.device))
    return sums, count


def compute_scores(
    model: nn.Module,
    dataloader: DataLoader | Iterable[Any],
    config: GRFTConfig | Mapping[str, Any] | None = None,
    *,
    features: BatchFeatures | None = None,
    device: torch.device | str | None = None,
    amp: bool = True,
    progress: bool = True,
) -> SelectionResult:
    """Score every targeted weight of ``model`` by its squared SupCon gradient on the lowest-loss subset.

    Args:
        model: the model before :func:`~grft_vision.apply_grft` (its targeted layers unwrapped).
        dataloader: a ``DataLoader`` yielding ``(images, labels)`` (images ``[B, C, H, W]`` or, with two views,
            ``[B, 2, C, H, W]``); any iterable of batches when ``config.num_subsets == 1``.
        config: GRFT config (targets, ``temperature``, ``selection_views``, ``num_subsets``,
            ``selection_mode``, ``selection_batch_size``, ``selection_seed``).
        features: maps a batch to ``(features, labels)``; default :class:`VisionFeatures` (timm pre-logits).
        device: where to run; default the device of the model's first parameter.
        amp: autocast on CUDA (bf16 where supported, else fp16); gradients still accumulate in fp32.
        progress: show tqdm progress bars.

    Raises:
        SelectionError: missing labels, a batch where SupCon is undefined, a model without pre-logits,
            a non-finite loss, or an invalid subset count.
    """
    start = time.perf_counter()
    config = resolve_config(config)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    weights = {name: layer.weight for name, layer in find_target_layers(model, config).items()}
    batch_loss = _BatchLoss(features or VisionFeatures(config.selection_views),
                            SupConSelectionLoss(config.temperature), device, amp)
    seed = config.selection_seed
    if config.num_subsets > 1 and not isinstance(dataloader, DataLoader):
        raise SelectionError("num_subsets > 1 needs a torch DataLoader (its dataset is split into subsets).")
    with _selection_state(model, list(weights.values()), config.selection_mode, seed, device):
        if isinstance(dataloader, DataLoader):
            subsets = split_subsets(len(dataloader.dataset), config.num_subsets, seed)
            loaders = [subset_loader(dataloader, subset, seed + i, config.selection_batch_size)
                       for i, subset in enumerate(subsets)]
        else:
            subsets, loaders = [torch.arange(0)], [dataloader]
        losses = [mean_subset_loss(model, loader, batch_loss, f"selection: subset {i + 1}/{len(loaders)} loss",
                                   progress) for i, loader in enumerate(loaders)] if len(loaders) > 1 else []
        chosen = int(np.argmin(losses)) if losses else 0
        sums, count = _accumulate(model, loaders[chosen], batch_loss, weights, progress)
    scores = {f"{name}.weight": grad.pow_(2) for name, grad in sums.items()}
    return SelectionResult(scores, losses, chosen, len(subsets[chosen]), count, time.perf_counter() - start)
