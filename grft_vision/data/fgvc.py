"""Where FGVC data is loaded: VPT's json splits or the datasets' official metadata files.

Two layouts of a dataset root are read (``benchmark-protocols.md`` §2):

* ``json`` (VPT): ``train.json``, ``val.json``, ``test.json``, each ``{relative_image_path: class_id}``,
  paths relative to the dataset's image folder. Splits ``train``, ``val``, ``trainval`` (train ∪ val, what
  GPS trains on) and ``test``.
* ``official``: the metadata files shipped with the dataset (see
  :data:`~grft_vision.data.fgvc_official.OFFICIAL_FILES`). They define ``train`` and ``test`` only
  (Oxford Flowers also ``val``), so ``trainval`` is ``train`` (plus Flowers' ``val``) and ``val`` is
  unavailable.

Class ids are remapped to contiguous indices ``0..C-1`` by sorting the unique ids of *all* splits of
the layout (every json file present, or the whole official metadata), so every split of a root agrees
on the mapping even when a split lacks some classes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from PIL import Image

from ..config import ConfigError
from .errors import DataNotFoundError
from .fgvc_official import OFFICIAL_FILES, OFFICIAL_READERS, RawSplits
from .image_list import ImageListDataset

__all__ = [
    "FGVC_DATASETS",
    "FGVC_LAYOUTS",
    "FGVC_SPLITS",
    "FgvcDatasetInfo",
    "FgvcJsonDataset",
    "FgvcOfficialDataset",
    "contiguous_class_map",
    "detect_fgvc_layout",
]

FGVC_SPLITS = ("train", "val", "trainval", "test")
FGVC_LAYOUTS = ("json", "official")
JSON_FILES = ("train.json", "val.json", "test.json")


@dataclass(frozen=True)
class FgvcDatasetInfo:
    """One FGVC dataset.

    Attributes:
        name: Project name, e.g. ``"cub"``.
        full_name: Dataset name as published.
        image_dir: Folder of the images relative to the dataset root (``""``: the root itself); image
            paths of both layouts are relative to it.
        num_classes: Number of classes.
    """

    name: str
    full_name: str
    image_dir: str
    num_classes: int


FGVC_DATASETS: dict[str, FgvcDatasetInfo] = {
    info.name: info
    for info in (
        FgvcDatasetInfo("cub", "CUB-200-2011", "images", 200),
        FgvcDatasetInfo("nabirds", "NABirds", "images", 555),
        FgvcDatasetInfo("flowers", "Oxford Flowers 102", "", 102),
        FgvcDatasetInfo("dogs", "Stanford Dogs", "Images", 120),
        FgvcDatasetInfo("cars", "Stanford Cars", "", 196),
    )
}


def _get_info(dataset: str) -> FgvcDatasetInfo:
    if dataset not in FGVC_DATASETS:
        raise ConfigError(f"Unknown FGVC dataset {dataset!r}; expected one of {sorted(FGVC_DATASETS)}.")
    return FGVC_DATASETS[dataset]


def _layouts_message(root: Path, info: FgvcDatasetInfo) -> str:
    image_dir = root / info.image_dir
    return (f"Expected either VPT's json splits {', '.join(JSON_FILES)} in {root} (image paths relative to "
            f"{image_dir}), or the official metadata {', '.join(OFFICIAL_FILES[info.name])} in {root}.")


def detect_fgvc_layout(root: str | os.PathLike, dataset: str) -> str:
    """Which layout a dataset root holds.

    Args:
        root: Dataset root directory.
        dataset: FGVC dataset name (see :data:`FGVC_DATASETS`).

    Returns:
        ``"json"`` if any of ``train.json``/``val.json``/``test.json`` exists, else ``"official"`` if all
        the official metadata files exist.

    Raises:
        DataNotFoundError: If neither layout is found; the message lists the files expected.
    """
    info = _get_info(dataset)
    root = Path(root).expanduser()
    if any((root / name).is_file() for name in JSON_FILES):
        return "json"
    if all((root / name).is_file() for name in OFFICIAL_FILES[dataset]):
        return "official"
    state = "does not exist" if not root.is_dir() else "holds neither layout"
    raise DataNotFoundError(f"FGVC dataset {dataset!r} ({info.full_name}): root {str(root)!r} {state}. "
                            + _layouts_message(root, info))


def contiguous_class_map(class_ids: Iterable[int]) -> dict[int, int]:
    """Maps raw class ids to ``0..C-1`` in sorted order of the unique ids, e.g. ``{3: 0, 7: 1, 12: 2}``."""
    return {class_id: index for index, class_id in enumerate(sorted(set(class_ids)))}


def _select(
    raw: RawSplits, split: str, root: Path, info: FgvcDatasetInfo
) -> tuple[list[tuple[Path, int]], int]:
    """Samples of ``split`` with contiguous labels (map over all of ``raw``), and the number of classes."""
    class_map = contiguous_class_map(class_id for items in raw.values() for _, class_id in items)
    parts = [part for part in ("train", "val") if part in raw] if split == "trainval" else [split]
    image_dir = root / info.image_dir
    samples = [(image_dir / path, class_map[class_id]) for part in parts for path, class_id in raw[part]]
    return samples, len(class_map)


def _read_json_split(path: Path) -> list[tuple[str, int]]:
    """``(relative image path, class id)`` pairs of one VPT json file; a malformed file is a ConfigError."""
    try:
        entries = json.loads(path.read_text())
        return [(image, int(class_id)) for image, class_id in entries.items()]
    except (ValueError, TypeError, AttributeError) as error:
        raise ConfigError(f"{path}: expected a JSON object {{\"relative/image.jpg\": class id, ...}} "
                          f"({type(error).__name__}: {error}); fix or replace the file.") from None


def _check_split(split: str) -> None:
    if split not in FGVC_SPLITS:
        raise ConfigError(f"Unknown FGVC split {split!r}; expected one of {FGVC_SPLITS}.")


class FgvcJsonDataset(ImageListDataset):
    """An FGVC split from VPT's json files (``train.json``, ``val.json``, ``test.json`` in the root).

    Args:
        root: Dataset root holding the json files and the image folder.
        dataset: ``cub``, ``nabirds``, ``flowers``, ``dogs`` or ``cars``.
        split: ``train``, ``val``, ``trainval`` (train ∪ val) or ``test``.
        transform: Applied to the RGB PIL image; ``None`` returns the PIL image.

    Attributes:
        num_classes: Number of unique class ids over the json files present (the table's count on the
            full data).
        protocol: ``"fgvc"``, the :func:`~grft_vision.data.transforms.create_transforms` protocol.

    Raises:
        DataNotFoundError: If a json file the split needs is missing.
    """

    protocol = "fgvc"

    def __init__(
        self,
        root: str | os.PathLike,
        dataset: str,
        split: str,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        info = _get_info(dataset)
        _check_split(split)
        root = Path(root).expanduser()
        needed = ("train.json", "val.json") if split == "trainval" else (f"{split}.json",)
        missing = [name for name in needed if not (root / name).is_file()]
        if missing:
            raise DataNotFoundError(f"FGVC dataset {dataset!r} (json layout), split {split!r}: missing "
                                    f"{', '.join(str(root / name) for name in missing)}. "
                                    + _layouts_message(root, info))
        raw = {name.removesuffix(".json"): _read_json_split(root / name) for name in JSON_FILES
               if (root / name).is_file()}
        self.dataset = dataset
        self.split = split
        super().__init__(*_select(raw, split, root, info), transform)


class FgvcOfficialDataset(ImageListDataset):
    """An FGVC split from the dataset's official metadata files (no validation split except Flowers).

    Args:
        root: Dataset root as distributed (e.g. ``CUB_200_2011/`` with ``images.txt`` and ``images/``).
        dataset: ``cub``, ``nabirds``, ``flowers``, ``dogs`` or ``cars``.
        split: ``train``, ``trainval`` (= ``train``; Flowers: train ∪ val), ``test``; ``val`` for Flowers.
        transform: Applied to the RGB PIL image; ``None`` returns the PIL image.

    Attributes:
        num_classes: Number of unique class ids in the metadata.
        protocol: ``"fgvc"``, the :func:`~grft_vision.data.transforms.create_transforms` protocol.

    Raises:
        DataNotFoundError: If an official metadata file is missing.
        ConfigError: If ``split`` is ``val`` and the official metadata has no validation split (a ``ValueError``).
    """

    protocol = "fgvc"

    def __init__(
        self,
        root: str | os.PathLike,
        dataset: str,
        split: str,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        info = _get_info(dataset)
        _check_split(split)
        root = Path(root).expanduser()
        missing = [name for name in OFFICIAL_FILES[dataset] if not (root / name).is_file()]
        if missing:
            raise DataNotFoundError(f"FGVC dataset {dataset!r} (official layout): missing "
                                    f"{', '.join(str(root / name) for name in missing)}. "
                                    + _layouts_message(root, info))
        raw = OFFICIAL_READERS[dataset](root)
        if split == "val" and "val" not in raw:
            raise ConfigError(f"The official {info.full_name} metadata has no validation split; use 'train', "
                              "'trainval' (= train) or 'test', or VPT's json layout for 'val'.")
        self.dataset = dataset
        self.split = split
        super().__init__(*_select(raw, split, root, info), transform)
