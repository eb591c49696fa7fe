"""Image transforms of the VTAB-1k and FGVC protocols, built with timm from a model's data config.

Protocols (``benchmark-protocols.md`` §1, §2), all mapping an RGB PIL image to a float tensor
``[3, H, W]`` normalised with the model's mean/std (``H, W`` = the model's input size):

* ``vtab``: the folder family (NOAH, SSF, GPS): ``Resize((H, W))`` bicubic, aspect ratio not kept; no
  augmentation, so train and eval transforms are the same.
* ``vtab_tfds``: the TFDS family (official VTAB code, VPT): the same with bilinear interpolation. PIL's
  bilinear resize approximates TF1's legacy ``resize_images`` (which has no anti-aliasing and no
  half-pixel centres); the two differ slightly.
* ``fgvc``: GPS. Train: ``RandomResizedCrop((H, W), scale=(0.08, 1))`` + horizontal flip. Eval:
  ``Resize(round(H * 248 / 224))`` (shorter side; 248 for 224) + ``CenterCrop((H, W))``. Bicubic.

For parameter selection, :func:`contrastive_transform` is GPS's SupCon augmentation and :class:`TwoViews`
applies it twice per image (a ``[2, 3, H, W]`` tensor per sample).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn

from ..selection.views import CONTRASTIVE_RECIPE
from ..tuner.anatomy import input_size

__all__ = ["PROTOCOLS", "TwoViews", "contrastive_transform", "create_transforms", "resolve_model_data_config"]

PROTOCOLS = ("vtab", "vtab_tfds", "fgvc")
DEFAULT_INTERPOLATION = {"vtab": "bicubic", "vtab_tfds": "bilinear", "fgvc": "bicubic"}
FGVC_RESIZE_RATIO = 248 / 224
FGVC_SCALE = (0.08, 1.0)
FGVC_RATIO = (3 / 4, 4 / 3)


def resolve_model_data_config(model_or_data_config: nn.Module | Mapping[str, Any] | str) -> dict[str, Any]:
    """A complete timm data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ...).

    Args:
        model_or_data_config: A timm model (its ``pretrained_cfg``, with the input size it actually runs at:
            a ViT created with ``img_size=32`` keeps 224 in its config, see
            :func:`grft_vision.tuner.anatomy.input_size`), a (partial) data config dict whose
            missing keys take timm's defaults, or a timm model name such as
            ``"vit_base_patch16_224.augreg_in21k"`` (its registered pretrained config; nothing is loaded).

    Returns:
        The dict returned by :func:`timm.data.resolve_data_config`.

    Raises:
        ValueError: If a model name has no registered pretrained config.
    """
    if isinstance(model_or_data_config, nn.Module):
        config = resolve_data_config(model=model_or_data_config)
        actual = input_size(model_or_data_config)
        if actual is not None:
            config["input_size"] = tuple(actual)
        return config
    if isinstance(model_or_data_config, str):
        pretrained_cfg = timm.models.get_pretrained_cfg(model_or_data_config)
        if pretrained_cfg is None:
            raise ValueError(f"timm has no pretrained config for {model_or_data_config!r}.")
        return resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())
    return resolve_data_config(pretrained_cfg=dict(model_or_data_config))


def create_transforms(
    model_or_data_config: nn.Module | Mapping[str, Any] | str,
    protocol: str,
    train: bool,
    *,
    interpolation: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """The train or eval transform of a protocol for a model.

    Args:
        model_or_data_config: See :func:`resolve_model_data_config`; gives the input size and mean/std.
        protocol: ``vtab``, ``vtab_tfds`` or ``fgvc`` (see the module docstring).
        train: Training transform (only ``fgvc`` augments) or evaluation transform.
        interpolation: Overrides the protocol's interpolation (``bicubic``, ``bilinear``, ...).
        mean: Overrides the model's normalisation mean (one value per channel, for pixels in [0, 1]).
        std: Overrides the model's normalisation std.

    Returns:
        A callable mapping an RGB PIL image to a float tensor ``[3, H, W]``.

    Raises:
        ValueError: If ``protocol`` is unknown.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; expected one of {PROTOCOLS}.")
    config = resolve_model_data_config(model_or_data_config)
    common = dict(
        input_size=config["input_size"],
        interpolation=interpolation or DEFAULT_INTERPOLATION[protocol],
        mean=tuple(mean or config["mean"]),
        std=tuple(std or config["std"]),
    )
    if protocol != "fgvc":
        # crop_pct 1 + squash: Resize((H, W)) then a no-op CenterCrop((H, W)).
        return create_transform(is_training=False, crop_pct=1.0, crop_mode="squash", **common)
    if train:
        return create_transform(is_training=True, scale=FGVC_SCALE, ratio=FGVC_RATIO, hflip=0.5, vflip=0.0,
                                color_jitter=None, **common)
    short_side = min(config["input_size"][-2:])
    crop_pct = short_side / round(short_side * FGVC_RESIZE_RATIO)
    return create_transform(is_training=False, crop_pct=crop_pct, crop_mode="center", **common)


def contrastive_transform(
    model_or_data_config: nn.Module | Mapping[str, Any] | str,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """GPS's augmentation for the SupCon selection loss on PIL images (``benchmark-protocols.md`` §3): the recipe of
    :data:`grft_vision.selection.views.CONTRASTIVE_RECIPE` — ``RandomResizedCrop((H, W), scale=(0.08, 1))``,
    horizontal flip, ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` with probability 0.8, ``RandomGrayscale`` with
    probability 0.2, then the model's normalisation (bicubic). Its twin for image tensors is
    :class:`~grft_vision.selection.views.ContrastiveViews`.
    """
    config = resolve_model_data_config(model_or_data_config)
    return create_transform(input_size=config["input_size"], is_training=True, **CONTRASTIVE_RECIPE,
                            mean=tuple(mean or config["mean"]), std=tuple(std or config["std"]))


class TwoViews:
    """Apply a (random) transform twice to one image: ``image -> [2, 3, H, W]``.

    The selection loss reads a batch ``[B, 2, 3, H, W]`` as two views per image with shared labels.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([self.transform(image), self.transform(image)])

    def __repr__(self) -> str:
        return f"TwoViews({self.transform!r})"
