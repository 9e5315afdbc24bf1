"""Batched k-means for the one-shot prototype clustering (appendix: clustering and APO, cost
"one-time clustering").

The official code runs sklearn ``MiniBatchKMeans(n_clusters=k, random_state=0)`` on the CPU
once per class and per memory (high / low): Euclidean k-means on the raw 256-d features,
k-means++ initialisation. Here all ``B = C`` memories of one kind are clustered at once on the
device: ``x[B, N, D]`` with a ``valid[B, N]`` mask for padding rows and a per-row cluster count
``k[B]`` (APO gives some classes one more cluster, appendix: clustering and APO).

Algorithm (per row, all rows in parallel):

1. greedy k-means++ seeding: the first centre is a uniformly random valid point; each next one
   is the best (lowest potential) of ``2 + ⌊ln k⌋`` candidates drawn with probability
   ∝ squared distance to the nearest centre so far;
2. full-batch Lloyd iterations (assign to the nearest centre, move each centre to its mean);
   a cluster left empty takes the valid point farthest from its own centre (the e-th empty
   cluster of a row takes the e-th farthest point);
3. a row stops after ``iters`` iterations, once none of its assignments changes, or once the
   total squared shift of its centres in the last update is at most ``tol`` times the mean
   per-dimension variance of its valid points (scikit-learn's ``KMeans`` criterion; ``tol = 0``
   keeps only the first two). A stopped row is frozen: its centres and assignments are the
   ones of its stopping iteration (the assignments always belong to the returned centres),
   so every row's result is the same whether it is clustered alone or in a batch.

Deviation (accepted in the appendix (cost)): full-batch Lloyd instead of sklearn's mini-batch
updates (batch 100, n_init 3), so centres differ numerically from the official ones. The inertia is
close to sklearn's but not always lower. Benchmark P3 (``results/benchmarks/cpu.json``: 42
synthetic memories of 30,000 x 256 rows, Gaussian mixtures) measured the per-memory ratio ours /
``MiniBatchKMeans`` (``n_init=3``): median 0.99993 and the worst memory 0.74 % worse (1 of 42
worse) against sklearn's default batch size, median 0.99986 and none worse against the official
batch of 100.

Rows with fewer valid points than ``k``: only ``min(k, n_valid)`` centres are valid (each is a
distinct point at seeding time); the others are marked invalid in ``center_valid`` and, like
every centre beyond a row's ``k``, set equal to the row's first centre. Duplicate points are
allowed and may give duplicate (valid) centres. A row with no valid point has no valid centre
(its centres are zero). Invalid points get ``assign = -1``.

Cost (CPU). The Lloyd loop is memory-bound: each iteration reads ``x`` twice, once in the
distance matmul and once for the per-cluster sums (``index_add_`` on the CPU, about 2.5× faster
there than a one-hot ``bmm``; a one-hot ``bmm`` elsewhere, where it is fast and, unlike
``index_add_`` on CUDA, deterministic). ``|x|²`` is computed once per call and reused by the
seeding and every Lloyd iteration. Rows that have stopped are dropped from the working set
once at most half of it is still running (one copy of the running rows), so the slowest row
no longer keeps the whole batch iterating.

This runs once per training run, so a few host syncs (the ``k.max()``, and the stopping and
empty-cluster checks of every iteration) are fine here; the per-step code lives in
:mod:`brpg.method.prototype_ema`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["DEFAULT_TOL", "KMeansResult", "batched_kmeans_full"]

DEFAULT_TOL = 1e-4  # scikit-learn's KMeans default, relative to the mean per-dimension variance


class KMeansResult(NamedTuple):
    """Output of :func:`batched_kmeans_full`."""

    centers: Tensor  # [B, k_max, D]
    assign: Tensor  # [B, N] long, -1 for invalid points
    center_valid: Tensor  # [B, k_max] bool
    inertia: Tensor  # [B] sum over valid points of the squared distance to their centre


def _sq_norm(x_bnd: Tensor) -> Tensor:
    """``|x|²`` per point, ``[B, N, 1]`` (``vector_norm`` needs no ``[B, N, D]`` temporary)."""
    return torch.linalg.vector_norm(x_bnd, dim=-1, keepdim=True).square()


def _sq_dist(x_bnd: Tensor, c_bkd: Tensor, x2_bn1: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances ``[B, N, k]`` via ``|x|² − 2 x·c + |c|²`` (clamped at 0)."""
    if x2_bn1 is None:
        x2_bn1 = _sq_norm(x_bnd)
    c2_b1k = (c_bkd * c_bkd).sum(-1).unsqueeze(1)
    return (x2_bn1 - 2.0 * torch.bmm(x_bnd, c_bkd.transpose(1, 2)) + c2_b1k).clamp_min_(0.0)


def _gather_points(x_bnd: Tensor, idx_bj: Tensor) -> Tensor:
    """``x[b, idx[b, j]]`` → ``[B, J, D]``."""
    return x_bnd.gather(1, idx_bj.unsqueeze(-1).expand(-1, -1, x_bnd.shape[2]))


def _kmeanspp(
    x_bnd: Tensor,
    valid_bn: Tensor,
    k_max: int,
    gen: torch.Generator,
    n_trials: int,
    x2_bn1: Tensor | None = None,
) -> Tensor:
    """Greedy k-means++ seeding of ``k_max`` centres per row, ``[B, k_max, D]``.

    Sampling ∝ d² is done with the exponential-race trick ``argmax(d² / E)``, ``E ~ Exp(1)``,
    which needs no per-row normalisation and tolerates rows whose d² are all zero.
    """
    b, n, _ = x_bnd.shape
    dev = x_bnd.device
    if x2_bn1 is None:
        x2_bn1 = _sq_norm(x_bnd)
    neg = -1.0
    u_bn = torch.rand(b, n, generator=gen, device=dev)
    first_b1 = torch.where(valid_bn, u_bn, neg).argmax(1, keepdim=True)
    centres = [_gather_points(x_bnd, first_b1)]
    d2_bn = _sq_dist(x_bnd, centres[0], x2_bn1).squeeze(2)
    for _ in range(1, k_max):
        e_btn = torch.empty(b, n_trials, n, device=dev).exponential_(generator=gen)
        e_btn.clamp_min_(1e-20)
        score_btn = torch.where(valid_bn[:, None], d2_bn[:, None] / e_btn, neg)
        cand_bt = score_btn.argmax(2)  # [B, T]
        cand_btd = _gather_points(x_bnd, cand_bt)
        d2_cand_btn = torch.minimum(
            d2_bn[:, None], _sq_dist(x_bnd, cand_btd, x2_bn1).transpose(1, 2)
        )
        pot_bt = (d2_cand_btn * valid_bn[:, None]).sum(2)
        best_b = pot_bt.argmin(1)
        centres.append(_gather_points(cand_btd, best_b[:, None]))
        d2_bn = d2_cand_btn[torch.arange(b, device=dev), best_b]
    return torch.cat(centres, dim=1)


def _assign(
    x_bnd: Tensor, c_bkd: Tensor, cvalid_bk: Tensor, x2_bn1: Tensor
) -> tuple[Tensor, Tensor]:
    """Nearest valid centre of every point: ``(d2_min[B, N], assign[B, N])``.

    ``|x|²`` does not change the argmin, so it is added to the minimum only.
    """
    c2_b1k = (c_bkd * c_bkd).sum(-1).unsqueeze(1)
    part_bnk = torch.baddbmm(c2_b1k, x_bnd, c_bkd.transpose(1, 2), alpha=-2.0)
    part_bnk.masked_fill_(~cvalid_bk[:, None, :], float("inf"))
    part_bn, assign_bn = part_bnk.min(dim=2)
    return (part_bn + x2_bn1.squeeze(2)).clamp_min_(0.0), assign_bn


def _cluster_sums(
    x_bnd: Tensor, assign_bn: Tensor, valid_bn: Tensor, k: int, index_add: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Per-cluster sums ``[B, k, D]`` and counts ``[B, k]`` of the valid points.

    ``index_add`` (default: on the CPU): one ``index_add_`` into ``B·k + 1`` rows (the last one
    collects the invalid points). Otherwise a one-hot ``[B, k, N] @ [B, N, D]`` matmul
    (deterministic, and fast on a GPU).
    """
    b, n, d = x_bnd.shape
    if index_add is None:
        index_add = x_bnd.device.type == "cpu"
    if index_add:
        row_b1 = torch.arange(b, device=x_bnd.device).unsqueeze(1) * k
        idx = torch.where(valid_bn, assign_bn + row_b1, b * k).reshape(-1)
        sums = x_bnd.new_zeros(b * k + 1, d).index_add_(0, idx, x_bnd.reshape(b * n, d))
        counts = torch.bincount(idx, minlength=b * k + 1).to(x_bnd.dtype)
        return sums[:-1].view(b, k, d), counts[:-1].view(b, k)
    ar_1k1 = torch.arange(k, device=x_bnd.device).view(1, k, 1)
    onehot_bkn = ((assign_bn[:, None, :] == ar_1k1) & valid_bn[:, None, :]).to(x_bnd.dtype)
    return torch.bmm(onehot_bkn, x_bnd), onehot_bkn.sum(2)


def _update(
    x_bnd: Tensor,
    valid_bn: Tensor,
    assign_bn: Tensor,
    d2_bn: Tensor,
    c_bkd: Tensor,
    cvalid_bk: Tensor,
) -> Tensor:
    """One Lloyd update: cluster means, empty valid clusters re-seeded with far points."""
    n, k = x_bnd.shape[1], c_bkd.shape[1]
    sums_bkd, counts_bk = _cluster_sums(x_bnd, assign_bn, valid_bn, k)
    mean_bkd = sums_bkd / counts_bk.clamp_min(1.0).unsqueeze(-1)
    c_new = torch.where(counts_bk.unsqueeze(-1) > 0, mean_bkd, c_bkd)
    # Empty valid clusters: the e-th one takes the e-th farthest valid point of the row.
    empty_bk = (counts_bk == 0) & cvalid_bk
    if bool(empty_bk.any()):
        rank_bk = (empty_bk.long().cumsum(1) - 1).clamp_min(0)
        far_bk = torch.where(valid_bn, d2_bn, -float("inf")).topk(min(k, n), dim=1).indices
        far_bk = far_bk.gather(1, rank_bk.clamp_max(far_bk.shape[1] - 1))
        c_new = torch.where(empty_bk.unsqueeze(-1), _gather_points(x_bnd, far_bk), c_new)
    return c_new


def _lloyd(
    x_bnd: Tensor,
    valid_bn: Tensor,
    c_bkd: Tensor,
    cvalid_bk: Tensor,
    iters: int,
    x2_bn1: Tensor | None = None,
    tol_b: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd iterations with empty-cluster re-seeding; returns ``(centres, assign, d2_min)``.

    Row ``b`` stops (and is frozen) after ``iters`` updates, once its assignments repeat, or
    once its last update moved its valid centres by a total squared distance ``≤ tol_b[b]``
    (default 0). The working set shrinks to the running rows whenever at most half of it is
    still running.
    """
    b, n, _ = x_bnd.shape
    if x2_bn1 is None:
        x2_bn1 = _sq_norm(x_bnd)
    if tol_b is None:
        tol_b = x_bnd.new_zeros(b)
    out_c = c_bkd.clone()
    out_assign = torch.zeros(b, n, dtype=torch.long, device=x_bnd.device)
    out_d2 = x_bnd.new_zeros(b, n)
    # working set: rows ``ids`` of the batch; ``running`` marks those not yet frozen
    ids = torch.arange(b, device=x_bnd.device)
    xw, vw, x2w, cvw, tolw, cw = x_bnd, valid_bn, x2_bn1, cvalid_bk, tol_b, c_bkd
    running = torch.ones(b, dtype=torch.bool, device=x_bnd.device)
    prev = shift = None
    for it in range(iters + 1):
        d2, assign = _assign(xw, cw, cvw, x2w)
        if it == iters:
            stop = running
        elif prev is None:
            stop = torch.zeros_like(running)
        else:
            stop = running & ((assign == prev).all(1) | (shift <= tolw))
        if bool(stop.any()):
            rows = ids[stop]
            out_c[rows], out_assign[rows], out_d2[rows] = cw[stop], assign[stop], d2[stop]
            running = running & ~stop
            n_run = int(running.sum())
            if n_run == 0:
                break
            if 2 * n_run <= running.numel():  # drop the frozen rows (one copy of the rest)
                keep = running.nonzero().squeeze(1)
                ids, xw, vw, x2w = ids[keep], xw[keep], vw[keep], x2w[keep]
                cvw, tolw, cw, assign, d2 = cvw[keep], tolw[keep], cw[keep], assign[keep], d2[keep]
                running = running[keep]
        prev = assign
        c_new = _update(xw, vw, assign, d2, cw, cvw)
        shift = ((c_new - cw).square().sum(2) * cvw).sum(1)
        cw = c_new
    return out_c, out_assign, out_d2


def _tolerance(x_bnd: Tensor, valid_bn: Tensor, x2_bn1: Tensor, tol: float) -> Tensor:
    """``tol`` × mean per-dimension variance of each row's valid points, ``[B]``."""
    b, _, d = x_bnd.shape
    if tol <= 0:
        return x_bnd.new_zeros(b)
    zeros_bn = torch.zeros_like(valid_bn, dtype=torch.long)
    sums_b1d, n_b1 = _cluster_sums(x_bnd, zeros_bn, valid_bn, 1)
    n_b = n_b1.squeeze(1).clamp_min(1.0)
    mean_sq_b = torch.where(valid_bn, x2_bn1.squeeze(2), 0.0).sum(1) / n_b
    sq_mean_b = (sums_b1d.squeeze(1) / n_b[:, None]).square().sum(1)
    return tol * (mean_sq_b - sq_mean_b).clamp_min(0.0) / d


def batched_kmeans_full(
    x: Tensor,
    k: int | Tensor,
    valid: Tensor | None = None,
    iters: int = 100,
    seed: int = 0,
    n_init: int = 1,
    tol: float = DEFAULT_TOL,
    subsample: int | None = None,
) -> KMeansResult:
    """Batched Euclidean k-means with per-row ``k`` and a point mask (appendix: clustering and APO).

    Args:
        x: ``[B, N, D]`` points (raw features; computed in float32).
        k: clusters per row, an int or a LongTensor ``[B]``; ``k_max = max(k)``.
        valid: BoolTensor ``[B, N]``; False marks padding rows (default: all valid).
        iters: maximum Lloyd iterations per row.
        seed: seeds a ``torch.Generator`` on ``x``'s device; same seed → same result.
        n_init: number of seedings; each row keeps its lowest-inertia run.
        tol: a row also stops once an update moves its centres by a total squared distance of
            at most ``tol`` × the mean per-dimension variance of its valid points
            (scikit-learn's ``KMeans`` rule and default); ``0`` runs every row until its
            assignments repeat (or ``iters``).
        subsample: coarse-to-fine (off by default). Every seeding and its Lloyd run use only
            ``subsample`` random valid points of each row (all of them where a row has
            fewer); the best of the ``n_init`` runs on that subset is then refined by Lloyd
            iterations on all points, with the same stopping rules. Each full-data
            iteration reads every point, so this replaces most full passes by passes over
            the subset, much as sklearn's ``MiniBatchKMeans`` seeds on ``init_size`` points.
            ``None``, or a value that (raised to ``k_max``) is ≥ ``N``, clusters all points
            from the start (bitwise the same as without it).

    Returns:
        :class:`KMeansResult` ``(centers[B, k_max, D], assign[B, N], center_valid[B, k_max],
        inertia[B])``; see the module docstring for rows with fewer points than ``k``.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D], got {tuple(x.shape)}")
    if tol < 0:
        raise ValueError(f"tol must be ≥ 0, got {tol}")
    b, n, _ = x.shape
    dev = x.device
    x_bnd = x.detach().float().contiguous()
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
    x2_bn1 = _sq_norm(x_bnd)  # once for the seeding and every Lloyd iteration of every run
    tol_b = _tolerance(x_bnd, valid_bn, x2_bn1, tol)

    if subsample is not None and subsample < 1:
        raise ValueError(f"subsample must be ≥ 1 or None, got {subsample}")
    m = None if subsample is None else max(subsample, k_max)  # room for every centre
    coarse = m is not None and m < n
    if coarse:  # the seedings and their Lloyd runs on a random subset of each row's points
        score_bn = torch.where(valid_bn, torch.rand(b, n, generator=gen, device=dev), -1.0)
        idx_bm = score_bn.topk(m, dim=1).indices  # valid points first
        xs_bnd, vs_bn = _gather_points(x_bnd, idx_bm), valid_bn.gather(1, idx_bm)
        x2s_bn1 = x2_bn1.gather(1, idx_bm.unsqueeze(-1))
    else:
        xs_bnd, vs_bn, x2s_bn1 = x_bnd, valid_bn, x2_bn1

    best = None
    for _ in range(max(1, n_init)):
        c_bkd = _kmeanspp(xs_bnd, vs_bn, k_max, gen, n_trials, x2s_bn1)
        c_bkd, assign_bn, d2_bn = _lloyd(xs_bnd, vs_bn, c_bkd, cvalid_bk, iters, x2s_bn1, tol_b)
        inertia_b = torch.where(vs_bn, d2_bn, torch.zeros_like(d2_bn)).sum(1)
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
    if coarse:  # refine the best subset solution on every point
        c_bkd, assign_bn, d2_bn = _lloyd(x_bnd, valid_bn, c_bkd, cvalid_bk, iters, x2_bn1, tol_b)
        inertia_b = torch.where(valid_bn, d2_bn, torch.zeros_like(d2_bn)).sum(1)
    has_point_b1 = valid_bn.any(1, keepdim=True)
    c_bkd = torch.where(cvalid_bk.unsqueeze(-1), c_bkd, c_bkd[:, :1])
    c_bkd = c_bkd * has_point_b1.unsqueeze(-1)
    assign_bn = torch.where(valid_bn, assign_bn, torch.full_like(assign_bn, -1))
    return KMeansResult(c_bkd, assign_bn, cvalid_bk, inertia_b)
