"""Turning a batch into (features, labels) for the selection loss.

Vision batches are ``(images, labels)`` with ``images`` either ``[B, C, H, W]`` (one image each: the views
are drawn from it by :class:`~.views.ContrastiveViews`, GPS's recipe on tensors) or ``[B, V, C, H, W]`` (V
augmented views per image, as :class:`grft_vision.data.TwoViews` yields); the views are flattened to
``[B*V, C, H, W]`` and the labels repeated. Features are the pre-logits of the model: for
timm ``forward_head(forward_features(x), pre_logits=True)`` (the CLS token after the final norm for a ViT),
so the randomly initialised head plays no part. Other models pass their own ``feature_fn``.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import nn

from ..errors import SelectionError

__all__ = ["BatchFeatures", "VisionFeatures", "timm_pre_logits"]


class BatchFeatures(Protocol):
    """Maps ``(model, batch)`` to ``(features [N, D], labels [N])`` on ``device``."""

    def __call__(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ...


def timm_pre_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pre-logits features ``[N, D]`` of a timm model (``forward_features`` then ``forward_head(pre_logits=True)``).

    Raises:
        SelectionError: the model has no ``forward_features`` / ``forward_head`` pair.
    """
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise SelectionError(
            f"{type(model).__name__} has no pre-logits path (timm's forward_features/forward_head). Pass "
            "feature_fn=lambda model, images: <[N, D] features before the classifier> to compute_scores.")
    return model.forward_head(model.forward_features(images), pre_logits=True)


class VisionFeatures:
    """Features of an ``(images, labels)`` batch, one or several views per image.

    Args:
        views: views per image (1, or 2 for the GPS contrastive protocol).
        feature_fn: ``(model, images [N, C, H, W]) -> [N, D]``; default :func:`timm_pre_logits`.
        augment: draws ``views`` views of ``[B, C, H, W]`` images (a :class:`~.views.ContrastiveViews`) when the
            loader yields one image per sample; None: the loader must yield ``views`` views itself.
    """

    def __init__(self, views: int = 2, feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.views = views
        self.feature_fn = feature_fn or timm_pre_logits
        self.augment = augment

    def _split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not (isinstance(batch, (list, tuple)) and len(batch) >= 2 and torch.is_tensor(batch[1])):
            raise SelectionError("selection needs labels: the data loader must yield (images, labels) batches; "
                                 f"got {type(batch).__name__}.")
        images, labels = batch[0], batch[1]
        if isinstance(images, (list, tuple)):
            images = torch.stack(list(images), dim=1)
        found = images.shape[1] if images.dim() == 5 else 1
        if found == 1 and self.views > 1 and self.augment is not None and images.dim() == 4:
            images, found = self.augment(images), self.views
        if found != self.views:
            raise SelectionError(
                f"selection expects {self.views} view(s) per image but the loader yields {found}. Yield image batches "
                "[B, C, H, W] and let apply_grft draw the views (its default), wrap the dataset transform with "
                f"grft_vision.data.TwoViews(...), or set selection_views={found}.")
        if images.dim() == 5:
            labels = labels.repeat_interleave(images.shape[1])
            images = images.flatten(0, 1)
        return images, labels

    def __call__(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self._split(batch)
        images = images.to(device, non_blocking=True)
        return self.feature_fn(model, images), labels.to(device, non_blocking=True)
