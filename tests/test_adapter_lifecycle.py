"""PEFT's tuner checklist (its tests/testing_common.py) as one matrix: architecture families x structures.

Every case trains two adapters on one frozen backbone (one optimizer step each, in train mode so that
BatchNorm statistics move too) and checks the lifecycle a user relies on: unloading gives back the original
model bit for bit, disabling computes the base model, merge/unmerge restores the weights, merging twice is a
no-op, a safe merge catches NaN, adapters switch and each reproduces its own outputs, deletion, a mixed
batch equals per-sample runs, file and directory round trips, bf16 casts keep fp32 adapter tensors, and a
step changes nothing but adapter-owned tensors.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from conftest import images, make_model, random_scores
from grft_vision import (AdapterError, GRFTConfig, apply_grft, delete_adapter, disable_adapter, from_pretrained,
                         list_adapters, load_adapter, merge_adapter, merge_grft, mixed_adapters, save_adapter,
                         save_pretrained, set_adapter, unload_grft, unmerge_adapter)
from grft_vision.tuner.anatomy import grft_layers
from grft_vision.tuner.trainable import adapter_parameters

FAMILIES = ["vit", "swin", "convnext", "resnet", "efficientnet_same_pad", "sequential"]
CONFIGS = {"row": {"structure": "row"}, "column": {"structure": "column"}, "sparse": {"structure": "sparse"},
           "tap_column": {"structure": "column", "conv_columns": "tap"}}
CASES = [(family, structure) for family in FAMILIES for structure in CONFIGS]


def _step(model: nn.Module, seed: int) -> None:
    """One Adam step on a random projection of the outputs, in train mode (BatchNorm statistics move)."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = images(4, seed=seed)
    out = model(x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))).sum().backward()
    optimizer.step()
    model.eval()


@functools.lru_cache(maxsize=None)
def _trained(family: str, structure: str) -> tuple[nn.Module, nn.Module]:
    """(original, wrapped with adapters 'a' and 'b', each trained one step); cached, callers copy."""
    original = make_model(family)
    model = copy.deepcopy(original)
    config = GRFTConfig(**CONFIGS[structure], k=2)
    apply_grft(model, random_scores(original, seed=0), config, adapter_name="a")
    _step(model, seed=1)
    apply_grft(model, random_scores(original, seed=5), config, adapter_name="b")
    _step(model, seed=2)
    return original, model


@pytest.fixture(params=CASES, ids=[f"{f}-{s}" for f, s in CASES])
def case(request) -> tuple[str, str]:
    return request.param


@pytest.fixture
def trained(case):
    original, model = _trained(*case)
    return copy.deepcopy(original), copy.deepcopy(model)


def _outputs(model: nn.Module, adapter: str | None, x: torch.Tensor) -> torch.Tensor:
    set_adapter(model, adapter)
    with torch.no_grad():
        return model(x)


def test_unload_gives_back_the_original_model_exactly(trained):
    original, model = trained
    x = images(3, seed=9)
    assert not torch.equal(_outputs(model, "a", x), original(x))  # the adapters did change something
    unload_grft(model)
    assert list(model.state_dict()) == list(original.state_dict())
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert torch.equal(model(x), original(x))
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in original.parameters()]


def test_disable_computes_the_base_model_and_restores_the_state(trained):
    original, model = trained
    x = images(3, seed=9)
    before = _outputs(model, "b", x)
    merge_adapter(model)
    with disable_adapter(model), torch.no_grad():
        assert torch.equal(model(x), original(x))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert all(layer.merged for _, layer in grft_layers(model) if layer.update is not None)


def test_merge_unmerge_restores_weights_and_merging_twice_is_a_no_op(trained):
    _, model = trained
    x = images(3, seed=9)
    unmerged = _outputs(model, "a", x)
    weights = {name: p.detach().clone() for name, p in model.state_dict(keep_vars=True).items()}
    base = {name: layer.base_layer.weight.detach().clone() for name, layer in grft_layers(model)}
    merge_adapter(model)
    merged_weights = {name: layer.base_layer.weight.detach().clone() for name, layer in grft_layers(model)}
    assert any(not torch.equal(merged_weights[name], base[name]) for name in base)
    with torch.no_grad():
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    merge_adapter(model)  # a no-op, not a double add
    for name, layer in grft_layers(model):
        assert torch.equal(layer.base_layer.weight, merged_weights[name]), name
    state = model.state_dict()
    assert all(torch.equal(state[n], w) for n, w in weights.items())  # state dicts stay pre-trained
    unmerge_adapter(model)
    for name, layer in grft_layers(model):
        assert torch.equal(layer.base_layer.weight, base[name]), name
    with torch.no_grad():
        assert torch.equal(model(x), unmerged)


def test_safe_merge_refuses_nan_and_merges_nothing(trained):
    _, model = trained
    set_adapter(model, "a")
    name, layer = next((n, l) for n, l in grft_layers(model) if l.update is not None)
    base = {n: l.base_layer.weight.detach().clone() for n, l in grft_layers(model)}
    with torch.no_grad():
        layer.delta.view(-1)[0] = float("nan")
    with pytest.raises(AdapterError, match=f"non-finite weights in layer '{name}'"):
        merge_adapter(model, safe=True)
    for n, l in grft_layers(model):
        assert torch.equal(l.base_layer.weight, base[n]) and not l.merged, n


def test_adapters_switch_and_each_reproduces_its_own_outputs(trained, tmp_path):
    original, model = trained
    x = images(3, seed=9)
    outputs = {name: _outputs(model, name, x) for name in ("a", "b")}
    assert not torch.equal(outputs["a"], outputs["b"])
    for name in ("a", "b"):  # each adapter alone on a fresh backbone computes the same
        path = save_adapter(model, tmp_path / f"{name}.safetensors", adapter_name=name)
        alone = load_adapter(copy.deepcopy(original), path)
        with torch.no_grad():
            assert torch.equal(alone(x), outputs[name]), name
    assert torch.equal(_outputs(model, "a", x), outputs["a"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(model, "a").values()}


def test_delete_adapter(trained):
    original, model = trained
    x = images(3, seed=9)
    kept = _outputs(model, "b", x)
    delete_adapter(model, "a")
    assert list_adapters(model) == ["b"] and model.grft_state.active == "b"
    with torch.no_grad():
        assert torch.equal(model(x), kept)
    with pytest.raises(AdapterError, match="no adapter named 'a'"):
        set_adapter(model, "a")
    delete_adapter(model, "b")
    assert not list(grft_layers(model))
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_mixed_batch_equals_each_sample_alone(trained):
    _, model = trained
    x = images(5, seed=9)
    names = ["a", None, "b", "a", "b"]
    expected = torch.cat([_outputs(model, name, x[i:i + 1]) if name else _base(model, x[i:i + 1])
                          for i, name in enumerate(names)])
    set_adapter(model, "a")
    with mixed_adapters(model, names), torch.no_grad():
        mixed = model(x)
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)


def _base(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with disable_adapter(model), torch.no_grad():
        return model(x)


def test_file_and_directory_round_trips_per_adapter(trained, tmp_path):
    original, model = trained
    x = images(3, seed=9)
    expected = {name: _outputs(model, name, x) for name in ("a", "b")}
    save_pretrained(model, tmp_path / "dir")
    for name in ("a", "b"):
        file_copy = load_adapter(copy.deepcopy(original), save_adapter(model, tmp_path / f"{name}.st", name), name)
        dir_copy = from_pretrained(copy.deepcopy(original), tmp_path / "dir" / name, name)
        with torch.no_grad():
            assert torch.equal(file_copy(x), expected[name]) and torch.equal(dir_copy(x), expected[name]), name
    both = load_adapter(copy.deepcopy(original), tmp_path / "a.st")
    load_adapter(both, tmp_path / "b.st")
    assert list_adapters(both) == ["a", "b"]
    assert torch.equal(_outputs(both, "a", x), expected["a"]) and torch.equal(_outputs(both, "b", x), expected["b"])


def test_bfloat16_cast_keeps_fp32_adapter_tensors(trained):
    _, model = trained
    set_adapter(model, "a")
    model.to(torch.bfloat16)
    assert {p.dtype for p in adapter_parameters(model, "a").values()} == {torch.float32}
    assert {p.dtype for p in adapter_parameters(model, "b").values()} == {torch.float32}
    model.train()
    out = model(images(2, seed=9).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    grads = [p.grad for p in adapter_parameters(model, "a").values() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)


def test_a_step_changes_only_adapter_owned_tensors(trained):
    original, model = trained
    set_adapter(model, "b")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    _step(model, seed=3)
    owned = {name for name in model.state_dict() if ".grft_updates.b." in name or ".adapters.b" in name}
    changed = {name for name, t in model.state_dict().items() if not torch.equal(t, before[name])}
    assert changed and changed <= owned, sorted(changed - owned)[:5]


def test_state_dict_into_a_model_wrapped_with_other_indices(case, trained):
    """timm --resume, EMA copies, Trainer's best-model reload: a state dict loaded into a model wrapped with
    other indices (and merged, to check that nothing is applied twice) computes what the saved model computes."""
    original, model = trained
    other = copy.deepcopy(original)
    config = GRFTConfig(**CONFIGS[case[1]], k=2)
    for seed, name in ((11, "a"), (12, "b")):
        apply_grft(other, random_scores(original, seed=seed), config, adapter_name=name)
    x = images(3, seed=9)
    expected = _outputs(model, "b", x)
    merge_adapter(model)
    set_adapter(other, "b")
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), expected)
    merged = merge_grft(other)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_19_vtab_tasks_are_served_from_one_vit_base():
    """One ViT-B/16 backbone holds 19 adapters (one per VTAB-1k task, each with its own head size), loaded
    through the real adapter loader; each task computes with its own head, and tasks with equal heads share
    a mixed batch."""
    import timm

    from grft_vision.io.adapter_format import adapter_state
    from grft_vision.io.adapters import apply_adapter_state
    from grft_vision.data.vtab_tasks import VTAB_TASKS

    torch.manual_seed(0)
    server = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, img_size=32).eval()
    trainer = copy.deepcopy(server)
    apply_grft(trainer, random_scores(trainer), GRFTConfig(structure="row", k=1))
    tensors, metadata = adapter_state(trainer)
    generator = torch.Generator().manual_seed(1)
    for task in VTAB_TASKS.values():  # what 19 training runs would have saved
        task_tensors = {key: torch.randn(value.shape, generator=generator) * 0.01 if ".grft_delta" in key else value
                        for key, value in tensors.items()}
        task_tensors["head.weight"] = torch.randn(task.num_classes, 768, generator=generator) * 0.02
        task_tensors["head.bias"] = torch.zeros(task.num_classes)
        apply_adapter_state(server, task_tensors, metadata, adapter_name=task.name, source=task.name)
    assert list_adapters(server) == list(VTAB_TASKS) and len(VTAB_TASKS) == 19
    x = images(2, seed=9)
    outputs = {name: _outputs(server, name, x) for name in VTAB_TASKS}
    assert all(outputs[name].shape == (2, task.num_classes) for name, task in VTAB_TASKS.items())
    assert torch.equal(_outputs(server, "dtd", x), outputs["dtd"])  # switching back reproduces
    same_head = [name for name, task in VTAB_TASKS.items() if task.num_classes == 16]
    assert len(same_head) == 2  # dSprites location and orientation
    with mixed_adapters(server, same_head), torch.no_grad():
        mixed = server(x)
    torch.testing.assert_close(mixed, torch.stack([outputs[same_head[0]][0], outputs[same_head[1]][1]]),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(AdapterError, match="different shapes"), mixed_adapters(server, ["dtd", "cifar100"]):
        server(x)
