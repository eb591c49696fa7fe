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
sparse     fp32: ``y = x (W + scatter(delta))^T + b``, the       ``x``
           frozen layer's own GEMM on a copy of ``W`` with
           the k entries per row added; otherwise ``y_o +=
           sum_j x[..., idx[o, j]] delta[o, j]`` slot by slot
=========  =================================================  ==========================================

and in the backward pass ``dx = gy W`` with the update's part added into the same tensor in place
(``addmm_`` / ``index_add_``; sparse in fp32: ``gy (W + scatter(delta))``, the copy made again), ``d delta``
for the chosen entries only (sparse: ``gy^T x`` sampled at them, ``torch.sparse.sampled_addmm``), and ``db =
sum gy``. What remains over the frozen layer alone cannot go: the update's own small matmuls (forward, ``dx``
and ``d delta``: ``3 x M x k x in`` multiply-adds for M rows; sparse: two copies of ``W`` and the sampled
product), the bias gradient's pass over ``gy``, and for rows and sparse the saved input, which ``d delta``
needs. The fp32 sparse form is exact at zero update (``W + 0``); with half-precision weights, autocast or
TF32 matmuls an entry below the weight's rounding step would vanish from ``W + delta``, so those keep the
gather form (nothing ``[..., out, k]`` kept: the gathered inputs are recomputed in the backward pass).

Mixed precision: like autocast, the backward pass computes in the dtype of the incoming gradient and casts
each gradient to the dtype of its input (fp32 masters get fp32 gradients). The frozen weight gets a
gradient only when it requires one (the mask schedules score a wrapped model through it).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["linear_rows", "linear_columns", "linear_sparse", "sparse_map", "patch_sparse"]

# torch marks CSR tensors as beta on every first use; the one made here is internal and checked by construction
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)
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


def _add_sparse(flat_y: torch.Tensor, flat_x: torch.Tensor, indices: torch.Tensor, delta: torch.Tensor) -> None:
    """``flat_y[:, o] += sum_j flat_x[:, indices[o, j]] * delta[o, j]``, in place, slot chunk by slot chunk."""
    out, slots = indices.shape
    step = _slot_step(len(flat_x), out)
    values = delta.to(flat_y.dtype)
    for start in range(0, slots, step):
        chunk = indices[:, start:start + step]  # [out, c]
        gathered = flat_x.index_select(1, chunk.reshape(-1)).view(len(flat_x), out, -1)
        flat_y.add_((gathered.to(flat_y.dtype) * values[:, start:start + step]).sum(-1))


def _sparse_grads(flat_gy: torch.Tensor, flat_x: torch.Tensor | None, indices: torch.Tensor, delta: torch.Tensor,
                  flat_grad_x: torch.Tensor | None, want_delta: bool) -> torch.Tensor | None:
    """Add the update's part of ``dx`` into ``flat_grad_x`` (if given); return ``d delta`` (if wanted)."""
    out, slots = indices.shape
    step = _slot_step(len(flat_gy), out)
    values = delta.to(flat_gy.dtype)
    grad_delta = torch.empty(delta.shape, dtype=flat_gy.dtype, device=flat_gy.device) if want_delta else None
    for start in range(0, slots, step):
        chunk = indices[:, start:start + step]
        if flat_grad_x is not None:
            contribution = flat_gy[:, :, None] * values[:, start:start + step]  # [rows, out, c]
            flat_grad_x.index_add_(1, chunk.reshape(-1), contribution.reshape(len(flat_gy), -1))
        if grad_delta is not None:
            gathered = flat_x.index_select(1, chunk.reshape(-1)).view(len(flat_gy), out, -1)
            grad_delta[:, start:start + step] = (gathered.to(flat_gy.dtype) * flat_gy[:, :, None]).sum(0)
    return grad_delta


def _folds(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The sparse entries can be added into a copy of the weight: fp32 throughout, no autocast, fp32 matmuls at
    full precision (in half precision, or TF32 / bf16 matmuls, an entry smaller than the weight's rounding step
    would vanish from the sum). Not under ``torch.compile``, which fuses the gather form and cannot trace the
    sparse product of the backward pass."""
    return (not torch.compiler.is_compiling() and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type) and torch.get_float32_matmul_precision() == "highest")


def _with_entries(weight: torch.Tensor, indices: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``weight + scatter(delta)``, a new tensor (the frozen weight itself is never written)."""
    return weight.clone().scatter_add_(1, indices, delta.to(weight.dtype))


def _sampled_grad(flat_gy: torch.Tensor, flat_x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``d delta[o, j] = sum over rows of gy[:, o] * x[:, indices[o, j]]`` (``[out, k]``, gy's dtype): the product
    ``gy^T x`` sampled at the chosen entries only (an SDDMM, ``torch.sparse.sampled_addmm``), never dense."""
    out, count = indices.shape
    ordered, order = indices.sort(dim=1)  # CSR wants each row's columns ascending
    rows = torch.arange(0, out * count + 1, count, device=indices.device)
    pattern = torch.sparse_csr_tensor(rows, ordered.reshape(-1), flat_gy.new_zeros(out * count),
                                      (out, flat_x.shape[1]), check_invariants=False)  # valid by construction
    values = torch.sparse.sampled_addmm(pattern, flat_gy.t(), flat_x.to(flat_gy.dtype), beta=0.0).values()
    return torch.empty_like(values.view(out, count)).scatter_(1, order, values.view(out, count))


class _LinearSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, indices, delta):
        _save(ctx, (x, weight, bias, indices, delta), x if _needs_x(ctx) else None, weight, indices, delta)
        ctx.fold = _folds(x, weight)
        if ctx.fold:  # the GEMM the frozen layer runs anyway, on a copy of the weight with the entries added
            return F.linear(x, _with_entries(weight, indices, delta), bias)
        y = F.linear(x, weight, bias)
        _add_sparse(_flat(y), _flat(x), indices, delta)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, indices, delta = ctx.saved_tensors
        if not ctx.fold:
            grad_x, grad_weight, grad_bias = _frozen_parts(ctx, gy, weight, x)
            grad_delta = _sparse_grads(_flat(gy), None if x is None else _flat(x), indices, delta,
                                       None if grad_x is None else _flat(grad_x), ctx.needs_input_grad[4])
            return _cast_to(ctx, (grad_x, grad_weight, grad_bias, None, grad_delta))
        grad_x = gy.matmul(_with_entries(weight, indices, delta)) if ctx.needs_input_grad[0] else None
        grad_weight = _flat(gy).t().mm(_flat(x)) if ctx.needs_input_grad[1] else None
        grad_bias = _flat(gy).sum(0) if ctx.needs_input_grad[2] else None
        grad_delta = _sampled_grad(_flat(gy), _flat(x), indices) if ctx.needs_input_grad[4] else None
        return _cast_to(ctx, (grad_x, grad_weight, grad_bias, None, grad_delta))


class _SparseMap(torch.autograd.Function):
    """The sparse update's contribution alone, ``[..., out]`` (added to an output computed elsewhere: a mixed
    batch's shared base output, a quantized layer's own output). Saves ``x`` only, like the fused layer."""

    @staticmethod
    def forward(ctx, x, indices, delta):
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, indices, delta)
        ctx.input_dtypes, ctx.input_shape = [x.dtype, None, delta.dtype], x.shape
        flat_x = _flat(x)
        flat_y = flat_x.new_zeros(len(flat_x), indices.shape[0], dtype=torch.promote_types(x.dtype, delta.dtype))
        _add_sparse(flat_y, flat_x, indices, delta)
        return flat_y.view(*x.shape[:-1], indices.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x, indices, delta = ctx.saved_tensors
        flat_gy = _flat(gy)
        flat_grad_x = flat_gy.new_zeros(len(flat_gy), ctx.input_shape[-1]) if ctx.needs_input_grad[0] else None
        grad_delta = _sparse_grads(flat_gy, None if x is None else _flat(x), indices, delta, flat_grad_x,
                                   ctx.needs_input_grad[2])
        grad_x = None if flat_grad_x is None else flat_grad_x.view(ctx.input_shape)
        return tuple(None if g is None else g.to(t) for g, t in zip((grad_x, None, grad_delta), ctx.input_dtypes))


def _patches(x: torch.Tensor, kernel: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N * rows * cols, C * kh * kw]``: the non-overlapping kernel-sized patches of a
    ``rows x cols`` grid, each flattened as a convolution weight's ``[C, kh, kw]``."""
    (kh, kw), (rows, cols) = kernel, grid
    n, channels = x.shape[:2]
    patches = x[:, :, :rows * kh, :cols * kw].reshape(n, channels, rows, kh, cols, kw)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(n * rows * cols, channels * kh * kw)


class _PatchSparse(torch.autograd.Function):
    """The sparse update of a patchifying convolution (stride = kernel): ``[N, out, rows, cols]``.

    Saves the image itself (which the frozen convolution beside it saves too), not a patch-ordered copy.
    """

    @staticmethod
    def forward(ctx, x, indices, delta, kernel, grid):
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, indices, delta)
        ctx.geometry, ctx.image_shape, ctx.input_dtypes = (kernel, grid), x.shape, [x.dtype, None, delta.dtype]
        flat_x = _patches(x, kernel, grid)
        flat_y = flat_x.new_zeros(len(flat_x), indices.shape[0], dtype=torch.promote_types(x.dtype, delta.dtype))
        _add_sparse(flat_y, flat_x, indices, delta)
        return flat_y.view(x.shape[0], grid[0] * grid[1], -1).transpose(1, 2).reshape(x.shape[0], -1, *grid)

    @staticmethod
    def backward(ctx, gy):
        x, indices, delta = ctx.saved_tensors
        kernel, grid = ctx.geometry
        flat_gy = gy.flatten(2).transpose(1, 2).reshape(-1, gy.shape[1])
        flat_grad_x = None
        if ctx.needs_input_grad[0]:
            flat_grad_x = flat_gy.new_zeros(len(flat_gy), ctx.image_shape[1] * kernel[0] * kernel[1])
        grad_delta = _sparse_grads(flat_gy, None if x is None else _patches(x, kernel, grid), indices, delta,
                                   flat_grad_x, ctx.needs_input_grad[2])
        grad_x = None
        if flat_grad_x is not None:  # the patches back into the image (entries outside every patch get 0)
            n, channels, height, width = ctx.image_shape
            (kh, kw), (rows, cols) = kernel, grid
            grad_x = flat_grad_x.new_zeros(ctx.image_shape)
            grad_x[:, :, :rows * kh, :cols * kw] = flat_grad_x.view(n, rows, cols, channels, kh, kw) \
                .permute(0, 3, 1, 4, 2, 5).reshape(n, channels, rows * kh, cols * kw)
        grads = (grad_x, None, grad_delta)
        return (*(None if g is None else g.to(t) for g, t in zip(grads, ctx.input_dtypes)), None, None)


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


def sparse_map(x: torch.Tensor, indices: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """For every output o, ``sum_j x[..., indices[o, j]] * delta[o, j]``: ``[..., out]`` (indices and delta
    ``[out, k]``), nothing ``[..., out, k]`` kept for the backward pass."""
    return _SparseMap.apply(x, indices, delta)


def patch_sparse(x: torch.Tensor, indices: torch.Tensor, delta: torch.Tensor, kernel: tuple[int, int],
                 grid: tuple[int, int]) -> torch.Tensor:
    """The sparse update of a convolution with stride = kernel, applied to image ``x`` ``[N, C, H, W]``:
    ``[N, out, rows, cols]``, each output position the sparse linear map of its patch (indices and delta
    ``[out, k]`` over the patch flattened as ``[C, kh, kw]``)."""
    return _PatchSparse.apply(x, indices, delta, tuple(kernel), tuple(grid))
