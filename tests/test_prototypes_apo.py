"""APO: dispersion scores, extra-prototype selection, clustering into the bank layout (spec §6).

Machine: exact, same-machine, fp32-tolerance, bound. Dispersion scores against hand-computed values
are fp32-tolerance; counts and class selection from given scores are exact; the default metric and
the mask forms are compared with each other exactly (same-machine); the clustering of seeded
synthetic memories (the bimodal class gets the extra prototype, which sits near its modes) is
bound.
"""

from __future__ import annotations

import math

import pytest
import torch

from brpg.method.apo import (
    apo_counts,
    dispersed_mask,
    dispersion,
    dispersion_cos,
    n_add_classes,
    select_classes,
)
from brpg.method.clustering import cluster_memories
from brpg.method.prototype_ema import PrototypeBank

R2 = 1 / math.sqrt(2)


def test_dispersion_hand_computed():
    x = torch.tensor(
        [
            [
                [1.0, 0.0],
                [0.0, 1.0],
                [9.0, -9.0],
            ],  # mean (.5,.5): each row at cos 1/√2 (3rd masked)
            [[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]],  # all along the mean: 1
            [[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]],
            [[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]],
        ]
    )
    valid = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]]).bool()
    cos = dispersion_cos(x, valid)
    torch.testing.assert_close(cos[:2], torch.tensor([R2, 1.0]))
    torch.testing.assert_close(dispersion(x, valid, "cos_sim"), cos, equal_nan=True)
    # l2: rows (0,0),(2,0) → mean (1,0) → distances 1, 1
    assert dispersion(x, valid, "l2")[2].item() == pytest.approx(1.0)
    # l2_norm: (3,0),(0,4) → (1,0),(0,1), mean (.5,.5) → distances 1/√2
    assert dispersion(x, valid, "l2_norm")[3].item() == pytest.approx(R2)
    with pytest.raises(ValueError):
        dispersion(x, valid, "bogus")


def test_empty_memory_has_nan_score_and_is_never_selected():
    x = torch.randn(3, 4, 2)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[0] = False
    assert math.isnan(dispersion_cos(x, valid)[0].item())
    scores = torch.tensor([float("nan"), 0.3, 0.9])
    assert apo_counts(scores, base=2).tolist() == [2, 3, 2]
    assert apo_counts(torch.tensor([float("nan"), 5.0, 1.0]), 2, metric="l2").tolist() == [2, 3, 2]


@pytest.mark.parametrize(("c", "n_add"), [(21, 1), (19, 1), (81, 4), (10, 1), (2, 1), (200, 10)])
def test_n_add_rounding(c, n_add):
    # round(1.05) = 1 (VOC), round(0.95) = 1 (Cityscapes), round(4.05) = 4 (COCO), min 1
    assert n_add_classes(c, 0.05) == n_add
    scores = torch.linspace(0.1, 0.9, c)[
        torch.randperm(c, generator=torch.Generator().manual_seed(c))
    ]
    extra = select_classes(scores, 0.05, add_num=1)
    assert extra.sum().item() == n_add
    assert set(torch.nonzero(extra).flatten().tolist()) == set(scores.argsort()[:n_add].tolist())


def test_ties_select_more_and_direction_of_l2():
    scores = torch.tensor([0.5, 0.2, 0.2, 0.9])
    assert apo_counts(scores, base=2).tolist() == [2, 3, 3, 2]
    assert apo_counts(scores, base=2, add_num=2, metric="l2").tolist() == [2, 2, 2, 4]
    assert select_classes(scores, higher_is_dispersed=True).tolist() == [0, 0, 0, 1]


def _memories(g, c, n, d, bimodal: int):
    """c class memories near a class direction; class ``bimodal`` is two opposite-ish modes."""
    dirs = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=1) * 5
    x = dirs[:, None, :] + 0.3 * torch.randn(c, n, d, generator=g)
    other = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * 5
    x[bimodal, n // 2 :] = other + 0.3 * torch.randn(n - n // 2, d, generator=g)
    return x


def test_bimodal_class_gets_extra_prototype():
    g = torch.Generator().manual_seed(0)
    x = _memories(g, c=5, n=60, d=8, bimodal=2)
    scores = dispersion_cos(x, torch.ones(5, 60, dtype=torch.bool))
    assert scores.argmin().item() == 2
    assert apo_counts(scores, base=2).tolist() == [2, 2, 3, 2, 2]


def test_cluster_memories_high_low_independent():
    g = torch.Generator().manual_seed(1)
    c, n, d = 4, 60, 8
    hi = _memories(g, c, n, d, bimodal=1)
    lo = _memories(g, c, n, d, bimodal=3)
    hi_valid = torch.ones(c, n, dtype=torch.bool)
    lo_valid = torch.ones(c, n, dtype=torch.bool)
    lo_valid[0, 1:] = False  # class 0's low memory holds a single row
    protos, valid = cluster_memories(hi, hi_valid, lo, lo_valid, seed=0)
    assert protos.shape == (c, 6, d)
    assert valid[:, :3].sum(1).tolist() == [2, 3, 2, 2]  # extra high prototype: class 1
    assert valid[:, 3:].sum(1).tolist() == [1, 2, 2, 3]  # extra low prototype: class 3
    torch.testing.assert_close(protos[0, 3], lo[0, 0])
    bank = PrototypeBank(c, d, 6)
    bank.set_prototypes(protos, valid)
    assert bank.num_valid().tolist() == [3, 5, 4, 5]
    # the bimodal class's two high prototypes sit on its two modes
    modes = torch.stack([hi[1, : n // 2].mean(0), hi[1, n // 2 :].mean(0)])
    dist_to_modes = torch.cdist(modes, protos[1, :3][valid[1, :3]])
    assert (dist_to_modes.min(1).values < 0.5).all()
    # without APO: base counts, K = 4
    p2, v2 = cluster_memories(hi, hi_valid, lo, lo_valid, apo=False)
    assert p2.shape == (c, 4, d) and v2.sum(1).tolist() == [3, 4, 4, 4]


@pytest.mark.parametrize("memory", ["cpg", "random"])
@pytest.mark.parametrize("metric", ["cos_sim", "l2", "l2_norm"])
def test_apo_gives_the_extra_prototype_to_the_most_dispersed_class_in_both_memory_modes(
    memory, metric
):
    """One clustering entry point for both memory modes: the APO metric reaches the random
    memory too (it once called ``apo_counts`` without ``metric``, so with ``l2`` / ``l2_norm``
    APO picked the *least* dispersed class there)."""
    from brpg.config import load_config
    from brpg.method.clustering import cluster_prototypes
    from brpg.method.memory import PrototypeMemory

    cfg = load_config(
        "digits_brpg_1_16",
        [f"proto.memory={memory}", f"proto.dispersion={metric}", "model.rep_dim=8"],
    )
    p, c, d, n = cfg.proto, cfg.data.num_classes, 8, 64
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(c, 1, d, generator=g) * 5
    spread = torch.full((c, 1, 1), 0.05)
    spread[3] = 3.0  # class 3: far more dispersed by every metric
    rows = centre + spread * torch.randn(c, n, d, generator=g)
    kinds = ("high", "low") if memory == "cpg" else ("all",)
    mem = PrototypeMemory(c, d, n, kinds)
    for kind in kinds:
        mem.push(kind, rows.reshape(c * n, d), torch.arange(c).repeat_interleave(n))
    _, valid = cluster_prototypes(mem, cfg, seed=0)
    per_class = valid.sum(1)
    base = p.num_high + p.num_low
    assert n_add_classes(c, p.add_proportion) == 1
    assert per_class[3] == base + (2 if memory == "cpg" else 1) * p.add_num
    assert (per_class[torch.arange(c) != 3] == base).all()


# ------------------------------------------------ edges found by mutation testing (issue 18)
def test_dispersion_defaults_and_mask_forms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g)
    full = torch.ones(3, 5, dtype=torch.bool)
    assert torch.equal(dispersion(x), dispersion(x, full, metric="cos_sim"))  # default metric
    assert torch.equal(dispersion_cos(x), dispersion_cos(x, full))
    mask = torch.rand(3, 5, generator=g) > 0.4
    mask[:, 0] = True
    for metric in ("cos_sim", "l2", "l2_norm"):
        assert torch.equal(dispersion(x, mask.long(), metric), dispersion(x, mask, metric))
        assert torch.equal(dispersion(x, mask.float(), metric), dispersion(x, mask, metric))
    # "l2_norm" normalises each row (over D), then measures like "l2"
    unit = x / x.norm(dim=2, keepdim=True)
    torch.testing.assert_close(dispersion(x, mask, "l2_norm"), dispersion(unit, mask, "l2"))
    with pytest.raises(ValueError, match="unknown APO metric 'cos'"):
        dispersion(x, metric="cos")


def test_a_one_row_memory_is_perfectly_concentrated():
    x = torch.tensor([[[3.0, 4.0], [9.0, 9.0]]])
    one = torch.tensor([[True, False]])
    assert dispersion(x, one, "cos_sim").tolist() == [pytest.approx(1.0)]
    assert dispersion(x, one, "l2").tolist() == [0.0]
    assert dispersion(x, one, "l2_norm").tolist() == [0.0]


def test_apo_default_proportion_is_five_percent():
    assert [n_add_classes(c) for c in (19, 21, 29, 30, 81)] == [1, 1, 1, 2, 4]
    scores = torch.linspace(0.0, 1.0, 21)  # cos_sim: lowest = most dispersed
    assert dispersed_mask(scores).nonzero().flatten().tolist() == [0]
    assert dispersed_mask(scores, higher_is_dispersed=True).nonzero().flatten().tolist() == [20]
    assert dispersed_mask(scores[:10], 0.2).nonzero().flatten().tolist() == [0, 1]
