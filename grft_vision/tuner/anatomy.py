"""Reading a model's anatomy: its head, its norms, its blocks, and the names tensors had before wrapping.

Works for timm models (through ``pretrained_cfg['classifier']`` and ``group_matcher``), Hugging Face
models, and plain ``torch.nn.Module`` trees (through name conventions and the longest module list). On a
wrapped model, names are read through the wrappers (``a.base_layer.weight`` is ``a.weight``) and through
adapter-owned tensors (``head.grft_owned.weight.original`` is ``head.weight``).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..errors import ConfigError
from .layer import GRFTLayer, grft_layers, own_class

__all__ = [
    "ModelGroups",
    "grft_layers",
    "original_name",
    "is_adapter_tensor",
    "base_tensors",
    "logical_modules",
    "logical_tensors",
    "head_module_names",
    "input_size",
    "is_norm",
    "matches_any",
    "in_modules",
    "model_groups",
    "architecture_name",
    "is_grft_model",
]

_HEAD_FALLBACK_NAMES = ("head", "classifier", "score", "fc")
_WRAPPER_SEGMENT = ".base_layer"
_OWNED_ORIGINAL = re.compile(r"(^|\.)grft_owned\.([^.]+)\.original$")
_ADAPTER_TENSOR = re.compile(r"(^|\.)(grft_updates|grft_owned\.[^.]+\.adapters)\.")


def original_name(name: str) -> str:
    """The name a parameter/buffer/module had before wrapping: ``a.base_layer.weight`` -> ``a.weight``,
    ``head.grft_owned.weight.original`` -> ``head.weight``."""
    name = name.replace(_WRAPPER_SEGMENT + ".", ".").removesuffix(_WRAPPER_SEGMENT)
    return _OWNED_ORIGINAL.sub(r"\1\2", name)


def is_adapter_tensor(name: str) -> bool:
    """True for the name of a tensor that belongs to an adapter (an update, or an adapter's owned copy)."""
    return _ADAPTER_TENSOR.search(name) is not None


def base_tensors(model: nn.Module, buffers: bool = False) -> dict[str, torch.Tensor]:
    """The base model's parameters (or buffers) under their original names; adapter tensors left out.

    Owned tensors give their original (pre-trained) value; a wrapped weight gives its current value (use
    :meth:`~grft_vision.tuner.layer.GRFTLayer.pristine_weight` for the pre-trained one when adapters are merged).
    """
    named = model.named_buffers() if buffers else model.named_parameters()
    return {original_name(name): tensor for name, tensor in named if not is_adapter_tensor(name)}


def logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of the unwrapped model's modules: a GRFT wrapper stands for its base layer (under the
    wrapper's name) and the insides of wrappers and of owned tensors (``grft_owned``) are skipped."""
    skipped: list[str] = []
    for name, module in model.named_modules():
        if any(name == prefix or name.startswith(prefix + ".") for prefix in skipped):
            continue
        if isinstance(module, GRFTLayer):
            skipped.append(name)
            yield name, module.base_layer
            continue
        skipped.append(f"{name}.grft_owned" if name else "grft_owned")
        yield name, module


def logical_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, bool]]:
    """``(module name, module, tensor name, is buffer)`` of every tensor of the unwrapped model's modules.

    Owned tensors are listed under their own name; the insides of GRFT wrappers and of owned tensors are
    skipped (a wrapper's base layer is never an owner).
    """
    wrapped = {name for name, _ in grft_layers(model)}
    for module_name, module in logical_modules(model):
        if module_name in wrapped:
            continue
        for name, param in module._parameters.items():
            if param is not None:
                yield module_name, module, name, False
        for name, owned in module._modules.get("grft_owned", {}).items():
            yield module_name, module, name, owned.is_buffer
        for name, buffer in module._buffers.items():
            if buffer is not None:
                yield module_name, module, name, True


def matches_any(name: str, patterns: list[str]) -> bool:
    """True when ``name`` matches one of the fnmatch glob ``patterns``."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def architecture_name(model: nn.Module) -> str:
    """A stable identity for the architecture: timm's architecture, HF's model type, else the class path."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    cls = own_class(model)
    hf_config = getattr(model, "config", None)
    if getattr(hf_config, "model_type", None):
        return f"{hf_config.model_type}:{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def input_size(model: nn.Module) -> tuple[int, ...] | None:
    """``(C, H, W)`` the model runs at: a ViT's actual patch-embedding size (timm keeps the pretrained
    ``input_size`` in its config even for a model created with another ``img_size``), else timm's config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg["input_size"]) if "input_size" in cfg else None
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and img_size[0] is not None:
        channels = size[0] if size else getattr(getattr(patch_embed, "proj", None), "in_channels", 3)
        return (channels, int(img_size[0]), int(img_size[1]))
    return size


def head_module_names(model: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """Names of the modules that form the classification head.

    Args:
        model: the model (wrapped or not).
        patterns: explicit glob patterns; None means auto-detect: timm's ``pretrained_cfg['classifier']``,
            else the first top-level child named head / classifier / score / fc.

    Raises:
        ConfigError: explicit patterns match no module.
    """
    names = [name for name, _ in logical_modules(model) if name]
    if patterns is not None:
        found = [name for name in names if matches_any(name, patterns)]
        if patterns and not found:
            raise ConfigError(f"head_modules={patterns} matches no module of {architecture_name(model)}; "
                             f"top-level modules are: {', '.join(n for n in names if '.' not in n)}.")
        return found
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    classifier = cfg.get("classifier") if isinstance(cfg, dict) else None
    if classifier:
        wanted = [classifier] if isinstance(classifier, str) else list(classifier)
        return [name for name in wanted if name in names]
    return next(([name] for name in _HEAD_FALLBACK_NAMES if name in names), [])


def is_norm(module: nn.Module) -> bool:
    """True for normalisation layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm and look-alikes)."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    if hasattr(nn, "RMSNorm"):
        norm_types += (nn.RMSNorm,)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def in_modules(name: str, module_names: list[str]) -> bool:
    """True when ``name`` is one of ``module_names`` or lies inside one of them."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in module_names)


@dataclass
class ModelGroups:
    """Parameter names (original, unwrapped) split into stem, ordered blocks and head.

    Attributes:
        stem: the input side (patch embedding, tokens, position embedding, first convolutions).
        blocks: one list of names per block (transformer block, or stage for hierarchical models), in
            forward order.
        head: the classification head.
    """

    stem: list[str] = field(default_factory=list)
    blocks: list[list[str]] = field(default_factory=list)
    head: list[str] = field(default_factory=list)


def _timm_block_key(name: str, matcher: dict) -> str | tuple[int, ...] | None:
    """'stem', a block key, or None (final norm, neck, head) for one name under a timm group matcher."""
    stem = matcher.get("stem")
    if stem and re.match(stem, name):
        return "stem"
    specs = matcher.get("blocks") or []
    specs = [(specs, None)] if isinstance(specs, str) else specs
    for regex, suffix in specs:
        found = re.match(regex, name)
        if found:
            if suffix is not None and suffix[0] >= 99999:  # timm's marker for the final norm
                return None
            return tuple(int(group) for group in found.groups() if group is not None)
    return None


def _module_list_blocks(model: nn.Module) -> tuple[str, int] | None:
    """(prefix, count) of the longest ``ModuleList``/``Sequential`` of blocks, or None."""
    best: tuple[str, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2:
            if best is None or len(module) > best[1]:
                best = (name, len(module))
    return best


def model_groups(model: nn.Module, head_names: list[str]) -> ModelGroups:
    """Split the parameters of ``model`` into stem, blocks and head (see :class:`ModelGroups`).

    timm models use their coarse ``group_matcher`` (blocks for ViT/DeiT/Mixer, stages for Swin,
    ConvNeXt, ResNet). Other models use their longest ``ModuleList``/``Sequential`` as the blocks, and the
    parameters before the first block as the stem.
    """
    groups = ModelGroups()
    names = list(base_tensors(model))
    groups.head = [name for name in names if in_modules(name, head_names)]
    body = [name for name in names if name not in set(groups.head)]
    if hasattr(model, "group_matcher"):
        matcher = model.group_matcher(coarse=True)
        keys = {name: _timm_block_key(name, matcher) for name in body}
    else:
        keys = _fallback_keys(model, body)
    groups.stem = [name for name in body if keys[name] == "stem"]
    block_keys = sorted({key for key in keys.values() if isinstance(key, tuple)})
    groups.blocks = [[name for name in body if keys[name] == key] for key in block_keys]
    return groups


def _fallback_keys(model: nn.Module, names: list[str]) -> dict[str, str | tuple[int, ...] | None]:
    found = _module_list_blocks(model)
    keys: dict[str, str | tuple[int, ...] | None] = {}
    seen_block = False
    for name in names:
        key: str | tuple[int, ...] | None = None
        if found is not None:
            prefix = found[0] + "." if found[0] else ""
            rest = name[len(prefix):] if name.startswith(prefix) else ""
            index = rest.split(".", 1)[0]
            if index.isdigit():
                key, seen_block = (int(index),), True
        keys[name] = key if key is not None else (None if seen_block else "stem")
    return keys


def is_grft_model(model: nn.Module) -> bool:
    """True when ``model`` holds at least one GRFT wrapper."""
    return any(isinstance(module, GRFTLayer) for module in model.modules())
