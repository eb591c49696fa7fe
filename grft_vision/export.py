"""Plain weights from whatever a GRFT run saved: ``python -m grft_vision.export CHECKPOINT --out merged.pth``.

The result is the merged model's plain ``state_dict`` (the original keys, the adapter folded in), which
``timm.create_model(name, checkpoint_path=...)`` loads strictly (or, for a Hugging Face model written to a
directory, ``from_pretrained``). Before anything is written it is loaded strictly into a freshly created
plain model. ``CHECKPOINT`` is recognised by its content:

============================================  ====================================================================
what                                          where the adapter and the base weights come from
============================================  ====================================================================
timm ``last.pth.tar`` / ``checkpoint-N``      ``state_dict_ema`` when present (as timm loads it; ``--no-ema``:
                                              ``state_dict``), of the wrapped model (timm's ``CheckpointSaver``:
                                              base weights included) or adapter-only
                                              (``CheckpointSaver(..., unwrap_fn=adapter_only)``: needs ``--base``)
Hugging Face Trainer ``checkpoint-N/``        :class:`~grft_vision.integrations.hf.GRFTTrainer`'s adapter (base:
                                              ``--base``, else the folder / hub id it records), or a plain
                                              Trainer's wrapped ``model.safetensors`` (with ``config.json``)
grft-vision ``checkpoint.pt``                 its adapter; the base is the run's ``--checkpoint`` file or
                                              pre-trained weights
adapter ``.safetensors`` / adapter directory  the adapter; base from ``--base`` or ``--pretrained`` (timm's hub
                                              weights of the pretrained tag the adapter records)
============================================  ====================================================================

How export learns the structure of every update: an adapter carries it in its metadata (with its config and
the fingerprints of the base weights it was trained on, which are checked). A wrapped state dict does not,
so each layer's structure is read from the shapes of its ``indices`` and ``delta`` against the layer of
the model built from the checkpoint's model name; an update whose shapes fit two structures (every row of
a square weight chosen) is refused with a clear error, as is every other combination that does not fit.

The model is ``--model`` / ``--model-kwargs`` when given, else what the checkpoint records: timm's saved
``args`` (``model``, ``num_classes``, ``in_chans``, ``model_kwargs``), a run's settings (``model``,
``img_size``), a Hugging Face ``config.json``, or the adapter's architecture and input size.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save as safetensors_bytes
from torch import nn

from .adapter import CONFIG_NAME, WEIGHTS_NAME, apply_adapter_state
from .config import GRFTConfig
from .errors import ConfigError, GRFTError, ModelLoadError, did_you_mean
from .files import atomic_write
from .integrations.timm import load_training_checkpoint, split_adapter_state
from .lifecycle import set_adapter
from .model import add_adapter, merge_grft
from .owned_tensors import adapter_tensor_of, own_tensor
from .updates import STRUCTURES

__all__ = ["SavedModel", "read_saved", "wrapped_adapter_names", "rebuild_wrapped", "export_merged", "write_merged",
           "main"]

_ADAPTER_FORMAT_PREFIX = "grft-adapter/"
_UPDATE_INDICES = re.compile(r"(?P<layer>.+)\.grft_updates\.(?P<adapter>[^.]+)\.indices")
_OWNED_COPY = re.compile(r"(?:(?P<owner>.+)\.)?parametrizations\.(?P<tensor>[^.]+)\.0\.adapters\.(?P<adapter>[^.]+)")
_ADAPTER_OF_KEY = re.compile(r"(?:^|\.)(?:grft_updates|parametrizations\.[^.]+\.0\.adapters)\.(?P<adapter>[^.]+)(?:\.|$)")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar")
_HF_HEADS = ("score", "classifier")


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

    @property
    def is_hugging_face(self) -> bool:
        """A Hugging Face model (a ``config.json``, or an adapter of architecture ``model_type:Class``)."""
        if self.hf_config is not None:
            return True
        identity = json.loads(self.adapter[1].get("base_model", "{}")) if self.adapter is not None else {}
        return ":" in str(identity.get("architecture", ""))


# ----------------------------------------------------------------------------------------------- reading
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


def read_saved(path: str | Path, *, ema: bool | None = None) -> SavedModel:
    """Read any checkpoint the module docstring lists.

    Args:
        path: the checkpoint file or directory.
        ema: timm checkpoints: True takes ``state_dict_ema`` (an error when there is none), False
            ``state_dict``, None the EMA when present (as ``timm.create_model(checkpoint_path=...)`` does).

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
        key = "state_dict_ema" if (has_ema if ema is None else ema) else "state_dict"
        name, options = _timm_spec(payload.get("args"))
        return _from_state(source, payload[key], model_name=name or payload.get("arch"), model_kwargs=options)
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


# ----------------------------------------------------------------------------------------------- wrapped state dicts
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
    weight_shape, groups = tuple(layer.weight.shape), getattr(layer, "groups", 1)
    fits = [name for name, update in STRUCTURES.items()
            if (indices.dim() == 2) == (name == "sparse") and (name != "tap_column" or len(weight_shape) == 4)
            and tuple(update.shape_for(weight_shape, indices.shape[-1], groups)) == tuple(delta.shape)]
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
    add_adapter(model, adapter_name, {layer: value.long() for layer, value in indices.items()}, structures, owns_nothing)
    for key in state:
        match = _OWNED_COPY.fullmatch(key)
        if match is None:
            continue
        try:
            owner = model.get_submodule(match["owner"] or "")
        except AttributeError:
            raise ModelLoadError(f"{source!r} holds {key!r}, for a module this model does not have; pass the --model "
                                 "and --model-kwargs it was trained with.") from None
        parametrization = adapter_tensor_of(owner, match["tensor"])
        if parametrization is None or adapter_name not in parametrization.adapters:
            own_tensor(owner, match["tensor"], adapter_name)
    result = model.load_state_dict(state, strict=False)
    unexpected = [key for key in result.unexpected_keys if key in state]  # not those a module's loader adds
    if result.missing_keys or unexpected:
        raise ModelLoadError(f"{source!r} does not fit this model: {len(result.missing_keys)} of its tensors are not "
                             f"in the checkpoint (e.g. {result.missing_keys[:3]}), {len(unexpected)} of the "
                             f"checkpoint's are not in the model (e.g. {unexpected[:3]}); pass the --model and "
                             "--model-kwargs it was trained with.")
    set_adapter(model, adapter_name)
    return model


# ----------------------------------------------------------------------------------------------- models
def _classifiers(name: str) -> list[str]:
    """The head modules timm's pretrained config names for model ``name`` (``head``, ``fc``, ``head.fc``, ...)."""
    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    classifier = getattr(cfg, "classifier", None) or "head"
    return [classifier] if isinstance(classifier, str) else list(classifier)


def _rows(tensors: Mapping[str, Any], keys: Sequence[str]) -> int | None:
    """Rows of the first of ``keys`` in ``tensors`` (a tensor, or a shape list), None when none is there."""
    for key in keys:
        value = tensors.get(key)
        if value is not None:
            return int(value.shape[0] if torch.is_tensor(value) else value[0])
    return None


def _create_timm(name: str, options: Mapping[str, Any], **weights: Any) -> nn.Module:
    if not timm.is_model(name):
        raise ModelLoadError(f"timm has no model {name!r}.{did_you_mean(name.split('.')[0], timm.list_models())} Pass "
                             "--model with the name the run used.")
    try:
        return timm.create_model(name, **{**options, **weights})
    except TypeError as error:
        raise ModelLoadError(f"{name!r} does not accept {sorted(options)}: {error}; fix --model-kwargs.") from error
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as error:
        if not weights.get("pretrained"):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        source = weights.get("pretrained_cfg_overlay", {}).get("file") or f"the pre-trained weights of {name!r}"
        raise ModelLoadError(f"could not load {source} into {name!r} with {options} ({first}); pass the base weights "
                             "and the --model / --model-kwargs the run used.") from None


@dataclass
class _Spec:
    """How to create the plain model: a timm name and options, or a Hugging Face model (config.json folder)."""

    name: str
    options: dict[str, Any]
    hf_config: str | None = None
    hugging_face: bool = False

    def create_timm(self, num_classes: int | None, base: str | None = None, pretrained: bool = False,
                    base_classes: int | None = None) -> nn.Module:
        """A timm model of ``num_classes`` (default: ``options``' or timm's), random, or with the weights of file
        ``base`` (whose head, of ``base_classes`` rows when known, is kept when it has ``num_classes``) or of the hub."""
        options = dict(self.options)
        if num_classes is not None:
            options.setdefault("num_classes", num_classes)
        if base is None:
            return _create_timm(self.name, options, pretrained=pretrained)
        if not Path(base).is_file():
            raise ModelLoadError(f"--base {base!r} does not exist; pass the weights file the run started from.")
        overlay = {"file": str(base), **({"num_classes": base_classes} if base_classes is not None else {})}
        return _create_timm(self.name, options, pretrained=True, pretrained_cfg_overlay=overlay)

    def create_hugging_face(self, base: str | None, num_classes: int | None) -> nn.Module:
        """The Hugging Face model of ``config.json`` (the checkpoint's, else the base's), random or from ``base``."""
        from .extras import import_optional

        transformers = import_optional("transformers", "exporting a Hugging Face model")
        folder = self.hf_config or base
        if folder is None:
            raise ConfigError("a Hugging Face adapter needs its base model: pass --base with the model's folder or hub "
                              "id (what the run loaded).")
        try:
            config = transformers.AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot read the Hugging Face config of {folder!r} ({error}); pass --base with the "
                                 "folder or hub id of the model the run trained.") from None
        if num_classes is not None and self.hf_config is None:
            config.num_labels = num_classes
        architecture = (getattr(config, "architectures", None) or ["AutoModelForSequenceClassification"])[0]
        model_class = getattr(transformers, architecture, None)
        if model_class is None:
            raise ModelLoadError(f"{folder!r}: transformers has no model class {architecture!r} (config.json's "
                                 "architectures); upgrade transformers, or fix the config.")
        if base is None:  # the weights come from the checkpoint
            return model_class(config).float()
        return model_class.from_pretrained(base, config=config, dtype=torch.float32)


def _spec(saved: SavedModel, model: str | None, model_kwargs: Mapping[str, Any] | None) -> _Spec:
    options = {**saved.model_kwargs, **(model_kwargs or {})}
    if saved.is_hugging_face:
        return _Spec(model or saved.model_name or "", options, saved.hf_config, hugging_face=True)
    name = model or saved.model_name
    if name is None and saved.adapter is not None:  # the adapter's architecture, at the size it ran at
        identity = json.loads(saved.adapter[1].get("base_model", "{}"))
        name, size, tag = identity.get("architecture"), identity.get("input_size"), identity.get("pretrained_tag")
        default = getattr(timm.models.get_pretrained_cfg(name), "input_size", None) if name and timm.is_model(name) \
            else None
        if size and default and tuple(size) != tuple(default):  # only a patch embedding reports another size
            options.setdefault("img_size", size[-1])
        name = f"{name}.{tag}" if name and tag else name  # --pretrained fetches the weights of that tag
    if name is None:
        raise ConfigError(f"{saved.source!r} does not record which model it belongs to; pass --model (the timm name "
                          "the run used) and --model-kwargs for the options it was created with.")
    return _Spec(name, options)


# ----------------------------------------------------------------------------------------------- merging
def export_merged(path: str | Path, *, model: str | None = None, model_kwargs: Mapping[str, Any] | None = None,
                  base: str | None = None, pretrained: bool = False, adapter_name: str | None = None,
                  ema: bool | None = None, check_weights: bool = True) -> nn.Module:
    """The plain merged model of a checkpoint (see the module docstring); :func:`write_merged` writes it.

    Args:
        path: the checkpoint.
        model, model_kwargs: the timm model to build (default: what the checkpoint records).
        base, pretrained: the base weights of an adapter: a weights file (timm) or folder / hub id (Hugging Face),
            or timm's pre-trained weights of the model.
        adapter_name: which adapter of a state dict holding several.
        ema: see :func:`read_saved`.
        check_weights: compare the base weights with the adapter's fingerprints.

    Raises:
        ConfigError: an option that does not fit the checkpoint (``base`` for a checkpoint holding its base, an
            unknown adapter name, no model known, an adapter without base weights).
        ModelLoadError: an unreadable checkpoint, or one that does not fit the model.
        AdapterError: an adapter that does not fit the model or its base weights.
    """
    saved = read_saved(path, ema=ema)
    spec = _spec(saved, model, model_kwargs)
    if saved.wrapped is not None:
        return _merge_wrapped(saved, spec, base, pretrained, adapter_name)
    return _merge_adapter(saved, spec, base, pretrained, adapter_name, check_weights)


def _merge_wrapped(saved: SavedModel, spec: _Spec, base: str | None, pretrained: bool,
                   adapter_name: str | None) -> nn.Module:
    if base is not None or pretrained:
        raise ConfigError(f"{saved.source!r} holds the wrapped model with its base weights; --base / --pretrained are "
                          "for adapter-only checkpoints: leave them out.")
    names = wrapped_adapter_names(saved.wrapped)
    if not names:
        raise ModelLoadError(f"{saved.source!r} holds a plain state dict (no GRFT updates): there is nothing to merge; "
                             "load it directly.")
    name = _choose(names, adapter_name, saved.source)
    if spec.hugging_face:
        model = spec.create_hugging_face(None, None)
    else:  # a head of the size the model was wrapped with (the adapter's own copy may have another)
        heads = _classifiers(spec.name)
        model = spec.create_timm(_rows(saved.wrapped, [f"{h}.parametrizations.weight.original" for h in heads]
                                       + [f"{h}.weight" for h in heads]))
    rebuild_wrapped(model, saved.wrapped, name, saved.source)
    return merge_grft(model)


def _merge_adapter(saved: SavedModel, spec: _Spec, base: str | None, pretrained: bool, adapter_name: str | None,
                   check_weights: bool) -> nn.Module:
    tensors, metadata = saved.adapter
    if adapter_name is not None and adapter_name != metadata.get("adapter_name"):
        raise ConfigError(f"--adapter-name {adapter_name!r}: {saved.source!r} holds adapter "
                          f"{metadata.get('adapter_name')!r} only.")
    if spec.hugging_face:
        base = base or saved.model_name or json.loads(metadata.get("base_model", "{}")).get("hf_hub_id")
        if base is None:
            raise ConfigError(f"{saved.source!r} holds only the adapter; pass --base with the folder or hub id of the "
                              "Hugging Face model it was trained from.")
        model = spec.create_hugging_face(base, _rows(tensors, [f"{h}.weight" for h in _HF_HEADS]))
    else:
        base = base if base is not None else (None if pretrained else saved.base)
        if base is None and not (pretrained or saved.pretrained):
            raise ConfigError(f"{saved.source!r} holds only the adapter; pass the base weights it was trained from: "
                              f"--base FILE, or --pretrained for timm's pre-trained weights of {spec.name!r}.")
        heads = [f"{h}.weight" for h in _classifiers(spec.name)]
        shapes = json.loads(metadata.get("base_model", "{}")).get("param_shapes", {})
        own_rows = _rows(tensors, heads)  # the adapter trains the head: its own size, the base's head is unused
        base_rows = _rows(shapes, heads)  # it does not: the base file's head stays
        model = spec.create_timm(own_rows or base_rows, base=base, pretrained=base is None,
                                 base_classes=None if own_rows else base_rows)
    apply_adapter_state(model, tensors, metadata, source=saved.source, check_weights=check_weights)
    return merge_grft(model)


def _choose(names: list[str], wanted: str | None, source: str) -> str:
    if wanted is None:
        if len(names) > 1:
            raise ConfigError(f"{source!r} holds the adapters {names}; choose one with --adapter-name.")
        return names[0]
    if wanted not in names:
        raise ConfigError(f"--adapter-name {wanted!r}: {source!r} holds the adapters {names}."
                          f"{did_you_mean(wanted, names)}")
    return wanted


# ----------------------------------------------------------------------------------------------- writing
def write_merged(model: nn.Module, out: str | Path) -> Path:
    """Write a merged plain model: its ``state_dict`` to ``.pth`` / ``.pt`` / ``.bin`` / ``.pth.tar`` (torch) or
    ``.safetensors``; a Hugging Face model to a directory (any other path) with ``save_pretrained``.

    The state dict is first loaded strictly into the model it came from (a check that it is complete).

    Raises:
        ConfigError: a timm model and a path without a known suffix.
    """
    out = Path(out)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    if out.suffix == ".safetensors":
        with atomic_write(out, "wb") as handle:
            handle.write(safetensors_bytes(state))
    elif out.suffix in _TORCH_SUFFIXES:
        with atomic_write(out, "wb") as handle:
            torch.save(state, handle)
    elif hasattr(model, "save_pretrained") and hasattr(model, "config"):
        model.save_pretrained(out)
    else:
        raise ConfigError(f"--out {str(out)!r}: name a .pth, .pt, .bin, .pth.tar or .safetensors file (a directory is "
                          "written for Hugging Face models only).")
    return out


# ----------------------------------------------------------------------------------------------- command line
def _assignment(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m grft_vision.export",
                                     description="Merge the adapter of a GRFT checkpoint into plain model weights.")
    parser.add_argument("checkpoint", help="timm last.pth.tar, Trainer checkpoint-N/, checkpoint.pt or adapter")
    parser.add_argument("--out", required=True, help="merged.pth / .safetensors (or a directory: Hugging Face)")
    parser.add_argument("--model", help="timm model name (default: the one the checkpoint records)")
    parser.add_argument("--model-kwargs", nargs="*", default=[], type=_assignment, metavar="KEY=VALUE",
                        help="create_model options it was trained with, e.g. img_size=32 num_classes=10")
    parser.add_argument("--base", help="base weights of an adapter: file (timm) or folder / hub id (Hugging Face)")
    parser.add_argument("--pretrained", action="store_true", help="base weights: timm's pre-trained weights")
    parser.add_argument("--adapter-name", help="the adapter to merge when the checkpoint holds several")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_const", const=True, default=None,
                     help="merge the model EMA's weights (the default when the checkpoint has them)")
    ema.add_argument("--no-ema", dest="ema", action="store_const", const=False, help="merge the live weights")
    parser.add_argument("--no-check-weights", dest="check_weights", action="store_false",
                        help="load an adapter onto base weights other than its own on purpose")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 done, 2 invalid input with one ``error:`` line)."""
    args = _parser().parse_args(argv)
    try:
        model = export_merged(args.checkpoint, model=args.model, model_kwargs=dict(args.model_kwargs), base=args.base,
                              pretrained=args.pretrained, adapter_name=args.adapter_name, ema=args.ema,
                              check_weights=args.check_weights)
        out = write_merged(model, args.out)
    except (GRFTError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"merged weights: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
