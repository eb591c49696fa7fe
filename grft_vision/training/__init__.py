"""The training engine shared by the scripts: settings, the loop, checkpoints, distribution, monitoring."""
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import DistributedContext
from .loop import Batches, ImageBatches, Precision, TrainingError, evaluate, train_one_epoch
from .model_factory import ModelLoadError, create_timm_model
from .monitor import Monitor

__all__ = [
    "Batches",
    "DistributedContext",
    "ImageBatches",
    "ModelLoadError",
    "Monitor",
    "Precision",
    "TrainConfig",
    "TrainingError",
    "create_timm_model",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "train_one_epoch",
]
