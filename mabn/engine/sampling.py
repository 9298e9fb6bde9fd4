"""Deterministic data order and augmentation, so a run resumed mid-epoch sees exactly the
samples (and random crops) that the uninterrupted run would have seen."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler[int]):
    """This process's share of a per-epoch permutation seeded by (seed, epoch), in whole
    batches, optionally starting ``start_batch`` batches into the epoch (resume)."""

    def __init__(
        self,
        length: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ):
        self.length, self.batch_size, self.shuffle, self.seed = length, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        mine = order[self.rank :: self.world_size]
        if self.drop_last:
            per_rank = (self.length // self.world_size) // self.batch_size * self.batch_size
            mine = mine[:per_rank]
        return mine[self.start_batch * self.batch_size :]

    def batches_per_epoch(self) -> int:
        """Whole batches per epoch and process (``drop_last``: the training sampler)."""
        return (self.length // self.world_size) // self.batch_size

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


class SeededSamples(Dataset):
    """Runs ``dataset[i]`` with torch's RNG seeded by (seed, epoch, i), so random augmentation
    depends on the sample alone, not on worker processes or on where a run was resumed. A
    dataset that makes whole batches (``__getitems__``) gets one seed per batch, from its
    first index: batches are the sampler's, so a resumed run sees the same ones."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def _seed(self, index: int) -> None:
        torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            self._seed(index)
            return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list:
        if not callable(getattr(self.dataset, "__getitems__", None)):
            return [self[i] for i in indices]
        with torch.random.fork_rng(devices=[]):
            self._seed(indices[0])
            return self.dataset.__getitems__(indices)
