"""A deterministic, resumable stream of mini-batches.

Training is counted in steps, not epochs. The index stream of a dataset of ``n`` items is the
concatenation of one permutation per epoch, each drawn from ``(seed, epoch)``; rank ``r`` of
``world_size`` takes every ``world_size``-th position. Batch ``s`` of a rank is therefore a
pure function of ``(seed, s, rank)``: resuming at step ``k`` needs no saved loader state, and
a tiny labeled set (fewer items than a batch) simply spans an epoch boundary.

Each item also carries its own augmentation seed, so the random crops and scales do not depend
on where a run was resumed or on the number of loader workers (:class:`SeededSamples`). Pixel
values can still differ in the last float bit between worker counts, because a worker runs
torch with one thread; exact resume therefore assumes the same ``data.num_workers``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant for mixing seeds


def _mix(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * _MIX + p + 1) % (2**63 - 1)
    return h


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for steps ``start_step, start_step+1, ...``, lists of ``(index, sample_seed)``."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if n <= 0:
            raise ValueError("cannot sample batches from an empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.rank, self.world_size, self.shuffle = (
            start_step,
            rank,
            world_size,
            shuffle,
        )
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng(_mix(self.seed, epoch))
            self._perms[epoch] = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        return self._perms[epoch]

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        """The ``(index, sample_seed)`` pairs of this rank's batch at global step ``step``."""
        first = step * self.batch_size * self.world_size + self.rank
        positions = first + self.world_size * np.arange(self.batch_size)  # [bs]
        out = []
        for p in positions.tolist():
            epoch, i = divmod(p, self.n)
            out.append((int(self._perm(epoch)[i]), _mix(self.seed, 7919, p)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1

    def __len__(self) -> int:  # infinite stream; len() is the epoch length for progress displays
        return max(1, self.n // (self.batch_size * self.world_size))


class SeededSamples(Dataset):
    """Wraps a dataset so that ``ds[(index, seed)]`` runs its random transform under ``seed``.

    The global RNG states of python, numpy and torch are restored afterwards, so sampling
    leaves the training RNG (dropout, CutMix) untouched.
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, sample_seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            # CPU generator only: torch.manual_seed also seeds every accelerator backend,
            # and its lazy CUDA seeding formats a stack trace on each call (~0.16 ms, once
            # per sample); transforms draw from the CPU generator alone, so batches are equal.
            torch.default_generator.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % (2**32))
            try:
                return self.base[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def step_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[Any]:
    """An endless iterator of collated batches, batch ``s`` being the same on every resume."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, rank, world_size)  # type: ignore[arg-type]
    loader = DataLoader(
        SeededSamples(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # A private generator: creating the iterator must not consume the global torch RNG,
        # or a resumed run would see different dropout masks than a straight one.
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)
