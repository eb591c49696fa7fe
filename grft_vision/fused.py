"""One autograd node per wrapped linear layer: the frozen matmul and the update's small matmul together.

Composed from standard ops, a wrapped linear layer's training step costs more than the layer alone: the
input gradient is computed twice (``gy @ W`` by the base matmul, the update's part by its own matmul) and
added by autograd into a fresh ``[..., in]`` tensor, and the sparse structure's gather ``x[..., idx]`` is a
``[..., out, k]`` tensor that autograd keeps for the backward pass. The functions here compute, for an input
``x`` ``[..., in]``, a frozen weight ``W`` ``[out, in]``, a bias ``b`` ``[out]`` (the base bias plus the
adapter's bias delta, or None) and the adapter's ``delta``:

=========  =================================================  ==========================================
structure  forward                                            saved for backward (besides W, delta)
=========  =================================================  ==========================================
rows       ``y = x W^T + b``; ``y[..., idx] += x delta^T``    ``x`` (``d delta = gy[..., idx]^T x``)
columns    ``y = x W^T + b + x[..., idx] delta^T``            ``x[..., idx]``, ``[..., k]`` only
sparse     ``y_o = (x W^T + b)_o + sum_j x[..., idx[o, j]]    ``x``; the gathered inputs are recomputed
           delta[o, j]``, slot by slot, nothing ``[..., out,  slot by slot in the backward pass
           k]`` kept
=========  =================================================  ==========================================

and in the backward pass ``dx = gy W`` with the update's part added into the same tensor in place
(``addmm_`` / ``index_add_``), ``d delta`` for the chosen entries only, and ``db = sum gy``. What remains
over the frozen layer alone cannot go: the update's own small matmuls (forward, ``dx`` and ``d delta``:
``3 x M x k x in`` multiply-adds for M rows), the bias gradient's pass over ``gy``, and for rows and sparse
the saved input, which ``d delta`` needs.

Mixed precision: like autocast, the backward pass computes in the dtype of the incoming gradient and casts
each gradient to the dtype of its input (fp32 masters get fp32 gradients). The frozen weight gets a
gradient only when it requires one (the mask schedules score a wrapped model through it).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["linear_rows", "linear_columns", "linear_sparse"]

_SLOT_BUDGET = 1 << 22  # elements of the [rows, out, slots] block the sparse path gathers at once


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """``[..., d]`` as ``[rows, d]``."""
    return tensor.reshape(-1, tensor.shape[-1])


def _save(ctx: Any, inputs: tuple, *tensors: torch.Tensor | None) -> None:
    ctx.save_for_backward(*tensors)
    ctx.input_dtypes = [None if t is None else t.dtype for t in inputs]


def _frozen_parts(ctx: Any, gy: torch.Tensor, weight: torch.Tensor, x: torch.Tensor | None
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx = gy W, dW = gy^T x, db = sum gy)``, each only when its input needs it; in ``gy``'s dtype."""
    grad_x = gy.matmul(weight.to(gy.dtype)) if ctx.needs_input_grad[0] else None
    grad_weight = _flat(gy).t().mm(_flat(x).to(gy.dtype)) if ctx.needs_input_grad[1] else None
    grad_bias = _flat(gy).sum(0) if ctx.needs_input_grad[2] else None
    return grad_x, grad_weight, grad_bias


def _cast_to(ctx: Any, grads: tuple) -> tuple:
    """Each gradient in its input's dtype (as autocast's casts would give them)."""
    return tuple(None if g is None or dtype is None else g.to(dtype) for g, dtype in zip(grads, ctx.input_dtypes))


def _needs_x(ctx: Any) -> bool:
    return ctx.needs_input_grad[1] or ctx.needs_input_grad[4]


class _LinearRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, indices, delta):
        _save(ctx, (x, weight, bias, indices, delta), x if _needs_x(ctx) else None, weight, indices, delta)
        y = F.linear(x, weight, bias)
        return y.index_add_(-1, indices, F.linear(x, delta.to(x.dtype)).to(y.dtype))

    @staticmethod
    def backward(ctx, gy):
        x, weight, indices, delta = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _frozen_parts(ctx, gy, weight, x)
        chosen = gy.index_select(-1, indices)  # [..., k]
        if grad_x is not None:
            _flat(grad_x).addmm_(_flat(chosen), delta.to(gy.dtype))
        grad_delta = _flat(chosen).t().mm(_flat(x).to(gy.dtype)) if ctx.needs_input_grad[4] else None
        return _cast_to(ctx, (grad_x, grad_weight, grad_bias, None, grad_delta))


class _LinearColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, indices, delta):
        y = F.linear(x, weight, bias)
        chosen = x.index_select(-1, indices)  # [..., k]
        _flat(y).addmm_(_flat(chosen).to(y.dtype), delta.to(y.dtype).t())
        _save(ctx, (x, weight, bias, indices, delta), x if ctx.needs_input_grad[1] else None,
              chosen if ctx.needs_input_grad[4] else None, weight, indices, delta)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, chosen, weight, indices, delta = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _frozen_parts(ctx, gy, weight, x)
        if grad_x is not None:
            grad_x.index_add_(-1, indices, gy.matmul(delta.to(gy.dtype)))
        grad_delta = _flat(gy).t().mm(_flat(chosen).to(gy.dtype)) if ctx.needs_input_grad[4] else None
        return _cast_to(ctx, (grad_x, grad_weight, grad_bias, None, grad_delta))


def _slot_step(rows: int, out: int) -> int:
    """How many slots of ``indices`` the sparse path gathers at once (at most ``_SLOT_BUDGET`` elements)."""
    return max(1, _SLOT_BUDGET // max(rows * out, 1))


class _LinearSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, indices, delta):
        _save(ctx, (x, weight, bias, indices, delta), x if _needs_x(ctx) else None, weight, indices, delta)
        y = F.linear(x, weight, bias)
        flat_x, flat_y = _flat(x), _flat(y)
        out, slots = indices.shape
        step = _slot_step(len(flat_x), out)
        values = delta.to(y.dtype)
        for start in range(0, slots, step):
            chunk = indices[:, start:start + step]  # [out, c]
            gathered = flat_x.index_select(1, chunk.reshape(-1)).view(len(flat_x), out, -1)
            flat_y.add_((gathered.to(y.dtype) * values[:, start:start + step]).sum(-1))
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, indices, delta = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _frozen_parts(ctx, gy, weight, x)
        flat_gy = _flat(gy)
        out, slots = indices.shape
        step = _slot_step(len(flat_gy), out)
        values = delta.to(gy.dtype)
        grad_delta = torch.empty(delta.shape, dtype=gy.dtype, device=gy.device) if ctx.needs_input_grad[4] else None
        for start in range(0, slots, step):
            chunk = indices[:, start:start + step]
            if grad_x is not None:
                contribution = flat_gy[:, :, None] * values[:, start:start + step]  # [rows, out, c]
                _flat(grad_x).index_add_(1, chunk.reshape(-1), contribution.reshape(len(flat_gy), -1))
            if grad_delta is not None:
                gathered = _flat(x).index_select(1, chunk.reshape(-1)).view(len(flat_gy), out, -1)
                grad_delta[:, start:start + step] = (gathered.to(gy.dtype) * flat_gy[:, :, None]).sum(0)
        return _cast_to(ctx, (grad_x, grad_weight, grad_bias, None, grad_delta))


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor,
                delta: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` plus ``x @ delta^T`` added into outputs ``indices`` (delta ``[k, in]``)."""
    return _LinearRows.apply(x, weight, bias, indices, delta)


def linear_columns(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor,
                   delta: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias) + x[..., indices] @ delta^T`` (delta ``[out, k]``)."""
    return _LinearColumns.apply(x, weight, bias, indices, delta)


def linear_sparse(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor,
                  delta: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` plus, for every output o, ``sum_j x[..., indices[o, j]] * delta[o, j]``
    (indices and delta ``[out, k]``)."""
    return _LinearSparse.apply(x, weight, bias, indices, delta)
