"""``create_dataset``: one entry point over the VTAB-1k tasks, the FGVC datasets and the synthetic set."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, did_you_mean
from .fgvc import FGVC_DATASETS, FgvcJsonDataset, FgvcOfficialDataset, detect_fgvc_layout
from .synthetic import DEFAULT_NUM_CLASSES, SyntheticImageDataset
from .vtab import VtabFolderDataset, VtabTfdsDataset
from .vtab_tasks import VTAB_TASKS

__all__ = ["DATASET_NAMES", "LAYOUTS", "create_dataset", "dataset_num_classes"]

SYNTHETIC = "synthetic"
DATASET_NAMES: tuple[str, ...] = tuple(sorted((*VTAB_TASKS, *FGVC_DATASETS, SYNTHETIC)))
LAYOUTS = ("auto", "tfds", "folder", "json", "official")
_FAMILY_LAYOUTS = {
    "vtab": ("auto", "tfds", "folder"),
    "fgvc": ("auto", "json", "official"),
    SYNTHETIC: ("auto",),
}
# The training scripts' split names map onto the synthetic set's two splits.
_SYNTHETIC_SPLITS = {"train": "train", "train800val200": "train", "trainval": "train", "test": "test"}

Transform = Callable[[Image.Image], Any]


def _check_name(name: str) -> str:
    """Returns the dataset family of ``name``: ``vtab``, ``fgvc`` or ``synthetic``."""
    if name in VTAB_TASKS:
        return "vtab"
    if name in FGVC_DATASETS:
        return "fgvc"
    if name == SYNTHETIC:
        return SYNTHETIC
    raise ConfigError(f"Unknown dataset {name!r}.{did_you_mean(name, DATASET_NAMES)} "
                      f"Valid names: {', '.join(DATASET_NAMES)}.")


def dataset_num_classes(name: str) -> int:
    """Number of classes of a dataset (``synthetic``: the default of :class:`SyntheticImageDataset`, 10).

    Raises:
        ConfigError: If the name is unknown (a ``ValueError``; the message lists the valid names and the
            closest one).
    """
    family = _check_name(name)
    if family == "vtab":
        return VTAB_TASKS[name].num_classes
    if family == "fgvc":
        return FGVC_DATASETS[name].num_classes
    return DEFAULT_NUM_CLASSES


def _create_vtab(name: str, split: str, data_dir: str | os.PathLike | None, layout: str,
                 transform: Transform | None, download: bool) -> Dataset:
    if layout == "folder" and download:
        raise ConfigError("download=True is only supported by the VTAB TFDS layout.")
    if layout == "auto":
        folder_list = Path(data_dir or "", VTAB_TASKS[name].folder_name, "train800val200.txt").expanduser()
        layout = "folder" if data_dir is not None and folder_list.is_file() else "tfds"
    if layout == "tfds":
        return VtabTfdsDataset(name, split, data_dir=data_dir, transform=transform, download=download)
    if data_dir is None:
        raise ConfigError(f"The folder layout of {name!r} needs data_dir (the root holding one folder per "
                          "task); pass --data-dir.")
    return VtabFolderDataset(data_dir, name, split, transform=transform)


def _create_fgvc(name: str, split: str, data_dir: str | os.PathLike | None, layout: str,
                 transform: Transform | None) -> Dataset:
    if data_dir is None:
        raise ConfigError(f"FGVC dataset {name!r} needs data_dir (the dataset root); pass --data-dir.")
    if layout == "auto":
        layout = detect_fgvc_layout(data_dir, name)
    dataset_cls = FgvcJsonDataset if layout == "json" else FgvcOfficialDataset
    return dataset_cls(data_dir, name, split, transform=transform)


def create_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    layout: str = "auto",
    transform: Transform | None = None,
    download: bool = False,
    **synthetic_kwargs: Any,
) -> Dataset:
    """Creates a dataset by name.

    Every dataset yields ``(image, label)``: the transformed image (an RGB PIL image when ``transform`` is
    ``None``) and an ``int`` class index; it has ``.num_classes``, a settable ``.transform`` and a
    ``.protocol`` naming its :func:`~grft_vision.data.transforms.create_transforms` protocol.

    Args:
        name: One of :data:`DATASET_NAMES`: a VTAB-1k task, an FGVC dataset or ``synthetic``.
        split: VTAB: ``train800``, ``val200``, ``train800val200``, ``test``. FGVC: ``train``, ``val``,
            ``trainval``, ``test``. Synthetic: ``train`` or ``test`` (``train800val200`` and ``trainval``
            also select ``train``).
        data_dir: VTAB: the TFDS data dir (``None``: TFDS' default) or the root of the folder layout
            holding one folder per task. FGVC: the dataset root. Unused by ``synthetic``.
        layout: ``auto``; VTAB: ``tfds`` or ``folder`` (auto: folder if
            ``<data_dir>/<folder_name>/train800val200.txt`` exists, else tfds); FGVC: ``json`` or ``official``
            (auto: json if a ``*.json`` split file exists, else official).
        transform: Applied to each RGB PIL image.
        download: VTAB TFDS layout only: build the TFDS data when missing (needs TensorFlow).
        **synthetic_kwargs: ``num_classes``, ``num_samples``, ``image_size``, ``seed`` of
            :class:`SyntheticImageDataset`.

    Returns:
        A map-style :class:`torch.utils.data.Dataset`.

    Raises:
        ConfigError: If the name, layout or split is unknown or the arguments do not fit the dataset (a
            ``ValueError``).
        DataNotFoundError: If the data is missing (a ``FileNotFoundError``; the message says how to get it).
    """
    family = _check_name(name)
    if layout not in _FAMILY_LAYOUTS[family]:
        raise ConfigError(f"Layout {layout!r} does not apply to {name!r}; expected one of "
                          f"{_FAMILY_LAYOUTS[family]}.")
    if synthetic_kwargs and family != SYNTHETIC:
        raise TypeError(f"Unexpected arguments for {name!r}: {sorted(synthetic_kwargs)}.")
    if download and family != "vtab":
        raise ConfigError(f"{name!r} cannot be downloaded; download=True is only supported by the VTAB TFDS "
                          "layout.")
    if family == "vtab":
        return _create_vtab(name, split, data_dir, layout, transform, download)
    if family == "fgvc":
        return _create_fgvc(name, split, data_dir, layout, transform)
    if split not in _SYNTHETIC_SPLITS:
        raise ConfigError(f"Unknown synthetic split {split!r}; expected one of {tuple(_SYNTHETIC_SPLITS)}.")
    return SyntheticImageDataset(split=_SYNTHETIC_SPLITS[split], transform=transform, **synthetic_kwargs)
