"""``train_glue.py --fsdp``: FSDP2 shards the frozen base; 2 gloo CPU processes compute what 1 process computes.

The two-process run is interrupted after its first epoch and resumed (both under FSDP), so selection,
training, checkpoint, resume, evaluation (17 dev examples: shards of 9 and 8 run 2 and 1 batches of 8 unless
padded) and the final adapter are all compared with one uninterrupted process: the selection exactly, the
per-step losses, the metrics and the adapter up to float noise, and the merged model's logits.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import LlamaConfig, LlamaForSequenceClassification

from grft_vision import ConfigError, GRFTConfig, apply_grft, load_adapter, merge_grft
from grft_vision.llm import GlueTrainConfig, load_classifier, load_tokenizer
from grft_vision.llm.modeling import keep_head_float32
from grft_vision.training.distributed import DistributedContext, replicated_parameters, shard_frozen_base

from conftest import _free_port
from test_llm import save_tiny, tokenized, toy_examples, write_glue

ROOT = Path(__file__).resolve().parents[1]
CRASHING = textwrap.dedent("""
    # train_glue.py interrupted at the start of epoch 2 on every rank (the job is then launched again with --resume,
    # as a crashed job is: a process group is created once per process)
    import sys
    from grft_vision.llm import cli
    from grft_vision.training import trainer

    class Crash(Exception):
        pass

    original = trainer.train_one_epoch

    def crashing(step, loader, epoch, progress=True):
        if epoch == 1:
            raise Crash
        return original(step, loader, epoch, progress)

    trainer.train_one_epoch = crashing
    try:
        cli.main(sys.argv[1:], cli.CONFIG_DIR)
    except Crash:
        sys.exit(0)
    sys.exit("the run was not interrupted")
""")


def test_replicated_parameters_are_the_adapter_owned_originals_and_other_dtypes():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
    model = LlamaForSequenceClassification(config).to(torch.bfloat16)
    keep_head_float32(model, ["score"])
    apply_grft(model, config=GRFTConfig(score="random", k=1, target_modules=["*layers.*"], train_norm=True))
    replicated = replicated_parameters(model)
    names = {name for name, param in model.named_parameters() if param in replicated}
    assert {name for name, param in model.named_parameters() if param.requires_grad} <= names  # fp32 updates, head
    assert "score.grft_owned.weight.original" in names  # fp32: another dtype than the body
    assert "model.norm.grft_owned.weight.original" in names  # an owned tensor's original
    sharded = [param for param in model.parameters() if param not in replicated]
    assert sharded and {param.dtype for param in sharded} == {torch.bfloat16}  # one dtype per FSDP group
    assert not any(param.requires_grad for param in sharded)  # FSDP never reduces a gradient
    with pytest.raises(ConfigError, match="launch it with torchrun"):
        shard_frozen_base(model, DistributedContext())
    with pytest.raises(ConfigError, match="--method full trains the base's weights"):
        GlueTrainConfig(fsdp=True, method="full")


@pytest.mark.slow
def test_two_gloo_processes_under_fsdp_with_a_resume_match_one_process(tmp_path):
    model_dir = save_tiny(tmp_path / "llama", "llama")
    data = write_glue(tmp_path / "glue", "cola", {"train": 32, "dev": 17})
    common = ["--dataset", "cola", "--model", str(model_dir), "--data-dir", str(data), "--max-length", "32",
              "--batch-size", "8", "--epochs", "2", "--lr", "3e-3", "--quiet", "--reg-lambda", "1e-3"]
    (tmp_path / "crashing.py").write_text(CRASHING)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(script: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), str(script), "--fsdp", *common, "--run-dir", str(tmp_path / "two"), *extra]

    launches = [[sys.executable, str(ROOT / "train_glue.py"), *common, "--run-dir", str(tmp_path / "one")],
                torchrun(tmp_path / "crashing.py"), torchrun(ROOT / "train_glue.py", "--resume")]
    for command in launches:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]

    one, two = (tmp_path / "one", tmp_path / "two")
    assert json.loads((one / "selection.json").read_text())["layers"] == \
        json.loads((two / "selection.json").read_text())["layers"]
    steps = []
    for run_dir in (one, two):
        events = EventAccumulator(str(run_dir / "tb"))
        events.Reload()
        steps.append([(event.step, event.value) for event in events.Scalars("train/loss")])
    assert [step for step, _ in steps[0]] == [step for step, _ in steps[1]] == list(range(1, 9))
    assert [value for _, value in steps[1]] == pytest.approx([value for _, value in steps[0]], rel=1e-5)
    histories = [json.loads((run_dir / "metrics.json").read_text())["history"] for run_dir in (one, two)]
    for first, second in zip(*histories):
        assert first["accuracy"] == second["accuracy"] and first["loss"] == pytest.approx(second["loss"], rel=1e-5)
    adapters = [load_file(run_dir / "adapter.safetensors") for run_dir in (one, two)]
    assert adapters[0].keys() == adapters[1].keys()
    for key, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][key], value, rtol=1e-4, atol=1e-6)

    tokenizer, dataset, collate = tokenized("llama", model_dir, toy_examples(8, 9))
    batch = collate([dataset[i] for i in range(8)])
    outputs = []
    for run_dir in (one, two):  # the adapter of a sharded run merges like any other
        model = merge_grft(load_adapter(load_classifier(str(model_dir), 2, load_tokenizer(str(model_dir))),
                                        run_dir / "adapter.safetensors"))
        with torch.no_grad():
            outputs.append(model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)


def test_memory_estimate_of_fsdp_uses_the_real_8b_shape():
    """benchmarks/llm_memory.py --fsdp (docs/llm.md): Llama-3.1-8B's parameter count, one GPU = no sharding."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("grft_bench_llm_memory_fsdp", ROOT / "benchmarks" / "llm_memory.py")
    llm_memory = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = llm_memory
    spec.loader.exec_module(llm_memory)
    with torch.device("meta"):
        model = LlamaForSequenceClassification(llm_memory.LLAMA_3_1_8B.llama_config(num_labels=2))
    assert llm_memory.count_parameters(llm_memory.LLAMA_3_1_8B) == sum(p.numel() for p in model.parameters())
    single = llm_memory.estimate_memory(llm_memory.LLAMA_3_1_8B, 16, 256, "grft")
    assert llm_memory.estimate_fsdp_memory(llm_memory.LLAMA_3_1_8B, 1)["total"] == pytest.approx(single["total"],
                                                                                               rel=1e-6)
    per_gpu = [llm_memory.estimate_fsdp_memory(llm_memory.LLAMA_3_1_8B, n)["total"] for n in (2, 4, 8)]
    assert per_gpu == sorted(per_gpu, reverse=True) and per_gpu[-1] < single["total"] / 4
