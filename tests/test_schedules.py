"""Dynamic (SPEFT) and incremental (ID3) schedules on row, column and sparse structures."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grft_vision import GRFTConfig, L2ToPretrained, apply_grft, load_adapter, merge_grft, save_adapter, unload_grft
from grft_vision.tuner.anatomy import grft_layers
from grft_vision.selection.schedules import create_schedule

CLASSES = 4


class Net(nn.Module):
    """An MLP with a timm-like pre-logits path (so that SupCon selection works on it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(12, 16), nn.Linear(16, 8), nn.Linear(8, CLASSES)

    def forward_features(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def forward_head(self, x, pre_logits=False):
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def data(n: int = 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(n) % CLASSES
    return TensorDataset(torch.randn(n, 12, generator=generator) + labels[:, None].float(), labels)


def setup(structure: str, schedule: str, k: int = 3, interval: int = 2, **extra):
    config = GRFTConfig(structure=structure, k=k, schedule=schedule, schedule_interval=interval, schedule_batches=1,
                        selection_views=1, selection_mode="eval", reg_lambda=0.1, **extra)
    loader = DataLoader(data(), batch_size=16)
    original = Net()
    model = apply_grft(copy.deepcopy(original), config=config, dataloader=loader, progress=False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return original, model, loader, optimizer, config


def train(model, schedule, optimizer, loader, steps, regularizer=None, on_step=None):
    batches = iter(())
    for step in range(steps):
        schedule.before_step(step, optimizer)
        if on_step is not None:
            on_step(step)
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        loss = nn.functional.cross_entropy(model(x), y) + (regularizer() if regularizer else 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("structure", ["row", "column", "sparse"])
def test_incremental_unmasking_follows_the_scheduler_and_counts_updates(structure):
    original, model, loader, optimizer, config = setup(structure, "incremental", k=3, interval=2)
    budgets = dict(model.grft_state.budgets)
    assert all(layer.indices.shape[-1] == 0 for _, layer in grft_layers(model))  # nothing unmasked at first
    steps = 6  # events at steps 0, 2, 4: E = 3, a layer holds floor(3 * e / 3) = e units after event e
    schedule = create_schedule(model, config, loader, total_steps=steps, budgets=budgets)
    seen, expected_updates = [], 0

    def record(step):
        nonlocal expected_updates
        units = {name: layer.indices.shape[-1] for name, layer in grft_layers(model)}
        seen.append(units)
        expected_updates += sum(layer.delta.numel() for _, layer in grft_layers(model))
        event = step // 2 + 1
        assert units == {name: budgets[name] * event // 3 for name in budgets}
        assert all(units[name] <= budgets[name] for name in budgets)

    train(model, schedule, optimizer, loader, steps, on_step=record)
    assert seen[-1] == budgets and schedule.events == 3
    assert schedule.updates == expected_updates
    # ID3 §3.2 with a uniform scheduler: U = sum_t |Lambda_t| = (1 + 1 + 2 + 2 + 3 + 3) units per layer
    unit_sizes = {name: layer.delta.numel() // budgets[name] for name, layer in grft_layers(model)}
    assert schedule.updates == sum(unit_sizes[name] * 12 for name in budgets)


def test_incremental_keeps_values_and_optimizer_state_of_unmasked_entries():
    _, model, loader, optimizer, config = setup("row", "incremental", k=2, interval=1)
    schedule = create_schedule(model, config, loader, total_steps=2, budgets=dict(model.grft_state.budgets))
    train(model, schedule, optimizer, loader, 1)
    layer = model.fc1
    first_rows = layer.indices.clone()
    values = layer.delta.detach().clone()
    moments = optimizer.state[layer.delta]["exp_avg"].clone()
    schedule.before_step(1, optimizer)
    assert set(first_rows.tolist()) < set(layer.indices.tolist())
    kept = torch.isin(layer.indices, first_rows)
    assert torch.equal(layer.delta.detach()[kept], values)
    assert torch.equal(optimizer.state[layer.delta]["exp_avg"][kept], moments)
    assert not optimizer.state[layer.delta]["exp_avg"][~kept].any()
    assert any(p is layer.delta for group in optimizer.param_groups for p in group["params"])


@pytest.mark.parametrize("structure", ["row", "column", "sparse"])
def test_dynamic_reselection_keeps_exactness(structure, tmp_path):
    original, model, loader, optimizer, config = setup(structure, "dynamic", k=2, interval=2)
    schedule = create_schedule(model, config, loader, total_steps=7)
    regularizer = L2ToPretrained(model, config)
    train(model, schedule, optimizer, loader, 7, regularizer)
    assert schedule.events == 3  # steps 2, 4, 6
    assert any(layer.update.frozen_index.numel() for _, layer in grft_layers(model))
    x = data().tensors[0][:8]
    expected = model(x)
    # the regulariser is the exact ||theta - theta_pre||^2 over R (here: every trained tensor), frozen entries of
    # earlier selections included: compare it with the merged model's distance from the original
    merged = merge_grft(copy.deepcopy(model))
    with torch.no_grad():
        distance = sum(float((tensor - original.state_dict()[name]).pow(2).sum())
                       for name, tensor in merged.state_dict().items())
    assert float(regularizer().detach()) / config.reg_lambda == pytest.approx(distance, rel=1e-5)
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    adapter = save_adapter(model, tmp_path / "a.safetensors")
    reloaded = load_adapter(Net(), adapter)
    torch.testing.assert_close(reloaded(x), expected, atol=1e-6, rtol=1e-6)
    restored = unload_grft(model)
    for name, tensor in original.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def test_dynamic_schedule_resets_state_of_new_entries_only():
    _, model, loader, optimizer, config = setup("row", "dynamic", k=3, interval=1)
    schedule = create_schedule(model, config, loader, total_steps=3)
    train(model, schedule, optimizer, loader, 1)
    layer = model.fc1
    before_rows, before = layer.indices.clone(), optimizer.state[layer.delta]["exp_avg_sq"].clone()
    schedule.before_step(1, optimizer)
    assert not layer.delta.detach().any()  # the update was folded into the weight
    for position, row in enumerate(layer.indices.tolist()):
        state = optimizer.state[layer.delta]["exp_avg_sq"][position]
        if row in before_rows.tolist():
            assert torch.equal(state, before[before_rows.tolist().index(row)])
        else:
            assert not state.any()
