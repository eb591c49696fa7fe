"""Readers of the FGVC datasets' official metadata files (the layouts as distributed, without VPT's json).

Each reader takes the dataset root and returns ``{split: [(relative image path, raw class id), ...]}``,
paths relative to the dataset's image folder (the same paths VPT's json files use as keys). The official
metadata defines ``train`` and ``test``; Oxford Flowers also defines ``val``. The ``.mat`` files of Oxford
Flowers, Stanford Dogs and Stanford Cars are read with :func:`scipy.io.loadmat`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..extras import import_optional

__all__ = ["OFFICIAL_FILES", "OFFICIAL_READERS", "RawSplits"]

RawSplits = dict[str, list[tuple[str, int]]]


def _loadmat(path: Path) -> dict[str, np.ndarray]:
    scipy_io = import_optional("scipy.io", f"reading {path.name}")  # only the .mat layouts need scipy
    return scipy_io.loadmat(path, squeeze_me=True)


def _read_table(path: Path) -> dict[str, str]:
    """``{first column: rest of line}`` of a whitespace-separated metadata file such as ``images.txt``."""
    rows = (line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
    return {key: value.strip() for key, value in rows}


def _read_cub_style(root: Path) -> RawSplits:
    """CUB-200-2011 and NABirds: ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``."""
    paths = _read_table(root / "images.txt")
    labels = _read_table(root / "image_class_labels.txt")
    is_train = _read_table(root / "train_test_split.txt")
    splits: RawSplits = {"train": [], "test": []}
    for image_id, path in paths.items():
        splits["train" if int(is_train[image_id]) else "test"].append((path, int(labels[image_id])))
    return splits


def _read_flowers(root: Path) -> RawSplits:
    """Oxford Flowers 102: ``imagelabels.mat`` (``labels``) and ``setid.mat`` (train/val/test ids)."""
    labels = np.atleast_1d(_loadmat(root / "imagelabels.mat")["labels"])
    set_ids = _loadmat(root / "setid.mat")
    return {
        split: [(f"jpg/image_{i:05d}.jpg", int(labels[i - 1])) for i in np.atleast_1d(set_ids[key]).tolist()]
        for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))
    }


def _read_dogs(root: Path) -> RawSplits:
    """Stanford Dogs: ``train_list.mat`` / ``test_list.mat`` (``file_list``, ``labels``)."""
    def read(name: str) -> list[tuple[str, int]]:
        mat = _loadmat(root / name)
        return [(str(path), int(label))
                for path, label in zip(np.atleast_1d(mat["file_list"]), np.atleast_1d(mat["labels"]))]

    return {"train": read("train_list.mat"), "test": read("test_list.mat")}


def _read_cars(root: Path) -> RawSplits:
    """Stanford Cars: ``cars_annos.mat`` (``annotations``: ``relative_im_path``, ``class``, ``test``)."""
    annotations = np.atleast_1d(_loadmat(root / "cars_annos.mat")["annotations"])
    splits: RawSplits = {"train": [], "test": []}
    for annotation in annotations:
        split = "test" if int(annotation["test"]) else "train"
        splits[split].append((str(annotation["relative_im_path"]), int(annotation["class"])))
    return splits


OFFICIAL_FILES: dict[str, tuple[str, ...]] = {
    "cub": ("images.txt", "image_class_labels.txt", "train_test_split.txt"),
    "nabirds": ("images.txt", "image_class_labels.txt", "train_test_split.txt"),
    "flowers": ("imagelabels.mat", "setid.mat"),
    "dogs": ("train_list.mat", "test_list.mat"),
    "cars": ("cars_annos.mat",),
}

OFFICIAL_READERS: dict[str, Callable[[Path], RawSplits]] = {
    "cub": _read_cub_style,
    "nabirds": _read_cub_style,
    "flowers": _read_flowers,
    "dogs": _read_dogs,
    "cars": _read_cars,
}
