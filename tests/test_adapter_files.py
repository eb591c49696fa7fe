"""Adapter files are validated on load: every corruption or edit is refused with the adapter error, and the
backbone fingerprint tells a different backbone from the same one in another dtype."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import images, make_model, random_scores
from grft_vision import AdapterError, GRFTConfig, apply_grft, from_pretrained, load_adapter, save_adapter, save_pretrained
from grft_vision.tuner.anatomy import grft_layers

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained-looking ViT adapter file (column k=2), its model's outputs, and the pristine model."""
    original = make_model("vit")
    model = apply_grft(copy.deepcopy(original), random_scores(original), GRFTConfig(structure="column", k=2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in grft_layers(model):
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=generator) * 0.05)
        model.head.bias.add_(0.3)
    path = save_adapter(model, tmp_path_factory.mktemp("adapter") / "a.safetensors")
    with torch.no_grad():
        return path, model(images()), original


def _edited(path: Path, tmp_path: Path, *, tensors=None, metadata=None) -> Path:
    """A copy of the adapter at ``path`` with some tensors and metadata replaced (None values delete)."""
    with safe_open(str(path), framework="pt") as handle:
        old_metadata = handle.metadata()
    new_tensors = {**load_file(str(path)), **(tensors or {})}
    new_metadata = {**old_metadata, **(metadata or {})}
    target = tmp_path / "edited.safetensors"
    save_file({k: v for k, v in new_tensors.items() if v is not None}, str(target),
              metadata={k: v for k, v in new_metadata.items() if v is not None})
    return target


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


QKV = "blocks.0.attn.qkv"


@pytest.mark.parametrize("tensors, message", [
    ({"head.bias": torch.tensor(1.0)}, r"'head.bias' has shape \[\] .* the model's is \[5\]"),
    ({"head.weight": torch.zeros(7, 192)}, r"head tensors disagree on the number of classes \(\[5, 7\]\)"),
    ({f"{QKV}.grft_indices": torch.tensor([0, 200], dtype=torch.int32)}, r"indices of layer .*qkv.* outside \[0, 192\)"),
    ({f"{QKV}.grft_indices": torch.tensor([-1, 3], dtype=torch.int32)}, r"outside \[0, 192\)"),
    ({f"{QKV}.grft_indices": torch.tensor([3, 3], dtype=torch.int32)}, r"holds duplicates"),
    ({f"{QKV}.grft_indices": torch.tensor([[3, 4]], dtype=torch.int32)}, r"2 dimensions \(expected int, 1\)"),
    ({f"{QKV}.grft_delta": torch.zeros(576, 3)}, r"'blocks.0.attn.qkv.grft_delta' has shape \[576, 3\].*\[576, 2\]"),
    ({f"{QKV}.grft_delta": None}, r"lacks 'blocks.0.attn.qkv.grft_delta'"),
    ({f"{QKV}.grft_bias_delta": torch.zeros(5)}, r"grft_bias_delta' has shape \[5\]"),
    ({"blocks.0.norm1.weight": torch.ones(192)}, r"tensors this model and config have no place for.*norm1.weight"),
    ({"head.weight": None}, r"lacks 'head.weight', which its config trains"),
    ({f"{QKV}.grft_frozen_index": torch.tensor([5, 2]), f"{QKV}.grft_frozen_value": torch.ones(2)},
     r"sorted unique positions"),
])
def test_corrupted_tensors_are_refused(saved, tmp_path, tensors, message):
    path, _, original = saved
    with pytest.raises(AdapterError, match=message):
        load_adapter(copy.deepcopy(original), _edited(path, tmp_path, tensors=tensors))


@pytest.mark.parametrize("metadata, message", [
    ({"config": "{not json"}, r"'config' metadata is not valid JSON"),
    ({"config": json.dumps({"structure": "diagonal"})}, r"invalid config: structure='diagonal'"),
    ({"config": json.dumps(["row"])}, r"'config' metadata is a list, expected a dict"),
    ({"structures": json.dumps({QKV: "diagonal"})}, r"unknown layer structures"),
    ({"structures": None}, r"has no 'structures' metadata"),
    ({"base_model": json.dumps({"architecture": "vit"})}, r"base_model metadata lacks"),
    ({"format": "grft-adapter/9"}, r"not a GRFT adapter"),
])
def test_edited_metadata_is_refused(saved, tmp_path, metadata, message):
    path, _, original = saved
    with pytest.raises(AdapterError, match=message):
        load_adapter(copy.deepcopy(original), _edited(path, tmp_path, metadata=metadata))


def test_a_backbone_perturbed_by_one_percent_is_refused(saved):
    path, expected, original = saved
    for perturb in (lambda w: w.mul_(1.01),
                    lambda w: w.add_(0.01 * w.abs().mean() * torch.randn(w.shape, generator=torch.Generator()))):
        other = copy.deepcopy(original)
        with torch.no_grad():
            perturb(other.blocks[1].mlp.fc2.weight)
        with pytest.raises(AdapterError, match=r"different base weights: 1 tensor\(s\) differ.*blocks.1.mlp.fc2.weight"):
            load_adapter(other, path)
        assert load_adapter(other, path, check_weights=False)(images()).shape == expected.shape


def test_the_same_backbone_in_bfloat16_is_accepted(saved):
    path, expected, original = saved
    model = load_adapter(copy.deepcopy(original).to(torch.bfloat16), path)
    out = model(images().to(torch.bfloat16)).float()
    torch.testing.assert_close(out, expected, atol=0.15, rtol=0.05)


def test_a_directory_with_a_broken_config_is_refused(saved, tmp_path):
    path, expected, original = saved
    model = load_adapter(copy.deepcopy(original), path)
    save_pretrained(model, tmp_path / "dir")
    with torch.no_grad():
        assert torch.equal(from_pretrained(copy.deepcopy(original), tmp_path / "dir")(images()), expected)
    (tmp_path / "dir" / "adapter_config.json").write_text("{truncated")
    with pytest.raises(AdapterError, match="adapter_config.json.*Save the adapter again"):
        from_pretrained(copy.deepcopy(original), tmp_path / "dir")
    with pytest.raises(AdapterError, match="holds no adapter_config.json"):
        from_pretrained(copy.deepcopy(original), tmp_path / "nowhere")


def test_files_of_the_first_format_still_load():
    """A file written by grft-vision 0.1.0 before adapters owned their biases (full bias values, format 1)."""
    fixture = load_file(str(FIXTURES / "adapter_format1_base.safetensors"))
    model = make_model("sequential")
    model.load_state_dict({key.removeprefix("base."): value for key, value in fixture.items() if key.startswith("base.")})
    load_adapter(model, FIXTURES / "adapter_format1.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(fixture["input"]), fixture["output"], atol=1e-6, rtol=1e-6)
    assert _metadata(FIXTURES / "adapter_format1.safetensors")["format"] == "grft-adapter/1"


@pytest.mark.parametrize("fan_in, wanted", [(64, torch.int16), (40_000, torch.int32)])
def test_indices_are_stored_in_the_smallest_type_that_holds_them(tmp_path, fan_in, wanted):
    """Sparse indices are as many as its entries: int16 halves them where every index fits, int32 beyond."""
    original = torch.nn.Sequential(torch.nn.Linear(fan_in, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    scores = {"0.weight": torch.zeros(4, fan_in), "2.weight": torch.rand(3, 4)}
    scores["0.weight"][:, -1] = 1.0  # the last input, the largest index
    model = apply_grft(copy.deepcopy(original), scores, GRFTConfig(structure="sparse", k=1))
    with torch.no_grad():
        for _, layer in grft_layers(model):
            layer.delta.normal_()
    path = save_adapter(model, tmp_path / "a.safetensors")
    tensors = load_file(str(path))
    assert tensors["0.grft_indices"].dtype == wanted and int(tensors["0.grft_indices"].max()) == fan_in - 1
    assert tensors["2.grft_indices"].dtype == torch.int16
    loaded = load_adapter(copy.deepcopy(original), path)
    x = torch.randn(5, fan_in)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
