"""The loss whose gradients rank parameters.

GRFT's default is supervised contrastive (SupCon) on pre-logits features, from pytorch-metric-learning
(``losses.SupConLoss``: cosine similarity, i.e. L2-normalised features, mean over anchors). It is undefined
for a batch without a positive pair (two samples of one class) or without a negative pair (two classes);
pytorch-metric-learning then silently returns zero, so such batches are refused here with an explanation
instead. The task loss (cross-entropy on the logits, head included) is the alternative.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import SelectionError
from ..extras import import_optional
from ..registry import Registry

__all__ = ["SupConSelectionLoss", "CrossEntropySelectionLoss", "SELECTION_LOSSES", "selection_loss"]


class SupConSelectionLoss:
    """``(features [N, D], labels [N]) -> scalar`` SupCon loss with the batch checks above.

    Args:
        temperature: SupCon temperature (0.07 as in GPS/GRFT).
    """

    uses_logits = False  # computed on pre-logits features (the head plays no part)

    def __init__(self, temperature: float = 0.07) -> None:
        losses = import_optional("pytorch_metric_learning.losses", "the SupCon selection loss")
        reducers = import_optional("pytorch_metric_learning.reducers", "the SupCon selection loss")
        self.loss = losses.SupConLoss(temperature=temperature)
        self.per_anchor = losses.SupConLoss(temperature=temperature, reducer=reducers.DoNothingReducer())

    @staticmethod
    def check_batch(labels: torch.Tensor, batch_index: int) -> None:
        """Raise :class:`SelectionError` when SupCon is undefined on a batch with these labels."""
        classes, counts = labels.unique(return_counts=True)
        if classes.numel() < 2:
            raise SelectionError(
                f"selection batch {batch_index} holds a single class (label {int(classes[0])}); the SupCon loss "
                "needs at least two classes per batch. Shuffle the selection data, use a larger batch size, or "
                "a class-balanced sampler.")
        if int(counts.max()) < 2:
            raise SelectionError(
                f"selection batch {batch_index} has no two samples of the same class, so SupCon has no positive "
                "pair. Use two views per image (selection_views=2) or a larger batch size.")

    def __call__(self, features: torch.Tensor, labels: torch.Tensor, batch_index: int = 0) -> torch.Tensor:
        self.check_batch(labels, batch_index)
        return self.loss(features.float(), labels)

    def per_sample(self, features: torch.Tensor, labels: torch.Tensor, batch_index: int = 0) -> torch.Tensor:
        """The loss of every anchor ``[N]`` (their mean over non-zero entries is :meth:`__call__`)."""
        self.check_batch(labels, batch_index)
        return self.per_anchor(features.float(), labels)["loss"]["losses"]


class CrossEntropySelectionLoss:
    """``(logits [N, classes], labels [N]) -> scalar``: the task loss through the classification head."""

    uses_logits = True

    def __init__(self, temperature: float = 0.07) -> None:  # the temperature is SupCon's; unused here
        pass

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, batch_index: int = 0) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)

    def per_sample(self, logits: torch.Tensor, labels: torch.Tensor, batch_index: int = 0) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, reduction="none")


SELECTION_LOSSES: Registry[type] = Registry("selection_loss")
SELECTION_LOSSES.register("supcon", SupConSelectionLoss)
SELECTION_LOSSES.register("cross_entropy", CrossEntropySelectionLoss)


def selection_loss(name: str, temperature: float) -> SupConSelectionLoss | CrossEntropySelectionLoss:
    """The registered selection loss ``name`` (``supcon`` on pre-logits features, ``cross_entropy`` on logits)."""
    return SELECTION_LOSSES.get(name)(temperature)
