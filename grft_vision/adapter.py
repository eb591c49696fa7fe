"""Compact adapter files: one safetensors file with everything a GRFT fine-tune changed.

Contents (tensor keys use the original, unwrapped module names):

- ``<layer>.grft_indices`` (int32) and ``<layer>.grft_delta``: the chosen entries and their update;
- ``<layer>.grft_residue_index`` / ``.grft_residue_value``: after dynamic re-selection, the updates of
  entries chosen earlier (flat weight positions and values);
- every other trainable tensor under its own name (head, biases, LayerScale, ...);
- the running statistics of BatchNorm layers (they change in train mode even when frozen);

and as metadata: the format tag, the :class:`~grft_vision.config.GRFTConfig`, the structure of each layer,
and the base model's identity — architecture name, every parameter shape, and a checksum of every
targeted weight — so that loading onto a model the adapter does not fit is an error, not a silent
mismatch. Files are written atomically (temporary file, then rename).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .anatomy import architecture_name, grft_layers, is_grft_model, original_name
from .config import GRFTConfig
from .model import wrap_with_indices

__all__ = ["save_adapter", "load_adapter", "adapter_state", "apply_adapter_state", "AdapterError",
           "ADAPTER_FORMAT"]

ADAPTER_FORMAT = "grft-adapter/1"
_INDICES, _DELTA = ".grft_indices", ".grft_delta"
_RESIDUE_INDEX, _RESIDUE_VALUE = ".grft_residue_index", ".grft_residue_value"
_CHECKSUM_RTOL = 1e-3
_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class AdapterError(ValueError):
    """An adapter file cannot be read or does not fit the model; the message says why and what to do."""


def _weight_checksum(weight: torch.Tensor) -> float:
    """Sum of squares in float64: a cheap fingerprint that survives dtype casts and device moves."""
    return float(weight.detach().double().pow(2).sum())


def _base_identity(model: nn.Module) -> dict:
    wrapped = {name: layer for name, layer in grft_layers(model)}
    shapes = {name: list(param.shape) for name, param in _original_parameters(model).items()}
    checksums = {f"{name}.weight": _weight_checksum(layer.pristine_weight()) for name, layer in wrapped.items()}
    return {"architecture": architecture_name(model), "param_shapes": shapes, "weight_checksums": checksums}


def _batchnorm_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {original_name(f"{name}.{buffer}"): value for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for buffer, value in module.named_buffers(recurse=False) if buffer in _STAT_BUFFERS}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, keyed as in the file (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    delta_ids = set()
    for name, layer in grft_layers(model):
        delta_ids.add(id(layer.delta))
        tensors[name + _INDICES] = layer.indices.to(torch.int32)
        tensors[name + _DELTA] = layer.delta.detach()
        if layer.residue_index.numel():
            tensors[name + _RESIDUE_INDEX] = layer.residue_index
            tensors[name + _RESIDUE_VALUE] = layer.residue_value
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in delta_ids:
            tensors[original_name(name)] = param.detach()
    tensors.update(_batchnorm_stats(model))
    return {key: value.contiguous().cpu() for key, value in tensors.items()}


def adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a wrapped model's adapter: what :func:`save_adapter` writes.

    Raises:
        ValueError: the model holds no GRFT layer.
    """
    if not is_grft_model(model):
        raise ValueError("saving an adapter needs a model wrapped by apply_grft (it holds no GRFT layer).")
    config: GRFTConfig = model.grft_config
    metadata = {
        "format": ADAPTER_FORMAT,
        "config": json.dumps(config.to_dict()),
        "structures": json.dumps({name: layer.structure for name, layer in grft_layers(model)}),
        "base_model": json.dumps(_base_identity(model)),
    }
    return adapter_tensors(model), metadata


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter of a wrapped model to ``path`` (a ``.safetensors`` file), atomically.

    Raises:
        ValueError: the model holds no GRFT layer.
    """
    tensors, metadata = adapter_state(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, tmp_name, metadata=metadata)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
    return path


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise AdapterError(f"adapter file {str(path)!r} does not exist; pass the path of a file written by "
                           "save_adapter (e.g. <run dir>/adapter.safetensors).")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated/corrupted files
        raise AdapterError(f"cannot read adapter {str(path)!r}: {error}. The file is truncated or corrupted; "
                           "save it again, or use the copy in the run directory.") from error
    if metadata.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{str(path)!r} is a safetensors file but not a GRFT adapter "
                           f"(format {metadata.get('format')!r}, expected {ADAPTER_FORMAT!r}).")
    return metadata, tensors


def _original_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model parameters under their original (unwrapped) names; GRFT updates left out."""
    return {original_name(name): param for name, param in model.named_parameters() if not name.endswith(".delta")}


def _check_identity(source: str, saved: dict, model: nn.Module, check_weights: bool) -> None:
    params = _original_parameters(model)
    saved_shapes = saved["param_shapes"]
    differences = [f"{name}: adapter {saved_shapes.get(name)} vs model "
                   f"{list(params[name].shape) if name in params else None}"
                   for name in sorted(set(saved_shapes) | set(params))
                   if name not in params or saved_shapes.get(name) != list(params[name].shape)]
    if differences:
        raise AdapterError(
            f"adapter {source!r} was saved from {saved['architecture']!r} and does not fit this "
            f"{architecture_name(model)!r}: {len(differences)} parameter(s) differ, e.g. "
            f"{'; '.join(differences[:3])}. Create the same model (architecture and num_classes) it was "
            "trained from.")
    if not check_weights:
        return
    for weight_name, checksum in saved["weight_checksums"].items():
        if abs(_weight_checksum(params[weight_name]) - checksum) > _CHECKSUM_RTOL * abs(checksum):
            raise AdapterError(
                f"adapter {source!r} was trained on different base weights: {weight_name!r} does not match. "
                "Load the same pre-trained checkpoint it was trained from (or pass check_weights=False "
                "to load anyway).")


def load_adapter(model: nn.Module, path: str | os.PathLike, *, check_weights: bool = True) -> nn.Module:
    """Load an adapter file onto ``model`` and return it, wrapped and ready to run or train further.

    ``model`` is a plain model (it is wrapped with the file's indices) or one already wrapped with the
    same layers and structures (its indices and updates are overwritten, its parameters kept).

    Args:
        model: the base model the adapter was trained from (same architecture, classes and weights).
        path: the ``.safetensors`` file written by :func:`save_adapter`.
        check_weights: compare a checksum of every targeted weight with the one stored in the file.

    Raises:
        AdapterError: unreadable, truncated or foreign file, or a model it does not fit.
    """
    path = Path(path)
    metadata, tensors = _read(path)
    return apply_adapter_state(model, tensors, metadata, source=str(path), check_weights=check_weights)


def apply_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
                        source: str = "adapter", check_weights: bool = True) -> nn.Module:
    """Load ``(tensors, metadata)`` from :func:`adapter_state` onto ``model`` (see :func:`load_adapter`)."""
    config = GRFTConfig.from_dict(json.loads(metadata["config"]))
    structures: dict[str, str] = json.loads(metadata["structures"])
    saved_identity = json.loads(metadata["base_model"])
    existing = dict(grft_layers(model))
    if existing and set(existing) != set(structures):
        raise AdapterError(f"model is wrapped at {len(existing)} layers but adapter {source!r} has "
                           f"{len(structures)}; load it onto a fresh (unwrapped) model instead.")
    if not existing:
        missing = [name for name in structures if not _has_module(model, name)]
        if missing:
            raise AdapterError(f"adapter {source!r} targets layers this model does not have, e.g. "
                               f"{missing[:3]}; it was saved from {saved_identity['architecture']!r}.")
    _check_identity(source, saved_identity, model, check_weights)
    indices = {name: tensors[name + _INDICES].long() for name in structures}
    if existing:
        for name, layer in existing.items():
            if layer.structure != structures[name]:
                raise AdapterError(f"layer {name!r} is wrapped as {layer.structure!r} but the adapter holds "
                                   f"{structures[name]!r}; load it onto a fresh model instead.")
            layer.unload()  # back to the pre-trained weight before any residue of the file is folded in
            if not torch.equal(layer.indices.cpu(), indices[name]):
                layer.set_indices(indices[name])
        wrap_with_indices(model, {}, {}, config)
    else:
        wrap_with_indices(model, indices, structures, config)
    _copy_values(model, tensors, structures, source)
    layers = dict(grft_layers(model))
    for name in structures:
        if name + _RESIDUE_INDEX in tensors:
            layers[name].add_residue(tensors[name + _RESIDUE_INDEX], tensors[name + _RESIDUE_VALUE])
    return model


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _copy_values(model: nn.Module, tensors: dict[str, torch.Tensor], structures: dict[str, str],
                 source: str) -> None:
    layers = dict(grft_layers(model))
    named = {original_name(name): tensor for name, tensor in model.named_parameters()}
    named.update({original_name(name): tensor for name, tensor in model.named_buffers()})
    with torch.no_grad():
        for name in structures:
            layers[name].delta.copy_(tensors[name + _DELTA])
        for key, value in tensors.items():
            if key.endswith((_INDICES, _DELTA, _RESIDUE_INDEX, _RESIDUE_VALUE)):
                continue
            if key not in named:
                raise AdapterError(f"adapter {source!r} holds {key!r}, which this model does not have.")
            named[key].copy_(value)
