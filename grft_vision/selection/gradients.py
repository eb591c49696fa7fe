"""Where parameters are scored: gradients of the selection loss on the lowest-loss subset (GRFT Alg. 1,
steps 1-3), turned into a per-parameter score.

``H = sum over the batches of the chosen subset of grad(mean selection loss of the batch)`` — one
streaming pass, gradients accumulated in fp32, only the targeted weights requiring grad (so only they get
a buffer). GRFT's score (the default, ``score='grft'``) is ``H ** 2`` elementwise, computed in place in that
buffer: its row sums are the paper's ``S_i`` (Eq. 4), its column sums the column scores, and its per-row
top-k is GPS's top-k of ``|H|``. Which score is computed is the registered :class:`~.scores.Score` of
``config.score``; it asks a :class:`ScoreRun` for what it needs (the summed gradient of this pass, per-sample
squared gradients, a Hessian-vector product, or nothing but the model), each computed once, on demand. The
model comes back exactly as it was (mode, ``requires_grad``, gradients, buffers such as BatchNorm running
statistics, and the global RNG state).
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
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import GRFTConfig, SelectionConfig, resolve_config
from ..errors import SelectionError
from ..tuner.layer import grft_layers
from ..tuner.quantized import is_quantized, quantized_format
from ..tuner.targets import find_target_layers
from .features import BatchFeatures, VisionFeatures
from .losses import CrossEntropySelectionLoss, SupConSelectionLoss, selection_loss
from .probes import weight_probes
from .scores import SCORES, data_free_scores
from .subsets import mean_subset_loss, split_subsets, subset_loader
from .views import ContrastiveViews

__all__ = ["SelectionResult", "ScoreRun", "compute_scores"]


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
    subset_size: int | None
    num_batches: int
    seconds: float


def _reseed(seed: int) -> None:
    """Seed the global RNGs that data augmentation and dropout draw from (torch, Python, NumPy)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


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
        _reseed(seed)
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
    """``(model, batch, index) -> loss``: features under autocast, the loss in fp32, finite-checked."""

    def __init__(self, features: BatchFeatures, loss: SupConSelectionLoss | CrossEntropySelectionLoss,
                 device: torch.device, amp: bool):
        self.features, self.loss, self.device = features, loss, device
        self.amp = amp and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16

    def _features(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            return self.features(model, batch, self.device)

    def __call__(self, model: nn.Module, batch: Any, index: int) -> torch.Tensor:
        value = self.loss(*self._features(model, batch), index)
        if not torch.isfinite(value):
            raise SelectionError(f"the selection loss is not finite at batch {index} ({float(value.detach())}); "
                                 "check the inputs and the model's features for NaN/inf.")
        return value

    def per_sample(self, model: nn.Module, batch: Any, index: int) -> torch.Tensor:
        """The loss of every sample (SupCon: of every anchor) of one batch, ``[N]``."""
        return self.loss.per_sample(*self._features(model, batch), index)


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


class ScoreRun:
    """What a :class:`~.scores.Score` reads (the :class:`~.scores.ScoreInputs` of one selection pass).

    Args:
        model: the model, with mode and ``requires_grad`` set for the pass.
        weights: the targeted weights by layer name; thetas: their values as the scores use them.
        options: the selection options.
        batches: the chosen subset's batches (None for a data-free pass); batch_loss: their loss.
        seed: the seed every pass over ``batches`` starts from (the same augmented views each time).
        input_shape: one input's ``[C, H, W]`` when known.
    """

    def __init__(self, model: nn.Module, weights: dict[str, nn.Parameter], thetas: dict[str, torch.Tensor],
                 options: SelectionConfig, *, batches: Iterable[Any] | None = None,
                 batch_loss: _BatchLoss | None = None, seed: int = 0, progress: bool = True,
                 input_shape: tuple[int, ...] | None = None, dataloader: Iterable[Any] | None = None) -> None:
        self.model, self.weights, self.thetas, self.options = model, weights, thetas, options
        self.batches, self.batch_loss, self.seed, self.progress = batches, batch_loss, seed, progress
        self._input_shape, self._dataloader = input_shape, dataloader
        self._sums: dict[str, torch.Tensor] | None = None
        self.num_batches = 0

    def _data(self) -> Iterable[Any]:
        if self.batches is None:
            raise SelectionError("this score needs the selection data, but the pass has none.")
        _reseed(self.seed)  # every pass over the subset sees the same augmented views
        return self.batches

    def gradient_sums(self) -> dict[str, torch.Tensor]:
        if self._sums is None:
            self._sums, self.num_batches = _accumulate(self.model, self._data(), self.batch_loss, self.weights,
                                                       self.progress)
        return self._sums

    def per_sample_squares(self) -> dict[str, torch.Tensor]:
        """``sum_n (dl_n / dtheta) ** 2`` over every sample (SupCon: every anchor) of the batches."""
        weights = self.weights
        sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
        params = list(weights.values())
        count = 0
        for index, batch in enumerate(tqdm(self._data(), desc="selection: per-sample gradients", leave=False,
                                           disable=not self.progress)):
            losses = self.batch_loss.per_sample(self.model, batch, index)
            count += 1
            for position in range(len(losses)):
                grads = torch.autograd.grad(losses[position], params, retain_graph=position + 1 < len(losses),
                                            allow_unused=True)
                for name, grad in zip(weights, grads):
                    if grad is not None:
                        sums[name] += grad.float().pow(2)
        self.num_batches = count
        return sums

    def hessian_times(self, vector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``H v`` with H the Hessian of the summed selection loss over the batches (double backward).

        Attention runs on PyTorch's math SDPA kernel here: the fused kernels (flash, memory-efficient) have no
        double backward.
        """
        weights = self.weights
        sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
        params = list(weights.values())
        for index, batch in enumerate(tqdm(self._data(), desc="selection: Hessian-gradient", leave=False,
                                           disable=not self.progress)):
            with sdpa_kernel(SDPBackend.MATH):
                loss = self.batch_loss(self.model, batch, index)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            inner = sum((grad.float() * vector[name]).sum() for name, grad in zip(weights, grads) if grad is not None)
            for name, hv in zip(weights, torch.autograd.grad(inner, params, allow_unused=True)):
                if hv is not None:
                    sums[name] += hv.float()
        return sums

    def input_shape(self) -> tuple[int, ...]:
        """``[C, H, W]`` of the training images when a loader is given (a model may run at another size than its
        pretrained config says), else timm's ``pretrained_cfg['input_size']``."""
        if self._input_shape is not None:
            return tuple(self._input_shape)
        if self._dataloader is not None:
            batch = next(iter(self._dataloader))
            images = batch[0] if isinstance(batch, (tuple, list)) else None
            if torch.is_tensor(images) and images.dim() >= 4:
                return tuple(images.shape[-3:])
        data_config = getattr(self.model, "pretrained_cfg", None) or {}
        if "input_size" not in data_config:
            raise SelectionError(f"score={self.options.score!r} needs the model's input shape: pass input_shape=(3, H, W).")
        return tuple(data_config["input_size"])


class _Thetas(Mapping[str, torch.Tensor]):
    """The values ``theta`` the scores use, by layer name, computed when read (a quantized layer's is a
    dequantized copy: reading one at a time keeps one dense copy alive, not one per layer)."""

    def __init__(self, layers: dict[str, nn.Module], wrappers: dict[str, nn.Module]) -> None:
        self._layers, self._wrappers = layers, wrappers

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._wrappers:
            return self._wrappers[name].weight.detach()
        layer = self._layers[name]
        fmt = quantized_format(layer)
        return fmt.dequantize(layer) if fmt is not None else layer.weight.detach()

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


def _scored_weights(model: nn.Module, targets: dict[str, nn.Module], probes: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, torch.Tensor], _Thetas]:
    """The tensors whose gradients are taken, and the values ``theta`` the scores use, by layer name.

    The targeted layers' weights (a wrapped layer's frozen base weight, whose gradient equals that of its
    effective weight; a quantized layer's probe, :mod:`.probes`), and as ``theta`` the weight the model
    computes with: for a wrapped layer the active adapter's effective weight ``W + scatter(delta)`` (schedules
    re-score during training), the base weight when adapters are disabled (a new adapter is scored on the base
    model).
    """
    wrappers = dict(grft_layers(model))
    weights = {name: probes[name] if name in probes else layer.weight for name, layer in targets.items()}
    return weights, _Thetas(targets, {name: wrappers[name] for name in targets if name in wrappers})


def compute_scores(
    model: nn.Module,
    dataloader: DataLoader | Iterable[Any] | None = None,
    config: GRFTConfig | Mapping[str, Any] | None = None,
    *,
    features: BatchFeatures | None = None,
    device: torch.device | str | None = None,
    amp: bool = True,
    progress: bool = True,
    input_shape: tuple[int, ...] | None = None,
) -> SelectionResult:
    """Score every targeted weight of ``model`` (GRFT: squared SupCon gradient on the lowest-loss subset).

    Args:
        model: the model before :func:`~grft_vision.apply_grft` (its targeted layers unwrapped), or a wrapped
            model (scored as it computes: with the active adapter, or the base inside ``disable_adapter``).
        dataloader: a ``DataLoader`` yielding ``(images, labels)``: images ``[B, C, H, W]`` normalised with the
            model's mean/std (the views are drawn from them: :class:`~.views.ContrastiveViews`) or ``[B, V, C, H,
            W]`` views already drawn; any iterable of batches when ``config.num_subsets == 1``. Not needed by the
            data-free scores (magnitude, synflow, random).
        config: GRFT config (targets and the selection options, ``config.selection_config``).
        features: maps a batch to ``(features, labels)``; default :class:`VisionFeatures` (timm pre-logits for
            SupCon, the logits for a loss on logits).
        device: where to run; default the device of the model's first parameter.
        amp: autocast on CUDA (bf16 where supported, else fp16); gradients still accumulate in fp32.
        progress: show tqdm progress bars.
        input_shape: SynFlow's input shape without the batch dimension; default the shape of the loader's
            images, else timm's ``input_size``.

    Raises:
        SelectionError: missing labels or data, a batch where SupCon is undefined, a model without
            pre-logits, a non-finite loss, or an invalid subset count.
    """
    start = time.perf_counter()
    config = resolve_config(config)
    options = config.selection_config
    score = SCORES.get(options.score)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    targets = find_target_layers(model, config)
    quantized = {name: layer for name, layer in targets.items() if is_quantized(layer)}
    if quantized and not score.supports_quantized:
        raise SelectionError(f"score={options.score!r} cannot score the quantized layers of this model "
                             f"({next(iter(quantized))!r}, ...): {score.quantized_limit} Use another score, or "
                             "score the full-precision model and pass scores= to apply_grft.")
    with weight_probes(quantized) as probes:
        weights, thetas = _scored_weights(model, targets, probes)
        return _compute(model, dataloader, config, score, weights, thetas, start, features=features, device=device,
                        amp=amp, progress=progress, input_shape=input_shape)


def _compute(model: nn.Module, dataloader: DataLoader | Iterable[Any] | None, config: GRFTConfig, score: Any,
             weights: dict[str, torch.Tensor], thetas: Mapping[str, torch.Tensor], start: float, *,
             features: BatchFeatures | None, device: torch.device, amp: bool, progress: bool,
             input_shape: tuple[int, ...] | None) -> SelectionResult:
    """The selection of :func:`compute_scores` once the scored tensors are known."""
    options = config.selection_config
    seed = options.seed
    if not score.needs_data:
        run = ScoreRun(model, weights, thetas, options, seed=seed, progress=progress, input_shape=input_shape,
                       dataloader=dataloader)
        with _selection_state(model, list(weights.values()), "eval", seed, device):
            scores = score.compute(run)
        return SelectionResult({f"{name}.weight": value for name, value in scores.items()}, [], 0, None, 0,
                               time.perf_counter() - start)
    if dataloader is None:
        raise SelectionError(f"score={options.score!r} needs training data: pass dataloader= (or a data-free score: "
                             f"{', '.join(data_free_scores())}).")
    loss = selection_loss(options.loss, options.temperature)
    if features is None:
        logits = (lambda net, images: net(images)) if loss.uses_logits else None
        augment = ContrastiveViews.for_model(model, options.views) if options.views > 1 else None
        features = VisionFeatures(options.views, feature_fn=logits, augment=augment)
    batch_loss = _BatchLoss(features, loss, device, amp)
    if options.num_subsets > 1 and not isinstance(dataloader, DataLoader):
        raise SelectionError("num_subsets > 1 needs a torch DataLoader (its dataset is split into subsets).")
    with _selection_state(model, list(weights.values()), options.mode, seed, device):
        if isinstance(dataloader, DataLoader):
            subsets = split_subsets(len(dataloader.dataset), options.num_subsets, seed)
            loaders = [subset_loader(dataloader, subset, seed + i, options.batch_size)
                       for i, subset in enumerate(subsets)]
        else:
            subsets, loaders = [torch.arange(0)], [dataloader]
        losses = []
        for i, loader in enumerate(loaders if len(loaders) > 1 else []):
            _reseed(seed + i)  # every pass over subset i sees the same augmented views
            losses.append(mean_subset_loss(model, loader, batch_loss, f"selection: subset {i + 1}/{len(loaders)} loss",
                                           progress))
        chosen = int(np.argmin(losses)) if losses else 0
        run = ScoreRun(model, weights, thetas, options, batches=loaders[chosen], batch_loss=batch_loss,
                       seed=seed + chosen, progress=progress, input_shape=input_shape)
        scores = score.compute(run)
    scores = {f"{name}.weight": value for name, value in scores.items()}
    subset_size = len(subsets[chosen]) if isinstance(dataloader, DataLoader) else None
    return SelectionResult(scores, losses, chosen, subset_size, run.num_batches, time.perf_counter() - start)
