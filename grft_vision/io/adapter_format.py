"""The adapter format: what an adapter's tensors and metadata are, how they are validated, and how files of
the first format are read.

``(tensors, metadata)`` of one adapter, with tensor keys under the original module names:

- ``<layer>.grft_indices`` (int16, or int32 where an index exceeds 32767), ``<layer>.grft_delta``,
  ``<layer>.grft_bias_delta``, ``<layer>.grft_frozen_index`` / ``.grft_frozen_value`` — each update's tensors
  (:data:`~grft_vision.tuner.structures.FILE_SUFFIXES`, :meth:`Update.file_tensors
  <grft_vision.tuner.structures.Update.file_tensors>`);
- every tensor the adapter trains in full under its own name (``head.weight``, LayerScale gammas, ...) and
  the running statistics of BatchNorm layers;

and as metadata (strings): ``format``, ``adapter_name``, ``library_version``, ``config`` (the flat
:class:`~grft_vision.config.GRFTConfig`), ``structures`` (each layer's), ``base_model`` (the identity of
:mod:`.identity`). Everything read is validated — metadata, tensor shapes and dtypes, finiteness, index
ranges and uniqueness (each structure's :meth:`~grft_vision.tuner.structures.Update.index_problem`) — so a
damaged or foreign adapter is an :class:`~grft_vision.AdapterError`, never a silently wrong model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import GRFTConfig
from ..errors import AdapterError, ConfigError
from ..tuner.anatomy import architecture_name, head_module_names, in_modules
from ..tuner.layer import GRFTLayer, grft_layers
from ..tuner.owned import owned_tensors
from ..tuner.quantized import weight_numel, weight_shape as layer_weight_shape
from ..tuner.state import grft_state
from ..tuner.structures import FILE_SUFFIXES, STRUCTURES
from ..tuner.trainable import fully_trained_tensors, tracked_statistics
from ..version import __version__
from .identity import base_identity, fingerprints_match, pretrained_parameters

__all__ = ["ADAPTER_FORMAT", "FORMAT_1", "adapter_tensors", "adapter_state", "ParsedAdapter", "parse_metadata",
           "expected_owned", "check_identity", "check_tensors", "from_format_1"]

ADAPTER_FORMAT = "grft-adapter/2"
FORMAT_1 = "grft-adapter/1"
_LEGACY_RESIDUE_INDEX, _LEGACY_RESIDUE_VALUE = ".grft_residue_index", ".grft_residue_value"


# --------------------------------------------------------------------------------------------- out
def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors a file of adapter ``adapter_name`` holds, keyed as in the file (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in grft_layers(model):
        if adapter_name in layer.grft_updates:
            for kind, tensor in layer.grft_updates[adapter_name].file_tensors().items():
                tensors[name + FILE_SUFFIXES[kind]] = tensor
    for name, _, _, owned in owned_tensors(model):
        if adapter_name in owned.adapters:
            tensors[name] = owned.adapters[adapter_name].detach()
    return {key: value.contiguous().cpu() for key, value in tensors.items()}


def adapter_state(model: nn.Module, adapter_name: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of one adapter (default: the active one): what an adapter file holds.

    Raises:
        AdapterError: the model is not wrapped, or has no such adapter.
    """
    state = grft_state(model)
    adapter_name = adapter_name or state.active
    if adapter_name not in state.adapters:
        raise AdapterError(f"the model has no adapter named {adapter_name!r}; its adapters are {list(state.adapters)}.")
    tensors = adapter_tensors(model, adapter_name)
    owned = {name for name, _, _, tensor in owned_tensors(model) if adapter_name in tensor.adapters}
    metadata = {
        "format": ADAPTER_FORMAT,
        "adapter_name": adapter_name,
        "library_version": __version__,
        "config": json.dumps(state.adapters[adapter_name].config.to_dict()),
        "structures": json.dumps({name: layer.grft_updates[adapter_name].structure
                                  for name, layer in grft_layers(model) if adapter_name in layer.grft_updates}),
        "base_model": json.dumps(base_identity(model, owned)),
    }
    return tensors, metadata


# --------------------------------------------------------------------------------------------- in
@dataclass
class ParsedAdapter:
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


def _check_base(base: dict[str, Any], format_: str, source: str) -> None:
    """The base-model metadata has the fields of its format, of the right kinds (fingerprints included)."""
    wanted = ("architecture", "param_shapes", "fingerprints") if format_ == ADAPTER_FORMAT else \
        ("architecture", "param_shapes", "weight_checksums")
    missing = [key for key in wanted if key not in base]
    if missing:
        raise AdapterError(f"adapter {source!r}: its base_model metadata lacks {missing}; save it again.")
    shapes = base["param_shapes"]
    if not isinstance(shapes, dict) or not all(isinstance(v, list) and all(isinstance(d, int) for d in v)
                                               for v in shapes.values()):
        raise AdapterError(f"adapter {source!r}: its base_model param_shapes metadata is malformed (a mapping of "
                           "parameter names to lists of ints is expected); save it again.")
    if format_ == ADAPTER_FORMAT:
        prints = base["fingerprints"]
        valid = isinstance(prints, dict) and all(
            isinstance(v, dict) and isinstance(v.get("sums"), list) and len(v["sums"]) == 3
            and all(isinstance(x, (int, float)) for x in v["sums"]) and isinstance(v.get("dtype", "float32"), str)
            for v in prints.values())
    else:
        prints = base["weight_checksums"]
        valid = isinstance(prints, dict) and all(isinstance(v, (int, float)) for v in prints.values())
    if not valid:
        raise AdapterError(f"adapter {source!r}: its base_model fingerprints metadata is malformed; the file was "
                           "edited or damaged. Save it again.")


def parse_metadata(metadata: dict[str, str], source: str) -> ParsedAdapter:
    """Validate an adapter's metadata.

    Raises:
        AdapterError: a missing, malformed or unknown field.
    """
    config_values = _json_field(metadata, "config", dict, source)
    try:
        config = GRFTConfig.from_dict(config_values)
    except (ConfigError, TypeError) as error:
        raise AdapterError(f"adapter {source!r} holds an invalid config: {error}") from error
    structures = _json_field(metadata, "structures", dict, source)
    bad = {k: v for k, v in structures.items() if not isinstance(k, str) or v not in STRUCTURES}
    if bad:
        raise AdapterError(f"adapter {source!r}: unknown layer structures {bad}; expected one of "
                           f"{', '.join(STRUCTURES.names())} (a structure registered by your code must be registered "
                           "before loading).")
    base = _json_field(metadata, "base_model", dict, source)
    _check_base(base, metadata.get("format"), source)
    name = metadata.get("adapter_name")
    return ParsedAdapter(metadata["format"], name if isinstance(name, str) else None, config, structures, base)


def expected_owned(model: nn.Module, config: GRFTConfig) -> dict[str, tuple[nn.Module, str]]:
    """Original name -> (owner, tensor name) of what an adapter with ``config`` owns on this model."""
    head_names = head_module_names(model, config.head_modules)
    found = fully_trained_tensors(model, config, head_names) + tracked_statistics(model)
    return {f"{module_name}.{name}" if module_name else name: (owner, name) for module_name, owner, name in found}


def check_identity(source: str, parsed: ParsedAdapter, model: nn.Module, owned: dict[str, Any],
                   check_weights: bool) -> None:
    """The model is the base the adapter was trained on: same parameter shapes, and (``check_weights``) weights.

    Raises:
        AdapterError: another architecture (the differing parameters named), or other base weights.
    """
    parameters = pretrained_parameters(model)
    shapes = {name: list(shape) for name, shape in parameters.shapes.items() if name not in owned}
    saved_shapes = {name: shape for name, shape in parsed.base["param_shapes"].items() if name not in owned}
    differences = [f"{name}: adapter {saved_shapes.get(name)} vs model {shapes.get(name)}"
                   for name in sorted(set(saved_shapes) | set(shapes)) if saved_shapes.get(name) != shapes.get(name)]
    if differences:
        raise AdapterError(
            f"adapter {source!r} was saved from {parsed.base['architecture']!r} and does not fit this "
            f"{architecture_name(model)!r}: {len(differences)} parameter(s) differ, e.g. "
            f"{'; '.join(differences[:3])}. Create the same model (architecture and options) it was trained from.")
    if not check_weights:
        return
    if parsed.format == FORMAT_1:
        mismatched = [name for name, checksum in parsed.base["weight_checksums"].items()
                      if name in shapes
                      and abs(float(parameters[name].detach().double().pow(2).sum()) - checksum) > 1e-3 * abs(checksum)]
    else:
        mismatched = [name for name, saved in parsed.base["fingerprints"].items()
                      if name in shapes
                      and not fingerprints_match(saved, parameters[name], parameters.quantization.get(name))]
    if mismatched:
        raise AdapterError(
            f"adapter {source!r} was trained on different base weights: {len(mismatched)} tensor(s) differ, e.g. "
            f"{mismatched[:3]}. Load the base weights it was trained on ({_base_hint(parsed.base)}), or pass "
            "check_weights=False to load it onto another backbone on purpose.")


def _base_hint(base: dict[str, Any]) -> str:
    """Where the base weights an adapter records came from, for a message."""
    weights = base.get("weights") or {}
    kind = weights.get("kind")
    if kind == "random":
        return f"a random initialisation after torch.manual_seed({weights.get('seed')}), as its run created it"
    if kind == "file":
        return f"the weights file {weights.get('path')!r} (sha256 {str(weights.get('sha256'))[:12]}...)"
    if base.get("pretrained_tag"):
        return f"timm's pre-trained weights of tag {base['pretrained_tag']!r}"
    if base.get("hf_hub_id"):
        return f"model {base['hf_hub_id']!r}"
    tag = weights.get("config_tag")
    return "its base weights were not recorded" + (f"; its model's config names tag {tag!r}" if tag else "")


def _expect_float(key: str, tensor: torch.Tensor | None, shape: tuple[int, ...], source: str) -> None:
    if tensor is None:
        raise AdapterError(f"adapter {source!r} lacks {key!r}; the file is incomplete. Save it again.")
    if not tensor.is_floating_point() or tuple(tensor.shape) != tuple(shape):
        raise AdapterError(f"adapter {source!r}: {key!r} has shape {list(tensor.shape)} and dtype {tensor.dtype}, "
                           f"expected a float tensor of shape {list(shape)}; the file is corrupted or was edited.")
    if not bool(torch.isfinite(tensor).all()):
        raise AdapterError(f"adapter {source!r}: {key!r} holds NaN or inf (saved from a run that diverged?); "
                           "it would make the model compute NaN. Use an earlier checkpoint.")


def _check_update(name: str, layer: nn.Module, structure: str, tensors: dict[str, torch.Tensor],
                  source: str) -> torch.Tensor:
    """One layer's update tensors are valid; returns its indices (int64)."""
    cls = STRUCTURES.get(structure)
    weight_shape, groups = layer_weight_shape(layer), getattr(layer, "groups", 1)
    if not isinstance(layer, (nn.Linear, nn.Conv2d)) or not cls.applies_to(weight_shape):
        raise AdapterError(f"adapter {source!r}: layer {name!r} is a {type(layer).__name__}, which cannot hold a "
                           f"{structure!r} update.")
    key = name + FILE_SUFFIXES["indices"]
    if key not in tensors:
        raise AdapterError(f"adapter {source!r} lacks {key!r}; the file is incomplete. Save it again.")
    problem = cls.index_problem(tensors[key], weight_shape, groups)
    if problem:
        raise AdapterError(f"adapter {source!r}: the indices of layer {name!r} ({structure}) {problem}; the file is "
                           "corrupted or was edited. Save it again.")
    indices = tensors[key].long()
    _expect_float(name + FILE_SUFFIXES["delta"], tensors.get(name + FILE_SUFFIXES["delta"]),
                  cls.shape_for(weight_shape, indices.shape[-1], groups), source)
    if name + FILE_SUFFIXES["bias_delta"] in tensors:
        _expect_float(name + FILE_SUFFIXES["bias_delta"], tensors[name + FILE_SUFFIXES["bias_delta"]],
                      (weight_shape[0],), source)
    frozen_key = name + FILE_SUFFIXES["frozen_index"]
    if frozen_key in tensors:
        frozen, numel = tensors[frozen_key], weight_numel(layer)
        if frozen.dim() != 1 or (frozen.numel() and (int(frozen.min()) < 0 or int(frozen.max()) >= numel
                                                     or bool((frozen.diff() <= 0).any()))):
            raise AdapterError(f"adapter {source!r}: {frozen_key!r} must hold sorted unique positions in [0, {numel}); "
                               "the file is corrupted or was edited.")
        _expect_float(name + FILE_SUFFIXES["frozen_value"], tensors.get(name + FILE_SUFFIXES["frozen_value"]),
                      tuple(frozen.shape), source)
    return indices


def _original_tensor(owner: nn.Module, name: str) -> torch.Tensor:
    owned = owner._modules.get("grft_owned")
    return owned[name].original if owned is not None and name in owned else getattr(owner, name)


def check_tensors(model: nn.Module, parsed: ParsedAdapter, tensors: dict[str, torch.Tensor],
                  owned: dict[str, tuple[nn.Module, str]], source: str) -> dict[str, torch.Tensor]:
    """Validate every tensor of an adapter against the model; returns the indices per layer (int64).

    Raises:
        AdapterError: a layer the model lacks, a tensor of the wrong shape or dtype, NaN/inf, invalid indices,
            a tensor the model has no place for, or one the config needs that is missing.
    """
    indices = {}
    for name, structure in parsed.structures.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"adapter {source!r} targets layer {name!r}, which this model does not have; it was "
                               f"saved from {parsed.base['architecture']!r}.") from None
        layer = module.base_layer if isinstance(module, GRFTLayer) else module
        indices[name] = _check_update(name, layer, structure, tensors, source)
    layer_keys = {name + suffix for name in parsed.structures for suffix in FILE_SUFFIXES.values()}
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
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AdapterError(f"adapter {source!r}: {key!r} holds NaN or inf (saved from a run that diverged?); "
                               "use an earlier checkpoint.")
        if is_head and value.dim():
            head_classes.add(value.shape[0])
    if len(head_classes) > 1:
        raise AdapterError(f"adapter {source!r}: its head tensors disagree on the number of classes "
                           f"({sorted(head_classes)}); the file is corrupted or was edited.")
    return indices


def from_format_1(model: nn.Module, parsed: ParsedAdapter, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of a ``grft-adapter/1`` file in today's keys: full biases of wrapped layers become bias deltas
    (against the model's bias), residues become frozen entries."""
    converted = {}
    for key, value in tensors.items():
        layer_name, _, suffix = key.rpartition(".")
        if key.endswith(_LEGACY_RESIDUE_INDEX):
            converted[key.removesuffix(_LEGACY_RESIDUE_INDEX) + FILE_SUFFIXES["frozen_index"]] = value
        elif key.endswith(_LEGACY_RESIDUE_VALUE):
            converted[key.removesuffix(_LEGACY_RESIDUE_VALUE) + FILE_SUFFIXES["frozen_value"]] = value
        elif suffix == "bias" and layer_name in parsed.structures:
            module = model.get_submodule(layer_name)
            base = module.pristine_bias() if isinstance(module, GRFTLayer) else module.bias.detach()
            converted[layer_name + FILE_SUFFIXES["bias_delta"]] = value.float() - base.cpu().float()
        else:
            converted[key] = value
    return converted
