"""GRFT inside Hugging Face: ``transformers.Trainer`` through GRFTTrainer on a tiny random Llama (CPU, no download),
the loud refusal of a wrapped model's weights, and apply_grft's refusal of a PEFT model.

GRFTTrainer: checkpoints are adapter-sized (< 1/20 of the model), resuming from one continues to the result an
uninterrupted run gives, the merged folder loads strictly with ``from_pretrained`` and computes the wrapped
model's logits, and ``python -m grft_vision.export`` merges a checkpoint folder into the same model.
"""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForSequenceClassification, TrainingArguments

from grft_vision import ConfigError, GRFTConfig, ModelLoadError, apply_grft, from_pretrained
from grft_vision.export import main as export_main
from grft_vision.integrations.hf import GRFTTrainer
from grft_vision.llm import load_classifier

VOCAB, LENGTH = 4000, 12


pytestmark = pytest.mark.usefixtures("one_thread")


class Sequences(Dataset):
    """Random token sequences; the label is whether token 7 occurs (learnable)."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, VOCAB, (count, LENGTH), generator=generator)
        self.ids[::2, 3] = 7
        self.labels = (self.ids == 7).any(-1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                "labels": self.labels[index]}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The "pre-trained" model: a tiny random Llama classifier saved with save_pretrained (~3 MB)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         num_labels=2)
    folder = tmp_path_factory.mktemp("llama")
    LlamaForSequenceClassification(config).save_pretrained(folder)
    return folder


def wrapped(base_dir: Path) -> torch.nn.Module:
    model = LlamaForSequenceClassification.from_pretrained(base_dir)
    # a data-free score: no loader needed (SupCon selection is tested in test_llm.py)
    return apply_grft(model, config=GRFTConfig(score="random", k=2, target_modules=["*layers.*"], reg_lambda=1e-3))


def trainer(model: torch.nn.Module, output: Path, steps: int = 6) -> GRFTTrainer:
    args = TrainingArguments(output_dir=str(output), max_steps=steps, save_steps=2, save_strategy="steps",
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=5e-3,
                             logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                             dataloader_num_workers=0)
    return GRFTTrainer(model=model, args=args, train_dataset=Sequences(48, seed=1))


def adapter_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def logits(model: torch.nn.Module) -> torch.Tensor:
    batch = Sequences(6, seed=2)
    with torch.no_grad():
        return model.eval()(input_ids=batch.ids).logits


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_trainer_checkpoints_resume_and_merged_model(base_dir, tmp_path):
    straight = trainer(wrapped(base_dir), tmp_path / "straight")
    regularizer = straight.regularizer
    assert regularizer.enabled and float(regularizer().detach()) == 0.0  # nothing trained yet: the model is the base
    straight.train()
    penalty = float(regularizer().detach())
    assert penalty > 0  # the penalty moved with the updates it regularises
    batch = torch.utils.data.default_collate([Sequences(4, seed=5)[i] for i in range(4)])
    model = straight.model.train()
    with torch.no_grad():
        task_loss = float(model(**batch).loss)
        total = float(straight.compute_loss(model, batch))
    assert total == pytest.approx(task_loss + penalty, rel=1e-5)  # without accumulation-scaled losses: as is
    losses = [entry["loss"] for entry in straight.state.log_history if "loss" in entry]
    assert len(losses) == 6

    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "config.json").is_file()
    assert not list(checkpoint.glob("model*.safetensors"))
    assert folder_bytes(checkpoint) < (base_dir / "model.safetensors").stat().st_size / 20

    resumed = trainer(wrapped(base_dir), tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected = adapter_values(straight.model)
    assert all(torch.allclose(value, expected[name], atol=1e-6) for name, value in adapter_values(resumed.model).items())
    resumed_losses = [entry["loss"] for entry in resumed.state.log_history if "loss" in entry]
    assert resumed_losses == pytest.approx(losses, abs=1e-6)  # the first two from the checkpoint's trainer state

    wrapped_logits = logits(straight.model)
    straight.save_merged(tmp_path / "merged")
    merged, loading = LlamaForSequenceClassification.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(loading[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    torch.testing.assert_close(logits(merged), wrapped_logits, atol=1e-5, rtol=1e-5)

    # a checkpoint folder merges with the export tool, its base found from what the adapter records
    assert export_main([str(checkpoint), "--out", str(tmp_path / "exported")]) == 0
    exported, loading = LlamaForSequenceClassification.from_pretrained(tmp_path / "exported", output_loading_info=True)
    assert not any(loading[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    at_step_2 = from_pretrained(LlamaForSequenceClassification.from_pretrained(base_dir), checkpoint)
    torch.testing.assert_close(logits(exported), logits(at_step_2), atol=1e-5, rtol=1e-5)


def test_wrapped_weights_are_refused_by_our_loader_and_export_merges_them(base_dir, tmp_path):
    model = wrapped(base_dir)
    with torch.no_grad():  # as if trained
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(tmp_path / "wrapped")  # what the docs say not to do (and what a plain Trainer saves)
    with pytest.raises(ModelLoadError, match="GRFT-wrapped model"):
        load_classifier(str(tmp_path / "wrapped"), 2, types.SimpleNamespace(pad_token_id=0))
    assert load_classifier(str(base_dir), 2, types.SimpleNamespace(pad_token_id=0)) is not None

    assert export_main([str(tmp_path / "wrapped"), "--out", str(tmp_path / "merged")]) == 0
    merged, loading = LlamaForSequenceClassification.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(loading[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=1e-5)


def test_apply_grft_refuses_a_peft_model(base_dir):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(LlamaForSequenceClassification.from_pretrained(base_dir),
                                LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    with pytest.raises(ConfigError, match="PEFT tuner layers.*merge_and_unload"):
        apply_grft(peft_model, config=GRFTConfig(score="random", k=1, target_modules=["*layers.*"]))
    assert not any("grft" in name for name, _ in peft_model.named_modules())  # refused before touching it
