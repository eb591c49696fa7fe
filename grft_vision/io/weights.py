"""Weights files of timm models: read as timm reads them, and checked against the architecture they load into.

timm loads a local weights file non-strictly whenever the class count differs (in every fine-tune, and in
every export of an adapter whose head has its own size), so a file of another architecture, or a head-only
file, would leave the backbone at random initialisation without a word. :func:`check_weights_file` refuses
such a file first: every weight outside the classification head must be there, with its shape.
"""
from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path
from typing import Mapping

import timm
import torch
from safetensors import SafetensorError
from timm.models import load_state_dict
from torch import nn

from ..errors import ModelLoadError
from ..tuner.anatomy import head_module_names

__all__ = ["check_weights_file", "describe_weights", "first_line", "UNREADABLE"]

# what a truncated or corrupt weights file raises while being read (torch.load, safetensors, numpy)
UNREADABLE = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError)
# marker weight -> (block prefix, family) of the architectures a weights file is most often for
_FAMILIES = {
    "patch_embed.proj.weight": (r"(?:layers\.\d+\.)?blocks\.(\d+)\.", "a ViT-style model"),
    "stem.0.weight": (r"stages\.(\d+)\.", "a ConvNeXt-style model"),
    "stem.conv.weight": (r"stages\.(\d+)\.", "a ResNetV2/BiT-style model"),
    "conv_stem.weight": (r"blocks\.(\d+)\.", "an EfficientNet/MobileNet-style model"),
    "conv1.weight": (r"layer(\d+)\.", "a ResNet-style model"),
}


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an exception from another library."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def check_weights_file(name: str, path: Path, options: dict, flag: str = "--checkpoint") -> None:
    """Refuse a weights file that is unreadable or does not fit ``name`` built with ``options`` (``flag``: the
    option that named the file, for messages).

    The file is read as timm reads it (``timm.models.load_state_dict``, then the model family's
    ``checkpoint_filter_fn`` when it has one) and compared with a model built without weights (in a forked
    RNG, so that the run's random draws stay those of a run without the check). ``.npz`` files are read
    by the model's own loader, which fails on a missing array, and are not checked here.
    """
    if path.suffix.lower() in (".npz", ".npy"):
        return
    try:
        state = load_state_dict(str(path))
    except UNREADABLE as error:
        raise ModelLoadError(f"{flag} {path} is not a readable weights file ({first_line(error)}); it is "
                             "truncated or corrupt: download it again.") from None
    try:
        with torch.random.fork_rng(devices=[]):
            model = timm.create_model(name, pretrained=False, **options)
    except TypeError as error:
        raise ModelLoadError(f"{name!r} does not accept {sorted(options)}: {error}") from error
    checkpoint_filter = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    _check_fits(model, checkpoint_filter(state, model) if callable(checkpoint_filter) else state, name, path, flag)


def _check_fits(model: nn.Module, state: Mapping[str, torch.Tensor], name: str, path: Path, flag: str) -> None:
    """Raise :class:`ModelLoadError` when ``state`` misses, adds or reshapes a weight outside the head."""
    heads = head_module_names(model)

    def outside_head(key: str) -> bool:
        return not any(key == head or key.startswith(f"{head}.") for head in heads)

    expected = {key: tuple(value.shape) for key, value in model.state_dict().items() if outside_head(key)}
    given = {key: tuple(value.shape) for key, value in state.items()
             if outside_head(key) and isinstance(value, torch.Tensor)}
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    reshaped = sorted(key for key in expected.keys() & given.keys() if expected[key] != given[key])
    if not (missing or unexpected or reshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's weights are not in the file ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} of the file's are not in the model ({_few(unexpected)})")
    if reshaped:
        key = reshaped[0]
        parts.append(f"{len(reshaped)} have another shape ({key}: {list(given[key])} in the file, "
                     f"{list(expected[key])} in the model)")
    raise ModelLoadError(f"{flag} {path} does not fit {name!r}: {'; '.join(parts)}. The file seems to be for "
                         f"{describe_weights(state)}; pass the --model it was saved from, or weights of {name!r}.")


def _few(keys: list[str], count: int = 3) -> str:
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")


def describe_weights(state: Mapping[str, torch.Tensor]) -> str:
    """A short guess at the architecture a state dict belongs to, e.g. 'a ViT-style model (12 blocks, width 768)'."""
    for marker, (block, family) in _FAMILIES.items():
        if marker in state:
            blocks = {match.group(0) for key in state if (match := re.match(block, key))}
            return f"{family} ({len(blocks)} blocks, width {state[marker].shape[0]})"
    return f"another architecture (its first weights: {_few(list(state))})"
