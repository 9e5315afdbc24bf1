"""L_pro and its sampling: grid indices, labeled/unlabeled samples, CE, threshold ramp (spec §8).

Machine: exact, fp32-tolerance. Grid indices (against exact rational arithmetic), targets, seeded
sampling and its uniformity, and the threshold ramp are exact; features read at the grid against
bilinear upsampling (atol 1e-5) and L_pro against hand-worked values (rel 1e-5) are fp32-tolerance.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from brpg.method.prototype_ema import PrototypeBank
from brpg.method.prototype_loss import (
    grid_indices,
    grid_positions,
    prototype_loss,
    pseudo_threshold,
    sample_labeled_grid,
    sample_unlabeled,
)

R2 = 1 / math.sqrt(2)


def _bank() -> PrototypeBank:
    bank = PrototypeBank(2, 2, 2)
    protos = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[2.0, 2.0], [-1.0, 0.0]]])
    bank.set_prototypes(protos, torch.tensor([[True, True], [True, False]]))
    return bank


def test_grid_indices_land_exactly_on_stride4_pixels():
    assert grid_positions(513) == [16 * i for i in range(32)] + [512]
    assert grid_indices(129, 129, 513).tolist() == list(range(0, 129, 4))
    assert grid_indices(193, 193, 769).tolist() == list(range(0, 193, 6))
    assert len(grid_indices(129, 129, 513)) == 33
    with pytest.raises(ValueError):
        grid_indices(16, 16, 64)  # (64-1)/(16-1) is not an integer
    with pytest.raises(ValueError):
        grid_indices(129, 97, 513)


def test_labeled_grid_reads_rep_at_grid_and_labels_at_full_res():
    g = torch.Generator().manual_seed(0)
    rep = torch.randn(2, 3, 129, 129, generator=g)
    labels = torch.randint(0, 21, (2, 513, 513), generator=g)
    labels[0, 16, 32] = 255
    feats, targets = sample_labeled_grid(rep, labels)
    assert feats.shape == (2 * 33 * 33, 3) and targets.shape == (2 * 33 * 33,)
    assert torch.equal(feats, rep[:, :, ::4, ::4].permute(0, 2, 3, 1).reshape(-1, 3))
    assert torch.equal(targets, labels[:, ::16, ::16].reshape(-1))
    assert (targets == 255).sum() == 1
    # the official route: upsample (bilinear, align_corners=True), then index the grid
    up = F.interpolate(rep, size=(513, 513), mode="bilinear", align_corners=True)
    official = up[:, :, ::16, ::16].permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(feats, official, rtol=0, atol=1e-5)


def test_labeled_grid_inexact_sizes_match_upsampling():
    g = torch.Generator().manual_seed(1)
    rep = torch.randn(2, 4, 16, 16, generator=g, requires_grad=True)  # 64 crop: 63/15 not integer
    labels = torch.randint(0, 5, (2, 64, 64), generator=g)
    feats, targets = sample_labeled_grid(rep, labels)
    pos = torch.tensor(grid_positions(64))
    up = F.interpolate(rep, size=(64, 64), mode="bilinear", align_corners=True)
    expected = up[:, :, pos][:, :, :, pos].permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(feats, expected, rtol=0, atol=1e-5)
    assert torch.equal(targets, labels[:, pos][:, :, pos].reshape(-1))
    feats.sum().backward()
    assert rep.grad is not None


def _unlabeled_case(n_candidates: int, size: int = 8, b: int = 2):
    g = torch.Generator().manual_seed(n_candidates)
    conf = torch.rand(b, size, size, generator=g) * 0.5
    flat = conf.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:n_candidates]] = 0.9
    pseudo = torch.arange(b * size * size).view(b, size, size)  # target = flat pixel index
    return conf, pseudo


def test_unlabeled_sampling_respects_threshold_and_count():
    conf, pseudo = _unlabeled_case(30)
    rep = torch.randn(2, 3, 8, 8)
    feats, targets = sample_unlabeled(rep, conf, pseudo, thr=0.8, num_per_image=5)
    assert feats.shape == (10, 3) and targets.shape == (10,)
    assert (targets != 255).all() and targets.unique().numel() == 10
    assert (conf.view(-1)[targets] >= 0.8).all()
    torch.testing.assert_close(feats, rep.permute(0, 2, 3, 1).reshape(-1, 3)[targets])


def test_unlabeled_sampling_takes_all_when_few_candidates():
    conf, pseudo = _unlabeled_case(4)
    feats, targets = sample_unlabeled(torch.randn(2, 3, 8, 8), conf, pseudo, 0.8, num_per_image=5)
    kept = targets[targets != 255]
    assert feats.shape == (10, 3) and kept.numel() == 4
    assert set(kept.tolist()) == set(torch.nonzero(conf.view(-1) >= 0.8).flatten().tolist())


def test_unlabeled_sampling_is_uniform():
    conf, pseudo = _unlabeled_case(8, size=4, b=1)  # 8 candidates among 16 pixels
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(16)
    rep = torch.zeros(1, 1, 4, 4)
    for _ in range(400):
        _, t = sample_unlabeled(rep, conf, pseudo, 0.8, num_per_image=4, generator=gen)
        assert (t != 255).sum() == 4
        counts += torch.bincount(t, minlength=16)
    cand = conf.view(-1) >= 0.8
    assert (counts[~cand] == 0).all()
    assert ((counts[cand] / 400) - 0.5).abs().max() < 0.1  # each candidate kept w.p. 4/8


def test_unlabeled_full_res_conf_reads_upsampled_features():
    g = torch.Generator().manual_seed(2)
    rep = torch.randn(1, 3, 7, 7, generator=g, requires_grad=True)
    conf = torch.rand(1, 20, 20, generator=g)
    pseudo = torch.arange(400).view(1, 20, 20)
    feats, targets = sample_unlabeled(rep, conf, pseudo, 0.5, num_per_image=50)
    up = F.interpolate(rep, size=(20, 20), mode="bilinear", align_corners=True)
    ok = targets != 255
    expected = up.permute(0, 2, 3, 1).reshape(-1, 3)[targets[ok]]
    torch.testing.assert_close(feats[ok], expected, rtol=0, atol=1e-5)
    feats.sum().backward()
    assert rep.grad.abs().sum() > 0


def test_loss_hand_computed():
    bank = _bank()
    feats = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    targets = torch.tensor([0, 1, 255])
    loss = prototype_loss(bank, feats, targets, tau=0.1)
    # logits: f0 = (10, 7.071) target 0; f1 = (0, −7.071) target 1; f2 ignored
    ce0 = math.log(1 + math.exp(10 * R2 - 10))
    ce1 = math.log(1 + math.exp(0 + 10 * R2))
    assert loss.item() == pytest.approx((ce0 + ce1) / 2, rel=1e-5)
    loss.backward()
    assert feats.grad[2].abs().sum() == 0 and feats.grad[:2].abs().sum() > 0


def test_empty_selection_gives_zero_not_nan():
    bank = _bank()
    feats = torch.randn(4, 2, requires_grad=True)
    loss = prototype_loss(bank, feats, torch.full((4,), 255))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(feats.grad, torch.zeros(4, 2))
    empty = prototype_loss(bank, torch.zeros(0, 2, requires_grad=True), torch.zeros(0).long())
    assert empty.item() == 0.0
    # a target whose class has no valid prototype is ignored as well
    bank.valid[1] = False
    assert prototype_loss(bank, feats, torch.tensor([1, 1, 255, 9])).item() == 0.0


def test_pseudo_threshold_ramp():
    steps, epochs = 638, 80  # VOC, 4 GPUs
    assert pseudo_threshold(2 * steps, steps, epochs) == pytest.approx(0.794)
    assert pseudo_threshold(5 * steps, steps, epochs) == pytest.approx(0.8)
    assert pseudo_threshold(epochs * steps, steps, epochs) == pytest.approx(0.95)
    assert pseudo_threshold(epochs * steps - 1, steps, epochs) < 0.95
    assert pseudo_threshold(2 * steps, steps, epochs, clamp_low=True) == 0.8


def test_per_step_path_never_syncs_with_host(monkeypatch):
    """Semantic check: the per-step functions never call the Tensor → Python conversions."""
    bank = _bank()
    rep = torch.randn(2, 2, 9, 9, requires_grad=True)
    labels = torch.randint(0, 2, (2, 33, 33))
    conf, pseudo = torch.rand(2, 33, 33), torch.randint(0, 2, (2, 33, 33))
    gen = torch.Generator().manual_seed(0)

    def boom(*args, **kwargs):
        raise AssertionError("host sync in the per-step path")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    with pytest.raises(AssertionError):
        bool(torch.ones(1))  # the patch is active
    feats_l, t_l = sample_labeled_grid(rep, labels, grid_num=8)
    feats_u, t_u = sample_unlabeled(rep, conf, pseudo, 0.7, num_per_image=10, generator=gen)
    loss = prototype_loss(bank, feats_l, t_l) + prototype_loss(bank, feats_u, t_u)
    bank.ema_update(torch.cat([feats_l, feats_u]).detach(), torch.cat([t_l, t_u]))
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(loss) and rep.grad is not None


# ------------------------------------------------ edges found by mutation testing (issue 18)
def _exact_oracle(n_feat: int, n_full: int, grid_num: int) -> list[int] | None:
    """Feature indices of the grid if every grid pixel's align_corners source coordinate
    ``p·(n_feat−1)/(n_full−1)`` is an integer, else None (exact rational arithmetic)."""
    if n_full == 1:
        return [0] * (grid_num + 1)  # PyTorch uses scale 0 for a 1-pixel output
    coords = [Fraction(p * (n_feat - 1), n_full - 1) for p in grid_positions(n_full, grid_num)]
    return [int(c) for c in coords] if all(c.denominator == 1 for c in coords) else None


@pytest.mark.parametrize("grid_num", [1, 2, 3, 32])
def test_grid_indices_agree_with_exact_arithmetic_on_all_small_sizes(grid_num):
    for n_full in range(1, 14):
        for n_feat in range(1, 14):
            expected = _exact_oracle(n_feat, n_full, grid_num)
            if expected is None:
                with pytest.raises(ValueError, match="does not land exactly on a"):
                    grid_indices(n_feat, n_feat, n_full, grid_num)
            else:
                got = grid_indices(n_feat, n_feat, (n_full, n_full), grid_num).tolist()
                assert got == expected, (n_feat, n_full, grid_num)


@pytest.mark.parametrize("grid_num", [1, 3, 32])
def test_labeled_grid_equals_upsampling_on_all_small_and_rectangular_sizes(grid_num):
    """Exact and bilinear paths, square and not (e.g. rows exact, columns not: 17 → 65 × 16 → 64
    with 16 grid steps), against F.interpolate(align_corners=True) + indexing."""
    g = torch.Generator().manual_seed(grid_num)
    sizes = [(1, 1), (2, 2), (3, 3), (3, 5), (5, 9), (4, 13), (7, 7), (2, 11)]
    for (h, hf), (w, wf) in itertools.product(sizes, repeat=2):
        rep = torch.randn(2, 3, h, w, generator=g)
        labels = torch.randint(0, 4, (2, hf, wf), generator=g)
        feats, targets = sample_labeled_grid(rep, labels, grid_num)
        rows = torch.tensor(grid_positions(hf, grid_num))
        cols = torch.tensor(grid_positions(wf, grid_num))
        up = F.interpolate(rep, size=(hf, wf), mode="bilinear", align_corners=True)
        expected = up[:, :, rows][:, :, :, cols].permute(0, 2, 3, 1).reshape(-1, 3)
        torch.testing.assert_close(feats, expected, rtol=0, atol=1e-5, msg=str((h, hf, w, wf)))
        assert torch.equal(targets, labels[:, rows][:, :, cols].reshape(-1))
    rep = torch.randn(1, 2, 17, 16, generator=g)
    labels = torch.zeros(1, 65, 64, dtype=torch.long)
    up = F.interpolate(rep, size=(65, 64), mode="bilinear", align_corners=True)
    rows, cols = torch.tensor(grid_positions(65, 16)), torch.tensor(grid_positions(64, 16))
    expected = up[:, :, rows][:, :, :, cols].permute(0, 2, 3, 1).reshape(-1, 2)
    torch.testing.assert_close(sample_labeled_grid(rep, labels, 16)[0], expected, atol=1e-5, rtol=0)


def test_grid_arguments_are_checked_with_clear_messages():
    assert grid_positions(1) == [0] * 33 and grid_positions(7, 1) == [0, 6]
    for bad in [(0, 32), (5, 0)]:
        with pytest.raises(ValueError, match="n_full and grid_num must be positive"):
            grid_positions(*bad)
    with pytest.raises(ValueError, match=r"square crops and maps \(appendix Q11\)"):
        grid_indices(129, 129, (513, 385))
    assert torch.equal(grid_indices(129, 129, (513, 513)), grid_indices(129, 129, 513))


@pytest.mark.parametrize("conf_hw,rep_hw", [((1, 1), (3, 3)), ((2, 3), (3, 2)), ((5, 4), (2, 3))])
def test_unlabeled_reads_every_pixel_like_upsampling_on_small_sizes(conf_hw, rep_hw):
    g = torch.Generator().manual_seed(3)
    rep = torch.randn(2, 3, *rep_hw, generator=g)
    n = conf_hw[0] * conf_hw[1]
    conf = torch.ones(2, *conf_hw)
    pseudo = torch.arange(2 * n).view(2, *conf_hw)  # target = flat pixel index
    feats, targets = sample_unlabeled(rep, conf, pseudo, 0.5, num_per_image=n)
    assert sorted(targets.tolist()) == list(range(2 * n))  # all pixels, each once
    up = F.interpolate(rep, size=conf_hw, mode="bilinear", align_corners=True)
    expected = up.permute(0, 2, 3, 1).reshape(-1, 3)[targets]
    torch.testing.assert_close(feats, expected, rtol=0, atol=1e-5)


def test_unlabeled_threshold_is_inclusive_and_default_budget_is_1000_per_image():
    conf = torch.full((2, 64, 48), 0.25)
    conf[0, :3, :] = 0.5  # exactly the threshold: candidates (conf ≥ thr)
    pseudo = torch.zeros(2, 64, 48, dtype=torch.long)
    _, targets = sample_unlabeled(torch.zeros(2, 1, 64, 48), conf, pseudo, 0.5)
    assert targets.shape == (2000,)  # default 1000 per image, 2 images
    assert (targets == 0).sum() == 3 * 48
    _, all_targets = sample_unlabeled(torch.zeros(2, 1, 64, 48), conf, pseudo, 0.25)
    assert (all_targets == 0).all()  # 6144 candidates ≥ 2000: 2000 chosen


def test_unlabeled_draws_come_from_the_given_generator_only():
    conf, pseudo = _unlabeled_case(30)
    rep = torch.randn(2, 3, 8, 8)
    picks = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        gen = torch.Generator().manual_seed(7)
        _, t = sample_unlabeled(rep, conf, pseudo, 0.8, num_per_image=5, generator=gen)
        assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
        picks.append(set(t.tolist()))
    assert picks[0] == picks[1]


def test_loss_defaults_and_edges():
    bank = _bank()
    feats = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]])
    # τ defaults to the paper's 0.1
    assert prototype_loss(bank, feats, torch.tensor([0, 1, 255])) == prototype_loss(
        bank, feats, torch.tensor([0, 1, 255]), tau=0.1
    )
    # one usable target: the mean is that target's CE (f0 with target 0, hand value)
    one = prototype_loss(bank, feats, torch.tensor([0, 255, 2]), tau=0.1)  # 2 == C: ignored
    assert one.item() == pytest.approx(math.log(1 + math.exp(10 * R2 - 10)), rel=1e-5)


def test_pseudo_threshold_rejects_a_zero_span_and_accepts_one_step():
    with pytest.raises(ValueError, match="total_epochs must exceed delay_epochs"):
        pseudo_threshold(0, 10, 5, delay_epochs=5)
    assert pseudo_threshold(0, 1, 6, start=0.8, end=0.9, delay_epochs=5) == pytest.approx(0.3)
    assert pseudo_threshold(6, 1, 6, start=0.8, end=0.9, delay_epochs=5) == pytest.approx(0.9)


def _feature_grad(sample, rep_hw: int, threads: int, dtype=torch.float32) -> torch.Tensor:
    """Gradient of ``Σ feats·w`` w.r.t. a rep map ``[32, 64, rep_hw, rep_hw]`` (DigitScenes'
    batch and width), the features read by ``sample(rep)`` at ``threads`` torch threads."""
    g = torch.Generator().manual_seed(5)
    rep = torch.randn(32, 64, rep_hw, rep_hw, generator=g).to(dtype).requires_grad_(True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        feats = sample(rep)
        (feats * torch.randn(feats.shape, generator=g).to(dtype)).sum().backward()
    finally:
        torch.set_num_threads(before)
    return rep.grad


@pytest.mark.parametrize("rep_hw", [16, 64])  # 64-px crops: stride 4 (bilinear), full (exact)
def test_sampled_features_backward_is_the_same_at_one_and_two_threads(rep_hw):
    """Bilinear neighbours share feature pixels, so the backward adds several gradients into one;
    read with advanced indexing, the CPU added them in an order that changed from pass to pass
    at two threads (chapter 8's live run differed between executions). Every pass at two threads
    must give the one-thread bits, and the labeled gradient must equal the one through bilinear
    upsampling in float64."""
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 11, (32, 64, 64), generator=g)
    conf = torch.rand(32, 64, 64, generator=g)
    pseudo = torch.randint(0, 11, (32, 64, 64), generator=g)

    def labeled(rep):
        return sample_labeled_grid(rep, labels)[0]

    def unlabeled(rep):
        gen = torch.Generator().manual_seed(7)
        return sample_unlabeled(rep, conf, pseudo, 0.3, num_per_image=500, generator=gen)[0]

    for sample in (labeled, unlabeled):
        one = _feature_grad(sample, rep_hw, threads=1)
        for _ in range(4):
            assert torch.equal(_feature_grad(sample, rep_hw, threads=2), one)

    def labeled_by_upsampling(rep):
        up = F.interpolate(rep, size=(64, 64), mode="bilinear", align_corners=True)
        rows = torch.tensor(grid_positions(64))
        return up[:, :, rows][:, :, :, rows].permute(0, 2, 3, 1).reshape(-1, rep.shape[1])

    expected = _feature_grad(labeled_by_upsampling, rep_hw, threads=1, dtype=torch.float64)
    got = _feature_grad(labeled, rep_hw, threads=2)
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-5)
