"""Creating the timm backbone of a run: hub weights, a local checkpoint file, or random initialisation."""
from __future__ import annotations

import difflib
from pathlib import Path

import timm
from torch import nn

from ..errors import ModelLoadError
from .config import TrainConfig

__all__ = ["ModelLoadError", "create_timm_model"]


def create_timm_model(train: TrainConfig, num_classes: int) -> nn.Module:
    """``timm.create_model`` with the run's weights source, class count, image size and drop-path.

    Raises:
        ModelLoadError: unknown model name, missing checkpoint file, weights that cannot be fetched
            (e.g. offline), or an option the architecture does not take.
    """
    base_name = train.model.split(".")[0]
    if not timm.is_model(base_name):
        close = difflib.get_close_matches(base_name, timm.list_models(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ModelLoadError(f"timm has no model {train.model!r}.{hint} See timm.list_models().")
    options = {"num_classes": num_classes, "drop_path_rate": train.drop_path}
    if train.img_size is not None:
        options["img_size"] = train.img_size
    pretrained = train.pretrained
    if train.checkpoint is not None:
        path = Path(train.checkpoint).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"--checkpoint {str(path)!r} does not exist; pass a local weights file "
                                 "(.safetensors, .pth or .npz as timm reads them).")
        options["pretrained_cfg_overlay"] = {"file": str(path)}
        pretrained = True
    try:
        return timm.create_model(train.model, pretrained=pretrained, **options)
    except TypeError as error:
        raise ModelLoadError(f"{train.model!r} does not accept {sorted(options)}: {error}") from error
    except (OSError, RuntimeError, ValueError) as error:
        if not pretrained:
            raise
        raise ModelLoadError(
            f"could not load the pre-trained weights of {train.model!r} ({type(error).__name__}: {error}). "
            "Without network access, download them elsewhere and pass --checkpoint FILE, "
            "or train from random initialisation with --no-pretrained.") from error
