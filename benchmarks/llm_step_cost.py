"""Cost of one training step of a Llama-architecture language model, every fine-tuning method side by side.

The language-model counterpart of ``step_cost.py``, with the same measurement pieces (``benchkit``: FLOP
counter, saved-for-backward bytes, gradient / optimizer bytes, interleaved timing, markdown). A model is built
from a ``transformers.LlamaConfig`` with random weights (no download; weights do not change the cost) and
trained on one random batch of token ids.

Methods: the registry :data:`METHODS` (full fine-tuning; PEFT LoRA, r=8, on q/k/v/o/gate/up/down of every
decoder layer; GRFT rows / columns / sparse entries on the same linears, k matched to LoRA's trainable count;
PEFT's sparse peers SHiRA and Super-Tuning on the same linears at grft-sparse's trainable count; the frozen
floor; ``docs/benchmarks.md`` describes each). A new method is one registration::

    @METHODS.register("my-method", description="what it trains")
    def setup_my_method(model: nn.Module, context: SetupContext) -> Setup:
        ...  # model: a fresh copy of the Llama; return Setup(TokenLoss(model, task), optimizer, trainable)

Figures per method: trainable parameters, FLOPs of forward + backward, bytes saved for backward, gradient
and optimizer-state bytes, the bytes of the file it saves (GRFT: ``save_adapter``; PEFT methods:
``save_pretrained``'s weights and config; ``full``: the whole model), the **peak memory of the method in its own
process** (a fresh Python process per method: peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA, over
``--peak-steps`` training steps after the setup), and the step time (median, methods interleaved in one
process); every figure also as ratios to ``floor``, ``full`` and ``lora`` from the same run.

Run as a script (CPU default: about 110 M parameters, hidden 768, 12 layers, batch 4 x 256 tokens)::

    python benchmarks/llm_step_cost.py --threads 1 --timer cpu --out llm_step_cost.json --markdown llm_step_cost.md
    python benchmarks/llm_step_cost.py --quantize nf4 --threads 1 --timer cpu   # QLoRA vs GRFT on a 4-bit base
    python benchmarks/llm_step_cost.py --preset llama-3.2-1b --device cuda --dtype bfloat16 --batch-size 8 --seq-len 512

or call :func:`measure`, :func:`check_targets` and :func:`to_markdown` from Python. Needs
``pip install -e ".[bench,llm]"``.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import datetime
import gc
import importlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from benchkit.cli import add_step_cost_arguments
from benchkit.compare import add_ratios, check_timer, time_interleaved, torch_threads
from benchkit.memory import ADAM_BYTES_PER_PARAM, MB, file_bytes, save_whole_model, trainable_bytes
from benchkit.peers import peer_checks, peer_counts_markdown, peft_peer, peft_save
from benchkit.registry import MethodRegistry
from benchkit.report import (check, command_line, device_name, exit_status, fmt, fmt_ratio, load_average,
                             load_average_line, markdown_table, progress_logger, publish, step_detail_markdown,
                             targets_markdown)
from benchkit.step import Setup, StepCostMethod, instrumented_step, profile_step, train_step
from benchkit.trainable import adam, trainable_parameters
from grft_vision import GRFTConfig, apply_grft, save_adapter, trainable_parameters_report
from grft_vision.tuner.quantized import QUANT_TYPES, quantize_model, weight_shape
from llm_memory import LLAMA_3_2_1B, LlamaShape

__all__ = ["SetupContext", "METHODS", "PRESETS", "LORA_TARGETS", "Workload", "TokenLoss", "build_model", "make_batch",
           "adapted_linears", "matching_k", "matched_ks", "sparse_trainable", "measure", "peak_memory_of",
           "check_targets", "to_markdown", "run", "main"]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRESETS = {
    # the CPU default: about 110 M parameters with tied embeddings
    "cpu-100m": LlamaShape(hidden=768, layers=12, heads=12, kv_heads=12, head_dim=64, intermediate=2048, vocab=32000),
    "llama-3.2-1b": LLAMA_3_2_1B,
    # for tests and the CPU check of gpu_suite.sh
    "tiny": LlamaShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=512),
}
TASKS = ("causal-lm", "classify")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------- workload
@dataclass(frozen=True)
class Workload:
    """One model and one batch: what every method trains on (and what a child process rebuilds)."""

    shape: LlamaShape
    batch_size: int = 4
    seq_len: int = 256
    task: str = "causal-lm"  # next-token loss over every position, or a sequence classifier ("classify")
    num_classes: int = 2  # classify only
    dtype: str = "float32"  # every tensor of the model; LoRA's and GRFT's trained tensors stay fp32
    device: str = "cpu"
    lora_rank: int = 8
    lr: float = 1e-4
    seed: int = 0
    quantize: str | None = None  # the decoder layers' linears in bitsandbytes 4/8 bits (QLoRA); head, embeddings kept

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} must be one of {', '.join(TASKS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {', '.join(DTYPES)}")
        if self.quantize is not None and self.quantize not in QUANT_TYPES:
            raise ValueError(f"quantize={self.quantize!r} must be one of {', '.join(QUANT_TYPES)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Workload":
        """The inverse of ``dataclasses.asdict``."""
        return cls(**{**values, "shape": LlamaShape(**values["shape"])})


class TokenLoss(nn.Module):
    """A Llama model whose output is what ``F.cross_entropy`` takes with the batch's labels.

    ``forward(input_ids [N, T] int64)`` returns fp32 logits: ``[N*T, vocab]`` for ``causal-lm`` (the labels
    are the next tokens, ``-100`` at each sequence's last position, as transformers' own loss shifts them),
    ``[N, classes]`` for ``classify`` (the last token's, as ``LlamaForSequenceClassification`` pools).
    """

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, use_cache=False).logits.float()
        return logits.view(-1, logits.shape[-1]) if self.task == "causal-lm" else logits


def build_model(workload: Workload) -> nn.Module:
    """The randomly initialised Llama (``LlamaForCausalLM``, tied embeddings, or ``...ForSequenceClassification``)
    in ``workload.dtype`` on its device, in train mode; seeded, so every process builds the same weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(workload.seed)
    config = workload.shape.llama_config(
        tie_word_embeddings=True, use_cache=False, attn_implementation="sdpa", pad_token_id=0,
        num_labels=workload.num_classes, max_position_embeddings=max(2048, workload.seq_len))
    factory = AutoModelForCausalLM if workload.task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device(workload.device):
        model = factory.from_config(config, dtype=DTYPES[workload.dtype])
    if workload.quantize is not None:  # what QLoRA quantizes: every decoder linear, never the head
        quantize_model(model, workload.quantize, compute_dtype=DTYPES[workload.dtype], skip_modules=["lm_head", "score"])
    return model.to(workload.device).train()


def make_batch(workload: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids ``[N, T]`` (never the pad id 0) and their labels: ``[N*T]`` next tokens for
    ``causal-lm``, ``[N]`` classes for ``classify``."""
    generator = torch.Generator().manual_seed(workload.seed + 1)
    ids = torch.randint(1, workload.shape.vocab, (workload.batch_size, workload.seq_len), generator=generator)
    if workload.task == "causal-lm":
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).reshape(-1)
    else:
        labels = torch.randint(0, workload.num_classes, (workload.batch_size,), generator=generator)
    return ids.to(workload.device), labels.to(workload.device)


def adapted_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears LoRA and GRFT adapt: q/k/v/o/gate/up/down of every decoder layer, by module name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".layers." in f".{name}" and name.rsplit(".", 1)[-1] in LORA_TARGETS}


def lora_adapter_count(layers: dict[str, nn.Linear], rank: int) -> int:
    """LoRA's trainable parameters in ``layers``: ``rank * (in + out)`` per layer (A and B)."""
    return sum(rank * (layer.in_features + layer.out_features) for layer in layers.values())


def matching_k(layers: dict[str, nn.Linear], structure: str, target: int) -> int:
    """The k whose GRFT updates in ``layers`` hold the count nearest ``target``.

    One row of a layer holds ``in`` parameters, one column ``out``, one entry per row ``out``; k is at least 1
    and at most the smallest dimension it selects from.
    """
    per_unit = sum(layer.in_features if structure == "row" else layer.out_features for layer in layers.values())
    max_k = min(layer.out_features if structure == "row" else layer.in_features for layer in layers.values())
    exact = target / per_unit
    candidates = {min(max_k, max(1, k)) for k in (math.floor(exact), math.ceil(exact))}
    return min(sorted(candidates), key=lambda k: abs(k * per_unit - target))


# --------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class SetupContext:
    """What a method's setup may use besides its copy of the model."""

    workload: Workload
    k: int | None = None  # GRFT: the k nearest LoRA's trainable count (:func:`matching_k`); None otherwise
    sparse_k: int | None = None  # grft-sparse's k: SHiRA and Super-Tuning match its trainable count


METHODS: MethodRegistry[StepCostMethod] = MethodRegistry(StepCostMethod)


@METHODS.register("full", description="full fine-tuning, Adam over every parameter")
def setup_full(model: nn.Module, context: SetupContext) -> Setup:
    model.requires_grad_(True)
    return Setup(TokenLoss(model, context.workload.task), adam(model, context.workload.lr),
                 sum(p.numel() for p in model.parameters()), save=lambda path: save_whole_model(model, path))


@METHODS.register("lora", description="PEFT LoRA r=8 on q/k/v/o/gate/up/down of every decoder layer",
                  imports=("peft.tuners.lora",))
def setup_lora(model: nn.Module, context: SetupContext) -> Setup:
    from peft import LoraConfig, get_peft_model

    workload = context.workload
    targets = sorted(adapted_linears(model))
    heads = ["score"] if workload.task == "classify" else None
    config = LoraConfig(r=workload.lora_rank, lora_alpha=workload.lora_rank, lora_dropout=0.0, bias="none",
                        target_modules=targets, modules_to_save=heads)
    model = get_peft_model(model, config)
    count = sum(p.numel() for p in trainable_parameters(model))
    return Setup(TokenLoss(model, workload.task), adam(model, workload.lr), count, save=peft_save(model),
                 notes=[f"LoRA on {len(targets)} linears"])


def grft_setup(structure: str) -> Callable[[nn.Module, SetupContext], Setup]:
    """The setup of GRFT with ``structure`` on :func:`adapted_linears`: random scores, ``context.k`` per weight."""

    def setup(model: nn.Module, context: SetupContext) -> Setup:
        workload = context.workload
        layers = adapted_linears(model)
        generator = torch.Generator(device=workload.device).manual_seed(workload.seed)
        scores = {f"{layer_name}.weight": torch.rand(weight_shape(layer), generator=generator, device=workload.device)
                  for layer_name, layer in layers.items()}
        config = GRFTConfig(structure=structure, k=context.k, target_modules=sorted(layers))
        model = apply_grft(model, scores, config)
        del scores
        return Setup(TokenLoss(model, workload.task), adam(model, workload.lr),
                     trainable_parameters_report(model).trainable, notes=[f"k={context.k}"],
                     save=lambda path: save_adapter(model, path.with_suffix(".safetensors")))

    return setup


for _name, _structure, _description in (
        ("grft-row", "row", "grft_vision structure='row' on the same linears, k rows matching LoRA's count"),
        ("grft-col", "column", "grft_vision structure='column' on the same linears, k columns matching LoRA's count"),
        ("grft-sparse", "sparse",
         "grft_vision structure='sparse' on the same linears, k entries per row matching LoRA's count")):
    METHODS.register(_name, description=_description, structure=_structure)(grft_setup(_structure))


def _heads(workload: Workload) -> list[str] | None:
    """The modules trained whole besides the adapted linears: the classifier's ``score`` head (``classify``)."""
    return ["score"] if workload.task == "classify" else None


def sparse_trainable(layers: dict[str, nn.Linear], sparse_k: int, model: nn.Module, workload: Workload) -> int:
    """grft-sparse's trainable count: ``sparse_k`` entries per row of every adapted linear (Llama's linears have no
    bias) and the head it trains whole (``classify``)."""
    head = sum(p.numel() for name in _heads(workload) or () for p in model.get_submodule(name).parameters())
    return sparse_k * sum(layer.out_features for layer in layers.values()) + head


def peer_setup(peer: str) -> Callable[[nn.Module, SetupContext], Setup]:
    """The setup of a PEFT sparse peer (``benchkit.peers``) on :func:`adapted_linears`, at the trainable count
    nearest grft-sparse's (``context.sparse_k``)."""

    def setup(model: nn.Module, context: SetupContext) -> Setup:
        workload = context.workload
        if context.sparse_k is None:
            raise ValueError(f"{peer} matches grft-sparse's trainable count: the context needs its k (sparse_k)")
        layers = adapted_linears(model)
        count = sparse_trainable(layers, context.sparse_k, model, workload)
        model, details = peft_peer(model, peer, sorted(layers), count, _heads(workload), seed=workload.seed)
        trainable = sum(p.numel() for p in trainable_parameters(model))
        setting = (f"r={details['shira_r']}" if peer == "shira"
                   else f"sparsity={details['supertuning_sparsity']:.6f}")
        notes = [f"{peer} {setting} on {len(layers)} linears: {trainable:,} trainable against grft-sparse's "
                 f"{count:,} ({trainable / count:.3f} x; the count moves in steps of up to {details['count_step']:,})"]
        return Setup(TokenLoss(model, workload.task), adam(model, workload.lr), trainable, save=peft_save(model),
                     notes=notes, details=details)

    return setup


for _name, _description in (
        ("shira", "PEFT SHiRA: r(in+out) random entries of the same linears, r nearest grft-sparse's count"),
        ("supertuning", "PEFT Super-Tuning: the largest-magnitude entries of the same linears at the sparsity "
                        "nearest grft-sparse's count")):
    METHODS.register(_name, description=_description, imports=(f"peft.tuners.{_name}",))(peer_setup(_name))


@METHODS.register("floor", description="all frozen, backward of the loss to the input embeddings (no weight gradients)")
def setup_floor(model: nn.Module, context: SetupContext) -> Setup:
    model.requires_grad_(False)
    model.enable_input_require_grads()  # the embedding output requires grad: backward runs down to it
    return Setup(TokenLoss(model, context.workload.task), None, 0)


# what trains on a quantized base: LoRA is then QLoRA (PEFT on bitsandbytes layers), GRFT adds to the quantized layers
QUANTIZED_METHODS = ("floor", "lora", "grft-row", "grft-col", "grft-sparse")


def matched_ks(layers: dict[str, nn.Linear], lora_count: int) -> dict[str, int]:
    """The k of every GRFT method (by method name) whose trainable count in ``layers`` is nearest ``lora_count``."""
    return {method.name: matching_k(layers, method.structure, lora_count) for method in METHODS.values()
            if method.structure is not None}


def _build(method: str, model: nn.Module, workload: Workload, ks: dict[str, int]) -> Setup:
    return METHODS[method].build(model, SetupContext(workload, ks.get(method), ks.get("grft-sparse")))


# --------------------------------------------------------------------------------------------- peak memory
def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Return freed heap to the OS (glibc ``malloc_trim``), then reset the RSS high-water mark
    (``VmHWM``, by writing 5 to ``/proc/self/clear_refs``); False where the kernel does not allow it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def _peak_rss_bytes() -> int:
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _import_libraries(method: str) -> None:
    """Import what building and training ``method`` loads, so that a process's baseline already holds it (the
    library and ``benchkit`` came with this module's own imports)."""
    import transformers.models.llama.modeling_llama  # noqa: F401

    for module in METHODS[method].imports:
        importlib.import_module(module)


def peak_memory_of(method: str, workload: Workload, ks: dict[str, int], steps: int = 2,
                   threads: int | None = None) -> dict[str, Any]:
    """Build ``method`` alone and train ``steps`` steps; the peak memory of those steps (call it in a fresh process).

    ``peak_memory_bytes`` counts the weights, the method's trainable state, activations and temporaries, and
    nothing of the setup's temporaries (GRFT's scores, the random initialisation):

    - CUDA: ``torch.cuda.max_memory_allocated``, reset after the setup;
    - CPU: the peak RSS of the steps (``VmHWM``, reset after the setup with freed heap returned to the OS
      first) minus the process's RSS before the model was built (``process_baseline_bytes``: the interpreter
      and the libraries ``method`` needs, imported first). Where the kernel does not let ``VmHWM`` be reset,
      the peak of the whole process (``ru_maxrss``) is used, and ``peak_memory_kind`` says so.

    Returns:
        ``peak_memory_bytes``, ``memory_before_steps_bytes`` (model and method set up, on the same scale),
        ``process_baseline_bytes`` and ``peak_rss_bytes`` (CPU; 0 and None on CUDA), ``peak_memory_kind``,
        ``peak_steps`` and the process's ``pid``.
    """
    if steps < 2:
        raise ValueError(f"steps={steps}: at least 2, so that Adam's moments exist during a backward")
    if threads is not None:
        torch.set_num_threads(threads)
    _import_libraries(method)
    device = torch.device(workload.device)
    cuda = device.type == "cuda"
    baseline = 0 if cuda else _proc_status_bytes("VmRSS") or 0
    setup = _build(method, build_model(workload), workload, ks)
    input_ids, labels = make_batch(workload)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        kind = "torch.cuda.max_memory_allocated"
    else:
        kind = ("peak RSS of the steps above the process baseline" if _reset_peak_rss()
                else "peak RSS of the whole process (ru_maxrss) above the process baseline")
        before = (_proc_status_bytes("VmRSS") or 0) - baseline
    for _ in range(steps):
        train_step(setup, input_ids, labels)
    rss = None if cuda else _peak_rss_bytes()
    peak = torch.cuda.max_memory_allocated(device) if cuda else rss - baseline
    return {"peak_memory_bytes": int(peak), "memory_before_steps_bytes": int(before),
            "process_baseline_bytes": int(baseline), "peak_rss_bytes": rss, "peak_memory_kind": kind,
            "peak_steps": steps, "pid": os.getpid()}


def _peak_memory_in_subprocess(method: str, workload: Workload, ks: dict[str, int], steps: int,
                               threads: int | None) -> dict[str, Any]:
    payload = json.dumps({"method": method, "workload": dataclasses.asdict(workload), "ks": ks, "steps": steps,
                          "threads": threads})
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--peak-memory-child", payload],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the peak-memory process of {method} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child_main(payload: str) -> int:
    values = json.loads(payload)
    workload = Workload.from_dict(values["workload"])
    figures = peak_memory_of(values["method"], workload, values["ks"], values["steps"], values["threads"])
    print(json.dumps(figures))
    return 0


# --------------------------------------------------------------------------------------------- measure
def measure(workload: Workload, methods: Sequence[str] | None = None, *, repeats: int = 5, warmup: int = 2,
            timer: str = "wall", threads: int | None = None, peak_steps: int = 2, profile: bool = False,
            progress: bool = False) -> list[dict[str, Any]]:
    """Measure every method on ``workload``; one dict of figures per method, in ``methods`` order (None: every
    registered method).

    First each method's peak memory, each in a fresh process (:func:`peak_memory_of`, ``peak_steps``
    steps; 0 skips it). Then, in this process, every method from a deep copy of the same model: its first
    step instrumented (FLOPs, saved-for-backward bytes, gradient and optimizer bytes:
    ``benchkit.step.instrumented_step``), then ``warmup`` + ``repeats`` interleaved timing rounds
    (``benchkit.compare.time_interleaved``; ``timer`` 'wall' or 'cpu'). Ratios to ``floor``, ``full`` and ``lora``
    are added for the methods in the run. GRFT's k per structure is the one nearest LoRA's adapter count.
    """
    methods = (QUANTIZED_METHODS if workload.quantize else METHODS.names()) if methods is None else methods
    METHODS.check(methods)
    refused = [name for name in methods if workload.quantize and name not in QUANTIZED_METHODS]
    if refused:
        raise ValueError(f"--quantize keeps the base frozen in {workload.quantize}: {', '.join(refused)} cannot train on "
                         f"it (the methods that can: {', '.join(QUANTIZED_METHODS)})")
    check_timer(timer)
    if peak_steps == 1 or peak_steps < 0:
        raise ValueError(f"peak_steps={peak_steps} must be 0 (skip) or at least 2 (Adam's moments exist from step 2)")
    with torch_threads(threads):
        return _measure(workload, methods, repeats=repeats, warmup=warmup, timer=timer, threads=threads,
                        peak_steps=peak_steps, profile=profile, progress=progress)


def _measure(workload: Workload, methods: Sequence[str], *, repeats: int, warmup: int, timer: str,
             threads: int | None, peak_steps: int, profile: bool, progress: bool) -> list[dict[str, Any]]:
    log = progress_logger("llm_step_cost", progress)
    base = build_model(workload)
    input_ids, labels = make_batch(workload)
    layers = adapted_linears(base)
    lora_count = lora_adapter_count(layers, workload.lora_rank)
    ks = matched_ks(layers, lora_count)
    total = sum(p.numel() for p in base.parameters())

    peaks: dict[str, dict[str, Any]] = {}
    if peak_steps:
        del base  # not resident while the methods' own processes run
        if torch.device(workload.device).type == "cuda":
            torch.cuda.empty_cache()
        for name in methods:
            log(f"peak memory of {name} in its own process")
            peaks[name] = _peak_memory_in_subprocess(name, workload, ks, peak_steps, threads)
        base = build_model(workload)

    setups: dict[str, Setup] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in methods:
        log(f"set up and instrumented step: {name}")
        setup = setups[name] = _build(name, copy.deepcopy(base), workload, ks)
        tensor_bytes = trainable_bytes(setup.model)
        figures = instrumented_step(setup, input_ids, labels)
        figures.pop("peak_memory_bytes")  # this process holds every method; the peak comes from its own process
        rows[name] = {
            "method": name, "description": METHODS[name].description, "trainable_params": setup.trainable,
            "requires_grad_params": sum(p.numel() for p in trainable_parameters(setup.model)),
            "trainable_tensor_bytes": tensor_bytes, "total_params": total, "k": ks.get(name),
            "lora_adapter_params": lora_count, "adapted_linears": len(layers), **figures,
            **peaks.get(name, {"peak_memory_bytes": None}), **setup.details, "notes": list(setup.notes),
        }
    del base
    for name, figures in time_interleaved(setups, input_ids, labels, warmup=warmup, repeats=repeats, timer=timer,
                                          log=log).items():
        rows[name].update(figures)
    if profile:
        for name in methods:
            log(f"profile {name}")
            rows[name]["profile_s"] = profile_step(setups[name], input_ids, labels)
    with tempfile.TemporaryDirectory() as folder:
        for name in methods:
            save = setups[name].save
            rows[name]["file_bytes"] = None if save is None else file_bytes(save(Path(folder) / name))
    del setups
    add_ratios(rows, ("floor", "full", "lora"),
               {"flops": "flops", "saved": "saved_bytes", "time": "step_time_s", "peak": "peak_memory_bytes"})
    return [rows[name] for name in methods]


# --------------------------------------------------------------------------------------------- targets
def check_targets(rows: list[dict[str, Any]], quantized: bool = False) -> list[dict[str, Any]]:
    """The byte identities and the issue's LLM targets, each with the measured value and pass/fail.

    On a quantized base (``quantized``) ``lora`` is QLoRA and the targets are issue 23's: grft-col's peak
    ≤ 0.80 × and step ≤ 0.90 × QLoRA's. Targets whose methods (or peak memory) were not measured are left out.
    """
    by = {row["method"]: row for row in rows}
    checks = []
    for name, row in by.items():
        if name == "floor":
            continue
        value = row["grad_bytes"] + row["optimizer_state_bytes"] - row["optimizer_step_scalar_bytes"]
        analytic = 3 * row["trainable_tensor_bytes"]
        checks.append(check(f"grad + Adam moments {name} = 3 x its trainable tensors' bytes", value,
                             f"== {analytic}", value == analytic))
        if name in METHODS and METHODS[name].structure is not None:
            analytic = ADAM_BYTES_PER_PARAM * row["trainable_params"]
            checks.append(check(f"grad + Adam moments {name} = 12 B x trainable", value, f"== {analytic}",
                                 value == analytic))
    if "grft-col" in by:
        col = by["grft-col"]
        for reference, limit in ((("lora", 0.80),) if quantized else (("lora", 0.85), ("full", 0.40))):
            ratio = col.get(f"peak_vs_{reference}")
            if ratio is not None:
                checks.append(check(f"peak memory grft-col / {reference}", ratio, f"<= {limit}", ratio <= limit))
        ratio = col.get("time_vs_lora")
        if ratio is not None:
            checks.append(check("step time grft-col / lora", ratio, "<= 0.90", ratio <= 0.90))
    return checks + peer_checks(by)


# --------------------------------------------------------------------------------------------- output
def _inverse(value: float | None) -> float | None:
    return 1 / value if value else None


def _meta_lines(meta: dict[str, Any]) -> list[str]:
    shape = meta["shape"]
    timer = "process CPU" if meta["timer"] == "cpu" else "wall-clock"
    lines = [f"Llama (hidden {shape['hidden']}, {shape['layers']} layers, {shape['heads']} heads / {shape['kv_heads']} "
             f"KV heads, intermediate {shape['intermediate']}, vocab {shape['vocab']}, tied embeddings; "
             f"{meta['total_params']:,} params), {meta['task']}, batch {meta['batch_size']} x {meta['seq_len']} "
             f"tokens, {meta['dtype']}" + (f" with the decoder linears in {meta['quantize']} (bitsandbytes)"
                                          if meta.get("quantize") else "")
             + f" on {meta['device_name']}, {meta['torch_threads']} torch thread(s); step time = "
             f"median {timer} seconds of {meta['repeats']} steps after {meta['warmup']} warm-up rounds; "
             f"torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}, {meta['date']}"]
    if meta.get("peak_memory_kind"):
        baselines = meta.get("process_baseline_bytes") or []
        lines.append(f"peak = {meta['peak_memory_kind']}, each method in its own process over {meta['peak_steps']} "
                     "training steps after its setup" + (
                         f" (process baselines, the interpreter and libraries before the model: "
                         f"{min(baselines) / MB:,.0f}-{max(baselines) / MB:,.0f} MB)" if any(baselines) else ""))
    return lines + load_average_line(meta) + [""]


def to_markdown(rows: list[dict[str, Any]], checks: list[dict[str, Any]] | None = None,
                meta: dict[str, Any] | None = None) -> str:
    """The figures as markdown: the main table, the step detail, the ratios in the peers' terms, the checks."""
    lines = _meta_lines(meta) if meta else []
    header = ["method", "trainable", "k", "GFLOPs fwd+bwd", "× floor", "saved MB", "× floor", "grad MB",
              "opt state MB", "file MB", "peak MB", "× full", "× lora", "step s", "× floor", "× full", "× lora"]
    body = [[row["method"], f"{row['trainable_params']:,}", "–" if row["k"] is None else str(row["k"]),
             fmt(row["flops"], 1, 1e9), fmt_ratio(row.get("flops_vs_floor")), fmt(row["saved_bytes"], 1, MB),
             fmt_ratio(row.get("saved_vs_floor")), fmt(row["grad_bytes"], 2, MB),
             fmt(row["optimizer_state_bytes"], 2, MB), fmt(row.get("file_bytes"), 2, MB),
             fmt(row["peak_memory_bytes"], 0, MB),
             fmt_ratio(row.get("peak_vs_full")), fmt_ratio(row.get("peak_vs_lora")), fmt(row["step_time_s"], 3),
             fmt_ratio(row.get("time_vs_floor")), fmt_ratio(row.get("time_vs_full")),
             fmt_ratio(row.get("time_vs_lora"))] for row in rows]
    lines += markdown_table(header, body)
    lines += peer_counts_markdown(rows)
    lines += step_detail_markdown(rows)
    lines += ["", "In the peers' terms (S2FT: full / method; PaCA: method / LoRA):", ""]
    lines += markdown_table(["method", "full / method, peak memory", "full / method, step time",
                             "method / lora, peak memory", "method / lora, step time"],
                            [[row["method"], fmt_ratio(_inverse(row.get("peak_vs_full"))),
                              fmt_ratio(_inverse(row.get("time_vs_full"))), fmt_ratio(row.get("peak_vs_lora")),
                              fmt_ratio(row.get("time_vs_lora"))] for row in rows])
    if checks:
        lines += targets_markdown(checks)
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure, check and write the outputs named in ``args``; return the whole report."""
    import peft
    import transformers

    workload = workload_from_args(args)
    load_before = load_average()
    rows = measure(workload, args.methods, repeats=args.repeats, warmup=args.warmup, timer=args.timer,
                   threads=args.threads, peak_steps=args.peak_steps, profile=args.profile, progress=not args.quiet)
    checks = check_targets(rows, quantized=workload.quantize is not None)
    measured_peaks = [row for row in rows if row.get("peak_memory_kind")]
    meta = {
        "shape": dataclasses.asdict(workload.shape), "task": workload.task, "batch_size": workload.batch_size,
        "seq_len": workload.seq_len, "num_classes": workload.num_classes, "dtype": workload.dtype,
        "quantize": workload.quantize,
        "device": workload.device, "device_name": device_name(torch.device(workload.device)),
        "lora_rank": workload.lora_rank, "seed": workload.seed, "total_params": rows[0]["total_params"],
        "repeats": args.repeats, "warmup": args.warmup, "timer": args.timer,
        "torch_threads": args.threads or torch.get_num_threads(), "peak_steps": args.peak_steps,
        "peak_memory_kind": measured_peaks[0]["peak_memory_kind"] if measured_peaks else None,
        "process_baseline_bytes": [row["process_baseline_bytes"] for row in measured_peaks],
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "loadavg_before": load_before, "loadavg_after": load_average(),
        "command": command_line(),
        "flop_counter": "torch.utils.flop_counter (matmul/attention only; optimizer and elementwise ops are not "
                        "counted)",
    }
    return publish(meta, rows, checks, to_markdown(rows, checks, meta), args.out, args.markdown)


# --------------------------------------------------------------------------------------------- command line
_SHAPE_FLAGS = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
                "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "intermediate": "intermediate_size",
                "vocab": "vocab_size"}


def workload_from_args(args: argparse.Namespace) -> Workload:
    """The workload of the parsed flags: the preset's shape with every size flag given replacing its value."""
    sizes = {field: getattr(args, field) for field in _SHAPE_FLAGS if getattr(args, field) is not None}
    shape = dataclasses.replace(PRESETS[args.preset], **sizes)
    return Workload(shape, batch_size=args.batch_size, seq_len=args.seq_len, task=args.task,
                    num_classes=args.num_classes, dtype=args.dtype, device=args.device, lora_rank=args.lora_rank,
                    lr=args.lr, seed=args.seed, quantize=args.quantize)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-100m",
                        help="model shape; every size flag below overrides its value")
    for field, config_name in _SHAPE_FLAGS.items():
        parser.add_argument(f"--{field.replace('_', '-')}", dest=field, type=int, default=None,
                            help=f"LlamaConfig {config_name} (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--task", choices=TASKS, default="causal-lm",
                        help="next-token loss (LlamaForCausalLM) or a sequence classifier (the GLUE path)")
    parser.add_argument("--num-classes", type=int, default=2, help="classes of --task classify")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the model's tensors (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--peak-steps", type=int, default=2,
                        help="training steps of each method's own process for its peak memory (0: skip)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--quantize", choices=QUANT_TYPES, default=None,
                        help="keep the decoder layers' linears in bitsandbytes 4/8 bits (QLoRA); the methods then "
                             f"default to {', '.join(QUANTIZED_METHODS)}")
    add_step_cost_arguments(parser, METHODS)
    parser.add_argument("--peak-memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
    if args.quantize and args.methods == list(METHODS.names()):  # not chosen: those that train on a quantized base
        args.methods = list(QUANTIZED_METHODS)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.peak_memory_child is not None:
        return _child_main(args.peak_memory_child)
    return exit_status(run(args), args.strict)


if __name__ == "__main__":
    sys.exit(main())
