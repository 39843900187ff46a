"""The one training sampler of both loops: which items each (step, micro-batch, data-parallel rank) reads.

Sample positions form one stream: step s, data-parallel rank r, micro-batch j, row k read position
s*G + r*(G/R) + j*m + k  (G sequences per step, R ranks, m rows per micro-batch). Position p falls
in epoch p // N of the N items; each epoch has its own seeded permutation and may have its own dataset (e.g. a new
masking seed), so what a rank reads depends only on (seed, step, micro-batch, rank): resume is exact at any step,
and 1 rank x 2 micro-batches reads what 2 ranks x 1 micro-batch read.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset


def stack(items: list[dict]) -> dict[str, np.ndarray]:
    """Items {key: array} -> a batch {key: the arrays stacked}."""
    return {key: np.stack([np.asarray(item[key]) for item in items]) for key in items[0]}


def epochs_of(dataset: Dataset) -> Callable[[int], Dataset]:
    """epoch -> the dataset that epoch reads: its `for_epoch(epoch)` where it has one (a masked-LM dataset masks each
    epoch afresh), else the dataset itself."""
    return getattr(dataset, "for_epoch", None) or (lambda epoch: dataset)


class MicroBatches:
    def __init__(self, make_dataset: Callable[[int], Dataset], *, seed: int, global_batch: int, micro_batch: int,
                 dp_size: int, dp_rank: int, shuffle: bool):
        self.make_dataset = make_dataset  # epoch -> dataset (the same length every epoch)
        self.seed, self.shuffle = seed, shuffle
        self.global_batch, self.micro_batch, self.dp_size, self.dp_rank = global_batch, micro_batch, dp_size, dp_rank
        self.num_microbatches = global_batch // (micro_batch * dp_size)
        self._epochs: dict[int, tuple[Dataset, np.ndarray]] = {}
        self.num_items = len(self._epoch(0)[0])
        if self.num_items == 0:
            raise ValueError("the dataset has no items")

    def _epoch(self, epoch: int) -> tuple[Dataset, np.ndarray]:
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # a step spans at most two epochs
                del self._epochs[min(self._epochs)]
            dataset = self.make_dataset(epoch)
            n = len(dataset)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=generator).numpy() if self.shuffle else np.arange(n)
            self._epochs[epoch] = (dataset, order)
        return self._epochs[epoch]

    def positions(self, step: int, microbatch: int) -> np.ndarray:
        start = (step * self.global_batch + self.dp_rank * self.micro_batch * self.num_microbatches
                 + microbatch * self.micro_batch)
        return np.arange(start, start + self.micro_batch)

    def microbatch(self, step: int, microbatch: int) -> dict[str, np.ndarray]:
        """The micro-batch's items stacked: {key: array of micro_batch rows}."""
        items = []
        for position in self.positions(step, microbatch):
            epoch, offset = divmod(int(position), self.num_items)
            dataset, order = self._epoch(epoch)
            items.append(dataset[int(order[offset])])
        return stack(items)

    def step(self, step: int) -> list[dict[str, np.ndarray]]:
        return [self.microbatch(step, j) for j in range(self.num_microbatches)]
