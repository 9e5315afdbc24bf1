"""Edge cases of the CPG memories and the one-shot clustering (mutation testing, issue 18).

``brpg.method.clustering``: the slot budgets of both memory modes, the settings that must reach
the k-means and APO (config values, not their defaults), empty memories keeping the layout.
``brpg.method.memory``: see the second half.

Machine: exact, fp32-tolerance, bound. Slot budgets, the settings that reach k-means and APO, the
memory ring and the back queue are exact; a one-row cluster's centre equals its row
(fp32-tolerance); that APO gives the dispersed class its extra cluster and that k-means fills at
least three slots are properties of a clustering of seeded, well-separated data (bound).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from brpg.config import ProtoConfig, load_config
from brpg.method import clustering as clustering_mod
from brpg.method.apo import n_add_classes
from brpg.method.clustering import (
    cluster_memories,
    cluster_memory,
    cluster_prototypes,
    slot_budgets,
)
from brpg.method.memory import (
    FALLBACK_NONE,
    FALLBACK_SPLIT,
    BackQueue,
    PrototypeMemory,
    apply_back_fallbacks,
)

# --------------------------------------------------------------------------- clustering


def test_slot_budgets_of_both_memory_modes():
    p = dataclasses.replace(ProtoConfig(), num_high=2, num_low=3, add_num=2, apo=True)
    assert slot_budgets(p) == (4, 5)
    # "random": one memory clustered into num_high + num_low (+ add_num with APO), no low slots
    assert slot_budgets(dataclasses.replace(p, memory="random")) == (7, 0)
    assert slot_budgets(dataclasses.replace(p, memory="random", apo=False)) == (5, 0)
    assert slot_budgets(dataclasses.replace(p, apo=False)) == (2, 3)


def _spy_kmeans(monkeypatch):
    """Record ``(k, kwargs)`` of every k-means call of the clustering (the real one runs)."""
    calls, real = [], clustering_mod.batched_kmeans_full

    def spy(x, k, **kwargs):
        calls.append((k.clone(), kwargs))
        return real(x, k, **kwargs)

    monkeypatch.setattr(clustering_mod, "batched_kmeans_full", spy)
    return calls


def test_cluster_memory_defaults_are_the_official_kmeans_settings(monkeypatch):
    """MiniBatchKMeans(random_state=0) with its n_init = 3, 100 iterations, no subsampling;
    explicit settings reach the k-means unchanged."""
    calls = _spy_kmeans(monkeypatch)
    feats = torch.randn(3, 20, 4, generator=torch.Generator().manual_seed(0))
    cluster_memory(feats, None, 2, apo=False)
    k, kw = calls[-1]
    assert k.tolist() == [2, 2, 2] and k.dtype == torch.long
    assert (kw["iters"], kw["seed"], kw["n_init"], kw["subsample"]) == (100, 0, 3, None)
    cluster_memory(feats, None, 2, apo=False, iters=7, seed=5, n_init=2, subsample=9)
    _, kw = calls[-1]
    assert (kw["iters"], kw["seed"], kw["n_init"], kw["subsample"]) == (7, 5, 2, 9)


def test_apo_measures_the_dispersion_of_valid_rows_only():
    """Class 0's valid rows are tight but its padding is scattered; class 1's valid rows are
    the dispersed ones, so APO must give class 1 the extra cluster."""
    g = torch.Generator().manual_seed(0)
    d = 6
    axis = torch.zeros(d)
    axis[0] = 1.0
    feats = torch.randn(2, 40, d, generator=g) * 10  # scattered (padding in class 0)
    feats[0, :20] = axis + 0.01 * torch.randn(20, d, generator=g)
    feats[1] = axis + 0.5 * torch.randn(40, d, generator=g)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[0, 20:] = False
    res, budget = cluster_memory(feats, valid, 2)
    assert res.center_valid.sum(1).tolist() == [2, 3] and budget == 3


def test_an_empty_memory_kind_keeps_the_slot_layout():
    """With every low memory empty APO finds no class to extend, yet the bank layout keeps
    the configured budgets (K_h = base_high + add_num, K_l = base_low + add_num), and the
    high memories' padding rows are not clustered."""
    g = torch.Generator().manual_seed(1)
    c, n, d = 3, 30, 4
    hi, lo = torch.randn(c, n, d, generator=g), torch.randn(c, n, d, generator=g)
    hi_valid = torch.ones(c, n, dtype=torch.bool)
    hi_valid[0, 1:] = False  # class 0: a single high row
    lo_valid = torch.zeros(c, n, dtype=torch.bool)
    protos, valid = cluster_memories(hi, hi_valid, lo, lo_valid, base_high=3, base_low=1)
    assert protos.shape == (c, 4 + 2, d)
    assert not valid[:, 4:].any()
    assert valid[0, :4].sum() == 1
    torch.testing.assert_close(protos[0, 0], hi[0, 0])
    assert valid[1:, :4].sum(1).min() >= 3


def _config(memory, *extra):
    return load_config(
        "digits_brpg_1_16",
        [f"proto.memory={memory}", "model.rep_dim=4", *extra],
    )


def _filled_memory(kinds, c, d, n=24, seed=0):
    mem = PrototypeMemory(c, d, n, kinds)
    g = torch.Generator().manual_seed(seed)
    for kind in kinds:
        rows = torch.randn(c * n, d, generator=g) * torch.rand(c * n, 1, generator=g) * 5
        mem.push(kind, rows, torch.arange(c).repeat_interleave(n))
    return mem


@pytest.mark.parametrize("memory", ["cpg", "random"])
def test_cluster_prototypes_passes_every_setting_of_the_config(monkeypatch, memory):
    """Non-default values of every APO and k-means setting reach the clustering."""
    extra = [
        "proto.num_high=3",
        "proto.num_low=1",
        "proto.add_num=2",
        "proto.add_proportion=0.3",
        "proto.dispersion=l2",
        "proto.kmeans_iters=7",
        "proto.kmeans_n_init=2",
        "proto.kmeans_subsample=16",
    ]
    cfg = _config(memory, *extra)
    c, d = cfg.data.num_classes, 4
    kinds = ("high", "low") if memory == "cpg" else ("all",)
    mem = _filled_memory(kinds, c, d)
    calls = _spy_kmeans(monkeypatch)
    metrics, real_disp = [], clustering_mod.dispersion

    def disp(feats, valid, metric):
        metrics.append(metric)
        return real_disp(feats, valid, metric)

    monkeypatch.setattr(clustering_mod, "dispersion", disp)
    protos, valid = cluster_prototypes(mem, cfg, seed=5)
    bases = [3, 1] if memory == "cpg" else [4]
    assert len(calls) == len(bases) and metrics == ["l2"] * len(bases)
    for (k, kw), base in zip(calls, bases, strict=True):
        assert (kw["iters"], kw["seed"], kw["n_init"], kw["subsample"]) == (7, 5, 2, 16)
        assert set(k.tolist()) == {base, base + 2}
        assert int((k == base + 2).sum()) == n_add_classes(c, 0.3)  # 3 of the 11 classes
    width = 5 + 3 if memory == "cpg" else 6
    assert protos.shape == (c, width, d) and valid.shape == (c, width)
    # without APO: the base counts, no dispersion; subsample 0 means full-batch k-means
    calls.clear()
    metrics.clear()
    cfg = _config(memory, *extra[:2], "proto.apo=false", "proto.kmeans_subsample=0")
    protos, _ = cluster_prototypes(mem, cfg, seed=0)
    assert metrics == []
    assert [k.tolist() for k, _ in calls] == [[b] * c for b in bases]
    assert all(kw["subsample"] is None for _, kw in calls)
    assert protos.shape[1] == (3 + 1 if memory == "cpg" else 4)


def test_random_memory_left_empty_keeps_its_slot_budget():
    cfg = _config("random")
    c = cfg.data.num_classes
    mem = PrototypeMemory(c, 4, 8, ("all",))  # nothing pushed
    protos, valid = cluster_prototypes(mem, cfg, seed=0)
    k_all = cfg.proto.num_high + cfg.proto.num_low + cfg.proto.add_num
    assert protos.shape == (c, k_all, 4) and not valid.any()


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("cls", [PrototypeMemory, BackQueue])
def test_queue_shape_must_be_positive(cls):
    for bad in ((0, 2, 3), (2, 0, 3), (2, 2, 0)):
        msg = "num_classes, dim and capacity must be positive, got " + ", ".join(map(str, bad))
        with pytest.raises(ValueError, match=msg):
            cls(*bad)
    q = cls(1, 1, capacity=1)  # the smallest valid queue
    assert (q.num_classes, q.dim, q.capacity) == (1, 1, 1)


def test_official_defaults():
    """queue_len = 30000 rows per class and kind; the COCO back queue keeps 2·queue_len."""
    mem = PrototypeMemory(2, 3)
    assert mem.capacity == 30000 and mem.kinds == ("high", "low") and mem.sync
    assert mem.device == torch.device("cpu") and mem.feats("high").dtype == torch.float32
    assert mem.feats("low").shape == (2, 30000, 3)
    back = BackQueue(2, 3)
    assert back.capacity == 60000 and back.sync and back.device == torch.device("cpu")
    assert back.feats().shape == (2, 60000, 3) and back.feats().dtype == torch.float32


def test_push_checks_row_shapes():
    mem = PrototypeMemory(2, 3, capacity=4)
    with pytest.raises(ValueError, match=r"expected rows \[N, 3\], got \(4, 2\)"):
        mem.push("high", torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected rows \[N, 3\], got \(3,\)"):
        mem.push("high", torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="cls_n must have one entry per row"):
        mem.push("high", torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))
    back = BackQueue(2, 3, capacity=4)
    ok = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"expected rows \[N, 3\], got \(4, 2\)"):
        back.push(torch.zeros(4, 2), torch.zeros(4), ok)
    for conf, cls in ((torch.zeros(3), ok), (torch.zeros(4), ok[:3])):
        with pytest.raises(ValueError, match="conf_n and cls_n must have one entry per row"):
            back.push(torch.zeros(4, 3), conf, cls)


def _rows(values):
    """Rows ``[[v, -v]]`` that identify themselves."""
    v = torch.tensor(values, dtype=torch.float32)
    return torch.stack([v, -v], 1)


def test_ring_wraps_and_ignores_rows_outside_the_classes():
    mem = PrototypeMemory(2, 2, capacity=3, kinds=("high",))
    # class 1 gets 1, 2; rows of class -1 and 2 (= C) go nowhere
    mem.push("high", _rows([1, 9, 2, 8]), torch.tensor([1, -1, 1, 2]))
    assert mem.count["high"].tolist() == [0, 2] and mem.ptr["high"].tolist() == [0, 2]
    mem.push("high", _rows([3, 4, 5]), torch.tensor([1, 1, 0]))
    # class 1: 1, 2, 3 fill the ring, 4 overwrites the oldest (1) in slot 0
    assert mem.count["high"].tolist() == [1, 3] and mem.ptr["high"].tolist() == [1, 1]
    assert mem.feats("high")[1, :, 0].tolist() == [4.0, 2.0, 3.0]
    assert mem.feats("high")[0, 0].tolist() == [5.0, -5.0]
    feats, valid = mem.get("high")
    assert valid.tolist() == [[True, False, False], [True, True, True]]
    assert feats.data_ptr() == mem.feats("high").data_ptr()  # the storage, no copy
    ordered, valid_o = mem.get("high", ordered=True)
    assert ordered[1, :, 0].tolist() == [2.0, 3.0, 4.0]  # oldest first
    assert ordered[0, 0, 0].item() == 5.0 and torch.equal(valid_o, valid)
    # more than `capacity` rows of a class at once: the last `capacity` are kept, in order
    mem.push("high", _rows([10, 11, 12, 13, 14]), torch.ones(5, dtype=torch.long))
    assert mem.get("high", ordered=True)[0][1, :, 0].tolist() == [12.0, 13.0, 14.0]
    assert mem.count["high"].tolist() == [1, 3] and mem.ptr["high"].tolist() == [1, 0]


def test_replace_clear_and_state_dict_round_trip():
    mem = PrototypeMemory(3, 2, capacity=4)
    mem.push("low", _rows([1, 2, 3, 4, 5]), torch.tensor([0, 0, 1, 2, 2]))
    # replace class 2's low memory with rows of class 2 only (the class-0 and -1 rows are not
    # for a replaced class, the class-3 row is outside [0, C))
    mem.replace("low", torch.tensor([False, False, True]), _rows([7, 8, 9, 6]),
                torch.tensor([2, 0, -1, 3]))  # fmt: skip
    assert mem.count["low"].tolist() == [2, 1, 1] and mem.ptr["low"].tolist() == [2, 1, 1]
    assert mem.get("low", ordered=True)[0][2, 0, 0].item() == 7.0
    assert mem.get("low", ordered=True)[0][0, :2, 0].tolist() == [1.0, 2.0]
    state = mem.state_dict()
    assert (state["num_classes"], state["dim"], state["capacity"]) == (3, 2, 4)
    assert state["kinds"] == ["high", "low"]
    other = PrototypeMemory(3, 2, capacity=4)
    other.load_state_dict(state)
    for kind in ("high", "low"):
        assert torch.equal(other.feats(kind), mem.feats(kind))
        assert torch.equal(other.ptr[kind], mem.ptr[kind])
        assert torch.equal(other.count[kind], mem.count[kind])
    mem.clear()
    for kind in ("high", "low"):
        assert mem.count[kind].tolist() == [0, 0, 0] and mem.ptr[kind].tolist() == [0, 0, 0]
    assert other.count["low"].tolist() == [2, 1, 1]  # the state was a copy
    msg = r"memory layout \(3, 2, 4, \('all',\)\) does not match \(3, 2, 4, \('high', 'low'\)\)"
    with pytest.raises(ValueError, match=msg):
        other.load_state_dict(PrototypeMemory(3, 2, capacity=4, kinds=("all",)).state_dict())


def test_back_queue_keeps_the_most_confident_rows_per_class():
    back = BackQueue(2, 2, capacity=2)
    back.push(_rows([1, 2, 3, 4, 5]), torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3]),
              torch.tensor([0, 0, 0, 5, -1]))  # fmt: skip
    assert back.count.tolist() == [2, 0]
    slots = back.ascending()
    assert back.feats()[0, slots[0], 0].tolist() == [1.0, 2.0]  # p_gt 0.5, 0.9
    back.push(_rows([6]), torch.tensor([0.6]), torch.tensor([0]))
    assert back.feats()[0, back.ascending()[0], 0].tolist() == [6.0, 2.0]
    assert sorted(back.conf()[0].tolist()) == pytest.approx([0.6, 0.9])
    state = back.state_dict()
    other = BackQueue(2, 2, capacity=2)
    other.load_state_dict(state)
    assert torch.equal(other.feats(), back.feats()) and torch.equal(other.conf(), back.conf())
    assert other.count.tolist() == [2, 0]
    back.clear()
    assert back.count.tolist() == [0, 0] and (back.conf() == float("-inf")).all()
    with pytest.raises(ValueError, match=r"back queue layout \(2, 2, 2\) does not match"):
        BackQueue(2, 2, capacity=3).load_state_dict(state)


def test_fallbacks_need_matching_queues_and_default_to_ten_rows():
    with pytest.raises(ValueError, match="same classes and width"):
        apply_back_fallbacks(PrototypeMemory(2, 2, capacity=4), BackQueue(3, 2, capacity=4))
    with pytest.raises(ValueError, match="same classes and width"):
        apply_back_fallbacks(PrototypeMemory(2, 2, capacity=4), BackQueue(2, 3, capacity=4))
    # 10 high and low rows are enough (official min_rows); 9 are not
    mem = PrototypeMemory(2, 2, capacity=16)
    for kind in ("high", "low"):
        mem.push(kind, torch.zeros(19, 2), torch.tensor([0] * 10 + [1] * 9))
    back = BackQueue(2, 2, capacity=4)
    assert apply_back_fallbacks(mem, back).tolist() == [FALLBACK_NONE, FALLBACK_SPLIT]


def test_memory_storage_keeps_the_requested_dtype():
    mem = PrototypeMemory(2, 3, capacity=4, dtype=torch.float64)
    back = BackQueue(2, 3, capacity=4, dtype=torch.float64)
    rows = torch.tensor([[1 / 3, 2.0, 3.0]], dtype=torch.float64)  # not exact in float32
    mem.push("high", rows, torch.tensor([1]))
    back.push(rows, torch.tensor([0.5]), torch.tensor([1]))
    assert mem.feats("high").dtype == torch.float64 and back.feats().dtype == torch.float64
    assert mem.feats("high")[1, 0, 0].item() == 1 / 3  # class 1, first slot


def test_back_queue_order_breaks_ties_by_slot():
    """Equal p_gt (and the empty slots) keep slot order, on every device: an unstable sort
    (non-deterministic beyond ~100 entries on the CPU) could change which rows refill a memory."""
    back = BackQueue(1, 1, capacity=300)
    conf = torch.tensor([0.25, 0.5] * 100)  # 200 rows in 2 tie groups, 100 slots left empty
    back.push(torch.arange(200.0)[:, None], conf, torch.zeros(200, dtype=torch.long))
    slot_conf = back.conf()[0].tolist()
    key = [(c if c > float("-inf") else float("inf"), i) for i, c in enumerate(slot_conf)]
    assert back.ascending()[0].tolist() == [i for _, i in sorted(key)]
