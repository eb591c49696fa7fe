"""Choosing what trains: per-parameter scores (GRFT's SupCon gradients on the lowest-loss subset, or the
SPEFT / ID3 / GEM alternatives), budgets per layer, their top-k rows, columns or entries, and schedules
that change the choice during training.

Each name loads its module on first use, so that ``apply_grft(model, scores=...)`` imports nothing that
only computing scores from data needs (pytorch-metric-learning: the ``selection`` extra).
"""
from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "budget": ["allocate_units", "unit_cost", "weight_entropy"],
    "features": ["BatchFeatures", "VisionFeatures", "timm_pre_logits"],
    "gradients": ["SelectionResult", "compute_scores"],
    "losses": ["CrossEntropySelectionLoss", "SupConSelectionLoss"],
    "record": ["LayerSelection", "SelectionRecord"],
    "salience": ["DATA_FREE_SCORES", "gradient_salience"],
    "schedules": ["DynamicSchedule", "IncrementalSchedule", "MaskSchedule", "create_schedule",
                  "remap_optimizer_state"],
    "subsets": ["split_subsets"],
    "topk": ["SelectionError", "candidate_count", "choose_indices", "resolve_k"],
})
