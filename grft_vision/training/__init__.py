"""The training engine shared by the scripts: settings, the run directory, the training methods, the step and
epoch loops, checkpoints, distribution, monitoring.

Each name loads its module on first use; TensorBoard (the ``train`` extra) is imported only when a
:class:`Monitor` writes event files.
"""
from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "checkpoint": ["load_checkpoint", "save_checkpoint"],
    "config": ["TrainConfig", "VisionTrainConfig"],
    "distributed": ["DistributedContext"],
    "divergence": ["DivergenceWatch", "check_finite_parameters"],
    "methods": ["METHODS", "Method"],
    "model_factory": ["ModelLoadError", "create_timm_model"],
    "monitor": ["Monitor"],
    "run_dir": ["RunDirectory"],
    "runner": ["run"],
    "trainer": ["Batches", "ImageBatches", "PlainScaler", "Precision", "TrainStep", "Trainer", "evaluate",
                "top1_metrics", "train_one_epoch"],
})
