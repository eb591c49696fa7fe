"""GLUE classification with a Hugging Face language model: the :class:`~grft_vision.training.task.Task`
that ``train_glue.py`` gives the shared engine (selection, ``apply_grft``, loop, checkpoints, DDP, TensorBoard).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError, GRFTConfig
from ..io.identity import record_base_weights
from ..selection import BatchFeatures
from ..training.config import TrainConfig
from ..training.task import Task
from .batches import TokenBatches
from .config import GlueTrainConfig
from .data import GLUE_TASKS, GlueDataset, PadCollate, SequenceTooLongError, load_glue, tokenize_dataset
from .features import TokenFeatures
from .metrics import glue_metrics
from .modeling import check_max_length, load_classifier, load_tokenizer, resolve_dtype, resolve_pooling

__all__ = ["GlueTask"]


class GlueTask(Task):
    """CoLA, MRPC or RTE with ``AutoModelForSequenceClassification`` (see :mod:`grft_vision.llm.modeling`).

    Data: :func:`~grft_vision.llm.data.load_glue` (TSV / JSON lines / Hugging Face), tokenised once,
    batches padded per batch. Selection: SupCon on the pooled final hidden state
    (:class:`~grft_vision.llm.features.TokenFeatures`). Metrics: accuracy (the main metric), plus Matthews
    correlation (CoLA) or F1 (MRPC).
    """

    main_metric = "accuracy"
    batches = TokenBatches()

    def __init__(self) -> None:
        self.tokenizer = None
        self.pooling = "last"
        self.collate_fn: Callable | None = None
        self._task = "cola"
        self._train_set: GlueDataset | None = None

    @staticmethod
    def _settings(train: TrainConfig) -> GlueTrainConfig:
        if not isinstance(train, GlueTrainConfig):
            raise TypeError(f"GlueTask needs GlueTrainConfig settings, got {type(train).__name__}.")
        return train

    def datasets(self, train: TrainConfig) -> tuple[Dataset, Dataset, int]:
        train = self._settings(train)
        self._task = train.dataset
        try:  # load_glue's ValueErrors are about the settings or the files: an unlabelled split, a bad line
            train_set = load_glue(train.dataset, train.train_split, train.data_dir, train.layout)
            eval_set = load_glue(train.dataset, train.eval_split, train.data_dir, train.layout)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        return train_set, eval_set, GLUE_TASKS[train.dataset].num_classes

    def build_model(self, train: TrainConfig, num_classes: int, device: torch.device | None = None) -> nn.Module:
        train = self._settings(train)
        self.tokenizer = load_tokenizer(train.model, train.pad_token)
        if not train.pretrained:  # the random base is this seed's (recorded below)
            torch.manual_seed(train.seed)
        model = load_classifier(train.model, num_classes, self.tokenizer, pretrained=train.pretrained,
                                dtype=resolve_dtype(train.dtype, train.device),
                                gradient_checkpointing=train.gradient_checkpointing, progress=not train.quiet,
                                quantize=train.quantize, device=device or "cpu")
        if train.pretrained:
            record_base_weights(model, "pretrained", hub_id=train.model)
        else:
            record_base_weights(model, "random", seed=train.seed)
        check_max_length(model, self.tokenizer, train.max_length)
        self.pooling = resolve_pooling(model, train.pooling)
        return model

    def prepare_data(self, train: TrainConfig, model: nn.Module, train_set: Dataset, eval_set: Dataset) -> None:
        train = self._settings(train)
        for dataset in (train_set, eval_set):
            try:
                tokenize_dataset(dataset, self.tokenizer, train.max_length, train.truncation)
            except SequenceTooLongError as error:  # truncation=false and a longer example
                raise ConfigError(str(error)) from error
        self.collate_fn = PadCollate(self.tokenizer.pad_token_id, self.tokenizer.padding_side)
        self._train_set = train_set

    def selection_loader(self, train: TrainConfig, grft: GRFTConfig, train_set: Dataset) -> DataLoader:
        """The training set in its order (the selection shuffles it per subset), padded per batch."""
        return DataLoader(train_set, batch_size=grft.selection_batch_size or train.batch_size, shuffle=False,
                          num_workers=train.workers, collate_fn=self.collate_fn)

    def selection_features(self, grft: GRFTConfig) -> BatchFeatures:
        return TokenFeatures(self.pooling, grft.selection_views, dataset=self._train_set, collate=self.collate_fn,
                             seed=grft.selection_seed)

    def loss_and_mixup(self, train: TrainConfig, num_classes: int) -> tuple[Callable, Callable | None]:
        return nn.CrossEntropyLoss(label_smoothing=train.smoothing), None

    def metrics(self, predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return glue_metrics(self._task, predictions, targets)
