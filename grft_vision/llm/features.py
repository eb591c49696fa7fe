"""Selection features of token batches: the pooled final hidden state of each sequence.

The selection loss (SupCon, :mod:`grft_vision.selection`) needs one vector per example, as the ViT's
pre-logits are on the vision side. For a language model that is the final hidden state (after the final
norm: the base model's ``last_hidden_state``, exactly what the classification head reads) of

- the last non-padding token for causal LMs (left or right padding: the rightmost attended position), or
- the first token for encoders ([CLS]).

The head is not in the graph. SupCon is undefined on a batch with a single class or without two examples
of a class; such a batch — frequent with GLUE's class imbalance (CoLA is 70 % "acceptable") — is
completed with training examples of the missing class, drawn deterministically from the batch's content, so
that every pass over a batch (subset losses, then the gradient pass) sees the same examples.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["last_token_index", "pool_hidden_states", "final_hidden_state", "TokenFeatures", "MODEL_INPUTS"]

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last attended token of every row ``[B]``, for left or right padding."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(-1)


def pool_hidden_states(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[B, L, D]`` hidden states -> ``[B, D]``: the last non-padding (``last``) or the first (``first``) token."""
    if pooling == "first":
        return hidden[:, 0]
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    raise ValueError(f"pooling={pooling!r} must be 'first' or 'last'.")


def final_hidden_state(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, L, D]`` final hidden states of a Hugging Face classifier's body (after its final norm)."""
    return model.base_model(**inputs, return_dict=True).last_hidden_state


class TokenFeatures:
    """:class:`~grft_vision.selection.BatchFeatures` of token batches (``grft_vision.llm.data.PadCollate``).

    Args:
        pooling: ``last`` or ``first`` (:func:`grft_vision.llm.modeling.resolve_pooling`).
        views: 1, or 2 (each sequence twice, as two dropout views — SimCSE's augmentation of text).
        dataset: the tokenised training set, to complete batches SupCon cannot use (None: never).
        collate: the collate function that made the batches (to rebuild a completed one).
        seed: seed of the completion draws.
    """

    def __init__(self, pooling: str, views: int = 1, dataset: Any = None,
                 collate: Callable[[Sequence[dict]], dict] | None = None, seed: int = 0) -> None:
        if views not in (1, 2):
            raise ValueError(f"views={views!r} must be 1 or 2.")
        self.pooling, self.views, self.dataset, self.collate, self.seed = pooling, views, dataset, collate, seed
        self._by_class: dict[int, list[int]] | None = None

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.complete(batch)
        inputs = {key: batch[key].to(device, non_blocking=True) for key in MODEL_INPUTS if key in batch}
        labels = batch["labels"].to(device, non_blocking=True)
        if self.views == 2:
            inputs = {key: value.repeat_interleave(2, dim=0) for key, value in inputs.items()}
            labels = labels.repeat_interleave(2)
        hidden = final_hidden_state(model, inputs)
        return pool_hidden_states(hidden, inputs["attention_mask"], self.pooling), labels

    def complete(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch, or the batch plus training examples so that SupCon is defined on it (see module doc)."""
        if self.dataset is None or self.collate is None or "index" not in batch:
            return batch
        labels = batch["labels"].tolist()
        counts = {label: labels.count(label) for label in set(labels)}
        has_pair = self.views == 2 or max(counts.values()) >= 2
        if len(counts) >= 2 and has_pair:
            return batch
        indices = batch["index"].tolist()
        draw = random.Random(f"{self.seed}:{indices}")
        pool = self._examples_by_class()
        extra: list[int] = []
        if len(counts) < 2:  # one class: add examples of another class (two, so they pair with each other)
            others = sorted(label for label in pool if label not in counts)
            if not others:
                return batch
            label = draw.choice(others)
            extra = draw.sample(pool[label], min(len(pool[label]), 1 if self.views == 2 else 2))
        else:  # no class twice: add another example of the first example's class
            candidates = [i for i in pool[labels[0]] if i not in set(indices)]
            extra = [draw.choice(candidates)] if candidates else []
        if not extra:
            return batch
        return self.collate([self.dataset[i] for i in [*indices, *extra]])

    def _examples_by_class(self) -> dict[int, list[int]]:
        if self._by_class is None:
            self._by_class = {}
            for index, label in enumerate(self.dataset.labels):
                self._by_class.setdefault(int(label), []).append(index)
        return self._by_class
