"""FLOPs of a training step or a forward pass, from ``torch.utils.flop_counter``.

The counter knows matmul, convolution and attention kernels only (elementwise ops, norms, gathers and the
optimizer count 0). PyTorch counts its CPU flash-attention kernels as 0; :func:`flop_counter` registers
PyTorch's own SDPA formulas for them, so attention counts on the CPU as it does on CUDA.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["flop_counter", "op_counts", "inference_flops"]


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> FlopCounterMode:
    """A silent flop counter that also knows the CPU flash-attention kernels (torch counts them as 0)."""
    mapping = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flops),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward_flops)):
        if hasattr(torch.ops.aten, name):
            mapping[getattr(torch.ops.aten, name)] = formula
    return FlopCounterMode(display=False, custom_mapping=mapping)


def op_counts(counter: FlopCounterMode) -> dict[str, int]:
    """FLOPs per operator (``{'aten.mm': ...}``) of everything ``counter`` counted."""
    return {str(op): int(count) for op, count in counter.get_flop_counts().get("Global", {}).items()}


def inference_flops(model: nn.Module, images: torch.Tensor) -> tuple[int, dict[str, int]]:
    """FLOPs (total and per operator) of one eval-mode forward pass of ``images`` ``[N, 3, H, W]`` without
    autograd; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), flop_counter() as counter:
        model(images)
    model.train(was_training)
    return int(counter.get_total_flops()), op_counts(counter)
