"""The one-shot clustering: APO + k-means of the CPG memories into the prototype bank (paper
§"CPG", §"APO"; appendix: clustering and APO, CPG).

At the end of the sampling window (and every ``proto.recluster_every`` steps after it, if set)
each memory kind is clustered per class with the batched k-means of :mod:`brpg.method.kmeans`:
``proto.memory = "cpg"`` clusters the high and the low memory separately (``num_high`` and
``num_low`` base prototypes); ``"random"`` (the CPG ablation of the appendix (CPG)) clusters its one
memory into ``num_high + num_low``. With ``proto.apo`` the most dispersed classes of every
memory get ``add_num`` more (:func:`brpg.method.apo.apo_counts`). Both modes go through
:func:`cluster_memory`, so the APO metric and the slot budgets are decided in one place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from brpg.config import Config, ProtoConfig
from brpg.method.apo import apo_counts, dispersion
from brpg.method.kmeans import KMeansResult, batched_kmeans_full
from brpg.method.memory import PrototypeMemory
from brpg.method.prototype_ema import pack_high_low

__all__ = ["cluster_memories", "cluster_memory", "cluster_prototypes", "slot_budgets"]


def _budget(base: int, add_num: int, apo: bool) -> int:
    """Slots of one memory kind in the bank: its base count, + ``add_num`` for APO's classes."""
    return base + (add_num if apo else 0)


def slot_budgets(p: ProtoConfig) -> tuple[int, int]:
    """``(K_h, K_l)``: slot budgets of the bank (``K_l = 0`` for the single random memory)."""
    if p.memory == "random":
        return _budget(p.num_high + p.num_low, p.add_num, p.apo), 0
    return _budget(p.num_high, p.add_num, p.apo), _budget(p.num_low, p.add_num, p.apo)


def cluster_memory(
    feats: Tensor,
    valid: Tensor | None,
    base: int,
    add_num: int = 1,
    proportion: float = 0.05,
    metric: str = "cos_sim",
    apo: bool = True,
    iters: int = 100,
    seed: int = 0,
    n_init: int = 3,
    subsample: int | None = None,
) -> tuple[KMeansResult, int]:
    """APO counts + k-means of one memory kind ``feats[C, N, D]`` (``valid[C, N]``): ``base``
    clusters per class, ``base + add_num`` for the classes APO finds most dispersed by
    ``metric`` (appendix: clustering and APO). Returns the k-means result and the kind's slot budget
    in the bank. ``n_init = 3`` seedings, as the official ``MiniBatchKMeans`` defaults; a memory
    with fewer rows than clusters gets fewer valid centres."""
    k_c = torch.full((feats.shape[0],), base, dtype=torch.long)
    if apo:
        k_c = apo_counts(dispersion(feats, valid, metric), base, proportion, add_num, metric)
    res = batched_kmeans_full(
        feats, k_c, valid=valid, iters=iters, seed=seed, n_init=n_init, subsample=subsample
    )
    return res, _budget(base, add_num, apo)


def cluster_memories(
    high: Tensor,
    high_valid: Tensor | None,
    low: Tensor,
    low_valid: Tensor | None,
    base_high: int = 2,
    base_low: int = 2,
    **settings: Any,
) -> tuple[Tensor, Tensor]:
    """APO + k-means on the high and low memories → bank layout ``(protos[C,K,D], valid[C,K])``.

    Each memory kind goes through :func:`cluster_memory` with the same ``settings`` (its APO
    and k-means keywords: ``add_num, proportion, metric, apo, iters, seed, n_init,
    subsample``; Euclidean k-means on raw features, all classes at once), then
    :func:`~brpg.method.prototype_ema.pack_high_low` packs them into ``K = K_h + K_l`` slots,
    ``K_h = base_high + add_num`` and ``K_l = base_low + add_num`` with APO, else the bases
    (appendix: clustering and APO).
    """
    hi, k_high = cluster_memory(high, high_valid, base_high, **settings)
    lo, k_low = cluster_memory(low, low_valid, base_low, **settings)
    return pack_high_low(hi.centers, lo.centers, hi.center_valid, lo.center_valid, k_high, k_low)


def cluster_prototypes(memory: PrototypeMemory, cfg: Config, seed: int) -> tuple[Tensor, Tensor]:
    """The clustering of a run's memories → ``(protos[C, K, D], valid[C, K])`` for the bank.

    ``proto.memory = "cpg"``: high and low memories separately (:func:`cluster_memories`);
    ``"random"``: the one memory into ``num_high + num_low`` clusters per class, every slot a
    "high" one. Same APO (metric included) and k-means settings for both.
    """
    p = cfg.proto
    kw = dict(add_num=p.add_num, proportion=p.add_proportion, metric=p.dispersion, apo=p.apo,
              iters=p.kmeans_iters, seed=seed, n_init=p.kmeans_n_init,
              subsample=p.kmeans_subsample or None)  # fmt: skip
    if p.memory == "cpg":
        return cluster_memories(
            *memory.get("high"), *memory.get("low"), base_high=p.num_high, base_low=p.num_low, **kw
        )
    res, k_all = cluster_memory(*memory.get("all"), p.num_high + p.num_low, **kw)
    return pack_high_low(
        res.centers, res.centers[:, :0], res.center_valid, res.center_valid[:, :0], k_all, 0
    )
