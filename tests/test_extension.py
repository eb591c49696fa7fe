"""A structure and a score added from outside the package, through the public registries, work end to end:
scores -> selection -> a training step changes only their entries -> adapter file round trip -> merge equals
the wrapped model -> a mixed batch beside a row adapter -> export to plain timm weights.

``BlockUpdate`` ("block"): k contiguous output rows, the window whose row scores sum highest. ``sqrt_abs``:
``sqrt(|g|)`` of the summed SupCon gradient. Neither needs an edit of any package file.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from conftest import IMG, NUM_CLASSES, images
from grft_vision import (AdapterError, ConfigError, GRFTConfig, apply_grft, disable_adapter, load_adapter,
                         merge_grft, mixed_adapters, save_adapter, set_adapter)
from grft_vision.io.export import export_merged
from grft_vision.selection.scores import SCORES, GradientScore, register_score
from grft_vision.tuner.layer import grft_layers
from grft_vision.tuner.structures import STRUCTURES, RowUpdate, register_structure


class BlockUpdate(RowUpdate):
    """k contiguous output rows (linear) or output channels (conv), chosen as the best window of row scores."""

    structure = "block"

    @classmethod
    def choose(cls, score: torch.Tensor, count: int, groups: int = 1) -> torch.Tensor:
        rows = cls.unit_scores(score, groups)
        if count == 0:
            return rows.new_zeros(0, dtype=torch.long)
        windows = rows.unfold(0, count, 1).sum(-1)
        start = int(torch.argmax(windows))  # the first best window
        return torch.arange(start, start + count)

    @classmethod
    def index_problem(cls, indices: torch.Tensor, weight_shape: tuple[int, ...], groups: int = 1) -> str | None:
        problem = super().index_problem(indices, weight_shape, groups)
        if problem is None and indices.numel() and bool((indices.diff() != 1).any()):
            return "is not one contiguous block"
        return problem


@pytest.fixture
def registered():
    register_structure(BlockUpdate)
    register_score(GradientScore("sqrt_abs", lambda g, theta, options: g.abs().sqrt()))
    yield
    STRUCTURES.unregister("block")
    SCORES.unregister("sqrt_abs")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, img_size=IMG,
                             depth=2).eval()


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(12, 3, IMG, IMG, generator=generator), torch.arange(12) % 3)
    return DataLoader(data, batch_size=6)


def _step(model: torch.nn.Module) -> None:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(images(4, seed=5))
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(6))).sum().backward()
    optimizer.step()
    model.eval()


def test_an_unregistered_structure_or_score_is_a_config_error():
    with pytest.raises(ConfigError, match="structure='block' is not known"):
        GRFTConfig(structure="block")
    with pytest.raises(ConfigError, match="score='sqrt_abs' is not known"):
        GRFTConfig(score="sqrt_abs")


def test_a_structure_and_a_score_registered_from_outside_work_end_to_end(registered, tmp_path):
    original = _model()
    model = copy.deepcopy(original)
    config = GRFTConfig(structure="block", k=3, score="sqrt_abs", selection_views=1, exclude_modules=["patch_embed*"])
    apply_grft(model, config=config, dataloader=_loader(), adapter_name="block", progress=False)
    layers = dict(grft_layers(model))
    for name, layer in layers.items():
        update = layer.grft_updates["block"]
        assert isinstance(update, BlockUpdate) and update.indices.diff().eq(1).all() and update.count == 3, name
    # the selection is the window of the highest summed sqrt(|g|) row scores (checked on the first layer)
    record = model.grft_state.selection.layers[0]
    assert record.structure == "block" and len(record.indices) == 3

    # a training step changes the block's rows only (and the head, biases: the adapter's own tensors)
    _step(model)
    x = images(3, seed=9)
    with torch.no_grad():
        wrapped = model(x)
    merged = merge_grft(copy.deepcopy(model))
    for name, layer in layers.items():
        changed = (merged.get_submodule(name).weight != original.get_submodule(name).weight).any(dim=-1)
        rows = set(layer.grft_updates["block"].indices.tolist())
        assert set(torch.nonzero(changed).flatten().tolist()) <= rows and changed.any(), name
    with torch.no_grad():
        torch.testing.assert_close(merged(x), wrapped, atol=1e-5, rtol=1e-5)

    # adapter file round trip, onto a fresh base
    path = save_adapter(model, tmp_path / "block.safetensors", adapter_name="block")
    reloaded = load_adapter(copy.deepcopy(original), path)
    with torch.no_grad():
        assert torch.equal(reloaded(x), wrapped)

    # beside a row adapter in one mixed batch
    apply_grft(model, scores={f"{n}.weight": torch.rand(l.base_layer.weight.shape) for n, l in layers.items()},
               config=GRFTConfig(structure="row", k=2, exclude_modules=["patch_embed*"]), adapter_name="rows")
    _step(model)
    names = ["block", "rows", None]
    expected = []
    for i, name in enumerate(names):
        if name is None:
            with disable_adapter(model), torch.no_grad():
                expected.append(model(x[i:i + 1]))
        else:
            set_adapter(model, name)
            with torch.no_grad():
                expected.append(model(x[i:i + 1]))
    with mixed_adapters(model, names), torch.no_grad():
        torch.testing.assert_close(model(x), torch.cat(expected), atol=1e-5, rtol=1e-5)

    # export to plain timm weights: adapter + base file -> a state dict timm loads strictly
    save_file(original.state_dict(), tmp_path / "base.safetensors")
    plain = export_merged(path, model="vit_tiny_patch16_224", model_kwargs={"img_size": IMG, "depth": 2},
                          base=str(tmp_path / "base.safetensors"))
    fresh = timm.create_model("vit_tiny_patch16_224", num_classes=NUM_CLASSES, img_size=IMG, depth=2).eval()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), wrapped, atol=1e-5, rtol=1e-5)


def test_a_registered_structure_validates_its_indices_when_loading(registered, tmp_path):
    model = _model()
    apply_grft(model, config=GRFTConfig(structure="block", k=2, score="random"))
    path = save_adapter(model, tmp_path / "a.safetensors")
    from safetensors.torch import load_file, save_file as save

    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    key = next(k for k in tensors if k.endswith(".grft_indices"))
    tensors[key] = torch.tensor([0, 2], dtype=torch.int32)  # valid rows, but not one block
    save(tensors, tmp_path / "b.safetensors", metadata=metadata)
    with pytest.raises(AdapterError, match="is not one contiguous block"):
        load_adapter(_model(), tmp_path / "b.safetensors")
