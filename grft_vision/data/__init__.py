"""Data loading for grft-vision: VTAB-1k (TFDS or folder export), FGVC (VPT json or official metadata),
a synthetic dataset for offline runs, and the protocols' transforms.

Typical use::

    from grft_vision.data import create_dataset, create_transforms

    train_set = create_dataset("dtd", "train800val200", data_dir="~/tensorflow_datasets")
    train_set.transform = create_transforms(model, train_set.protocol, train=True)
"""
from .errors import DataNotFoundError
from .factory import DATASET_NAMES, LAYOUTS, create_dataset, dataset_num_classes
from .fgvc import (
    FGVC_DATASETS,
    FGVC_SPLITS,
    FgvcDatasetInfo,
    FgvcJsonDataset,
    FgvcOfficialDataset,
    contiguous_class_map,
    detect_fgvc_layout,
)
from .image_list import ImageListDataset
from .synthetic import SyntheticImageDataset
from .transforms import PROTOCOLS, TwoViews, contrastive_transform, create_transforms, resolve_model_data_config
from .vtab import VtabFolderDataset, VtabTfdsDataset, read_vtab_list, select_tfds_version
from .vtab_tasks import VTAB_SPLITS, VTAB_TASKS, VtabTask

__all__ = [
    "DATASET_NAMES",
    "DataNotFoundError",
    "FGVC_DATASETS",
    "FGVC_SPLITS",
    "FgvcDatasetInfo",
    "FgvcJsonDataset",
    "FgvcOfficialDataset",
    "ImageListDataset",
    "LAYOUTS",
    "PROTOCOLS",
    "SyntheticImageDataset",
    "TwoViews",
    "VTAB_SPLITS",
    "VTAB_TASKS",
    "VtabFolderDataset",
    "VtabTask",
    "VtabTfdsDataset",
    "contiguous_class_map",
    "contrastive_transform",
    "create_dataset",
    "create_transforms",
    "dataset_num_classes",
    "detect_fgvc_layout",
    "read_vtab_list",
    "resolve_model_data_config",
    "select_tfds_version",
]
