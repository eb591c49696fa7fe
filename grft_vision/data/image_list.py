"""A dataset over a list of ``(image file, label)`` pairs, shared by the folder and FGVC layouts."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .errors import DataNotFoundError

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
        """Returns ``(image, label)``: the transformed image (a PIL RGB image without transform).

        Raises:
            DataNotFoundError: the image file is missing, unreadable, truncated or not an image (the
                message names the file).
        """
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except FileNotFoundError:
            raise DataNotFoundError(f"image {path} (sample {index}) does not exist; restore it, or remove its "
                                    "line from the split's list.") from None
        except (UnidentifiedImageError, OSError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DataNotFoundError(f"image {path} (sample {index}) cannot be read ({reason}); replace the file, "
                                    "or remove its line from the split's list.") from None
        if self.transform is not None:
            image = self.transform(image)
        return image, label
