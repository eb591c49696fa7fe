"""Making the language model of a run: tokenizer with a pad token, sequence classifier, precision, memory.

``AutoModelForSequenceClassification`` on a Hugging Face id or a local folder (causal LMs such as Llama get
a linear ``score`` head on the last non-padding token, encoders such as BERT their ``classifier``):

- pad token: a tokenizer without one (Llama) pads with ``pad_token`` when set, else with its EOS token, and
  the model's ``pad_token_id`` is set to match (the head finds the last non-padding token with it);
- precision: the frozen weights in ``dtype`` (bf16 halves their memory); the head is kept in fp32 (it is
  trained fully, and AdamW steps are lost in bf16 rounding), with its input cast to fp32. GRFT updates are
  fp32 by construction (:mod:`grft_vision.tuner.dtypes`);
- memory: the KV cache is off (no generation), and gradient checkpointing is optional; ``quantize`` keeps the
  body's linear layers in 4 or 8 bits (bitsandbytes, QLoRA-style), the head in fp32.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..tuner.anatomy import head_module_names, is_adapter_tensor
from ..tuner.quantized import QUANT_TYPES, quantize_model
from ..config import ConfigError
from ..extras import import_optional
from ..training.model_factory import ModelLoadError

__all__ = ["resolve_dtype", "load_tokenizer", "load_classifier", "enable_gradient_checkpointing",
           "keep_head_float32", "resolve_pooling", "model_max_length", "check_max_length"]

_logger = logging.getLogger(__name__)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_WRAPPED = re.compile(r"\.base_layer\.|\.(?:grft_owned|parametrizations)\.[^.]+\.original$")  # a GRFT model's own keys
_HEADS = ("score", "classifier")  # sequence classifiers' heads: trained in full, never quantized
_NO_LIMIT = 10**8  # tokenizers without a known limit report a huge model_max_length


def resolve_dtype(name: str, device: str | torch.device | None = None) -> torch.dtype:
    """The weight dtype of ``name``; ``auto`` is bf16 on a CUDA device that supports it, else fp32."""
    if name != "auto":
        return _DTYPES[name]
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def _load_hint(name: str) -> str:
    return (f"Without network access (or for a gated model such as Llama, whose licence must be accepted on "
            f"the hub), download it where there is network, e.g. `hf download {name} --local-dir /models/x`, "
            "and point --model at that folder (it holds config.json, the weights and the tokenizer files).")


def _check_source(name: str) -> None:
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelLoadError(f"--model {name!r} is a folder without config.json, so not a saved Hugging Face "
                                 "model; pass the folder written by save_pretrained / `hf download`.")
        return
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"--model {name!r}: no such local folder. Pass an existing folder with a saved "
                             "model (config.json, weights, tokenizer files) or a Hugging Face model id.")


def load_tokenizer(name: str, pad_token: str | None = None) -> Any:
    """The tokenizer of ``name``, with a pad token (see the module docstring).

    Raises:
        ModelLoadError: the tokenizer cannot be found or loaded (the message says how to use a local copy).
        ConfigError: no pad token can be set (no pad, no EOS, or ``pad_token`` not in the vocabulary).
    """
    import_optional("transformers", "loading a tokenizer")
    from transformers import AutoTokenizer

    _check_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"could not load the tokenizer of {name!r} ({type(error).__name__}: {error}). "
                             f"{_load_hint(name)}") from error
    if pad_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(pad_token)
        if token_id is None or (token_id == tokenizer.unk_token_id and pad_token != tokenizer.unk_token):
            raise ConfigError(f"pad_token={pad_token!r} is not in the vocabulary of {name!r}; choose an existing "
                              "token (e.g. its EOS token) so that no embedding has to be added.")
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer of {name!r} has no pad token and no EOS token to pad with; name an "
                              "existing token to pad with: --set pad_token=<token>.")
        tokenizer.pad_token = tokenizer.eos_token
        _logger.info("%s has no pad token; padding with its EOS token %r.", name, tokenizer.eos_token)
    return tokenizer


def model_max_length(model: nn.Module, tokenizer: Any = None) -> int | None:
    """The longest sequence the model (position embeddings) and tokenizer accept; None if unknown."""
    limits = [getattr(model.config, "max_position_embeddings", None)]
    if tokenizer is not None:
        limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < _NO_LIMIT]
    return min(limits) if limits else None


def check_max_length(model: nn.Module, tokenizer: Any, max_length: int) -> None:
    """Raise :class:`ConfigError` when ``max_length`` exceeds what the model accepts."""
    limit = model_max_length(model, tokenizer)
    if limit is not None and max_length > limit:
        raise ConfigError(f"max_length={max_length} is longer than {model.config.model_type} accepts ({limit} "
                          f"positions); use --max-length {limit} or less.")


def keep_head_float32(model: nn.Module, head_names: list[str]) -> None:
    """Keep the head modules in fp32 and cast their floating inputs to fp32 (for half-precision bodies)."""

    def to_float32(module: nn.Module, args: tuple) -> tuple:
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    for name in head_names:
        head = model.get_submodule(name)
        if any(param.dtype != torch.float32 for param in head.parameters()):
            head.float()
            head.register_forward_pre_hook(to_float32)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant checkpointing).

    Raises:
        ConfigError: the architecture does not support it.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing; set "
                          "gradient_checkpointing=false.")
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name in recent transformers
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def resolve_pooling(model: nn.Module, setting: str = "auto") -> str:
    """``first`` (encoders: the [CLS] token) or ``last`` (causal LMs: the last non-padding token).

    ``auto`` reads the architecture: models with a masked-LM form (BERT, RoBERTa, DeBERTa, ...) are
    encoders, every other model (Llama, Mistral, Qwen, ...) is read as a causal LM.
    """
    if setting != "auto":
        return setting
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return "first" if getattr(model.config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "last"


def _refuse_wrapped_weights(name: str, loading: dict[str, Any]) -> None:
    """Raise :class:`ModelLoadError` when ``name`` holds the weights of a GRFT-wrapped model (transformers would
    leave every targeted layer at its random initialisation and report it only in a load table)."""
    wrapped = sorted(key for key in loading.get("unexpected_keys", ()) if is_adapter_tensor(key) or _WRAPPED.search(key))
    if wrapped:
        raise ModelLoadError(f"{name!r} holds the weights of a GRFT-wrapped model ({len(wrapped)} tensors such as "
                             f"{wrapped[0]!r}), so transformers would initialise every targeted layer at random. Save "
                             "merged models (grft_vision.merge_grft before save_pretrained, or GRFTTrainer.save_merged), "
                             "or load the adapter onto the base model (grft_vision.load_adapter / from_pretrained).")


def _quantized_loading(quantize: str | None, dtype: torch.dtype, device: str | torch.device) -> dict[str, Any]:
    """``from_pretrained`` keywords that quantize the body's linear layers while loading (none for ``None``)."""
    if quantize is None:
        return {}
    if quantize not in QUANT_TYPES:
        raise ConfigError(f"quantize={quantize!r} is not a bitsandbytes format GRFT supports; use one of "
                          f"{', '.join(QUANT_TYPES)}.")
    import_optional("bitsandbytes", f"quantize={quantize!r}")
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        settings = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(_HEADS))
    else:
        settings = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=dtype,
                                      bnb_4bit_use_double_quant=True, llm_int8_skip_modules=list(_HEADS))
    return {"quantization_config": settings, "device_map": {"": torch.device(device)}}


def load_classifier(name: str, num_classes: int, tokenizer: Any, *, pretrained: bool = True,
                    dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                    progress: bool = True, quantize: str | None = None, device: str | torch.device = "cpu"
                    ) -> nn.Module:
    """``AutoModelForSequenceClassification`` of ``name`` with a fresh ``num_classes`` head (seeded by the caller).

    Args:
        name: Hugging Face model id or local folder.
        num_classes: outputs of the new head.
        tokenizer: its pad token id becomes the model's ``pad_token_id``.
        pretrained: load the weights; False initialises the architecture of ``name`` randomly.
        dtype: weight dtype of the body (the head stays fp32).
        gradient_checkpointing: see :func:`enable_gradient_checkpointing`.
        progress: show transformers' loading progress bar.
        quantize: ``"nf4"``, ``"fp4"`` or ``"int8"``: the body's linear layers in 4 / 8 bits (bitsandbytes,
            QLoRA-style; double-quantized 4-bit blocks computing in ``dtype``), the head in fp32. Pre-trained
            weights are quantized by transformers while loading (onto ``device``); a random base is built in
            full precision and converted (:func:`grft_vision.tuner.quantized.quantize_model`).
        device: where a quantized model is loaded (bitsandbytes places its layers when quantizing).

    Raises:
        ModelLoadError: the model cannot be found or loaded (the message says how to use a local copy), or the
            folder holds the weights of a GRFT-wrapped model (saved without merging).
    """
    import_optional("transformers", "loading a language model")
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    _check_source(name)
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(name, num_labels=num_classes, pad_token_id=tokenizer.pad_token_id)
        if pretrained:
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                name, config=config, dtype=dtype, output_loading_info=True,
                **_quantized_loading(quantize, dtype, device))
            _refuse_wrapped_weights(name, loading)
        else:
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
            if quantize is not None:
                quantize_model(model.to(device), quantize, compute_dtype=dtype)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"could not load {name!r} as a sequence classifier ({type(error).__name__}: "
                             f"{error}). {_load_hint(name)}") from error
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    keep_head_float32(model, head_module_names(model))
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model
