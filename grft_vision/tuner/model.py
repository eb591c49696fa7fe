"""Injecting an adapter into a model, and taking every adapter out again: ``inject``, ``merge_grft``, ``unload_grft``.

:func:`inject` wraps the layers an adapter updates (:mod:`.layer`), adds the adapter's update of the given
chosen entries to each, and gives the adapter its own copies of every tensor it trains in full and of the
BatchNorm statistics (:mod:`.owned`); the model's :class:`~grft_vision.tuner.state.GRFTState` records it and
makes it active. Which entries are chosen is not this module's business: :func:`grft_vision.apply_grft`
scores and chooses them, the adapter loaders read them from files. ``merge_grft`` folds the active adapter
in and removes every wrapper, leaving a plain model; ``unload_grft`` removes everything and gives back the
original model, bit for bit.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..config import GRFTConfig
from ..errors import ConfigError
from . import batch_context
from .anatomy import base_tensors, head_module_names, original_name
from .layer import GRFTLayer, grft_layers, wrap_layer
from .lifecycle import replace_module, set_adapter
from .owned import own_tensor, owned_tensors, release_tensor
from .quantized import is_quantized, quantized_format, quantized_layers
from .quantized_layer import GRFTQuantizedLinear
from .state import AdapterRecord, GRFTState, check_adapter_name, grft_state
from .trainable import fully_trained_tensors, tracked_statistics

__all__ = ["inject", "merge_grft", "unload_grft", "merge_and_unload", "unload", "refuse_peft_model"]


def refuse_peft_model(model: nn.Module) -> None:
    """Raise :class:`ConfigError` when ``model`` holds PEFT tuner layers (GRFT would wrap and freeze them)."""
    tuned = next((name for name, module in model.named_modules() if type(module).__module__.startswith("peft.")), None)
    if tuned is not None:
        raise ConfigError(f"the model holds PEFT tuner layers ({tuned!r}); GRFT would wrap them and freeze them. "
                          "Merge PEFT first (model = model.merge_and_unload()) or apply GRFT to the base model.")


def _batch_layout(model: nn.Module, name: str) -> batch_context.BatchLayout:
    """Where module ``name`` sees the batch (:func:`~.batch_context.layout_of` of it and the modules around it)."""
    parts = name.split(".") if name else []
    return batch_context.layout_of([model] + [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts) + 1)])


def inject(model: nn.Module, adapter_name: str, indices: Mapping[str, torch.Tensor], structures: Mapping[str, str],
           config: GRFTConfig, *, selection: Any = None, budgets: Mapping[str, int] | None = None) -> nn.Module:
    """Add adapter ``adapter_name`` with the given chosen entries per layer, and make it the active one.

    Layers not wrapped yet are wrapped; every tensor ``config`` trains in full, and every BatchNorm statistic,
    gets the adapter's own copy. Returns the same model.

    Args:
        model: the model (plain, or wrapped with other adapters).
        adapter_name: the new adapter's name.
        indices: chosen units per layer name (each structure's layout).
        structures: structure name per layer name.
        config: the adapter's config (trainable-set rules, dtype rule).
        selection: the selection record to keep with the adapter (None for a loaded one).
        budgets: units per layer (the final budget of an incremental schedule).

    Raises:
        ConfigError / AdapterError: a bad or taken adapter name, or a context open on the model.
    """
    check_adapter_name(model, adapter_name)
    state = getattr(model, "grft_state", None)
    if state is None:
        state = GRFTState(requires_grad={name: p.requires_grad for name, p in base_tensors(model).items()})
    state.check_changeable("adding an adapter")
    for _, layer in quantized_layers(model):  # wrapped or not: the backward pass runs through them all
        quantized_format(layer).keep_trainable(layer)
    for name, layer_indices in indices.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, GRFTLayer):
            wrapper = GRFTQuantizedLinear if is_quantized(layer) else wrap_layer
            layer = wrapper(layer, state, name, _batch_layout(model, name))
            replace_module(model, name, layer)
        layer.add_adapter(adapter_name, structures[name], layer_indices, train_bias=config.train_bias,
                          keep_float32=config.autocast_adapter_dtype)
    head_names = head_module_names(model, config.head_modules)
    for module_name, owner, tensor_name in fully_trained_tensors(model, config, head_names) + tracked_statistics(model):
        own_tensor(owner, tensor_name, adapter_name, state, owner_name=module_name,
                   batch_layout=_batch_layout(model, module_name), keep_float32=config.autocast_adapter_dtype)
    state.adapters[adapter_name] = AdapterRecord(config, selection, dict(budgets or {}))
    model.grft_state = state
    set_adapter(model, adapter_name)
    return model


def _unwrap(model: nn.Module, merge: bool, action: str) -> nn.Module:
    state = grft_state(model)
    state.check_changeable(action)
    keep = state.active if merge else None
    for name, layer in list(grft_layers(model)):
        replace_module(model, name, layer.detach_base(merge))
    for _, owner, tensor_name, _ in list(owned_tensors(model)):
        release_tensor(owner, tensor_name, keep=keep)
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(original_name(name), param.requires_grad))
    del model.grft_state
    return model


def merge_grft(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the weights and remove every wrapper and adapter (PEFT's ``merge_and_unload``).

    Returns the same model object, now a plain model: a timm model stays a timm model, with the original
    ``state_dict`` keys and no inference overhead. Its head, LayerScale gammas and other tensors the adapter
    trained in full hold the adapter's values; its BatchNorm statistics, the adapter's.

    Raises:
        AdapterError: the model is not wrapped, or a context (``disable_adapter``, ``mixed_adapters``) is open.
    """
    return _unwrap(model, merge=True, action="merge_grft")


def unload_grft(model: nn.Module) -> nn.Module:
    """Remove every wrapper and adapter without merging: the original model, every tensor bit for bit (PEFT's
    ``unload``).

    Raises:
        AdapterError: the model is not wrapped, or a context is open.
    """
    return _unwrap(model, merge=False, action="unload_grft")


# PEFT's names for the same operations (PeftModel.merge_and_unload / unload), so that a PEFT user's habits work
merge_and_unload = merge_grft
unload = unload_grft
