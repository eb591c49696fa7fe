"""The identity of a base model: what an adapter records of the model it was trained on, and the check that
a model is that model.

An adapter records the architecture, where its base weights came from, the Hub id / input size when known,
every backbone parameter's shape, and a fingerprint of every backbone parameter (sums in float64, exact up to
the rounding of a dtype cast), so that loading onto a model the adapter does not fit is an error, never a
silent mismatch.

Where the base weights came from (``weights`` in the identity) is what the code that created the model
recorded with :func:`record_base_weights` — the training scripts do; a model built elsewhere is ``unknown``:

- ``{"kind": "pretrained", "tag": ...}``: timm's pre-trained weights of that tag (or a Hub id);
- ``{"kind": "file", "path": ..., "sha256": ...}``: a local weights file;
- ``{"kind": "random", "seed": ...}``: a random initialisation right after ``torch.manual_seed(seed)``, which
  export rebuilds (its fingerprints say whether it is the same);
- ``{"kind": "unknown", "config_tag": ...}``: not recorded (the tag the model's config names, for advice only).

``pretrained_tag`` is only set for the first kind.
"""
from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..extras import import_optional
from ..tuner.anatomy import architecture_name, base_tensors, input_size, original_name
from ..tuner.layer import grft_layers
from ..tuner.quantized import QUANTIZED_FORMATS, quantized_format, quantized_layers

__all__ = ["fingerprint", "fingerprints_match", "pretrained_parameters", "base_identity", "record_base_weights",
           "base_weights", "file_sha256"]

_ATTRIBUTE = "grft_base_weights"  # the root model's record of where its weights came from

_FINGERPRINT_CHUNK = 1 << 20
_EPS = {"float64": 2.2e-16, "float32": 1.2e-7, "bfloat16": 7.8e-3, "float16": 9.8e-4}


@functools.lru_cache(maxsize=4)
def _pattern(device: torch.device) -> torch.Tensor:
    """Fixed pseudo-random weights in [-0.5, 0.5), float64, one per position of a fingerprint chunk."""
    position = torch.arange(_FINGERPRINT_CHUNK, dtype=torch.int64, device=device)
    return ((position * 2654435761) % 65536).double() / 65536 - 0.5


def fingerprint(tensor: torch.Tensor) -> list[float]:
    """``[sum w, sum w^2, sum c_i w_i]`` in float64, ``c_i`` fixed pseudo-random weights in [-0.5, 0.5).

    Survives device moves; any change of a value moves at least one of the three sums (a permutation moves
    the third, within each chunk of 2^20 entries).
    """
    flat = tensor.detach().reshape(-1)
    pattern = _pattern(flat.device)
    sums = torch.zeros(3, dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), _FINGERPRINT_CHUNK):
        chunk = flat[start:start + _FINGERPRINT_CHUNK].double()
        sums += torch.stack([chunk.sum(), torch.dot(chunk, chunk), torch.dot(chunk, pattern[:len(chunk)])])
    return sums.tolist()


def fingerprints_match(saved: dict[str, Any], tensor: torch.Tensor, quantization: dict[str, Any] | None = None
                       ) -> bool:
    """Equal up to the rounding of the coarser of the saved and the current dtype (a cast changes nothing more).

    A quantized weight is fingerprinted dequantized, with its settings (``quantization``, as
    :meth:`~grft_vision.tuner.quantized.QuantizedFormat.describe` gives them). A full-precision weight checked
    against a quantized record is quantized the same way first (exact); a quantized weight checked against a
    full-precision record (or another format) can only be within the quantization's error: the sums must agree
    to a few times the error they would have if each weight moved by the format's relative rms error at random.
    """
    recorded = saved.get("quantization")
    if recorded is not None and recorded != quantization:
        fmt = QUANTIZED_FORMATS.get(recorded["format"])
        if quantization is None:
            import_optional("bitsandbytes", "checking an adapter saved from a quantized model")
            return fingerprints_match({**saved, "quantization": None}, fmt.roundtrip(tensor, recorded))
        current_format = QUANTIZED_FORMATS.get(quantization["format"])
        return _within_quantization(saved["sums"], tensor, fmt.relative_error + current_format.relative_error)
    if quantization is not None and recorded is None:
        return _within_quantization(saved["sums"], tensor, QUANTIZED_FORMATS.get(quantization["format"]).relative_error)
    current = fingerprint(tensor)
    eps = max(_EPS.get(saved.get("dtype", "float32"), 1e-3), _EPS.get(str(tensor.dtype).removeprefix("torch."), 1e-3))
    numel = max(tensor.numel(), 1)
    scale = math.sqrt(numel * max(saved["sums"][1], current[1], 1e-300))  # bounds sum |w|
    tolerances = (4 * eps * scale, 8 * eps * max(saved["sums"][1], current[1]), 2 * eps * scale)
    return all(abs(a - b) <= tol for a, b, tol in zip(saved["sums"], current, tolerances))


def _within_quantization(saved: list[float], tensor: torch.Tensor, relative_error: float) -> bool:
    """The sums of :func:`fingerprint` agree to within 8 standard deviations of what a random error of rms
    ``relative_error`` times the weights' rms would change them by."""
    flat = tensor.detach().reshape(-1).double()
    squares = float(flat.pow(2).sum())
    spread = relative_error * math.sqrt(squares)  # std of sum(E) for errors of rms relative_error * rms(w)
    fourth = math.sqrt(float(flat.pow(4).sum()))
    current = fingerprint(tensor)
    tolerances = (8 * spread, 2 * relative_error ** 2 * squares + 16 * relative_error * fourth, 4 * spread)
    return all(abs(a - b) <= tol for a, b, tol in zip(saved, current, tolerances))


class _PretrainedTensors(Mapping[str, torch.Tensor]):
    """Backbone tensors by original name; the pre-trained weight of a wrapped or quantized layer is computed
    when read (dequantized, for a quantized one: one dense copy at a time).

    Attributes:
        shapes: every tensor's (logical) shape, known without computing it.
        quantization: the settings of the quantized weights, by name.
    """

    def __init__(self, model: nn.Module) -> None:
        self._tensors: dict[str, Any] = dict(base_tensors(model))
        self.shapes = {name: tuple(tensor.shape) for name, tensor in self._tensors.items()}
        self.quantization: dict[str, dict[str, Any]] = {}
        for module_name, layer in quantized_layers(model):  # wrapped ones too (their pristine weight below)
            name = f"{original_name(module_name)}.weight"
            fmt = quantized_format(layer)
            self._tensors[name], self.shapes[name] = functools.partial(fmt.dequantize, layer), fmt.shape(layer)
            self.quantization[name] = fmt.describe(layer)
        for module_name, layer in grft_layers(model):
            self._tensors[f"{module_name}.weight"] = layer.pristine_weight
            if layer.base_layer.bias is not None:
                self._tensors[f"{module_name}.bias"] = layer.pristine_bias

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self._tensors[name]
        return value if torch.is_tensor(value) else value()

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def pretrained_parameters(model: nn.Module) -> _PretrainedTensors:
    """Backbone parameters by original name, pre-trained values (whatever is merged into a wrapped weight); a
    quantized layer's weight dequantized (its settings in the result's ``quantization``)."""
    return _PretrainedTensors(model)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_base_weights(model: nn.Module, kind: str, **details: Any) -> nn.Module:
    """Record where ``model``'s weights came from (see the module docstring); returns the model.

    Args:
        kind: ``pretrained`` (details: ``tag`` or ``hub_id``), ``file`` (``path``; ``sha256`` is computed when
            missing), or ``random`` (``seed``: the ``torch.manual_seed`` right before the model was created).
    """
    if kind not in ("pretrained", "file", "random"):
        raise ValueError(f"kind={kind!r} must be 'pretrained', 'file' or 'random'.")
    if kind == "file" and "sha256" not in details:
        details["sha256"] = file_sha256(details["path"])
    object.__setattr__(model, _ATTRIBUTE, {"kind": kind, **details})
    return model


def base_weights(model: nn.Module) -> dict[str, Any]:
    """Where ``model``'s weights came from, as recorded (``{"kind": "unknown", ...}`` when nothing was)."""
    recorded = getattr(model, _ATTRIBUTE, None)
    if recorded is not None:
        return dict(recorded)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {"kind": "unknown", "config_tag": cfg.get("tag")}


def base_identity(model: nn.Module, owned: set[str]) -> dict[str, Any]:
    """What an adapter records of its base model (the tensors it owns left out)."""
    weights = base_weights(model)
    parameters = pretrained_parameters(model)
    names = [name for name in parameters if name not in owned]
    shapes, prints = {}, {}
    for name in names:  # one dense (dequantized) tensor alive at a time
        tensor = parameters[name]
        shapes[name] = list(parameters.shapes[name])
        prints[name] = {"dtype": str(tensor.dtype).removeprefix("torch."), "sums": fingerprint(tensor)}
        if name in parameters.quantization:
            prints[name]["quantization"] = parameters.quantization[name]
    return {
        "architecture": architecture_name(model),
        "weights": weights,
        "pretrained_tag": weights.get("tag") if weights["kind"] == "pretrained" else None,
        "hf_hub_id": weights.get("hub_id") or getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "input_size": list(input_size(model) or []) or None,
        "param_shapes": shapes,
        "fingerprints": prints,
    }
