"""Data loading for grft-vision: VTAB-1k (TFDS or folder export), FGVC (VPT json or official metadata),
a synthetic dataset for offline runs, and the protocols' transforms.

Typical use::

    from grft_vision.data import create_dataset, create_transforms

    train_set = create_dataset("dtd", "train800val200", data_dir="~/tensorflow_datasets")
    train_set.transform = create_transforms(model, train_set.protocol, train=True)

Each name loads its module on first use; TFDS (the ``vtab`` extra) is imported only to read TFDS data and
SciPy (the ``fgvc`` extra) only to read ``.mat`` metadata.
"""
from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "errors": ["DataNotFoundError"],
    "factory": ["DATASET_NAMES", "LAYOUTS", "create_dataset", "dataset_num_classes"],
    "fgvc": ["FGVC_DATASETS", "FGVC_SPLITS", "FgvcDatasetInfo", "FgvcJsonDataset", "FgvcOfficialDataset",
             "contiguous_class_map", "detect_fgvc_layout"],
    "image_list": ["ImageListDataset"],
    "synthetic": ["SyntheticImageDataset"],
    "transforms": ["PROTOCOLS", "TwoViews", "contrastive_transform", "create_transforms", "resolve_model_data_config"],
    "vtab": ["VtabFolderDataset", "VtabTfdsDataset", "read_vtab_list", "select_tfds_version"],
    "vtab_tasks": ["VTAB_SPLITS", "VTAB_TASKS", "VtabTask"],
})
