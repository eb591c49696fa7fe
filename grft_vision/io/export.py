"""Plain weights from whatever a GRFT run saved: the merged model of a checkpoint, and writing it.

The result is the merged model's plain ``state_dict`` (the original keys, the adapter folded in), which
``timm.create_model(name, checkpoint_path=...)`` loads strictly (or, for a Hugging Face model written to a
directory, ``from_pretrained``). Before anything is written it is loaded strictly into a freshly created
plain model. The checkpoint is read by :func:`~.checkpoints.read_saved`; the base weights of an adapter come
from ``base`` (a file, or a Hugging Face folder / hub id), timm's pre-trained weights (``pretrained``), the
run's ``--checkpoint`` file, or what the adapter records. An adapter trained on a quantized base (4-bit, 8-bit) is
merged into the full-precision weights quantized and dequantized as its layers held them
(:func:`dequantize_as_trained`): the merged model computes what the trained one did, at the precision of
``--dtype``. The command line is ``python -m grft_vision.export`` (:mod:`grft_vision.export`).

The model is ``model`` / ``model_kwargs`` when given, else what the checkpoint records: timm's saved ``args``
(``model``, ``num_classes``, ``in_chans``, ``model_kwargs``), a run's settings (``model``, ``img_size``), a
Hugging Face ``config.json``, or the adapter's architecture and input size.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..errors import ConfigError, ModelLoadError, did_you_mean
from ..files import atomic_write
from ..tuner.anatomy import original_name
from ..tuner.model import merge_grft
from ..tuner.quantized import QUANTIZED_FORMATS
from .adapters import apply_adapter_state
from .checkpoints import SavedModel, read_saved, rebuild_wrapped, wrapped_adapter_names
from .weights import check_weights_file, first_line

__all__ = ["export_merged", "write_merged", "check_output", "dequantize_as_trained", "TORCH_SUFFIXES"]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar")
_HF_HEADS = ("score", "classifier")

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
        source = weights.get("pretrained_cfg_overlay", {}).get("file") or f"the pre-trained weights of {name!r}"
        raise ModelLoadError(f"could not load {source} into {name!r} with {options} ({first_line(error)}); pass the "
                             "base weights and the --model / --model-kwargs the run used.") from None


@dataclass
class _Spec:
    """How to create the plain model: a timm name and options, or a Hugging Face model (config.json folder)."""

    name: str
    options: dict[str, Any]
    hf_config: str | None = None
    hugging_face: bool = False

    def create_timm(self, num_classes: int | None, base: str | None = None, pretrained: bool = False,
                    base_classes: int | None = None, seed: int | None = None) -> nn.Module:
        """A timm model of ``num_classes`` (default: ``options``' or timm's): random (after ``torch.manual_seed(seed)``
        when a seed is given: a run's random base), or with the weights of file ``base`` (whose head, of
        ``base_classes`` rows when known, is kept when it has ``num_classes``) or of the hub."""
        options = dict(self.options)
        if num_classes is not None:
            options.setdefault("num_classes", num_classes)
        if base is None and seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return _create_timm(self.name, options, pretrained=False)
        if base is None:
            return _create_timm(self.name, options, pretrained=pretrained)
        if not Path(base).is_file():
            raise ModelLoadError(f"--base {base!r} does not exist; pass the weights file the run started from.")
        check_weights_file(self.name, Path(base), options, flag="--base")  # strictly: whatever checks the weights
        overlay = {"file": str(base), **({"num_classes": base_classes} if base_classes is not None else {})}
        return _create_timm(self.name, options, pretrained=True, pretrained_cfg_overlay=overlay)

    def create_hugging_face(self, base: str | None, num_classes: int | None) -> nn.Module:
        """The Hugging Face model of ``config.json`` (the checkpoint's, else the base's), random or from ``base``."""
        from ..extras import import_optional

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


def export_merged(path: str | Path | SavedModel, *, model: str | None = None, model_kwargs: Mapping[str, Any] | None = None,
                  base: str | None = None, pretrained: bool = False, adapter_name: str | None = None,
                  ema: bool = False, check_weights: bool = True) -> nn.Module:
    """The plain merged model of a checkpoint (see the module docstring); :func:`write_merged` writes it.

    Args:
        path: the checkpoint (or what :func:`~.checkpoints.read_saved` read of it).
        model, model_kwargs: the timm model to build (default: what the checkpoint records).
        base, pretrained: the base weights of an adapter: a weights file (timm) or folder / hub id (Hugging Face),
            or timm's pre-trained weights of the model.
        adapter_name: which adapter of a state dict holding several.
        ema: timm checkpoints: merge the model EMA's weights instead of the live ones (see :func:`read_saved`).
        check_weights: compare the base weights with the adapter's fingerprints.

    Raises:
        ConfigError: an option that does not fit the checkpoint (``base`` for a checkpoint holding its base, an
            unknown adapter name, no model known, an adapter without base weights).
        ModelLoadError: an unreadable checkpoint, or one that does not fit the model.
        AdapterError: an adapter that does not fit the model or its base weights.
    """
    saved = path if isinstance(path, SavedModel) else read_saved(path, ema=ema)
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
        model = spec.create_timm(_rows(saved.wrapped, [f"{h}.{owned}.weight.original" for h in heads
                                                       for owned in ("grft_owned", "parametrizations")]
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
        identity = json.loads(metadata.get("base_model", "{}"))
        weights = identity.get("weights") or {}
        recorded_file = weights.get("path") if weights.get("kind") == "file" else None
        base = base if base is not None else (None if pretrained else saved.base or recorded_file)
        seed = weights.get("seed") if base is None and not pretrained and weights.get("kind") == "random" else None
        if base is not None and not Path(base).is_file() and base == recorded_file:
            raise ConfigError(f"{saved.source!r} was trained on the weights file {base!r} (sha256 "
                              f"{weights.get('sha256')}), which is not there any more; pass it with --base.")
        if base is None and seed is None and not (pretrained or saved.pretrained):
            raise ConfigError(f"{saved.source!r} holds only the adapter, and {_base_advice(identity, spec.name)}.")
        heads = [f"{h}.weight" for h in _classifiers(spec.name)]
        own_rows = _rows(tensors, heads)  # the adapter trains the head: its own size, the base's head is unused
        base_rows = _rows(identity.get("param_shapes", {}), heads)  # it does not: the base file's head stays
        model = spec.create_timm(own_rows or base_rows, base=base, pretrained=base is None and seed is None,
                                 base_classes=None if own_rows else base_rows, seed=seed)
    apply_adapter_state(model, tensors, metadata, source=saved.source, check_weights=check_weights)
    dequantize_as_trained(model, json.loads(metadata.get("base_model", "{}")))
    return merge_grft(model)


def dequantize_as_trained(model: nn.Module, identity: Mapping[str, Any]) -> None:
    """Give every weight the adapter's base held quantized the values its quantized layer computed with (the
    full-precision weight quantized with the recorded settings and dequantized), so that the merged model
    computes what the trained model computed; nothing else changes."""
    recorded = {name: print_["quantization"] for name, print_ in (identity.get("fingerprints") or {}).items()
                if isinstance(print_, dict) and print_.get("quantization")}
    if not recorded:
        return
    with torch.no_grad():
        for name, param in model.named_parameters():
            settings = recorded.get(original_name(name))
            if settings is not None:
                fmt = QUANTIZED_FORMATS.get(settings["format"])
                param.copy_(fmt.roundtrip(param.detach().float(), settings).to(param.dtype))


def _base_advice(identity: Mapping[str, Any], name: str) -> str:
    """What to pass for an adapter whose base weights were not recorded."""
    tag = (identity.get("weights") or {}).get("config_tag") or identity.get("pretrained_tag")
    pretrained = f"--pretrained for timm's pre-trained weights of {name.split('.')[0]}" + (f".{tag}" if tag else "")
    return f"where its base weights came from was not recorded: pass the weights it was trained on, --base FILE, or " \
           f"{pretrained} if it was trained on those"


def _choose(names: list[str], wanted: str | None, source: str) -> str:
    if wanted is None:
        if len(names) > 1:
            raise ConfigError(f"{source!r} holds the adapters {names}; choose one with --adapter-name.")
        return names[0]
    if wanted not in names:
        raise ConfigError(f"--adapter-name {wanted!r}: {source!r} holds the adapters {names}."
                          f"{did_you_mean(wanted, names)}")
    return wanted


def _inside(path: Path, folder: Path) -> bool:
    return folder.is_dir() and (path.resolve() == folder.resolve() or folder.resolve() in path.resolve().parents)


def check_output(out: str | Path, inputs: Sequence[str | Path | None]) -> None:
    """Refuse an output that would write onto an input: the same file (resolved, hard links included), an input
    folder or a path inside one, or a folder holding an input.

    Raises:
        ConfigError: naming the input that would be overwritten.
    """
    out = Path(out)
    for source in inputs:
        if source is None or not Path(source).exists():
            continue  # a hub id, or nothing
        source = Path(source)
        same = out.exists() and os.path.samefile(out, source)
        if same or _inside(out, source) or _inside(source, out):
            raise ConfigError(f"--out {str(out)!r} would write onto the input {str(source)!r}; choose another --out "
                              "(export never replaces what it reads).")


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
    elif out.suffix in TORCH_SUFFIXES:
        with atomic_write(out, "wb") as handle:
            torch.save(state, handle)
    elif hasattr(model, "save_pretrained") and hasattr(model, "config"):
        model.save_pretrained(out)
    else:
        raise ConfigError(f"--out {str(out)!r}: name a .pth, .pt, .bin, .pth.tar or .safetensors file (a directory is "
                          "written for Hugging Face models only).")
    return out

