"""Choosing what trains: scores per parameter, reduced to rows, columns or entries, and their top-k."""
from .topk import SelectionError, candidate_count, choose_indices, resolve_k

__all__ = ["SelectionError", "candidate_count", "choose_indices", "resolve_k"]
