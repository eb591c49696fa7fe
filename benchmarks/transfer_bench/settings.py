"""What sizes the transfer benchmark (:class:`Settings`, the presets :data:`FULL` and :data:`QUICK`) and the
fine-tuning hyper-parameters chosen once with ``--tune`` (:data:`DEFAULT_LR`, :data:`DEFAULT_REG_LAMBDA`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .data import TARGETS

__all__ = ["PRETRAIN_VERSION", "DEFAULT_LR", "DEFAULT_REG_LAMBDA", "Settings", "FULL", "QUICK"]

PRETRAIN_VERSION = 2  # bump when the source data or the pre-training recipe changes (invalidates the cache)

# Learning rate per method family and the L2 lambda of GRFT, chosen once with ``--tune`` on validation
# splits carved from the target training sets (train[:80%] -> val[80%:], seed 0, never the test split);
# the grids and the validation accuracies are in docs/results.md.
DEFAULT_LR = {"head": 1e-1, "full": 3e-3, "grft": 3e-2, "lora": 1e-2}
DEFAULT_REG_LAMBDA = 1e-4


@dataclass
class Settings:
    """Everything that sizes the benchmark; :data:`FULL` and :data:`QUICK` are the two presets."""

    # model: a timm ViT (vit_tiny_patch16_224's architecture, resized)
    img_size: int = 32
    patch_size: int = 8
    embed_dim: int = 64
    depth: int = 6
    num_heads: int = 4
    # source task / pre-training
    source_images: int = 48000
    source_val_images: int = 2000
    pretrain_epochs: int = 10
    pretrain_batch_size: int = 64
    pretrain_lr: float = 3e-3
    pretrain_weight_decay: float = 0.05
    pretrain_seed: int = 0
    # targets / fine-tuning
    targets: tuple[str, ...] = TARGETS
    num_train: int = 500
    num_test: int | None = None  # None: 1000 (digits: the rest of the 1,797 images)
    data_seed: int = 0
    epochs: int = 15  # cosine epochs, after the warm-up
    warmup_epochs: int = 2
    batch_size: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    num_subsets: int = 4  # the n > 1 variant of the lowest-loss subset
    methods: tuple[str, ...] | None = None  # None: DEFAULT_METHODS
    device: str = "cpu"  # where pre-training and fine-tuning run ("cuda" on a GPU machine)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Settings":
        tuples = {k: tuple(v) for k, v in values.items() if k in ("targets", "seeds", "methods") and v is not None}
        return cls(**{**values, **tuples})

    def pretrain_key(self, workers: int = 1) -> str:
        """Cache key of the pre-trained weights: every setting that changes them, and the process count."""
        fields = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "source_images", "source_val_images",
                  "pretrain_epochs", "pretrain_batch_size", "pretrain_lr", "pretrain_weight_decay", "pretrain_seed",
                  "device")
        payload = json.dumps({"version": PRETRAIN_VERSION, "workers": workers,
                              **{f: getattr(self, f) for f in fields}}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:16]


FULL = Settings()
QUICK = Settings(embed_dim=32, depth=2, num_heads=2, source_images=1024, source_val_images=256, pretrain_epochs=1,
                 targets=("digits", "count"), num_train=64, num_test=64, epochs=1, warmup_epochs=1, seeds=(0, 1),
                 num_subsets=2)

