"""A procedurally generated, learnable image classification dataset for offline tests and smoke runs.

Each class is a distinct combination of colour (hue ``label / num_classes``), stripe orientation (one of
4) and stripe frequency (one of 3), drawn as a striped square at a random position, with a random stripe
phase and background level and Gaussian pixel noise. Image ``i`` of a split is drawn from its own random
generator seeded with ``(seed, split, i)``, so images are reproducible, need no storage, and the train
and test splits are independent draws from the same distribution.
"""
from __future__ import annotations

import colorsys
from typing import Any, Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["DEFAULT_NUM_CLASSES", "SYNTHETIC_SPLITS", "SyntheticImageDataset"]

SYNTHETIC_SPLITS = ("train", "test")
DEFAULT_NUM_CLASSES = 10
NUM_ORIENTATIONS = 4
NUM_FREQUENCIES = 3
NOISE_STD = 0.08


def _render(label: int, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draws one ``[size, size, 3]`` uint8 image of class ``label``."""
    colour = np.array(colorsys.hsv_to_rgb(label / num_classes, 0.9, 0.9))
    angle = np.pi * (label % NUM_ORIENTATIONS) / NUM_ORIENTATIONS
    cycles = 1.5 + (label // NUM_ORIENTATIONS) % NUM_FREQUENCIES
    side = size // 2
    yy, xx = np.mgrid[0:side, 0:side] / side
    phase = rng.uniform(0.0, 2.0 * np.pi)
    stripes = 0.5 + 0.5 * np.sin(2.0 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    image = np.full((size, size, 3), rng.uniform(0.3, 0.7))
    top, left = rng.integers(0, size - side + 1, size=2)
    image[top:top + side, left:left + side] = colour * (0.2 + 0.8 * stripes[..., None])
    image += rng.normal(0.0, NOISE_STD, image.shape)
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


class SyntheticImageDataset(Dataset):
    """Deterministic class-dependent synthetic RGB images, returned as PIL images.

    Args:
        num_classes: Number of classes (labels ``i % num_classes``, so classes are balanced).
        num_samples: Number of images in the split.
        image_size: Height and width of the images in pixels (at least 4).
        seed: Base seed (>= 0); the same seed gives the same images.
        split: ``"train"`` or ``"test"``; the two are independent draws.
        transform: Applied to the PIL image; ``None`` returns the PIL image.

    Attributes:
        num_classes: As given.
        protocol: ``"vtab"``: no augmentation is needed to learn it.

    Raises:
        ValueError: If ``split`` is unknown or a size argument is out of range.
    """

    protocol = "vtab"

    def __init__(
        self,
        num_classes: int = DEFAULT_NUM_CLASSES,
        num_samples: int = 1000,
        image_size: int = 32,
        seed: int = 0,
        split: str = "train",
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"Unknown synthetic split {split!r}; expected one of {SYNTHETIC_SPLITS}.")
        if num_classes < 1 or num_samples < 0 or image_size < 4 or seed < 0:
            raise ValueError(f"Need num_classes >= 1, num_samples >= 0, image_size >= 4, seed >= 0; got "
                             f"{num_classes}, {num_samples}, {image_size}, {seed}.")
        self.num_classes = num_classes
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Returns ``(image, label)``: the transformed image (a PIL RGB image without transform)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, SYNTHETIC_SPLITS.index(self.split), index])
        image = Image.fromarray(_render(label, self.num_classes, self.image_size, rng))
        if self.transform is not None:
            image = self.transform(image)
        return image, label
