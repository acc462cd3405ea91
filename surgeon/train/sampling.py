"""Samplers and per-sample seeding that make training data a function of (seed, epoch, index) alone.

Random augmentation normally draws from whichever worker process loads a sample, and persistent workers keep
their streams across epochs, so a resumed run (fresh workers) or a different number of workers or ranks sees
other crops than the run it continues. Here every training sample is loaded under an RNG seeded from
``(seed, epoch, index)``, the sampler hands ``(epoch, index)`` pairs to the dataset, and the order of an epoch is
one seeded permutation shared by every rank (rank ``r`` takes positions ``r, r + world, ...``). So a global batch
of several ranks is the same set of samples, with the same augmentation, as one process with the whole batch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, epoch, index) over the seed space


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch."""
    value = (seed * _MIX + epoch) * _MIX + index
    return (value ^ (value >> 31)) & 0x7FFF_FFFF_FFFF_FFFF


class EpochSeededDataset(Dataset):
    """Loads ``dataset[index]`` for an ``(epoch, index)`` key under torch, Python and NumPy RNGs seeded from
    ``(seed, epoch, index)``; the caller's RNG states are restored afterwards (workers=0 runs in the trainer's
    own process)."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        import numpy as np

        epoch, index = key
        value = sample_seed(self.seed, epoch, index)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(value)
            random.seed(value)
            np.random.seed(value % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


class EpochPermutationSampler(Sampler):
    """This rank's share of one seeded permutation per epoch, as ``(epoch, index)`` keys.

    Every rank gets the same number of samples (the permutation is padded by wrapping around, as
    ``DistributedSampler`` does), so collective steps stay in lockstep."""

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        total = len(self) * self.world
        order = (order * (-(-total // self.size)))[:total]
        return iter([(self.epoch, index) for index in order[self.rank::self.world]])


class ShardSampler(Sampler):
    """Rank ``r`` of ``world`` takes indices ``r, r + world, ...`` with no padding: every validation image is
    counted exactly once when the per-rank counts are summed."""

    def __init__(self, size: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.rank, self.world = size, rank, world

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world))
