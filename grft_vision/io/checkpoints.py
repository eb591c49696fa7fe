"""Reading what GRFT runs and the trainers around them save: checkpoints, adapter-only state dicts, wrapped
state dicts, Trainer folders.

:func:`read_saved` recognises a checkpoint by its content and returns a :class:`SavedModel` — a wrapped
model's state dict or an adapter, and what the checkpoint says about its model:

============================================  ====================================================================
what                                          what it holds
============================================  ====================================================================
timm ``last.pth.tar`` / ``checkpoint-N``      ``state_dict`` (the live weights; ``ema=True``: ``state_dict_ema``,
                                              as timm's ``validate.py --use-ema``) of the wrapped model (timm's
                                              ``CheckpointSaver``: base weights included) or adapter-only
                                              (``CheckpointSaver(..., unwrap_fn=adapter_only)``)
Hugging Face Trainer ``checkpoint-N/``        :class:`~grft_vision.integrations.hf.GRFTTrainer`'s adapter, or a
                                              plain Trainer's wrapped ``model.safetensors`` (with ``config.json``)
grft-vision ``checkpoint.pt``                 its adapter, and the run's settings
adapter ``.safetensors`` / adapter directory  the adapter
============================================  ====================================================================

A wrapped state dict records no structure: :func:`rebuild_wrapped` reads each layer's structure from the
shapes of its ``indices`` and ``delta`` against the layer (asking every registered structure whether it
fits); an update whose shapes fit two structures is refused with a clear error. State dicts of earlier
versions (owned tensors under ``parametrizations.<name>``) are read too.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from ..config import GRFTConfig
from ..errors import ConfigError, ModelLoadError
from ..tuner.lifecycle import set_adapter
from ..tuner.model import inject
from ..tuner.owned import own_tensor, owned_tensor_of
from ..tuner.quantized import weight_shape as layer_weight_shape
from ..tuner.structures import STRUCTURES
from .adapters import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["ADAPTER_METADATA_KEY", "SavedModel", "read_saved", "load_training_checkpoint", "split_adapter_state",
           "wrapped_adapter_names", "rebuild_wrapped"]

ADAPTER_METADATA_KEY = "grft_adapter_metadata"  # the adapter's metadata in an adapter-only state dict
_ADAPTER_FORMAT_PREFIX = "grft-adapter/"
_UPDATE_INDICES = re.compile(r"(?P<layer>.+)\.grft_updates\.(?P<adapter>[^.]+)\.indices")
# an adapter's copy of an owned tensor: today's keys, and those of earlier versions (torch parametrize)
_OWNED_COPY = re.compile(r"(?:(?P<owner>.+)\.)?(?:grft_owned\.(?P<tensor>[^.]+)\.adapters|"
                         r"parametrizations\.(?P<legacy>[^.]+)\.0\.adapters)\.(?P<adapter>[^.]+)")
_ADAPTER_OF_KEY = re.compile(r"(?:^|\.)(?:grft_updates|grft_owned\.[^.]+\.adapters|parametrizations\.[^.]+\.0\.adapters)"
                             r"\.(?P<adapter>[^.]+)(?:\.|$)")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

def split_adapter_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """``(tensors, metadata)`` of an adapter-only state dict (:func:`grft_vision.integrations.timm.adapter_only`); None for any other."""
    metadata = state.get(ADAPTER_METADATA_KEY)
    if not isinstance(metadata, dict):
        return None
    return {key: value for key, value in state.items() if key != ADAPTER_METADATA_KEY}, metadata


def load_training_checkpoint(path: str | os.PathLike) -> Any:
    """A timm training checkpoint read safely (``weights_only``, timm's ``args`` namespace allowed), on the CPU.

    Raises:
        ModelLoadError: no such file, or a file torch cannot read.
    """
    if not os.path.isfile(path):
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist; pass a file written by timm's "
                             "CheckpointSaver (e.g. output/train/<run>/last.pth.tar).")
    allowed = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; before, `args` cannot be read
    try:
        with allowed([argparse.Namespace]) if allowed is not None else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot read checkpoint {str(path)!r} ({reason}); it is truncated, corrupt or not a "
                             "PyTorch file.") from None



@dataclass
class SavedModel:
    """What a checkpoint holds (a wrapped state dict or an adapter) and what it says about its model.

    Attributes:
        source: the checkpoint's path, for messages.
        wrapped: the wrapped model's state dict (base weights, updates, owned copies), or None.
        adapter: ``(tensors, metadata)`` of an adapter, or None.
        model_name: timm model name, or the Hugging Face id / folder of the base model.
        model_kwargs: ``create_model`` options that shape the parameters (``num_classes``, ``img_size``, ...).
        base: the weights file the run started from, when it records one.
        pretrained: the run started from the pre-trained weights of ``model_name``.
        hf_config: a folder holding the Hugging Face ``config.json`` of the model.
    """

    source: str
    wrapped: dict[str, torch.Tensor] | None = None
    adapter: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None
    model_name: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    base: str | None = None
    pretrained: bool = False
    hf_config: str | None = None
    weights: str | None = None  # which of a timm checkpoint's weights were read, for the user

    @property
    def is_hugging_face(self) -> bool:
        """A Hugging Face model (a ``config.json``, or an adapter of architecture ``model_type:Class``)."""
        if self.hf_config is not None:
            return True
        identity = json.loads(self.adapter[1].get("base_model", "{}")) if self.adapter is not None else {}
        return ":" in str(identity.get("architecture", ""))


def _adapter_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """``(tensors, metadata)`` of a GRFT adapter file; None for another safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if not metadata.get("format", "").startswith(_ADAPTER_FORMAT_PREFIX):
            return None
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as error:
        raise ModelLoadError(f"cannot read {str(path)!r} ({error}); the file is truncated or corrupt.") from None


def _read_directory(path: Path) -> SavedModel:
    """An adapter directory (``save_pretrained``, :class:`GRFTTrainer` checkpoints) or a Trainer checkpoint of a
    wrapped Hugging Face model."""
    hf_config = str(path) if (path / "config.json").is_file() else None
    if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
        adapter = _adapter_file(path / WEIGHTS_NAME)
        if adapter is not None:
            return SavedModel(str(path), adapter=adapter, hf_config=hf_config)
    weights = next((path / name for name in _HF_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise ModelLoadError(f"{str(path)!r} holds neither a GRFT adapter ({CONFIG_NAME} + {WEIGHTS_NAME}) nor "
                             f"model weights ({' or '.join(_HF_WEIGHTS)}); pass a Trainer checkpoint directory "
                             "(checkpoint-N/), an adapter directory or a checkpoint file.")
    if hf_config is None:
        raise ModelLoadError(f"{str(path)!r} holds {weights.name} but no config.json, so the model it belongs to is "
                             "unknown; pass the Trainer checkpoint directory as the Trainer wrote it.")
    state = load_file(str(weights)) if weights.suffix == ".safetensors" else torch.load(weights, map_location="cpu",
                                                                                         weights_only=True)
    return SavedModel(str(path), wrapped=state, hf_config=hf_config)


def _timm_spec(args: Any) -> tuple[str | None, dict[str, Any]]:
    """Model name and the shape-giving ``create_model`` options of timm's ``train.py`` from its saved ``args``."""
    if args is None:
        return None, {}
    options = dict(getattr(args, "model_kwargs", None) or {})
    if getattr(args, "num_classes", None) is not None:
        options.setdefault("num_classes", args.num_classes)
    input_size = getattr(args, "input_size", None)
    in_chans = getattr(args, "in_chans", None) or (input_size[0] if input_size else None)
    if in_chans is not None:
        options.setdefault("in_chans", in_chans)
    if getattr(args, "gp", None) is not None:
        options.setdefault("global_pool", args.gp)
    return getattr(args, "model", None), options


def _from_state(source: str, state: Mapping[str, Any], **hints: Any) -> SavedModel:
    adapter = split_adapter_state(state)
    if adapter is not None:
        return SavedModel(source, adapter=adapter, **hints)
    tensors = {key: value for key, value in state.items() if torch.is_tensor(value)}
    return SavedModel(source, wrapped=tensors, **hints)


def read_saved(path: str | Path, *, ema: bool = False) -> SavedModel:
    """Read any checkpoint the module docstring lists.

    Args:
        path: the checkpoint file or directory.
        ema: timm checkpoints: True takes ``state_dict_ema`` (an error when there is none), False the live
            weights ``state_dict`` — as timm's ``validate.py``, ``clean_checkpoint.py`` and ``avg_checkpoints.py``
            do unless ``--use-ema``.

    Raises:
        ModelLoadError: no such file, an unreadable file, or a file of another kind.
    """
    path = Path(path)
    source = str(path)
    if path.is_dir():
        return _read_directory(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {source!r} does not exist.")
    if path.suffix == ".safetensors":
        adapter = _adapter_file(path)
        if adapter is not None:
            return SavedModel(source, adapter=adapter)
        return SavedModel(source, wrapped=load_file(source))
    payload = load_training_checkpoint(path)
    if not isinstance(payload, dict):
        raise ModelLoadError(f"{source!r} holds a {type(payload).__name__}, not a checkpoint or a state dict.")
    if "adapter" in payload and "settings" in payload:  # grft-vision's checkpoint.pt
        return _run_checkpoint(source, payload)
    if "state_dict" in payload or "state_dict_ema" in payload:  # timm's CheckpointSaver
        has_ema = payload.get("state_dict_ema") is not None
        if ema and not has_ema:
            raise ConfigError(f"--ema: {source!r} holds no 'state_dict_ema' (the run had no model EMA); leave --ema out.")
        if "state_dict" not in payload and not ema:
            raise ConfigError(f"{source!r} holds only the model EMA's weights ('state_dict_ema'); pass --ema.")
        key = "state_dict_ema" if ema else "state_dict"
        name, options = _timm_spec(payload.get("args"))
        saved = _from_state(source, payload[key], model_name=name or payload.get("arch"), model_kwargs=options)
        saved.weights = f"{key}" + (" (the checkpoint also holds the EMA's, state_dict_ema: --ema merges those)"
                                    if has_ema and not ema else "")
        return saved
    return _from_state(source, payload)


def _run_checkpoint(source: str, payload: dict[str, Any]) -> SavedModel:
    settings = payload["settings"] or {}
    if payload["adapter"] is None:
        raise ModelLoadError(f"{source!r} is the checkpoint of a --method {settings.get('method')} run, which has no "
                             "adapter to merge; its trainable tensors are in the run's trainable.safetensors.")
    tensors, metadata = payload["adapter"]
    options = {"img_size": settings["img_size"]} if settings.get("img_size") is not None else {}
    return SavedModel(source, adapter=(tensors, metadata), model_name=settings.get("model"), model_kwargs=options,
                      base=settings.get("checkpoint"), pretrained=bool(settings.get("pretrained")))


def wrapped_adapter_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the adapters a wrapped model's state dict holds, in order of appearance."""
    names: dict[str, None] = {}
    for key in state:
        match = _ADAPTER_OF_KEY.search(key)
        if match:
            names[match["adapter"]] = None
    return list(names)


def _structure(model: nn.Module, layer_name: str, indices: torch.Tensor, delta: torch.Tensor, source: str) -> str:
    """The one structure whose ``indices`` / ``delta`` shapes fit the layer (see the module docstring)."""
    try:
        layer = model.get_submodule(layer_name)
    except AttributeError:
        raise ModelLoadError(f"{source!r} has an update for layer {layer_name!r}, which this model does not have; "
                             "pass the --model and --model-kwargs it was trained with.") from None
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise ModelLoadError(f"{source!r} has an update for {layer_name!r}, which is a {type(layer).__name__} in this "
                             "model; pass the --model and --model-kwargs it was trained with.")
    weight_shape, groups = layer_weight_shape(layer), getattr(layer, "groups", 1)
    fits = [name for name, structure in STRUCTURES.items()
            if structure.fits(weight_shape, groups, tuple(indices.shape), tuple(delta.shape))]
    if not fits:
        raise ModelLoadError(f"{source!r}: the update of {layer_name!r} (indices {list(indices.shape)}, delta "
                             f"{list(delta.shape)}) fits no structure of its weight {list(weight_shape)}; pass the "
                             "--model and --model-kwargs it was trained with.")
    if len(fits) > 1:
        raise ModelLoadError(f"{source!r}: the update of {layer_name!r} fits the structures {fits} alike (every unit "
                             "of a square weight is chosen), which a state dict cannot tell apart; export the "
                             "adapter file instead (grft_vision.save_adapter, or CheckpointSaver(..., "
                             "unwrap_fn=adapter_only)).")
    return fits[0]


def rebuild_wrapped(model: nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str,
                    source: str = "state dict") -> nn.Module:
    """Wrap plain ``model`` exactly as the model that saved ``state`` was (adapter ``adapter_name`` only), then load
    ``state`` strictly; returns the model with that adapter active.

    Raises:
        ModelLoadError: an update fits no structure or two, or the state dict does not fit the model.
    """
    metadata = getattr(state, "_metadata", None)  # module versions (BatchNorm reads them while loading)
    state = OrderedDict((key, value) for key, value in state.items()
                        if (match := _ADAPTER_OF_KEY.search(key)) is None or match["adapter"] == adapter_name)
    if metadata is not None:
        state._metadata = metadata
    indices = {match["layer"]: value for key, value in state.items()
               if (match := _UPDATE_INDICES.fullmatch(key)) and match["adapter"] == adapter_name}
    structures = {}
    for layer, value in indices.items():
        delta = state.get(f"{layer}.grft_updates.{adapter_name}.delta")
        if delta is None:
            raise ModelLoadError(f"{source!r} has the indices of {layer!r} but not its delta; the checkpoint is "
                                 "incomplete.")
        structures[layer] = _structure(model, layer, value, delta, source)
    train_bias = any(key.endswith(f".grft_updates.{adapter_name}.bias_delta") for key in state)
    owns_nothing = GRFTConfig(train_head=False, train_bias=train_bias, train_layer_scale=False)  # BN stats aside
    inject(model, adapter_name, {layer: value.long() for layer, value in indices.items()}, structures, owns_nothing)
    grft_state = model.grft_state
    for key in state:
        match = _OWNED_COPY.fullmatch(key)
        if match is None:
            continue
        try:
            owner = model.get_submodule(match["owner"] or "")
        except AttributeError:
            raise ModelLoadError(f"{source!r} holds {key!r}, for a module this model does not have; pass the --model "
                                 "and --model-kwargs it was trained with.") from None
        tensor = match["tensor"] or match["legacy"]
        owned = owned_tensor_of(owner, tensor)
        if owned is None or adapter_name not in owned.adapters:
            own_tensor(owner, tensor, adapter_name, grft_state, owner_name=match["owner"] or "")
    result = model.load_state_dict(state, strict=False)
    unexpected = [key for key in result.unexpected_keys if key in state]  # not those a module's loader adds
    if result.missing_keys or unexpected:
        raise ModelLoadError(f"{source!r} does not fit this model: {len(result.missing_keys)} of its tensors are not "
                             f"in the checkpoint (e.g. {result.missing_keys[:3]}), {len(unexpected)} of the "
                             f"checkpoint's are not in the model (e.g. {unexpected[:3]}); pass the --model and "
                             "--model-kwargs it was trained with.")
    set_adapter(model, adapter_name)
    return model

