"""grft-vision: gradient-selected row/column fine-tuning (GRFT) of timm vision models.

Public API::

    from grft_vision import GRFTConfig, apply_grft, merge_grft, save_adapter, load_adapter
"""
from .adapter import AdapterError, load_adapter, save_adapter
from .config import ConfigError, GRFTConfig
from .layers import GRFTConv2d, GRFTLayer, GRFTLinear
from .anatomy import is_grft_model
from .model import apply_grft, merge_grft, unload_grft
from .regularization import L2ToPretrained
from .selection import SelectionError
from .trainable import TrainableReport, print_trainable_parameters, trainable_parameters_report

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "ConfigError",
    "GRFTConfig",
    "GRFTConv2d",
    "GRFTLayer",
    "GRFTLinear",
    "L2ToPretrained",
    "SelectionError",
    "TrainableReport",
    "apply_grft",
    "is_grft_model",
    "load_adapter",
    "merge_grft",
    "print_trainable_parameters",
    "save_adapter",
    "trainable_parameters_report",
    "unload_grft",
]
