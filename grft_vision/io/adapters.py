"""Adapter files: save and load adapters as one safetensors file or as a PEFT-style directory.

A file (``save_adapter`` / ``load_adapter``) holds one adapter's tensors and metadata
(:mod:`.adapter_format`). A directory (``save_pretrained`` / ``from_pretrained``) holds
``adapter_config.json`` (the metadata as readable JSON) and ``adapter_model.safetensors``; the default
adapter sits at the top, others in sub-folders named after them, as PEFT lays them out. Files of the first
format (``grft-adapter/1``) still load.

Loading validates everything it reads and checks the base model's identity (:mod:`.identity`). Onto a model
that already has an adapter of that name, the values are copied into its existing parameters (an optimizer
built on them stays valid); a load that would need other shapes is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..errors import AdapterError, did_you_mean
from ..files import atomic_write
from ..tuner.layer import grft_layers
from ..tuner.lifecycle import list_adapters, set_adapter
from ..tuner.model import inject
from ..tuner.owned import owned_tensor_of
from ..tuner.state import DEFAULT_ADAPTER, grft_state
from ..tuner.structures import FILE_SUFFIXES
from ..tuner.trainable import set_trainable
from .adapter_format import (ADAPTER_FORMAT, FORMAT_1, ParsedAdapter, adapter_state, check_identity, check_tensors,
                             expected_owned, from_format_1, parse_metadata)

__all__ = ["save_adapter", "load_adapter", "save_pretrained", "from_pretrained", "apply_adapter_state",
           "directory_adapters", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_PLAIN_METADATA = ("format", "adapter_name", "library_version")


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write one adapter (default: the active one) of a wrapped model to a ``.safetensors`` file, atomically.

    Raises:
        AdapterError: the model is not wrapped, has no such adapter, or ``path`` is a directory.
    """
    path = Path(path)
    if path.is_dir():
        raise AdapterError(f"save_adapter writes one file, but {str(path)!r} is a directory; pass a file path such as "
                           f"{str(path / 'adapter.safetensors')!r}, or use grft_vision.save_pretrained for a directory.")
    tensors, metadata = adapter_state(model, adapter_name)
    with atomic_write(path, "wb") as handle:
        handle.write(safetensors_bytes(tensors, metadata=metadata))
    return path


def save_pretrained(model: nn.Module, directory: str | os.PathLike,
                    adapter_names: list[str] | None = None) -> Path:
    """Write adapters (default: all) into one directory, as PEFT lays them out: ``adapter_config.json`` +
    ``adapter_model.safetensors`` of the ``default`` adapter at the top, every other one in ``directory/<name>``;
    :func:`from_pretrained` loads them all back.
    """
    directory = Path(directory)
    for name in adapter_names or list_adapters(model):
        target = directory if name == DEFAULT_ADAPTER else directory / name
        tensors, metadata = adapter_state(model, name)
        readable = {key: value if key in _PLAIN_METADATA else json.loads(value) for key, value in metadata.items()}
        with atomic_write(target / WEIGHTS_NAME, "wb") as handle:
            handle.write(safetensors_bytes(tensors, metadata=metadata))
        with atomic_write(target / CONFIG_NAME, "w") as handle:
            json.dump(readable, handle, indent=2)
    return directory


def read_adapter_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of an adapter file.

    Raises:
        AdapterError: no such file, an unreadable one, or a safetensors file that is not an adapter.
    """
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
    if metadata.get("format") not in (ADAPTER_FORMAT, FORMAT_1):
        raise AdapterError(f"{str(path)!r} is a safetensors file but not a GRFT adapter "
                           f"(format {metadata.get('format')!r}, expected {ADAPTER_FORMAT!r}).")
    return metadata, tensors


def _copy_values(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], indices: dict[str, torch.Tensor],
                 owned: dict[str, tuple[nn.Module, str]], fresh: bool, source: str) -> None:
    """Copy the loaded values into adapter ``name``'s tensors (the same parameter objects)."""
    layers = dict(grft_layers(model))
    empty = torch.empty(0)
    for layer_name, layer_indices in indices.items():
        layer = layers[layer_name]
        with layer.unwritten():
            layer.grft_updates[name].load_values(
                layer_indices, tensors[layer_name + FILE_SUFFIXES["delta"]],
                tensors.get(layer_name + FILE_SUFFIXES["bias_delta"]),
                tensors.get(layer_name + FILE_SUFFIXES["frozen_index"], empty.long()),
                tensors.get(layer_name + FILE_SUFFIXES["frozen_value"], empty), where=f"adapter {source!r}, layer "
                f"{layer_name!r}")
    for key, (owner, tensor_name) in owned.items():
        owned_tensor_of(owner, tensor_name).load(name, tensors[key], fresh=fresh, where=f"adapter {source!r}, {key!r}")


def _check_fits_existing(model: nn.Module, name: str, parsed: ParsedAdapter, tensors: dict[str, torch.Tensor],
                         indices: dict[str, torch.Tensor], owned: dict[str, tuple[nn.Module, str]], source: str) -> None:
    """The model's adapter ``name`` can take these values in place: same layers, structures and shapes.

    Raises:
        AdapterError: it covers other layers or structures, or a tensor would need another shape.
    """
    updates = {layer_name: layer.grft_updates[name] for layer_name, layer in grft_layers(model)
               if name in layer.grft_updates}
    fix = f"load it under another adapter_name=, or call grft_vision.delete_adapter(model, {name!r}) first"
    if {layer_name: update.structure for layer_name, update in updates.items()} != parsed.structures:
        raise AdapterError(f"the model's adapter {name!r} covers other layers or structures than adapter {source!r}; "
                           f"{fix}.")
    for layer_name, update in updates.items():
        has_bias = layer_name + FILE_SUFFIXES["bias_delta"] in tensors
        if tuple(indices[layer_name].shape) != tuple(update.indices.shape) or has_bias != (update.bias_delta is not None):
            raise AdapterError(f"adapter {source!r}: layer {layer_name!r} chooses {indices[layer_name].shape[-1]} "
                               f"{update.unit_label} where the model's adapter {name!r} chooses {update.count}"
                               f"{'' if has_bias == (update.bias_delta is not None) else ' (and differs in its bias delta)'}; "
                               f"loading it would replace parameters an optimizer may hold: {fix}.")
    for key, (owner, tensor_name) in owned.items():
        owned_tensor = owned_tensor_of(owner, tensor_name)
        if owned_tensor is None or name not in owned_tensor.adapters:
            raise AdapterError(f"adapter {source!r} trains {key!r} in full, which the model's adapter {name!r} does "
                               f"not (their configs differ): {fix}.")
        current = owned_tensor.adapters[name]
        if tuple(tensors[key].shape) != tuple(current.shape):
            raise AdapterError(f"adapter {source!r}: {key!r} has shape {list(tensors[key].shape)}, the model's adapter "
                               f"{name!r} holds {list(current.shape)}; loading it would replace a parameter an "
                               f"optimizer may hold: {fix}.")


def apply_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
                        adapter_name: str | None = None, source: str = "adapter",
                        check_weights: bool = True) -> nn.Module:
    """Load ``(tensors, metadata)`` (:func:`~.adapter_format.adapter_state`'s) onto ``model`` (see :func:`load_adapter`).

    Everything is validated before anything changes; a failed load leaves the model as it was.
    """
    parsed = parse_metadata(metadata, source)
    if parsed.format == FORMAT_1:
        tensors = from_format_1(model, parsed, tensors)
    name = adapter_name or parsed.name or DEFAULT_ADAPTER
    owned = expected_owned(model, parsed.config)
    check_identity(source, parsed, model, owned, check_weights)
    indices = check_tensors(model, parsed, tensors, owned, source)
    fresh = name not in list_adapters(model)
    if fresh:
        inject(model, name, indices, parsed.structures, parsed.config)
    else:
        grft_state(model).check_changeable("loading an adapter")
        _check_fits_existing(model, name, parsed, tensors, indices, owned, source)
    try:
        _copy_values(model, name, tensors, indices, owned, fresh, source)
    except AdapterError:
        if fresh:  # nothing of a refused adapter stays behind
            from ..tuner.lifecycle import delete_adapter

            delete_adapter(model, name)
        raise
    set_trainable(model, grft_state(model).active)
    return model


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *,
                 check_weights: bool = True) -> nn.Module:
    """Load an adapter file onto ``model`` and return it, ready to run or train further.

    ``model`` is the base model the adapter was trained from (same architecture and weights; its head may
    have another number of classes, the adapter brings its own), plain or already wrapped. The adapter is
    added under ``adapter_name`` (default: the name it was saved under) and made active; if the model
    already has an adapter of that name covering the same layers with the same shapes, its values (indices
    included) are copied into it in place (its parameters stay the same objects, so an optimizer built on
    them stays valid).

    Args:
        model: the base model.
        path: the ``.safetensors`` file written by :func:`save_adapter`.
        adapter_name: the name to load it under.
        check_weights: compare the fingerprint of every backbone tensor with the one stored in the file
            (False: load onto a deliberately different backbone).

    Raises:
        AdapterError: unreadable, truncated, edited or foreign file, a model it does not fit, or an existing
            adapter of that name with other shapes.
    """
    path = Path(path)
    metadata, tensors = read_adapter_file(path)
    return apply_adapter_state(model, tensors, metadata, adapter_name=adapter_name, source=str(path),
                               check_weights=check_weights)


def _read_directory_adapter(directory: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of the adapter at the top of a :func:`save_pretrained` directory."""
    config_path = directory / CONFIG_NAME
    try:
        readable = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"cannot read {str(config_path)!r}: {error}. Save the adapter again.") from error
    if not isinstance(readable, dict):
        raise AdapterError(f"{str(config_path)!r} holds a {type(readable).__name__}, not an adapter config.")
    metadata = {key: value if isinstance(value, str) else json.dumps(value) for key, value in readable.items()}
    _, tensors = read_adapter_file(directory / WEIGHTS_NAME)
    return metadata, tensors


def directory_adapters(directory: str | os.PathLike) -> dict[str, Path]:
    """The adapters a :func:`save_pretrained` directory holds: ``{name: folder}``, the one at the top first (under
    the name it was saved with), then every sub-folder holding one (under the folder's name)."""
    directory = Path(directory)
    found: dict[str, Path] = {}
    if (directory / CONFIG_NAME).is_file():
        try:
            name = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8")).get("adapter_name")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            name = None
        found[name if isinstance(name, str) else DEFAULT_ADAPTER] = directory
    if directory.is_dir():
        for folder in sorted(entry for entry in directory.iterdir() if (entry / CONFIG_NAME).is_file()):
            found.setdefault(folder.name, folder)
    return found


def from_pretrained(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None, *,
                    check_weights: bool = True) -> nn.Module:
    """Load the adapters of a :func:`save_pretrained` directory (PEFT's layout: the default adapter at the top,
    others in sub-folders named after them); see :func:`load_adapter` for what a load checks.

    Args:
        model: the base model (plain or wrapped).
        directory: the directory.
        adapter_name: None: load every adapter the directory holds, the one at the top active (else the first);
            a name the directory holds: that adapter only; any other name, for a directory holding one adapter:
            that adapter under this name.
        check_weights: as for :func:`load_adapter`.

    Raises:
        AdapterError: no adapter in the directory, no adapter of that name, or as :func:`load_adapter`.
    """
    directory = Path(directory)
    adapters = directory_adapters(directory)
    if not adapters:
        raise AdapterError(f"{str(directory)!r} holds no {CONFIG_NAME} (at the top or in a sub-folder); pass a "
                           "directory written by grft_vision.save_pretrained (or load a single file with load_adapter).")
    if adapter_name is not None:
        if adapter_name in adapters:
            adapters = {adapter_name: adapters[adapter_name]}
        elif len(adapters) == 1:
            adapters = {adapter_name: next(iter(adapters.values()))}
        else:
            raise AdapterError(f"{str(directory)!r} holds the adapters {list(adapters)}, not {adapter_name!r}."
                               f"{did_you_mean(adapter_name, adapters)}")
    for name, folder in adapters.items():
        metadata, tensors = _read_directory_adapter(folder)
        apply_adapter_state(model, tensors, metadata, adapter_name=name, source=str(folder),
                            check_weights=check_weights)
    set_adapter(model, next(iter(adapters)))
    return model
