"""Adapter files: everything one adapter holds, in one safetensors file or a PEFT-style directory.

A file (``save_adapter`` / ``load_adapter``) holds, with tensor keys under the original module names:

- ``<layer>.grft_indices`` (int32) and ``<layer>.grft_delta``: the chosen entries and their update;
  ``<layer>.grft_bias_delta``: the change of the layer's bias; ``<layer>.grft_frozen_index`` /
  ``.grft_frozen_value``: changes that no longer train (after a dynamic schedule moved the entries);
- every tensor the adapter trains in full under its own name (``head.weight``, LayerScale gammas, ...) and
  the running statistics of BatchNorm layers;

and as metadata: the format tag, the adapter's name, the library version, its
:class:`~grft_vision.config.GRFTConfig`, each layer's structure, and the base model's identity —
architecture, pretrained tag / Hub id / input size when known, every backbone parameter's shape, and a
fingerprint of every backbone parameter (sums in float64) — so that loading onto a model the adapter does
not fit is an error, never a silent mismatch. Everything read is validated: metadata, tensor shapes and
dtypes, index ranges and uniqueness.

A directory (``save_pretrained`` / ``from_pretrained``) holds ``adapter_config.json`` (the metadata as readable
JSON) and ``adapter_model.safetensors``; the default adapter sits at the top, others in sub-folders named after
them, as PEFT lays them out. Files of the first format (``grft-adapter/1``) still load.
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .anatomy import architecture_name, base_tensors, head_module_names, in_modules, input_size
from .config import GRFTConfig
from .errors import AdapterError, ConfigError
from .files import atomic_write
from .layers import GRFTLayer, grft_layers
from .lifecycle import list_adapters
from .model import DEFAULT_ADAPTER, add_adapter, grft_state
from .owned_tensors import adapter_tensor_of, owned_tensors
from .selection.topk import candidate_count
from .trainable import fully_trained_tensors, tracked_statistics
from .updates import STRUCTURES

__all__ = ["save_adapter", "load_adapter", "save_pretrained", "from_pretrained", "adapter_state",
           "apply_adapter_state", "AdapterError", "ADAPTER_FORMAT", "CONFIG_NAME", "WEIGHTS_NAME"]

ADAPTER_FORMAT = "grft-adapter/2"
_FORMAT_1 = "grft-adapter/1"
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_INDICES, _DELTA, _BIAS_DELTA = ".grft_indices", ".grft_delta", ".grft_bias_delta"
_FROZEN_INDEX, _FROZEN_VALUE = ".grft_frozen_index", ".grft_frozen_value"
_LEGACY_RESIDUE_INDEX, _LEGACY_RESIDUE_VALUE = ".grft_residue_index", ".grft_residue_value"
_LAYER_SUFFIXES = (_INDICES, _DELTA, _BIAS_DELTA, _FROZEN_INDEX, _FROZEN_VALUE)
_FINGERPRINT_CHUNK = 1 << 20
_EPS = {"float64": 2.2e-16, "float32": 1.2e-7, "bfloat16": 7.8e-3, "float16": 9.8e-4}


# --------------------------------------------------------------------------------------------- identity
@functools.lru_cache(maxsize=4)
def _pattern(device: torch.device) -> torch.Tensor:
    """Fixed pseudo-random weights in [-0.5, 0.5), float64, one per position of a fingerprint chunk."""
    position = torch.arange(_FINGERPRINT_CHUNK, dtype=torch.int64, device=device)
    return ((position * 2654435761) % 65536).double() / 65536 - 0.5


def fingerprint(tensor: torch.Tensor) -> list[float]:
    """``[sum w, sum w^2, sum c_i w_i]`` in float64, ``c_i`` fixed pseudo-random weights in [-0.5, 0.5).

    Survives device moves; any change of a value moves at least one of the three sums (a permutation moves
    the third, within each chunk of 2^20 entries).
    """
    flat = tensor.detach().reshape(-1)
    pattern = _pattern(flat.device)
    sums = torch.zeros(3, dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), _FINGERPRINT_CHUNK):
        chunk = flat[start:start + _FINGERPRINT_CHUNK].double()
        sums += torch.stack([chunk.sum(), torch.dot(chunk, chunk), torch.dot(chunk, pattern[:len(chunk)])])
    return sums.tolist()


def _fingerprints_match(saved: dict, tensor: torch.Tensor) -> bool:
    """Equal up to the rounding of the coarser of the saved and the current dtype (a cast changes nothing more)."""
    current = fingerprint(tensor)
    eps = max(_EPS.get(saved.get("dtype", "float32"), 1e-3), _EPS.get(str(tensor.dtype).removeprefix("torch."), 1e-3))
    numel = max(tensor.numel(), 1)
    scale = math.sqrt(numel * max(saved["sums"][1], current[1], 1e-300))  # bounds sum |w|
    tolerances = (4 * eps * scale, 8 * eps * max(saved["sums"][1], current[1]), 2 * eps * scale)
    return all(abs(a - b) <= tol for a, b, tol in zip(saved["sums"], current, tolerances))


def _pretrained_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Backbone parameters by original name, pre-trained values (whatever is merged into a wrapped weight)."""
    tensors = base_tensors(model)
    for name, layer in grft_layers(model):
        tensors[f"{name}.weight"] = layer.pristine_weight()
        if layer.base_layer.bias is not None:
            tensors[f"{name}.bias"] = layer.pristine_bias()
    return tensors


def _base_identity(model: nn.Module, owned: set[str]) -> dict:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    tensors = {name: t for name, t in _pretrained_parameters(model).items() if name not in owned}
    return {
        "architecture": architecture_name(model),
        "pretrained_tag": cfg.get("tag"),
        "hf_hub_id": cfg.get("hf_hub_id") or getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "input_size": list(input_size(model) or []) or None,
        "param_shapes": {name: list(t.shape) for name, t in tensors.items()},
        "fingerprints": {name: {"dtype": str(t.dtype).removeprefix("torch."), "sums": fingerprint(t)}
                         for name, t in tensors.items()},
    }


# --------------------------------------------------------------------------------------------- saving
def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors a file of adapter ``adapter_name`` holds, keyed as in the file (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in grft_layers(model):
        if adapter_name not in layer.grft_updates:
            continue
        update = layer.grft_updates[adapter_name]
        tensors[name + _INDICES] = update.indices.to(torch.int32)
        tensors[name + _DELTA] = update.delta.detach()
        if update.bias_delta is not None:
            tensors[name + _BIAS_DELTA] = update.bias_delta.detach()
        if update.frozen_index.numel():
            tensors[name + _FROZEN_INDEX] = update.frozen_index
            tensors[name + _FROZEN_VALUE] = update.frozen_value
    for name, _, _, parametrization in owned_tensors(model):
        if adapter_name in parametrization.adapters:
            tensors[name] = parametrization.adapters[adapter_name].detach()
    return {key: value.contiguous().cpu() for key, value in tensors.items()}


def adapter_state(model: nn.Module, adapter_name: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of one adapter (default: the active one): what :func:`save_adapter` writes.

    Raises:
        AdapterError: the model is not wrapped, or has no such adapter.
    """
    from . import __version__

    state = grft_state(model)
    adapter_name = adapter_name or state.active
    if adapter_name not in state.adapters:
        raise AdapterError(f"the model has no adapter named {adapter_name!r}; its adapters are {list(state.adapters)}.")
    tensors = adapter_tensors(model, adapter_name)
    owned = {name for name, _, _, p in owned_tensors(model) if adapter_name in p.adapters}
    metadata = {
        "format": ADAPTER_FORMAT,
        "adapter_name": adapter_name,
        "library_version": __version__,
        "config": json.dumps(state.adapters[adapter_name].config.to_dict()),
        "structures": json.dumps({name: layer.grft_updates[adapter_name].structure
                                  for name, layer in grft_layers(model) if adapter_name in layer.grft_updates}),
        "base_model": json.dumps(_base_identity(model, owned)),
    }
    return tensors, metadata


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write one adapter (default: the active one) of a wrapped model to a ``.safetensors`` file, atomically.

    Raises:
        AdapterError: the model is not wrapped, or has no such adapter.
    """
    tensors, metadata = adapter_state(model, adapter_name)
    with atomic_write(path, "wb") as handle:
        handle.write(safetensors_bytes(tensors, metadata=metadata))
    return Path(path)


def save_pretrained(model: nn.Module, directory: str | os.PathLike,
                    adapter_names: list[str] | None = None) -> Path:
    """Write adapters (default: all) as PEFT-style directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

    The ``default`` adapter goes to ``directory`` itself, every other one to ``directory/<name>``.
    """
    directory = Path(directory)
    for name in adapter_names or list_adapters(model):
        target = directory if name == DEFAULT_ADAPTER else directory / name
        tensors, metadata = adapter_state(model, name)
        readable = {key: value if key in ("format", "adapter_name", "library_version") else json.loads(value)
                    for key, value in metadata.items()}
        with atomic_write(target / WEIGHTS_NAME, "wb") as handle:
            handle.write(safetensors_bytes(tensors, metadata=metadata))
        with atomic_write(target / CONFIG_NAME, "w") as handle:
            json.dump(readable, handle, indent=2)
    return directory


# --------------------------------------------------------------------------------------------- reading
def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise AdapterError(f"adapter file {str(path)!r} does not exist; pass the path of a file written by "
                           "save_adapter (e.g. <run dir>/adapter.safetensors).")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise AdapterError(f"cannot read adapter {str(path)!r}: {error}. The file is truncated or corrupted; "
                           "save it again, or use the copy in the run directory.") from error
    if metadata.get("format") not in (ADAPTER_FORMAT, _FORMAT_1):
        raise AdapterError(f"{str(path)!r} is a safetensors file but not a GRFT adapter "
                           f"(format {metadata.get('format')!r}, expected {ADAPTER_FORMAT!r}).")
    return metadata, tensors


@dataclass
class _Parsed:
    """The validated metadata of an adapter."""

    format: str
    name: str | None
    config: GRFTConfig
    structures: dict[str, str]
    base: dict[str, Any]


def _json_field(metadata: dict[str, str], key: str, kind: type, source: str) -> Any:
    if key not in metadata:
        raise AdapterError(f"adapter {source!r} has no {key!r} metadata; it was not written by save_adapter "
                           "(or was edited). Save it again.")
    try:
        value = json.loads(metadata[key]) if isinstance(metadata[key], str) else metadata[key]
    except json.JSONDecodeError as error:
        raise AdapterError(f"adapter {source!r}: its {key!r} metadata is not valid JSON ({error}).") from error
    if not isinstance(value, kind):
        raise AdapterError(f"adapter {source!r}: its {key!r} metadata is a {type(value).__name__}, expected a "
                           f"{kind.__name__}.")
    return value


def _parse(metadata: dict[str, str], source: str) -> _Parsed:
    config_values = _json_field(metadata, "config", dict, source)
    try:
        config = GRFTConfig.from_dict(config_values)
    except (ConfigError, TypeError) as error:
        raise AdapterError(f"adapter {source!r} holds an invalid config: {error}") from error
    structures = _json_field(metadata, "structures", dict, source)
    bad = {k: v for k, v in structures.items() if not isinstance(k, str) or v not in STRUCTURES}
    if bad:
        raise AdapterError(f"adapter {source!r}: unknown layer structures {bad}; expected one of {sorted(STRUCTURES)}.")
    base = _json_field(metadata, "base_model", dict, source)
    wanted = ("architecture", "param_shapes", "fingerprints") if metadata.get("format") == ADAPTER_FORMAT else \
        ("architecture", "param_shapes", "weight_checksums")
    missing = [key for key in wanted if key not in base]
    if missing or not isinstance(base.get("param_shapes"), dict):
        raise AdapterError(f"adapter {source!r}: its base_model metadata lacks {missing or ['param_shapes']}.")
    name = metadata.get("adapter_name")
    return _Parsed(metadata["format"], name if isinstance(name, str) else None, config, structures, base)


def _original_tensor(owner: nn.Module, name: str) -> torch.Tensor:
    parametrizations = getattr(owner, "parametrizations", {})
    return parametrizations[name].original if name in parametrizations else getattr(owner, name)


def _check_identity(source: str, parsed: _Parsed, model: nn.Module, owned: dict[str, torch.Tensor],
                    check_weights: bool) -> None:
    params = {name: t for name, t in _pretrained_parameters(model).items() if name not in owned}
    saved_shapes = {name: shape for name, shape in parsed.base["param_shapes"].items() if name not in owned}
    differences = [f"{name}: adapter {saved_shapes.get(name)} vs model "
                   f"{list(params[name].shape) if name in params else None}"
                   for name in sorted(set(saved_shapes) | set(params))
                   if name not in params or saved_shapes.get(name) != list(params[name].shape)]
    if differences:
        raise AdapterError(
            f"adapter {source!r} was saved from {parsed.base['architecture']!r} and does not fit this "
            f"{architecture_name(model)!r}: {len(differences)} parameter(s) differ, e.g. "
            f"{'; '.join(differences[:3])}. Create the same model (architecture and options) it was trained from.")
    if not check_weights:
        return
    if parsed.format == _FORMAT_1:
        mismatched = [name for name, checksum in parsed.base["weight_checksums"].items()
                      if abs(float(params[name].detach().double().pow(2).sum()) - checksum) > 1e-3 * abs(checksum)]
    else:
        mismatched = [name for name, saved in parsed.base["fingerprints"].items()
                      if name in params and not _fingerprints_match(saved, params[name])]
    if mismatched:
        raise AdapterError(
            f"adapter {source!r} was trained on different base weights: {len(mismatched)} tensor(s) differ, e.g. "
            f"{mismatched[:3]}. Load the pre-trained checkpoint it was trained from (pretrained tag "
            f"{parsed.base.get('pretrained_tag')!r}), or pass check_weights=False to load it onto another backbone "
            "on purpose.")


def _check_indices(name: str, layer: nn.Module, structure: str, indices: torch.Tensor, source: str) -> None:
    groups = getattr(layer, "groups", 1)
    dimension = candidate_count(layer.weight.shape, structure, groups)
    wanted_dim = 2 if structure == "sparse" else 1
    problem = None
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != wanted_dim:
        problem = f"has dtype {indices.dtype} and {indices.dim()} dimensions (expected int, {wanted_dim})"
    elif structure == "sparse" and indices.shape[0] != layer.weight.shape[0]:
        problem = f"has {indices.shape[0]} rows for a weight with {layer.weight.shape[0]}"
    elif indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= dimension):
        problem = f"holds values outside [0, {dimension})"
    elif indices.numel() and bool((indices.sort(dim=-1).values.diff(dim=-1) == 0).any()):
        problem = "holds duplicates"
    if problem:
        raise AdapterError(f"adapter {source!r}: the indices of layer {name!r} ({structure}) {problem}; the file is "
                           "corrupted or was edited. Save it again.")


def _expect_shape(key: str, tensor: torch.Tensor | None, shape: tuple[int, ...], source: str) -> None:
    if tensor is None:
        raise AdapterError(f"adapter {source!r} lacks {key!r}; the file is incomplete. Save it again.")
    if not tensor.is_floating_point() or tuple(tensor.shape) != tuple(shape):
        raise AdapterError(f"adapter {source!r}: {key!r} has shape {list(tensor.shape)} and dtype {tensor.dtype}, "
                           f"expected a float tensor of shape {list(shape)}; the file is corrupted or was edited.")


def _expected_owned(model: nn.Module, config: GRFTConfig) -> dict[str, tuple[nn.Module, str]]:
    """Original name -> (owner, tensor name) of what an adapter with ``config`` owns on this model."""
    head_names = head_module_names(model, config.head_modules)
    found = fully_trained_tensors(model, config, head_names) + tracked_statistics(model)
    return {f"{module_name}.{name}" if module_name else name: (owner, name) for module_name, owner, name in found}


def _check_tensors(model: nn.Module, parsed: _Parsed, tensors: dict[str, torch.Tensor],
                   owned: dict[str, tuple[nn.Module, str]], source: str) -> dict[str, torch.Tensor]:
    """Validate every tensor of the file; returns the indices per layer (int64)."""
    indices = {}
    for name, structure in parsed.structures.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"adapter {source!r} targets layer {name!r}, which this model does not have; it was "
                               f"saved from {parsed.base['architecture']!r}.") from None
        layer = module.base_layer if isinstance(module, GRFTLayer) else module
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) or (structure == "tap_column" and layer.weight.dim() != 4):
            raise AdapterError(f"adapter {source!r}: layer {name!r} is a {type(layer).__name__}, which cannot hold a "
                               f"{structure!r} update.")
        if name + _INDICES not in tensors:
            raise AdapterError(f"adapter {source!r} lacks {name + _INDICES!r}; the file is incomplete. Save it again.")
        _check_indices(name, layer, structure, tensors[name + _INDICES], source)
        indices[name] = tensors[name + _INDICES].long()
        shape = STRUCTURES[structure].shape_for(tuple(layer.weight.shape), indices[name].shape[-1],
                                                getattr(layer, "groups", 1))
        _expect_shape(name + _DELTA, tensors.get(name + _DELTA), shape, source)
        if name + _BIAS_DELTA in tensors:
            _expect_shape(name + _BIAS_DELTA, tensors[name + _BIAS_DELTA], (layer.weight.shape[0],), source)
        if name + _FROZEN_INDEX in tensors:
            frozen = tensors[name + _FROZEN_INDEX]
            if frozen.dim() != 1 or (frozen.numel() and (int(frozen.min()) < 0 or int(frozen.max()) >= layer.weight.numel()
                                                         or bool((frozen.diff() <= 0).any()))):
                raise AdapterError(f"adapter {source!r}: {name + _FROZEN_INDEX!r} must hold sorted unique positions in "
                                   f"[0, {layer.weight.numel()}); the file is corrupted or was edited.")
            _expect_shape(name + _FROZEN_VALUE, tensors.get(name + _FROZEN_VALUE), tuple(frozen.shape), source)
    layer_keys = {name + suffix for name in parsed.structures for suffix in _LAYER_SUFFIXES}
    unknown = sorted(key for key in tensors if key not in layer_keys and key not in owned)
    if unknown:
        raise AdapterError(f"adapter {source!r} holds tensors this model and config have no place for, e.g. "
                           f"{unknown[:3]}; it was saved from {parsed.base['architecture']!r} with other settings.")
    head_names = head_module_names(model, parsed.config.head_modules)
    head_classes = set()
    for key, (owner, tensor_name) in owned.items():
        original = _original_tensor(owner, tensor_name)
        value = tensors.get(key)
        is_head = in_modules(key.rpartition(".")[0], head_names)
        if value is None:
            raise AdapterError(f"adapter {source!r} lacks {key!r}, which its config trains on this model; it was saved "
                               "from another model or with other settings.")
        fits = tuple(value.shape) == tuple(original.shape) or (
            is_head and value.dim() == original.dim() and tuple(value.shape[1:]) == tuple(original.shape[1:]))
        if not fits or value.is_floating_point() != original.is_floating_point():
            raise AdapterError(f"adapter {source!r}: {key!r} has shape {list(value.shape)} and dtype {value.dtype}, "
                               f"but the model's is {list(original.shape)} {original.dtype}.")
        if is_head and value.dim():
            head_classes.add(value.shape[0])
    if len(head_classes) > 1:
        raise AdapterError(f"adapter {source!r}: its head tensors disagree on the number of classes "
                           f"({sorted(head_classes)}); the file is corrupted or was edited.")
    return indices


def _from_format_1(model: nn.Module, parsed: _Parsed, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of a ``grft-adapter/1`` file in today's keys: full biases of wrapped layers become bias deltas
    (against the model's bias), residues become frozen entries."""
    converted = {}
    for key, value in tensors.items():
        layer_name, _, suffix = key.rpartition(".")
        if key.endswith(_LEGACY_RESIDUE_INDEX):
            converted[key.removesuffix(_LEGACY_RESIDUE_INDEX) + _FROZEN_INDEX] = value
        elif key.endswith(_LEGACY_RESIDUE_VALUE):
            converted[key.removesuffix(_LEGACY_RESIDUE_VALUE) + _FROZEN_VALUE] = value
        elif suffix == "bias" and layer_name in parsed.structures:
            module = model.get_submodule(layer_name)
            layer = module.base_layer if isinstance(module, GRFTLayer) else module
            base = module.pristine_bias() if isinstance(module, GRFTLayer) else layer.bias.detach()
            converted[layer_name + _BIAS_DELTA] = value.float() - base.cpu().float()
        else:
            converted[key] = value
    return converted


def _check_same_layout(model: nn.Module, name: str, structures: dict[str, str], source: str) -> None:
    present = {layer_name: layer.grft_updates[name].structure for layer_name, layer in grft_layers(model)
               if name in layer.grft_updates}
    if present != structures:
        raise AdapterError(f"the model's adapter {name!r} covers other layers or structures than adapter {source!r}; "
                           f"load it under another adapter_name=, or call grft_vision.delete_adapter(model, {name!r}) "
                           "first.")


def _copy_values(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], indices: dict[str, torch.Tensor],
                 owned: dict[str, tuple[nn.Module, str]], source: str) -> None:
    layers = dict(grft_layers(model))
    with torch.no_grad():
        for layer_name, layer_indices in indices.items():
            layer = layers[layer_name]
            with layer.unwritten():
                update = layer.grft_updates[name]
                if not torch.equal(update.indices.cpu(), layer_indices):
                    update.set_indices(layer_indices)
                update.delta.copy_(tensors[layer_name + _DELTA])
                bias = tensors.get(layer_name + _BIAS_DELTA)
                if (bias is None) != (update.bias_delta is None):
                    raise AdapterError(f"adapter {source!r}: layer {layer_name!r} {'lacks' if bias is None else 'has'} "
                                       "a bias delta, which its config and this model contradict; save it again.")
                if bias is not None:
                    update.bias_delta.copy_(bias)
                empty = torch.empty(0)
                update.set_frozen(tensors.get(layer_name + _FROZEN_INDEX, empty.long()),
                                  tensors.get(layer_name + _FROZEN_VALUE, empty))
        for key, (owner, tensor_name) in owned.items():
            parametrization = adapter_tensor_of(owner, tensor_name)
            current = parametrization.adapters[name]
            value = tensors[key].to(current.device)
            if value.shape == current.shape:
                current.copy_(value)
            elif parametrization.is_buffer:
                parametrization.adapters[name] = value.to(current.dtype)
            else:  # a head with another number of classes
                parametrization.adapters[name] = nn.Parameter(value.to(current.dtype), requires_grad=False)


def apply_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
                        adapter_name: str | None = None, source: str = "adapter",
                        check_weights: bool = True) -> nn.Module:
    """Load ``(tensors, metadata)`` from :func:`adapter_state` onto ``model`` (see :func:`load_adapter`)."""
    from .trainable import set_trainable

    parsed = _parse(metadata, source)
    if parsed.format == _FORMAT_1:
        tensors = _from_format_1(model, parsed, tensors)
    name = adapter_name or parsed.name or DEFAULT_ADAPTER
    owned = _expected_owned(model, parsed.config)
    _check_identity(source, parsed, model, owned, check_weights)
    indices = _check_tensors(model, parsed, tensors, owned, source)
    if name in list_adapters(model):
        _check_same_layout(model, name, parsed.structures, source)
    else:
        add_adapter(model, name, indices, parsed.structures, parsed.config)
    _copy_values(model, name, tensors, indices, owned, source)
    set_trainable(model, grft_state(model).active)
    return model


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *,
                 check_weights: bool = True) -> nn.Module:
    """Load an adapter file onto ``model`` and return it, ready to run or train further.

    ``model`` is the base model the adapter was trained from (same architecture and weights; its head may
    have another number of classes, the adapter brings its own), plain or already wrapped. The adapter is
    added under ``adapter_name`` (default: the name it was saved under) and made active; if the model
    already has an adapter of that name covering the same layers, its values are overwritten in place
    (its parameters stay the same objects, so an optimizer built on them stays valid).

    Args:
        model: the base model.
        path: the ``.safetensors`` file written by :func:`save_adapter`.
        adapter_name: the name to load it under.
        check_weights: compare the fingerprint of every backbone tensor with the one stored in the file
            (False: load onto a deliberately different backbone).

    Raises:
        AdapterError: unreadable, truncated, edited or foreign file, or a model it does not fit.
    """
    path = Path(path)
    metadata, tensors = _read(path)
    return apply_adapter_state(model, tensors, metadata, adapter_name=adapter_name, source=str(path),
                               check_weights=check_weights)


def from_pretrained(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None, *,
                    check_weights: bool = True) -> nn.Module:
    """Load the adapter a :func:`save_pretrained` directory holds (see :func:`load_adapter`).

    Raises:
        AdapterError: no such directory, a missing or unreadable ``adapter_config.json``, or as :func:`load_adapter`.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{str(directory)!r} holds no {CONFIG_NAME}; pass a directory written by "
                           "grft_vision.save_pretrained (or load a single file with load_adapter).")
    try:
        readable = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"cannot read {str(config_path)!r}: {error}. Save the adapter again.") from error
    if not isinstance(readable, dict):
        raise AdapterError(f"{str(config_path)!r} holds a {type(readable).__name__}, not an adapter config.")
    metadata = {key: value if isinstance(value, str) else json.dumps(value) for key, value in readable.items()}
    _, tensors = _read(directory / WEIGHTS_NAME)
    return apply_adapter_state(model, tensors, metadata, adapter_name=adapter_name, source=str(directory),
                               check_weights=check_weights)
