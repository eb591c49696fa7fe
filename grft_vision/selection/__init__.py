"""Choosing what trains: per-parameter scores (GRFT's SupCon gradients on the lowest-loss subset, or the
SPEFT / ID3 / GEM alternatives), budgets per layer, their top-k rows, columns or entries, and schedules
that change the choice during training."""
from .budget import allocate_units, unit_cost, weight_entropy
from .features import BatchFeatures, VisionFeatures, timm_pre_logits
from .gradients import SelectionResult, compute_scores
from .losses import CrossEntropySelectionLoss, SupConSelectionLoss
from .record import LayerSelection, SelectionRecord
from .salience import DATA_FREE_SCORES, gradient_salience
from .schedules import DynamicSchedule, IncrementalSchedule, MaskSchedule, create_schedule, remap_optimizer_state
from .subsets import split_subsets
from .topk import SelectionError, candidate_count, choose_indices, resolve_k

__all__ = [
    "BatchFeatures",
    "CrossEntropySelectionLoss",
    "DATA_FREE_SCORES",
    "DynamicSchedule",
    "IncrementalSchedule",
    "MaskSchedule",
    "allocate_units",
    "create_schedule",
    "gradient_salience",
    "remap_optimizer_state",
    "unit_cost",
    "weight_entropy",
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
