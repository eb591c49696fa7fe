"""The benchmark's model: a small timm ViT (:func:`build_vit`, :func:`load_backbone`) and its input
convention (normalisation, data config, images as tensors or through a transform)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from .settings import Settings

__all__ = ["MEAN", "STD", "data_config", "to_tensor", "ArrayImages", "build_vit", "load_backbone"]

MEAN = STD = (0.5, 0.5, 0.5)


def data_config(settings: Settings) -> dict[str, Any]:
    """The timm data config of the small ViT (timm's own resolves to 224 px for a resized model)."""
    return {"input_size": (3, settings.img_size, settings.img_size), "mean": MEAN, "std": STD,
            "interpolation": "bicubic", "crop_pct": 1.0}


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

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def build_vit(settings: Settings, num_classes: int) -> nn.Module:
    """A randomly initialised ViT (``vit_tiny_patch16_224``'s architecture resized to ``settings``) with
    ``num_classes`` outputs."""
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
