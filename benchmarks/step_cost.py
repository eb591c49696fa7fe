"""Cost of one training step of every fine-tuning method, side by side, for one model and one batch.

Methods: the registry :data:`METHODS` (full fine-tuning, GPS's dense masking, GRFT rows / columns / sparse
entries, PEFT LoRA, PEFT's sparse peers SHiRA and Super-Tuning at grft-sparse's trainable count, a linear probe
and the frozen floor; ``docs/benchmarks.md`` describes each). A new method is one registration::

    @METHODS.register("my-method", description="what it trains")
    def setup_my_method(model: nn.Module, context: SetupContext) -> Setup:
        ...  # model: a fresh copy of the base model

Figures per method: trainable parameters, FLOPs of forward + backward (``torch.utils.flop_counter``),
bytes saved for backward (``saved_tensors_hooks``), gradient bytes, optimizer-state bytes,
adapter/checkpoint file bytes, step time (median after warm-up, methods interleaved) with its ratios to
``floor`` and ``full`` from the same run, and on CUDA the peak of ``max_memory_allocated`` of one step.

Run as a script::

    python benchmarks/step_cost.py --model vit_base_patch16_224 --num-classes 47 --batch-size 8 \
        --img-size 224 --repeats 5 --warmup 2 --out step_cost.json

(on a CPU shared with other work add ``--threads 1 --timer cpu``: single-threaded process CPU time hardly
depends on the neighbours), or call :func:`measure` (rows), :func:`check_targets` and :func:`to_markdown` from Python.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from benchkit.cli import add_step_cost_arguments
from benchkit.compare import add_ratios, check_timer, time_interleaved, torch_threads
from benchkit.flops import inference_flops
from benchkit.memory import ADAM_BYTES_PER_PARAM, MB, file_bytes, save_whole_model
from benchkit.peers import peer_checks, peer_counts_markdown, peft_peer, peft_save
from benchkit.registry import MethodRegistry
from benchkit.report import (check, command_line, device_name, exit_status, fmt, fmt_ratio, load_average,
                             load_average_line, markdown_table, progress_logger, publish, step_detail_markdown,
                             targets_markdown)
from benchkit.step import Setup, StepCostMethod, instrumented_step, profile_step
from benchkit.trainable import VIT_LORA_TARGETS, adam, inside, trainable_parameters, vit_lora_targets
from grft_vision import GRFTConfig, GRFTLayer, apply_grft, is_grft_model, merge_grft, save_adapter
from grft_vision import trainable_parameters_report
from grft_vision.tuner.anatomy import head_module_names

__all__ = ["SetupContext", "METHODS", "random_scores", "measure", "check_targets", "to_markdown",
           "run", "parse_args", "main"]


# --------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class SetupContext:
    """What a method's setup may use besides its copy of the model."""

    scores: dict[str, torch.Tensor]  # random scores of every non-head nn.Linear / nn.Conv2d weight, by name
    k: int  # rows / columns / entries per row of the GRFT and GPS methods
    lora_rank: int
    lr: float  # Adam's learning rate
    seed: int = 0  # the run's seed (SHiRA's random positions)
    clamp_k: bool = False  # k larger than a layer's units takes them all (GRFTConfig.clamp_k)

    def grft_config(self, structure: str) -> GRFTConfig:
        """The GRFT config of the run's GRFT and GPS methods with ``structure``."""
        return GRFTConfig(structure=structure, k=self.k, clamp_k=self.clamp_k)


METHODS: MethodRegistry[StepCostMethod] = MethodRegistry(StepCostMethod)


def random_scores(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A random score for the weight of every ``nn.Linear`` / ``nn.Conv2d`` except the head."""
    generator = torch.Generator().manual_seed(seed)
    heads = head_module_names(model)
    return {f"{name}.weight": torch.rand(module.weight.shape, generator=generator).to(module.weight.device)
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and not inside(name, heads)}


@METHODS.register("full", description="full fine-tuning, Adam over every parameter")
def setup_full(model: nn.Module, context: SetupContext) -> Setup:
    model.requires_grad_(True)
    count = sum(p.numel() for p in model.parameters())
    return Setup(model, adam(model, context.lr), count, save=lambda p: save_whole_model(model, p))


@METHODS.register("gps-dense", description="all parameters trainable, dense grads masked to top-k per row after "
                                           "backward, Adam over all")
def setup_gps_dense(model: nn.Module, context: SetupContext) -> Setup:
    """GPS as in its public code: dense gradients everywhere, zeroed outside the mask after backward.

    The mask and the set of fully trained tensors are taken from a ``structure='sparse'`` GRFT wrap of the
    same scores, so gps-dense and grft-sparse update exactly the same entries.
    """
    reference = apply_grft(copy.deepcopy(model), context.scores, context.grft_config("sparse"))
    index_of = {f"{name}.weight": layer.indices for name, layer in reference.named_modules()
                if isinstance(layer, GRFTLayer)}
    fully = set(trainable_parameters_report(reference).fully_trainable)
    del reference
    model.requires_grad_(True)
    masks: dict[nn.Parameter, torch.Tensor] = {}
    frozen: list[nn.Parameter] = []
    trainable = 0
    for name, param in model.named_parameters():
        if name in index_of:
            rows = torch.zeros(param.shape[0], param[0].numel(), dtype=torch.bool, device=param.device)
            masks[param] = rows.scatter_(1, index_of[name], True).reshape(param.shape)
            trainable += int(masks[param].sum())
        elif name in fully:
            trainable += param.numel()
        else:
            frozen.append(param)

    def zero_outside_mask() -> None:
        with torch.no_grad():
            for param, mask in masks.items():
                if param.grad is not None:
                    param.grad.mul_(mask)
            for param in frozen:
                if param.grad is not None:
                    param.grad.zero_()

    mask_bytes = sum(mask.numel() * mask.element_size() for mask in masks.values())
    return Setup(model, adam(model, context.lr), trainable, after_backward=zero_outside_mask,
                 save=lambda p: save_whole_model(model, p), extra_bytes=mask_bytes,
                 notes=[f"mask (bool) {mask_bytes / MB:.1f} MB resident, not counted in the file"])


def grft_setup(structure: str) -> Callable[[nn.Module, SetupContext], Setup]:
    """The setup of GRFT with ``structure``: ``apply_grft`` with the random scores, k per weight."""

    def setup(model: nn.Module, context: SetupContext) -> Setup:
        model = apply_grft(model, context.scores, context.grft_config(structure))
        report = trainable_parameters_report(model)
        counted = sum(p.numel() for p in trainable_parameters(model))
        notes = [] if counted == report.trainable else [
            f"trainable_parameters_report says {report.trainable}, requires_grad tensors hold {counted}"]
        return Setup(model, adam(model, context.lr), report.trainable,
                     save=lambda p: save_adapter(model, p.with_suffix(".safetensors")), notes=notes)

    return setup


for _name, _structure, _description in (
        ("grft-row", "row", "grft_vision structure='row' (only the k chosen rows are parameters)"),
        ("grft-col", "column", "grft_vision structure='column' (only the k chosen columns are parameters)"),
        ("grft-sparse", "sparse", "grft_vision structure='sparse' (k entries per row as parameters, no dense buffer)")):
    METHODS.register(_name, description=_description, structure=_structure)(grft_setup(_structure))


def _peft_targets(model: nn.Module, method: str) -> list[str]:
    """The linears PEFT's methods adapt (:data:`VIT_LORA_TARGETS` outside the head); an error when there are none."""
    targets = vit_lora_targets(model)
    if not targets:
        raise ValueError(f"no nn.Linear named {VIT_LORA_TARGETS} in the model for {method}")
    return targets


@METHODS.register("lora", description="PEFT LoRA r=8 on qkv/proj/fc1/fc2, head trained")
def setup_lora(model: nn.Module, context: SetupContext) -> Setup:
    from peft import LoraConfig, get_peft_model

    targets = _peft_targets(model, "LoRA")
    config = LoraConfig(r=context.lora_rank, lora_alpha=context.lora_rank, lora_dropout=0.0, bias="none",
                        target_modules=targets, modules_to_save=head_module_names(model))
    model = get_peft_model(model, config)
    count = sum(p.numel() for p in trainable_parameters(model))
    return Setup(model, adam(model, context.lr), count, save=peft_save(model),
                 notes=[f"LoRA on {len(targets)} linears; file = adapter_model.safetensors + adapter_config.json"])


def grft_sparse_trainable(model: nn.Module, context: SetupContext) -> int:
    """grft-sparse's trainable count on ``model`` with the run's scores and k (a wrap of a copy: the entries, the
    biases of the targeted layers, the patch embedding's entries and the head, as ``grft-sparse`` trains them)."""
    reference = apply_grft(copy.deepcopy(model), context.scores, context.grft_config("sparse"))
    return trainable_parameters_report(reference).trainable


def peer_setup(peer: str) -> Callable[[nn.Module, SetupContext], Setup]:
    """The setup of a PEFT sparse peer (``benchkit.peers``) on LoRA's linears, the head trained whole, at the
    trainable count nearest grft-sparse's in the same run."""

    def setup(model: nn.Module, context: SetupContext) -> Setup:
        targets = _peft_targets(model, peer)
        model, details = peft_peer(model, peer, targets, grft_sparse_trainable(model, context),
                                   head_module_names(model), seed=context.seed)
        count = sum(p.numel() for p in trainable_parameters(model))
        setting = (f"r={details['shira_r']}" if peer == "shira"
                   else f"sparsity={details['supertuning_sparsity']:.6f}")
        notes = [f"{peer} {setting} on {len(targets)} linears: {count:,} trainable against grft-sparse's "
                 f"{details['count_target']:,} ({count / details['count_target']:.3f} x; the count moves in steps "
                 f"of up to {details['count_step']:,}); file = adapter_model.safetensors + adapter_config.json"]
        return Setup(model, adam(model, context.lr), count, save=peft_save(model),
                     extra_bytes=details["shira_index_bytes"], notes=notes, details=details)

    return setup


for _name, _description in (
        ("shira", "PEFT SHiRA: r(in+out) random entries of qkv/proj/fc1/fc2, r nearest grft-sparse's count, head "
                  "trained"),
        ("supertuning", "PEFT Super-Tuning: the largest-magnitude entries of qkv/proj/fc1/fc2 at the sparsity "
                        "nearest grft-sparse's count, head trained")):
    METHODS.register(_name, description=_description, imports=(f"peft.tuners.{_name}",))(peer_setup(_name))


@METHODS.register("head", description="linear probe: classifier only, no backprop into the backbone")
def setup_head(model: nn.Module, context: SetupContext) -> Setup:
    model.requires_grad_(False)
    heads = head_module_names(model)
    params = {name: p for name, p in model.named_parameters() if inside(name, heads)}
    for param in params.values():
        param.requires_grad_(True)

    def save(path: Path) -> Path:
        path = path.with_suffix(".safetensors")
        save_file({name: p.detach().contiguous().cpu() for name, p in params.items()}, str(path))
        return path

    return Setup(model, adam(model, context.lr), sum(p.numel() for p in params.values()), save=save)


@METHODS.register("floor", description="all frozen, backward of the loss to the input (no weight gradients)")
def setup_floor(model: nn.Module, context: SetupContext) -> Setup:
    model.requires_grad_(False)
    return Setup(model, None, 0, input_grad=True)


# --------------------------------------------------------------------------------------------- measure
def measure(
    model_name: str = "vit_base_patch16_224",
    *,
    num_classes: int = 47,
    img_size: int = 224,
    batch_size: int = 8,
    methods: Sequence[str] | None = None,
    repeats: int = 5,
    warmup: int = 2,
    k: int = 1,
    lora_rank: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    model_kwargs: dict[str, Any] | None = None,
    save_dir: str | os.PathLike | None = None,
    profile: bool = False,
    timer: str = "wall",
    threads: int | None = None,
    compile: bool = False,
    clamp_k: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Measure every method on one model and one batch; one dict of figures per method, in ``methods`` order
    (None: every registered method).

    Every method starts from a deep copy of the same randomly initialised model (``pretrained=False``:
    weights do not change the cost) and trains on the same random batch. Step times are the median of
    ``repeats`` steps after ``warmup`` steps, the methods interleaved round by round (the starting method
    rotates) so that drift of the machine spreads evenly. ``timer='wall'`` times wall-clock seconds (the
    default); ``timer='cpu'`` times the process's CPU seconds instead, which hardly depend on other work
    sharing the cores when ``threads=1`` (``threads``: ``torch.set_num_threads`` for the run, None leaves
    the default). Each step is also split into forward (+ loss),
    backward and update (GPS masking + Adam + zero_grad) phases. With ``profile=True`` one more step per
    method runs under ``torch.profiler`` and its self time is split by operator category. With
    ``compile=True`` every method's timed (and profiled) steps run its ``torch.compile``-d model (inductor; the
    warm-up rounds compile it, so keep ``warmup >= 2``), so the ratios are to the compiled floor; FLOPs, bytes
    and files are those of the eager model. Ratios to ``floor`` and ``full`` are filled in when those methods
    are part of the run. ``clamp_k=True`` lets a k larger than a layer's rows / columns / entries per row take
    all of them (a ViT's patch embedding has 3 input channels: columns with k > 3 need it).
    """
    methods = METHODS.names() if methods is None else methods
    METHODS.check(methods)
    check_timer(timer)
    with torch_threads(threads):
        return _measure(model_name, num_classes=num_classes, img_size=img_size, batch_size=batch_size,
                        methods=methods, repeats=repeats, warmup=warmup, k=k, lora_rank=lora_rank, lr=lr,
                        seed=seed, device=device, model_kwargs=model_kwargs, save_dir=save_dir,
                        profile=profile, timer=timer, compile=compile, clamp_k=clamp_k, progress=progress)


def _base_model(model_name: str, num_classes: int, img_size: int, model_kwargs: dict[str, Any] | None,
                device: torch.device) -> nn.Module:
    kwargs = dict(model_kwargs or {})
    try:
        base = timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=img_size, **kwargs)
    except TypeError:  # convolutional models take any input size and no img_size argument
        base = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    return base.to(device).train()


def _measure(model_name: str, *, num_classes: int, img_size: int, batch_size: int, methods: Sequence[str],
             repeats: int, warmup: int, k: int, lora_rank: int, lr: float, seed: int,
             device: str | torch.device, model_kwargs: dict[str, Any] | None,
             save_dir: str | os.PathLike | None, profile: bool, timer: str, compile: bool, clamp_k: bool,
             progress: bool) -> list[dict[str, Any]]:
    log = progress_logger("step_cost", progress)
    device = torch.device(device)
    torch.manual_seed(seed)
    base = _base_model(model_name, num_classes, img_size, model_kwargs, device)
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    context = SetupContext(random_scores(base, seed), k, lora_rank, lr, seed, clamp_k)
    total_params = sum(p.numel() for p in base.parameters())
    plain_flops, plain_by_op = inference_flops(base, images)

    setups: dict[str, Setup] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in methods:
        log(f"set up {name}")
        setup = setups[name] = METHODS[name].build(copy.deepcopy(base), context)
        log(f"instrumented step {name}")
        figures = instrumented_step(setup, images, labels)
        rows[name] = {
            "method": name,
            "description": METHODS[name].description,
            "trainable_params": setup.trainable,
            "requires_grad_params": sum(p.numel() for p in trainable_parameters(setup.model)),
            "total_params": total_params,
            **figures,
            "extra_resident_bytes": setup.extra_bytes,
            **setup.details,
            "notes": list(setup.notes),
        }

    if compile:
        torch._dynamo.reset()
        for setup in setups.values():
            setup.compiled = torch.compile(setup.model)
    timing = time_interleaved(setups, images, labels, warmup=warmup, repeats=repeats, timer=timer, log=log)
    for name, figures in timing.items():
        rows[name].update(figures)
    if profile:
        for name in methods:
            log(f"profile {name}")
            rows[name]["profile_s"] = profile_step(setups[name], images, labels)

    # files
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(save_dir) if save_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in methods:
            save = setups[name].save
            rows[name]["file_bytes"] = None if save is None else file_bytes(save(folder / name))

    # merged inference: the same FLOPs as the plain model
    for name in methods:
        if METHODS[name].structure is not None:
            merged = merge_grft(setups[name].model)
            flops, by_op = inference_flops(merged, images)
            rows[name]["merged_inference_flops"] = flops
            rows[name]["plain_inference_flops"] = plain_flops
            rows[name]["merged_flops_by_op_equal"] = by_op == plain_by_op
            rows[name]["merged_is_plain"] = (not is_grft_model(merged)
                                             and list(merged.state_dict()) == list(base.state_dict()))
        setups[name].optimizer = None
    del setups

    add_ratios(rows)
    return [rows[name] for name in methods]


# --------------------------------------------------------------------------------------------- targets
def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets of the efficiency claim, each with the measured value and pass/fail.

    A target whose methods were not measured is left out.
    """
    by = {row["method"]: row for row in rows}
    checks: list[dict[str, Any]] = []

    def have(*names: str) -> bool:
        return all(name in by for name in names)

    for name, limit in (("grft-col", 1.01), ("grft-row", 1.02), ("grft-sparse", 1.03)):
        if have(name, "floor"):
            ratio = by[name]["flops_vs_floor"]
            checks.append(check(f"FLOPs {name} / floor", ratio, f"<= {limit}", ratio <= limit))
    if have("full", "floor"):
        ratio = by["full"]["flops_vs_floor"]
        checks.append(check("FLOPs full / floor", ratio, "~1.5 (1.45..1.55)", 1.45 <= ratio <= 1.55))
    # GRFT holds gradient + moments for its trainable entries only; full and gps-dense for every parameter
    adam_counts = {"grft-row": ("trainable_params", "trainable"), "grft-col": ("trainable_params", "trainable"),
                   "grft-sparse": ("trainable_params", "trainable"), "full": ("total_params", "all params"),
                   "gps-dense": ("total_params", "all params")}
    for name, (count, label) in adam_counts.items():
        if have(name):
            row = by[name]
            value = row["grad_bytes"] + row["optimizer_state_bytes"] - row["optimizer_step_scalar_bytes"]
            analytic = ADAM_BYTES_PER_PARAM * row[count]
            checks.append(check(f"grad + Adam moments {name} = 12 B x {label}", value,
                                f"== {analytic}", value == analytic))
    if have("grft-col", "floor"):
        ratio = by["grft-col"]["saved_vs_floor"]
        checks.append(check("saved-for-backward grft-col / floor", ratio, "<= 1.02", ratio <= 1.02))
    if have("grft-sparse", "grft-row"):  # GPS's entries without keeping a [tokens, out, k] gather
        value, limit = by["grft-sparse"]["saved_bytes"], by["grft-row"]["saved_bytes"]
        checks.append(check("saved-for-backward grft-sparse <= grft-row (bytes)", value, f"<= {limit}",
                            value <= limit))
    # step time over the floor (the floor itself is 0.67-0.77 x full depending on the CPU: no target against full)
    for name, limit in (("grft-row", 1.05), ("grft-col", 1.05), ("grft-sparse", 1.15)):
        row = by.get(name)
        if row is None or row["step_time_s"] is None:
            continue
        if have("floor"):
            ratio = row["time_vs_floor"]
            checks.append(check(f"step time {name} / floor", ratio, f"<= {limit:.2f}", ratio <= limit))
        if have("lora") and name != "grft-sparse":
            ratio = row["step_time_s"] / by["lora"]["step_time_s"]
            checks.append(check(f"step time {name} / lora", ratio, "<= 1.00", ratio <= 1.0))
    if have("grft-row") and by["grft-row"]["file_bytes"] is not None:
        size = by["grft-row"]["file_bytes"]
        checks.append(check("adapter file grft-row (bytes)", size, "< 1 MB", size < MB))
    for name in ("grft-row", "grft-col", "grft-sparse"):
        if have(name) and "merged_inference_flops" in by[name]:
            row = by[name]
            equal = (row["merged_inference_flops"] == row["plain_inference_flops"] and row["merged_flops_by_op_equal"]
                     and row["merged_is_plain"])
            checks.append(check(f"inference FLOPs after merge_grft ({name}) == plain model",
                                row["merged_inference_flops"], f"== {row['plain_inference_flops']}", equal))
    return checks + peer_checks(by)


# --------------------------------------------------------------------------------------------- output
def _meta_lines(meta: dict[str, Any]) -> list[str]:
    return [f"model `{meta['model']}` ({meta['total_params']:,} params), batch {meta['batch_size']} at "
            f"{meta['img_size']}px, {meta['num_classes']} classes, device {meta['device_name']}, "
            f"{meta['torch_threads']} torch thread(s), step time = median "
            f"{'process CPU' if meta.get('timer') == 'cpu' else 'wall-clock'} seconds"
            f"{' under torch.compile (inductor)' if meta.get('compiled') else ''} of "
            f"{meta['repeats']} steps after {meta['warmup']} warm-up rounds, torch {meta['torch']}, "
            f"{meta['date']}"] + load_average_line(meta) + [""]


def to_markdown(rows: list[dict[str, Any]], checks: list[dict[str, Any]] | None = None,
                meta: dict[str, Any] | None = None) -> str:
    """The figures as a markdown table, then the step detail and the target checks."""
    cuda = any(row.get("peak_memory_bytes") is not None for row in rows)
    header = ["method", "trainable", "GFLOPs fwd+bwd", "× floor", "saved MB", "× floor", "grad MB",
              "opt state MB", "file MB", "step s", "× floor", "× full"] + (["peak MB"] if cuda else [])
    body = [[row["method"], f"{row['trainable_params']:,}", fmt(row["flops"], 1, 1e9),
             fmt_ratio(row.get("flops_vs_floor")), fmt(row["saved_bytes"], 1, MB),
             fmt_ratio(row.get("saved_vs_floor")), fmt(row["grad_bytes"], 2, MB),
             fmt(row["optimizer_state_bytes"], 2, MB), fmt(row["file_bytes"], 2, MB),
             fmt(row["step_time_s"], 3), fmt_ratio(row.get("time_vs_floor")), fmt_ratio(row.get("time_vs_full"))]
            + ([fmt(row.get("peak_memory_bytes"), 0, MB)] if cuda else []) for row in rows]
    lines = ((_meta_lines(meta) if meta else []) + markdown_table(header, body) + peer_counts_markdown(rows)
             + step_detail_markdown(rows))
    if checks:
        lines += targets_markdown(checks)
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure, check and write the outputs named in ``args``; return the whole report."""
    device = torch.device(args.device)
    load_before = load_average()
    rows = measure(args.model, num_classes=args.num_classes, img_size=args.img_size, batch_size=args.batch_size,
                   methods=args.methods, repeats=args.repeats, warmup=args.warmup, k=args.k,
                   lora_rank=args.lora_rank, seed=args.seed, device=device, model_kwargs=args.model_kwargs,
                   save_dir=args.save_dir, profile=args.profile, timer=args.timer, threads=args.threads,
                   compile=args.compile, clamp_k=args.clamp_k, progress=not args.quiet)
    checks = check_targets(rows)
    import peft  # version only

    meta = {
        "model": args.model, "model_kwargs": args.model_kwargs, "num_classes": args.num_classes,
        "img_size": args.img_size,
        "batch_size": args.batch_size, "repeats": args.repeats, "warmup": args.warmup, "k": args.k,
        "clamp_k": args.clamp_k,
        "total_params": rows[0]["total_params"], "device": str(device), "device_name": device_name(device),
        "torch": torch.__version__, "timm": timm.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch_threads": args.threads or torch.get_num_threads(), "timer": args.timer,
        "compiled": args.compile,
        "loadavg_before": load_before,
        "loadavg_after": load_average(),
        "command": command_line(),
        "flop_counter": "torch.utils.flop_counter (matmul/conv/attention only; optimizer and elementwise ops "
                        "are not counted)",
    }
    return publish(meta, rows, checks, to_markdown(rows, checks, meta), args.out, args.markdown)


# --------------------------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm architecture (pretrained=False)")
    parser.add_argument("--model-kwargs", type=json.loads, default=None,
                        help='extra timm.create_model arguments as JSON, e.g. \'{"depth": 2}\'')
    parser.add_argument("--num-classes", type=int, default=47)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    parser.add_argument("--k", type=int, default=1, help="rows / columns / entries per row")
    parser.add_argument("--clamp-k", action="store_true",
                        help="a k larger than a layer's units takes them all (columns of a ViT's 3-channel patch "
                             "embedding with k > 3)")
    parser.add_argument("--save-dir", default=None, help="keep the adapter/checkpoint files here")
    parser.add_argument("--compile", action="store_true",
                        help="time every method under torch.compile (inductor); ratios to the compiled floor")
    add_step_cost_arguments(parser, METHODS)
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 64 if torch.device(args.device).type == "cuda" else 8
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_status(run(args), args.strict)


if __name__ == "__main__":
    sys.exit(main())
