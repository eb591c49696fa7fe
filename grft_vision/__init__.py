"""grft-vision: gradient-selected row/column fine-tuning (GRFT) of timm vision models.

Public API::

    from grft_vision import GRFTConfig, apply_grft, merge_grft, save_adapter, load_adapter

and the adapter lifecycle: ``set_adapter``, ``list_adapters``, ``delete_adapter``, ``merge_adapter``,
``unmerge_adapter``, ``disable_adapter``, ``mixed_adapters``, ``save_pretrained`` / ``from_pretrained``,
``unload_grft``.
"""
from .adapter import from_pretrained, load_adapter, save_adapter, save_pretrained
from .anatomy import is_grft_model
from .config import GRFTConfig
from .errors import (AdapterError, ConfigError, DataNotFoundError, GRFTError, ModelLoadError, SelectionError,
                     TrainingError)
from .layers import GRFTConv2d, GRFTLayer, GRFTLinear
from .lifecycle import delete_adapter, disable_adapter, list_adapters, merge_adapter, set_adapter, unmerge_adapter
from .mixed_batch import mixed_adapters
from .model import apply_grft, merge_grft, unload_grft
from .regularization import L2ToPretrained
from .trainable import TrainableReport, adapter_parameters, print_trainable_parameters, trainable_parameters_report

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "ConfigError",
    "DataNotFoundError",
    "GRFTConfig",
    "GRFTConv2d",
    "GRFTError",
    "GRFTLayer",
    "GRFTLinear",
    "L2ToPretrained",
    "ModelLoadError",
    "SelectionError",
    "TrainableReport",
    "TrainingError",
    "adapter_parameters",
    "apply_grft",
    "delete_adapter",
    "disable_adapter",
    "from_pretrained",
    "is_grft_model",
    "list_adapters",
    "load_adapter",
    "merge_adapter",
    "merge_grft",
    "mixed_adapters",
    "print_trainable_parameters",
    "save_adapter",
    "save_pretrained",
    "set_adapter",
    "trainable_parameters_report",
    "unload_grft",
    "unmerge_adapter",
]
