"""CPG sampling, memories and thresholds (spec §5.1–5.3).

Machine: exact, fp32-tolerance. Routing, sub-sampling from seeded generators, the memories (against
a deque reference, also after a two-process gather) and the threshold decisions are exact;
confidences, class means and the adaptive thresholds' EMA against hand-worked values are
fp32-tolerance (assert_close's float32 defaults).
"""

from __future__ import annotations

from collections import deque

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from brpg.method.cpg import (
    NOT_SELECTED,
    AdaptiveThreshold,
    Rows,
    class_mean_gt_prob,
    confidence,
    cpg_rows,
    downsample_labels,
    memory_rows,
    route_labeled,
    route_unlabeled,
    subsample,
    subsample_indices,
)
from brpg.method.memory import PrototypeMemory


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits_from(probs_bhwc: list) -> torch.Tensor:
    """Logits whose softmax is the given probabilities, ``[B, C, h, w]``."""
    return torch.tensor(probs_bhwc).log().permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- routing
def test_confidence_and_downsample():
    logits = _logits_from([[[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]]])
    conf, pred = confidence(logits)
    torch.testing.assert_close(conf, torch.tensor([[[0.7, 0.6]]]))
    assert pred.tolist() == [[[0, 2]]]
    labels = torch.arange(16).view(1, 4, 4)
    small = downsample_labels(labels, 2)
    assert small.tolist() == [[[0, 2], [8, 10]]] and small.dtype == torch.long
    # nearest, as the official F.interpolate(mode="nearest"): small pixel i reads ⌊i·9/3⌋ = 0, 3,
    # 6 along the rows and ⌊j·9/4⌋ = 0, 2, 4, 6 along the columns (not a centred rule)
    labels = torch.arange(81).view(1, 9, 9)
    want = [[r * 9 + c for c in (0, 2, 4, 6)] for r in (0, 3, 6)]
    assert downsample_labels(labels, (3, 4)).tolist() == [want]


def test_route_labeled_hand_made_2x2():
    # pixel (0,0): gt 0, pred 0, conf .9 → high; (0,1): gt 1, pred 1, conf .6 → low
    # (1,0): gt 2, pred 0 (wrong), conf .95 → none; (1,1): gt 255 (ignore) → none
    probs = [[[[0.9, 0.05, 0.05], [0.2, 0.6, 0.2]], [[0.95, 0.03, 0.02], [0.05, 0.9, 0.05]]]]
    logits = _logits_from(probs)
    labels = torch.tensor([[[0, 1], [2, 255]]])
    rep = torch.arange(8, dtype=torch.float32).view(1, 2, 2, 2)  # D = 2
    r = route_labeled(rep, logits, labels)
    assert r.high_cls.tolist() == [0, -1, -1, -1]
    assert r.low_cls.tolist() == [-1, 1, -1, -1]
    # rows in (b, y, x) order: row 1 is pixel (0,1) with features rep[0, :, 0, 1]
    assert r.high_feats.shape == (4, 2) and r.high_feats[1].tolist() == [1.0, 5.0]
    assert r.low_feats is r.high_feats
    # low_threshold above 0.6 removes the low pixel; τ_h above 0.9 moves the high one to low
    assert route_labeled(rep, logits, labels, low_threshold=0.7).low_cls.tolist() == [-1] * 4
    r2 = route_labeled(rep, logits, labels, tau_h=0.95)
    assert r2.high_cls.tolist() == [-1] * 4 and r2.low_cls.tolist() == [0, 1, -1, -1]
    # per-class thresholds (csp): class 0 at .95 → low, class 1 at .5 → high
    r3 = route_labeled(rep, logits, labels, tau_h=torch.tensor([0.95, 0.5, 0.8]))
    assert r3.high_cls.tolist() == [-1, 1, -1, -1] and r3.low_cls.tolist() == [0, -1, -1, -1]


def test_route_unlabeled():
    probs = [[[[0.9, 0.05, 0.05], [0.2, 0.6, 0.2]], [[0.02, 0.03, 0.95], [0.1, 0.8, 0.1]]]]
    rep = torch.randn(1, 5, 2, 2)
    rows = route_unlabeled(rep, _logits_from(probs), thr=0.8)
    assert rows.cls.tolist() == [0, -1, 2, 1]  # ≥ 0.8 (0.8 itself included up to rounding)
    torch.testing.assert_close(rows.feats, rep.permute(0, 2, 3, 1).reshape(4, 5))
    assert route_unlabeled(rep, _logits_from(probs), thr=0.85).cls.tolist() == [0, -1, 2, -1]


# --------------------------------------------------------------------------- sub-sampling
def test_subsample_cap_and_validity():
    cls = torch.full((100,), NOT_SELECTED)
    sel = torch.randperm(100, generator=_gen(0))[:30]
    cls[sel] = sel % 4
    feats = torch.arange(100, dtype=torch.float32)[:, None].expand(100, 3)
    for cap, n_out, n_valid in [(10, 10, 10), (30, 30, 30), (50, 50, 30), (500, 100, 30)]:
        out = subsample(feats, cls, cap, _gen(1))
        assert out.feats.shape == (n_out, 3) and out.cls.shape == (n_out,)
        valid = out.cls >= 0
        assert int(valid.sum()) == n_valid
        rows = out.feats[valid, 0].long()
        assert len(set(rows.tolist())) == n_valid  # no duplicates
        assert torch.equal(cls[rows], out.cls[valid])  # classes travel with rows
        assert bool(valid[:n_valid].all())  # selected rows first
    a = subsample_indices(cls, 10, _gen(3))
    assert torch.equal(a[0], subsample_indices(cls, 10, _gen(3))[0])
    assert not torch.equal(a[0], subsample_indices(cls, 10, _gen(4))[0])


def test_subsample_is_uniform():
    cls = torch.zeros(20, dtype=torch.long)
    hits = torch.zeros(20)
    g = _gen(5)
    for _ in range(300):
        hits[subsample_indices(cls, 5, g)[0]] += 1
    assert float(hits.min()) > 40 and float(hits.max()) < 110  # expected 75 each


def test_memory_rows_budget_and_sources():
    b, d = 2, 3
    n = b * 2 * 2
    lab_feats = torch.arange(n, dtype=torch.float32)[:, None].expand(n, d)
    unl_feats = 100 + torch.arange(n, dtype=torch.float32)[:, None].expand(n, d)
    lab_high = torch.tensor([0, -1, 1, -1, 2, -1, -1, -1])
    lab_low = torch.tensor([-1, 1, -1, 1, -1, -1, 0, -1])
    unl = torch.tensor([-1, 2, 2, 2, -1, 0, -1, 1])
    labeled = route_like(lab_feats, lab_high, lab_low)
    high, low = memory_rows(labeled, Rows(unl_feats, unl), b, sample_pixel_num=1, generator=_gen(0))
    assert high.cls.shape == (4,) and low.cls.shape == (2,)  # 1·2B and 1·B
    assert bool((high.cls >= 0).all()) and bool((low.cls >= 0).all())
    for rows, lab_cls in ((high, lab_high), (low, lab_low)):
        for f, c in zip(rows.feats[:, 0].long().tolist(), rows.cls.tolist(), strict=True):
            expected = lab_cls[f] if f < 100 else unl[f - 100]
            assert int(expected) == c
    # a large budget keeps every selected row exactly once
    high, low = memory_rows(labeled, Rows(unl_feats, unl), b, sample_pixel_num=100)
    ids = sorted(high.feats[high.cls >= 0, 0].long().tolist())
    assert ids == [0, 2, 4, 101, 102, 103, 105, 107]
    assert sorted(low.feats[low.cls >= 0, 0].long().tolist()) == [1, 3, 6]


def route_like(feats, high_cls, low_cls):
    from brpg.method.cpg import LabeledRoutes

    return LabeledRoutes(feats, high_cls, feats, low_cls)


# --------------------------------------------------------------------------- memories
class _Reference:
    """Naive per-class deques (the official "append, keep the last capacity rows")."""

    def __init__(self, num_classes: int, capacity: int) -> None:
        self.q = [deque(maxlen=capacity) for _ in range(num_classes)]

    def push(self, feats, cls):
        for f, c in zip(feats.tolist(), cls.tolist(), strict=True):
            if 0 <= c < len(self.q):
                self.q[c].append(f)


def _check(mem: PrototypeMemory, ref: _Reference, kind: str = "high") -> None:
    feats, valid = mem.get(kind, ordered=True)
    raw, raw_valid = mem.get(kind)
    for c, q in enumerate(ref.q):
        assert int(mem.count[kind][c]) == len(q)
        assert int(valid[c].sum()) == len(q) and bool(valid[c, : len(q)].all())
        assert feats[c, : len(q)].tolist() == list(q)
        # ring order holds the same multiset of rows in its first count[c] slots
        assert sorted(raw[c][raw_valid[c]].tolist()) == sorted(q)


def _rows(n: int, num_classes: int, seed: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    cls = torch.randint(-1, num_classes + 1, (n,), generator=g)  # includes -1 and C (ignored)
    feats = torch.stack([torch.arange(start, start + n).float(), cls.float()], dim=1)
    return feats, cls


def test_push_more_than_capacity_keeps_most_recent_in_order():
    mem = PrototypeMemory(2, 2, capacity=3)
    feats = torch.stack([torch.arange(8.0), torch.zeros(8)], dim=1)
    cls = torch.tensor([0, 1, 0, 0, 0, 1, 0, 255])  # 255 is ignored too
    mem.push("high", feats, cls)
    ordered, valid = mem.get("high", ordered=True)
    assert ordered[0, :, 0].tolist() == [3.0, 4.0, 6.0]  # last three of class 0, oldest first
    assert ordered[1, :2, 0].tolist() == [1.0, 5.0] and valid[1].tolist() == [True, True, False]
    assert mem.count["high"].tolist() == [3, 2] and mem.ptr["high"].tolist() == [2, 2]
    assert int(mem.count["low"].sum()) == 0


def test_interleaved_and_wrapping_pushes_match_reference():
    c, cap = 4, 7
    mem, ref = PrototypeMemory(c, 2, capacity=cap), _Reference(c, cap)
    start = 0
    for step, n in enumerate([3, 5, 11, 2, 30, 1, 0, 9, 16]):
        feats, cls = _rows(n, c, seed=step, start=start)
        start += n
        mem.push("high", feats, cls)
        ref.push(feats, cls)
        _check(mem, ref)
    assert mem.count["high"].tolist() == [len(q) for q in ref.q]


def test_memory_state_round_trip():
    mem = PrototypeMemory(3, 2, capacity=5)
    for step in range(4):
        mem.push("high", *_rows(6, 3, seed=step, start=10 * step))
        mem.push("low", *_rows(4, 3, seed=50 + step, start=100 + 10 * step))
    other = PrototypeMemory(3, 2, capacity=5)
    other.load_state_dict(mem.state_dict())
    for kind in ("high", "low"):
        assert torch.equal(other.feats(kind), mem.feats(kind))
        assert torch.equal(other.ptr[kind], mem.ptr[kind])
        assert torch.equal(other.count[kind], mem.count[kind])
    nxt = _rows(9, 3, seed=99, start=1000)
    mem.push("high", *nxt)
    other.push("high", *nxt)
    assert torch.equal(other.get("high", ordered=True)[0], mem.get("high", ordered=True)[0])
    with pytest.raises(ValueError):
        PrototypeMemory(3, 2, capacity=6).load_state_dict(mem.state_dict())
    mem.clear()
    assert int(mem.count["high"].sum()) == 0 and not bool(mem.get("high")[1].any())


def test_push_casts_and_checks():
    mem = PrototypeMemory(2, 3, capacity=4)
    mem.push("low", torch.ones(2, 3, dtype=torch.float16), torch.tensor([1, 1]))
    assert mem.feats("low").dtype == torch.float32 and mem.count["low"].tolist() == [0, 2]
    with pytest.raises(ValueError):
        mem.push("low", torch.ones(2, 4), torch.tensor([1, 1]))


# --------------------------------------------------------------------------- 2-process gather
def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mem = PrototypeMemory(3, 2, capacity=6)
        for step in range(3):
            mem.push("high", *_rows(8, 3, seed=10 * step + rank, start=1000 * rank + 10 * step))
        torch.save(mem.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_push_gives_identical_memories(tmp_path):
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    m0, m1 = s0["memories"]["high"], s1["memories"]["high"]
    for key in ("feats", "ptr", "count"):
        assert torch.equal(m0[key], m1[key])
    # equal to one process pushing rank 0's rows, then rank 1's, every step
    single, ref = PrototypeMemory(3, 2, capacity=6), _Reference(3, 6)
    for step in range(3):
        rows = [_rows(8, 3, seed=10 * step + r, start=1000 * r + 10 * step) for r in range(2)]
        feats = torch.cat([f for f, _ in rows])
        cls = torch.cat([c for _, c in rows])
        single.push("high", feats, cls)
        ref.push(feats, cls)
    assert torch.equal(single.feats("high"), m0["feats"])
    loaded = PrototypeMemory(3, 2, capacity=6)
    loaded.load_state_dict(s0)
    _check(loaded, ref)


# --------------------------------------------------------------------------- csp thresholds
def test_class_mean_gt_prob():
    probs = [[[[0.9, 0.1], [0.3, 0.7]], [[0.6, 0.4], [0.5, 0.5]]]]
    labels = torch.tensor([[[0, 1], [0, 255]]])
    mean, present = class_mean_gt_prob(_logits_from(probs), labels, num_classes=3)
    torch.testing.assert_close(mean, torch.tensor([0.75, 0.7, 0.0]))
    assert present.tolist() == [True, True, False]


def test_adaptive_threshold_ema_by_hand():
    th = AdaptiveThreshold(3, init=0.8, momentum=0.9, thre_min=0.5, thre_max=0.85, fix_class=[2])
    th.update(torch.tensor([1.0, 0.0, 0.3]), torch.tensor([True, True, False]))
    torch.testing.assert_close(th.ema, torch.tensor([0.82, 0.72, 0.8]))
    th.update(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([True, False, True]))
    torch.testing.assert_close(th.ema, torch.tensor([0.838, 0.72, 0.72]))
    # clip to [0.5, 0.85]; class 2 is fixed at 0.8
    torch.testing.assert_close(th.thresholds(), torch.tensor([0.838, 0.72, 0.8]))
    for _ in range(40):
        th.update(torch.tensor([1.0, 0.0, 0.0]), torch.ones(3, dtype=torch.bool))
    t = th.thresholds()
    torch.testing.assert_close(t, torch.tensor([0.85, 0.5, 0.8]))
    other = AdaptiveThreshold(3)
    other.load_state_dict(th.state_dict())
    assert torch.equal(other.ema, th.ema) and torch.equal(other.fixed, th.fixed)


def test_step_path_runs_on_meta_device():
    """No .item(), no data-dependent shape: the whole per-step path works on meta tensors."""
    meta = torch.device("meta")
    b, c, d, h, w = 2, 3, 4, 5, 5
    logits = torch.randn(b, c, h, w, device=meta)
    rep = torch.randn(b, d, h, w, device=meta)
    labels = downsample_labels(torch.randint(0, c, (b, 20, 20), device=meta), (h, w))
    th = AdaptiveThreshold(c, device=meta)
    th.update(*class_mean_gt_prob(logits, labels, c))
    routes = route_labeled(rep, logits, labels, tau_h=th.thresholds())
    high, low = memory_rows(routes, route_unlabeled(rep, logits), b, 3, _gen(0))
    mem = PrototypeMemory(c, d, capacity=4, device=meta)
    mem.push("high", *high)
    mem.push("low", *low)
    feats, valid = mem.get("high", ordered=True)
    assert feats.shape == (c, 4, d) and valid.shape == (c, 4)


# ------------------------------------------------ edges found by mutation testing (issue 18)
def test_shape_checks_reject_each_mismatch_with_a_message():
    rep = torch.zeros(1, 2, 2, 2)
    # only w differs, then only B: each alone is an error (not only both together)
    with pytest.raises(
        ValueError, match=r"rep \(1, 2, 2, 2\) and logits \(1, 3, 2, 3\) must share"
    ):
        route_labeled(rep, torch.zeros(1, 3, 2, 3), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"rep \(1, 2, 2, 2\) and logits \(2, 3, 2, 2\) must share"
    ):
        route_unlabeled(rep, torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match="must be at the logits' resolution"):
        route_labeled(rep, torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long))


def test_route_labeled_threshold_boundaries_are_exact():
    # two equal logits: softmax is exactly 0.5 and the tie predicts class 0 (first maximum)
    logits = torch.zeros(1, 2, 1, 1)
    rep = torch.ones(1, 3, 1, 1)
    labels = torch.zeros(1, 1, 1, dtype=torch.long)
    # conf == τ_h is high ("≥ τ_h") and therefore not low ("< τ_h")
    r = route_labeled(rep, logits, labels, tau_h=0.5)
    assert r.high_cls.tolist() == [0] and r.low_cls.tolist() == [-1]
    r = route_labeled(rep, logits, labels, tau_h=torch.tensor([0.5, 0.9]))
    assert r.high_cls.tolist() == [0] and r.low_cls.tolist() == [-1]
    # conf == low_threshold is not low ("low_threshold < conf"); default low_threshold 0 keeps it
    r = route_labeled(rep, logits, labels, low_threshold=0.5)
    assert r.high_cls.tolist() == [-1] and r.low_cls.tolist() == [-1]
    assert route_labeled(rep, logits, labels).low_cls.tolist() == [0]


def test_per_class_thresholds_read_the_last_class_and_survive_far_labels():
    # pixel 0: gt 2 = pred, conf .7; τ of class 2 is .6 → high (class 1's .9 would make it low)
    # pixel 1: gt -100 (PyTorch's usual ignore index), must not index the threshold tensor
    probs = [[[[0.1, 0.2, 0.7], [0.8, 0.1, 0.1]]]]
    rep = torch.zeros(1, 2, 1, 2)
    labels = torch.tensor([[[2, -100]]])
    tau = torch.tensor([0.5, 0.9, 0.6])
    r = route_labeled(rep, _logits_from(probs), labels, tau_h=tau)
    assert r.high_cls.tolist() == [2, -1] and r.low_cls.tolist() == [-1, -1]
    r = route_labeled(rep, _logits_from(probs), labels, tau_h=tau, ignore_index=-100)
    assert r.high_cls.tolist() == [2, -1]


def test_route_labeled_ignores_255_by_default_even_when_it_is_a_class():
    # 256 classes: pixel 0 is predicted 255 with p ≈ .99 and labeled 255, pixel 1 the same for 3
    logits = torch.zeros(1, 256, 1, 2)
    logits[0, 255, 0, 0] = logits[0, 3, 0, 1] = 10.0
    labels = torch.tensor([[[255, 3]]])
    rep = torch.zeros(1, 2, 1, 2)
    assert route_labeled(rep, logits, labels).high_cls.tolist() == [-1, 3]
    assert route_labeled(rep, logits, labels, ignore_index=0).high_cls.tolist() == [255, 3]
    mean, present = class_mean_gt_prob(logits, labels, num_classes=256)
    assert not bool(present[255]) and bool(present[3]) and int(present.sum()) == 1
    # p = e^10 / (e^10 + 255)
    e10 = 22026.465794806718
    torch.testing.assert_close(mean[3], torch.tensor(e10 / (e10 + 255)))


def test_route_unlabeled_default_and_per_class_thresholds():
    # teacher predictions 0 (.9), 1 (.6), 2 (.85), 0 (.7)
    probs = [[[[0.9, 0.05, 0.05], [0.2, 0.6, 0.2]], [[0.1, 0.05, 0.85], [0.7, 0.2, 0.1]]]]
    rep = torch.zeros(1, 2, 2, 2)
    assert route_unlabeled(rep, _logits_from(probs)).cls.tolist() == [0, -1, 2, -1]  # τ .8
    # per class, read at the teacher's prediction: class 1 at .5, class 0 at .95
    thr = torch.tensor([0.95, 0.5, 0.8])
    assert route_unlabeled(rep, _logits_from(probs), thr).cls.tolist() == [-1, 1, 2, -1]


def test_subsample_pads_with_not_selected_whatever_the_unselected_class():
    # any negative class means "not selected"; the padding slots still say exactly −1
    cls = torch.tensor([-7, 3, -2, -1, -100])
    idx, cls_k = subsample_indices(cls, 4, _gen(0))
    assert cls_k.tolist() == [3, -1, -1, -1] and int(idx[0]) == 1


def test_gather_two_picks_rows_of_the_concatenation():
    from brpg.method.cpg import _gather_two

    a = torch.tensor([[0.0], [1.0], [2.0]])
    b = torch.tensor([[10.0]])
    # index 3 is b's first row (not a's last); b has fewer rows than a
    got = _gather_two(a, b, torch.tensor([0, 1, 2, 3, 3, 0]))
    assert got[:, 0].tolist() == [0.0, 1.0, 2.0, 10.0, 10.0, 0.0]
    # a single row in a, several in b
    got = _gather_two(a[2:], torch.tensor([[10.0], [11.0]]), torch.tensor([2, 0, 1]))
    assert got[:, 0].tolist() == [11.0, 2.0, 10.0]


def test_gather_two_with_an_empty_side_and_mixed_dtypes():
    from brpg.method.cpg import _gather_two

    half = torch.tensor([[1.5, 2.5], [3.5, 4.5]], dtype=torch.float16)
    empty32 = torch.zeros(0, 2)
    # the result has the promoted dtype of both inputs, even when one of them is empty
    got = _gather_two(empty32, half, torch.tensor([1, 0]))
    assert got.dtype == torch.float32 and got.tolist() == [[3.5, 4.5], [1.5, 2.5]]
    got = _gather_two(half, empty32, torch.tensor([1, 1]))
    assert got.dtype == torch.float32 and got.tolist() == [[3.5, 4.5], [3.5, 4.5]]
    got = _gather_two(half, torch.tensor([[9.0, 8.0]]), torch.tensor([2, 0]))
    assert got.dtype == torch.float32 and got.tolist() == [[9.0, 8.0], [1.5, 2.5]]


def _only_the_generator_draws(fn):
    """``fn()`` under two global seeds: equal results, global RNG state left untouched."""
    outs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        outs.append(fn())
        assert torch.equal(torch.get_rng_state(), state), "the global RNG was used"
    return outs


def test_sampling_draws_only_from_the_generator():
    cls = torch.arange(12) % 3
    feats = torch.arange(12.0)[:, None]
    a, b = _only_the_generator_draws(lambda: subsample(feats, cls, 3, _gen(4)))
    assert torch.equal(a.feats, b.feats) and torch.equal(a.cls, b.cls)
    labeled = route_like(feats, cls, cls.flip(0))
    unl = Rows(100 + feats, cls)
    (ha, la), (hb, lb) = _only_the_generator_draws(
        lambda: memory_rows(labeled, unl, 1, sample_pixel_num=1, generator=_gen(4))
    )
    assert ha.cls.shape == (2,) and la.cls.shape == (1,)
    assert torch.equal(ha.feats, hb.feats) and torch.equal(la.feats, lb.feats)
    # and the generator's seed does matter (these seeds give several different subsets)
    lows = {
        tuple(memory_rows(labeled, unl, 1, 1, _gen(s))[1].feats[:, 0].tolist()) for s in range(8)
    }
    assert len(lows) > 1


def _cpg_inputs():
    """B = 1, C = 2, D = 3, 2×4 pixels: labeled pixels 0–3 correct with conf .9, 4–7 correct
    with conf .6; unlabeled pixels 0–3 predicted 1 with conf .85, 4–7 predicted 0 with conf .7.
    Features: the row id (labeled) or 100 + the row id (unlabeled)."""
    p_l = torch.tensor([0.9] * 4 + [0.6] * 4)
    logits_l = torch.stack([p_l, 1 - p_l]).log().view(1, 2, 2, 4)
    p_u = torch.tensor([0.15] * 4 + [0.7] * 4)
    logits_u = torch.stack([p_u, 1 - p_u]).log().view(1, 2, 2, 4)
    rep_l = torch.arange(8.0).expand(3, 8).reshape(1, 3, 2, 4)
    labels = torch.zeros(1, 2, 4, dtype=torch.long)
    return rep_l, logits_l, labels, 100 + rep_l, logits_u


def _ids_by_class(rows):
    sel = rows.cls >= 0
    return sorted(zip(rows.feats[sel, 0].long().tolist(), rows.cls[sel].tolist(), strict=True))


def test_cpg_rows_defaults_and_forwarded_keywords():
    rep_l, logits_l, labels, rep_u, logits_u = _cpg_inputs()
    # defaults: τ_h = .8, low_threshold = 0, unlabeled threshold = .8, budget 5000·2B / 5000·B
    high, low = cpg_rows(rep_l, logits_l, labels, rep_u, logits_u)
    assert high.cls.shape == (16,) and low.cls.shape == (8,)
    assert _ids_by_class(high) == [(i, 0) for i in range(4)] + [(100 + i, 1) for i in range(4)]
    assert _ids_by_class(low) == [(4, 0), (5, 0), (6, 0), (7, 0)]
    # the keywords reach the routing: no low row at .6 < .65, no unlabeled row at .85 < .9
    high, low = cpg_rows(
        rep_l, logits_l, labels, rep_u, logits_u, low_threshold=0.65, unlabeled_threshold=0.9
    )
    assert _ids_by_class(high) == [(0, 0), (1, 0), (2, 0), (3, 0)] and _ids_by_class(low) == []
    # a per-class unlabeled threshold, read at the teacher's class: class 0 at .5 takes 104–107
    # (conf .7), class 1 at .9 drops 100–103 (conf .85)
    high, _ = cpg_rows(
        rep_l, logits_l, labels, rep_u, logits_u, unlabeled_threshold=torch.tensor([0.5, 0.9])
    )
    assert [i for i, _ in _ids_by_class(high)] == [0, 1, 2, 3, 104, 105, 106, 107]
    # the budget is per image of the *batch* (B = 1 here, not D = 3)
    high, low = cpg_rows(rep_l, logits_l, labels, rep_u, logits_u, sample_pixel_num=1)
    assert high.cls.shape == (2,) and low.cls.shape == (1,)
    assert bool((high.cls >= 0).all()) and bool((low.cls >= 0).all())
    (ha, la), (hb, lb) = _only_the_generator_draws(
        lambda: cpg_rows(
            rep_l, logits_l, labels, rep_u, logits_u, sample_pixel_num=1, generator=_gen(2)
        )
    )
    assert torch.equal(ha.feats, hb.feats) and torch.equal(la.feats, lb.feats)


def test_cpg_rows_without_unlabeled_outputs():
    rep_l, logits_l, labels, rep_u, logits_u = _cpg_inputs()
    # either missing input means "no unlabeled rows": only the labeled rows, N = 8 of them
    for u in ((None, None), (rep_u, None), (None, logits_u)):
        high, low = cpg_rows(rep_l, logits_l, labels, *u)
        assert high.cls.shape == (8,) and high.feats.shape == (8, 3)
        assert _ids_by_class(high) == [(0, 0), (1, 0), (2, 0), (3, 0)]
        assert _ids_by_class(low) == [(4, 0), (5, 0), (6, 0), (7, 0)]
        assert high.feats.dtype == rep_l.dtype


def test_memory_rows_and_cpg_rows_default_budget_is_5000_per_image():
    n = 5001
    feats = torch.zeros(n, 1)
    every = torch.zeros(n, dtype=torch.long)
    high, low = memory_rows(route_like(feats, every, every), Rows(feats, every), batch_size=1)
    # sample_pixel_num 5000 (official): 5000·2B of 10002 high rows, 5000·B of 5001 low rows
    assert high.cls.shape == (10000,) and low.cls.shape == (5000,)
    # the same default in cpg_rows: 5001 correct labeled pixels at conf .6 are all low
    logits = torch.tensor([0.6, 0.4]).log().view(1, 2, 1, 1).expand(1, 2, 1, n)
    high, low = cpg_rows(
        torch.zeros(1, 1, 1, n), logits, torch.zeros(1, 1, n, dtype=torch.long), None, None
    )
    assert int((low.cls == 0).sum()) == 5000 and int((high.cls >= 0).sum()) == 0


def test_class_mean_gt_prob_skips_labels_outside_the_classes():
    probs = [
        [
            [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]],
            [[0.3, 0.3, 0.4], [0.8, 0.1, 0.1], [0.3, 0.4, 0.3]],
        ]
    ]
    labels = torch.tensor([[[0, -1, 3], [2, 0, 255]]])  # -1, C = 3 and 255 count nowhere
    mean, present = class_mean_gt_prob(_logits_from(probs), labels, num_classes=3)
    torch.testing.assert_close(mean, torch.tensor([0.7, 0.0, 0.4]))  # (.6 + .8) / 2, -, .4
    assert present.tolist() == [True, False, True]


def test_class_mean_gt_prob_with_a_single_class_and_ignore_pixels():
    # C = 1: the placeholder class of an ignored pixel must be a class that exists (0)
    mean, present = class_mean_gt_prob(
        torch.tensor([[[[0.3, -2.0]]]]), torch.tensor([[[0, 255]]]), 1
    )
    torch.testing.assert_close(mean, torch.tensor([1.0]))
    assert present.tolist() == [True]


def test_adaptive_threshold_defaults():
    th = AdaptiveThreshold(2)
    torch.testing.assert_close(th.ema, torch.tensor([0.8, 0.8]))  # init 0.8
    torch.testing.assert_close(th.thresholds(), torch.tensor([0.8, 0.8]))  # no clipping in [0, 1]
    th.update(torch.tensor([0.0, 1.0]), torch.tensor([True, True]))
    # momentum 0.999: .8·.999 = .7992 and .7992 + .001 = .8002
    torch.testing.assert_close(th.ema, torch.tensor([0.7992, 0.8002]))
    # the default clip range is [0, 1]
    torch.testing.assert_close(AdaptiveThreshold(1, init=1.2).thresholds(), torch.tensor([1.0]))
    torch.testing.assert_close(AdaptiveThreshold(1, init=-0.1).thresholds(), torch.tensor([0.0]))
