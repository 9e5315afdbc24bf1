"""SeededSamples: a sample's random transform runs under its own seed and leaves the training RNG alone.

Machine: exact. Seeded draws of torch, random and numpy, and restored RNG states.
"""

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from brpg.engine.batches import SeededSamples


class _Draws(Dataset):
    """A 'transform' that draws from all three RNGs the real transforms may use."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[float, float, float, int]:
        return (torch.rand(()).item(), random.random(), float(np.random.rand()), index)


def _reference(index: int, seed: int) -> tuple[float, float, float, int]:
    # The contract written out by hand: global seeding of torch, python and numpy.
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    return _Draws()[index]


def test_sample_equals_globally_seeded_draws():
    # Fails if the seed goes to a generator the transforms do not draw from (e.g. a fresh
    # torch.Generator), or if one of the three RNGs is left unseeded.
    wrapped = SeededSamples(_Draws())
    for index, seed in [(0, 0), (3, 12345), (1, 2**33 + 7)]:
        assert wrapped[(index, seed)] == _reference(index, seed)
    assert wrapped[(0, 1)] != wrapped[(0, 2)]  # the seed reaches the transform


def test_global_rng_states_are_restored():
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    SeededSamples(_Draws())[(2, 5)]
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
