"""Choosing what trains, from data: per-parameter scores (GRFT's SupCon gradients on the lowest-loss subset,
or the SPEFT / ID3 / GEM alternatives, a registry: :mod:`.scores`), budgets per layer, the top-k units of each
structure, and schedules that change the choice during training. It asks the structure registry
(:mod:`grft_vision.tuner.structures`) for every rule about a structure and never branches on its name.

Each name loads its module on first use, so that ``apply_grft(model, scores=...)`` imports nothing that
only computing scores from data needs (pytorch-metric-learning: the ``selection`` extra).
"""
from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "budget": ["allocate_units", "unit_cost", "weight_entropy"],
    "features": ["BatchFeatures", "VisionFeatures", "timm_pre_logits"],
    "gradients": ["ScoreRun", "SelectionResult", "compute_scores"],
    "losses": ["CrossEntropySelectionLoss", "SELECTION_LOSSES", "SupConSelectionLoss"],
    "record": ["LayerSelection", "SelectionRecord"],
    "scores": ["SCORES", "GradientScore", "Score", "data_free_scores", "register_score"],
    "schedules": ["DynamicSchedule", "IncrementalSchedule", "MaskSchedule", "create_schedule",
                  "remap_optimizer_state"],
    "subsets": ["split_subsets"],
    "topk": ["SelectionError", "candidate_count", "choose_indices", "resolve_k"],
    "views": ["CONTRASTIVE_RECIPE", "ContrastiveViews"],
})
