"""Choosing what trains: per-parameter scores (SupCon gradients on the lowest-loss subset), reduced to
rows, columns or entries, and their top-k."""
from .features import BatchFeatures, VisionFeatures, timm_pre_logits
from .gradients import SelectionResult, compute_scores
from .losses import SupConSelectionLoss
from .record import LayerSelection, SelectionRecord
from .subsets import split_subsets
from .topk import SelectionError, candidate_count, choose_indices, resolve_k

__all__ = [
    "BatchFeatures",
    "LayerSelection",
    "SelectionError",
    "SelectionRecord",
    "SelectionResult",
    "SupConSelectionLoss",
    "VisionFeatures",
    "candidate_count",
    "choose_indices",
    "compute_scores",
    "resolve_k",
    "split_subsets",
    "timm_pre_logits",
]
