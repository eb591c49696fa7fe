"""A quantized frozen base (QLoRA-style): bitsandbytes 4-bit (nf4, fp4) and 8-bit linear layers.

A bitsandbytes ``Linear4bit`` stores its ``[out, in]`` weight packed into 4-bit codes (``Params4bit``, shape
``[out * in / 2, 1]``) with per-block scales; a ``Linear8bitLt`` stores int8 codes ``[out, in]`` with one scale
per row. Both are ``nn.Linear`` subclasses whose forward dequantizes on the fly. GRFT keeps them as they are
(no dense copy), adds its fp32 update beside them (:class:`~grft_vision.tuner.quantized_layer.GRFTQuantizedLinear`)
and needs from this module only:

- which format a layer has (:func:`quantized_format`; none when bitsandbytes was never imported),
- the logical weight shape (:func:`weight_shape`, also right for plain layers),
- the weight the layer computes with, dequantized (:meth:`QuantizedFormat.dequantize`),
- storing a changed dense weight back in the layer's own format, and the exact bytes it replaced
  (:meth:`QuantizedFormat.snapshot` / :meth:`~QuantizedFormat.store` / :meth:`~QuantizedFormat.restore`),
- converting a timm (or any) model's plain linear layers (:func:`quantize_model`; convolutions stay in full
  precision),
- keeping a layer able to train after it evaluated (:meth:`QuantizedFormat.keep_trainable`).

Formats are registered in :data:`QUANTIZED_FORMATS`; nothing else in the package knows bitsandbytes' classes.
"""
from __future__ import annotations

import copy
import math
import sys
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from ..errors import ConfigError
from ..extras import import_optional
from ..registry import Registry
from .anatomy import head_module_names, in_modules, matches_any

__all__ = ["QuantizedFormat", "QUANTIZED_FORMATS", "QUANT_TYPES", "quantized_format", "is_quantized",
           "weight_shape", "weight_numel", "quantize_model", "quantized_layers"]

QUANTIZED_FORMATS: Registry[type["QuantizedFormat"]] = Registry("quantized format")
QUANT_TYPES = ("nf4", "fp4", "int8")  # what quantize_model (and the scripts' --quantize) accept


def _bitsandbytes(purpose: str) -> Any:
    return import_optional("bitsandbytes", purpose)


class QuantizedFormat:
    """How one family of quantized linear layers stores its weight (class methods only).

    Attributes:
        name: the registry name.
        relative_error: a bound on the quantization's rms error relative to the weight's rms (measured on normal,
            uniform and truncated-normal weights, with margin): how far a full-precision weight and its quantized
            copy may be apart when an adapter's record of one is checked against the other.
    """

    name: ClassVar[str]
    relative_error: ClassVar[float]

    @classmethod
    def matches(cls, layer: nn.Module, bnb: Any) -> bool:
        """True when ``layer`` stores its weight in this format (``bnb``: the imported bitsandbytes)."""
        raise NotImplementedError

    @classmethod
    def quant_type(cls, layer: nn.Module) -> str:
        """``"nf4"``, ``"fp4"`` or ``"int8"``."""
        raise NotImplementedError

    @classmethod
    def shape(cls, layer: nn.Module) -> tuple[int, int]:
        """The logical weight shape ``(out, in)``."""
        return layer.out_features, layer.in_features

    @classmethod
    def dtype(cls, layer: nn.Module) -> torch.dtype:
        """The floating dtype the weight dequantizes to (the dtype an update of it is made in)."""
        raise NotImplementedError

    @classmethod
    def dequantize(cls, layer: nn.Module) -> torch.Tensor:
        """The weight the layer computes with, ``[out, in]`` in :meth:`dtype` (a new tensor)."""
        raise NotImplementedError

    @classmethod
    def keep_trainable(cls, layer: nn.Module) -> None:
        """Make the layer compute the same way in training and evaluation, so that the two can alternate."""

    @classmethod
    def snapshot(cls, layer: nn.Module) -> Any:
        """What :meth:`restore` needs to put the stored weight back exactly: the objects themselves (no copy), in a
        tuple (kept as a module attribute, it registers no parameter)."""
        raise NotImplementedError

    @classmethod
    def restore(cls, layer: nn.Module, snapshot: Any) -> None:
        """Install a :meth:`snapshot` again: the layer computes exactly as it did when it was taken."""
        raise NotImplementedError

    @classmethod
    def store(cls, layer: nn.Module, dense: torch.Tensor) -> None:
        """Quantize ``dense`` ``[out, in]`` with the layer's own settings and make it the layer's weight."""
        raise NotImplementedError

    @classmethod
    def storable(cls, layer: nn.Module, dense: torch.Tensor) -> str | None:
        """Why ``dense`` cannot be stored in this format (None: it can)."""
        limit = torch.finfo(cls.dtype(layer)).max
        peak = float(dense.detach().abs().max()) if dense.numel() else 0.0
        if not math.isfinite(peak):
            return "it holds NaN/inf"
        if peak > limit:
            return f"its largest magnitude {peak:.4g} overflows {cls.dtype(layer)} (max {limit:.4g})"
        return None

    @classmethod
    def describe(cls, layer: nn.Module) -> dict[str, Any]:
        """The settings that define the stored values (``format`` is the registry name): recorded in adapter
        identities, read by :meth:`roundtrip`."""
        raise NotImplementedError

    @classmethod
    def roundtrip(cls, weight: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        """``weight`` quantized with ``settings`` (:meth:`describe`'s) and dequantized: what a layer of this
        format made from it computes with."""
        raise NotImplementedError

    @classmethod
    def convert(cls, linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype) -> nn.Module:
        """A new quantized layer computing ``linear`` (its weight quantized, its bias kept), on its device."""
        raise NotImplementedError


def _unpacked_4bit(weight: Any) -> tuple[torch.Tensor, Any]:
    """``(codes, quant state)`` of a ``Params4bit`` in bitsandbytes' standard layout.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its CPU kernel at the first inference
    forward (eval mode, no gradient); the standard layout is recovered on a copy of the quant state (the
    layer keeps its own).
    """
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    import bitsandbytes.functional as functional

    return functional._convert_weight_packed_for_cpu_inverse(weight.data, copy.deepcopy(state))


@QUANTIZED_FORMATS.register("4bit")
class FourBit(QuantizedFormat):
    """bitsandbytes ``Linear4bit`` (nf4 / fp4, blockwise absmax scales, optionally double-quantized)."""

    name = "4bit"
    relative_error = 0.2  # measured: nf4 0.09-0.093, fp4 0.11-0.125

    @classmethod
    def matches(cls, layer: nn.Module, bnb: Any) -> bool:
        return isinstance(layer, bnb.nn.Linear4bit)

    @classmethod
    def quant_type(cls, layer: nn.Module) -> str:
        return layer.weight.quant_type

    @classmethod
    def dtype(cls, layer: nn.Module) -> torch.dtype:
        state = layer.weight.quant_state
        return getattr(state, "original_dtype", None) or state.dtype

    @classmethod
    def dequantize(cls, layer: nn.Module) -> torch.Tensor:
        import bitsandbytes.functional as functional

        codes, state = _unpacked_4bit(layer.weight)
        return functional.dequantize_4bit(codes, state).reshape(cls.shape(layer)).to(cls.dtype(layer))

    @classmethod
    def keep_trainable(cls, layer: nn.Module) -> None:
        """bitsandbytes (0.50) repacks a 4-bit weight for a faster CPU kernel at the first inference forward on
        CPUs with AVX512-BF16, after which the layer computes differently and can no longer run a backward
        pass: the repacking is turned off (and undone, the way bitsandbytes undoes it to save a state dict)."""
        layer.support_avx512bf16_for_cpu = False
        weight = layer.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            import bitsandbytes.functional as functional

            weight.data, weight.quant_state = functional._convert_weight_packed_for_cpu_inverse(weight.data,
                                                                                              weight.quant_state)
            layer.quant_state = weight.quant_state

    @classmethod
    def snapshot(cls, layer: nn.Module) -> Any:
        return (layer.weight,)  # a tuple: a module attribute holding it registers nothing

    @classmethod
    def restore(cls, layer: nn.Module, snapshot: Any) -> None:
        (layer.weight,) = snapshot
        layer.quant_state = layer.weight.quant_state

    @classmethod
    def store(cls, layer: nn.Module, dense: torch.Tensor) -> None:
        bnb = _bitsandbytes("a 4-bit layer")
        old = layer.weight
        new = bnb.nn.Params4bit(dense.detach().to(cls.dtype(layer)).contiguous(), requires_grad=False,
                                blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                quant_type=old.quant_type, quant_storage=old.quant_storage, module=layer)
        layer.weight = new.to(old.device)
        layer.quant_state = layer.weight.quant_state

    @classmethod
    def describe(cls, layer: nn.Module) -> dict[str, Any]:
        weight = layer.weight
        return {"format": cls.name, "quant_type": weight.quant_type, "blocksize": int(weight.blocksize),
                "double_quant": bool(weight.compress_statistics)}

    @classmethod
    def roundtrip(cls, weight: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        import bitsandbytes.functional as functional

        codes, state = functional.quantize_4bit(weight.detach().contiguous(), blocksize=settings["blocksize"],
                                                compress_statistics=settings["double_quant"],
                                                quant_type=settings["quant_type"])
        return functional.dequantize_4bit(codes, state).reshape(weight.shape)

    @classmethod
    def convert(cls, linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype) -> nn.Module:
        bnb = _bitsandbytes("quantizing a model to 4 bits")
        device = linear.weight.device
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, quant_type=quant_type, device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone().cpu(), requires_grad=False,
                                         quant_type=quant_type, module=layer)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer.to(device)


@QUANTIZED_FORMATS.register("int8")
class EightBit(QuantizedFormat):
    """bitsandbytes ``Linear8bitLt`` with int8 weights (``has_fp16_weights=False``, LLM.int8()): one absmax
    scale per row; the forward dequantizes ``codes * scale / 127`` in the input's dtype."""

    name = "int8"
    relative_error = 0.05  # measured: 0.004-0.008 on those weights; outliers set a row's scale

    @classmethod
    def matches(cls, layer: nn.Module, bnb: Any) -> bool:
        return isinstance(layer, bnb.nn.Linear8bitLt) and not layer.state.has_fp16_weights

    @classmethod
    def quant_type(cls, layer: nn.Module) -> str:
        return "int8"

    @classmethod
    def describe(cls, layer: nn.Module) -> dict[str, Any]:
        return {"format": cls.name, "quant_type": "int8"}

    @classmethod
    def roundtrip(cls, weight: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
        import bitsandbytes.functional as functional

        codes, scales, _ = functional.int8_vectorwise_quant(weight.detach().to(torch.float16).contiguous())
        return codes.to(weight.dtype).mul_(scales.unsqueeze(1).mul(1.0 / 127.0).to(weight.dtype))

    @staticmethod
    def _scales(layer: nn.Module) -> torch.Tensor:
        scales = getattr(layer.weight, "SCB", None)
        return layer.state.SCB if scales is None else scales

    @classmethod
    def dtype(cls, layer: nn.Module) -> torch.dtype:
        return torch.float32 if layer.bias is None else layer.bias.dtype

    @classmethod
    def dequantize(cls, layer: nn.Module) -> torch.Tensor:
        codes, scales = layer.weight.data, cls._scales(layer)
        dtype = cls.dtype(layer)  # the forward's own arithmetic: codes * (scale / 127)
        return codes.to(dtype).mul_(scales.unsqueeze(1).mul(1.0 / 127.0).to(dtype))

    @classmethod
    def snapshot(cls, layer: nn.Module) -> Any:
        return layer.weight, layer.weight.data, cls._scales(layer)

    @classmethod
    def restore(cls, layer: nn.Module, snapshot: Any) -> None:
        weight, codes, scales = snapshot
        weight.data, weight.CB, weight.SCB = codes, codes, scales
        layer.weight = weight
        layer.state.CB = layer.state.SCB = None  # the next forward takes them from the weight

    @classmethod
    def store(cls, layer: nn.Module, dense: torch.Tensor) -> None:
        bnb = _bitsandbytes("an 8-bit layer")
        device = layer.weight.device
        new = bnb.nn.Int8Params(dense.detach().float().cpu().contiguous(), requires_grad=False,
                                has_fp16_weights=False)
        layer.weight = new.to(device)
        layer.state.CB = layer.state.SCB = None

    @classmethod
    def storable(cls, layer: nn.Module, dense: torch.Tensor) -> str | None:
        problem = super().storable(layer, dense)
        limit = torch.finfo(torch.float16).max  # bitsandbytes quantizes int8 rows from fp16
        peak = float(dense.detach().abs().max()) if dense.numel() else 0.0
        return problem or (f"its largest magnitude {peak:.4g} overflows float16 (max {limit:.4g}), from which "
                           "bitsandbytes quantizes int8 rows" if peak > limit else None)

    @classmethod
    def convert(cls, linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype) -> nn.Module:
        bnb = _bitsandbytes("quantizing a model to 8 bits")
        device = linear.weight.device
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(linear.weight.detach().float().cpu().clone(), requires_grad=False,
                                         has_fp16_weights=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone().to(compute_dtype), requires_grad=False)
        return layer.to(device)


def quantized_format(layer: nn.Module) -> type[QuantizedFormat] | None:
    """The format of a quantized layer, or None for a full-precision one (or when bitsandbytes was never
    imported: then no layer can be one of its)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or not isinstance(layer, nn.Linear):
        return None
    return next((fmt for _, fmt in QUANTIZED_FORMATS.items() if fmt.matches(layer, bnb)), None)


def is_quantized(layer: nn.Module) -> bool:
    return quantized_format(layer) is not None


def weight_shape(layer: nn.Module) -> tuple[int, ...]:
    """The shape of a linear / conv layer's weight as it computes: ``[out, in]`` for a quantized layer (whose
    stored tensor is packed), the weight's own shape otherwise."""
    fmt = quantized_format(layer)
    return fmt.shape(layer) if fmt is not None else tuple(layer.weight.shape)


def weight_numel(layer: nn.Module) -> int:
    return math.prod(weight_shape(layer))


def quantized_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``(name, layer)`` of every quantized linear layer of ``model``."""
    return ((name, module) for name, module in model.named_modules() if is_quantized(module))


def _convertible(module: nn.Module) -> bool:
    from timm.layers import Linear as TimmLinear

    return type(module) in (nn.Linear, TimmLinear)


def quantize_model(model: nn.Module, quant_type: str = "nf4", *, compute_dtype: torch.dtype = torch.float32,
                   skip_modules: Iterable[str] | None = None) -> nn.Module:
    """Replace the plain ``nn.Linear`` layers of ``model`` by bitsandbytes layers, in place; returns ``model``.

    What QLoRA does to a language model, for any model (a timm ViT, say): every linear layer but the head keeps
    its weight in 4 bits (``"nf4"``, ``"fp4"``; blocks of 64, double-quantized scales) or 8 bits (``"int8"``,
    LLM.int8() row-wise), its bias in ``compute_dtype``. Convolutions (a ViT's patch embedding, a ConvNet's
    layers), norms, embeddings and the head stay in full precision; linear subclasses with their own forward and
    ``nn.MultiheadAttention``'s projections (it reads their weights directly) are left alone too.

    Args:
        model: the model; its linear layers are replaced where they are (their device is kept).
        quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        compute_dtype: the dtype a 4-bit layer computes in (and biases are kept in).
        skip_modules: name patterns (as ``target_modules``) left in full precision; default: the model's head.

    Raises:
        ConfigError: an unknown ``quant_type``, or one bitsandbytes cannot run on the model's device.
        MissingDependencyError: bitsandbytes is not installed (``pip install 'grft-vision[quant]'``).
    """
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"quant_type={quant_type!r} is not a bitsandbytes format GRFT supports; use one of "
                          f"{', '.join(QUANT_TYPES)}.")
    _bitsandbytes(f"quantize_model(quant_type={quant_type!r})")
    fmt = EightBit if quant_type == "int8" else FourBit
    head = head_module_names(model, None)
    attention_owned = {f"{name}.{child}" if name else child for name, module in model.named_modules()
                       if isinstance(module, nn.MultiheadAttention) for child, _ in module.named_children()}
    chosen = [(name, module) for name, module in model.named_modules()
              if _convertible(module) and not in_modules(name, head) and name not in attention_owned
              and not (skip_modules and matches_any(name, list(skip_modules)))]
    for name, module in chosen:
        try:
            quantized = fmt.convert(module, quant_type, compute_dtype)
        except (RuntimeError, NotImplementedError) as error:
            device = module.weight.device
            raise ConfigError(f"bitsandbytes cannot quantize layer {name!r} to {quant_type} on {device} ({error}); "
                              "use another quant_type or device (bitsandbytes' backends: CUDA, CPU, XPU).") from error
        fmt.keep_trainable(quantized)
        quantized.train(module.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quantized)
    return model
