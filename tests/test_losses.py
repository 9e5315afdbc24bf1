"""Supervised CE + OHEM losses (spec §4.3).

Machine: exact, fp32-tolerance. OHEM and CE losses against hand-worked values, a sort-based
reference and F.cross_entropy are fp32-tolerance (rel 1e-5 / 1e-6); which pixels get a gradient,
and the zero of an all-ignored batch, are exact.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from brpg.config import LossConfig
from brpg.frameworks.supervised import ohem_ce, supervised_loss

# Five pixels in a 1×1×5 image, two classes, target class 0 everywhere except an ignore pixel.
# With logits (0, z), p_gt = 1 / (1 + e^z), so z = log(1/p − 1) gives any chosen p_gt.
P_GT = [0.9, 0.6, 0.8, 0.3]


def _toy() -> tuple[torch.Tensor, torch.Tensor]:
    z = [math.log(1 / p - 1) for p in P_GT] + [5.0]  # last pixel is ignored
    logits_bchw = torch.zeros(1, 2, 1, 5)
    logits_bchw[0, 1, 0] = torch.tensor(z)
    target_bhw = torch.tensor([[[0, 0, 0, 0, 255]]])
    return logits_bchw.requires_grad_(), target_bhw


def _mean_nll(ps: list[float]) -> float:
    return sum(-math.log(p) for p in ps) / len(ps)


def _reference_ohem(logits, target, thresh, min_kept, ignore=255):
    """A direct, sort-based transcription of spec §4.3, for random cross-checks."""
    p = F.softmax(logits.detach().float(), 1)
    valid = target != ignore
    t = target.clone()
    t[~valid] = 0
    p_gt = p.gather(1, t.unsqueeze(1)).squeeze(1)
    if int(valid.sum()) < min_kept:
        keep = valid
    else:
        kth = p_gt[valid].sort().values[min_kept - 1]
        keep = valid & (p_gt <= max(thresh, float(kth)))
    t[~keep] = ignore
    return F.cross_entropy(logits.float(), t, ignore_index=ignore)


def test_ohem_threshold_dominates():
    # min_kept = 2: 2nd smallest p_gt is 0.6 < 0.7, so τ = 0.7 → keep {0.6, 0.3}.
    logits, target = _toy()
    loss = ohem_ce(logits, target, thresh=0.7, min_kept=2)
    assert loss.item() == pytest.approx(_mean_nll([0.6, 0.3]), rel=1e-5)


def test_ohem_kth_value_dominates():
    # min_kept = 3: 3rd smallest p_gt is 0.8 > 0.7, so τ = 0.8 → keep {0.6, 0.8, 0.3}.
    logits, target = _toy()
    loss = ohem_ce(logits, target, thresh=0.7, min_kept=3)
    assert loss.item() == pytest.approx(_mean_nll([0.6, 0.8, 0.3]), rel=1e-5)


def test_ohem_min_kept_above_valid_keeps_all_valid():
    logits, target = _toy()
    all_valid = _mean_nll(P_GT)
    # 5 > 4 valid pixels (but ≤ 5 pixels in total): keep all valid, not the ignore pixel.
    assert ohem_ce(logits, target, 0.7, min_kept=5).item() == pytest.approx(all_valid, rel=1e-5)
    # min_kept larger than the whole image.
    assert ohem_ce(logits, target, 0.7, min_kept=100_000).item() == pytest.approx(
        all_valid, rel=1e-5
    )
    # min_kept == #valid goes the threshold route: 4th smallest is 0.9 → τ = 0.9 → all valid.
    assert ohem_ce(logits, target, 0.7, min_kept=4).item() == pytest.approx(all_valid, rel=1e-5)


@pytest.mark.parametrize("min_kept", [0, -1])
def test_ohem_min_kept_not_positive_is_plain_ce(min_kept):
    """The official filter sits inside ``if min_kept > 0``: no filtering at all, so the
    confident pixels (0.9, 0.8 > thresh 0.7) stay in the mean."""
    logits, target = _toy()
    loss = ohem_ce(logits, target, 0.7, min_kept=min_kept)
    assert loss.item() == pytest.approx(_mean_nll(P_GT), rel=1e-5)
    plain = F.cross_entropy(logits.float(), target, ignore_index=255)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
    cfg = LossConfig(ce_weight=0.0, ohem_weight=1.0, ohem_min_kept=min_kept)
    assert supervised_loss(logits, target, cfg).item() == pytest.approx(plain.item(), rel=1e-6)


def test_ohem_matches_reference_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    for min_kept in (1, 50, 300, 2000):
        logits = torch.randn(2, 5, 12, 13, generator=g) * 2
        target = torch.randint(0, 5, (2, 12, 13), generator=g)
        target[torch.rand(2, 12, 13, generator=g) < 0.2] = 255
        ours = ohem_ce(logits, target, 0.7, min_kept)
        ref = _reference_ohem(logits, target, 0.7, min_kept)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_ohem_gradient_flows_only_through_kept_pixels():
    logits, target = _toy()
    ohem_ce(logits, target, 0.7, min_kept=2).backward()
    grad_norm = logits.grad.abs().sum(1)[0, 0]  # per pixel
    assert (grad_norm[[1, 3]] > 0).all()
    assert (grad_norm[[0, 2, 4]] == 0).all()


def test_all_ignore_gives_zero_with_grad():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    for loss in (
        ohem_ce(logits, target, 0.7, 5),
        ohem_ce(logits, target, 0.7, 100_000),
        supervised_loss(logits, target, LossConfig()),
    ):
        assert loss.item() == 0.0 and not torch.isnan(loss)
        assert loss.grad_fn is not None
        loss.backward()
        assert torch.isfinite(logits.grad).all()


def test_supervised_loss_combines_terms():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randint(0, 4, (2, 8, 8), generator=g)
    target[0, :2] = 255
    ce = F.cross_entropy(logits, target, ignore_index=255)
    oh = ohem_ce(logits, target, 0.7, 40)
    cfg = LossConfig(ce_weight=0.5, ohem_weight=0.5, ohem_thresh=0.7, ohem_min_kept=40)
    assert supervised_loss(logits, target, cfg).item() == pytest.approx(
        (0.5 * ce + 0.5 * oh).item(), rel=1e-6
    )
    cfg_ce = LossConfig(ce_weight=1.0, ohem_weight=0.0)
    assert supervised_loss(logits, target, cfg_ce).item() == pytest.approx(ce.item(), rel=1e-6)
    cfg_oh = LossConfig(ce_weight=0.0, ohem_weight=2.0, ohem_min_kept=40)
    assert supervised_loss(logits, target, cfg_oh).item() == pytest.approx(2 * oh.item(), rel=1e-6)


def test_supervised_loss_custom_ignore_index():
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 1], [2, 7]]])
    ref = F.cross_entropy(logits, target, ignore_index=7)
    cfg = LossConfig(ce_weight=1.0, ohem_weight=0.0)
    assert supervised_loss(logits, target, cfg, ignore_index=7).item() == pytest.approx(
        ref.item(), rel=1e-6
    )
