"""The 19 VTAB-1k tasks: TFDS source, official split strings, class counts and label rules.

The split strings and label rules are those of the official VTAB code (google-research/task_adaptation),
see ``benchmark-protocols.md`` §1. A label rule maps one decoded TFDS example (a dict of NumPy arrays, as
``tfds.data_source`` returns it) to an ``(image, label)`` pair: an HWC ``uint8`` RGB array and an ``int``.
Rules are module-level functions so that datasets holding them pickle into DataLoader workers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

__all__ = [
    "VTAB_SPLITS",
    "VTAB_TASKS",
    "VtabTask",
    "clevr_count_rule",
    "clevr_dist_rule",
    "dsprites_loc_rule",
    "dsprites_ori_rule",
    "kitti_rule",
    "label_rule",
    "smallnorb_azi_rule",
    "smallnorb_ele_rule",
]

VTAB_SPLITS = ("train800", "val200", "train800val200", "test")

CLEVR_DIST_THRESHOLDS = np.array([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])
KITTI_DIST_THRESHOLDS = np.array([-100.0, 8.0, 20.0, 999.0])
KITTI_VEHICLE_TYPES = 3  # types 0, 1, 2 are Car, Van, Truck
KITTI_NO_VEHICLE_DISTANCE = 1000.0

Example = Mapping[str, Any]
Rule = Callable[[Example], tuple[np.ndarray, int]]


def _bin(distance: float, thresholds: np.ndarray) -> int:
    """Largest ``i`` with ``thresholds[i] < distance`` (strict); ``thresholds`` sorted ascending."""
    return int(np.searchsorted(thresholds, distance, side="left")) - 1


def _gray_to_rgb(image: np.ndarray) -> np.ndarray:
    """Tiles an ``[H, W, 1]`` image to ``[H, W, 3]``."""
    return np.repeat(image, 3, axis=-1)


def label_rule(example: Example) -> tuple[np.ndarray, int]:
    """The ``image`` (``[H, W, 3]`` uint8) and the dataset's own ``label``."""
    return example["image"], int(example["label"])


def clevr_count_rule(example: Example) -> tuple[np.ndarray, int]:
    """CLEVR count: number of objects − 3 (scenes hold 3 to 10 objects, so labels 0..7)."""
    return example["image"], len(example["objects"]["size"]) - 3


def clevr_dist_rule(example: Example) -> tuple[np.ndarray, int]:
    """CLEVR distance: bin of the closest object's depth ``min(pixel_coords[:, 2])``.

    Bins are the largest ``i`` with ``[0, 8, 8.5, 9, 9.5, 10, 100][i] < depth`` (strict), labels 0..5.
    """
    depth = float(np.min(example["objects"]["pixel_coords"][:, 2]))
    return example["image"], _bin(depth, CLEVR_DIST_THRESHOLDS)


def kitti_rule(example: Example) -> tuple[np.ndarray, int]:
    """KITTI distance: bin of the closest vehicle's depth ``location[:, 2]`` (metres).

    Only objects with ``type < 3`` (Car, Van, Truck) count; 1000 m stands for "no vehicle". Bins are the
    largest ``i`` with ``[-100, 8, 20, 999][i] < depth``: 0 (≤ 8 m), 1 (≤ 20 m), 2 (≤ 999 m), 3 (none).
    """
    objects = example["objects"]
    vehicle_depths = objects["location"][objects["type"] < KITTI_VEHICLE_TYPES, 2]
    depth = float(np.min(np.append(vehicle_depths, KITTI_NO_VEHICLE_DISTANCE)))
    return example["image"], _bin(depth, KITTI_DIST_THRESHOLDS)


def dsprites_loc_rule(example: Example) -> tuple[np.ndarray, int]:
    """dSprites location: ``floor(label_x_position / 2)`` (32 positions → 16 classes), image ×255 RGB."""
    return _gray_to_rgb(example["image"]) * 255, int(example["label_x_position"]) // 2


def dsprites_ori_rule(example: Example) -> tuple[np.ndarray, int]:
    """dSprites orientation: ``floor(label_orientation / 2.5)`` (40 angles → 16 classes), image ×255."""
    return _gray_to_rgb(example["image"]) * 255, int(np.floor(example["label_orientation"] / 2.5))


def smallnorb_azi_rule(example: Example) -> tuple[np.ndarray, int]:
    """smallNORB azimuth: the first camera's ``image`` tiled to RGB, ``label_azimuth`` (18 classes)."""
    return _gray_to_rgb(example["image"]), int(example["label_azimuth"])


def smallnorb_ele_rule(example: Example) -> tuple[np.ndarray, int]:
    """smallNORB elevation: the first camera's ``image`` tiled to RGB, ``label_elevation`` (9 classes)."""
    return _gray_to_rgb(example["image"]), int(example["label_elevation"])


@dataclass(frozen=True)
class VtabTask:
    """One VTAB-1k task.

    Attributes:
        name: Project name of the task, e.g. ``"clevr_dist"``.
        tfds_name: TFDS dataset (and config) name, e.g. ``"clevr"`` or ``"sun397/tfds"``.
        tfds_version: The TFDS version the official splits were defined on.
        train800: TFDS split string of the 800 training images.
        val200: TFDS split string of the 200 validation images.
        test: TFDS split string of the test set.
        num_classes: Number of classes after the label rule.
        folder_name: Directory of the task in the NOAH/SSF/GPS folder layout.
        rule: Maps a decoded TFDS example to ``(HWC uint8 RGB image, int label)``.
        manual_download: TFDS cannot download the source files; they go to ``<data_dir>/downloads/manual/``.
        compatible_versions: Other TFDS versions known to hold the same examples in the same order, used
            without a warning when the reference version is not prepared.
    """

    name: str
    tfds_name: str
    tfds_version: str
    train800: str
    val200: str
    test: str
    num_classes: int
    folder_name: str
    rule: Rule = label_rule
    manual_download: bool = False
    compatible_versions: tuple[str, ...] = ()

    @property
    def tfds_id(self) -> str:
        """``"name:version"`` of the reference TFDS dataset."""
        return f"{self.tfds_name}:{self.tfds_version}"

    def split(self, split: str) -> str:
        """TFDS split string of a VTAB split.

        Args:
            split: One of ``train800``, ``val200``, ``train800val200`` (= both, joined by ``+``), ``test``.

        Returns:
            The TFDS split string, e.g. ``"train[:800]+train[45000:45200]"``.

        Raises:
            ValueError: If ``split`` is not a VTAB split name.
        """
        if split not in VTAB_SPLITS:
            raise ValueError(f"Unknown VTAB split {split!r}; expected one of {VTAB_SPLITS}.")
        if split == "train800val200":
            return f"{self.train800}+{self.val200}"
        return getattr(self, split)


def _task(name: str, tfds_id: str, val200: str, test: str, num_classes: int, folder_name: str,
          **kwargs: Any) -> VtabTask:
    tfds_name, tfds_version = tfds_id.split(":")
    return VtabTask(name, tfds_name, tfds_version, "train[:800]", val200, test, num_classes, folder_name,
                    **kwargs)


_TASKS = (
    _task("cifar100", "cifar100:3.0.2", "train[45000:45200]", "test", 100, "cifar"),
    # tfds only builds 3.0.2 now; its release note: "Download URL update" (same data).
    _task("caltech101", "caltech101:3.0.1", "train[2754:2954]", "test", 102, "caltech101",
          compatible_versions=("3.0.2",)),
    _task("dtd", "dtd:3.0.1", "validation[:200]", "test", 47, "dtd"),
    _task("flowers102", "oxford_flowers102:2.1.1", "validation[:200]", "test", 102, "oxford_flowers102"),
    # tfds only builds 4.0.0 now, with the same keys (benchmark-protocols.md §1).
    _task("pets", "oxford_iiit_pet:3.2.0", "train[2944:3144]", "test", 37, "oxford_iiit_pet",
          compatible_versions=("4.0.0",)),
    _task("svhn", "svhn_cropped:3.0.0", "train[65931:66131]", "test", 10, "svhn"),
    _task("sun397", "sun397/tfds:4.0.0", "validation[:200]", "test", 397, "sun397"),
    _task("patch_camelyon", "patch_camelyon:2.0.0", "validation[:200]", "test", 2, "patch_camelyon"),
    _task("eurosat", "eurosat/rgb:2.0.0", "train[16200:16400]", "train[21600:]", 10, "eurosat"),
    _task("resisc45", "resisc45:3.0.0", "train[18900:19100]", "train[25200:]", 45, "resisc45",
          manual_download=True),
    _task("diabetic_retinopathy", "diabetic_retinopathy_detection/btgraham-300:3.0.0", "validation[:200]",
          "test", 5, "diabetic_retinopathy", manual_download=True),
    _task("clevr_count", "clevr:3.1.0", "train[63000:63200]", "validation", 8, "clevr_count",
          rule=clevr_count_rule),
    _task("clevr_dist", "clevr:3.1.0", "train[63000:63200]", "validation", 6, "clevr_dist",
          rule=clevr_dist_rule),
    _task("dmlab", "dmlab:2.0.1", "validation[:200]", "test", 6, "dmlab"),
    _task("kitti", "kitti:3.2.0", "validation[:200]", "test", 4, "kitti", rule=kitti_rule),
    _task("dsprites_loc", "dsprites:2.0.0", "train[589824:590024]", "train[663552:]", 16, "dsprites_loc",
          rule=dsprites_loc_rule),
    _task("dsprites_ori", "dsprites:2.0.0", "train[589824:590024]", "train[663552:]", 16, "dsprites_ori",
          rule=dsprites_ori_rule),
    _task("smallnorb_azi", "smallnorb:2.0.0", "test[:200]", "test[50%:]", 18, "smallnorb_azi",
          rule=smallnorb_azi_rule),
    _task("smallnorb_ele", "smallnorb:2.0.0", "test[:200]", "test[50%:]", 9, "smallnorb_ele",
          rule=smallnorb_ele_rule),
)

VTAB_TASKS: dict[str, VtabTask] = {task.name: task for task in _TASKS}
