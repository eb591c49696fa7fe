"""Gradients of quantized weights, which cannot hold one: a *probe* per layer receives ``dL/dW``.

A bitsandbytes layer's weight is packed integer codes; autograd gives it no gradient. The gradient GRFT scores
is that of the weight the layer computes with, ``W = dequantize(codes)``: for ``y = x W^T + b`` it is
``dL/dW = sum over rows of gy^T x`` (``gy`` ``[..., out]``, ``x`` ``[..., in]``). A forward hook on the layer
passes its output through :class:`_WeightGradient`, an identity in the forward pass whose backward pass hands
``gy`` on unchanged and gives ``gy^T x`` (fp32) to a zero *probe* tensor of the weight's logical shape. The
probe is a leaf that requires grad, so everything the scores do with a weight's gradient — sum it over
batches in ``.grad``, take per-sample gradients with ``torch.autograd.grad`` — works on it unchanged, and the
quantized model computes exactly as it does without probes. No dense copy of the weight is made; each probe
holds the fp32 gradient of one weight, as a full-precision weight's ``.grad`` would.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..tuner.quantized import weight_shape

__all__ = ["weight_probes"]


class _WeightGradient(torch.autograd.Function):
    """``output`` unchanged; backward: ``d probe = gy^T x`` over every leading dimension, fp32."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, x: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor | None]:
        (x,) = ctx.saved_tensors
        grad_probe = None
        if ctx.needs_input_grad[2]:
            flat_gy = grad_output.reshape(-1, grad_output.shape[-1]).float()
            grad_probe = flat_gy.t().mm(x.reshape(-1, x.shape[-1]).float())
        return grad_output, None, grad_probe


def _probe_hook(probe: torch.Tensor):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not (probe.requires_grad and torch.is_grad_enabled()):
            return output
        return _WeightGradient.apply(output, args[0], probe)

    return hook


@contextmanager
def weight_probes(layers: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the context, ``{name: probe}``: a zero fp32 tensor ``[out, in]`` per layer whose gradient (when it
    requires grad) is the gradient of the layer's dequantized weight. The hooks are removed on exit."""
    probes, handles = {}, []
    try:
        for name, layer in layers.items():
            device = next(layer.parameters()).device
            probes[name] = torch.zeros(weight_shape(layer), dtype=torch.float32, device=device)
            handles.append(layer.register_forward_hook(_probe_hook(probes[name])))
        yield probes
    finally:
        for handle in handles:
            handle.remove()
