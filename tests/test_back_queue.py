"""COCO 'back' queue of CPG and its clustering-time fallbacks (spec §5.5, §12 Q13, Q15).

Machine: exact, same-machine, fp32-tolerance, bound. The queue against a brute-force reference,
seeded routing, the fallbacks by hand and the two-process gather (seeded rows, against one process
pushing them all) are exact; p_gt against hand-worked probabilities is fp32-tolerance. The resume
tests compare a crashed and resumed tiny run with the straight run bit for bit (same-machine).
Which fallback cases the tiny training run meets depends on its trained confidences (bound).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_semi import _run, _state, tiny

from brpg.config import ConfigError, load_config
from brpg.method import clustering as clustering_mod
from brpg.method import plugin as plugin_mod
from brpg.method.cpg import route_back
from brpg.method.memory import (
    FALLBACK_HIGH,
    FALLBACK_LOW,
    FALLBACK_NONE,
    FALLBACK_SPLIT,
    BackQueue,
    PrototypeMemory,
    apply_back_fallbacks,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rows(n: int, num_classes: int, seed: int, start: int = 0):
    """Rows ``feats = [id, class]`` with distinct random p_gt; classes include −1 and C."""
    g = _gen(seed)
    cls_n = torch.randint(-1, num_classes + 1, (n,), generator=g)
    conf_n = torch.rand(n, generator=g)
    feats_nd = torch.stack([torch.arange(start, start + n).float(), cls_n.float()], dim=1)
    return feats_nd, conf_n, cls_n


class _Reference:
    """Brute force: per class, append and keep the ``capacity`` highest p_gt (official sort)."""

    def __init__(self, num_classes: int, capacity: int) -> None:
        self.q: list[list[tuple[float, int]]] = [[] for _ in range(num_classes)]
        self.capacity = capacity

    def push(self, feats_nd, conf_n, cls_n) -> None:
        for f, p, c in zip(feats_nd.tolist(), conf_n.tolist(), cls_n.tolist(), strict=True):
            if 0 <= c < len(self.q):
                self.q[c].append((p, int(f[0])))
        for c, rows in enumerate(self.q):
            self.q[c] = sorted(rows, reverse=True)[: self.capacity]


def _check(back: BackQueue, ref: _Reference) -> None:
    feats, conf = back.feats(), back.conf()
    for c, rows in enumerate(ref.q):
        valid = conf[c] > float("-inf")
        assert int(back.count[c]) == len(rows) == int(valid.sum())
        ids = feats[c][valid][:, 0].long().tolist()
        got = sorted(zip(conf[c][valid].tolist(), ids, strict=True))
        assert got == sorted(rows)
        assert bool((feats[c][valid][:, 1] == c).all())


def test_push_keeps_the_most_confident_rows_like_brute_force():
    c, cap = 4, 7
    back, ref = BackQueue(c, 2, capacity=cap), _Reference(c, cap)
    start = 0
    for step, n in enumerate([3, 5, 11, 2, 40, 1, 0, 9, 16, 25]):
        rows = _rows(n, c, seed=step, start=start)
        start += n
        back.push(*rows)
        ref.push(*rows)
        _check(back, ref)
    assert back.count.tolist() == [cap] * c  # every class full, the weakest rows gone


def test_push_of_one_class_with_more_rows_than_capacity():
    back = BackQueue(2, 2, capacity=3)
    conf = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.8])
    feats = torch.stack([torch.arange(6.0), torch.ones(6)], 1)
    back.push(feats, conf, torch.ones(6, dtype=torch.long))
    valid = back.conf()[1] > float("-inf")
    assert sorted(back.feats()[1][valid][:, 0].tolist()) == [1.0, 3.0, 5.0]
    assert back.count.tolist() == [0, 3]
    back.push(feats[:1] + 10, torch.tensor([0.75]), torch.tensor([1]))  # evicts 0.7 (row 3)
    valid = back.conf()[1] > float("-inf")
    assert sorted(back.feats()[1][valid][:, 0].tolist()) == [1.0, 5.0, 10.0]
    back.push(feats[:1], torch.tensor([0.2]), torch.tensor([1]))  # too weak: no change
    assert sorted(back.conf()[1].tolist()) == pytest.approx([0.75, 0.8, 0.9])


def _logits_from(probs_bhwc: list) -> torch.Tensor:
    return torch.tensor(probs_bhwc).log().permute(0, 3, 1, 2).contiguous()


def test_route_back_takes_any_gt_pixel_with_p_gt_and_never_255():
    # (0,0) gt 0 correct; (0,1) gt 1 but predicted 0: still sampled; (1,*) 255 / out of range
    probs = [[[[0.9, 0.1], [0.7, 0.3]], [[0.5, 0.5], [0.4, 0.6]]]]
    labels = torch.tensor([[[0, 1], [255, 2]]])
    rep = torch.arange(8, dtype=torch.float32).view(1, 2, 2, 2)
    rows = route_back(rep, _logits_from(probs), labels)
    assert rows.cls.tolist() == [0, 1, -1, -1]
    torch.testing.assert_close(rows.conf[:2], torch.tensor([0.9, 0.3]))
    assert rows.feats[1].tolist() == [1.0, 5.0]  # (b, y, x) order, as the other memories
    back = BackQueue(3, 2, capacity=4)
    back.push(*rows)
    assert back.count.tolist() == [1, 1, 0]


def test_route_back_caps_each_class_and_is_random():
    b, c, h, w = 2, 4, 6, 6
    labels = torch.randint(0, c, (b, h, w), generator=_gen(0))
    labels[0, :3] = 255  # an ignore band: never sampled, whatever the cap
    logits = torch.randn(b, c, h, w, generator=_gen(1))
    rep = torch.randn(b, 3, h, w, generator=_gen(2))
    n_c = torch.bincount(labels[labels != 255], minlength=c)
    picks = torch.zeros(b * h * w)
    for seed in range(200):
        rows = route_back(rep, logits, labels, per_class=3, generator=_gen(100 + seed))
        sel = rows.cls >= 0
        assert not bool(sel[(labels == 255).flatten()].any())
        assert torch.equal(rows.cls[sel], labels.flatten()[sel])
        assert torch.bincount(rows.cls[sel], minlength=c).tolist() == n_c.clamp(max=3).tolist()
        picks += sel.float()
    # every pixel of class k is drawn with probability min(1, 3 / n_k)
    expect = (3.0 / n_c.float()).clamp(max=1.0)[labels.clamp(max=c - 1)].flatten() * 200
    expect[(labels == 255).flatten()] = 0.0
    assert float((picks - expect).abs().max()) < 40.0
    big = route_back(rep, logits, labels, per_class=10**6, generator=_gen(7))
    assert int((big.cls >= 0).sum()) == int(n_c.sum())


def _memory_with_counts(high_c: list[int], low_c: list[int], q: int) -> PrototypeMemory:
    mem = PrototypeMemory(len(high_c), 2, capacity=q)
    for kind, counts, base in (("high", high_c, 1000.0), ("low", low_c, 2000.0)):
        cls = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)]).long()
        feats = torch.stack([base + torch.arange(len(cls)).float(), cls.float()], 1)
        mem.push(kind, feats, cls)
    return mem


def _back_with_counts(counts: list[int], cap: int) -> BackQueue:
    """Class ``k`` holds rows with id ``100·k + i`` and p_gt ``i / 100`` (i = 0..n−1)."""
    back = BackQueue(len(counts), 2, capacity=cap)
    for k, n in enumerate(counts):
        i = torch.randperm(n, generator=_gen(k)).float()  # arrival order does not matter
        back.push(
            torch.stack([100 * k + i, torch.full((n,), float(k))], 1), i / 100, torch.full((n,), k)
        )
    return back


def _ids(mem: PrototypeMemory, kind: str, c: int) -> list[int]:
    feats, valid = mem.get(kind, ordered=True)
    return sorted(feats[c][valid[c]][:, 0].long().tolist())


def test_the_four_fallback_cases_by_hand():
    q, cap, m = 6, 12, 3  # queue_len 6, back 2·6, min_rows 3
    #            none  low   high  split split-odd split-empty-back high-capped
    high_c = [4, 5, 1, 2, 0, 0, 2]
    low_c = [4, 1, 3, 0, 1, 2, 6]
    back_c = [12, 9, 5, 8, 7, 0, 10]
    mem = _memory_with_counts(high_c, low_c, q)
    before = {k: [_ids(mem, k, c) for c in range(7)] for k in ("high", "low")}
    cases = apply_back_fallbacks(mem, _back_with_counts(back_c, cap), min_rows=m)
    assert cases.tolist() == [
        FALLBACK_NONE,
        FALLBACK_LOW,
        FALLBACK_HIGH,
        FALLBACK_SPLIT,
        FALLBACK_SPLIT,
        FALLBACK_SPLIT,
        FALLBACK_HIGH,
    ]
    # 0: unchanged
    assert _ids(mem, "high", 0) == before["high"][0] and _ids(mem, "low", 0) == before["low"][0]
    # 1: high kept; low := the 9 // 2 = 4 least confident back rows (official: ValueError)
    assert _ids(mem, "high", 1) == before["high"][1]
    assert _ids(mem, "low", 1) == [100, 101, 102, 103]
    # 2: high := the min(5, 6) most confident back rows = all of them; low kept
    assert _ids(mem, "high", 2) == [200, 201, 202, 203, 204]
    assert _ids(mem, "low", 2) == before["low"][2]
    # 3: split at half: low the less confident 4, high the more confident 4
    assert _ids(mem, "low", 3) == [300, 301, 302, 303]
    assert _ids(mem, "high", 3) == [304, 305, 306, 307]
    # 4: odd fill 7: low 3, high 4
    assert _ids(mem, "low", 4) == [400, 401, 402]
    assert _ids(mem, "high", 4) == [403, 404, 405, 406]
    # 5: empty back: both memories become empty (as officially)
    assert _ids(mem, "low", 5) == [] and _ids(mem, "high", 5) == []
    # 6: high := the min(10, 6) = 6 most confident
    assert _ids(mem, "high", 6) == [604, 605, 606, 607, 608, 609]
    assert mem.count["high"].tolist() == [4, 5, 5, 4, 4, 0, 6]
    assert mem.count["low"].tolist() == [4, 4, 3, 4, 3, 0, 6]
    # a refilled memory behaves as a freshly filled ring: the next push appends after it
    mem.push("low", torch.tensor([[9999.0, 3.0]]), torch.tensor([3]))
    assert _ids(mem, "low", 3) == [300, 301, 302, 303, 9999]


def test_fallback_with_a_longer_back_queue_keeps_the_extremes():
    mem = _memory_with_counts([0], [0], q=3)
    apply_back_fallbacks(mem, _back_with_counts([10], cap=10), min_rows=1)
    assert _ids(mem, "low", 0) == [0, 1, 2] and _ids(mem, "high", 0) == [7, 8, 9]


def test_back_queue_state_round_trip():
    back = BackQueue(3, 2, capacity=5)
    for step in range(4):
        back.push(*_rows(9, 3, seed=step, start=10 * step))
    other = BackQueue(3, 2, capacity=5)
    other.load_state_dict(back.state_dict())
    assert torch.equal(other.feats(), back.feats()) and torch.equal(other.conf(), back.conf())
    assert torch.equal(other.count, back.count)
    nxt = _rows(12, 3, seed=99, start=1000)
    back.push(*nxt)
    other.push(*nxt)
    assert torch.equal(other.feats(), back.feats()) and torch.equal(other.conf(), back.conf())
    with pytest.raises(ValueError):
        BackQueue(3, 2, capacity=6).load_state_dict(back.state_dict())
    back.clear()
    assert int(back.count.sum()) == 0 and not bool((back.conf() > float("-inf")).any())


def test_step_path_runs_on_meta_device():
    """No .item() and no data-dependent shape in route_back + push."""
    meta = torch.device("meta")
    b, c, d, h, w = 2, 3, 4, 5, 5
    rows = route_back(
        torch.randn(b, d, h, w, device=meta),
        torch.randn(b, c, h, w, device=meta),
        torch.randint(0, c, (b, h, w), device=meta),
        per_class=4,
    )
    back = BackQueue(c, d, capacity=6, device=meta)
    back.push(*rows)
    assert back.feats().shape == (c, 6, d) and back.count.shape == (c,)


def test_config_and_coco_preset():
    cfg = load_config("coco_brpg_1_32")
    assert cfg.proto.back_queue and cfg.proto.back_len == 0 and cfg.proto.min_rows == 10
    assert load_config("digits_suponly_1_16").proto.back_queue is False
    with pytest.raises(ConfigError, match="back_queue"):
        load_config(
            "digits_suponly_1_16",
            ["train.framework=meanteacher", "train.brpg=true", "model.rep_head=true", "proto.memory=random",
             "proto.back_queue=true"],
        )  # fmt: skip
    with pytest.raises(ConfigError, match="back_per_class"):
        load_config(
            "digits_suponly_1_16",
            ["train.framework=meanteacher", "train.brpg=true", "proto.back_per_class=0"],
        )


# --------------------------------------------------------------------------- training run
BACK = ("proto.back_queue=true", "proto.back_per_class=16", "proto.high_threshold=0.12",
        "proto.unlabeled_threshold=0.12")  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits")


@pytest.fixture(scope="module")
def straight(data_root, tmp_path_factory):
    """A tiny brpg run with the back queue; records what the clustering saw."""
    cfg = load_config("digits_suponly_1_16", tiny(data_root, extra=BACK))
    seen: dict[str, list] = {}
    real_fb, real_cm = plugin_mod.apply_back_fallbacks, clustering_mod.cluster_memories

    def fallbacks(memory, back, min_rows):
        seen["back"] = back.count.tolist()
        seen["before"] = [memory.count[k].tolist() for k in ("high", "low")]
        out = real_fb(memory, back, min_rows)
        seen["after"] = [memory.count[k].tolist() for k in ("high", "low")]
        return out

    def cluster(high, high_valid, low, low_valid, **kw):
        seen["clustered"] = [high_valid.sum(1).tolist(), low_valid.sum(1).tolist()]
        return real_cm(high, high_valid, low, low_valid, **kw)

    mp_ = pytest.MonkeyPatch()
    mp_.setattr(plugin_mod, "apply_back_fallbacks", fallbacks)
    mp_.setattr(clustering_mod, "cluster_memories", cluster)
    try:
        run = tmp_path_factory.mktemp("straight")
        tr = _run(cfg, run)
    finally:
        mp_.undo()
    return tr, run, seen


def test_run_fills_the_back_queue_and_falls_back_before_clustering(straight):
    tr, run, seen = straight
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    events = [r for r in records if "back_fallback" in r]
    assert len(events) == 1 and events[0]["step"] == 7
    cases = events[0]["back_fallback"]
    assert {FALLBACK_NONE, FALLBACK_LOW, FALLBACK_SPLIT} <= set(cases)  # incl. the fixed crash
    assert max(seen["back"]) <= 3 * 16  # 3 sampling steps, at most 16 rows per class and step
    assert seen["clustered"] == seen["after"] != seen["before"]  # APO/k-means see the fallback
    for c, case in enumerate(cases):
        n = seen["back"][c]
        if case == FALLBACK_SPLIT:
            assert [seen["after"][0][c], seen["after"][1][c]] == [n - n // 2, n // 2]
        if case == FALLBACK_LOW:
            assert seen["after"][1][c] == n // 2 and seen["after"][0][c] == seen["before"][0][c]
    assert (
        tr.method.plugin.back is None and tr.method.plugin.memory is None
    )  # freed with the memories


@pytest.mark.parametrize("crash_at", [6, 7])  # in the sampling window, at the clustering
def test_resume_with_the_back_queue_is_exact(data_root, tmp_path, straight, crash_at):
    ref, ref_dir, _ = straight
    cfg = load_config("digits_suponly_1_16", tiny(data_root, extra=BACK))
    run = tmp_path / "crashed"
    _run(cfg, run, crash_at=crash_at)
    ckpt = torch.load(run / "last.pt", weights_only=False)
    back = ckpt["method"]["back"]
    assert back is not None and int(back["count"].sum()) > 0
    resumed = _run(cfg, run, resume=True)
    a, b = _state(ref), _state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after a crash before step {crash_at}"

    def records(d: Path) -> list[dict]:
        out = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in out]

    assert records(run) == records(ref_dir)


# --------------------------------------------------------------------------- 2-process gather
def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        back = BackQueue(3, 2, capacity=6)
        for step in range(4):
            back.push(*_rows(10, 3, seed=10 * step + rank, start=1000 * rank + 10 * step))
        mem = PrototypeMemory(3, 2, capacity=3)
        apply_back_fallbacks(mem, back, min_rows=1)
        torch.save({"back": back.state_dict(), "mem": mem.state_dict()}, f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_push_gives_identical_back_queues(tmp_path):
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "r0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "r1.pt", weights_only=True)
    for key in ("feats", "conf", "count"):
        assert torch.equal(s0["back"][key], s1["back"][key])
    for kind in ("high", "low"):
        for key in ("feats", "count"):
            assert torch.equal(s0["mem"]["memories"][kind][key], s1["mem"]["memories"][kind][key])
    # equal to one process pushing rank 0's rows, then rank 1's, every step
    single, ref = BackQueue(3, 2, capacity=6), _Reference(3, 6)
    for step in range(4):
        rows = [_rows(10, 3, seed=10 * step + r, start=1000 * r + 10 * step) for r in range(2)]
        cat = [torch.cat([x[i] for x in rows]) for i in range(3)]
        single.push(*cat)
        ref.push(*cat)
    assert torch.equal(single.conf(), s0["back"]["conf"])
    loaded = BackQueue(3, 2, capacity=6)
    loaded.load_state_dict(s0["back"])
    _check(loaded, ref)
    assert int(loaded.count.sum()) > 3  # rows of both ranks arrived


# ------------------------------------------------ edges found by mutation testing (issue 18)
def test_route_back_checks_the_label_shape():
    rep, logits = torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="labels_small_bhw must be at the logits' resolution"):
        route_back(rep, logits, torch.zeros(1, 4, 4, dtype=torch.long))


def test_route_back_takes_the_last_class_whatever_the_map_size():
    # C = 3 classes on a 1×4 map (h < C): label 2 is a class, label 3 is not
    probs = [[[[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]]]
    rows = route_back(torch.zeros(1, 2, 1, 4), _logits_from(probs), torch.tensor([[[0, 1, 2, 3]]]))
    assert rows.cls.tolist() == [0, 1, 2, -1]
    torch.testing.assert_close(rows.conf[:3], torch.tensor([0.7, 0.3, 0.6]))


def test_route_back_defaults_ignore_255_and_keep_5000_per_class():
    # 256 classes: label 255 is still ignored by default (it is a class only with another index)
    logits = torch.zeros(1, 256, 1, 2)
    labels = torch.tensor([[[255, 3]]])
    assert route_back(torch.zeros(1, 2, 1, 2), logits, labels).cls.tolist() == [-1, 3]
    rows = route_back(torch.zeros(1, 2, 1, 2), logits, labels, ignore_index=0)
    assert rows.cls.tolist() == [255, 3]
    # 5001 pixels of one class: the official per-class cap of 5000 drops exactly one
    n = 5001
    rows = route_back(
        torch.zeros(1, 1, 1, n), torch.zeros(1, 2, 1, n), torch.zeros(1, 1, n, dtype=torch.long)
    )
    assert int((rows.cls == 0).sum()) == 5000 and int((rows.cls >= 0).sum()) == 5000


def test_route_back_with_a_single_class_and_ignore_pixels():
    # C = 1: an ignored pixel must read its (unused) p_gt at a class that exists
    rows = route_back(torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2), torch.tensor([[[0, 255]]]))
    assert rows.cls.tolist() == [0, -1]
    assert rows.conf.tolist() == [1.0, 1.0]


def test_route_back_keeps_the_lowest_scores_of_its_generator_per_class():
    """The documented draw, checked with a plain loop: one uniform score per pixel from the
    generator, and per class the ``per_class`` pixels with the lowest scores (i.e. a uniform
    random subset). The global RNG is neither used nor needed."""
    b, c, h, w, per_class = 1, 3, 12, 12, 5
    labels = torch.randint(0, c, (b, h, w), generator=_gen(0))
    labels[0, 0, :4] = 255
    logits = torch.randn(b, c, h, w, generator=_gen(1))
    rep = torch.zeros(b, 2, h, w)
    flat = labels.flatten().tolist()
    for seed in range(5):
        scores = torch.rand(b * h * w, generator=_gen(seed)).tolist()
        want = [-1] * len(flat)
        for k in range(c):
            pixels = sorted(
                (s, i) for i, (s, y) in enumerate(zip(scores, flat, strict=True)) if y == k
            )
            for _, i in pixels[:per_class]:
                want[i] = k
        outs = []
        for global_seed in (10, 11):
            torch.manual_seed(global_seed)
            state = torch.get_rng_state()
            outs.append(route_back(rep, logits, labels, per_class, generator=_gen(seed)).cls)
            assert torch.equal(torch.get_rng_state(), state), "the global RNG was used"
        assert outs[0].tolist() == outs[1].tolist() == want
