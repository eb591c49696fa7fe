"""``apply_grft``: choose an adapter's entries from scores (the selection package) and inject it (the tuner).

The one place the two halves meet: the tuner never imports selection, and selection never wraps a model.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .config import GRFTConfig, ScheduleConfig, resolve_config
from .errors import ConfigError, SelectionError
from .tuner.lifecycle import disable_adapter
from .tuner.model import inject, merge_grft, refuse_peft_model, unload_grft
from .tuner.quantized import is_quantized, weight_shape
from .tuner.state import DEFAULT_ADAPTER, check_adapter_name
from .tuner.targets import check_targets

__all__ = ["apply_grft", "merge_grft", "unload_grft", "choose_entries"]


def _check_score(name: str, layer: nn.Module, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    key = f"{name}.weight"
    if key not in scores:
        raise SelectionError(f"scores has no entry for {key!r}. Compute scores for every targeted layer "
                             f"(grft_vision.selection) or exclude it with exclude_modules=['{name}'].")
    score = scores[key]
    if tuple(score.shape) != weight_shape(layer):
        raise SelectionError(f"score for {key!r} has shape {tuple(score.shape)}, but the weight has shape "
                             f"{weight_shape(layer)}; scores must match the weight they rank.")
    return score


def _check_quantized(targets: Mapping[str, nn.Module], config: GRFTConfig) -> None:
    """Mask schedules write the entries that stop training into the weight, which a quantized layer would have
    to re-quantize at every schedule event: they are refused there."""
    quantized = [name for name, layer in targets.items() if is_quantized(layer)]
    if quantized and config.schedule != ScheduleConfig().kind:
        raise ConfigError(f"schedule={config.schedule!r} changes the chosen entries during training, which GRFT does "
                          f"not offer on quantized layers ({quantized[0]!r}, ...): use the default static schedule, "
                          "or a full-precision model.")


def _scores(model: nn.Module, config: GRFTConfig, scores: Mapping[str, torch.Tensor] | None,
            dataloader: Iterable[Any] | None, options: dict[str, Any]) -> tuple[Mapping[str, torch.Tensor], Any]:
    """The given scores, or scores computed on the base model (adapters disabled); and the selection result."""
    if scores is not None and dataloader is not None:
        raise ConfigError("apply_grft takes scores= or dataloader=, not both.")
    if scores is not None:
        return scores, None
    from .selection.gradients import compute_scores  # the selection stack loads only when scores are computed
    from .selection.scores import SCORES, data_free_scores

    if dataloader is None and SCORES.get(config.score).needs_data:
        raise ConfigError(f"score={config.score!r} needs data: pass dataloader= (training batches), or scores= "
                          f"(weight name -> importance tensor), or a data-free score ({', '.join(data_free_scores())}).")
    if getattr(model, "grft_state", None) is None:
        result = compute_scores(model, dataloader, config, **options)
    else:
        with disable_adapter(model):
            result = compute_scores(model, dataloader, config, **options)
    return result.scores, result


def choose_entries(targets: Mapping[str, nn.Module], scores: Mapping[str, torch.Tensor], config: GRFTConfig,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, int], list]:
    """Indices, structure and units of every layer the budget gives units to, and their selection records.

    With ``schedule='incremental'`` every layer starts with none chosen (the schedule unmasks its budget).
    """
    from .selection.budget import allocate_units
    from .selection.record import LayerSelection
    from .selection.topk import choose_indices

    checked = {f"{name}.weight": _check_score(name, layer, scores) for name, layer in targets.items()}
    structures = {name: config.layer_structure(layer) for name, layer in targets.items()}
    units = allocate_units(dict(targets), checked, structures, config)
    incremental = config.schedule == "incremental"
    indices, records = {}, []
    for name, layer in targets.items():
        if units[name] == 0:  # a global or entropy budget left this layer frozen
            continue
        groups = getattr(layer, "groups", 1)
        score = checked[f"{name}.weight"]
        indices[name] = choose_indices(score, structures[name], 0 if incremental else units[name], groups=groups,
                                       layer_name=name)
        records.append(LayerSelection.build(name, structures[name], score, indices[name], groups))
    return indices, {name: structures[name] for name in indices}, {name: units[name] for name in indices}, records


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
        config: a :class:`GRFTConfig` or a mapping of its keys (pass it by name: ``config=``); None for the
            defaults.
        dataloader: training data yielding ``(images, labels)``, used to compute the scores.
        adapter_name: the new adapter's name (letters, digits, ``_``, ``-``).
        **selection_options: passed to :func:`~grft_vision.selection.compute_scores` (``features``,
            ``device``, ``amp``, ``progress``, ``input_shape``).

    Returns:
        The same model object, with wrappers in place and ``model.grft_state``
        (:class:`~grft_vision.tuner.state.GRFTState`) holding the adapter's config, selection record and units
        per layer.

    Raises:
        ConfigError: a config passed as ``scores``, scores and a loader both given (or neither, for a score
            that needs data), no layer targeted, a bad adapter name, or a model holding PEFT tuner layers.
        SelectionError: a score is missing or has the wrong shape, k exceeds a layer's dimension, or the
            selection data is unusable.
        AdapterError: an adapter of that name exists, or a context is open on the model.
    """
    from .selection.record import SelectionRecord

    if isinstance(scores, GRFTConfig):
        raise ConfigError("apply_grft(model, config) was called with the config in the place of scores; pass it by "
                          "name: apply_grft(model, config=config, dataloader=loader).")
    config = resolve_config(config)
    refuse_peft_model(model)
    check_adapter_name(model, adapter_name)
    state = getattr(model, "grft_state", None)
    if state is not None:
        state.check_changeable("apply_grft")
    targets = check_targets(model, config)
    _check_quantized(targets, config)
    scores, result = _scores(model, config, scores, dataloader, selection_options)
    record = SelectionRecord(config.structure, config.k)
    if result is not None and result.subset_size is not None:
        record = SelectionRecord(config.structure, config.k, config.num_subsets, result.subset_losses,
                                 result.chosen_subset, result.subset_size, result.seconds)
    indices, structures, budgets, record.layers = choose_entries(targets, scores, config)
    return inject(model, adapter_name, indices, structures, config, selection=record, budgets=budgets)
