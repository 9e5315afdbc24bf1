"""Entropy-filtered pseudo-label loss (spec §4.4, §12 Q4).

Machine: exact, same-machine, fp32-tolerance. The drop schedule, percentiles at the edges and the
kept fraction are exact; entropies, percentiles against numpy and the losses against hand-worked
values and F.cross_entropy are fp32-tolerance (rel 1e-6, abs 1e-6); the keep mask equals the one
built from numpy's percentile of the same entropies (same-machine).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from brpg.frameworks.u2pl_loss import (
    drop_percent_schedule,
    entropy_keep_mask,
    masked_percentile,
    pixel_entropy,
    unsup_loss,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_drop_percent_schedule():
    assert drop_percent_schedule(0, 80) == 80.0
    assert drop_percent_schedule(80, 80) == 100.0
    assert drop_percent_schedule(40, 80) == 90.0
    assert drop_percent_schedule(1, 80) == pytest.approx(80.25)
    assert drop_percent_schedule(0, 10, start=50) == 50.0


@pytest.mark.parametrize("percent", [0.0, 17.3, 80.0, 99.9, 100.0])
def test_masked_percentile_matches_numpy(percent):
    values = torch.rand(3, 7, 11, generator=_gen(0))
    valid = torch.rand(3, 7, 11, generator=_gen(1)) > 0.3
    got = masked_percentile(values, valid, percent)
    ref = np.percentile(values[valid].numpy().astype(np.float64), percent)
    assert float(got) == pytest.approx(ref, abs=1e-6)


def test_masked_percentile_edge_cases():
    v = torch.tensor([3.0, 1.0, 2.0, 10.0])
    assert float(masked_percentile(v, torch.tensor([True, False, False, False]), 50)) == 3.0
    assert float(masked_percentile(v, torch.tensor([True, True, True, False]), 50)) == 2.0
    assert float(masked_percentile(v, torch.tensor([True, True, False, False]), 25)) == 1.5
    assert math.isinf(float(masked_percentile(v, torch.zeros(4, dtype=torch.bool), 50)))


def test_pixel_entropy_by_hand():
    # two classes: logits (0, 0) → ln 2; (ln 3, 0) → p = (3/4, 1/4): −(¾ ln ¾ + ¼ ln ¼);
    # four classes uniform → ln 4; a certain pixel → 0 (the 1e-10 keeps log finite)
    two = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])  # [1, 2, 1, 2]
    want = [math.log(2.0), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    assert pixel_entropy(two).flatten().tolist() == pytest.approx(want, rel=1e-6)
    four = torch.zeros(1, 4, 1, 1)
    assert float(pixel_entropy(four)) == pytest.approx(math.log(4.0), rel=1e-6)
    certain = torch.tensor([[[[200.0]], [[0.0]]]])
    assert float(pixel_entropy(certain)) == pytest.approx(0.0, abs=1e-8)


def test_threshold_equals_numpy_percentile_of_entropy():
    teacher = torch.randn(2, 5, 9, 8, generator=_gen(2)) * 2
    pseudo = teacher.argmax(1)
    pseudo[0, :3] = 255
    entropy = pixel_entropy(teacher)
    t = np.percentile(entropy[pseudo != 255].numpy(), 80)
    keep = entropy_keep_mask(teacher, pseudo, 80)
    assert torch.equal(keep, (pseudo != 255) & (entropy < torch.tensor(t, dtype=torch.float32)))


@pytest.mark.parametrize("percent", [80.0, 90.0, 100.0])
def test_kept_fraction(percent):
    teacher = torch.randn(2, 4, 30, 30, generator=_gen(3))
    pseudo = teacher.argmax(1)
    keep = entropy_keep_mask(teacher, pseudo, percent)
    n = pseudo.numel()
    # entropy ≥ t is dropped: at p = 100 exactly the maximum goes
    assert abs(int(keep.sum()) - percent / 100 * (n - 1)) <= 1


def test_faithful_factor_by_hand():
    # 1 image, 1×4 pixels, 2 classes. Teacher entropies: pixels 0, 1 confident, 2, 3 uniform.
    teacher = torch.tensor([[[[9.0, -9.0, 0.0, 0.0]], [[-9.0, 9.0, 0.0, 0.0]]]])
    pseudo = torch.tensor([[[0, 1, 0, 1]]])
    student = torch.tensor([[[[1.0, 0.0, 2.0, 0.0]], [[0.0, 0.0, 0.0, 3.0]]]], requires_grad=True)
    # p = 50: sorted entropies (e, e, ln2, ln2), pos 1.5 → t = (e + ln2)/2; ln2 ≥ t → dropped.
    loss = unsup_loss(student, pseudo, teacher, percent=50)
    ce0 = -math.log(math.e / (math.e + 1))  # logits (1, 0), target 0
    ce1 = math.log(2.0)  # logits (0, 0), target 1
    mean_ce = (ce0 + ce1) / 2
    assert loss.item() == pytest.approx(4 / 2 * mean_ce, rel=1e-6)  # B·H·W / #kept = 4 / 2
    plain = unsup_loss(student, pseudo, teacher, percent=50, faithful_scale=False)
    assert plain.item() == pytest.approx(mean_ce, rel=1e-6)
    loss.backward()
    assert student.grad is not None and torch.all(student.grad[..., 2:] == 0)


def test_plain_scale_is_masked_mean_ce():
    student = torch.randn(2, 3, 6, 5, generator=_gen(4))
    teacher = torch.randn(2, 3, 6, 5, generator=_gen(5))
    pseudo = teacher.argmax(1)
    keep = entropy_keep_mask(teacher, pseudo, 80)
    target = torch.where(keep, pseudo, 255)
    ref = F.cross_entropy(student, target, ignore_index=255)
    torch.testing.assert_close(unsup_loss(student, pseudo, teacher, 80, faithful_scale=False), ref)
    torch.testing.assert_close(
        unsup_loss(student, pseudo, teacher, 80), ref * pseudo.numel() / keep.sum()
    )


def test_nothing_kept_gives_zero_not_nan():
    student = torch.randn(1, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(1, 3, 4, 4)
    all_ignored = torch.full((1, 4, 4), 255)
    loss = unsup_loss(student, all_ignored, teacher, 80)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.all(student.grad == 0)
    # percent 0: threshold = the minimum entropy, every pixel has entropy ≥ t
    assert unsup_loss(student, teacher.argmax(1), teacher, 0.0).item() == 0.0


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError):
        unsup_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4), torch.zeros(1, 3, 2, 2), 80)


def test_runs_on_meta_device():
    """No .item() / np.percentile: the loss works on meta tensors (a proxy for no host sync)."""
    meta = torch.device("meta")
    student = torch.randn(2, 3, 8, 8, device=meta, requires_grad=True)
    pseudo = torch.randint(0, 3, (2, 8, 8), device=meta)
    loss = unsup_loss(student, pseudo, torch.randn(2, 3, 8, 8, device=meta), 85.0)
    loss.backward()
    assert loss.shape == () and student.grad is not None


@pytest.mark.slow
def test_percentile_beyond_torch_quantile_limit():
    """More than 2^24 values (torch.quantile's limit): checked against two kthvalue calls."""
    n = 2**24 + 3
    v = torch.rand(n, generator=_gen(6))
    pos = (n - 1) * 0.8
    lo = math.floor(pos)
    a, b = (float(torch.kthvalue(v, k).values) for k in (lo + 1, lo + 2))
    got = masked_percentile(v, torch.ones(n, dtype=torch.bool), 80.0)
    assert float(got) == pytest.approx(a + (pos - lo) * (b - a), abs=1e-7)
