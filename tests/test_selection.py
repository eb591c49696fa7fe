"""Selection: SupCon-gradient scores on the lowest-loss subset (GRFT Alg. 1, steps 1-5)."""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_model, random_scores
from grft_vision import ConfigError, GRFTConfig, SelectionError, apply_grft
from grft_vision.tuner.anatomy import grft_layers
from grft_vision.data import SyntheticImageDataset, TwoViews, contrastive_transform
from grft_vision.selection import SupConSelectionLoss, compute_scores, split_subsets
from grft_vision.selection.subsets import subset_loader

NUM_CLASSES = 4


class TinyNet(nn.Module):
    """A timm-like MLP: ``forward_features`` -> ``forward_head(pre_logits=True)`` gives 4-d features."""

    def __init__(self, in_features: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 8)
        self.fc2 = nn.Linear(8, 4)
        self.head = nn.Linear(4, NUM_CLASSES)

    def forward_features(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def forward_head(self, x, pre_logits: bool = False):
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def planted_data(n: int = 256, seed: int = 0, features: tuple[int, int] = (3, 7)) -> TensorDataset:
    """Inputs whose class is carried only by two features (two sign bits); the rest is small noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    x = 0.1 * torch.randn(n, 16, generator=generator)
    x[:, features[0]] += torch.where(labels % 2 == 1, 1.0, -1.0)
    x[:, features[1]] += torch.where(labels // 2 == 1, 1.0, -1.0)
    return TensorDataset(x, labels)


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


ONE_VIEW = dict(selection_views=1, selection_mode="eval")


def test_same_seed_same_indices_on_a_timm_vit():
    dataset = SyntheticImageDataset(num_classes=4, num_samples=32, image_size=32, seed=0)
    model = make_model("vit")
    dataset.transform = TwoViews(contrastive_transform({"input_size": (3, 32, 32)}))
    loader = DataLoader(dataset, batch_size=8)
    config = GRFTConfig(structure="row", k=2, num_subsets=2, selection_seed=7)
    first = apply_grft(copy.deepcopy(model), config=config, dataloader=loader, progress=False)
    second = apply_grft(copy.deepcopy(model), config=config, dataloader=loader, progress=False)
    for (name, a), (_, b) in zip(grft_layers(first), grft_layers(second)):
        assert torch.equal(a.indices, b.indices), name
    other = apply_grft(copy.deepcopy(model), config=GRFTConfig(structure="row", k=2, num_subsets=2, selection_seed=8),
                       dataloader=loader, progress=False)
    assert any(not torch.equal(a.indices, b.indices) for (_, a), (_, b) in zip(grft_layers(first), grft_layers(other)))


@pytest.mark.parametrize("features", [(3, 7), (0, 12), (5, 6)])
def test_planted_columns_are_found_wherever_they_are(features):
    """The chosen input columns follow the data: the two features that carry the class, wherever they are."""
    loader = DataLoader(planted_data(features=features), batch_size=32)
    model = apply_grft(tiny_net(), config=GRFTConfig(structure="column", k=2, **ONE_VIEW), dataloader=loader,
                       progress=False)
    assert model.fc1.indices.tolist() == sorted(features)


def test_planted_rows_are_found():
    net = tiny_net()
    with torch.no_grad():  # only hidden units 2 and 5 reach the features, and both are active
        keep = torch.zeros(8, dtype=torch.bool)
        keep[[2, 5]] = True
        net.fc2.weight[:, ~keep] = 0.0
        net.fc1.bias[keep] = 2.0
    model = apply_grft(net, config=GRFTConfig(structure="row", k=2, **ONE_VIEW),
                       dataloader=DataLoader(planted_data(), batch_size=32), progress=False)
    assert model.fc1.indices.tolist() == [2, 5]
    record = model.grft_state.selection.layers[0]
    assert record.name == "fc1" and record.chosen_share == pytest.approx(1.0) and record.rest_mean == 0.0


def brute_force_scores(model: TinyNet, batches, weights: list[str]) -> dict[str, torch.Tensor]:
    """Reference: each weight's gradient taken separately by autograd, batch by batch, summed, squared."""
    loss_fn = SupConSelectionLoss(0.07)
    sums = {name: torch.zeros_like(model.get_parameter(name)) for name in weights}
    for x, labels in batches:
        for name in weights:
            weight = model.get_parameter(name).detach().requires_grad_(True)
            loss = loss_fn(_pre_logits(model, name, weight, x), labels)
            sums[name] += torch.autograd.grad(loss, weight)[0]
    return {name: value.pow(2) for name, value in sums.items()}


def _pre_logits(model: TinyNet, name: str, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """TinyNet's features written out by hand, with ``weight`` in place of parameter ``name``."""
    fc1_w = weight if name == "fc1.weight" else model.fc1.weight.detach()
    fc2_w = weight if name == "fc2.weight" else model.fc2.weight.detach()
    hidden = torch.relu(nn.functional.linear(x, fc1_w, model.fc1.bias.detach()))
    return nn.functional.linear(hidden, fc2_w, model.fc2.bias.detach())


def test_scores_equal_brute_force_reference():
    data = planted_data(96, seed=3)
    batches = [(data.tensors[0][i:i + 32], data.tensors[1][i:i + 32]) for i in range(0, 96, 32)]
    model = tiny_net(seed=5)
    result = compute_scores(model, batches, GRFTConfig(**ONE_VIEW), progress=False)
    reference = brute_force_scores(model, batches, ["fc1.weight", "fc2.weight"])
    assert set(result.scores) == set(reference)
    for name, expected in reference.items():
        torch.testing.assert_close(result.scores[name], expected, rtol=1e-5, atol=1e-10)


def test_lowest_loss_subset_is_chosen_and_used():
    dataset = planted_data(120, seed=4)
    loader = DataLoader(dataset, batch_size=20)
    model = tiny_net(seed=2)
    config = GRFTConfig(num_subsets=3, selection_seed=11, **ONE_VIEW)
    result = compute_scores(model, loader, config, progress=False)
    assert len(result.subset_losses) == 3
    assert result.chosen_subset == min(range(3), key=result.subset_losses.__getitem__)
    subsets = split_subsets(len(dataset), 3, seed=11)
    assert sorted(torch.cat(subsets).tolist()) == list(range(120))  # a partition
    loss_fn = SupConSelectionLoss(0.07)
    with torch.no_grad():
        for index, subset in enumerate(subsets):
            batches = list(subset_loader(loader, subset, seed=11 + index))
            manual = sum(float(loss_fn(model.forward_features(x), y)) for x, y in batches) / len(batches)
            assert manual == pytest.approx(result.subset_losses[index], rel=1e-6)
    chosen_batches = list(subset_loader(loader, subsets[result.chosen_subset], seed=11 + result.chosen_subset))
    reference = brute_force_scores(model, chosen_batches, ["fc1.weight"])
    torch.testing.assert_close(result.scores["fc1.weight"], reference["fc1.weight"], rtol=1e-5, atol=1e-10)
    assert result.subset_size == len(subsets[result.chosen_subset])


def test_model_state_is_restored_after_selection():
    model = make_model("resnet")
    model.fc.weight.requires_grad_(False)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    torch.manual_seed(123)
    python_state = random.getstate()
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    images = torch.randn(8, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3] * 2)
    torch.manual_seed(123)
    compute_scores(model, [(images, labels)], GRFTConfig(selection_views=1), progress=False)
    assert torch.rand(1).item() == expected_draw.item()
    assert random.getstate() == python_state
    assert not model.training
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_selection_record_is_saved_as_json(tmp_path):
    model = apply_grft(tiny_net(), config=GRFTConfig(structure="sparse", k=2, num_subsets=2, **ONE_VIEW),
                       dataloader=DataLoader(planted_data(), batch_size=32), progress=False)
    record = model.grft_state.selection
    path = record.save_json(tmp_path / "selection.json")
    loaded = json.loads(path.read_text())
    assert loaded["num_subsets"] == 2 and len(loaded["subset_losses"]) == 2
    assert [layer["name"] for layer in loaded["layers"]] == ["fc1", "fc2"]
    assert len(loaded["layers"][0]["indices"]) == 8 and len(loaded["layers"][0]["indices"][0]) == 2
    assert "| fc1 |" in record.summary()


def test_loader_without_labels_is_a_clear_error():
    loader = DataLoader(TensorDataset(torch.randn(8, 16)), batch_size=4)
    with pytest.raises(SelectionError, match=r"needs labels.*\(images, labels\)"):
        compute_scores(tiny_net(), loader, GRFTConfig(**ONE_VIEW), progress=False)


def test_single_class_batch_is_a_clear_error():
    batches = [(torch.randn(8, 16), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(SelectionError, match="single class.*at least two classes.*class-balanced sampler"):
        compute_scores(tiny_net(), batches, GRFTConfig(**ONE_VIEW), progress=False)
    with pytest.raises(SelectionError, match="no two samples of the same class.*selection_views=2"):
        compute_scores(tiny_net(), [(torch.randn(4, 16), torch.arange(4))], GRFTConfig(**ONE_VIEW), progress=False)


def test_model_without_pre_logits_path_is_a_clear_error():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    batches = [(torch.randn(8, 16), torch.tensor([0, 1] * 4))]
    with pytest.raises(SelectionError, match="no pre-logits path.*feature_fn"):
        compute_scores(model, batches, GRFTConfig(**ONE_VIEW), progress=False)


def test_view_count_mismatch_is_a_clear_error():
    batches = [(torch.randn(8, 16), torch.tensor([0, 1] * 4))]
    with pytest.raises(SelectionError, match="expects 2 view.*yields 1.*TwoViews"):
        compute_scores(tiny_net(), batches, GRFTConfig(selection_views=2), progress=False)


def test_non_finite_loss_is_a_clear_error():
    x = torch.randn(8, 16)
    x[0, 0] = float("nan")
    with pytest.raises(SelectionError, match="not finite"):
        compute_scores(tiny_net(), [(x, torch.tensor([0, 1] * 4))], GRFTConfig(**ONE_VIEW), progress=False)


def test_scores_or_dataloader_exactly_one():
    with pytest.raises(ConfigError, match="score='grft' needs data: pass dataloader="):
        apply_grft(tiny_net())
    net = tiny_net()
    with pytest.raises(ConfigError, match="scores= or dataloader=, not both"):
        apply_grft(net, random_scores(net), dataloader=[])


@pytest.mark.parametrize("score", ["random", "magnitude", "synflow"])
def test_data_free_scores_need_no_loader(score):
    net = tiny_net()
    apply_grft(net, config=GRFTConfig(score=score, k=2), input_shape=(16,))
    assert all(layer.indices.numel() == 2 for _, layer in grft_layers(net))
