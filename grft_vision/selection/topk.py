"""Where rows, columns or entries are chosen: the top-k of a per-parameter score tensor.

A score tensor has the weight's shape (``[out, in]`` for linear layers, ``[out, in/groups, kh, kw]`` for
convolutions) and holds a non-negative importance per parameter (GRFT: the squared SupCon gradient).
It is reduced by summation to one value per candidate, then the k largest candidates are taken:

- ``row``: one candidate per output row / output channel, ``S_i = sum_j s_ij`` (paper Eq. 4);
- ``column``: one candidate per input feature / input channel (for grouped convolutions a global input
  channel ``c`` covers the output channels of its group and all taps);
- ``sparse``: every row keeps its own k largest entries (GPS), conv rows flattened to ``in/groups*kh*kw``;
- ``tap_column`` (convolutions): one candidate per column of the ``[out, in/groups*kh*kw]`` view, i.e.
  one input channel at one kernel tap, as GPS and the GRFT paper reshape conv weights.

Ties are broken towards the lower index (stable sort), so equal scores give equal selections. A NaN or
infinite score is refused: it would sort above every real score and choose its row silently.
"""
from __future__ import annotations

import math

import torch

from ..errors import SelectionError

__all__ = ["choose_indices", "candidate_count", "resolve_k", "SelectionError"]


def candidate_count(weight_shape: torch.Size | tuple[int, ...], structure: str, groups: int = 1) -> int:
    """Number of candidates one weight offers: rows, input channels, or entries per row."""
    out_features, in_per_group = weight_shape[0], weight_shape[1]
    if structure == "row":
        return out_features
    if structure == "column":
        return in_per_group * groups
    if structure in ("sparse", "tap_column"):
        return math.prod(weight_shape[1:])
    raise SelectionError(f"unknown structure {structure!r}; use 'row', 'column' or 'sparse'.")


def resolve_k(k: int | float, dimension: int, layer_name: str, structure: str, clamp: bool = False) -> int:
    """Turn a count or a fraction into a number of candidates for one layer.

    Args:
        k: int >= 1 (a count) or float in (0, 1) (a fraction of ``dimension``, rounded half up, at least 1).
        dimension: number of candidates the layer offers (see :func:`candidate_count`).
        layer_name: module name, used in the error message.
        structure: 'row', 'column' or 'sparse', used in the error message.
        clamp: if True, a count larger than ``dimension`` is reduced to it instead of raising.

    Raises:
        SelectionError: k is larger than the dimension and ``clamp`` is False.
    """
    count = max(1, int(k * dimension + 0.5)) if isinstance(k, float) else int(k)
    if count > dimension:
        if clamp:
            return dimension
        unit = {"row": "rows", "column": "columns", "tap_column": "columns", "sparse": "entries per row"}[structure]
        raise SelectionError(
            f"k={k} is larger than layer {layer_name!r}, which has {dimension} {unit}. Use k <= {dimension}, a "
            f"fraction such as k=0.01, set clamp_k=True, or exclude the layer with exclude_modules=['{layer_name}']."
        )
    return count


def _reduce_columns(score: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum a ``[out, in/groups, ...]`` score to one value per global input channel, shape ``[in]``."""
    out_features, in_per_group = score.shape[0], score.shape[1]
    per_tap = score.reshape(out_features, in_per_group, -1).sum(-1)
    return per_tap.reshape(groups, out_features // groups, in_per_group).sum(1).reshape(-1)


def _top_k_sorted(values: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest values along the last dim, ties to the lower index, ascending."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :count]
    return torch.sort(order, dim=-1).values


def choose_indices(
    score: torch.Tensor,
    structure: str,
    k: int | float,
    *,
    groups: int = 1,
    layer_name: str = "<layer>",
    clamp: bool = False,
) -> torch.Tensor:
    """Choose the k best rows, columns or per-row entries of one weight.

    Args:
        score: per-parameter importance, the weight's shape ``[out, in/groups, *kernel]``.
        structure: 'row', 'column' or 'sparse'.
        k: a count or a fraction, see :func:`resolve_k`.
        groups: the convolution's ``groups`` (1 for linear layers).
        layer_name: module name for error messages.
        clamp: clamp k to the dimension instead of raising.

    Returns:
        int64 indices, ascending: ``[k]`` output rows (row), ``[k]`` global input channels (column), ``[k]``
        columns of the ``[out, in/groups*kh*kw]`` view (tap_column), or ``[out, k]`` flat positions within
        each row of that view (sparse).

    Raises:
        SelectionError: k does not fit the layer, or a score is NaN or infinite.
    """
    count = resolve_k(k, candidate_count(score.shape, structure, groups), layer_name, structure, clamp)
    finite = torch.isfinite(score.detach())
    if not bool(finite.all()):
        raise SelectionError(
            f"layer {layer_name!r}: {int((~finite).sum())} of its {score.numel()} scores are NaN or inf, so its "
            "top-k would be arbitrary. Check the data and the model's weights for NaN/inf, or select in fp32 "
            "(--no-amp).")
    values = score.detach().double()
    if structure == "row":
        return _top_k_sorted(values.reshape(values.shape[0], -1).sum(1), count)
    if structure == "column":
        return _top_k_sorted(_reduce_columns(values, groups), count)
    if structure == "tap_column":
        return _top_k_sorted(values.reshape(values.shape[0], -1).sum(0), count)
    return _top_k_sorted(values.reshape(values.shape[0], -1), count)
