"""Details of L_s and L_u that mutation testing found unpinned (issue 18, ``make mutate``):
the official defaults of OHEM, a custom ignore value, one kept pixel, percentiles at the
edges, a non-finite value next to the percentile, the dtype of the threshold.

Machine: exact, fp32-tolerance. Losses against hand-worked values (ln 2 and its multiples, rel 1e-5
/ 1e-6) are fp32-tolerance; percentiles at the edges, shape errors and the threshold's dtype are
exact.
"""

from __future__ import annotations

import math

import pytest
import torch

from brpg.frameworks.supervised import ohem_ce, pixel_ce
from brpg.frameworks.u2pl_loss import masked_percentile, unsup_loss

LN2 = math.log(2.0)


def test_pixel_ce_ignores_255_by_default():
    logits = torch.zeros(1, 2, 1, 2)
    assert pixel_ce(logits, torch.tensor([[[0, 255]]])).tolist() == [[[pytest.approx(LN2), 0.0]]]


def test_ohem_defaults_are_the_official_thresh_and_min_kept():
    # 100,000 pixels with p_gt = 1/2 and 2,400 with p_gt = 4/5 (two classes): the 100,000th
    # smallest p_gt is 1/2 < 0.7, so τ = 0.7 and only the p = 1/2 pixels count: CE = ln 2.
    # (min_kept 100,001 would give τ = 4/5 and keep all; thresh above 1 would keep all too.)
    n_hard, n_easy = 100_000, 2_400
    logits = torch.zeros(1, 2, 1, n_hard + n_easy)
    logits[0, 0, 0, n_hard:] = math.log(4.0)
    target = torch.zeros(1, 1, n_hard + n_easy, dtype=torch.long)
    assert float(ohem_ce(logits, target)) == pytest.approx(LN2, rel=1e-5)


def test_ohem_with_another_ignore_value_and_a_single_pixel():
    logits = torch.zeros(1, 2, 1, 3)
    target = torch.tensor([[[1, -1, -1]]])
    # one valid pixel: its CE, not half of it
    assert float(ohem_ce(logits, target, min_kept=0, ignore_index=-1)) == pytest.approx(LN2)


def test_unsup_loss_with_one_kept_pixel_and_another_ignore_value():
    # pixel 0: teacher certain → kept; pixel 1: uniform → dropped at the 50th percentile;
    # pixels 2, 3: ignored with the value 7 (as certain as pixel 0: were they counted, the
    # percentile would move and the kept set change). One kept pixel: CE ln 2, times 4 / 1.
    teacher = torch.tensor([[[[9.0, 0.0, 9.0, 9.0]], [[0.0, 0.0, 0.0, 0.0]]]])
    pseudo = torch.tensor([[[1, 0, 7, 7]]])
    student = torch.zeros(1, 2, 1, 4)
    got = unsup_loss(student, pseudo, teacher, 50.0, ignore_index=7)
    assert float(got) == pytest.approx(LN2 * 4, rel=1e-6)


def test_unsup_loss_rejects_mismatched_shapes_by_name():
    with pytest.raises(ValueError, match=r"student \(1, 2, 1, 4\) and teacher \(1, 2, 1, 3\)"):
        unsup_loss(torch.zeros(1, 2, 1, 4), torch.zeros(1, 1, 4), torch.zeros(1, 2, 1, 3), 80)


def test_masked_percentile_edges():
    v = torch.tensor([5.0, 1.0, 3.0])
    one = torch.tensor([True, False, False])
    # a single valid value is every percentile, 100 included
    assert float(masked_percentile(v, one, 100)) == 5.0
    assert float(masked_percentile(v, one, 0)) == 5.0
    out = masked_percentile(v, torch.ones(3, dtype=torch.bool), torch.tensor(75.0))
    assert out.dtype == torch.float32 and float(out) == pytest.approx(4.0)  # 3 + 0.5·2
    # an exact position next to +inf: the value itself, not inf·0 = NaN
    inf = torch.tensor([1.0, float("inf")])
    assert float(masked_percentile(inf, torch.ones(2, dtype=torch.bool), 0)) == 1.0
