"""Making the labeled set as long as the unlabeled set (appendix: data).

The official builder repeats the labeled list ``ceil(n / len)`` times and draws ``n`` entries
from it without replacement (``random.sample``), so each labeled image appears
``floor(n / len)`` or ``ceil(n / len)`` times (or fewer when ``n`` is not a multiple of
``len``); one "epoch" is then one pass over the unlabeled set. Here the draw uses a numpy
``Generator`` seeded by ``seed`` instead of Python's global ``random``.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Dataset, Subset


def oversample_indices(n_items: int, target_len: int, seed: int) -> list[int]:
    """``target_len`` indices into ``range(n_items)``, drawn from the list repeated
    ``ceil(target_len / n_items)`` times without replacement (appendix: data).

    When ``target_len`` is a multiple of ``n_items`` every item appears exactly
    ``target_len / n_items`` times; in general no item appears more than ``ceil`` times.
    ``target_len < n_items`` gives a random subset (the Cityscapes 1488 quirk of the appendix
    (data)).
    """
    if n_items <= 0:
        raise ValueError(f"cannot oversample an empty list (n_items={n_items})")
    if target_len < 0:
        raise ValueError(f"target_len must be >= 0, got {target_len}")
    repeats = max(1, math.ceil(target_len / n_items))
    pool = np.tile(np.arange(n_items), repeats)  # [repeats * n_items]
    rng = np.random.default_rng(seed)
    picked = rng.choice(pool.size, size=target_len, replace=False)
    return pool[picked].tolist()


def oversample(dataset: Dataset, target_len: int, seed: int) -> Subset:
    """``dataset`` resampled to length ``target_len`` with :func:`oversample_indices`."""
    return Subset(dataset, oversample_indices(len(dataset), target_len, seed))  # type: ignore[arg-type]
