"""How the shared training loop reads token batches (:class:`grft_vision.training.trainer.Batches`)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..training.trainer import Batches
from .features import MODEL_INPUTS

__all__ = ["TokenBatches"]


class TokenBatches(Batches):
    """Dict batches of :class:`grft_vision.llm.data.PadCollate`; the model returns ``.logits`` ``[B, classes]``."""

    def split(self, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        inputs = {key: batch[key].to(device, non_blocking=True) for key in MODEL_INPUTS if key in batch}
        return inputs, batch["labels"].to(device, non_blocking=True)

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        output: Any = model(**inputs)
        return output.logits
