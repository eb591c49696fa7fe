"""Where features meet: contexts inside contexts, changes inside contexts, merged adapters and training, loads
under an optimizer, threads. The rules are those of docs/architecture.md ("One state, and how the contexts
compose") and docs/usage.md ("What composes").
"""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from conftest import images, random_scores, two_adapters
from grft_vision import (AdapterError, GRFTConfig, apply_grft, delete_adapter, disable_adapter, load_adapter,
                         merge_adapter, merge_grft, mixed_adapters, save_adapter, set_adapter, unload_grft,
                         unmerge_adapter)
from grft_vision.tuner.layer import grft_layers


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _one_at_a_time(model: nn.Module, x: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    """Each sample of ``x`` through its own adapter made active (None: the base), concatenated."""
    expected = []
    for i, name in enumerate(names):
        if name is None:
            with disable_adapter(model):
                expected.append(_out(model, x[i:i + 1]))
        else:
            set_adapter(model, name)
            expected.append(_out(model, x[i:i + 1]))
    return torch.cat(expected)


# ------------------------------------------------------------------ contexts inside contexts
def test_disable_inside_a_mixed_batch_and_a_mixed_batch_inside_disable_compute_the_base():
    original, model = two_adapters()
    x = images(3, seed=3)
    base = _out(original, x)
    with mixed_adapters(model, ["a", "b", None]):
        assert not torch.allclose(_out(model, x), base)
        with disable_adapter(model):
            assert torch.equal(_out(model, x), base)
        assert not torch.allclose(_out(model, x), base)  # the mixed batch again
    with disable_adapter(model), mixed_adapters(model, ["a", "b", "a"]):
        assert torch.equal(_out(model, x), base)
    with disable_adapter(model):
        with disable_adapter(model):
            assert torch.equal(_out(model, x), base)
        assert torch.equal(_out(model, x), base)  # the outer block still holds
    assert not torch.allclose(_out(model, x), base)


def test_mixed_batches_do_not_nest_and_need_one_name_per_sample():
    _, model = two_adapters()
    with mixed_adapters(model, ["a", "b"]):
        with pytest.raises(AdapterError, match="do not nest"):
            with mixed_adapters(model, ["a", "a"]):
                pass
    with pytest.raises(AdapterError, match="4 rows in its input's batch dimension.*one adapter name per sample"):
        with mixed_adapters(model, ["a", "b"]):  # 2 names for 4 samples: never applied in blocks
            _out(model, images(4))


class _SequenceFirst(nn.Module):
    """A block written for ``[T, B, C]`` inputs (the batch in dimension 1), as sequence-first code is."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, C]
        return self.proj(x.transpose(0, 1)).transpose(0, 1)


def test_a_layer_that_sees_the_batch_in_another_dimension_is_served_once_declared():
    from grft_vision.tuner.batch_context import BATCH_LAYOUTS, register_batch_layout

    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(8, 8), _SequenceFirst(), nn.Linear(8, 3))
    x = torch.randn(4, 4, 8)  # B = T = 4: a row count cannot tell the batch from the sequence
    register_batch_layout(_SequenceFirst, dim=1)
    try:
        model = copy.deepcopy(original)
        for seed, name in ((1, "a"), (2, "b")):
            apply_grft(model, random_scores(original, seed), GRFTConfig(structure="row", k=2, head_modules=["2"]),
                       adapter_name=name)
            with torch.no_grad():
                for param in model.parameters():
                    if param.requires_grad:
                        param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)))
        names = ["a", "b", None, "b"]
        expected = _one_at_a_time(model, x, names)
        with mixed_adapters(model, names):
            torch.testing.assert_close(_out(model, x), expected, atol=1e-5, rtol=1e-5)
    finally:
        BATCH_LAYOUTS.pop(f"{_SequenceFirst.__module__}.{_SequenceFirst.__qualname__}")


def test_a_mixed_batch_serves_adapters_with_frozen_entries_exactly():
    """Frozen entries (what a dynamic schedule leaves) are written into the weight while their adapter is active;
    a mixed batch still gives every sample exactly its own adapter (the batch used to be refused)."""
    _, model = two_adapters()
    for name, offset in (("a", 0), ("b", 1)):
        for _, layer in grft_layers(model):
            layer.set_frozen(name, torch.tensor([offset, 3 + offset, 7 + offset]), torch.tensor([0.5, -0.25, 0.75]))
    set_adapter(model, "a")
    assert any(layer._written == ("a", False) for _, layer in grft_layers(model))
    x = images(3, seed=11)
    names = ["b", None, "a"]
    expected = _one_at_a_time(model, x, names)
    set_adapter(model, "a")
    with mixed_adapters(model, names):
        torch.testing.assert_close(_out(model, x), expected, atol=1e-5, rtol=1e-5)


def test_a_mixed_batch_of_one_model_is_not_seen_by_another_model():
    _, model = two_adapters()
    _, other = two_adapters()
    x = images(2, seed=4)
    expected = _out(other, x)
    with mixed_adapters(model, ["b", None]):
        assert torch.equal(_out(other, x), expected)


@pytest.mark.parametrize("change", ["set_adapter", "merge_adapter", "unmerge_adapter", "delete_adapter", "merge_grft",
                                    "unload_grft", "apply_grft", "load_adapter"])
@pytest.mark.parametrize("context", ["disable_adapter", "mixed_adapters"])
def test_changing_the_adapters_inside_a_context_is_an_error_and_changes_nothing(change, context, tmp_path):
    original, model = two_adapters()
    path = save_adapter(model, tmp_path / "b.safetensors", adapter_name="b")
    x = images(2, seed=5)
    expected = _out(model, x)
    changes = {
        "set_adapter": lambda: set_adapter(model, "b"),
        "merge_adapter": lambda: merge_adapter(model),
        "unmerge_adapter": lambda: unmerge_adapter(model),
        "delete_adapter": lambda: delete_adapter(model, "b"),
        "merge_grft": lambda: merge_grft(model),
        "unload_grft": lambda: unload_grft(model),
        "apply_grft": lambda: apply_grft(model, random_scores(original, 7), GRFTConfig(k=1), adapter_name="c"),
        "load_adapter": lambda: load_adapter(model, path),
    }
    opened = disable_adapter(model) if context == "disable_adapter" else mixed_adapters(model, ["a", "b"])
    with opened:
        with pytest.raises(AdapterError, match=f"inside {context}"):
            changes[change]()
    assert model.grft_state.active == "a" and list(model.grft_state.adapters) == ["a", "b"]
    assert torch.equal(_out(model, x), expected)


def test_a_change_from_another_thread_while_a_mixed_batch_is_open_is_an_error():
    _, model = two_adapters()
    errors = []
    with mixed_adapters(model, ["a", "b"]):
        thread = threading.Thread(target=lambda: errors.append(_catch(lambda: set_adapter(model, "b"))))
        thread.start()
        thread.join()
    assert errors and isinstance(errors[0], AdapterError)
    set_adapter(model, "b")  # and once it is closed, it changes


def _catch(action) -> BaseException | None:
    try:
        action()
    except BaseException as error:  # noqa: BLE001 - handed back to the test's thread
        return error
    return None


# ------------------------------------------------------------------ merged adapters
def test_a_training_step_of_a_merged_adapter_is_an_error():
    _, model = two_adapters()
    merge_adapter(model)
    model.train()
    with pytest.raises(AdapterError, match="merged into the weights.*unmerge_adapter"):
        model(images(2)).sum().backward()
    with torch.no_grad():  # evaluating a merged adapter is what merging is for
        model(images(2))
    unmerge_adapter(model)
    model(images(2)).sum().backward()


def test_merging_again_after_the_update_changed_writes_the_new_values():
    _, model = two_adapters()
    x = images(2, seed=6)
    merge_adapter(model)
    with torch.no_grad():
        for _, layer in grft_layers(model):
            if layer.update is not None:
                layer.update.delta.add_(0.5)
    merge_adapter(model)  # not a no-op: the new values are written
    merged = _out(model, x)
    unmerge_adapter(model)
    torch.testing.assert_close(merged, _out(model, x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the pre-trained statistics
def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()
            if name.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.mark.parametrize("base_view", ["disable_adapter", "no_active_adapter", "none_in_a_mixed_batch"])
def test_train_mode_forwards_of_the_base_never_write_the_pretrained_statistics(base_view):
    original, model = two_adapters("resnet")
    before = _bn_stats(original)
    model.train()
    x = images(4, seed=8)
    with torch.no_grad():
        if base_view == "disable_adapter":
            with disable_adapter(model):
                model(x)
        elif base_view == "no_active_adapter":
            set_adapter(model, None)
            model(x)
        else:
            with mixed_adapters(model, [None, "a", None, "a"]):  # groups of two samples (BatchNorm in train mode)
                model(x)
    unload_grft(model)
    after = _bn_stats(model)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


# ------------------------------------------------------------------ loads under an optimizer
def test_loading_an_adapter_of_other_indices_keeps_the_parameters_an_optimizer_holds(tmp_path):
    original, model = two_adapters()
    other = copy.deepcopy(original)
    apply_grft(other, random_scores(original, 9), GRFTConfig(structure="row", k=2), adapter_name="a")
    path = save_adapter(other, tmp_path / "other.safetensors")
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    load_adapter(model, path)  # same name, same k, other indices: copied in place
    assert [p for p in model.parameters() if p.requires_grad] == parameters
    for (name, layer), (_, source) in zip(grft_layers(model), grft_layers(other)):
        assert torch.equal(layer.grft_updates["a"].indices, source.grft_updates["a"].indices), name
    before = [p.detach().clone() for p in parameters]
    model.train()
    optimizer.zero_grad()
    model(images(2)).sum().backward()
    optimizer.step()
    moved = [not torch.equal(p, b) for p, b in zip(parameters, before)]
    assert sum(moved) == len([p for p in parameters if p.grad is not None and p.grad.abs().sum() > 0])
    assert sum(moved) > len(parameters) // 2  # the optimizer trains the loaded deltas, not orphans


def test_loading_an_adapter_that_needs_other_shapes_under_the_same_name_is_refused(tmp_path):
    original, model = two_adapters()
    other = copy.deepcopy(original)
    apply_grft(other, random_scores(original, 9), GRFTConfig(structure="row", k=3), adapter_name="a")
    path = save_adapter(other, tmp_path / "k3.safetensors")
    x = images(2)
    expected = _out(model, x)
    with pytest.raises(AdapterError, match="would replace parameters an optimizer may hold"):
        load_adapter(model, path)
    assert torch.equal(_out(model, x), expected)  # nothing was changed
    load_adapter(model, path, adapter_name="c")  # under another name it loads


# ------------------------------------------------------------------ threads
def test_threads_compute_their_own_batches_without_patching_shared_modules():
    _, model = two_adapters()
    x = images(3, seed=10)
    plain = _out(model, x)  # adapter 'a' for every sample
    with mixed_adapters(model, ["b", None, "a"]):
        mixed = _out(model, x)
    failures: list[BaseException] = []
    barrier = threading.Barrier(2)

    def mixing() -> None:
        barrier.wait()
        for _ in range(20):
            with mixed_adapters(model, ["b", None, "a"]):
                if not torch.equal(_out(model, x), mixed):
                    failures.append(AssertionError("mixed batch changed"))

    def plain_forwards() -> None:
        barrier.wait()
        for _ in range(20):
            if not torch.equal(_out(model, x), plain):
                failures.append(AssertionError("plain forward changed"))

    threads = [threading.Thread(target=target) for target in (mixing, plain_forwards)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:2]
    assert not any("forward" in module.__dict__ for module in model.modules())  # no instance-level patch
