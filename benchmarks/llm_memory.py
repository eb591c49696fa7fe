"""Training memory of the language-model path: an analytic estimate for Llama shapes, and a CPU measurement.

GRFT freezes every weight (``requires_grad=False``): the frozen weights get no gradient and no optimizer
state, so training memory is the weights, the activations autograd saves, and a tiny trainable state
(updates + head, each with a gradient and two AdamW moments, fp32). The activations are about the same
as full fine-tuning's — every targeted linear layer saves its input for the gradient of its update — and
gradient checkpointing reduces them to one hidden state per layer plus one layer's activations.

``python benchmarks/llm_memory.py`` prints the estimate for Llama-3.2-1B (bf16, batch 16 x 256 tokens);
``python benchmarks/llm_memory.py --fsdp`` the per-GPU estimate of ``train_glue.py --fsdp`` for Llama-3.2-1B and
Llama-3.1-8B on 1 to 8 GPUs;
``python benchmarks/llm_memory.py --measure`` measures a small Llama on the CPU (peak RSS of a fresh process
and the bytes autograd saves), for GRFT and full fine-tuning, with and without checkpointing. Needs
``pip install 'grft-vision[llm]'``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["LlamaShape", "LLAMA_3_2_1B", "LLAMA_3_1_8B", "count_parameters", "trainable_parameters",
           "estimate_memory", "estimate_fsdp_memory", "measure_training_memory"]

GIB = 2**30


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of a Llama model (``LlamaConfig`` names in brackets)."""

    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim
    intermediate: int  # intermediate_size
    vocab: int  # vocab_size

    def linear_shapes(self) -> list[tuple[int, int]]:
        """``(out, in)`` of the 7 linear layers of one decoder layer: q, k, v, o, gate, up, down."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, f = self.hidden, self.intermediate
        return [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)]

    def llama_config(self, **options: Any):
        """The matching ``transformers.LlamaConfig``."""
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, head_dim=self.head_dim, **options)


# meta-llama/Llama-3.2-1B's published config.json (tied embeddings; no biases)
LLAMA_3_2_1B = LlamaShape(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192, vocab=128256)
# meta-llama/Llama-3.1-8B's published config.json (untied embeddings; a classifier has no lm_head)
LLAMA_3_1_8B = LlamaShape(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256)


def count_parameters(shape: LlamaShape, num_classes: int = 2) -> int:
    """Parameters of ``LlamaForSequenceClassification``: embeddings, layers (2 norms each), final norm, score head."""
    per_layer = sum(out * inp for out, inp in shape.linear_shapes()) + 2 * shape.hidden
    return shape.vocab * shape.hidden + shape.layers * per_layer + shape.hidden + shape.hidden * num_classes


def trainable_parameters(shape: LlamaShape, structure: str = "row", k: int = 3, num_classes: int = 2) -> int:
    """GRFT's trainable parameters: k rows (k*in) / columns (k*out) / per-row entries (k*out) of every
    linear layer of the decoder layers, plus the fully trained head (no biases in Llama)."""
    per_row = {"row": lambda out, inp: k * inp, "column": lambda out, inp: k * out,
               "sparse": lambda out, inp: k * out}[structure]
    return shape.layers * sum(per_row(out, inp) for out, inp in shape.linear_shapes()) + shape.hidden * num_classes


def _activation_bytes_per_token_layer(shape: LlamaShape, act_bytes: int) -> int:
    """Bytes autograd keeps per token per decoder layer (SDPA with a fused kernel: q, k, v, output, logsumexp).

    RMSNorm keeps an fp32 copy of its input (2 norms); every linear keeps its input for its update's
    gradient (q/k/v share one); attention keeps q, k, v, its output and the fp32 logsumexp per head; the
    o_proj input is a reshaped copy of the output; SwiGLU keeps gate, up, silu(gate) and the down input.
    """
    h, f = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * 4 * h
    linear_inputs = act_bytes * (h + q + h)  # q/k/v input, o_proj input, gate/up input
    attention = act_bytes * (q + 2 * kv + q) + 4 * shape.heads
    mlp = act_bytes * 4 * f
    return norms + linear_inputs + attention + mlp


def estimate_memory(shape: LlamaShape = LLAMA_3_2_1B, batch: int = 16, seq: int = 256, method: str = "grft",
                    structure: str = "row", k: int = 3, checkpointing: bool = False, weight_bytes: int = 2,
                    act_bytes: int = 2, num_classes: int = 2) -> dict[str, float]:
    """Analytic training memory in GiB (weights, trainable state, activations, total); an estimate, not measured.

    ``method='full'``: every weight trains, with a gradient in the weight dtype and two fp32 AdamW moments.
    Not counted: the CUDA context and allocator slack (typically 0.5-1 GiB), and transient backward buffers.
    """
    total = count_parameters(shape, num_classes)
    tokens = batch * seq
    per_layer = _activation_bytes_per_token_layer(shape, act_bytes) * tokens
    if checkpointing:  # one saved hidden state per layer + one layer recomputed during backward
        activations = shape.layers * tokens * shape.hidden * act_bytes + per_layer
    else:
        activations = shape.layers * per_layer
    activations += tokens * shape.hidden * 4  # final norm's fp32 copy
    if method == "grft":
        trainable = trainable_parameters(shape, structure, k, num_classes)
        state = trainable * 16  # fp32 value, gradient, two AdamW moments
    elif method == "full":
        trainable = total
        state = total * (weight_bytes + 8)  # gradient in the weight dtype, two fp32 moments
    else:
        raise ValueError(f"method={method!r} must be 'grft' or 'full'.")
    weights = total * weight_bytes
    return {"weights": weights / GIB, "trainable_state": state / GIB, "activations": activations / GIB,
            "total": (weights + state + activations) / GIB, "trainable": trainable, "parameters": total}


def estimate_selection_memory(shape: LlamaShape = LLAMA_3_2_1B, batch: int = 16, seq: int = 256,
                              checkpointing: bool = False, weight_bytes: int = 2, act_bytes: int = 2) -> dict[str, float]:
    """Analytic memory (GiB) of the selection pass: weights, the fp32 gradient sums of every targeted weight,
    their half-precision gradients of one backward, and the activations (an estimate, not measured)."""
    targeted = shape.layers * sum(out * inp for out, inp in shape.linear_shapes())
    base = estimate_memory(shape, batch, seq, "grft", checkpointing=checkpointing, weight_bytes=weight_bytes,
                           act_bytes=act_bytes)
    sums = targeted * 4 / GIB
    grads = targeted * weight_bytes / GIB if weight_bytes != 4 else 0.0
    return {"weights": base["weights"], "gradient_sums": sums, "gradients": grads,
            "activations": base["activations"], "total": base["weights"] + sums + grads + base["activations"]}


def estimate_fsdp_memory(shape: LlamaShape, gpus: int, batch: int = 16, seq: int = 256, k: int = 3,
                         checkpointing: bool = False, weight_bytes: int = 2, act_bytes: int = 2,
                         num_classes: int = 2) -> dict[str, float]:
    """Analytic per-GPU memory (GiB) of ``train_glue.py --fsdp`` on ``gpus`` GPUs (an estimate, not measured).

    ``shards``: 1/gpus of every frozen weight (bf16); ``gathered``: what FSDP2 holds all-gathered at a time, the
    larger of the token embedding (forward only) and two decoder layers (the one computing and the one
    prefetched); ``trainable_state``: the adapter and the head, whole on every GPU (fp32 value, gradient, two
    AdamW moments); ``activations``: those of the ``batch / gpus`` sequences each GPU computes. With one GPU
    it is :func:`estimate_memory` (nothing sharded, nothing gathered).
    """
    single = estimate_memory(shape, max(batch // gpus, 1), seq, "grft", "row", k, checkpointing, weight_bytes,
                             act_bytes, num_classes)
    frozen = (count_parameters(shape, num_classes) - shape.hidden * num_classes) * weight_bytes
    layer = (sum(out * inp for out, inp in shape.linear_shapes()) + 2 * shape.hidden) * weight_bytes
    gathered = max(shape.vocab * shape.hidden * weight_bytes, 2 * layer) if gpus > 1 else 0
    shards = frozen / gpus + shape.hidden * num_classes * 4  # the fp32 head's original stays whole
    total = shards + gathered + single["trainable_state"] * GIB + single["activations"] * GIB
    return {"shards": shards / GIB, "gathered": gathered / GIB, "trainable_state": single["trainable_state"],
            "activations": single["activations"], "total": total / GIB}


def _print_fsdp(batch: int, seq: int) -> None:
    print(f"train_glue.py --fsdp, rows k=3, bf16 weights, global batch {batch} x {seq} tokens: per-GPU estimate "
          "(not measured), GiB")
    print("| model | GPUs | checkpointing | shards | gathered | trainable state | activations | total | "
          "at load (full bf16) | selection on rank 0 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, shape in (("Llama-3.2-1B", LLAMA_3_2_1B), ("Llama-3.1-8B", LLAMA_3_1_8B)):
        load = count_parameters(shape) * 2 / GIB
        for checkpointing in (False, True):
            selection = estimate_selection_memory(shape, batch, seq, checkpointing)["total"]
            for gpus in (1, 2, 4, 8):
                e = estimate_fsdp_memory(shape, gpus, batch, seq, checkpointing=checkpointing)
                gpu_label = gpus if gpus > 1 else "1 (no FSDP)"
                print(f"| {label} | {gpu_label} | {checkpointing} | {e['shards']:.2f} | {e['gathered']:.2f} | "
                      f"{e['trainable_state']:.3f} | {e['activations']:.2f} | **{e['total']:.2f}** | {load:.2f} | "
                      f"{selection:.1f} |")


# ----------------------------------------------------------------------------------------------- measurement
SMALL_LLAMA = LlamaShape(hidden=256, layers=4, heads=8, kv_heads=2, head_dim=32, intermediate=1024, vocab=8192)


def _rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def measure_training_memory(shape: LlamaShape = SMALL_LLAMA, batch: int = 16, seq: int = 256, method: str = "grft",
                            checkpointing: bool = False, steps: int = 2, k: int = 3) -> dict[str, Any]:
    """Train ``steps`` AdamW steps of a random ``LlamaForSequenceClassification`` on the CPU (fp32) and measure.

    Run it in a fresh process (``--measure`` does): the peak RSS is a high-water mark of the process.

    Returns:
        ``rss_before`` (GiB, model built and wrapped), ``peak_rss`` (GiB, during training),
        ``peak_delta`` (their difference: activations, gradients, optimizer state, temporaries),
        ``saved_activations`` (GiB autograd saved in one forward, unique storages, parameters excluded),
        ``trainable``, the settings, and the analytic ``estimate`` for the same shape in fp32.
    """
    import torch
    from transformers import LlamaForSequenceClassification

    from grft_vision import GRFTConfig, apply_grft

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(shape.llama_config(num_labels=2, pad_token_id=0, use_cache=False))
    if checkpointing:
        from grft_vision.llm.modeling import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    if method == "grft":
        scores = {f"{name}.weight": torch.rand(module.weight.shape) for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear)}
        apply_grft(model, scores, GRFTConfig(structure="row", k=k, target_modules=["*layers.*"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(1, shape.vocab, (batch, seq), generator=generator)
    mask = torch.ones_like(inputs)
    labels = torch.randint(0, 2, (batch,), generator=generator)
    rss_before = _rss_gib()
    saved: dict[int, int] = {}
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                logits = model(input_ids=inputs, attention_mask=mask).logits
        else:
            logits = model(input_ids=inputs, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
    estimate = estimate_memory(shape, batch, seq, method, "row", k, checkpointing, weight_bytes=4, act_bytes=4)
    return {"method": method, "checkpointing": checkpointing, "shape": asdict(shape), "batch": batch, "seq": seq,
            "trainable": sum(p.numel() for p in params), "rss_before": rss_before, "peak_rss": _peak_rss_gib(),
            "peak_delta": _peak_rss_gib() - rss_before, "saved_activations": sum(saved.values()) / GIB,
            "estimate": estimate}


def _measure_all(batch: int, seq: int, steps: int) -> list[dict[str, Any]]:
    results = []
    for method in ("grft", "full"):
        for checkpointing in (False, True):
            code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
                    "from llm_memory import measure_training_memory as m; "
                    f"print(json.dumps(m(batch={batch}, seq={seq}, method={method!r}, "
                    f"checkpointing={checkpointing}, steps={steps})))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", action="store_true", help="measure a small Llama on the CPU")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--fsdp", action="store_true", help="per-GPU estimate of train_glue.py --fsdp (1B, 8B)")
    args = parser.parse_args(argv)
    if args.fsdp:
        _print_fsdp(args.batch, args.seq)
        return 0
    if args.measure:
        print(f"small Llama {asdict(SMALL_LLAMA)}, fp32 on CPU, batch {args.batch} x {args.seq} tokens, AdamW")
        print("| method | checkpointing | trainable | RSS before (GiB) | peak RSS (GiB) | peak - before (GiB) "
              "| saved activations (GiB) | estimate: activations (GiB) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in _measure_all(args.batch, args.seq, args.steps):
            print(f"| {r['method']} | {r['checkpointing']} | {r['trainable']:,} | {r['rss_before']:.3f} | "
                  f"{r['peak_rss']:.3f} | {r['peak_delta']:.3f} | {r['saved_activations']:.3f} | "
                  f"{r['estimate']['activations']:.3f} |")
        return 0
    print(f"Llama-3.2-1B {asdict(LLAMA_3_2_1B)}: estimate (not measured), batch {args.batch} x {args.seq} tokens")
    print("| method | weights | checkpointing | weights (GiB) | trainable state (GiB) | activations (GiB) | total (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for method, weight_bytes, label in (("grft", 2, "bf16"), ("full", 2, "bf16 + fp32 AdamW")):
        for checkpointing in (False, True):
            e = estimate_memory(LLAMA_3_2_1B, args.batch, args.seq, method, checkpointing=checkpointing,
                                weight_bytes=weight_bytes)
            print(f"| {method} | {label} | {checkpointing} | {e['weights']:.2f} | {e['trainable_state']:.3f} | "
                  f"{e['activations']:.2f} | {e['total']:.2f} |")
    for checkpointing in (False, True):
        s = estimate_selection_memory(LLAMA_3_2_1B, args.batch, args.seq, checkpointing)
        print(f"| selection | bf16 | {checkpointing} | {s['weights']:.2f} | sums {s['gradient_sums']:.2f} + grads "
              f"{s['gradients']:.2f} | {s['activations']:.2f} | {s['total']:.2f} |")
    trainable, total = trainable_parameters(LLAMA_3_2_1B), count_parameters(LLAMA_3_2_1B)
    print(f"GRFT rows k=3: {trainable:,} of {total:,} parameters = {100 * trainable / total:.4f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
