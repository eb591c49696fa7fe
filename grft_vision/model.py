"""Turning a model into a GRFT model and back: target discovery, wrapping, adapters, merging, unloading.

``apply_grft`` scores the targeted ``nn.Linear`` / ``nn.Conv2d`` layers of a model (the head excluded),
chooses their rows / columns / entries, wraps each in a :mod:`grft_vision.layers` wrapper and adds a named
adapter: the chosen entries' updates, plus the adapter's own copies of every tensor it trains in full
(:mod:`grft_vision.owned_tensors`). Applied again with another ``adapter_name``, it adds a second adapter
to the same frozen backbone. ``merge_grft`` folds the active adapter in and removes every wrapper,
leaving a plain model; ``unload_grft`` removes everything and gives back the original model, bit for bit.
The adapter lifecycle between the two (switch, delete, merge/unmerge, disable) is :mod:`grft_vision.lifecycle`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .anatomy import base_tensors, find_target_layers, head_module_names, original_name
from .config import GRFTConfig, resolve_config
from .errors import AdapterError, ConfigError, SelectionError
from .layers import GRFTLayer, grft_layers, wrap_layer
from .lifecycle import disable_adapter, set_adapter
from .owned_tensors import own_tensor, owned_tensors, release_tensor
from .selection.budget import allocate_units
from .selection.record import LayerSelection, SelectionRecord
from .selection.topk import candidate_count, choose_indices, resolve_k
from .trainable import fully_trained_tensors, tracked_statistics

__all__ = ["AdapterRecord", "GRFTState", "DEFAULT_ADAPTER", "apply_grft", "add_adapter", "check_targets", "merge_grft",
           "unload_grft", "grft_state"]

DEFAULT_ADAPTER = "default"
_ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_RESERVED_NAMES = set(dir(nn.ModuleDict())) | set(dir(nn.ParameterDict()))


@dataclass
class AdapterRecord:
    """What one adapter is: its config, its selection record, and the units chosen per layer."""

    config: GRFTConfig
    selection: SelectionRecord | None = None
    budgets: dict[str, int] = field(default_factory=dict)


@dataclass
class GRFTState:
    """The adapters of a wrapped model (``model.grft_state``) and which one is active.

    Attributes:
        adapters: one :class:`AdapterRecord` per adapter name, in the order they were added.
        active: the active adapter's name (None: the model computes the base model).
        requires_grad: the base parameters' ``requires_grad`` before wrapping (restored by unwrapping).
    """

    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    active: str | None = None
    requires_grad: dict[str, bool] = field(default_factory=dict)

    def _record(self) -> AdapterRecord:
        if self.active is None:
            raise AdapterError(f"no adapter is active (adapters: {list(self.adapters)}); call "
                               "grft_vision.set_adapter(model, name).")
        return self.adapters[self.active]

    @property
    def config(self) -> GRFTConfig:
        """The active adapter's config."""
        return self._record().config

    @property
    def selection(self) -> SelectionRecord | None:
        """The active adapter's selection record (None when it was loaded from a file)."""
        return self._record().selection

    @property
    def budgets(self) -> dict[str, int]:
        """Units per layer of the active adapter (its final budget, for incremental schedules)."""
        return self._record().budgets


def grft_state(model: nn.Module) -> GRFTState:
    """The :class:`GRFTState` of a wrapped model.

    Raises:
        AdapterError: the model is not wrapped by :func:`apply_grft`.
    """
    state = getattr(model, "grft_state", None)
    if state is None:
        raise AdapterError(f"{type(model).__name__} is not a GRFT model; wrap it with grft_vision.apply_grft first.")
    return state


def _check_adapter_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name) or name in _RESERVED_NAMES:
        raise ConfigError(f"adapter_name={name!r} must start with a letter or '_' and hold only letters, digits, "
                          "'_' and '-' (and must not be a reserved name such as 'keys' or 'update').")
    state = getattr(model, "grft_state", None)
    if state is not None and name in state.adapters:
        raise AdapterError(f"the model already has an adapter named {name!r}; pass another adapter_name=, or call "
                           f"grft_vision.delete_adapter(model, {name!r}) first.")


def _refuse_peft_model(model: nn.Module) -> None:
    tuned = next((name for name, module in model.named_modules() if type(module).__module__.startswith("peft.")), None)
    if tuned is not None:
        raise ConfigError(f"the model holds PEFT tuner layers ({tuned!r}); GRFT would wrap them and freeze them. "
                          "Merge PEFT first (model = model.merge_and_unload()) or apply GRFT to the base model.")


def _check_score(name: str, layer: nn.Module, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    key = f"{name}.weight"
    if key not in scores:
        raise SelectionError(f"scores has no entry for {key!r}. Compute scores for every targeted layer "
                             f"(grft_vision.selection) or exclude it with exclude_modules=['{name}'].")
    score = scores[key]
    if tuple(score.shape) != tuple(layer.weight.shape):
        raise SelectionError(f"score for {key!r} has shape {tuple(score.shape)}, but the weight has shape "
                             f"{tuple(layer.weight.shape)}; scores must match the weight they rank.")
    return score


def check_targets(model: nn.Module, config: GRFTConfig) -> dict[str, nn.Module]:
    """The layers ``config`` targets (:func:`~grft_vision.anatomy.find_target_layers`), once k is known to fit
    every one of them: checked before any score is computed.

    Raises:
        ConfigError: no layer is targeted, or the head patterns match nothing.
        SelectionError: k is larger than a targeted layer's dimension.
    """
    head_module_names(model, config.head_modules)
    targets = find_target_layers(model, config)
    for name, layer in targets.items():
        structure = config.layer_structure(layer)
        count = candidate_count(layer.weight.shape, structure, getattr(layer, "groups", 1))
        resolve_k(config.k, count, name, structure, config.clamp_k)
    return targets


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)


def _scores(model: nn.Module, config: GRFTConfig, scores: Mapping[str, torch.Tensor] | None,
            dataloader: Iterable[Any] | None, options: dict[str, Any]) -> tuple[Mapping[str, torch.Tensor], Any]:
    """The given scores, or scores computed on the base model (adapters disabled); and the selection result."""
    if scores is not None and dataloader is not None:
        raise ConfigError("apply_grft takes scores= or dataloader=, not both.")
    if scores is not None:
        return scores, None
    from .selection.gradients import compute_scores  # the selection stack loads only when scores are computed
    from .selection.salience import DATA_FREE_SCORES

    if dataloader is None and config.score not in DATA_FREE_SCORES:
        raise ConfigError(f"score={config.score!r} needs data: pass dataloader= (training batches), or scores= "
                          f"(weight name -> importance tensor), or a data-free score ({', '.join(DATA_FREE_SCORES)}).")
    if getattr(model, "grft_state", None) is None:
        result = compute_scores(model, dataloader, config, **options)
    else:
        with disable_adapter(model):
            result = compute_scores(model, dataloader, config, **options)
    return result.scores, result


def apply_grft(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor] | None = None,
    config: GRFTConfig | Mapping[str, Any] | None = None,
    *,
    dataloader: Iterable[Any] | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
    **selection_options: Any,
) -> nn.Module:
    """Add a GRFT adapter to ``model`` in place: score, choose, wrap; the new adapter is active and trainable.

    Pass ``scores``, or a ``dataloader`` to compute them with :func:`grft_vision.selection.compute_scores`
    (SupCon gradients on the lowest-loss subset); the data-free scores (``random``, ``magnitude``,
    ``synflow``) need neither. On a model that already has adapters, the new one is scored on the base
    model (the other adapters disabled) and added beside them.

    Args:
        model: a timm model or any ``nn.Module`` with ``nn.Linear`` / ``nn.Conv2d`` layers.
        scores: per-parameter importance keyed by weight name (``"blocks.0.attn.qkv.weight"``), each of
            the weight's shape; the top-k rows / columns / per-row entries are chosen
            (:func:`grft_vision.selection.choose_indices`).
        config: a :class:`GRFTConfig` or a mapping of its fields (keyword only in spirit: pass ``config=``);
            None for the defaults.
        dataloader: training data yielding ``(images, labels)``, used to compute the scores.
        adapter_name: the new adapter's name (letters, digits, ``_``, ``-``).
        **selection_options: passed to :func:`~grft_vision.selection.compute_scores` (``features``,
            ``device``, ``amp``, ``progress``, ``input_shape``).

    Returns:
        The same model object, with wrappers in place and ``model.grft_state`` (:class:`GRFTState`) holding
        the adapter's config, selection record and units per layer (with ``schedule='incremental'`` every
        layer starts with none chosen and the schedule unmasks its budget).

    Raises:
        ConfigError: a config passed as ``scores``, scores and a loader both given (or neither, for a score
            that needs data), no layer targeted, a bad adapter name, or a model holding PEFT tuner layers.
        SelectionError: a score is missing or has the wrong shape, k exceeds a layer's dimension, or the
            selection data is unusable.
        AdapterError: an adapter of that name exists.
    """
    if isinstance(scores, GRFTConfig):
        raise ConfigError("apply_grft(model, config) was called with the config in the place of scores; pass it by "
                          "name: apply_grft(model, config=config, dataloader=loader).")
    config = resolve_config(config)
    _refuse_peft_model(model)
    _check_adapter_name(model, adapter_name)
    targets = check_targets(model, config)
    scores, result = _scores(model, config, scores, dataloader, selection_options)
    record = SelectionRecord(config.structure, config.k)
    if result is not None and result.subset_size is not None:
        record = SelectionRecord(config.structure, config.k, config.num_subsets, result.subset_losses,
                                 result.chosen_subset, result.subset_size, result.seconds)
    checked = {f"{name}.weight": _check_score(name, layer, scores) for name, layer in targets.items()}
    structures = {name: config.layer_structure(layer) for name, layer in targets.items()}
    units = allocate_units(targets, checked, structures, config)
    indices = {}
    incremental = config.schedule == "incremental"  # starts from nothing; the schedule unmasks the budget
    for name, layer in targets.items():
        if units[name] == 0:  # a global or entropy budget left this layer frozen
            continue
        groups = getattr(layer, "groups", 1)
        score = checked[f"{name}.weight"]
        indices[name] = choose_indices(score, structures[name], 0 if incremental else units[name], groups=groups,
                                       layer_name=name)
        record.layers.append(LayerSelection.build(name, structures[name], score, indices[name], groups))
    budgets = {name: units[name] for name in indices}
    return add_adapter(model, adapter_name, indices, {name: structures[name] for name in indices}, config,
                       selection=record, budgets=budgets)


def add_adapter(model: nn.Module, adapter_name: str, indices: Mapping[str, torch.Tensor],
                structures: Mapping[str, str], config: GRFTConfig, *, selection: SelectionRecord | None = None,
                budgets: Mapping[str, int] | None = None) -> nn.Module:
    """Add adapter ``adapter_name`` with given chosen entries per layer, and make it the active one.

    The low-level step shared by :func:`apply_grft`, :func:`grft_vision.load_adapter` and the training
    engine (which broadcasts the main process's selection). Layers not wrapped yet are wrapped; every tensor
    ``config`` trains in full, and every BatchNorm statistic, gets the adapter's own copy.
    """
    _check_adapter_name(model, adapter_name)
    state = getattr(model, "grft_state", None)
    if state is None:
        state = GRFTState(requires_grad={name: p.requires_grad for name, p in base_tensors(model).items()})
    for name, layer_indices in indices.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, GRFTLayer):
            layer = wrap_layer(layer)
            _replace_module(model, name, layer)
        layer.add_adapter(adapter_name, structures[name], layer_indices, train_bias=config.train_bias,
                          keep_float32=config.autocast_adapter_dtype)
    head_names = head_module_names(model, config.head_modules)
    for _, owner, tensor_name in fully_trained_tensors(model, config, head_names) + tracked_statistics(model):
        own_tensor(owner, tensor_name, adapter_name, keep_float32=config.autocast_adapter_dtype)
    state.adapters[adapter_name] = AdapterRecord(config, selection, dict(budgets or {}))
    model.grft_state = state
    set_adapter(model, adapter_name)
    return model


def _unwrap(model: nn.Module, merge: bool) -> nn.Module:
    state = grft_state(model)
    for name, layer in list(grft_layers(model)):
        _replace_module(model, name, layer.detach_base(merge))
    for _, owner, tensor_name, _ in list(owned_tensors(model)):
        release_tensor(owner, tensor_name, keep_active=merge)
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(original_name(name), param.requires_grad))
    del model.grft_state
    return model


def merge_grft(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the weights and remove every wrapper and adapter (PEFT's ``merge_and_unload``).

    Returns the same model object, now a plain model: a timm model stays a timm model, with the original
    ``state_dict`` keys and no inference overhead. Its head, LayerScale gammas and other tensors the
    adapter trained in full hold the adapter's values; its BatchNorm statistics, the adapter's.
    """
    return _unwrap(model, merge=True)


def unload_grft(model: nn.Module) -> nn.Module:
    """Remove every wrapper and adapter without merging: the original model, every tensor bit for bit."""
    return _unwrap(model, merge=False)
