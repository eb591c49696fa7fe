"""grft-vision: gradient-selected row/column fine-tuning (GRFT) of timm vision models.

Public API::

    from grft_vision import GRFTConfig, apply_grft, merge_grft, save_adapter, load_adapter

and the adapter lifecycle: ``set_adapter``, ``list_adapters``, ``delete_adapter``, ``merge_adapter``,
``unmerge_adapter``, ``disable_adapter``, ``mixed_adapters``, ``save_pretrained`` / ``from_pretrained``,
``unload_grft``. The packages: :mod:`.tuner` (wrapping and applying updates), :mod:`.selection` (scores from
data), :mod:`.io` (adapter files, checkpoints, export), :mod:`.training`, :mod:`.data`, :mod:`.llm`,
:mod:`.integrations` (``docs/architecture.md``).
"""
from .api import apply_grft
from .config import BudgetConfig, GRFTConfig, ScheduleConfig, SelectionConfig
from .errors import (AdapterError, ConfigError, DataNotFoundError, GRFTError, ModelLoadError, SelectionError,
                     TrainingError)
from .io.adapters import from_pretrained, load_adapter, save_adapter, save_pretrained
from .tuner.anatomy import is_grft_model
from .tuner.layer import GRFTConv2d, GRFTLayer, GRFTLinear
from .tuner.lifecycle import (delete_adapter, disable_adapter, list_adapters, merge_adapter, set_adapter,
                              unmerge_adapter)
from .tuner.mixed import mixed_adapters
from .tuner.model import merge_and_unload, merge_grft, unload, unload_grft
from .tuner.quantized import quantize_model
from .tuner.regularization import L2ToPretrained
from .tuner.trainable import (TrainableReport, adapter_parameters, get_nb_trainable_parameters,
                              print_trainable_parameters, trainable_parameters_report)
from .version import __version__ as __version__

__all__ = [
    "AdapterError",
    "BudgetConfig",
    "ConfigError",
    "DataNotFoundError",
    "GRFTConfig",
    "GRFTConv2d",
    "GRFTError",
    "GRFTLayer",
    "GRFTLinear",
    "L2ToPretrained",
    "ModelLoadError",
    "ScheduleConfig",
    "SelectionConfig",
    "SelectionError",
    "TrainableReport",
    "TrainingError",
    "adapter_parameters",
    "apply_grft",
    "delete_adapter",
    "disable_adapter",
    "from_pretrained",
    "get_nb_trainable_parameters",
    "is_grft_model",
    "list_adapters",
    "load_adapter",
    "merge_adapter",
    "merge_and_unload",
    "merge_grft",
    "mixed_adapters",
    "print_trainable_parameters",
    "quantize_model",
    "save_adapter",
    "save_pretrained",
    "set_adapter",
    "trainable_parameters_report",
    "unload",
    "unload_grft",
    "unmerge_adapter",
]
