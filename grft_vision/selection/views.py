"""The augmented views of the SupCon selection loss: GPS's contrastive recipe, for PIL images and for tensors.

The recipe (``benchmark-protocols.md`` §3), :data:`CONTRASTIVE_RECIPE`: ``RandomResizedCrop((H, W),
scale=(0.08, 1), ratio=(3/4, 4/3))`` (bicubic), horizontal flip with probability 0.5,
``ColorJitter(0.4, 0.4, 0.4, 0.1)`` with probability 0.8, ``RandomGrayscale`` with probability 0.2, then the
model's normalisation. The training scripts apply it to PIL images in the dataset
(:func:`grft_vision.data.contrastive_transform`, two views per image with :class:`grft_vision.data.TwoViews`).

:class:`ContrastiveViews` applies the same recipe to a batch of image tensors that are already normalised
(what an ordinary ``DataLoader`` of ``(image tensor, label)`` yields): it undoes the normalisation, draws the
views with torchvision's ``transforms.v2`` (its own random parameters for every view of every image, from
torch's global generator, which the selection seeds), and normalises again. So ``apply_grft(model,
dataloader=train_loader)`` works on any loader of image tensors; a loader that yields two views per image
already (``[B, 2, C, H, W]``) is used as it is.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from timm.data import resolve_data_config
from torch import nn
from torchvision.transforms import v2

__all__ = ["CONTRASTIVE_RECIPE", "ContrastiveViews"]

CONTRASTIVE_RECIPE: Mapping[str, Any] = {
    "scale": (0.08, 1.0),
    "ratio": (3 / 4, 4 / 3),
    "hflip": 0.5,
    "color_jitter": (0.4, 0.4, 0.4, 0.1),
    "color_jitter_prob": 0.8,
    "grayscale_prob": 0.2,
    "interpolation": "bicubic",
}


class ContrastiveViews:
    """``[B, C, H, W]`` normalised images -> ``[B, views, C, H, W]`` views of GPS's contrastive recipe.

    Args:
        mean, std: the normalisation the images carry (per channel, for pixels in [0, 1]).
        size: the views' ``(H, W)`` (default: the images' own size).
        views: views per image.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: tuple[int, int] | None = None,
                 views: int = 2) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.size, self.views = size, views
        self._augment: dict[tuple[int, int], v2.Compose] = {}

    @classmethod
    def for_model(cls, model: nn.Module, views: int = 2) -> "ContrastiveViews":
        """Views for images normalised with ``model``'s data config (timm's defaults for other models)."""
        config = resolve_data_config(model=model)
        return cls(config["mean"], config["std"], views=views)

    def _pipeline(self, size: tuple[int, int]) -> v2.Compose:
        if size not in self._augment:
            recipe = CONTRASTIVE_RECIPE
            self._augment[size] = v2.Compose([
                v2.RandomResizedCrop(size, scale=recipe["scale"], ratio=recipe["ratio"],
                                     interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(recipe["hflip"]),
                v2.RandomApply([v2.ColorJitter(*recipe["color_jitter"])], p=recipe["color_jitter_prob"]),
                v2.RandomGrayscale(recipe["grayscale_prob"]),
            ])
        return self._augment[size]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        pixels = (images.float() * std + mean).clamp(0, 1)
        augment = self._pipeline(tuple(self.size or images.shape[-2:]))
        views = [torch.stack([augment(image) for image in pixels]) for _ in range(self.views)]
        return ((torch.stack(views, dim=1) - mean) / std).to(images.dtype)

    def __repr__(self) -> str:
        return f"ContrastiveViews(views={self.views}, size={self.size})"
