"""One behavioural test matrix: every tiny architecture family x every structure (PEFT style).

Each case checks the core promises: exact output at zero update, update gradients equal to the
matching slice of the dense gradient, only the chosen entries change after an optimizer step, merged
equals wrapped, and an adapter round trip reproduces the outputs exactly.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import images, make_model, random_scores
from grft_vision import GRFTConfig, apply_grft, load_adapter, merge_grft, save_adapter
from grft_vision.tuner.anatomy import grft_layers

# structure name -> config fields; "tap_column" is a column of the [out, in*kh*kw] view of conv weights
STRUCTURES = ["row", "column", "sparse", "tap_column"]
CONFIGS = {"row": {"structure": "row"}, "column": {"structure": "column"}, "sparse": {"structure": "sparse"},
           "tap_column": {"structure": "column", "conv_columns": "tap"}}


def chosen_mask(layer) -> torch.Tensor:
    """Independent oracle: the boolean mask of weight entries a wrapper may change, from its indices."""
    weight = layer.base_layer.weight
    mask = torch.zeros(weight.shape, dtype=torch.bool)
    indices = layer.indices.cpu()
    if layer.structure == "row":
        mask[indices] = True
    elif layer.structure == "sparse":
        mask.view(weight.shape[0], -1).scatter_(1, indices, True)
    elif layer.structure == "tap_column":
        mask.view(weight.shape[0], -1)[:, indices] = True
    else:
        groups = getattr(layer.base_layer, "groups", 1)
        out_per_group, in_per_group = weight.shape[0] // groups, weight.shape[1]
        for channel in indices.tolist():
            group, local = divmod(channel, in_per_group)
            mask[group * out_per_group:(group + 1) * out_per_group, local] = True
    return mask


def scatter_values(layer, values: torch.Tensor) -> torch.Tensor:
    """Dense weight-shaped tensor holding ``values`` (delta's layout) at the chosen entries."""
    with torch.no_grad():
        saved = layer.delta.detach().clone()
        layer.delta.copy_(values)
        dense = layer.delta_weight().clone()
        layer.delta.copy_(saved)
    return dense


def wrap(name: str, structure: str, k: int = 2):
    original = make_model(name)
    wrapped = apply_grft(copy.deepcopy(original), random_scores(original), GRFTConfig(**CONFIGS[structure], k=k))
    return original, wrapped


@pytest.mark.parametrize("structure", STRUCTURES)
def test_zero_update_is_exact(model_name, structure):
    original, wrapped = wrap(model_name, structure)
    x = images()
    torch.testing.assert_close(wrapped(x), original(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_update_gradient_is_dense_gradient_slice(model_name, structure):
    original, wrapped = wrap(model_name, structure)
    dense = copy.deepcopy(original).requires_grad_(True)
    x = images()
    projection = torch.randn(original(x).shape, generator=torch.Generator().manual_seed(3))
    (wrapped(x) * projection).sum().backward()
    (dense(x) * projection).sum().backward()
    layers = dict(grft_layers(wrapped))
    assert layers
    for name, layer in layers.items():
        dense_grad = dense.get_submodule(name).weight.grad
        expected = dense_grad * chosen_mask(layer)
        torch.testing.assert_close(scatter_values(layer, layer.delta.grad), expected, atol=1e-5, rtol=1e-4,
                                   msg=f"{name}: update gradient differs from the dense gradient slice")
        torch.testing.assert_close(layer.extract(dense_grad), layer.delta.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_step_changes_only_chosen_entries_and_merge_matches(model_name, structure, tmp_path):
    original, wrapped = wrap(model_name, structure)
    x = images()
    optimizer = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    projection = torch.randn(original(x).shape, generator=torch.Generator().manual_seed(3))
    for _ in range(2):  # two steps: some heads (Mixer) start at zero, blocking backbone gradients at step 1
        optimizer.zero_grad()
        (wrapped(x) * projection).sum().backward()
        optimizer.step()
    expected = wrapped(x)
    masks = {name: chosen_mask(layer) for name, layer in grft_layers(wrapped)}
    # Adam moves an entry by ~lr unless its gradients are far below eps (then the step rounds away in fp32)
    gradients = {name: optimizer.state[layer.delta]["exp_avg_sq"] > 1e-12 for name, layer in grft_layers(wrapped)}

    adapter = save_adapter(wrapped, tmp_path / "adapter.safetensors")
    reloaded = load_adapter(copy.deepcopy(original), adapter)
    assert torch.equal(reloaded(x), expected), "adapter round trip must reproduce the outputs exactly"

    merged = merge_grft(copy.deepcopy(wrapped))
    assert not any(True for _ in grft_layers(merged))
    assert list(merged.state_dict()) == list(original.state_dict())
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    total_changed = 0
    for name, mask in masks.items():
        changed = merged.get_submodule(name).weight != original.get_submodule(name).weight
        assert not (changed & ~mask).any(), f"{name}: entries outside the selection changed"
        must_move = scatter_values(dict(grft_layers(wrapped))[name], gradients[name].float()) > 0
        assert not (must_move & ~changed).any(), f"{name}: a chosen entry with a gradient did not change"
        total_changed += int(changed.sum())
    assert total_changed > 0


@pytest.mark.parametrize("structure", STRUCTURES)
def test_frozen_weights_get_no_gradient_and_no_optimizer_state(model_name, structure):
    _, wrapped = wrap(model_name, structure)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    wrapped(images()).sum().backward()
    optimizer.step()
    for name, param in wrapped.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, f"frozen {name} received a gradient"
    state_numel = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in optimizer.state.values())
    assert state_numel == 2 * sum(p.numel() for p in trainable)
    for _, layer in grft_layers(wrapped):
        assert not layer.base_layer.weight.requires_grad
        assert layer.delta.numel() == int(chosen_mask(layer).sum())  # exactly the chosen entries, no dense copy
