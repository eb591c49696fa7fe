"""Creating the timm backbone of a run: hub weights, a local checkpoint file, or random initialisation.

A local ``--checkpoint`` is checked against the architecture before timm loads it (with its checkpoint
filter, position-embedding resampling and ``.npz`` readers): timm loads non-strictly whenever the class
count differs, i.e. in every fine-tune, so without the check a file of another architecture would leave
the backbone at random initialisation. Only the classification head may be missing from the file or left
over in it.
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

from ..tuner.anatomy import head_module_names
from ..errors import ModelLoadError, did_you_mean
from .config import VisionTrainConfig

__all__ = ["ModelLoadError", "create_timm_model", "describe_weights"]

# what a truncated or corrupt weights file raises while being read (torch.load, safetensors, numpy)
_UNREADABLE = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError)
# marker weight -> (block prefix, family) of the architectures a weights file is most often for
_FAMILIES = {
    "patch_embed.proj.weight": (r"(?:layers\.\d+\.)?blocks\.(\d+)\.", "a ViT-style model"),
    "stem.0.weight": (r"stages\.(\d+)\.", "a ConvNeXt-style model"),
    "stem.conv.weight": (r"stages\.(\d+)\.", "a ResNetV2/BiT-style model"),
    "conv_stem.weight": (r"blocks\.(\d+)\.", "an EfficientNet/MobileNet-style model"),
    "conv1.weight": (r"layer(\d+)\.", "a ResNet-style model"),
}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def create_timm_model(train: VisionTrainConfig, num_classes: int) -> nn.Module:
    """``timm.create_model`` with the run's weights source, class count, image size and drop-path.

    Raises:
        ModelLoadError: unknown model name, missing, unreadable or wrong-architecture checkpoint file,
            weights that cannot be fetched (e.g. offline), an option the architecture does not take, or an
            image size the model cannot process.
    """
    base_name = train.model.split(".")[0]
    if not timm.is_model(base_name):
        raise ModelLoadError(f"timm has no model {train.model!r}.{did_you_mean(base_name, timm.list_models())} "
                             "See timm.list_models().")
    options = {"num_classes": num_classes, "drop_path_rate": train.drop_path}
    if train.img_size is not None:
        options["img_size"] = train.img_size
    pretrained = train.pretrained
    if train.checkpoint is not None:
        path = Path(train.checkpoint).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"--checkpoint {str(path)!r} does not exist; pass a local weights file "
                                 "(.safetensors, .pth or .npz as timm reads them).")
        _check_weights_file(train.model, path, options)
        options["pretrained_cfg_overlay"] = {"file": str(path)}
        pretrained = True
    try:
        model = timm.create_model(train.model, pretrained=pretrained, **options)
    except TypeError as error:
        raise ModelLoadError(f"{train.model!r} does not accept {sorted(options)}: {error}") from error
    except _UNREADABLE as error:
        if not pretrained:
            raise
        source = f"--checkpoint {train.checkpoint}" if train.checkpoint else f"the pre-trained weights of {train.model!r}"
        hint = ("check that the file is complete" if train.checkpoint else "without network access, download them "
                "elsewhere and pass --checkpoint FILE, or train from random initialisation with --no-pretrained")
        raise ModelLoadError(f"could not load {source} ({_first_line(error)}); {hint}.") from error
    if train.img_size is not None:
        _check_image_size(model, train)
    return model


def _check_weights_file(name: str, path: Path, options: dict) -> None:
    """Refuse a weights file that is unreadable or does not fit ``name`` built with ``options``.

    The file is read as timm reads it (``timm.models.load_state_dict``, then the model family's
    ``checkpoint_filter_fn`` when it has one) and compared with a model built without weights (in a forked
    RNG, so that the run's random draws stay those of a run without the check). ``.npz`` files are read
    by the model's own loader, which fails on a missing array, and are not checked here.
    """
    if path.suffix.lower() in (".npz", ".npy"):
        return
    try:
        state = load_state_dict(str(path))
    except _UNREADABLE as error:
        raise ModelLoadError(f"--checkpoint {path} is not a readable weights file ({_first_line(error)}); it is "
                             "truncated or corrupt: download it again.") from None
    try:
        with torch.random.fork_rng(devices=[]):
            model = timm.create_model(name, pretrained=False, **options)
    except TypeError as error:
        raise ModelLoadError(f"{name!r} does not accept {sorted(options)}: {error}") from error
    checkpoint_filter = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    _check_fits(model, checkpoint_filter(state, model) if callable(checkpoint_filter) else state, name, path)


def _check_fits(model: nn.Module, state: Mapping[str, torch.Tensor], name: str, path: Path) -> None:
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
    raise ModelLoadError(f"--checkpoint {path} does not fit {name!r}: {'; '.join(parts)}. The file seems to be for "
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


def _check_image_size(model: nn.Module, train: VisionTrainConfig) -> None:
    """Run one blank image of ``img_size`` through the model, so that a size it cannot take fails now."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, train.img_size, train.img_size))
    except (RuntimeError, AssertionError, ValueError) as error:
        default = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        raise ModelLoadError(f"img_size={train.img_size} does not fit {train.model!r} ({_first_line(error)}); use "
                             f"a larger --img-size (the model's own is {default}).") from None
    finally:
        model.train(was_training)
