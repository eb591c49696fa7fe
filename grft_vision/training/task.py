"""What a kind of run supplies to the shared engine: data, model, batches, selection inputs, metrics.

The engine (:mod:`grft_vision.training.runner`) knows nothing about images or tokens; a :class:`Task`
does. :class:`VisionTask` serves ``train_vtab.py`` and ``train_fgvc.py``; the language-model path has its
own task over the same engine.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import GRFTConfig
from ..data import TwoViews, contrastive_transform, create_dataset, create_transforms, resolve_model_data_config
from ..selection import BatchFeatures
from ..tuner.quantized import quantize_model
from .config import TrainConfig, VisionTrainConfig
from .model_factory import create_timm_model
from .trainer import Batches, ImageBatches, top1_metrics

__all__ = ["Task", "VisionTask", "top1_metrics"]


class Task:
    """The pieces of a run that depend on its modality. Subclasses implement every method."""

    main_metric = "top1"
    batches: Batches
    collate_fn: Callable | None = None

    def datasets(self, train: TrainConfig) -> tuple[Dataset, Dataset, int]:
        """``(train set, eval set, number of classes)``, transforms not yet set."""
        raise NotImplementedError

    def build_model(self, train: TrainConfig, num_classes: int, device: torch.device | None = None) -> nn.Module:
        """The pre-trained model with a fresh ``num_classes`` head (seeded by the caller), quantized when
        ``train.quantize`` says so; ``device``: where the run computes (quantizing places the layers there)."""
        raise NotImplementedError

    def prepare_data(self, train: TrainConfig, model: nn.Module, train_set: Dataset, eval_set: Dataset) -> None:
        """Set the datasets' preprocessing for this model."""

    def selection_loader(self, train: TrainConfig, grft: GRFTConfig, train_set: Dataset) -> DataLoader:
        """The data the selection loss is computed on."""
        raise NotImplementedError

    def selection_features(self, grft: GRFTConfig) -> BatchFeatures | None:
        """Batch -> (features, labels) for selection; None uses the vision default."""
        return None

    def loss_and_mixup(self, train: TrainConfig, num_classes: int) -> tuple[Callable, Callable | None]:
        """The task loss ``(logits, targets) -> scalar`` and an optional batch mixing function."""
        return nn.CrossEntropyLoss(), None

    def metrics(self, predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Evaluation metrics; must hold :attr:`main_metric`."""
        return top1_metrics(predictions, targets)


class VisionTask(Task):
    """Image classification with a timm model on a dataset of :func:`grft_vision.data.create_dataset`."""

    batches = ImageBatches()

    def datasets(self, train: VisionTrainConfig) -> tuple[Dataset, Dataset, int]:
        train_set = self._dataset(train, train.train_split, train.synthetic_samples)
        eval_set = self._dataset(train, train.eval_split, max(train.synthetic_samples // 2, 1))
        return train_set, eval_set, train_set.num_classes

    @staticmethod
    def _dataset(train: VisionTrainConfig, split: str, synthetic_samples: int) -> Dataset:
        options = {"download": True} if train.download else {}
        if train.dataset == "synthetic":
            options = {"num_classes": train.synthetic_classes, "image_size": train.synthetic_image_size,
                       "seed": train.seed, "num_samples": synthetic_samples}
        return create_dataset(train.dataset, split, data_dir=train.data_dir, layout=train.layout, **options)

    def build_model(self, train: VisionTrainConfig, num_classes: int, device: torch.device | None = None) -> nn.Module:
        model = create_timm_model(train, num_classes)
        if train.quantize is not None:
            quantize_model(model.to(device or "cpu"), train.quantize)
        return model

    @staticmethod
    def data_config(train: VisionTrainConfig, model: nn.Module) -> dict[str, Any]:
        """timm's data config of the model, at the input size it runs at (or the run's image size)."""
        config = resolve_model_data_config(model)
        if train.img_size is not None:
            config["input_size"] = (3, train.img_size, train.img_size)
        return config

    def prepare_data(self, train: VisionTrainConfig, model: nn.Module, train_set: Dataset, eval_set: Dataset) -> None:
        self._data_config = self.data_config(train, model)
        options = {"interpolation": train.interpolation, "mean": train.mean, "std": train.std}
        train_set.transform = create_transforms(self._data_config, train_set.protocol, train=True, **options)
        eval_set.transform = create_transforms(self._data_config, eval_set.protocol, train=False, **options)

    def selection_loader(self, train: VisionTrainConfig, grft: GRFTConfig, train_set: Dataset) -> DataLoader:
        """The training set again with GPS's contrastive augmentation (two views by default).

        The selection reads it through :func:`~grft_vision.selection.subsets.subset_loader`, which draws every
        item with generators seeded by the seed and the item's index, so the result does not depend on
        ``workers``; the loader's own generator is seeded too.
        """
        views = copy.copy(train_set)
        augment = contrastive_transform(self._data_config, mean=train.mean, std=train.std)
        views.transform = TwoViews(augment) if grft.selection_views == 2 else augment
        return DataLoader(views, batch_size=grft.selection_batch_size or train.batch_size, shuffle=False,
                          num_workers=train.workers, generator=torch.Generator().manual_seed(grft.selection_seed))

    def loss_and_mixup(self, train: VisionTrainConfig, num_classes: int) -> tuple[Callable, Callable | None]:
        if train.mixup > 0 or train.cutmix > 0:
            mixup = Mixup(mixup_alpha=train.mixup, cutmix_alpha=train.cutmix, label_smoothing=train.smoothing,
                          num_classes=num_classes)
            return SoftTargetCrossEntropy(), mixup
        if train.smoothing > 0:
            return LabelSmoothingCrossEntropy(train.smoothing), None
        return nn.CrossEntropyLoss(), None
