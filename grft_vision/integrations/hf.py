"""GRFT in ``transformers.Trainer``: :class:`GRFTTrainer`, a ``Trainer`` for a model wrapped by ``apply_grft``.

What it changes, and why a callback cannot (a ``TrainerCallback`` neither writes the checkpoint's weights nor
touches the loss):

- checkpoints (``checkpoint-N/``, ``save_model``) hold the adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``, :func:`grft_vision.save_pretrained`) and the model's ``config.json`` instead
  of the frozen backbone; resuming (``train(resume_from_checkpoint=...)``) and ``load_best_model_at_end``
  load it back with :func:`grft_vision.from_pretrained` (validated, fingerprint-checked, values copied into
  the same parameters, so the optimizer state stays valid);
- the loss is the task loss plus the L2-to-pretrained regulariser (:class:`grft_vision.L2ToPretrained`),
  scaled for gradient accumulation as the Trainer scales the loss;
- :meth:`GRFTTrainer.save_merged` folds the adapter in and writes a plain model that
  ``from_pretrained`` loads strictly. Never ``save_pretrained`` the wrapped model itself: its weights sit
  under wrapper keys that ``from_pretrained`` does not know, and it would initialise every targeted layer
  at random (:func:`grft_vision.llm.load_classifier` refuses such a folder).

``python -m grft_vision.export checkpoint-N --out merged/`` merges any checkpoint it wrote.
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..io.adapters import CONFIG_NAME, from_pretrained, save_pretrained
from ..errors import AdapterError, ConfigError
from ..extras import import_optional
from ..tuner.anatomy import is_grft_model
from ..tuner.layer import own_class
from ..tuner.model import merge_grft
from ..tuner.regularization import L2ToPretrained
from ..tuner.state import DEFAULT_ADAPTER, grft_state

transformers = import_optional("transformers", "grft_vision.integrations.hf")

__all__ = ["GRFTTrainer"]

_TRAINING_ARGS_NAME = "training_args.bin"  # as transformers.trainer names it


def _class_name(model: nn.Module) -> str:
    """The model's own class name (not the class grft_vision.tuner.owned derives from it)."""
    return own_class(model).__name__


@contextmanager
def _adapter_attached(model: nn.Module | None) -> Iterator[None]:
    """Within the context, a bitsandbytes-quantized model says it has an adapter attached.

    The Trainer refuses to fine-tune a quantized model unless transformers' own PEFT integration loaded an
    adapter (its ``_hf_peft_config_loaded`` flag), because otherwise nothing trainable sits on top of the frozen
    quantized weights. A GRFT model has its updates there; the flag is set only while the Trainer checks it.
    """
    marked = model is not None and getattr(model, "is_quantized", False) and is_grft_model(model) \
        and not getattr(model, "_hf_peft_config_loaded", False)
    if marked:
        model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        if marked:
            model._hf_peft_config_loaded = False


class GRFTTrainer(transformers.Trainer):
    """``transformers.Trainer`` for a GRFT model (see the module docstring).

    Args:
        *args, **kwargs: those of ``Trainer``; ``model`` must be wrapped by :func:`grft_vision.apply_grft`.
        regularizer: the penalty added to the training loss: True (default) ``L2ToPretrained(model, config)`` with
            the active adapter's config (``reg_lambda``, ``reg_blocks``), False none, or your own callable.

    Raises:
        AdapterError: the model is not a GRFT model.
        ConfigError: DeepSpeed or Accelerate's FSDP is enabled (they shard and save the whole model; use
            ``train_glue.py --fsdp`` for sharded GRFT training).
    """

    def __init__(self, *args: Any, regularizer: L2ToPretrained | bool = True, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        with _adapter_attached(model):
            super().__init__(*args, **kwargs)
        state = grft_state(self.model)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ConfigError("GRFTTrainer saves and loads the adapter only, which DeepSpeed and Accelerate's FSDP do "
                              "not support; train without them, or shard with train_glue.py --fsdp.")
        if isinstance(regularizer, bool):
            regularizer = L2ToPretrained(self.model, state.config) if regularizer else None
        self.regularizer = regularizer

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """The Trainer's loss plus the regulariser (training only), scaled as the Trainer scales the loss."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and self.regularizer is not None and self.regularizer.enabled:
            penalty = self.regularizer().to(loss.device)
            if self._loss_is_scaled_for_accumulation(num_items_in_batch):  # the Trainer will not divide it
                penalty = penalty / self.current_gradient_accumulation_steps
            loss = loss + penalty
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_accumulation(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        """The rule of ``Trainer.training_step`` for whether it divides the loss by the accumulation steps."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    # ------------------------------------------------------------------ saving and loading
    def _grft_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter (every adapter of the model) and ``config.json``, not the backbone; tokenizer and training
        arguments as the Trainer saves them."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self._grft_model()
        save_pretrained(model, output_dir)
        config = getattr(model, "config", None)
        if config is not None:  # which model the adapter belongs to (python -m grft_vision.export reads it)
            config = copy.deepcopy(config)
            config.architectures = [_class_name(model)]
            config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, _TRAINING_ARGS_NAME))

    def _load_adapter(self, checkpoint: str | os.PathLike, model: nn.Module | None = None) -> None:
        model = model if model is not None else self._grft_model()
        from_pretrained(model, checkpoint, adapter_name=grft_state(model).active or DEFAULT_ADAPTER)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume: the active adapter of ``checkpoint-N/`` into the model (optimizer, scheduler, RNG: the Trainer)."""
        self._load_adapter(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        self._load_adapter(self.state.best_model_checkpoint)

    # ------------------------------------------------------------------ the end
    def save_merged(self, output_dir: str | os.PathLike | None = None) -> nn.Module:
        """Fold the active adapter into the weights and write the plain model with ``save_pretrained`` (and the
        tokenizer) to ``output_dir`` (default ``args.output_dir``): a folder ``from_pretrained`` loads strictly.

        The trainer's model becomes that plain model (:func:`grft_vision.merge_grft`), so call this once training
        is over; returns it.

        Raises:
            AdapterError: the model has no active adapter, or ``output_dir`` holds an adapter (``save_model`` or a
                checkpoint wrote it): ``from_pretrained`` would read it as a PEFT adapter, not the merged model.
        """
        model = self._grft_model()
        if grft_state(model).active is None:
            raise AdapterError("the model has no active adapter to merge; call grft_vision.set_adapter(model, name).")
        output_dir = str(output_dir if output_dir is not None else self.args.output_dir)
        if (Path(output_dir) / CONFIG_NAME).exists():
            raise AdapterError(f"{output_dir!r} holds an adapter ({CONFIG_NAME}, written by save_model or a checkpoint), "
                               "which from_pretrained would load as a PEFT adapter instead of the merged model; save "
                               "the merged model to another folder (trainer.save_merged('out/merged')).")
        merge_grft(model)
        if self.args.should_save:
            model.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        return model
