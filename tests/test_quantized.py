"""GRFT on a quantized frozen base: bitsandbytes 4-bit (nf4, fp4) and 8-bit layers, on CPU with the real library.

The frozen weight stays quantized (its stored bytes never change while training), the update adds to the
quantized layer's own output (zero update = the quantized model), selection takes the gradient of the
dequantized weight through a probe, merges re-quantize and unmerges restore the original bytes, adapters move
between quantized and full-precision copies of one base, and the scripts train (and resume) quantized runs.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from grft_vision import (AdapterError, ConfigError, GRFTConfig, SelectionError, apply_grft, disable_adapter,  # noqa: E402
                         load_adapter, merge_adapter, mixed_adapters, save_adapter, set_adapter, unload_grft,
                         unmerge_adapter)
from grft_vision.extras import MissingDependencyError  # noqa: E402
from grft_vision.llm import TokenFeatures, load_classifier, load_tokenizer  # noqa: E402
from grft_vision.llm import cli as glue_cli  # noqa: E402
from grft_vision.selection import compute_scores  # noqa: E402
from grft_vision.tuner.anatomy import logical_modules, original_name  # noqa: E402
from grft_vision.tuner.layer import grft_layers  # noqa: E402
from grft_vision.tuner.quantized import quantize_model, quantized_format, quantized_layers, weight_shape  # noqa: E402

from conftest import crash_then_resume  # noqa: E402
from tiny_llm import save_tiny, toy_examples, write_glue  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
QUANT_TYPES = ["nf4", "fp4", "int8"]
STRUCTURES = ["row", "column", "sparse"]


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, depth=2)


def quantized_vit(quant_type: str, seed: int = 0) -> nn.Module:
    return quantize_model(tiny_vit(seed), quant_type)


def random_scores(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"{name}.weight": torch.rand(weight_shape(module), generator=generator)
            for name, module in logical_modules(model) if isinstance(module, (nn.Linear, nn.Conv2d))
            and not name.startswith("head")}


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 5, (4,), generator=generator)


def stored_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized layers' stored tensors (codes, scales), by state-dict key read through the wrappers."""
    names = {name for name, _ in quantized_layers(model)}
    return {original_name(key): value.clone() for key, value in model.state_dict().items()
            if any(key.startswith(name + ".") for name in names) and not key.endswith("bias")}


def train_steps(model: nn.Module, steps: int = 4, lr: float = 1e-2) -> list[float]:
    images, labels = batch()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def trained_adapter(quant_type: str, structure: str = "column") -> nn.Module:
    model = quantized_vit(quant_type).train()
    apply_grft(model, random_scores(model), config=GRFTConfig(structure=structure, k=2))
    train_steps(model, steps=3)
    return model


# ------------------------------------------------------------------------------------------------ converting


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_model_converts_the_body_linear_layers_only(quant_type):
    model = quantized_vit(quant_type)
    kinds = {name: type(module).__name__ for name, module in model.named_modules()}
    expected = "Linear8bitLt" if quant_type == "int8" else "Linear4bit"
    assert {kinds[f"blocks.{i}.{layer}"] for i in (0, 1) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")} \
        == {expected}
    assert kinds["head"] == "Linear" and kinds["patch_embed.proj"] == "Conv2d"
    assert weight_shape(model.blocks[0].attn.qkv) == (192 * 3, 192)
    assert quantized_format(model.blocks[0].attn.qkv).describe(model.blocks[0].attn.qkv)["quant_type"] == quant_type
    skipped = quantize_model(tiny_vit(), quant_type, skip_modules=["*.mlp.*"])
    assert type(skipped.blocks[0].mlp.fc1) is nn.Linear and type(skipped.blocks[0].attn.qkv).__name__ == expected


def test_quantize_model_errors_name_the_problem(monkeypatch):
    with pytest.raises(ConfigError, match="quant_type='int4'.*nf4, fp4, int8"):
        quantize_model(tiny_vit(), "int4")
    import bitsandbytes.functional as functional

    def unsupported(*args, **kwargs):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(functional, "quantize_4bit", unsupported)
    with pytest.raises(ConfigError, match=r"cannot quantize layer 'blocks\.0\.attn\.qkv' to nf4 on cpu"):
        quantize_model(tiny_vit(), "nf4")


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'grft-vision\[quant\]'"):
        quantize_model(tiny_vit(), "nf4")


# ------------------------------------------------------------------------------------------------ the forward


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_zero_update_computes_exactly_what_the_quantized_model_computes(quant_type, structure):
    reference = quantized_vit(quant_type)
    model = copy.deepcopy(reference)
    apply_grft(model, random_scores(model), config=GRFTConfig(structure=structure, k=2))
    images, _ = batch()
    for mode in ("train", "eval"):
        reference.train(mode == "train")
        model.train(mode == "train")
        with torch.no_grad():
            torch.manual_seed(0)
            expected = reference(images)
            torch.manual_seed(0)
            assert torch.equal(model(images), expected), mode


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_training_changes_only_the_adapter_and_the_quantized_bytes_stay(quant_type):
    model = quantized_vit(quant_type).train()
    apply_grft(model, random_scores(model), config=GRFTConfig(structure="row", k=2))
    before = stored_bytes(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".grft_updates." in name or "head" in name for name in trainable)
    losses = train_steps(model, steps=5)
    assert losses[-1] < 0.5 * losses[0]
    after = stored_bytes(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for _, layer in grft_layers(model):
        if quantized_format(layer.base_layer) is not None:
            assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad


def test_evaluation_between_training_steps_keeps_layers_trainable():
    """bitsandbytes repacks 4-bit weights at the first CPU inference forward and can no longer train them; the
    layers of a GRFT model stay in the layout that trains."""
    model = quantized_vit("nf4").train()
    apply_grft(model, random_scores(model), config=GRFTConfig(structure="row", k=1))
    images, _ = batch()
    with torch.no_grad():
        model.eval()(images)
    model.train()
    train_steps(model, steps=1)


# ------------------------------------------------------------------------------------------------ selection


def _dequantized_copy(full: nn.Module, quantized: nn.Module) -> nn.Module:
    """``full`` with the quantized model's dequantized weights: the model the quantized one computes."""
    copy_ = copy.deepcopy(full)
    with torch.no_grad():
        for name, layer in quantized_layers(quantized):
            copy_.get_submodule(name).weight.copy_(quantized_format(layer).dequantize(layer))
    return copy_


@pytest.mark.parametrize("score", ["grft", "fisher", "snip"])
def test_scores_of_a_quantized_model_are_those_of_its_dequantized_weights(score):
    full = tiny_vit()
    quantized = quantize_model(copy.deepcopy(full), "nf4")
    data = [(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)), torch.arange(8) % 4)
            for i in range(2)]
    config = GRFTConfig(structure="row", k=1, score=score)
    scores = compute_scores(quantized, data, config, progress=False).scores
    exact = compute_scores(_dequantized_copy(full, quantized), data, config, progress=False).scores
    original = compute_scores(full, data, config, progress=False).scores
    assert scores.keys() == exact.keys()
    for key in scores:
        torch.testing.assert_close(scores[key], exact[key], rtol=1e-5, atol=1e-12)
        if "blocks" in key:  # the same selection as full precision up to the quantization's effect
            rows = torch.stack([scores[key].sum(1), original[key].sum(1)])
            assert torch.corrcoef(rows)[0, 1] > 0.9, key


@pytest.mark.parametrize("score", ["grasp", "synflow"])
def test_scores_that_cannot_score_a_quantized_layer_say_why(score):
    data = [(torch.randn(8, 3, 32, 32), torch.arange(8) % 4)]
    with pytest.raises(SelectionError, match=f"score='{score}' cannot score the quantized layers"):
        apply_grft(quantized_vit("nf4"), config=GRFTConfig(score=score, k=1), dataloader=data, progress=False,
                   input_shape=(3, 32, 32))


def test_mask_schedules_are_refused_on_quantized_layers():
    model = quantized_vit("nf4")
    with pytest.raises(ConfigError, match="schedule='dynamic'.*quantized layers"):
        apply_grft(model, random_scores(model), config=GRFTConfig(k=1, schedule="dynamic"))


# ------------------------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_merge_requantizes_and_unmerge_restores_the_original_bytes(quant_type):
    model = trained_adapter(quant_type).eval()
    images, _ = batch()
    original = stored_bytes(model)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        live = model(images)
        merge_adapter(model)
        merged = model(images)
        assert all(torch.equal(state[key], value) for key, value in model.state_dict().items()), \
            "a merged model's state dict holds the pre-trained quantized weights"
        relative = float((merged - live).norm() / live.norm())
        assert 0 < relative < (0.02 if quant_type != "int8" else 0.002)  # re-quantization's rounding
        unmerge_adapter(model)
        assert torch.equal(model(images), live)
    restored = stored_bytes(model)
    assert all(torch.equal(original[key], restored[key]) for key in original)
    plain = unload_grft(copy.deepcopy(model))  # unload without merge: the original quantized layers
    assert all(torch.equal(original[key], value) for key, value in stored_bytes(plain).items())


def test_a_merge_that_would_overflow_is_refused_and_changes_nothing():
    model = trained_adapter("int8", structure="row")
    layer = model.blocks[0].mlp.fc1
    with torch.no_grad():
        layer.delta.fill_(1e6)  # beyond float16, from which bitsandbytes quantizes int8 rows
    before = stored_bytes(model)
    with pytest.raises(AdapterError, match=r"quantized layer 'blocks\.0\.mlp\.fc1' is refused.*overflows float16"):
        merge_adapter(model)
    assert all(torch.equal(before[key], value) for key, value in stored_bytes(model).items())
    assert not model.grft_state.merged


# ------------------------------------------------------------------------------------------------ adapters


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_adapters_move_between_the_quantized_and_the_full_precision_base(quant_type, tmp_path):
    trained = trained_adapter(quant_type)
    save_adapter(trained, tmp_path / "quantized.safetensors")
    full = load_adapter(tiny_vit(), tmp_path / "quantized.safetensors")
    layers = dict(grft_layers(trained))
    for name, layer in grft_layers(full):
        assert torch.equal(layer.indices, layers[name].indices) and torch.equal(layer.delta, layers[name].delta)
    save_adapter(full, tmp_path / "full.safetensors")
    back = load_adapter(quantized_vit(quant_type), tmp_path / "full.safetensors")
    images, _ = batch()
    with torch.no_grad():
        assert torch.equal(back.eval()(images), trained.eval()(images))
    for other, adapter in ((quantized_vit(quant_type, seed=1), "full"), (quantized_vit(quant_type, seed=1), "quantized"),
                           (tiny_vit(seed=1), "quantized")):
        with pytest.raises(AdapterError, match="different base weights"):
            load_adapter(other, tmp_path / f"{adapter}.safetensors")


def test_mixed_batches_disable_and_several_adapters_on_quantized_layers():
    model = quantized_vit("nf4").train()
    apply_grft(model, random_scores(model, 0), config=GRFTConfig(structure="column", k=2), adapter_name="a")
    train_steps(model, steps=2)
    apply_grft(model, random_scores(model, 1), config=GRFTConfig(structure="sparse", k=2), adapter_name="b")
    train_steps(model, steps=2)
    model.eval()
    images, _ = batch()
    with torch.no_grad():
        outputs = {}
        for name in ("a", "b"):
            set_adapter(model, name)
            outputs[name] = model(images)
        with disable_adapter(model):
            outputs[None] = model(images)
        assert not torch.allclose(outputs["a"], outputs["b"]) and not torch.allclose(outputs["a"], outputs[None])
        names = ["a", None, "b", "a"]
        with mixed_adapters(model, names):
            mixed = model(images)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], outputs[name][row], rtol=1e-5, atol=1e-5)


def test_a_wrapped_quantized_model_deep_copies():
    model = trained_adapter("nf4").eval()
    images, _ = batch()
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model)(images), model(images))


# ------------------------------------------------------------------------------------------------ language models


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny_llama") / "llama", "llama")


@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_a_4bit_llama_from_transformers_selects_and_trains(tiny_llama, quant_type):
    from grft_vision.llm import PadCollate, tokenize_dataset
    from grft_vision.llm.data import GlueDataset

    tokenizer = load_tokenizer(str(tiny_llama))
    model = load_classifier(str(tiny_llama), 2, tokenizer, quantize=quant_type)
    assert {type(m).__name__ for m in model.model.layers.modules() if isinstance(m, nn.Linear)} == \
        {"Linear8bitLt" if quant_type == "int8" else "Linear4bit"}
    assert type(model.score) is nn.Linear and model.score.weight.dtype == torch.float32
    dataset = GlueDataset("cola", "train", toy_examples(32, 3))
    tokenize_dataset(dataset, tokenizer, 32)
    collate = PadCollate(tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, collate_fn=collate)
    reference = copy.deepcopy(model).train()
    apply_grft(model, config=GRFTConfig(structure="column", k=2, selection_views=1, target_modules=["*layers.*"]),
               dataloader=loader, features=TokenFeatures("last", dataset=dataset, collate=collate), progress=False)
    assert len(list(grft_layers(model))) == 14
    inputs = collate([dataset[i] for i in range(16)])
    labels = inputs.pop("labels")
    inputs = {key: inputs[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(model.train()(**inputs).logits, reference(**inputs).logits)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = nn.functional.cross_entropy(model(**inputs).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def glue(*args: str) -> int:
    return glue_cli.main(list(args), glue_cli.CONFIG_DIR)


def glue_args(model_dir: Path, data_dir: Path, run_dir: Path) -> list[str]:
    return ["--dataset", "cola", "--model", str(model_dir), "--data-dir", str(data_dir), "--run-dir", str(run_dir),
            "--max-length", "32", "--batch-size", "8", "--epochs", "2", "--lr", "3e-3", "--quiet", "--cols", "2",
            "--quantize", "nf4", "--set", "selection_batch_size=16"]


def test_train_glue_quantize_nf4_runs_and_keeps_only_the_adapter(tiny_llama, tmp_path, capsys):
    data = write_glue(tmp_path / "glue", "cola", {"train": 32, "dev": 8})
    run_dir = tmp_path / "run"
    assert glue(*glue_args(tiny_llama, data, run_dir)) == 0
    assert "dev accuracy" in capsys.readouterr().out
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert not any("base_layer.weight" in key for key in json.dumps(list(checkpoint)).split('"'))
    adapter = load_file(run_dir / "adapter.safetensors")
    assert adapter and all(".grft_" in key or key.startswith("score.") for key in adapter)
    model = load_adapter(load_classifier(str(tiny_llama), 2, load_tokenizer(str(tiny_llama)), quantize="nf4"),
                         run_dir / "adapter.safetensors")
    assert len(list(grft_layers(model))) == 14


@pytest.mark.slow
def test_train_glue_quantize_nf4_resume_is_exact(tiny_llama, tmp_path, monkeypatch):
    data = write_glue(tmp_path / "glue", "cola", {"train": 32, "dev": 8})
    assert glue(*glue_args(tiny_llama, data, tmp_path / "straight")) == 0
    crash_then_resume(glue, glue_args(tiny_llama, data, tmp_path / "resumed"), monkeypatch, crash_epoch=1)
    straight = load_file(tmp_path / "straight" / "adapter.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    histories = [json.loads((tmp_path / n / "metrics.json").read_text())["history"] for n in ("straight", "resumed")]
    assert histories[0] == histories[1]


def test_train_vtab_quantized_run_exports_a_16_bit_merged_model(tmp_path):
    from grft_vision import export
    from grft_vision.training import cli as vision_cli

    run_dir = tmp_path / "run"
    args = ["--dataset", "synthetic", "--rows", "1", "--epochs", "2", "--warmup-epochs", "0", "--quantize", "int8",
            "--model", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", "--batch-size", "16",
            "--workers", "0", "--quiet", "--run-dir", str(run_dir), "--set", "synthetic_samples=64"]
    assert vision_cli.main("vtab", args) == 0
    out = tmp_path / "merged.safetensors"
    assert export.main([str(run_dir / "adapter.safetensors"), "--out", str(out), "--dtype", "bfloat16"]) == 0
    merged = load_file(out)
    assert {tensor.dtype for tensor in merged.values()} == {torch.bfloat16}
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)
    plain.load_state_dict({key: value.float() for key, value in merged.items()}, strict=True)
    torch.manual_seed(42)  # the run's random base, quantized as it trained, plus its adapter
    trained = load_adapter(quantize_model(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                                                            img_size=32), "int8"), run_dir / "adapter.safetensors")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = trained.eval()(images)
        torch.testing.assert_close(plain.eval()(images), expected, rtol=0.05, atol=0.05)  # bf16 weights


def test_the_hugging_face_trainer_fine_tunes_a_4bit_model_and_checkpoints_the_adapter_only(tmp_path):
    from transformers import (BitsAndBytesConfig, LlamaConfig, LlamaForSequenceClassification,
                              TrainingArguments)

    from grft_vision.integrations.hf import GRFTTrainer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=2)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "base")
    settings = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                  llm_int8_skip_modules=["score"])
    model = LlamaForSequenceClassification.from_pretrained(tmp_path / "base", quantization_config=settings,
                                                           device_map="cpu")
    apply_grft(model, config=GRFTConfig(score="random", k=2, target_modules=["*layers.*"]))
    before = stored_bytes(model)
    ids = torch.randint(1, 64, (16, 8), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": int(row[0] > 32)} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, save_steps=2, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True)
    GRFTTrainer(model=model, args=args, train_dataset=data).train()
    assert not getattr(model, "_hf_peft_config_loaded", False)  # only set while the Trainer checks the model
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not list(checkpoint.glob("model*.safetensors"))
    assert all(torch.equal(before[key], value) for key, value in stored_bytes(model).items())
