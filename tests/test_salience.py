"""SPEFT / ID3 / GEM importance scores and budgets, checked against their formulas on tiny networks."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from grft_vision import GRFTConfig, SelectionError, apply_grft, trainable_parameters_report
from grft_vision.tuner.anatomy import grft_layers
from grft_vision.selection import compute_scores
from grft_vision.selection.budget import allocate_units, weight_entropy

W = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
X = torch.tensor([[1.0, 2.0, 3.0]])
Y = torch.tensor([0])


def linear_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(W)
    return model


def hand_gradient() -> torch.Tensor:
    """d CE / dW for logits W x = [-2, 4.5] and label 0: (softmax - onehot) x^T."""
    p0 = math.exp(-2) / (math.exp(-2) + math.exp(4.5))
    return torch.tensor([[p0 - 1.0], [1.0 - p0]]) * X


def score(name: str, **options) -> torch.Tensor:
    config = GRFTConfig(score=name, selection_loss="cross_entropy", selection_views=1, selection_mode="eval",
                        **options)
    return compute_scores(linear_model(), [(X, Y)], config, progress=False).scores["0.weight"]


@pytest.mark.parametrize("name, formula", [
    ("grft", lambda g: g ** 2),
    ("gradient", lambda g: g.abs()),
    ("snip", lambda g: (g * W).abs()),
    ("force", lambda g: -g * W),
    ("taylor_fo", lambda g: (g * W) ** 2),
    ("d3", lambda g: g.abs() / (W.abs() + 1.0) ** 2),
    ("gem", lambda g: g.abs() / (W.abs() + 1e-12)),
    ("magnitude", lambda g: W.abs()),
])
def test_gradient_and_magnitude_scores_match_their_formulas(name, formula):
    torch.testing.assert_close(score(name), formula(hand_gradient()), rtol=1e-5, atol=1e-7)


def test_d3_epsilon_and_exponent_are_configurable():
    expected = hand_gradient().abs() / (W.abs() + 0.5) ** -1.0
    torch.testing.assert_close(score("d3", d3_eps=0.5, d3_exp=-1.0), expected, rtol=1e-5, atol=1e-7)


def test_fisher_sums_per_sample_squared_gradients():
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
    y = torch.tensor([0, 1])
    per_sample = []
    for i in range(2):
        weight = W.clone().requires_grad_(True)
        nn.functional.cross_entropy(x[i:i + 1] @ weight.T, y[i:i + 1]).backward()
        per_sample.append(weight.grad)
    config = GRFTConfig(score="fisher", selection_loss="cross_entropy", selection_views=1, selection_mode="eval")
    result = compute_scores(linear_model(), [(x, y)], config, progress=False).scores["0.weight"]
    torch.testing.assert_close(result, per_sample[0] ** 2 + per_sample[1] ** 2)


class TanhNet(nn.Module):
    """Two layers with a curved activation, so that the Hessian is not trivial."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_grasp_hessian_vector_product_matches_finite_differences():
    model = TanhNet().double()
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    config = GRFTConfig(score="grasp", selection_loss="cross_entropy", selection_views=1, selection_mode="eval")
    grasp = compute_scores(model, [(x, y)], config, progress=False).scores
    names = ["fc1.weight", "fc2.weight"]
    params = [model.get_parameter(n) for n in names]

    def gradient(shift: float, direction: list[torch.Tensor]) -> list[torch.Tensor]:
        shifted = {n: (p + shift * d).detach().requires_grad_(True) for n, p, d in zip(names, params, direction)}
        loss = nn.functional.cross_entropy(torch.func.functional_call(model, shifted, (x,)), y)
        return torch.autograd.grad(loss, list(shifted.values()))

    g = gradient(0.0, [torch.zeros_like(p) for p in params])
    eps = 1e-5
    plus, minus = gradient(eps, list(g)), gradient(-eps, list(g))
    for name, param, up, down in zip(names, params, plus, minus):
        expected = -((up - down) / (2 * eps)) * param.detach()
        torch.testing.assert_close(grasp[name], expected.float(), rtol=1e-3, atol=1e-7)


def test_grasp_runs_through_fused_attention():
    """timm attention uses fused SDPA kernels, which have no double backward; GraSP must still work."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              num_classes=3)
    loader = [(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))]
    config = GRFTConfig(score="grasp", selection_views=1)
    scores = compute_scores(model, loader, config, progress=False).scores
    assert all(torch.isfinite(score).all() for score in scores.values())
    assert scores["blocks.0.attn.qkv.weight"].abs().sum() > 0


def test_synflow_needs_no_data_and_matches_its_formula():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    torch.manual_seed(0)
    original = [p.detach().clone() for p in model.parameters()]
    config = GRFTConfig(score="synflow")
    scores = compute_scores(model, None, config, input_shape=(3,), progress=False).scores
    w1, w2 = original[0].abs(), original[1].abs()
    # R = 1^T |W2| |W1| 1, so dR/dW1[i, j] = sum_o |W2|[o, i] and dR/dW2[o, i] = sum_j |W1|[i, j]
    torch.testing.assert_close(scores["0.weight"], w2.sum(0)[:, None] * w1)
    torch.testing.assert_close(scores["1.weight"], w1.sum(1)[None, :] * w2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), original))  # signs restored


def test_synflow_runs_at_the_loaders_image_size_not_the_pretrained_one():
    """A timm model built for 32 px still says 224 in its pretrained config: the loader's images decide."""
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              num_classes=3)
    assert model.pretrained_cfg["input_size"][-1] == 224
    loader = [(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))]
    scores = compute_scores(model, loader, GRFTConfig(score="synflow"), progress=False).scores
    assert scores["patch_embed.proj.weight"].shape == model.patch_embed.proj.weight.shape
    assert all(torch.isfinite(score).all() and score.sum() > 0 for score in scores.values())


def test_random_scores_are_seeded_and_gradient_scores_need_data():
    model = linear_model()
    first = compute_scores(model, None, GRFTConfig(score="random", selection_seed=3), progress=False).scores
    again = compute_scores(model, None, GRFTConfig(score="random", selection_seed=3), progress=False).scores
    assert torch.equal(first["0.weight"], again["0.weight"])
    with pytest.raises(SelectionError, match="needs training data"):
        compute_scores(model, None, GRFTConfig(score="snip"), progress=False)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def layer_scores(model: nn.Module, hot: str | None = None) -> dict[str, torch.Tensor]:
    """Unit scores everywhere, except ``hot`` whose scores are 100x larger."""
    return {f"{n}.weight": torch.ones_like(m.weight) * (100.0 if n == hot else 1.0)
            for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_default_global_budget_spends_what_uniform_k_spends_on_the_best_layers():
    model = mlp()
    uniform = trainable_parameters_report(apply_grft(mlp(), layer_scores(model), GRFTConfig(k=2))).layers
    spent = sum(layer.trainable for layer in uniform)  # rows: 2*8 + 2*16 + 2*16 = 80
    wrapped = apply_grft(model, layer_scores(model, hot="2"), GRFTConfig(k=2, budget="global"))
    layers = {name: layer.indices.numel() for name, layer in grft_layers(wrapped)}
    assert layers == {"2": 5}  # 5 rows of 16 = 80 parameters, all in the layer whose score dominates
    assert sum(layer.delta.numel() for _, layer in grft_layers(wrapped)) == spent


def test_global_budget_in_parameters_and_fraction():
    model = mlp()
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    structures = dict.fromkeys(targets, "row")
    scores = layer_scores(model, hot="0")
    units = allocate_units(targets, scores, structures, GRFTConfig(budget="global", budget_params=40))
    assert units == {"0": 5, "2": 0, "4": 0}  # rows of layer 0 cost 8 each: 5 rows = 40
    fraction = allocate_units(targets, layer_scores(model), structures, GRFTConfig(budget="global",
                                                                                   budget_fraction=0.5))
    assert sum(units * targets[n].weight.shape[1] for n, units in fraction.items()) <= 0.5 * (128 + 256 + 64)


def test_entropy_budget_favours_high_entropy_layers():
    model = mlp()
    with torch.no_grad():
        model[0].weight.fill_(0.1)  # a constant layer has zero entropy
        model[0].weight[0, 0] = 0.2
    assert weight_entropy(model[0].weight) < weight_entropy(model[2].weight)
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    units = allocate_units(targets, layer_scores(model), dict.fromkeys(targets, "row"),
                           GRFTConfig(k=2, budget="entropy"))
    assert units["0"] == 0 and units["2"] > 0
    assert sum(units[n] * targets[n].weight.shape[1] for n in targets) <= 80


def test_sparse_global_budget_assigns_per_row_counts():
    model = mlp()
    wrapped = apply_grft(model, layer_scores(model, hot="4"), GRFTConfig(structure="sparse", k=1, budget="global"))
    counts = {name: layer.indices.shape for name, layer in grft_layers(wrapped)}
    # uniform k=1 would spend 16 + 16 + 4 = 36 entries; all go to the hot layer, in whole per-row units
    assert counts == {"4": torch.Size([4, 9])}
