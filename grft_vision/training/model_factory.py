"""Creating the timm backbone of a run: hub weights, a local checkpoint file, or random initialisation.

A local ``--checkpoint`` is checked against the architecture before timm loads it (with its checkpoint
filter, position-embedding resampling and ``.npz`` readers; :mod:`grft_vision.io.weights`): only the
classification head may be missing from the file or left over in it.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from ..errors import ModelLoadError, did_you_mean
from ..io.identity import record_base_weights
from ..io.weights import UNREADABLE, check_weights_file, first_line
from .config import VisionTrainConfig

__all__ = ["ModelLoadError", "create_timm_model"]


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
    pretrained, weights = train.pretrained, {"kind": "random", "seed": train.seed}
    if train.checkpoint is not None:
        path = Path(train.checkpoint).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"--checkpoint {str(path)!r} does not exist; pass a local weights file "
                                 "(.safetensors, .pth or .npz as timm reads them).")
        check_weights_file(train.model, path, options)
        options["pretrained_cfg_overlay"] = {"file": str(path)}
        pretrained, weights = True, {"kind": "file", "path": str(path.resolve())}
    try:
        if not pretrained:  # the random base is this seed's: export rebuilds it (recorded below)
            torch.manual_seed(train.seed)
        model = timm.create_model(train.model, pretrained=pretrained, **options)
    except TypeError as error:
        raise ModelLoadError(f"{train.model!r} does not accept {sorted(options)}: {error}") from error
    except UNREADABLE as error:
        if not pretrained:
            raise
        source = f"--checkpoint {train.checkpoint}" if train.checkpoint else f"the pre-trained weights of {train.model!r}"
        hint = ("check that the file is complete" if train.checkpoint else "without network access, download them "
                "elsewhere and pass --checkpoint FILE, or train from random initialisation with --no-pretrained")
        raise ModelLoadError(f"could not load {source} ({first_line(error)}); {hint}.") from error
    if train.img_size is not None:
        _check_image_size(model, train)
    if pretrained and weights["kind"] == "random":
        weights = {"kind": "pretrained", "tag": model.pretrained_cfg.get("tag")}
    return record_base_weights(model, **weights)


def _check_image_size(model: nn.Module, train: VisionTrainConfig) -> None:
    """Run one blank image of ``img_size`` through the model, so that a size it cannot take fails now."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, train.img_size, train.img_size))
    except (RuntimeError, AssertionError, ValueError) as error:
        default = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        raise ModelLoadError(f"img_size={train.img_size} does not fit {train.model!r} ({first_line(error)}); use "
                             f"a larger --img-size (the model's own is {default}).") from None
    finally:
        model.train(was_training)
