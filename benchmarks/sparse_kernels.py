"""The sparse structure's layer step, one formulation after another: what was tried to bring grft-sparse to the floor.

One frozen linear layer, ``x`` ``[rows, in]`` times ``W`` ``[out, in]``, with an update of k chosen entries per
output row (``indices`` and ``delta`` ``[out, k]``). Every formulation computes the same three things — the output
``y = x (W + S)^T`` (``S`` the k entries per row), the input gradient ``dx = gy (W + S)`` and the entries' gradient
``d delta[o, j] = sum_r gy[r, o] x[r, indices[o, j]]`` — and is timed for forward + backward:

=============  ==================================================================================================
formulation    how
=============  ==================================================================================================
``floor``      the frozen layer alone: ``F.linear``, backward to ``x`` only (no update)
``rows``       ``grft_vision``'s row update at the same k (``linear_rows``): the structured reference
``gather``     round 2's form: ``x[:, indices]`` gathered as a ``[rows, out * k]`` block, multiplied and summed;
               the backward gathers it again for ``d delta`` and ``index_add_`` s ``gy * delta`` into ``dx``
``csr``        ``S`` as a CSR matrix: ``y = x W^T + (S x^T)^T`` and ``dx = gy W + (S^T gy^T)^T``
               (``torch.sparse.mm``), ``d delta`` sampled (as ``library``)
``dense-grad`` ``W + S`` folded into one GEMM for ``y`` and ``dx``; ``d delta`` picked out of the whole weight
               gradient ``gy^T x`` (a full fine-tuning GEMM)
``library``    what ``grft_vision`` does in fp32 (``linear_sparse``): the fold for ``y`` and ``dx``, ``d delta`` as
               ``gy^T x`` sampled at the chosen entries only (``torch.sparse.sampled_addmm``)
=============  ==================================================================================================

``--check`` compares every formulation's ``y``, ``dx`` and ``d delta`` with a dense reference (autograd through
``x @ (W + S)^T`` with ``S`` a dense tensor) before timing. Times are the median over ``--repeats`` rounds, each
round running every formulation once in rotating order (as ``step_cost.py`` does), wall-clock milliseconds::

    python benchmarks/sparse_kernels.py --markdown sparse_kernels.md    # ViT-B/16 qkv at batch 8, k = 1, 4, 15

The default shape is ViT-B/16's ``qkv`` at batch 8 (1576 tokens, 768 -> 2304); ``--shape ROWS IN OUT`` sets another.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

# the library's own sampled product and weight copy, so that the alternatives differ from it only where they say
from grft_vision.tuner.fused import _sampled_grad, _with_entries, linear_rows, linear_sparse

__all__ = ["FORMULATIONS", "measure", "to_markdown", "main"]

warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, indices, delta):
        ctx.save_for_backward(x, weight, indices, delta)
        out, k = indices.shape
        gathered = x.index_select(1, indices.reshape(-1)).view(len(x), out, k)
        return F.linear(x, weight) + (gathered * delta).sum(-1)

    @staticmethod
    def backward(ctx, gy):
        x, weight, indices, delta = ctx.saved_tensors
        out, k = indices.shape
        grad_x = gy.mm(weight)
        grad_x.index_add_(1, indices.reshape(-1), (gy[:, :, None] * delta).reshape(len(gy), -1))
        gathered = x.index_select(1, indices.reshape(-1)).view(len(x), out, k)
        return grad_x, None, None, (gathered * gy[:, :, None]).sum(0)


class _Csr(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, indices, delta):
        out, k = indices.shape
        ordered, order = indices.sort(dim=1)
        matrix = torch.sparse_csr_tensor(torch.arange(0, out * k + 1, k), ordered.reshape(-1),
                                         delta.gather(1, order).reshape(-1), weight.shape, check_invariants=False)
        ctx.save_for_backward(x, weight, indices)
        ctx.matrix = matrix
        return F.linear(x, weight) + torch.sparse.mm(matrix, x.t()).t()

    @staticmethod
    def backward(ctx, gy):
        x, weight, indices = ctx.saved_tensors
        grad_x = gy.mm(weight) + torch.sparse.mm(ctx.matrix.t(), gy.t()).t()
        return grad_x, None, None, _sampled_grad(gy, x, indices)


class _DenseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, indices, delta):
        ctx.save_for_backward(x, weight, indices, delta)
        return F.linear(x, _with_entries(weight, indices, delta))

    @staticmethod
    def backward(ctx, gy):
        x, weight, indices, delta = ctx.saved_tensors
        grad_x = gy.mm(_with_entries(weight, indices, delta))
        return grad_x, None, None, gy.t().mm(x).gather(1, indices)


FORMULATIONS: dict[str, Step] = {
    "floor": lambda x, weight, indices, delta: F.linear(x, weight),
    "rows": lambda x, weight, indices, delta: linear_rows(  # k rows, their own [k, in] update
        x, weight, None, torch.arange(indices.shape[1]), x.new_zeros(indices.shape[1], x.shape[1], requires_grad=True)),
    "gather": _Gather.apply,
    "csr": _Csr.apply,
    "dense-grad": _DenseGrad.apply,
    "library": lambda x, weight, indices, delta: linear_sparse(x, weight, None, indices, delta),
}


def _problem(rows: int, fan_in: int, fan_out: int, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    indices = torch.rand(fan_out, fan_in, generator=generator).topk(k, dim=1).indices
    return {"x": torch.randn(rows, fan_in, generator=generator),
            "weight": torch.randn(fan_out, fan_in, generator=generator) / fan_in ** 0.5,
            "indices": indices, "delta": torch.randn(fan_out, k, generator=generator) * 0.01,
            "gy": torch.randn(rows, fan_out, generator=generator)}


def _run(name: str, problem: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x = problem["x"].clone().requires_grad_(True)
    delta = problem["delta"].clone().requires_grad_(name != "floor")
    y = FORMULATIONS[name](x, problem["weight"], problem["indices"], delta)
    y.backward(problem["gy"])
    return y.detach(), x.grad, delta.grad


def check(problem: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest absolute difference of each sparse formulation's ``y``, ``dx`` and ``d delta`` from the dense
    reference, relative to the reference's largest value."""
    x = problem["x"].clone().requires_grad_(True)
    delta = problem["delta"].clone().requires_grad_(True)
    dense = torch.zeros_like(problem["weight"]).scatter(1, problem["indices"], delta)
    y = x.mm((problem["weight"] + dense).t())
    y.backward(problem["gy"])
    reference = (y.detach(), x.grad, delta.grad)
    errors = {}
    for name in ("gather", "csr", "dense-grad", "library"):
        got = _run(name, problem)
        errors[name] = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, reference))
    return errors


def measure(shape: Sequence[int], ks: Sequence[int], repeats: int = 7, warmup: int = 2,
            names: Sequence[str] = tuple(FORMULATIONS)) -> list[dict[str, Any]]:
    """Median wall-clock milliseconds of forward + backward per formulation and k, and the ratio to ``floor``."""
    rows_out = []
    for k in ks:
        problem = _problem(*shape, k)
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(warmup + repeats):
            shift = round_index % len(names)
            for name in list(names[shift:]) + list(names[:shift]):
                start = time.perf_counter()
                _run(name, problem)
                if round_index >= warmup:
                    times[name].append(1000 * (time.perf_counter() - start))
        floor = statistics.median(times["floor"]) if "floor" in times else None
        for name in names:
            ms = statistics.median(times[name])
            rows_out.append({"formulation": name, "k": k, "ms": ms, "vs_floor": ms / floor if floor else None})
    return rows_out


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    ks = sorted({row["k"] for row in rows})
    names = list(dict.fromkeys(row["formulation"] for row in rows))
    by = {(row["formulation"], row["k"]): row for row in rows}
    head = "| formulation | " + " | ".join(f"k = {k}: ms | × floor" for k in ks) + " |"
    lines = [f"one linear layer, x [{meta['shape'][0]}, {meta['shape'][1]}] -> {meta['shape'][2]} outputs, fp32, "
             f"{meta['threads']} torch thread(s), median wall-clock ms of forward + backward over {meta['repeats']} "
             f"rounds; torch {meta['torch']}", "", head,
             "|---|" + "---:|---:|" * len(ks)]
    for name in names:
        cells = [f"{by[name, k]['ms']:.1f} | {by[name, k]['vs_floor']:.2f}" for k in ks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs=3, type=int, default=(1576, 768, 2304), metavar=("ROWS", "IN", "OUT"))
    parser.add_argument("--ks", nargs="+", type=int, default=(1, 4, 15))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, help="everything as JSON")
    parser.add_argument("--markdown", type=Path, help="the markdown table")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    errors = {k: check(_problem(*args.shape, k)) for k in args.ks}
    worst = max(max(by_name.values()) for by_name in errors.values())
    if worst > 1e-4:
        print(f"a formulation disagrees with the dense reference (relative error {worst:.2e}): {errors}",
              file=sys.stderr)
        return 1
    rows = measure(args.shape, args.ks, args.repeats, args.warmup)
    meta = {"shape": list(args.shape), "threads": torch.get_num_threads(), "repeats": args.repeats,
            "torch": torch.__version__, "max_relative_error": worst}
    text = to_markdown(rows, meta)
    print(text)
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows, "errors": errors}, indent=1))
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
