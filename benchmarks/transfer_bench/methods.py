"""The methods of the transfer benchmark: what a method gets (:class:`MethodContext`) and returns
(:class:`Prepared`), the registry :data:`METHODS` (name -> :class:`Method`: label, learning-rate family, plot
group, cost, and the function preparing a fresh copy of the pre-trained model), every method's definition and
the suites.

A new method is one registration::

    @METHODS.register("last-block", label="Last block + head", family="full", group="ablation")
    def prepare_last_block(model: nn.Module, ctx: MethodContext) -> Prepared:
        model.requires_grad_(False)
        model.blocks[-1].requires_grad_(True)
        model.head.requires_grad_(True)
        return Prepared(model, trainable_parameters(model))

The GRFT family (selection, wrapping and the regulariser all from ``grft_vision``) is :func:`grft_method`.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from benchkit.registry import MethodRegistry, RegisteredMethod
from benchkit.trainable import trainable_parameters, vit_lora_targets
from grft_vision import GRFTConfig, L2ToPretrained, apply_grft, trainable_parameters_report
from grft_vision.data import TwoViews, contrastive_transform, create_transforms
from grft_vision.selection import LayerSelection, compute_scores
from grft_vision.selection.schedules import MaskSchedule, create_schedule
from grft_vision.tuner.anatomy import head_module_names
from grft_vision.tuner.targets import find_target_layers

from .model import ArrayImages, build_vit
from .settings import Settings

__all__ = ["Prepared", "MethodContext", "Method", "METHODS", "lora_count", "choose_lora_rank", "random_generator",
           "grft_method", "SUITES", "DEFAULT_METHODS", "FIRST_ORDER_METHODS"]


@dataclass
class Prepared:
    """A model ready to train: the module to call, its trainable parameters, an optional regulariser
    (a callable returning a scalar added to the loss, e.g. :class:`grft_vision.L2ToPretrained`), and
    free-form diagnostics (selection statistics, ...) stored with the run's result."""

    model: nn.Module
    params: list[nn.Parameter]
    regularizer: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    schedule: MaskSchedule | None = None  # dynamic / incremental: called before every optimizer step


@dataclass
class MethodContext:
    """What a method may use to prepare a model: the target's name and training data (never its test
    split), the seed, the data config, and the benchmark-wide choices (L2 lambda, LoRA rank, subsets)."""

    target: str
    seed: int
    num_classes: int
    train_images: np.ndarray
    train_labels: np.ndarray
    data_config: dict[str, Any]
    batch_size: int
    reg_lambda: float
    lora_rank: int
    num_subsets: int
    total_steps: int  # optimizer steps of the fine-tuning run (the incremental schedule spreads its budget over them)

    def selection_loader(self, views: int = 2, augment: bool = True) -> DataLoader:
        """The training set with GPS's contrastive augmentation, ``views`` views per image (library transforms);
        ``augment=False``: the plain evaluation transform, one view (a diagnostic, not the paper's protocol)."""
        if not augment:
            transform = create_transforms(self.data_config, "vtab", train=False)
        else:
            transform = contrastive_transform(self.data_config)
            transform = TwoViews(transform) if views == 2 else transform
        dataset = ArrayImages(self.train_images, self.train_labels, transform)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)

    def grft_config(self, **overrides: Any) -> GRFTConfig:
        """GRFT settings of the benchmark: conv columns by tap (as the VTAB configs), regulariser on every
        trainable tensor (reg_blocks='all'), selection seeded by the run's seed."""
        values = dict(structure="row", k=1, conv_columns="tap", reg_lambda=self.reg_lambda, reg_blocks="all",
                      selection_views=2, num_subsets=1, selection_seed=self.seed)
        values.update(overrides)
        return GRFTConfig(**values)


PrepareFn = Callable[[nn.Module, MethodContext], Prepared]


@dataclass(frozen=True)
class Method(RegisteredMethod):
    """One row of the results table; ``build(model, context) -> Prepared`` prepares a fresh copy of the
    pre-trained model (a new head) for training.

    Attributes:
        label: text in the table and the plot.
        family: learning-rate family (a key of the lr table: head, full, grft, lora).
        group: colour in the plot: baseline, grft, control, ablation, beyond.
        cost: relative cost, used only to schedule the longest jobs first.
        chooses: it trains rows or columns chosen once, before training (every static row / column choice:
            :mod:`.first_order` measures how much of the task loss's first-order decrease they capture).
    """

    label: str
    family: str
    group: str
    cost: float = 1.0
    chooses: bool = False


METHODS: MethodRegistry[Method] = MethodRegistry(Method)


def _head_only(model: nn.Module) -> list[nn.Parameter]:
    model.requires_grad_(False)
    for name in head_module_names(model):
        model.get_submodule(name).requires_grad_(True)
    return trainable_parameters(model)


@METHODS.register("linear", label="Linear probe (head only)", family="head", group="baseline", cost=0.35)
def prepare_linear(model: nn.Module, ctx: MethodContext) -> Prepared:
    return Prepared(model, _head_only(model))


@METHODS.register("full", label="Full fine-tuning", family="full", group="baseline", cost=1.6)
def prepare_full(model: nn.Module, ctx: MethodContext) -> Prepared:
    model.requires_grad_(True)
    return Prepared(model, trainable_parameters(model))


@METHODS.register("bias", label="Biases + head (GRFT's fully-trained set, no rows)", family="grft", group="baseline",
                  cost=0.9)
def prepare_bias(model: nn.Module, ctx: MethodContext) -> Prepared:
    """The tensors GRFT trains fully (biases of targeted layers, head), without any row: what rows add."""
    targets = find_target_layers(model, ctx.grft_config())
    _head_only(model)
    for layer in targets.values():
        if layer.bias is not None:
            layer.bias.requires_grad_(True)
    regularizer = L2ToPretrained(model, ctx.grft_config())  # same lambda on the same tensors as GRFT
    return Prepared(model, trainable_parameters(model), regularizer if regularizer.enabled else None)


def lora_count(model: nn.Module, rank: int) -> int:
    """Trainable parameters of LoRA rank ``rank`` on the ViT's qkv / proj / fc1 / fc2 linears, plus the head."""
    targets = set(vit_lora_targets(model))
    adapters = sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules() if n in targets)
    return adapters + sum(p.numel() for n in head_module_names(model) for p in model.get_submodule(n).parameters())


@METHODS.register("lora", label="LoRA (PEFT, qkv/proj/fc1/fc2, r matched to GRFT row k=1)", family="lora",
                  group="baseline", cost=1.1)
def prepare_lora(model: nn.Module, ctx: MethodContext) -> Prepared:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=ctx.lora_rank, lora_alpha=ctx.lora_rank, lora_dropout=0.0, bias="none",
                        target_modules=vit_lora_targets(model), modules_to_save=head_module_names(model))
    wrapped = get_peft_model(model, config)
    return Prepared(wrapped, trainable_parameters(wrapped), info={"lora_rank": ctx.lora_rank})


def choose_lora_rank(settings: Settings) -> dict[str, int]:
    """The LoRA rank whose trainable count is closest to GRFT row k=1's (both include the same head)."""
    torch.manual_seed(0)
    model = build_vit(settings, 10)
    lora = {r: lora_count(model, r) for r in range(1, 33)}
    config = GRFTConfig(structure="row", k=1, conv_columns="tap")
    scores = {f"{n}.weight": torch.rand(m.weight.shape) for n, m in find_target_layers(model, config).items()}
    grft = trainable_parameters_report(apply_grft(model, scores=scores, config=config)).trainable
    rank = min(lora, key=lambda r: (abs(lora[r] - grft), r))
    return {"rank": rank, "lora_trainable": lora[rank], "grft_row_k1_trainable": grft, "num_classes": 10}



def _layer_stats(layers: Iterable[LayerSelection]) -> dict[str, Any]:
    layers = list(layers)
    shares = [layer.chosen_share for layer in layers]
    ratios = [layer.chosen_mean / layer.rest_mean for layer in layers if layer.rest_mean > 0]
    return {
        "chosen_share_mean": float(np.mean(shares)),
        "chosen_vs_rest_geomean": float(np.exp(np.mean(np.log(np.maximum(ratios, 1e-12))))) if ratios else None,
        "indices": {layer.name: layer.indices for layer in layers if layer.structure != "sparse"},
        "per_layer_share": {layer.name: layer.chosen_share for layer in layers},
    }


def _uniform_share(model: nn.Module, config: GRFTConfig) -> float:
    """Mean over layers of the score share a uniformly random choice gets in expectation (k / candidates)."""
    from grft_vision.selection import candidate_count, resolve_k

    shares = []
    for name, layer in find_target_layers(model, config).items():
        structure = config.layer_structure(layer)
        count = candidate_count(layer.weight.shape, structure, getattr(layer, "groups", 1))
        shares.append(resolve_k(config.k, count, name, structure) / count)
    return float(np.mean(shares))


def random_generator(target: str, seed: int) -> torch.Generator:
    """The generator of the random-rows control: its own stream per (target, seed), so that the rows are
    drawn independently for every target and every seed (a stable hash, not Python's salted ``hash``)."""
    digest = hashlib.sha256(f"random-rows/{target}/{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _chooser_scores(model: nn.Module, config: GRFTConfig, real: dict[str, torch.Tensor], chooser: str,
                    target: str, seed: int) -> dict[str, torch.Tensor]:
    """CPU scores that make ``apply_grft`` pick random candidates (drawn per target and seed, layer after
    layer from one stream) or the lowest-scored ones."""
    generator = random_generator(target, seed)
    scores = {}
    for name, layer in find_target_layers(model, config).items():
        key = f"{name}.weight"
        if chooser == "random":
            scores[key] = torch.rand(layer.weight.shape, generator=generator)
            continue
        # lowest: a per-row (row) or per-column constant score whose reduction is max - S_i
        score = real[key].double()
        flat = score.reshape(score.shape[0], -1)
        if config.layer_structure(layer) == "row":
            sums = flat.sum(1)
            value = (sums.max() - sums)[:, None].expand_as(flat) / flat.shape[1]
        elif config.layer_structure(layer) == "tap_column":
            sums = flat.sum(0)
            value = (sums.max() - sums)[None, :].expand_as(flat) / flat.shape[0]
        else:
            raise ValueError(f"chooser 'lowest' supports rows and tap columns, not {config.layer_structure(layer)}")
        scores[key] = value.reshape(score.shape).float().contiguous()
    return scores


ScoreFn = Callable[[nn.Module, "MethodContext", GRFTConfig], dict[str, torch.Tensor]]


def _select_by_gradient(model: nn.Module, ctx: MethodContext, config: GRFTConfig,
                        augment: bool) -> tuple[dict[str, Any], MaskSchedule | None]:
    """GRFT's own selection, ``apply_grft(..., dataloader=...)``; returns its record (subset losses and, for a
    static choice, the layer statistics) and the dynamic / incremental schedule (None when static)."""
    loader = ctx.selection_loader(config.selection_views, augment)
    apply_grft(model, config=config, dataloader=loader, progress=False)
    record = model.grft_state.selection
    info = dict(subset_losses=record.subset_losses, chosen_subset=record.chosen_subset, subset_size=record.subset_size)
    if config.schedule == "static":  # a schedule moves the choice: its first record says little
        return {**info, **_layer_stats(record.layers)}, None
    return info, create_schedule(model, config, loader, total_steps=ctx.total_steps, budgets=model.grft_state.budgets)


def _select_by_chooser(model: nn.Module, ctx: MethodContext, config: GRFTConfig, augment: bool,
                       chooser: str | ScoreFn) -> dict[str, Any]:
    """Candidates chosen by ``chooser``'s scores, wrapped as GRFT's; returns the layer statistics measured
    against GRFT's SupCon gradient scores (computed anyway, to measure how much of them the choice captures)."""
    real = {name: score.cpu() for name, score in compute_scores(
        model, ctx.selection_loader(config.selection_views, augment), config, progress=False).scores.items()}
    scores = chooser(model, ctx, config) if callable(chooser) else _chooser_scores(
        model, config, real, chooser, ctx.target, ctx.seed)
    device = next(model.parameters()).device
    apply_grft(model, scores={name: score.to(device) for name, score in scores.items()}, config=config)
    layers = [LayerSelection.build(layer.name, layer.structure, real[f"{layer.name}.weight"],
                                   torch.as_tensor(layer.indices))
              for layer in model.grft_state.selection.layers]
    return _layer_stats(layers)


def grft_method(structure: str, k: int, *, chooser: str | ScoreFn = "gradient", num_subsets: int | None = 1,
                l2: bool = True, bias: bool = True, augment: bool = True, schedule_events: int | None = None,
                **selection: Any) -> PrepareFn:
    """A GRFT-family method: rows / columns / sparse entries chosen by ``chooser``.

    Args:
        structure: 'row', 'column' or 'sparse' (GPS).
        k: rows / columns / entries per row per weight.
        chooser: 'gradient' (the library's SupCon selection, ``apply_grft(..., dataloader=...)``), 'random'
            (uniformly random candidates at the same k, drawn independently per target and seed), 'lowest'
            (the lowest-scored candidates), or a salience function
            ``(model, ctx, config) -> {weight name: score of the weight's shape}`` (e.g. another
            paper's importance measure; the chosen candidates are then the top-k of its scores, wrapped and
            trained exactly as GRFT's). For every chooser but 'gradient' the SupCon gradient scores are still
            computed, to record how much of them the choice holds.
        num_subsets: lowest-loss subsets n; None takes the benchmark's n > 1 setting.
        l2: L2-to-pretrained on (the benchmark's lambda) or off.
        bias: train the biases of the targeted layers (GRFT/GPS convention) or not.
        augment: select on GPS's two augmented views (the protocol) or, as a diagnostic, on one plain view.
        schedule_events: with a dynamic / incremental ``schedule``, how many schedule events the run holds
            (``schedule_interval`` = the run's optimizer steps / events, rounded up).
        selection: further :class:`GRFTConfig` fields of the selection (``score``, ``selection_loss``,
            ``budget``, ``schedule``, ``schedule_interval``, ...): the beyond-GRFT options, used as a user
            would set them. A dynamic or incremental ``schedule`` is returned in :attr:`Prepared.schedule`.
    """

    def prepare(model: nn.Module, ctx: MethodContext) -> Prepared:
        options = dict(selection)
        if schedule_events:
            options["schedule_interval"] = max(1, math.ceil(ctx.total_steps / schedule_events))
        config = ctx.grft_config(structure=structure, k=k, num_subsets=num_subsets or ctx.num_subsets,
                                 reg_lambda=ctx.reg_lambda if l2 else 0.0, train_bias=bias,
                                 selection_views=2 if augment else 1, **options)
        start = time.perf_counter()
        info: dict[str, Any] = {"uniform_share_mean": _uniform_share(model, config), "train_bias": bias}
        if chooser == "gradient":
            found, schedule = _select_by_gradient(model, ctx, config, augment)
        else:
            found, schedule = _select_by_chooser(model, ctx, config, augment, chooser), None
        info.update(found)
        info["selection_seconds"] = time.perf_counter() - start
        report = trainable_parameters_report(model)
        info["report_trainable"] = report.trainable
        regularizer = L2ToPretrained(model, config)
        return Prepared(model, trainable_parameters(model), regularizer if regularizer.enabled else None, info,
                        schedule)

    return prepare


_GRFT_ROWS = [
    # name, label, group, structure, k, options
    ("grft-row-k1", "GRFT row k=1 (n=1, L2)", "grft", "row", 1, {}),
    ("grft-row-k2", "GRFT row k=2 (n=1, L2)", "grft", "row", 2, {}),
    ("grft-col-k1", "GRFT column k=1 (n=1, L2)", "grft", "column", 1, {}),
    ("grft-col-k2", "GRFT column k=2 (n=1, L2)", "grft", "column", 2, {}),
    ("gps-sparse-k1", "GPS sparse k=1 per row (GRFT-Sparse, L2)", "grft", "sparse", 1, {}),
    ("random-row-k1", "Random rows k=1 (control, L2)", "control", "row", 1, {"chooser": "random"}),
    ("random-row-k2", "Random rows k=2 (control, L2)", "control", "row", 2, {"chooser": "random"}),
    ("grft-row-k1-n4", "GRFT row k=1, lowest-loss subset n>1", "ablation", "row", 1, {"num_subsets": None}),
    ("grft-row-k1-noL2", "GRFT row k=1, L2 off", "ablation", "row", 1, {"l2": False}),
    ("grft-row-k1-nobias", "GRFT row k=1, biases frozen", "ablation", "row", 1, {"bias": False}),
    ("random-row-k1-nobias", "Random rows k=1, biases frozen (control)", "control", "row", 1,
     {"chooser": "random", "bias": False}),
    ("lowest-row-k1", "Lowest-scored rows k=1 (control)", "control", "row", 1, {"chooser": "lowest"}),
    ("grft-row-k1-plain", "GRFT row k=1, selected on plain images (diagnostic)", "ablation", "row", 1,
     {"augment": False}),
]
for _name, _label, _group, _structure, _k, _options in _GRFT_ROWS:
    METHODS.register(_name, label=_label, family="grft", group=_group, chooses=_structure != "sparse")(
        grft_method(_structure, _k, **_options))

# Beyond GRFT (SPEFT, ID3, GEM): other importance scores, budgets and schedules, every one on GRFT's row
# structure at the budget of GRFT row k=1 (k=2 for the incremental schedule, so that it has something to
# unmask step by step) and otherwise exactly GRFT's protocol: same trainable set, regulariser, learning rate.
_BEYOND_ROWS = [
    ("score-magnitude", "Row k=1 by magnitude |θ| (SPEFT, data-free)", {"score": "magnitude"}),
    ("score-gradient", "Row k=1 by |g| (SPEFT gradient)", {"score": "gradient"}),
    ("score-snip", "Row k=1 by SNIP |g·θ| (SPEFT)", {"score": "snip"}),
    ("score-force", "Row k=1 by FORCE −g·θ (SPEFT)", {"score": "force"}),
    ("score-taylor", "Row k=1 by Taylor-FO (g·θ)² (SPEFT)", {"score": "taylor_fo"}),
    ("score-synflow", "Row k=1 by SynFlow (SPEFT, data-free)", {"score": "synflow"}),
    ("score-grasp", "Row k=1 by GraSP −(Hg)·θ (SPEFT)", {"score": "grasp"}),
    ("score-fisher", "Row k=1 by Fisher Σ per-sample g² (SPEFT)", {"score": "fisher"}),
    ("score-d3", "Row k=1 by D3 |g|/(|θ|+1)² (ID3)", {"score": "d3"}),
    ("score-gem", "Row k=1 by |g|/|θ| (GEM ratio)", {"score": "gem"}),
    ("loss-ce", "Row k=1 by g² of cross-entropy (task loss, not SupCon)", {"selection_loss": "cross_entropy"}),
    ("budget-global", "Rows, global budget = row k=1's count (SPEFT global)", {"budget": "global"}),
    ("budget-entropy", "Rows, entropy budget = row k=1's count (GEM)", {"budget": "entropy"}),
    ("schedule-dynamic", "Row k=1, re-selected every 1/4 of training (SPEFT dynamic)",
     {"schedule": "dynamic", "schedule_events": 4}),
]
for _name, _label, _options in _BEYOND_ROWS:
    METHODS.register(_name, label=_label, family="grft", group="beyond", chooses="schedule" not in _options)(
        grft_method("row", 1, **_options))
METHODS.register("schedule-incremental-k2", label="Rows unmasked 0→2 in 4 steps (ID3 increment-S), vs GRFT row k=2",
                 family="grft", group="beyond")(grft_method("row", 2, schedule="incremental", schedule_events=4))

# The budget study (``--budget``, :mod:`.budget`): GRFT, random and lowest-scored rows at k = 1 and 8, with and
# without the biases; the rows above give k = 1 (biases on: GRFT, random, lowest; off: GRFT, random).
_CHOOSER_LABELS = {"grft": "GRFT row k={k} (n=1, L2)", "random": "Random rows k={k} (control, L2)",
                   "lowest": "Lowest-scored rows k={k} (control)"}
for _k in (1, 8):
    for _bias in (True, False):
        for _chooser, _label in _CHOOSER_LABELS.items():
            _name = f"{_chooser}-row-k{_k}" + ("" if _bias else "-nobias")
            if _name not in METHODS:
                METHODS.register(_name, label=_label.format(k=_k) + ("" if _bias else ", biases frozen"),
                                 family="grft", group="budget", chooses=True)(
                    grft_method("row", _k, chooser="gradient" if _chooser == "grft" else _chooser, bias=_bias))

# A run without --methods runs one suite; each finishes in < 30 min on 2 CPU cores (pre-training included).
SUITES: dict[str, tuple[str, ...]] = {
    "paper": tuple(name for name in METHODS if METHODS[name].group not in ("beyond", "budget")),
    "beyond": ("grft-row-k1", "grft-row-k2", "random-row-k1", "random-row-k2",
               *(name for name in METHODS if METHODS[name].group == "beyond")),
}
DEFAULT_METHODS = SUITES["paper"]
# the methods of the first-order diagnostic (``--first-order``): every static row / column choice
FIRST_ORDER_METHODS = tuple(name for name in METHODS if METHODS[name].chooses)
