"""A dataset over a list of ``(image file, label)`` pairs, shared by the folder and FGVC layouts."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image
from torch.utils.data import Dataset

__all__ = ["ImageListDataset"]


class ImageListDataset(Dataset):
    """Image files with integer labels, opened with PIL and converted to RGB.

    Args:
        samples: ``(path, label)`` pairs; labels are class indices in ``[0, num_classes)``.
        num_classes: Number of classes of the task (the classifier's output size).
        transform: Applied to the RGB :class:`PIL.Image.Image`; ``None`` returns the PIL image.

    Attributes:
        samples: The ``(path, label)`` pairs, in order.
        num_classes: As given.
        transform: As given; may be replaced after construction.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        num_classes: int,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.num_classes = num_classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Returns ``(image, label)``: the transformed image (a PIL RGB image without transform)."""
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, label
