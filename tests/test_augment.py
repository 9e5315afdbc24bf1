"""Strong augmentation and CutMix of unlabeled images (spec §3.4, §4.2).

Machine: exact, same-machine, fp32-tolerance, bound. The CutMix boxes, the mixing, the coin flips
and StrongAug's sampled parameters are integer, boolean or seeded results (exact). A strong view is
compared with itself under the same generator (same-machine) and with its formula for brightness,
grey channels and normalised input (fp32-tolerance, atol 1e-5 / 1e-4); the blur only has to lower
the standard deviation (bound).
"""

from __future__ import annotations

import pytest
import torch

from brpg.frameworks.augment import StrongAug, apply_cutmix, cutmix_boxes, maybe_cutmix

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- CutMix boxes
@pytest.mark.parametrize("h,w", [(65, 65), (40, 57)])
def test_cutmix_boxes_distribution(h, w):
    n = 2000
    m = cutmix_boxes(n, h, w, _gen(0))
    assert m.shape == (n, h, w) and m.dtype == torch.bool
    widths = m.any(dim=1).sum(dim=1)  # columns touched
    heights = m.any(dim=2).sum(dim=1)
    assert torch.equal(widths * heights, m.sum(dim=(1, 2)))  # a solid rectangle
    assert int(widths.min()) == w // 2 + 1 and int(widths.max()) == w - 1  # both ends reached
    expected_h = torch.round(h * w / 2 / widths.double()).long()
    assert torch.equal(heights, expected_h)
    area = m.float().mean(dim=(1, 2))
    assert abs(float(area.mean()) - 0.5) < 0.01
    assert float(area.min()) > 0.45 and float(area.max()) < 0.55
    # uniform position: the box touches each border sometimes, and its centre spreads
    assert bool(m[:, 0, :].any()) and bool(m[:, -1, :].any())
    assert bool(m[:, :, 0].any()) and bool(m[:, :, -1].any())


def test_cutmix_boxes_deterministic():
    a = cutmix_boxes(8, 33, 33, _gen(3))
    b = cutmix_boxes(8, 33, 33, _gen(3))
    c = cutmix_boxes(8, 33, 33, _gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- mixing
def _batch(b: int = 3, h: int = 4, w: int = 5):
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, h, w).clone()
    labels = torch.arange(b).view(b, 1, 1).expand(b, h, w).clone() + 10
    conf = torch.arange(b, dtype=torch.float32).view(b, 1, 1).expand(b, h, w) / 10
    return x, labels, conf


def test_apply_cutmix_uses_next_image_and_same_mask():
    x, labels, conf = _batch()
    probs = x[:, :2] * 2  # a [B, C, H, W] map
    mask = torch.zeros(3, 4, 5, dtype=torch.bool)
    mask[0, :2, :3] = True
    mask[1, 1:, 1:] = True
    mask[2, 3, 4] = True
    xm, (lm, cm, pm) = apply_cutmix(x, [labels, conf, probs], mask)
    for i in range(3):
        j = (i + 1) % 3
        exp_x = torch.where(mask[i], torch.tensor(float(j)), torch.tensor(float(i)))
        assert torch.equal(xm[i], exp_x.expand(3, 4, 5))
        assert torch.equal(lm[i], torch.where(mask[i], j + 10, i + 10))
        assert torch.equal(cm[i], exp_x / 10)
        assert torch.equal(pm[i], (exp_x * 2).expand(2, 4, 5))
    # inputs are not modified
    assert torch.equal(x, _batch()[0])


def test_maybe_cutmix_coin():
    x, labels, conf = _batch()
    x0, (l0,), m0 = maybe_cutmix(x, [labels], p=0.0, generator=_gen(1))
    assert not bool(m0.any()) and torch.equal(x0, x) and torch.equal(l0, labels)
    x1, (l1,), m1 = maybe_cutmix(x, [labels], p=1.0, generator=_gen(1))
    assert m1.shape == (3, 4, 5) and bool(m1.flatten(1).any(dim=1).all())  # a box per image
    assert not torch.equal(x1, x)
    xr, (lr_,) = apply_cutmix(x, [labels], m1)
    assert torch.equal(x1, xr) and torch.equal(l1, lr_)
    # p = 0.5: both outcomes happen, deterministically per seed
    outcomes = [bool(maybe_cutmix(x, [], 0.5, _gen(s))[2].any()) for s in range(40)]
    assert 5 < sum(outcomes) < 35
    assert outcomes == [bool(maybe_cutmix(x, [], 0.5, _gen(s))[2].any()) for s in range(40)]


def test_maybe_cutmix_boxes_independent_of_coin():
    # the boxes come from the same random stream position whatever the coin says
    g = _gen(5)
    torch.rand((), generator=g)
    boxes = cutmix_boxes(3, 4, 5, g)
    x, _, _ = _batch()
    _, _, m = maybe_cutmix(x, [], p=1.0, generator=_gen(5))
    assert torch.equal(m, boxes)


# --------------------------------------------------------------------------- strong view
def test_strong_aug_changes_images_and_keeps_range():
    x = torch.rand(4, 3, 16, 16, generator=_gen(0))
    aug = StrongAug()
    y = aug(x, _gen(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.equal(y, x)
    assert torch.equal(y, aug(x, _gen(1)))  # deterministic under a generator
    assert not torch.equal(y, aug(x, _gen(2)))


def test_strong_aug_probabilities():
    params = StrongAug().sample_params(4000, _gen(0))
    assert abs(float(params.jitter.float().mean()) - 0.8) < 0.03
    assert abs(float(params.gray.float().mean()) - 0.2) < 0.03
    assert abs(float(params.blur.float().mean()) - 0.5) < 0.03
    f = params.factors
    assert float(f[:, :3].min()) >= 0.5 and float(f[:, :3].max()) <= 1.5
    assert float(f[:, 3].min()) >= -0.25 and float(f[:, 3].max()) <= 0.25
    assert float(params.sigma.min()) >= 0.1 and float(params.sigma.max()) <= 2.0
    assert torch.equal(params.order.sort(dim=1).values, torch.arange(4).expand(4000, 4))


def test_strong_aug_single_steps():
    x = torch.rand(3, 3, 8, 8, generator=_gen(0))
    # nothing applied → identity
    assert torch.equal(StrongAug(p_jitter=0, p_gray=0, p_blur=0)(x, _gen(1)), x)
    # brightness only: x · factor, clipped
    aug = StrongAug(contrast=0, saturation=0, hue=0, p_jitter=1, p_gray=0, p_blur=0)
    params = aug.sample_params(3, _gen(1))
    expected = (x * params.factors[:, 0].view(3, 1, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(aug.apply(x, params), expected, atol=1e-5, rtol=0)
    # grayscale always → equal channels
    g = StrongAug(p_jitter=0, p_gray=1, p_blur=0)(x, _gen(1))
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    # blur always → smoother, mean nearly kept
    b = StrongAug(p_jitter=0, p_gray=0, p_blur=1, sigma=(1.5, 2.0))(x, _gen(1))
    assert float(b.std()) < float(x.std())


def test_strong_aug_normalised_input():
    x = torch.rand(2, 3, 10, 10, generator=_gen(0))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    y01 = StrongAug()(x, _gen(7))
    yn = StrongAug(mean=MEAN, std=STD)((x - mean) / std, _gen(7))
    torch.testing.assert_close(yn, (y01 - mean) / std, atol=1e-4, rtol=0)
    with pytest.raises(ValueError):
        StrongAug(mean=MEAN)


def test_runs_on_meta_device():
    """No device→host reads: CutMix and the strong view work on meta tensors."""
    meta = torch.device("meta")
    x = torch.rand(2, 3, 8, 8, device=meta)
    labels = torch.randint(0, 3, (2, 8, 8), device=meta)
    xm, (lm,), mask = maybe_cutmix(x, [labels], 0.5, _gen(0))
    assert xm.shape == x.shape and lm.shape == labels.shape and mask.device.type == "meta"
    assert StrongAug(mean=MEAN, std=STD)(x, _gen(0)).shape == x.shape
