"""benchmarks/llm_memory.py: its parameter counts are those of the real models, its estimate that of a measurement."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForSequenceClassification

from conftest import load_benchmark
from grft_vision import GRFTConfig, apply_grft, trainable_parameters_report

llm_memory = load_benchmark("llm_memory")

TINY = llm_memory.LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=256)


def test_parameter_count_of_llama_3_2_1b_is_the_real_models():
    config = llm_memory.LLAMA_3_2_1B.llama_config(num_labels=2, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForSequenceClassification(config)
    total = sum(p.numel() for p in model.parameters())
    assert llm_memory.count_parameters(llm_memory.LLAMA_3_2_1B) == total == 1_235_814_400 + 2048 * 2  # + head


@pytest.mark.parametrize("structure", ["row", "column", "sparse"])
def test_counts_are_what_apply_grft_trains(structure):
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(TINY.llama_config(num_labels=2, pad_token_id=0))
    assert llm_memory.count_parameters(TINY) == sum(p.numel() for p in model.parameters())
    scores = {f"{name}.weight": torch.rand(module.weight.shape) for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear)}
    apply_grft(model, scores, GRFTConfig(structure=structure, k=3, target_modules=["*layers.*"]))
    assert llm_memory.trainable_parameters(TINY, structure, 3) == trainable_parameters_report(model).trainable


def test_activation_estimate_is_close_to_what_autograd_saves():
    measured = llm_memory.measure_training_memory(TINY, batch=4, seq=32, method="grft", steps=1)
    estimate = measured["estimate"]["activations"]
    assert measured["saved_activations"] == pytest.approx(estimate, rel=0.1), (measured["saved_activations"], estimate)


def test_memory_estimate_fits_a_24_gb_gpu():
    grft = llm_memory.estimate_memory(llm_memory.LLAMA_3_2_1B, 16, 256, "grft")
    assert grft["total"] < 12 and grft["trainable_state"] < 0.02
    assert llm_memory.estimate_memory(llm_memory.LLAMA_3_2_1B, 16, 256, "grft", checkpointing=True)["total"] < 4
    full = llm_memory.estimate_memory(llm_memory.LLAMA_3_2_1B, 16, 256, "full")
    assert full["total"] > 2 * grft["weights"] + grft["activations"]
