"""The lowest-loss data subset (GRFT §4.4.6): split the training set into n random subsets, keep the one
whose selection loss is smallest, and compute the selection gradient on it alone.

Subsets are a seeded random partition of the dataset indices (n = 1: the whole set). Every subset is
read through a fresh ``DataLoader`` with the original loader's batch size, collate function and workers,
in a fixed seeded order, and every item is drawn with the random generators seeded from the seed and its
index (:class:`SeededItems`), so that the batches, random augmentations included, depend only on the seed
and the data: not on the number of workers, and the gradient pass over the chosen subset sees exactly the
batches whose loss was measured.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..errors import SelectionError

__all__ = ["split_subsets", "subset_loader", "mean_subset_loss", "SeededItems"]


class SeededItems(Dataset):
    """``dataset[i]`` drawn with torch's, Python's and NumPy's global generators seeded from ``(seed, i)``.

    The generators' states are restored afterwards, so reading an item consumes no randomness of the
    caller; whichever process or worker reads item ``i``, and however often, it gets the same augmentation.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        high, low = np.random.SeedSequence([self.seed, int(index)]).generate_state(2)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(high) << 32 | int(low))  # the CPU generator transforms use
            random.seed(int(high) << 32 | int(low))
            np.random.seed(int(low))
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


def split_subsets(num_items: int, num_subsets: int, seed: int) -> list[torch.Tensor]:
    """A seeded random partition of ``range(num_items)`` into ``num_subsets`` near-equal parts (int64)."""
    if not 1 <= num_subsets <= num_items:
        raise SelectionError(f"num_subsets={num_subsets} must be between 1 and the dataset size ({num_items}).")
    if num_subsets == 1:
        return [torch.arange(num_items)]
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    return list(order.tensor_split(num_subsets))


def subset_loader(loader: DataLoader, indices: torch.Tensor, seed: int, batch_size: int | None = None) -> DataLoader:
    """A loader over ``indices`` of ``loader.dataset`` in a seeded random order, with its batching and workers.

    Items are read through :class:`SeededItems` with ``seed``, so the batches do not depend on the workers.
    """
    batch_size = batch_size or loader.batch_size
    if batch_size is None:
        raise SelectionError("the data loader uses a custom batch sampler; set selection_batch_size.")
    generator = torch.Generator().manual_seed(seed)
    order = indices[torch.randperm(len(indices), generator=generator)]
    return DataLoader(  # a fixed shuffled order: every pass over the loader sees the same batches
        Subset(SeededItems(loader.dataset, seed), order.tolist()),
        batch_size=batch_size,
        shuffle=False,
        generator=generator,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
    )


@torch.no_grad()
def mean_subset_loss(model: nn.Module, batches: Iterable[Any],
                     batch_loss: Callable[[nn.Module, Any, int], torch.Tensor], description: str,
                     progress: bool = True) -> float:
    """Mean of the per-batch selection losses over one subset, without gradients."""
    total, count = 0.0, 0
    for index, batch in enumerate(tqdm(batches, desc=description, leave=False, disable=not progress)):
        total += float(batch_loss(model, batch, index))
        count += 1
    if count == 0:
        raise SelectionError("a selection subset yielded no batch; use fewer subsets or a smaller batch size.")
    return total / count
