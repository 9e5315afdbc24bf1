"""Batched k-means for the one-shot prototype clustering (spec §5.4, §13 "one-time clustering").

The official code runs sklearn ``MiniBatchKMeans(n_clusters=k, random_state=0)`` on the CPU
once per class and per memory (high / low): Euclidean k-means on the raw 256-d features,
k-means++ initialisation. Here all ``B = C`` memories of one kind are clustered at once on the
device: ``x[B, N, D]`` with a ``valid[B, N]`` mask for padding rows and a per-row cluster count
``k[B]`` (APO gives some classes one more cluster, spec §6).

Algorithm (per row, all rows in parallel):

1. greedy k-means++ seeding: the first centre is a uniformly random valid point; each next one
   is the best (lowest potential) of ``2 + ⌊ln k⌋`` candidates drawn with probability
   ∝ squared distance to the nearest centre so far;
2. full-batch Lloyd iterations (assign to the nearest centre, move each centre to its mean);
   a cluster left empty takes the valid point farthest from its own centre (the e-th empty
   cluster of a row takes the e-th farthest point);
3. stop after ``iters`` iterations or once no assignment changes.

Deviation (accepted in spec §13): full-batch Lloyd instead of sklearn's mini-batch updates
(batch 100, n_init 3), so centres differ numerically from the official ones; on the same data
the inertia is as good or better.

Rows with fewer valid points than ``k``: only ``min(k, n_valid)`` centres are valid (each is a
distinct point at seeding time); the others are marked invalid in ``center_valid`` and, like
every centre beyond a row's ``k``, set equal to the row's first centre. Duplicate points are
allowed and may give duplicate (valid) centres. A row with no valid point has no valid centre
(its centres are zero). Invalid points get ``assign = -1``.

This runs once per training run, so a few host syncs (the ``k.max()`` and the convergence
check) are fine here; the per-step code lives in :mod:`brpg.prototypes.bank`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["KMeansResult", "batched_kmeans", "batched_kmeans_full"]


class KMeansResult(NamedTuple):
    """Output of :func:`batched_kmeans_full`."""

    centers: Tensor  # [B, k_max, D]
    assign: Tensor  # [B, N] long, -1 for invalid points
    center_valid: Tensor  # [B, k_max] bool
    inertia: Tensor  # [B] sum over valid points of the squared distance to their centre


def _sq_dist(x_bnd: Tensor, c_bkd: Tensor, x2_bn1: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances ``[B, N, k]`` via ``|x|² − 2 x·c + |c|²`` (clamped at 0)."""
    if x2_bn1 is None:
        x2_bn1 = (x_bnd * x_bnd).sum(-1, keepdim=True)
    c2_b1k = (c_bkd * c_bkd).sum(-1).unsqueeze(1)
    return (x2_bn1 - 2.0 * torch.bmm(x_bnd, c_bkd.transpose(1, 2)) + c2_b1k).clamp_min_(0.0)


def _gather_points(x_bnd: Tensor, idx_bj: Tensor) -> Tensor:
    """``x[b, idx[b, j]]`` → ``[B, J, D]``."""
    return x_bnd.gather(1, idx_bj.unsqueeze(-1).expand(-1, -1, x_bnd.shape[2]))


def _kmeanspp(
    x_bnd: Tensor, valid_bn: Tensor, k_max: int, gen: torch.Generator, n_trials: int
) -> Tensor:
    """Greedy k-means++ seeding of ``k_max`` centres per row, ``[B, k_max, D]``.

    Sampling ∝ d² is done with the exponential-race trick ``argmax(d² / E)``, ``E ~ Exp(1)``,
    which needs no per-row normalisation and tolerates rows whose d² are all zero.
    """
    b, n, _ = x_bnd.shape
    dev = x_bnd.device
    neg = -1.0
    u_bn = torch.rand(b, n, generator=gen, device=dev)
    first_b1 = torch.where(valid_bn, u_bn, neg).argmax(1, keepdim=True)
    centres = [_gather_points(x_bnd, first_b1)]
    d2_bn = _sq_dist(x_bnd, centres[0]).squeeze(2)
    for _ in range(1, k_max):
        e_btn = torch.empty(b, n_trials, n, device=dev).exponential_(generator=gen)
        e_btn.clamp_min_(1e-20)
        score_btn = torch.where(valid_bn[:, None], d2_bn[:, None] / e_btn, neg)
        cand_bt = score_btn.argmax(2)  # [B, T]
        cand_btd = _gather_points(x_bnd, cand_bt)
        d2_cand_btn = torch.minimum(d2_bn[:, None], _sq_dist(x_bnd, cand_btd).transpose(1, 2))
        pot_bt = (d2_cand_btn * valid_bn[:, None]).sum(2)
        best_b = pot_bt.argmin(1)
        centres.append(_gather_points(cand_btd, best_b[:, None]))
        d2_bn = d2_cand_btn[torch.arange(b, device=dev), best_b]
    return torch.cat(centres, dim=1)


def _lloyd(
    x_bnd: Tensor, valid_bn: Tensor, c_bkd: Tensor, cvalid_bk: Tensor, iters: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd iterations with empty-cluster re-seeding; returns ``(centres, assign, d2_min)``."""
    n = x_bnd.shape[1]
    k = c_bkd.shape[1]
    inf = float("inf")
    x2_bn1 = (x_bnd * x_bnd).sum(-1, keepdim=True)
    ar_1k1 = torch.arange(k, device=x_bnd.device).view(1, k, 1)
    prev_bn = None
    for it in range(iters + 1):
        d2_bnk = torch.where(cvalid_bk[:, None, :], _sq_dist(x_bnd, c_bkd, x2_bn1), inf)
        d2_bn, assign_bn = d2_bnk.min(dim=2)
        if prev_bn is not None and torch.equal(assign_bn, prev_bn):
            break
        if it == iters:
            break
        prev_bn = assign_bn
        # Per-cluster sums as a one-hot matmul (k is small): [B, k, N] @ [B, N, D].
        onehot_bkn = ((assign_bn[:, None, :] == ar_1k1) & valid_bn[:, None, :]).to(x_bnd.dtype)
        sums_bkd = torch.bmm(onehot_bkn, x_bnd)
        counts_bk = onehot_bkn.sum(2)
        mean_bkd = sums_bkd / counts_bk.clamp_min(1.0).unsqueeze(-1)
        # Empty valid clusters: the e-th one takes the e-th farthest valid point of the row.
        empty_bk = (counts_bk == 0) & cvalid_bk
        rank_bk = (empty_bk.long().cumsum(1) - 1).clamp_min(0)
        far_bk = torch.where(valid_bn, d2_bn, -inf).topk(min(k, n), dim=1).indices
        far_bk = far_bk.gather(1, rank_bk.clamp_max(far_bk.shape[1] - 1))
        reseed_bkd = _gather_points(x_bnd, far_bk)
        c_bkd = torch.where(
            empty_bk.unsqueeze(-1),
            reseed_bkd,
            torch.where(counts_bk.unsqueeze(-1) > 0, mean_bkd, c_bkd),
        )
    return c_bkd, assign_bn, d2_bn


def batched_kmeans_full(
    x: Tensor,
    k: int | Tensor,
    valid: Tensor | None = None,
    iters: int = 100,
    seed: int = 0,
    n_init: int = 1,
) -> KMeansResult:
    """Batched Euclidean k-means with per-row ``k`` and a point mask (spec §5.4).

    Args:
        x: ``[B, N, D]`` points (raw features; computed in float32).
        k: clusters per row, an int or a LongTensor ``[B]``; ``k_max = max(k)``.
        valid: BoolTensor ``[B, N]``; False marks padding rows (default: all valid).
        iters: maximum Lloyd iterations (stops earlier once assignments are stable).
        seed: seeds a ``torch.Generator`` on ``x``'s device; same seed → same result.
        n_init: number of seedings; each row keeps its lowest-inertia run.

    Returns:
        :class:`KMeansResult` ``(centers[B, k_max, D], assign[B, N], center_valid[B, k_max],
        inertia[B])``; see the module docstring for rows with fewer points than ``k``.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D], got {tuple(x.shape)}")
    b, n, _ = x.shape
    dev = x.device
    x_bnd = x.detach().float()
    valid_bn = (
        torch.ones(b, n, dtype=torch.bool, device=dev) if valid is None else valid.to(dev).bool()
    )
    k_b = torch.as_tensor(k, device=dev).long().expand(b).clone()
    if bool((k_b < 1).any()):
        raise ValueError("k must be ≥ 1")
    k_max = int(k_b.max())
    k_eff_b = torch.minimum(k_b, valid_bn.sum(1))
    cvalid_bk = torch.arange(k_max, device=dev)[None, :] < k_eff_b[:, None]
    gen = torch.Generator(device=dev).manual_seed(seed)
    n_trials = 2 + int(math.log(k_max))

    best = None
    for _ in range(max(1, n_init)):
        c_bkd = _kmeanspp(x_bnd, valid_bn, k_max, gen, n_trials)
        c_bkd, assign_bn, d2_bn = _lloyd(x_bnd, valid_bn, c_bkd, cvalid_bk, iters)
        inertia_b = torch.where(valid_bn, d2_bn, torch.zeros_like(d2_bn)).sum(1)
        if best is None:
            best = (c_bkd, assign_bn, inertia_b)
        else:
            better_b = inertia_b < best[2]
            best = (
                torch.where(better_b[:, None, None], c_bkd, best[0]),
                torch.where(better_b[:, None], assign_bn, best[1]),
                torch.where(better_b, inertia_b, best[2]),
            )
    c_bkd, assign_bn, inertia_b = best
    has_point_b1 = valid_bn.any(1, keepdim=True)
    c_bkd = torch.where(cvalid_bk.unsqueeze(-1), c_bkd, c_bkd[:, :1])
    c_bkd = c_bkd * has_point_b1.unsqueeze(-1)
    assign_bn = torch.where(valid_bn, assign_bn, torch.full_like(assign_bn, -1))
    return KMeansResult(c_bkd, assign_bn, cvalid_bk, inertia_b)


def batched_kmeans(
    x: Tensor,
    k: int | Tensor,
    valid: Tensor | None = None,
    iters: int = 100,
    seed: int = 0,
    n_init: int = 1,
) -> tuple[Tensor, Tensor]:
    """``(centers[B, k_max, D], assign[B, N])`` of :func:`batched_kmeans_full`."""
    res = batched_kmeans_full(x, k, valid=valid, iters=iters, seed=seed, n_init=n_init)
    return res.centers, res.assign
