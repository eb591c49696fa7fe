"""Where rows, columns or entries are chosen: the top-k units of a per-parameter score tensor.

A score tensor has the weight's shape (``[out, in]`` for linear layers, ``[out, in/groups, kh, kw]`` for
convolutions) and holds a non-negative importance per parameter (GRFT: the squared SupCon gradient). The
structure reduces it to one value per candidate unit and the k largest units are taken
(:meth:`Update.choose <grft_vision.tuner.structures.Update.choose>`: rows by row sums, the paper's Eq. 4;
columns by column sums; sparse by every row's own top-k; tap columns by the columns of the
``[out, in/groups*kh*kw]`` view). Ties are broken towards the lower index (stable sort), so equal scores give
equal selections. A NaN or infinite score is refused: it would sort above every real score and choose its
unit silently.
"""
from __future__ import annotations

import torch

from ..errors import SelectionError
from ..tuner.structures import STRUCTURES

__all__ = ["choose_indices", "candidate_count", "resolve_k", "SelectionError"]


def candidate_count(weight_shape: torch.Size | tuple[int, ...], structure: str, groups: int = 1) -> int:
    """Number of candidate units one weight offers to ``structure`` (rows, input channels, entries per row, ...)."""
    return STRUCTURES.get(structure).candidate_count(tuple(weight_shape), groups)


def resolve_k(k: int | float, dimension: int, layer_name: str, structure: str, clamp: bool = False) -> int:
    """Turn a count or a fraction into a number of candidates for a layer offering ``dimension`` of them.

    Raises:
        SelectionError: k is larger than the dimension and ``clamp`` is False.
    """
    count = max(1, int(k * dimension + 0.5)) if isinstance(k, float) else int(k)
    if count > dimension and not clamp:
        unit = STRUCTURES.get(structure).unit_label
        raise SelectionError(
            f"k={k} is larger than layer {layer_name!r}, which has {dimension} {unit}. Use k <= {dimension}, a "
            f"fraction such as k=0.01, set clamp_k=True, or exclude the layer with exclude_modules=['{layer_name}'].")
    return min(count, dimension)


def choose_indices(score: torch.Tensor, structure: str, k: int | float, *, groups: int = 1,
                   layer_name: str = "<layer>", clamp: bool = False) -> torch.Tensor:
    """Choose the k best units of ``structure`` in one weight.

    Args:
        score: per-parameter importance, the weight's shape ``[out, in/groups, *kernel]``.
        structure: a registered structure name ('row', 'column', 'sparse', 'tap_column', ...).
        k: a count or a fraction of the candidates.
        groups: the convolution's ``groups`` (1 for linear layers).
        layer_name: module name for error messages.
        clamp: clamp k to the dimension instead of raising.

    Returns:
        int64 indices, ascending, in the structure's layout (``[k]``, or ``[out, k]`` for per-row structures).

    Raises:
        SelectionError: k does not fit the layer, a score is NaN or infinite, or on the meta device.
    """
    cls = STRUCTURES.get(structure)
    count = cls.resolve_count(k, tuple(score.shape), groups, layer_name=layer_name, clamp=clamp)
    if score.is_meta:
        raise SelectionError(f"layer {layer_name!r}: its score is on the meta device, which holds shapes but no values, "
                             "so nothing can be ranked. Compute the scores from a model with real weights (for a "
                             "model built on 'meta': model.to_empty(device=...) and load its weights first).")
    finite = torch.isfinite(score.detach())
    if not bool(finite.all()):
        raise SelectionError(
            f"layer {layer_name!r}: {int((~finite).sum())} of its {score.numel()} scores are NaN or inf, so its "
            "top-k would be arbitrary. Check the data and the model's weights for NaN/inf, or select in fp32 "
            "(--no-amp).")
    return cls.choose(score, count, groups)
