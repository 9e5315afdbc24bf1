"""PrototypeBank: logits, EMA update, state, DDP sync; pack_high_low (spec §7, §8, §12 Q2).

Machine: exact, same-machine, fp32-tolerance. Logits and the EMA against hand-computed values and a
loop, and the two-process update against one process over all rows, are fp32-tolerance; both ranks
end with the same prototypes (same-machine); state dicts and packing are exact.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from brpg.method.prototype_ema import EMPTY_CLASS_LOGIT, PrototypeBank, pack_high_low

R2 = 1 / math.sqrt(2)


def _tiny_bank() -> PrototypeBank:
    """2 classes × 2 slots in 2-d; slot (1, 1) = (−1, 0) is invalid."""
    bank = PrototypeBank(num_classes=2, dim=2, max_per_class=2)
    protos = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[2.0, 2.0], [-1.0, 0.0]]])
    valid = torch.tensor([[True, True], [True, False]])
    bank.set_prototypes(protos, valid)
    return bank


def test_logits_hand_computed_and_invalid_slot_never_wins():
    bank = _tiny_bank()
    feats = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]])
    logits = bank.logits(feats, tau=0.5)
    # f=(1,0):  class 0 max(1, 0) = 1;  class 1 cos((1,0),(1,1)) = 1/√2
    # f=(-1,0): class 0 max(-1, 0) = 0; class 1 only the valid slot: -1/√2 (the invalid (−1,0) would give 1)
    # f=(0,2):  class 0 max(0, 1) = 1;  class 1 1/√2
    expected = torch.tensor([[1.0, R2], [0.0, -R2], [1.0, R2]]) / 0.5
    torch.testing.assert_close(logits, expected)
    assert bank.num_valid().tolist() == [2, 1]
    assert bank.num_valid().dtype == torch.long


def test_class_without_prototype_gets_empty_logit():
    bank = _tiny_bank()
    bank.valid[1] = False
    logits = bank.logits(torch.tensor([[1.0, 1.0]]), tau=0.1)
    assert logits[0, 1].item() == EMPTY_CLASS_LOGIT
    assert torch.isfinite(logits).all()


def test_gradient_reaches_feats_not_prototypes():
    bank = _tiny_bank()
    bank.prototypes.requires_grad_(True)  # even if someone asks, the bank detaches them
    feats = torch.randn(5, 2, requires_grad=True)
    bank.logits(feats, tau=0.1).sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert bank.prototypes.grad is None


def test_ema_hand_computed():
    bank = PrototypeBank(2, 2, 2, momentum=0.99)
    protos = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [-1.0, 1.0]]])
    bank.set_prototypes(protos, torch.ones(2, 2, dtype=torch.bool))
    feats = torch.tensor([[2.0, 0.5], [4.0, 0.0], [3.0, 3.0], [0.0, 5.0], [-1.0, 0.0]])
    targets = torch.tensor([0, 0, 1, 255, 7])
    bank.ema_update(feats, targets)
    # slot (0,0): f̄ = (3, 0.25) → 0.99·(1,0) + 0.01·(3,0.25) = (1.02, 0.0025)
    # slot (1,0): f̄ = (3, 3)    → 0.99·(1,1) + 0.01·(3,3)    = (1.02, 1.02)
    # (0,1) and (1,1): no feature (the 255 and out-of-range targets are skipped) → unchanged
    expected = torch.tensor([[[1.02, 0.0025], [0.0, 1.0]], [[1.02, 1.02], [-1.0, 1.0]]])
    torch.testing.assert_close(bank.prototypes, expected)


def _naive_ema(protos, valid, feats, targets, alpha):
    """Loop transcription of spec §7: per feature, nearest valid prototype of its own class."""
    protos = protos.clone()
    c, k, _ = protos.shape
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for f, t in zip(feats, targets.tolist(), strict=True):
        if not 0 <= t < c or not valid[t].any():
            continue
        best, best_k = -math.inf, -1
        for j in range(k):
            if valid[t, j]:
                cos = torch.nn.functional.cosine_similarity(f, protos[t, j], dim=0, eps=1e-12)
                if cos.item() > best:
                    best, best_k = cos.item(), j
        groups.setdefault((t, best_k), []).append(f)
    new = protos.clone()
    for (t, j), fs in groups.items():
        new[t, j] = alpha * protos[t, j] + (1 - alpha) * torch.stack(fs).mean(0)
    return new


def _random_case(seed: int, c=4, k=3, d=8, n=64):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(c, k, d, generator=g)
    valid = torch.rand(c, k, generator=g) > 0.3
    valid[0] = True
    valid[3] = False  # a class with no prototype at all
    feats = torch.randn(n, d, generator=g) * 2
    targets = torch.randint(0, c + 1, (n,), generator=g)
    targets[targets == c] = 255
    return protos, valid, feats, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ema_vectorised_equals_loop(seed):
    protos, valid, feats, targets = _random_case(seed)
    bank = PrototypeBank(4, 8, 3, momentum=0.9)
    bank.set_prototypes(protos, valid)
    bank.ema_update(feats, targets)
    torch.testing.assert_close(bank.prototypes, _naive_ema(protos, valid, feats, targets, 0.9))


def test_state_dict_round_trip():
    protos, valid, _, _ = _random_case(3)
    a = PrototypeBank(4, 8, 3, momentum=0.95)
    a.set_prototypes(protos, valid)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = PrototypeBank(4, 8, 3, momentum=0.5)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.momentum == 0.95
    assert torch.equal(b.prototypes, a.prototypes) and torch.equal(b.valid, a.valid)
    with pytest.raises(ValueError):
        PrototypeBank(4, 8, 2).load_state_dict(a.state_dict())


def test_pack_high_low_layouts_agree():
    g = torch.Generator().manual_seed(0)
    hi = torch.randn(3, 3, 4, generator=g)
    lo = torch.randn(3, 2, 4, generator=g)
    hi_counts = torch.tensor([2, 3, 2])
    lo_counts = torch.tensor([2, 1, 2])
    protos, valid = pack_high_low(hi, lo, hi_counts, lo_counts, k_high=3, k_low=3)
    assert protos.shape == (3, 6, 4)
    assert valid.tolist() == [
        [True, True, False, True, True, False],
        [True, True, True, True, False, False],
        [True, True, False, True, True, False],
    ]
    torch.testing.assert_close(protos[:, 3:5], lo)
    # the same from per-class lists
    hi_list = [hi[i, : hi_counts[i]] for i in range(3)]
    lo_list = [lo[i, : lo_counts[i]] for i in range(3)]
    p2, v2 = pack_high_low(hi_list, lo_list, k_high=3, k_low=3)
    assert torch.equal(v2, valid)
    torch.testing.assert_close(p2 * v2[..., None], protos * valid[..., None])
    # masking equals the official repeat-padding for the max over slots (spec §7)
    padded = protos.clone()
    for c in range(3):
        padded[c, hi_counts[c] : 3] = padded[c, hi_counts[c] - 1]
        padded[c, 3 + lo_counts[c] :] = padded[c, 3 + lo_counts[c] - 1]
    masked_bank = PrototypeBank(3, 4, 6)
    masked_bank.set_prototypes(protos, valid)
    dup_bank = PrototypeBank(3, 4, 6)
    dup_bank.set_prototypes(padded, torch.ones(3, 6, dtype=torch.bool))
    feats = torch.randn(20, 4, generator=g)
    torch.testing.assert_close(masked_bank.logits(feats, 0.1), dup_bank.logits(feats, 0.1))


# ---------------------------------------------------------------- DDP sync (2 gloo processes)
def _ddp_worker(rank: int, world: int, init_file: str, case: tuple, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        protos, valid, feats, targets = case
        bank = PrototypeBank(4, 8, 3, momentum=0.9)
        bank.set_prototypes(protos, valid)
        half = feats.shape[0] // 2
        sl = slice(0, half) if rank == 0 else slice(half, None)  # different data per rank
        bank.ema_update(feats[sl], targets[sl])
        torch.save(bank.prototypes, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_sync_gives_identical_prototypes_equal_to_union(tmp_path):
    case = _random_case(5)
    mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), case, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    p0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    p1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(p0, p1)
    protos, valid, feats, targets = case
    single = PrototypeBank(4, 8, 3, momentum=0.9)
    single.set_prototypes(protos, valid)
    single.ema_update(feats, targets)
    torch.testing.assert_close(p0, single.prototypes)
    assert not torch.equal(p0, protos)  # the update did something


# ------------------------------------------------ edges found by mutation testing (issue 18)
def test_constructor_bounds_and_messages():
    PrototypeBank(1, 1, 1, momentum=0.0)  # the smallest bank and both momentum ends are valid
    PrototypeBank(1, 1, 1, momentum=1.0)
    for bad in [(0, 1, 1), (1, 0, 1), (1, 1, 0)]:
        with pytest.raises(ValueError, match="num_classes, dim and max_per_class must be positive"):
            PrototypeBank(*bad)
    for m in (-0.01, 1.01, 1.5):
        with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\]"):
            PrototypeBank(2, 2, 2, momentum=m)
    assert repr(PrototypeBank(3, 4, 6, momentum=0.9)) == (
        "PrototypeBank(num_classes=3, max_per_class=6, dim=4, momentum=0.9)"
    )
    with pytest.raises(ValueError, match=r"checkpoint bank has shape \(4, 3, 8\)"):
        PrototypeBank(4, 8, 2).load_state_dict(PrototypeBank(4, 8, 3).state_dict())


def test_pack_high_low_default_masks_and_budgets():
    g = torch.Generator().manual_seed(1)
    hi, lo = torch.randn(2, 2, 5, generator=g), torch.randn(2, 1, 5, generator=g)
    protos, valid = pack_high_low(hi, lo)  # no masks, no budgets: every slot valid, widths kept
    assert valid.dtype == torch.bool and valid.all() and valid.shape == (2, 3)
    assert torch.equal(protos, torch.cat([hi, lo], 1))
    # a bool mask, a larger high budget (padded, invalid) and a low budget that truncates
    mask = torch.tensor([[True, False], [True, True]])
    lo4 = torch.randn(2, 4, 5, generator=g)
    protos, valid = pack_high_low(hi, lo4, mask, torch.tensor([1, 2]), k_high=3, k_low=2)
    assert valid.tolist() == [[True, False, False, True, False], [True, True, False, True, True]]
    assert torch.equal(protos[:, :2], hi) and torch.equal(protos[:, 2], torch.zeros(2, 5))
    assert torch.equal(protos[:, 3:], lo4[:, :2])
    with pytest.raises(ValueError, match="a class has more than 1 valid centres"):
        pack_high_low(hi, lo, k_high=1)


def test_pack_high_low_lists_take_their_widths_from_the_rows():
    g = torch.Generator().manual_seed(2)
    # one class, 7-d features, 2 high and 3 low centres: widths are row counts, not the dim
    hi, lo = [torch.randn(2, 7, generator=g)], [torch.randn(3, 7, generator=g)]
    protos, valid = pack_high_low(hi, lo)
    assert protos.shape == (1, 5, 7) and valid.dtype == torch.bool and valid.all()
    assert torch.equal(protos[0], torch.cat([hi[0], lo[0]]))
    with pytest.raises(ValueError, match="pass per-class lists without a mask or counts"):
        pack_high_low(hi, lo, high_valid=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="need at least one class"):
        pack_high_low([], lo)


def test_pack_high_low_checks_classes_and_dim_not_slot_counts():
    g = torch.Generator().manual_seed(3)
    # C = 2 with 3 high and 1 low slots: slot counts differ from C, which is fine
    protos, _ = pack_high_low(torch.randn(2, 3, 4, generator=g), torch.randn(2, 1, 4, generator=g))
    assert protos.shape == (2, 4, 4)
    protos, _ = pack_high_low(torch.randn(2, 1, 4, generator=g), torch.randn(2, 3, 4, generator=g))
    assert protos.shape == (2, 4, 4)
    msg = "high and low must have the same number of classes and feature dim"
    with pytest.raises(ValueError, match=msg):
        pack_high_low(torch.randn(2, 1, 4), torch.randn(3, 1, 4))
    with pytest.raises(ValueError, match=msg):
        pack_high_low(torch.randn(2, 1, 4), torch.randn(2, 1, 5))
