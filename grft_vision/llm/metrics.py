"""GLUE's metrics for CoLA, MRPC and RTE: accuracy for all three, Matthews correlation for CoLA, F1 for MRPC.

Computed with scikit-learn on the predicted and true class ids of the whole evaluation split. The
paper's Table 3 reports accuracy for all three tasks; GLUE's official scores are Matthews correlation
(CoLA), F1 and accuracy (MRPC) and accuracy (RTE).
"""
from __future__ import annotations

import torch

from ..extras import import_optional
from .data import GLUE_TASKS

__all__ = ["glue_metrics", "METRICS"]

# metric name -> (sklearn.metrics function, its keyword arguments)
METRICS = {
    "accuracy": ("accuracy_score", {}),
    "mcc": ("matthews_corrcoef", {}),
    "f1": ("f1_score", {"pos_label": 1, "zero_division": 0.0}),
}


def glue_metrics(task: str, predictions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``{metric: value}`` of ``task`` (``accuracy`` always, plus ``mcc`` / ``f1``) for class ids ``[N]``."""
    if len(targets) == 0:
        return {name: 0.0 for name in GLUE_TASKS[task].metrics}
    sklearn_metrics = import_optional("sklearn.metrics", "the GLUE metrics")
    y_true, y_pred = targets.cpu().numpy(), predictions.cpu().numpy()
    scores = {}
    for name in GLUE_TASKS[task].metrics:
        function, options = METRICS[name]
        scores[name] = float(getattr(sklearn_metrics, function)(y_true, y_pred, **options))
    return scores
