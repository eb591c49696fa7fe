"""What trains in a benchmark's method: the parameters that require grad, Adam over them, and the linears of a
timm ViT that LoRA (and the other PEFT adapters of the vision benchmarks) target."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from grft_vision.tuner.anatomy import head_module_names

__all__ = ["VIT_LORA_TARGETS", "trainable_parameters", "adam", "inside", "vit_lora_targets"]

# the last name part of the linears LoRA adapts in a timm ViT block: attention qkv / proj, MLP fc1 / fc2
VIT_LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that require grad, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def adam(model: nn.Module, lr: float) -> torch.optim.Adam:
    """``torch.optim.Adam`` over the parameters of ``model`` that require grad."""
    return torch.optim.Adam(trainable_parameters(model), lr=lr)


def inside(name: str, modules: Sequence[str]) -> bool:
    """Whether the module or parameter ``name`` is one of ``modules`` or inside one of them."""
    return any(name == module or name.startswith(module + ".") for module in modules)


def vit_lora_targets(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules named :data:`VIT_LORA_TARGETS` outside the classification head."""
    heads = head_module_names(model)
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in VIT_LORA_TARGETS
            and not inside(name, heads)]
