"""The fused autograd functions of wrapped linear layers against the reference formulation (standard ops).

The reference is the same computation written with ops autograd differentiates itself:
``update.add_to(F.linear(x, W, b), x)``. Values, every gradient (input, update, bias delta, and the frozen
weight when it requires grad, as during re-scoring), repeated calls, bf16 autocast, and what autograd keeps
for the backward pass.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import images, make_model, random_scores
from grft_vision import GRFTConfig, apply_grft
from grft_vision.tuner.layer import GRFTLinear, grft_layers

STRUCTURES = ["row", "column", "sparse"]
# the families with wrapped linear layers (the others hold convolutions only, besides their heads)
FAMILIES = ["beit_direct_weight", "deit", "mixer", "sequential", "swin", "vit"]


def _reference_forward(self, update, x, bias):
    return update.add_to(F.linear(x, self.base_layer.weight, bias), x)


def _trained_copy(family: str, structure: str, k: int = 2):
    model = make_model(family)
    apply_grft(model, random_scores(model), GRFTConfig(structure=structure, k=k, clamp_k=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in grft_layers(model):
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=generator) * 0.1)
            if layer.update.bias_delta is not None:
                layer.update.bias_delta.copy_(torch.randn(layer.update.bias_delta.shape, generator=generator) * 0.1)
    return model


def _outputs_and_grads(model, x, *, weight_grads: bool = False):
    x = x.clone().requires_grad_(True)
    for _, layer in grft_layers(model):
        layer.base_layer.weight.requires_grad_(weight_grads)
        layer.base_layer.weight.grad = None
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_linear_equals_the_reference(family, structure, monkeypatch):
    model = _trained_copy(family, structure)
    assert any(isinstance(layer, GRFTLinear) for _, layer in grft_layers(model))
    x = images(3, seed=2)
    fused = _outputs_and_grads(model, x, weight_grads=True)
    again = _outputs_and_grads(model, x, weight_grads=True)
    monkeypatch.setattr(GRFTLinear, "_update_forward", _reference_forward)
    reference = _outputs_and_grads(model, x, weight_grads=True)
    assert torch.equal(fused[0], again[0]) and all(torch.equal(fused[2][n], again[2][n]) for n in fused[2])
    torch.testing.assert_close(fused[0], reference[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1], reference[1], atol=1e-5, rtol=1e-5)
    assert fused[2].keys() == reference[2].keys()
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name], reference[2][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_fused_linear_under_bfloat16_autocast(structure, monkeypatch):
    model = _trained_copy("vit", structure)
    x = images(3, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _outputs_and_grads(model, x)
    monkeypatch.setattr(GRFTLinear, "_update_forward", _reference_forward)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = _outputs_and_grads(model, x)
    torch.testing.assert_close(fused[0].float(), reference[0].float(), atol=0.05, rtol=0.05)
    deltas = [name for name in fused[2] if name.endswith(".delta")]
    assert deltas and all(fused[2][name].dtype == torch.float32 for name in deltas)
    for name in deltas:
        scale = reference[2][name].abs().max() + 1e-6
        assert (fused[2][name] - reference[2][name]).abs().max() <= 0.05 * scale, name


def _saved_bytes(model, x) -> int:
    seen: dict[int, int] = {}
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x).sum().backward()
    return sum(seen.values())


def test_sparse_keeps_no_more_for_backward_than_rows():
    """GPS-style sparse updates used to keep a [rows, out, k] gather: now at most the layer input, like rows."""
    x = images(4, seed=2)
    saved = {structure: _saved_bytes(_trained_copy("vit", structure, k=4), x) for structure in STRUCTURES}
    assert saved["sparse"] <= saved["row"]
    assert saved["column"] <= saved["row"]


def test_sparse_chunks_of_slots_give_the_same_result(monkeypatch):
    """Large k is gathered in chunks of slots; the chunking does not change the values or gradients."""
    from grft_vision.tuner import fused

    model = _trained_copy("mixer", "sparse", k=5)
    x = images(2, seed=2)
    whole = _outputs_and_grads(model, x)
    monkeypatch.setattr(fused, "_SLOT_BUDGET", 1)  # one slot at a time
    chunked = _outputs_and_grads(copy.deepcopy(model), x)
    torch.testing.assert_close(whole[0], chunked[0], atol=1e-6, rtol=1e-6)
    for name in whole[2]:
        torch.testing.assert_close(whole[2][name], chunked[2][name], atol=1e-6, rtol=1e-5)


def test_sparse_patch_embedding_equals_the_materialised_convolution(monkeypatch):
    """A ViT's patch embedding (stride = kernel) runs its sparse update over the patches; the convolution with
    the materialised weight is the reference, input gradient included."""
    from grft_vision.tuner.structures import SparseUpdate

    model = _trained_copy("vit", "sparse", k=3)
    layer = model.patch_embed.proj
    assert layer.update.has_channel_form(layer.geometry)
    x = images(3, seed=2)
    patches = _outputs_and_grads(model, x, weight_grads=True)
    monkeypatch.setattr(SparseUpdate, "has_channel_form", lambda self, geometry: False)
    materialised = _outputs_and_grads(model, x, weight_grads=True)
    torch.testing.assert_close(patches[0], materialised[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patches[1], materialised[1], atol=1e-5, rtol=1e-5)
    for name in patches[2]:
        torch.testing.assert_close(patches[2][name], materialised[2][name], atol=1e-5, rtol=1e-4, msg=name)
