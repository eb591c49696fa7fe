"""The public API of the core beyond the matrix: counts, trainable-set rules, errors, dtypes, regulariser."""
from __future__ import annotations

import copy
import logging

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from conftest import images, make_model, random_scores
from grft_vision import (AdapterError, ConfigError, GRFTConfig, L2ToPretrained, SelectionError, apply_grft,
                         load_adapter, merge_grft, print_trainable_parameters, save_adapter,
                         trainable_parameters_report, unload_grft)
from grft_vision.tuner.anatomy import base_tensors, grft_layers
from grft_vision.tuner.trainable import adapter_parameters
from grft_vision.selection import choose_indices


@pytest.fixture(scope="module")
def vit_base():
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=47)


def test_vit_base_rows_k1_trainable_count_is_analytic(vit_base):
    model = apply_grft(copy.deepcopy(vit_base), random_scores(vit_base), GRFTConfig(structure="row", k=1))
    # Per block, one row of each weight (row length = input dim): qkv 768 + proj 768 + fc1 768 + fc2 3072,
    # plus the full biases of those layers: 2304 + 768 + 3072 + 768. Patch embedding: one output channel
    # of 3*16*16 = 768 taps plus its 768-d bias. Head: 768*47 + 47. Norms, pos_embed, cls_token frozen.
    per_block = (768 + 768 + 768 + 3072) + (2304 + 768 + 3072 + 768)
    expected = 12 * per_block + (3 * 16 * 16 + 768) + (768 * 47 + 47)
    report = trainable_parameters_report(model)
    assert report.trainable == expected == 185_135
    assert report.total == sum(p.numel() for p in vit_base.parameters())
    assert len(report.layers) == 12 * 4 + 1


def test_vit_base_sparse_k1_matches_gps_reference_count(vit_base):
    # benchmark-protocols.md §3: GPS trains 167,424 backbone parameters of ViT-B/16 at K = 1 (+ the head).
    model = apply_grft(copy.deepcopy(vit_base), random_scores(vit_base), GRFTConfig(structure="sparse", k=1))
    assert trainable_parameters_report(model).trainable == 167_424 + 768 * 47 + 47


def test_vit_base_tap_columns_k2_trainable_count_is_analytic(vit_base):
    config = GRFTConfig(structure="column", conv_columns="tap", k=2)
    model = apply_grft(copy.deepcopy(vit_base), random_scores(vit_base), config)
    # A column holds one weight per output: 2 * (2304 + 768 + 3072 + 768) per block plus the biases; the
    # patch embedding's [768, 3*16*16] view gives 2 columns of 768 (one channel at one tap each).
    per_block = 2 * (2304 + 768 + 3072 + 768) + (2304 + 768 + 3072 + 768)
    expected = 12 * per_block + (2 * 768 + 768) + (768 * 47 + 47)
    assert trainable_parameters_report(model).trainable == expected
    assert model.patch_embed.proj.structure == "tap_column"


def test_default_trainable_set_follows_gps_convention():
    model = make_model("vit")
    apply_grft(model, random_scores(model))
    trainable = set(adapter_parameters(model, "default"))
    assert {"head.weight", "head.bias", "blocks.0.attn.qkv.delta", "blocks.0.attn.qkv.bias_delta"} <= trainable
    for frozen in ("pos_embed", "cls_token", "norm.weight", "blocks.0.norm1.weight"):
        assert frozen not in trainable
    assert not any(p.requires_grad for p in base_tensors(model).values())  # the pre-trained tensors never train
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in
                                                                       adapter_parameters(model, "default").values()}


def test_trainable_switches():
    model = make_model("vit")
    config = GRFTConfig(train_head=False, train_bias=False, train_norm=True, train_pos_embed=True,
                        train_tokens=True, extra_trainable=["blocks.1.norm2.*"])
    apply_grft(model, random_scores(model), config)
    trainable = set(adapter_parameters(model, "default"))
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.norm1.bias"} <= trainable
    assert "head.weight" not in trainable and "blocks.0.attn.qkv.bias_delta" not in trainable
    assert "blocks.1.norm2.weight" in trainable


def test_layer_scale_gamma_trains_by_default():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, depth=1,
                              init_values=1e-5)
    apply_grft(model, random_scores(model))
    assert model.blocks[0].ls1.gamma.requires_grad


def test_k_fraction_and_clamp():
    model = make_model("sequential")
    scores = random_scores(model)
    apply_grft(model, scores, GRFTConfig(structure="row", k=0.5))
    counts = {name: layer.indices.shape[0] for name, layer in grft_layers(model)}
    assert counts == {"0": 4, "2": 4, "4": 8, "8": 6, "10": 3}  # 0.5 * out rounded half up, at least 1
    clamped = apply_grft(make_model("sequential"), scores, GRFTConfig(k=100, clamp_k=True))
    assert dict(grft_layers(clamped))["10"].indices.shape[0] == 5


def test_choose_indices_row_column_sparse_and_ties():
    score = torch.tensor([[1.0, 0.0, 3.0], [4.0, 0.0, 0.0], [0.0, 2.0, 2.0]])
    assert choose_indices(score, "row", 1).tolist() == [0]          # row sums 4, 4, 4 -> tie -> lowest
    assert choose_indices(score, "row", 2).tolist() == [0, 1]
    assert choose_indices(score, "column", 1).tolist() == [0]       # column sums 5, 2, 5 -> tie -> lowest
    assert choose_indices(score, "sparse", 1).tolist() == [[2], [0], [1]]
    conv = torch.zeros(4, 1, 3, 3)  # depthwise, groups=4: column = input channel = its own filter
    conv[2] = 1.0
    assert choose_indices(conv, "column", 1, groups=4).tolist() == [2]


def test_k_larger_than_layer_names_layer_and_fix():
    model = make_model("sequential")
    with pytest.raises(SelectionError, match=r"'10'.*5 rows.*k <= 5.*exclude_modules"):
        apply_grft(model, random_scores(model), GRFTConfig(k=6))


def test_score_of_wrong_shape_or_missing():
    model = make_model("sequential")
    scores = random_scores(model)
    scores["8.weight"] = torch.rand(3, 3)
    with pytest.raises(SelectionError, match=r"'8.weight' has shape \(3, 3\).*\(12, 16\)"):
        apply_grft(model, scores)
    scores = random_scores(model)
    del scores["2.weight"]
    with pytest.raises(SelectionError, match="no entry for '2.weight'"):
        apply_grft(make_model("sequential"), scores)


def test_config_errors():
    with pytest.raises(ConfigError, match="structure='diagonal'.*row, column, sparse"):
        GRFTConfig(structure="diagonal")
    with pytest.raises(ConfigError, match="k=0"):
        GRFTConfig(k=0)
    with pytest.raises(ConfigError, match="k=1.5"):
        GRFTConfig(k=1.5)
    with pytest.raises(ConfigError, match="'strucure'.*Did you mean 'structure'"):
        GRFTConfig.from_dict({"strucure": "row"})


def test_config_yaml_round_trip(tmp_path):
    config = GRFTConfig(structure="column", k=3, exclude_modules=["head"], reg_lambda=1e-4, reg_blocks=2)
    path = tmp_path / "grft.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert GRFTConfig.from_yaml(path) == config


def test_apply_twice_under_one_name_and_no_target_are_errors():
    model = make_model("vit")
    apply_grft(model, random_scores(model))
    with pytest.raises(AdapterError, match="already has an adapter named 'default'.*adapter_name="):
        apply_grft(model, random_scores(model))
    with pytest.raises(ConfigError, match="config in the place of scores"):
        apply_grft(make_model("vit"), GRFTConfig())
    with pytest.raises(ConfigError, match="matches target_modules"):
        apply_grft(make_model("vit"), {}, GRFTConfig(target_modules=["nothing.*"]))


def test_target_and_exclude_patterns():
    model = make_model("vit")
    config = GRFTConfig(target_modules=["blocks.*"], exclude_modules=["*.fc2"])
    apply_grft(model, random_scores(model), config)
    names = {name for name, _ in grft_layers(model)}
    assert names == {f"blocks.{i}.{layer}" for i in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1")}


def test_unload_restores_original_exactly():
    original = make_model("convnext")
    model = apply_grft(copy.deepcopy(original), random_scores(original))
    with torch.no_grad():
        for _, layer in grft_layers(model):
            layer.delta.normal_()
    restored = unload_grft(model)
    assert not hasattr(restored, "grft_state")
    x = images()
    assert torch.equal(restored(x), original(x))


def test_multihead_attention_projection_is_skipped(caplog):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True).eval()
    original = copy.deepcopy(layer)
    with caplog.at_level(logging.WARNING):
        apply_grft(layer, random_scores(layer))
    assert "self_attn.out_proj" in caplog.text
    assert {name for name, _ in grft_layers(layer)} == {"linear1", "linear2"}
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x), original(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("structure", ["row", "column", "sparse"])
def test_bfloat16_weights_and_autocast(structure):
    model = make_model("vit")
    apply_grft(model, random_scores(model), GRFTConfig(structure=structure))
    model.to(torch.bfloat16)
    layer = dict(grft_layers(model))["blocks.0.attn.qkv"]
    assert layer.delta.dtype == torch.float32 and model.head.grft_owned.weight.adapters["default"].dtype \
        == torch.float32  # adapter tensors stay fp32 masters through the cast
    out = model(images().to(torch.bfloat16))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and layer.delta.grad.dtype == torch.float32
    model32 = make_model("vit")
    apply_grft(model32, random_scores(model32), GRFTConfig(structure=structure))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model32(images())
    out.float().sum().backward()
    assert dict(grft_layers(model32))["blocks.0.attn.qkv"].delta.grad is not None


def test_adapter_is_compact_and_reloads_config(tmp_path):
    model = make_model("vit")
    apply_grft(model, random_scores(model), GRFTConfig(structure="column", k=2, reg_lambda=1e-3))
    path = save_adapter(model, tmp_path / "a.safetensors")
    trainable = trainable_parameters_report(model).trainable
    assert path.stat().st_size < 4 * trainable + 64 * 1024 + 8 * sum(1 for _ in grft_layers(model)) * 2
    fresh = load_adapter(make_model("vit"), path)
    assert fresh.grft_state.config == model.grft_state.config


def test_adapter_for_other_architecture_is_clear_error(tmp_path):
    model = make_model("vit")
    apply_grft(model, random_scores(model))
    path = save_adapter(model, tmp_path / "vit.safetensors")
    with pytest.raises(AdapterError, match="saved from 'vit_tiny_patch16_224' and does not fit this 'resnet18'"):
        load_adapter(make_model("resnet"), path)
    deeper = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=3)
    with pytest.raises(AdapterError, match=r"12 parameter\(s\) differ, e.g. blocks.2.attn.proj.bias: adapter None vs model \[192\]"):
        load_adapter(deeper, path)
    # the same backbone with another number of classes: the adapter brings its own head
    other_classes = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, depth=2)
    backbone = {key: value for key, value in make_model("vit").state_dict().items() if not key.startswith("head.")}
    assert other_classes.load_state_dict(backbone, strict=False).missing_keys == ["head.weight", "head.bias"]
    reloaded = load_adapter(other_classes.eval(), path)
    assert torch.equal(reloaded(images()), model(images()))
    with pytest.raises(AdapterError, match="different base weights"):
        load_adapter(make_model("vit", seed=1), path)
    load_adapter(make_model("vit", seed=1), path, check_weights=False)


def test_truncated_and_foreign_adapter_files(tmp_path):
    model = make_model("vit")
    apply_grft(model, random_scores(model))
    path = save_adapter(model, tmp_path / "a.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(AdapterError, match="truncated.safetensors.*truncated or corrupted"):
        load_adapter(make_model("vit"), truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(AdapterError, match="not a GRFT adapter"):
        load_adapter(make_model("vit"), foreign)
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(make_model("vit"), tmp_path / "missing.safetensors")


def test_load_adapter_into_wrapped_model_keeps_parameters(tmp_path):
    model = make_model("vit")
    apply_grft(model, random_scores(model))
    with torch.no_grad():
        for _, layer in grft_layers(model):
            layer.delta.normal_()
    path = save_adapter(model, tmp_path / "a.safetensors")
    target = make_model("vit")
    apply_grft(target, random_scores(target))
    deltas_before = [layer.delta for _, layer in grft_layers(target)]
    load_adapter(target, path)
    assert all(a is b for a, b in zip(deltas_before, [layer.delta for _, layer in grft_layers(target)]))
    x = images()
    assert torch.equal(target(x), model(x))


def test_batchnorm_statistics_travel_with_the_adapter(tmp_path):
    model = make_model("resnet")
    apply_grft(model, random_scores(model))
    model.train()
    model(images(4))
    model.eval()
    path = save_adapter(model, tmp_path / "a.safetensors")
    reloaded = load_adapter(make_model("resnet"), path)
    x = images()
    assert torch.equal(reloaded(x), model(x))


def test_regularizer_covers_last_blocks_stem_and_head():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, depth=4)
    apply_grft(model, random_scores(model), GRFTConfig(reg_lambda=0.5, reg_blocks=1))
    regularizer = L2ToPretrained(model, model.grft_state.config)
    names = set(regularizer.names)
    assert "blocks.3.mlp.fc2.delta" in names and "patch_embed.proj.delta" in names
    assert {"head.weight", "head.bias", "blocks.3.attn.qkv.bias_delta"} <= names
    assert not any(name.startswith(("blocks.0.", "blocks.1.", "blocks.2.")) for name in names)
    assert regularizer().item() == 0.0
    with torch.no_grad():
        model.blocks[3].mlp.fc2.delta.fill_(1.0)
        model.head.bias.add_(2.0)
        model.blocks[0].mlp.fc2.delta.fill_(1.0)  # outside R: no contribution
    expected = 0.5 * (model.blocks[3].mlp.fc2.delta.numel() + 4.0 * 3)
    assert regularizer().item() == pytest.approx(expected)
    assert L2ToPretrained(model, GRFTConfig(reg_lambda=0.5, reg_blocks="all"))().item() > expected


def test_regularizer_blocks_are_stages_for_cnns():
    model = make_model("resnet")
    apply_grft(model, random_scores(model), GRFTConfig(reg_lambda=1.0, reg_blocks=1))
    names = set(L2ToPretrained(model, model.grft_state.config).names)
    assert "conv1.delta" in names and "fc.weight" in names and "layer4.0.conv1.delta" in names
    assert "layer3.0.conv1.delta" not in names


def test_report_and_print(capsys):
    model = make_model("vit")
    apply_grft(model, random_scores(model))
    report = trainable_parameters_report(model)
    assert 0 < report.percent < 100 and report.to_dict()["layers"][0]["name"] == "patch_embed.proj"
    assert "trainable%" in str(report)
    print_trainable_parameters(model)
    assert capsys.readouterr().out.startswith("trainable params:")


def test_merged_model_is_plain_and_has_the_same_flops():
    from torch.utils.flop_counter import FlopCounterMode

    original = make_model("vit")
    merged = merge_grft(apply_grft(copy.deepcopy(original), random_scores(original)))
    assert {type(m) for m in merged.modules()} == {type(m) for m in original.modules()}
    counts = []
    for model in (original, merged):
        with FlopCounterMode(display=False) as counter:
            model(images())
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1]
