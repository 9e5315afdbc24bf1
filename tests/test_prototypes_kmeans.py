"""Batched k-means for the one-shot clustering (spec §5.4, §13).

Machine: exact, same-machine, fp32-tolerance, bound. Hand-checkable Lloyd steps on small integer
grids and the k-means++ seeds against a plain loop (exact d² in float32) are exact. Results
compared with another call in the same process (the default seed, subsample ≥ N, a huge tolerance,
a row alone and in the batch, the plain-loop stopping rule) are same-machine. Centres and inertias
against plain Lloyd, sklearn's KMeans and the full-data re-assignment are fp32-tolerance (atol 1e-6
to 1e-3, rtol 1e-4). Blob recovery (within 0.1) and the inertia ratios against sklearn are bound.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans, MiniBatchKMeans

from brpg.method import kmeans as km_module
from brpg.method.kmeans import (
    _cluster_sums,
    _kmeanspp,
    _lloyd,
    _sq_dist,
    _sq_norm,
    _tolerance,
    _update,
    batched_kmeans_full,
)


def _blobs(g, centres, n_each, std=0.05):
    pts = [c + std * torch.randn(n_each, c.shape[0], generator=g) for c in centres]
    labels = torch.arange(len(centres)).repeat_interleave(n_each)
    return torch.cat(pts), labels


def _batch_of_blobs():
    """3 rows, N = 40 (padded), D = 3, k = 2, 3, 4 true blobs per row."""
    g = torch.Generator().manual_seed(0)
    n, d = 40, 3
    ks = [2, 3, 4]
    x = torch.zeros(len(ks), n, d)
    valid = torch.zeros(len(ks), n, dtype=torch.bool)
    truth, labels = [], []
    for b, k in enumerate(ks):
        centres = torch.randn(k, d, generator=g) * 10
        pts, lab = _blobs(g, centres, 30 // k, std=0.05)
        x[b, : len(pts)] = pts
        x[b, len(pts) :] = 1e3  # padding far away: would ruin the centres if not masked
        valid[b, : len(pts)] = True
        truth.append(centres)
        labels.append(lab)
    return x, valid, torch.tensor(ks), truth, labels


def test_blobs_recovered_with_per_row_k_and_padding():
    x, valid, ks, truth, labels = _batch_of_blobs()
    res = batched_kmeans_full(x, ks, valid=valid, seed=0)
    assert res.centers.shape == (3, 4, 3) and res.assign.shape == (3, 40)
    assert res.center_valid.tolist() == [
        [True, True, False, False],
        [True, True, True, False],
        [True, True, True, True],
    ]
    for b, k in enumerate(ks.tolist()):
        n = len(labels[b])
        a = res.assign[b, :n]
        assert (res.assign[b, n:] == -1).all()
        # perfect assignment up to permutation: blob i ↦ exactly one cluster, all distinct
        perm = [int(a[labels[b] == i][0]) for i in range(k)]
        assert sorted(perm) == list(range(k))
        for i in range(k):
            assert (a[labels[b] == i] == perm[i]).all()
            assert torch.dist(res.centers[b, perm[i]], truth[b][i]) < 0.1
        # centres beyond the row's k repeat its first centre
        for j in range(k, 4):
            assert torch.equal(res.centers[b, j], res.centers[b, 0])


def test_deterministic_given_seed():
    x, valid, ks, _, _ = _batch_of_blobs()
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(1))  # overlapping
    r1 = batched_kmeans_full(x, ks, valid=valid, seed=7)
    r2 = batched_kmeans_full(x, ks, valid=valid, seed=7)
    assert torch.equal(r1.centers, r2.centers) and torch.equal(r1.assign, r2.assign)


def test_rows_with_fewer_points_than_k_and_empty_rows():
    x = torch.tensor(
        [
            [[0.0, 0.0], [5.0, 5.0], [9.0, 9.0], [9.0, 9.0]],
            [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]],
        ]
    )
    valid = torch.tensor([[True, True, False, False], [False, False, False, False]])
    res = batched_kmeans_full(x, 3, valid=valid, seed=0)
    assert res.center_valid.tolist() == [[True, True, False], [False, False, False]]
    got = {tuple(c.tolist()) for c in res.centers[0, :2]}
    assert got == {(0.0, 0.0), (5.0, 5.0)}
    assert torch.equal(res.centers[0, 2], res.centers[0, 0])
    assert res.inertia[0].item() == 0.0
    assert res.assign[0, :2].unique().numel() == 2
    assert (res.assign[0, 2:] == -1).all() and (res.assign[1] == -1).all()
    assert (res.centers[1] == 0).all() and res.inertia[1].item() == 0.0


def test_empty_cluster_is_reseeded_with_farthest_point():
    g = torch.Generator().manual_seed(0)
    a, _ = _blobs(g, [torch.tensor([0.0, 0.0]), torch.tensor([10.0, 0.0])], 10, std=0.1)
    x = a.unsqueeze(0)
    valid = torch.ones(1, 20, dtype=torch.bool)
    init = torch.tensor([[[5.0, 0.0], [100.0, 0.0]]])  # the second centre attracts nothing
    centres, assign, _ = _lloyd(x, valid, init, torch.ones(1, 2, dtype=torch.bool), iters=20)
    assert assign[0, :10].unique().numel() == 1 and assign[0, 10:].unique().numel() == 1
    assert assign[0, 0] != assign[0, 10]
    got = sorted(round(v) for v in centres[0, :, 0].tolist())
    assert got == [0, 10]


@pytest.mark.parametrize("seed", [0, 1])
def test_inertia_close_to_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    rows, inertia_sk = [], []
    for _ in range(3):
        centres = torch.rand(5, 4, generator=g) * 8
        pts, _ = _blobs(g, centres, 40, std=1.0)
        rows.append(pts)
        km = KMeans(n_clusters=5, n_init=1, random_state=seed).fit(pts.double().numpy())
        inertia_sk.append(km.inertia_)
    res = batched_kmeans_full(torch.stack(rows), 5, seed=seed)
    for ours, ref in zip(res.inertia.tolist(), inertia_sk, strict=True):
        assert ours <= 1.1 * ref
    # inertia is the sum of squared distances to the assigned centres
    x = torch.stack(rows)
    own = res.centers.gather(1, res.assign[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(res.inertia, ((x - own) ** 2).sum((1, 2)), rtol=1e-4, atol=1e-3)


def test_n_init_keeps_best_run_per_row():
    g = torch.Generator().manual_seed(3)
    rows, ref = [], []
    for _ in range(4):
        centres = torch.rand(5, 4, generator=g) * 8
        pts, _ = _blobs(g, centres, 40, std=1.0)
        rows.append(pts)
        ref.append(
            KMeans(n_clusters=5, n_init=3, random_state=0).fit(pts.double().numpy()).inertia_
        )
    x = torch.stack(rows)
    one = batched_kmeans_full(x, 5, seed=0, n_init=1)
    three = batched_kmeans_full(x, 5, seed=0, n_init=3)
    assert (three.inertia <= one.inertia + 1e-4).all()  # the first run is one of the three
    for ours, r in zip(three.inertia.tolist(), ref, strict=True):
        assert ours <= 1.1 * r


# --------------------------------------------------------------------------- speed-ups and tol


def _plain_lloyd(x, valid, c, cvalid, iters):
    """Reference: ``iters`` plain Lloyd updates on every row, no early stop, one-hot sums."""
    inf = float("inf")
    for _ in range(iters):
        d2 = torch.where(cvalid[:, None, :], torch.cdist(x.double(), c.double()) ** 2, inf)
        assign = d2.argmin(2)
        onehot = ((assign[:, :, None] == torch.arange(c.shape[1])) & valid[..., None]).double()
        counts = onehot.sum(1)
        mean = (onehot.transpose(1, 2) @ x.double()) / counts.clamp_min(1)[..., None]
        c = torch.where(counts[..., None] > 0, mean, c.double()).float()
    d2 = torch.where(cvalid[:, None, :], torch.cdist(x.double(), c.double()) ** 2, inf)
    return c, d2.argmin(2)


def _mixed_rows(seed=0, n=60, d=3):
    """4 rows of different difficulty: separable blobs (fast) and overlapping ones (slow)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for spread in (20.0, 3.0, 2.0, 1.0):
        centres = torch.randn(3, d, generator=g) * spread
        pts, _ = _blobs(g, centres, n // 3, std=1.0)
        rows.append(pts)
    x = torch.stack(rows)
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    valid[1, -7:] = False  # a few padding points in one row
    return x, valid


def test_lloyd_with_tol_zero_matches_plain_lloyd_and_freezes_rows_independently():
    """tol = 0: every row ends at the fixed point plain Lloyd reaches; batching (and dropping
    the rows that stopped early) does not change any row's result."""
    x, valid = _mixed_rows()
    init = x[:, :3].clone()  # distinct points, no empty cluster at the start
    cvalid = torch.ones(4, 3, dtype=torch.bool)
    c, a, d2 = _lloyd(x, valid, init, cvalid, iters=100)
    c_ref, a_ref = _plain_lloyd(x, valid, init, cvalid, iters=100)
    torch.testing.assert_close(c, c_ref, rtol=0, atol=1e-4)
    assert torch.equal(a[valid], a_ref[valid])
    own = c.gather(1, a[..., None].expand(-1, -1, 3))
    torch.testing.assert_close(d2, ((x - own) ** 2).sum(2), rtol=1e-3, atol=1e-3)
    for r in range(4):
        c_r, a_r, _ = _lloyd(x[r : r + 1], valid[r : r + 1], init[r : r + 1], cvalid[:1], 100)
        torch.testing.assert_close(c_r[0], c[r], rtol=0, atol=1e-5)
        assert torch.equal(a_r[0], a[r])


def test_lloyd_iteration_cap_and_huge_tol_stop_after_one_update():
    """Hand-checkable: with ``iters=1`` (or a tolerance no shift can exceed) every row makes
    exactly one update: the centres are the means of the seeds' clusters, the returned
    assignment belongs to those centres."""
    x = torch.tensor([[[0.0], [1.0], [2.0], [9.0], [12.0], [33.0]]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    init = torch.tensor([[[0.0], [12.0]]])
    cvalid = torch.ones(1, 2, dtype=torch.bool)
    # seeds 0, 12: {0, 1, 2}, {9, 12, 33} → centres 1, 18, and then 9 is closer to 1 than to 18
    for kwargs in ({"iters": 1}, {"iters": 50, "tol_b": torch.tensor([1e9])}):
        c, a, d2 = _lloyd(x, valid, init, cvalid, **kwargs)
        assert c[0, :, 0].tolist() == [1.0, 18.0]
        assert a[0].tolist() == [0, 0, 0, 0, 1, 1]
        assert d2[0].tolist() == [1.0, 0.0, 1.0, 64.0, 36.0, 225.0]
    # to convergence: centres 3, 22.5 (12 is then closer to 3), then 4.8, 33: stable
    c, a, _ = _lloyd(x, valid, init, cvalid, iters=50)
    assert c[0, :, 0].tolist() == pytest.approx([4.8, 33.0])
    assert a[0].tolist() == [0, 0, 0, 0, 0, 1]
    c2, _, _ = _lloyd(x, valid, init, cvalid, iters=2)
    assert c2[0, :, 0].tolist() == [3.0, 22.5]


def test_tolerance_is_tol_times_mean_variance_of_valid_points():
    x, valid = _mixed_rows(seed=2)
    tol = _tolerance(x, valid, _sq_norm(x), 1e-3)
    for r in range(4):
        ref = 1e-3 * x[r][valid[r]].double().var(0, unbiased=False).mean()
        assert tol[r].item() == pytest.approx(ref.item(), rel=1e-4)
    assert torch.equal(_tolerance(x, valid, _sq_norm(x), 0.0), torch.zeros(4))


def test_cluster_sums_index_add_and_one_hot_agree():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 50, 5, generator=g)
    assign = torch.randint(0, 4, (3, 50), generator=g)
    valid = torch.rand(3, 50, generator=g) > 0.2
    s1, n1 = _cluster_sums(x, assign, valid, 4, index_add=True)
    s2, n2 = _cluster_sums(x, assign, valid, 4, index_add=False)
    torch.testing.assert_close(s1, s2)
    assert torch.equal(n1, n2)
    b, j = 1, 2
    sel = valid[b] & (assign[b] == j)
    assert n1[b, j].item() == sel.sum().item()
    torch.testing.assert_close(s1[b, j], x[b][sel].sum(0))


def test_default_tol_gives_the_tol_zero_result_on_separable_data():
    x, valid, ks, _, _ = _batch_of_blobs()
    exact = batched_kmeans_full(x, ks, valid=valid, seed=3, n_init=2, tol=0.0)
    default = batched_kmeans_full(x, ks, valid=valid, seed=3, n_init=2)
    assert torch.equal(default.assign, exact.assign)
    torch.testing.assert_close(default.centers, exact.centers, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="tol"):
        batched_kmeans_full(x, ks, tol=-1.0)


def test_default_tol_costs_little_inertia_on_overlapping_data():
    x, valid = _mixed_rows(seed=5, n=300, d=8)
    exact = batched_kmeans_full(x, 3, valid=valid, seed=0, n_init=3, tol=0.0)
    default = batched_kmeans_full(x, 3, valid=valid, seed=0, n_init=3)
    assert (default.inertia <= exact.inertia * (1 + 1e-3)).all()


def test_subsample_at_least_n_is_the_full_batch_result():
    x, valid, ks, _, _ = _batch_of_blobs()
    full = batched_kmeans_full(x, ks, valid=valid, seed=2, n_init=2)
    for sub in (40, 1000):  # N = 40: nothing to subsample
        same = batched_kmeans_full(x, ks, valid=valid, seed=2, n_init=2, subsample=sub)
        assert torch.equal(same.centers, full.centers) and torch.equal(same.assign, full.assign)
    with pytest.raises(ValueError, match="subsample"):
        batched_kmeans_full(x, ks, valid=valid, subsample=0)
    # more clusters than points: the subset would need k_max ≥ N points, so none is taken
    few = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    ref = batched_kmeans_full(few, 6, seed=1)
    small = batched_kmeans_full(few, 6, seed=1, subsample=2)
    assert torch.equal(small.centers, ref.centers) and torch.equal(small.assign, ref.assign)


def test_subsample_recovers_blobs_and_respects_padding():
    """Coarse-to-fine on a subset smaller than the rows: same clusters, padding never used."""
    x, valid, ks, truth, labels = _batch_of_blobs()
    res = batched_kmeans_full(x, ks, valid=valid, seed=0, subsample=12)
    for b, k in enumerate(ks.tolist()):
        n = len(labels[b])
        assert (res.assign[b, n:] == -1).all()
        a = res.assign[b, :n]
        perm = [int(a[labels[b] == i][0]) for i in range(k)]
        assert sorted(perm) == list(range(k))
        for i in range(k):
            assert (a[labels[b] == i] == perm[i]).all()
            assert torch.dist(res.centers[b, perm[i]], truth[b][i]) < 0.1
    again = batched_kmeans_full(x, ks, valid=valid, seed=0, subsample=12)
    assert torch.equal(again.centers, res.centers)


def test_subsample_refinement_ends_at_a_full_data_fixed_point():
    """With tol = 0 the refinement runs until no full-data assignment changes, so the result
    is a Lloyd fixed point of all points (its inertia matches its own re-assignment) and its
    inertia is close to the full-batch run's."""
    x, valid = _mixed_rows(seed=5, n=300, d=8)
    full = batched_kmeans_full(x, 3, valid=valid, seed=0, n_init=3, tol=0.0)
    sub = batched_kmeans_full(x, 3, valid=valid, seed=0, n_init=3, tol=0.0, subsample=40)
    x2 = _sq_norm(x)
    d2 = (x2 - 2 * x @ sub.centers.transpose(1, 2) + (sub.centers**2).sum(-1)[:, None]).clamp_min(0)
    own = torch.where(valid, d2.min(2).values, 0.0).sum(1)
    torch.testing.assert_close(own, sub.inertia, rtol=1e-4, atol=1e-3)
    assert torch.equal(sub.assign[valid], d2.argmin(2)[valid])
    assert (sub.inertia <= full.inertia * 1.05).all(), (sub.inertia, full.inertia)


def test_inertia_against_minibatch_kmeans_is_close_not_always_lower():
    """The official clustering is sklearn's ``MiniBatchKMeans`` (batch 100, n_init 3). Ours is
    close to it per class, with a median ratio below 1, but not "as good or better" on every
    class, and the docstring must not promise that."""
    doc = " ".join(km_module.__doc__.split())
    assert "as good or better" not in doc
    assert "not always lower" in doc and "results/benchmarks/cpu.json" in doc
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(16):
        k_true = rng.integers(2, 6)
        centres = rng.normal(size=(k_true, 16)) * rng.uniform(0.5, 3)
        rows.append(centres[rng.integers(0, k_true, 600)] + rng.normal(size=(600, 16)))
    ours = batched_kmeans_full(torch.tensor(np.stack(rows), dtype=torch.float32), 3, n_init=3)
    ratios = []
    for row, inertia in zip(rows, ours.inertia.tolist(), strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn's n_init / memory-leak notices
            sk = MiniBatchKMeans(n_clusters=3, random_state=0, batch_size=100, n_init=3).fit(row)
        sk_inertia = ((row[:, None] - sk.cluster_centers_[None]) ** 2).sum(-1).min(1).sum()
        ratios.append(inertia / sk_inertia)
    assert np.median(ratios) <= 1.0 and max(ratios) <= 1.1, ratios


# --------------------------------------------------------------------------- edges (mutation)


def test_sq_dist_without_precomputed_norm_keeps_distances_below_one():
    x = torch.tensor([[[0.0, 0.0], [0.5, 0.0], [0.25, 0.5]]])
    c = torch.tensor([[[0.0, 0.0], [0.5, 0.5]]])
    # hand-computed squared distances; values below 1 must not be clamped up
    want = torch.tensor([[[0.0, 0.5], [0.25, 0.25], [0.3125, 0.0625]]])
    assert torch.equal(_sq_dist(x, c), want)
    assert torch.equal(_sq_dist(x, c, _sq_norm(x)), want)


def _seeding_oracle(x, valid, k, seed, n_trials):
    """Plain-loop greedy k-means++ with the documented random draws: one ``rand[B, N]`` for
    the first centre, then per further centre ``Exp(1)[B, T, N]`` for the d² race."""
    gen = torch.Generator().manual_seed(seed)
    b, n, _ = x.shape
    u = torch.rand(b, n, generator=gen)
    e = [torch.empty(b, n_trials, n).exponential_(generator=gen) for _ in range(k - 1)]
    xs = x.double().tolist()
    out = []
    for r in range(b):
        pts = [i for i in range(n) if valid[r, i]]

        def d2(i, j, r=r):
            return sum((a - c) ** 2 for a, c in zip(xs[r][i], xs[r][j], strict=True))

        chosen = [max(pts, key=lambda i, r=r: (u[r, i].item(), -i))]
        near = {i: d2(i, chosen[0]) for i in pts}
        for s in range(k - 1):
            cands = [
                max(pts, key=lambda i, t=t, r=r: (near[i] / e[s][r, t, i].item(), -i))
                for t in range(n_trials)
            ]
            pots = [sum(min(near[i], d2(i, c)) for i in pts) for c in cands]
            chosen.append(cands[pots.index(min(pots))])
            near = {i: min(near[i], d2(i, chosen[-1])) for i in pts}
        out.append(chosen)
    return out


def test_kmeanspp_seeds_match_a_plain_loop_oracle_and_skip_padding():
    """Each row draws its own uniforms and exponentials, candidates are d²-weighted, the best
    candidate has the lowest potential over the valid points only, padding is never a seed."""
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 16, (3, 12, 2), generator=g).float() / 4  # exact d² in float32
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[1, 8:] = False
    valid[2, 10:] = False
    for seed in range(4):
        got = _kmeanspp(x, valid, 4, torch.Generator().manual_seed(seed), 3)
        want = _seeding_oracle(x, valid, 4, seed, 3)
        for r in range(3):
            assert torch.equal(got[r], x[r, want[r]]), (seed, r)


def test_kmeanspp_rows_are_seeded_independently():
    """Identical rows (classes) must not share their random draws."""
    x = torch.randn(1, 30, 2, generator=torch.Generator().manual_seed(0)).expand(16, -1, -1)
    valid = torch.ones(16, 30, dtype=torch.bool)
    seeds = _kmeanspp(x, valid, 1, torch.Generator().manual_seed(0), 2)[:, 0]
    assert torch.unique(seeds, dim=0).shape[0] > 4


def _spy(monkeypatch, name):
    """Record the arguments of every call of ``kmeans.<name>`` (the real one still runs)."""
    calls, real = [], getattr(km_module, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(km_module, name, wrapper)
    return calls


def test_defaults_candidates_iterations_seed_and_runs(monkeypatch):
    """sklearn's greedy k-means++ uses ``2 + ⌊ln k⌋`` candidates; defaults: 100 Lloyd
    iterations, one seeding (``n_init < 1`` still runs once), seed 0."""
    x, valid = _mixed_rows(seed=1, n=30)
    seeding, lloyd = _spy(monkeypatch, "_kmeanspp"), _spy(monkeypatch, "_lloyd")
    for k, trials in ((1, 2), (2, 2), (3, 3), (7, 3), (8, 4), (20, 4)):
        seeding.clear()
        batched_kmeans_full(x, k, valid=valid)
        assert [c[4] for c in seeding] == [trials], k
    assert lloyd[-1][4] == 100
    for n_init, runs in ((None, 1), (0, 1), (1, 1), (3, 3)):
        seeding.clear()
        kw = {} if n_init is None else {"n_init": n_init}
        batched_kmeans_full(x, 3, valid=valid, **kw)
        assert len(seeding) == runs, n_init
    default = batched_kmeans_full(x, 3, valid=valid)
    zero = batched_kmeans_full(x, 3, valid=valid, seed=0)
    one = batched_kmeans_full(x, 3, valid=valid, seed=1)
    assert torch.equal(default.centers, zero.centers)
    assert not torch.equal(one.centers, zero.centers)  # the seed matters on these rows


def test_tol_stop_is_inclusive_per_row_and_ignores_invalid_centres():
    """sklearn stops once the centre shift is ``<= tol``; each row compares its own shift
    with its own tolerance, and an invalid (unused) centre adds nothing to the shift."""
    x = torch.tensor([[0.0, 1.0, 2.0, 9.0, 12.0, 33.0]]).T.unsqueeze(0)
    x = torch.cat([x, 100 * x])  # row 1: the same problem, 10⁴ times larger shifts
    valid = torch.ones(2, 6, dtype=torch.bool)
    init = torch.tensor([[[0.0], [12.0], [5.0]], [[0.0], [1200.0], [500.0]]])
    cvalid = torch.tensor([[True, True, False], [True, True, False]])
    # row 0, first update: seeds 0, 12 → means 1, 18: shift 1² + 6² = 37, exactly its tol
    c, a, _ = _lloyd(x, valid, init, cvalid, iters=50, tol_b=torch.tensor([37.0, 0.0]))
    assert c[0, :, 0].tolist() == [1.0, 18.0, 5.0]
    assert a[0].tolist() == [0, 0, 0, 0, 1, 1]
    assert c[1, :2, 0].tolist() == [480.0, 3300.0]  # row 1 (tol 0) runs to its fixed point
    assert a[1].tolist() == [0, 0, 0, 0, 0, 1]
    c, _, _ = _lloyd(x, valid, init, cvalid, iters=50, tol_b=torch.tensor([36.9, 0.0]))
    # 37 > 36.9: one more update, 1, 18 → 3, 22.5, whose shift 2² + 4.5² = 24.25 stops it
    assert c[0, :2, 0].tolist() == [3.0, 22.5]


@pytest.mark.parametrize("subsample", [None, 40])
def test_a_huge_tol_stops_every_run_after_one_update(subsample):
    """The tolerance reaches every Lloyd run (the seedings' and the refinement's): with a tol
    no shift can exceed, each run makes exactly one update, as with ``iters=1``."""
    x, valid = _mixed_rows(seed=5, n=300, d=8)
    kw = {"valid": valid, "seed": 0, "n_init": 2, "subsample": subsample}
    huge = batched_kmeans_full(x, 3, tol=1e12, **kw)
    one = batched_kmeans_full(x, 3, tol=0.0, iters=1, **kw)
    full = batched_kmeans_full(x, 3, tol=0.0, **kw)
    assert torch.equal(huge.centers, one.centers) and torch.equal(huge.assign, one.assign)
    assert not torch.equal(full.centers, one.centers)  # one update is not converged here


def test_tolerance_of_single_point_and_low_variance_rows():
    # row 0: one valid point (variance 0); row 1: {0, 0.5} (variance 0.0625); row 2: empty
    x = torch.tensor([[[3.0], [100.0]], [[0.0], [0.5]], [[7.0], [9.0]]])
    valid = torch.tensor([[True, False], [True, True], [False, False]])
    tol = _tolerance(x, valid, _sq_norm(x), 1.0)
    assert tol.tolist() == [0.0, 0.0625, 0.0]


def test_update_reseeds_empty_clusters_with_the_farthest_valid_points_in_order():
    x = torch.tensor([[[0.0], [1.0], [3.0], [10.0], [50.0]]])
    valid = torch.tensor([[True, True, True, True, False]])  # 50 is padding
    c = torch.tensor([[[1.0], [100.0], [200.0], [7.0]]])
    cvalid = torch.tensor([[True, True, True, False]])
    assign = torch.zeros(1, 5, dtype=torch.long)
    d2 = torch.tensor([[1.0, 0.0, 4.0, 81.0, 2401.0]])  # to centre 0
    new = _update(x, valid, assign, d2, c, cvalid)
    # cluster 0: mean of 0, 1, 3, 10; the 1st empty one takes 10, the 2nd one 3; the empty
    # invalid centre stays where it was
    assert new[0, :, 0].tolist() == [3.5, 10.0, 3.0, 7.0]


def test_argument_checks_at_their_bounds():
    x = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"x must be \[B, N, D\], got \(6, 3\)"):
        batched_kmeans_full(x[0], 2)
    for bad in (0, torch.tensor([1, 0])):
        with pytest.raises(ValueError, match="k must be ≥ 1"):
            batched_kmeans_full(x, bad)
    one = batched_kmeans_full(x, 1)  # k = 1: the centre is the mean
    torch.testing.assert_close(one.centers[:, 0], x.mean(1))
    sub = batched_kmeans_full(x, 1, subsample=1)  # the smallest subset allowed
    torch.testing.assert_close(sub.centers[:, 0], x.mean(1))


def test_subsample_seeds_each_row_on_its_own_random_valid_subset(monkeypatch):
    base = torch.randn(1, 40, 2, generator=torch.Generator().manual_seed(0))
    x = base.expand(6, -1, -1).clone()
    valid = torch.ones(6, 40, dtype=torch.bool)
    valid[0, 25:] = False
    x[0, 25:] = 1e3  # padding
    seeding, lloyd = _spy(monkeypatch, "_kmeanspp"), _spy(monkeypatch, "_lloyd")
    batched_kmeans_full(x, 3, valid=valid, subsample=10, n_init=2)
    assert len(seeding) == 2
    for xs, vs, *_ in seeding:
        assert xs.shape == (6, 10, 2) and bool(vs.all()) and bool((xs < 1e3).all())
    # identical rows (1 to 5, no padding) draw different subsets
    subsets = {tuple(sorted(map(tuple, xs.tolist()))) for xs in seeding[0][0][1:]}
    assert len(subsets) > 1
    # two runs on the subset, then one refinement on all points
    assert [c[0].shape[1] for c in lloyd] == [10, 10, 40]
    seeding.clear()
    batched_kmeans_full(x, 3, valid=valid, subsample=2)  # room for every centre: 3 points
    assert seeding[0][0].shape == (6, 3, 2)


def test_n_init_keeps_the_first_of_equally_good_runs(monkeypatch):
    """The corners of a square split into two pairs two ways with the same inertia (4); of
    the runs reaching it, the first is kept (a later tie does not replace it)."""
    x = torch.tensor([[[0.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 2.0]]])
    runs, real = [], km_module._lloyd

    def record(*args, **kwargs):
        out = real(*args, **kwargs)
        runs.append(out[0][0])
        return out

    monkeypatch.setattr(km_module, "_lloyd", record)
    res = batched_kmeans_full(x, 2, n_init=6, seed=3)
    pts = x[0].double().tolist()
    inertia = [
        sum(min((p[0] - c[0]) ** 2 + (p[1] - c[1]) ** 2 for c in r.tolist()) for p in pts)
        for r in runs
    ]
    best = [i for i, v in enumerate(inertia) if v == pytest.approx(min(inertia))]
    assert len(best) > 1 and not torch.equal(runs[best[0]], runs[best[-1]])  # a real tie
    assert torch.equal(res.centers[0], runs[best[0]])


def test_lloyd_does_not_stop_when_every_point_changes_cluster():
    """Found by a random search: 3 points and 4 centres, every point in cluster 1 at first; the
    update re-seeds the three empty clusters and every point moves. Only a repeat (or a zero
    shift) may stop a row, so the result must equal a plain loop that follows that rule."""
    x = torch.tensor([[[0.4864, -0.4785], [-1.1095, -1.2542], [-0.4849, -0.1189]]])
    c = torch.tensor([[[0.0467, 1.5880], [0.3277, 1.2047], [2.6458, -3.4802], [-3.2142, -3.2695]]])
    valid, cvalid = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)
    x2 = (x * x).sum(2, keepdim=True)
    d2, first = km_module._assign(x, c, cvalid, x2)
    c1 = km_module._update(x, valid, first, d2, c, cvalid)
    assert first.tolist() == [[1, 1, 1]]
    assert (km_module._assign(x, c1, cvalid, x2)[1] != first).all()  # the case is the one meant
    prev, cw = None, c
    for _ in range(50):  # the stopping rule, written plainly
        d2, assign = km_module._assign(x, cw, cvalid, x2)
        if prev is not None and torch.equal(assign, prev):
            break
        prev, cw = assign, km_module._update(x, valid, assign, d2, cw, cvalid)
    got_c, got_a, _ = _lloyd(x, valid, c, cvalid, iters=50)
    assert torch.equal(got_a, assign)
    torch.testing.assert_close(got_c, cw, rtol=0, atol=0)


def test_a_row_stops_on_its_own_repeat_whatever_the_other_rows_do():
    """Points on a small integer grid (duplicates, ties, an empty cluster re-seeded): found by a
    random search as a batch where row 1 repeats its assignment while row 0 still moves. Each
    row's result must be the one it gets alone."""
    x = torch.tensor(
        [
            [[-1.0, -2.0], [2.0, -1.0], [2.0, 0.0], [-2.0, 1.0]],
            [[2.0, -1.0], [-2.0, -2.0], [-2.0, -1.0], [-2.0, 0.0]],
        ]
    )
    c = torch.tensor(
        [
            [[2.0, 1.0], [2.0, 0.0], [1.0, 2.0], [0.0, 1.0]],
            [[-1.0, -2.0], [1.0, -2.0], [-2.0, 1.0], [1.0, -2.0]],
        ]
    )
    valid, cvalid = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)
    got_c, got_a, _ = _lloyd(x, valid, c, cvalid, iters=20)
    for r in range(2):
        alone_c, alone_a, _ = _lloyd(x[r : r + 1], valid[:1], c[r : r + 1], cvalid[:1], iters=20)
        assert torch.equal(got_c[r], alone_c[0]) and torch.equal(got_a[r], alone_a[0]), r
