"""A human-readable record of a selection: per layer, what was chosen and how it scored against the rest.

Saved as JSON next to a run's outputs and logged to TensorBoard by the training scripts.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..files import atomic_write
from ..tuner.structures import STRUCTURES

__all__ = ["LayerSelection", "SelectionRecord", "candidate_scores", "write_json_atomic"]


def candidate_scores(score: torch.Tensor, structure: str, groups: int = 1) -> torch.Tensor:
    """One score per candidate unit of ``structure`` (:meth:`~grft_vision.tuner.structures.Update.unit_scores`)."""
    return STRUCTURES.get(structure).unit_scores(score, groups)


@dataclass
class LayerSelection:
    """What one layer chose.

    Attributes:
        name: module name.
        structure: the structure's name ('row', 'column', 'sparse', ...).
        weight_shape: shape of the weight.
        indices: chosen units (``[k]``), or per-row entries (``[out][k]``) for per-row structures.
        chosen_share: share of the layer's total score held by the chosen candidates (1.0 = all of it).
        chosen_mean: mean score of a chosen candidate.
        rest_mean: mean score of an unchosen candidate (0 when everything was chosen).
    """

    name: str
    structure: str
    weight_shape: list[int]
    indices: list
    chosen_share: float
    chosen_mean: float
    rest_mean: float

    @classmethod
    def build(cls, name: str, structure: str, score: torch.Tensor, indices: torch.Tensor,
              groups: int = 1) -> "LayerSelection":
        values = candidate_scores(score, structure, groups)
        if indices.numel() == 0:  # nothing chosen yet (incremental schedules start empty)
            return cls(name, structure, list(score.shape), [], 0.0, 0.0, float(values.mean()))
        chosen = torch.zeros_like(values, dtype=torch.bool)
        chosen.scatter_(-1, indices.cpu().to(values.device), True)
        total = float(values.sum())
        rest = values[~chosen]
        return cls(name, structure, list(score.shape), indices.tolist(),
                   float(values[chosen].sum()) / total if total > 0 else 0.0,
                   float(values[chosen].mean()), float(rest.mean()) if rest.numel() else 0.0)


@dataclass
class SelectionRecord:
    """The whole selection: settings, the subset used, and every layer's choice."""

    structure: str
    k: int | float
    num_subsets: int = 1
    subset_losses: list[float] = field(default_factory=list)
    chosen_subset: int = 0
    subset_size: int | None = None
    seconds: float | None = None
    layers: list[LayerSelection] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A short markdown table: layer, k, share of score chosen, chosen vs rest mean score."""
        lines = [f"structure={self.structure}, k={self.k}, subsets={self.num_subsets} "
                 f"(chosen {self.chosen_subset}, losses {[round(v, 4) for v in self.subset_losses]})", "",
                 "| layer | chosen | share of score | chosen mean / rest mean |", "|---|---|---|---|"]
        for layer in self.layers:
            ratio = layer.chosen_mean / layer.rest_mean if layer.rest_mean > 0 else float("inf")
            per_row = bool(layer.indices) and isinstance(layer.indices[0], list)
            shown = f"{len(layer.indices)} rows x {len(layer.indices[0])}" if per_row else layer.indices
            lines.append(f"| {layer.name} | {shown} | {layer.chosen_share:.3f} | {ratio:.2f} |")
        return "\n".join(lines)

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write the record as JSON, atomically."""
        return write_json_atomic(path, self.to_dict())


def write_json_atomic(path: str | os.PathLike, payload: object) -> Path:
    """Write ``payload`` as indented JSON, all or nothing (:func:`grft_vision.files.atomic_write`)."""
    with atomic_write(path, "w") as handle:
        json.dump(payload, handle, indent=1)
    return Path(path)
