"""The training engine shared by the scripts: settings, the loop, checkpoints, distribution, monitoring.

Each name loads its module on first use; TensorBoard (the ``train`` extra) is imported only when a
:class:`Monitor` writes event files.
"""
from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "checkpoint": ["load_checkpoint", "save_checkpoint"],
    "config": ["TrainConfig"],
    "distributed": ["DistributedContext"],
    "loop": ["Batches", "ImageBatches", "Precision", "TrainingError", "evaluate", "train_one_epoch"],
    "model_factory": ["ModelLoadError", "create_timm_model"],
    "monitor": ["Monitor"],
})
