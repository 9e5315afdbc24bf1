"""Confusion matrix, IoU and mIoU (spec §10); Boundary IoU (Cheng et al., CVPR 2021).

Machine: exact. Confusion matrices, IoU and Boundary IoU from integer counts, against hand counts
and a scipy reference, also after a two-process all-reduce; pytest.approx only absorbs the rounding
of the hand-written fractions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from scipy import ndimage

from brpg.metrics import (
    BoundaryIoU,
    ConfusionMatrix,
    boundary_width,
    inner_boundary,
    intersection_and_union,
)

# A 2×3 example with 3 classes and one ignore pixel:
#   target  0 0 1        pred  0 1 1
#           2 1 255            2 0 2
# Pixel (1,2) is ignored: its prediction 2 must not count anywhere.
#   class 0: hits (0,0);  pred==0 at (0,0),(1,1);  target==0 at (0,0),(0,1)  → I=1, U=2+2-1=3
#   class 1: hits (0,2);  pred==1 at (0,1),(0,2);  target==1 at (0,2),(1,1)  → I=1, U=3
#   class 2: hits (1,0);  pred==2 at (1,0);        target==2 at (1,0)        → I=1, U=1
# 3 of the 5 valid pixels are correct.
TARGET = torch.tensor([[[0, 0, 1], [2, 1, 255]]])
PRED = torch.tensor([[[0, 1, 1], [2, 0, 2]]])
EXPECTED_I = [1, 1, 1]
EXPECTED_U = [3, 3, 1]


def test_intersection_and_union_by_hand():
    inter, union, target = intersection_and_union(PRED, TARGET, 3, 255)
    assert inter.tolist() == EXPECTED_I
    assert union.tolist() == EXPECTED_U
    assert target.tolist() == [2, 2, 1]


def test_confusion_matrix_by_hand():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    assert cm.mat.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert cm.intersection().tolist() == EXPECTED_I
    assert cm.union().tolist() == EXPECTED_U
    iou = cm.iou()
    assert iou.tolist() == pytest.approx([1 / 3, 1 / 3, 1.0])
    assert cm.miou() == pytest.approx(100 * (1 / 3 + 1 / 3 + 1) / 3)
    assert cm.pixel_acc() == pytest.approx(100 * 3 / 5)


def test_absent_class_counts_as_zero():
    cm = ConfusionMatrix(4)  # class 3 never appears in pred or target
    cm.update(PRED, TARGET)
    assert cm.iou()[3].item() == 0.0
    assert cm.miou() == pytest.approx(100 * (1 / 3 + 1 / 3 + 1 + 0) / 4)


def test_confusion_matrix_agrees_with_intersection_and_union():
    g = torch.Generator().manual_seed(0)
    c = 6
    cm = ConfusionMatrix(c, ignore_index=255)
    tot_i = torch.zeros(c, dtype=torch.int64)
    tot_u = torch.zeros(c, dtype=torch.int64)
    for _ in range(5):
        pred = torch.randint(0, c, (3, 17, 11), generator=g)
        target = torch.randint(0, c, (3, 17, 11), generator=g)
        target[torch.rand(3, 17, 11, generator=g) < 0.15] = 255
        cm.update(pred, target)
        i, u, _ = intersection_and_union(pred, target, c, 255)
        tot_i += i
        tot_u += u
    assert torch.equal(cm.intersection(), tot_i)
    assert torch.equal(cm.union(), tot_u)
    ref_iou = tot_i.double() / (tot_u.double() + 1e-10)
    assert cm.miou() == pytest.approx(100 * ref_iou.mean().item())


def test_reset_state_dict_and_all_reduce_without_dist():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    sd = cm.state_dict()
    assert sd["num_classes"] == 3 and sd["ignore_index"] == 255
    cm.all_reduce()  # no process group: a no-op
    assert torch.equal(cm.mat, sd["matrix"])
    cm.reset()
    assert cm.mat.sum().item() == 0
    assert cm.miou() == 0.0 and cm.pixel_acc() == 0.0
    cm.load_state_dict(sd)
    assert torch.equal(cm.mat, sd["matrix"])


def test_update_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3).update(PRED, TARGET[:, :1])


def test_custom_ignore_index_and_out_of_range_targets():
    cm = ConfusionMatrix(2, ignore_index=9)
    pred = torch.tensor([[0, 1, 1, 0]])
    target = torch.tensor([[0, 9, 1, 5]])  # 9 ignored; 5 is out of range → ignored too
    cm.update(pred, target)
    assert cm.mat.tolist() == [[1, 0], [0, 1]]


# -- Boundary IoU (Cheng et al., CVPR 2021) ---------------------------------------------------


def _grid(rows: str) -> torch.Tensor:
    """A bool [H, W] mask from lines of 0/1 characters."""
    return torch.tensor([[ch == "1" for ch in line] for line in rows.split()])


# 6×6 image (d = 1): ground truth class 1 = a 4×4 square at rows 1-4, cols 1-4; the prediction
# shifts it one pixel right (cols 2-5), so it touches the right image border.
SQUARE_GT = torch.zeros(1, 6, 6, dtype=torch.long)
SQUARE_GT[0, 1:5, 1:5] = 1
SQUARE_PRED = torch.zeros(1, 6, 6, dtype=torch.long)
SQUARE_PRED[0, 1:5, 2:6] = 1
# The bands of class 1 written out: the GT's is the square's 1-px ring; the prediction's column
# 5 is on the image border, which is a contour, so its interior is only rows 2-3 × cols 3-4.
GT_BAND_1 = _grid("000000 011110 010010 010010 011110 000000")
PRED_BAND_1 = _grid("000000 001111 001001 001001 001111 000000")
# Class 1: |G_d| = |P_d| = 12, G_d ∩ P_d = rows 1 and 4 at cols 2-4 = 6 → U = 12 + 12 - 6 = 18.
# Class 0: the GT background is a 1-px frame (20 px), the predicted one is the frame minus
# (1..4, 5) plus (1..4, 1) (20 px); every pixel of both lies on a contour, so the bands are the
# masks; they share rows 0 and 5 and (1..4, 0): I = 16, U = 20 + 20 - 16 = 24.
SQUARE_I, SQUARE_U = [16, 6], [24, 18]


def test_boundary_width_is_two_percent_of_the_diagonal():
    assert boundary_width(100, 100) == 3  # 0.02 · 141.4 = 2.83 → 3
    assert boundary_width(10, 10) == 1  # 0.28 → 0 → at least 1
    assert boundary_width(6, 6) == 1
    assert boundary_width(64, 64) == 2  # 1.81
    assert boundary_width(513, 513) == 15  # 14.51
    assert boundary_width(1024, 2048) == 46  # Cityscapes: 45.8
    assert boundary_width(9, 130) == 3  # non-square: 2.61


def test_inner_boundary_by_hand():
    masks = torch.stack([SQUARE_GT[0] == 1, SQUARE_PRED[0] == 1])[:, None]
    bands = inner_boundary(masks, 1)
    assert torch.equal(bands[0, 0], GT_BAND_1)
    assert torch.equal(bands[1, 0], PRED_BAND_1)
    # d = 2 on a full 7×7 mask: only the centre 3×3 is farther than 2 from the image border
    full = torch.ones(1, 1, 7, 7, dtype=torch.bool)
    expected = ~_grid("0000000 0000000 0011100 0011100 0011100 0000000 0000000")
    assert torch.equal(inner_boundary(full, 2)[0, 0], expected)


@pytest.mark.parametrize("d", [1, 2, 3, 4, 7, 8, 12, 16])  # windows 3 … 33: 2^j ± 1 included
def test_inner_boundary_equals_the_max_pool_erosion(d):
    # the spec in plain torch: pad the complement with d ones, one (2d+1)² max-pool
    g = torch.Generator().manual_seed(d)
    # blocks of 3d+1 px (large enough to keep an interior), non-square, a few 1-px holes
    mask = _blobs(g, 3, 12 * d + 5, 9 * d + 7, 2, 3 * d + 1)[:, None] == 1
    mask &= torch.rand(mask.shape, generator=g) > 0.002
    background = F.pad((~mask).float(), (d, d, d, d), value=1.0)
    eroded = F.max_pool2d(background, 2 * d + 1, stride=1) == 0
    band = inner_boundary(mask, d)
    assert torch.equal(band, mask & ~eroded)
    assert 0 < eroded.sum() and 0 < band.sum() < mask.sum()  # neither all band nor none


def test_boundary_iou_by_hand():
    biou = BoundaryIoU(2)
    biou.update(SQUARE_PRED, SQUARE_GT)
    assert biou.intersection().tolist() == SQUARE_I
    assert biou.union().tolist() == SQUARE_U
    assert biou.iou().tolist() == pytest.approx([16 / 24, 6 / 18])
    assert biou.miou() == pytest.approx(100 * (2 / 3 + 1 / 3) / 2)
    # accumulated over images like mIoU (not averaged per image): a second, perfect image
    # adds its bands to both counts
    biou.update(SQUARE_GT, SQUARE_GT)
    assert biou.intersection().tolist() == [16 + 20, 6 + 12]
    assert biou.union().tolist() == [24 + 20, 18 + 12]


def test_boundary_iou_class_absent_from_both_counts_zero_and_state_dict():
    biou = BoundaryIoU(3)  # class 2 never appears
    biou.update(SQUARE_PRED, SQUARE_GT)
    assert biou.iou()[2].item() == 0.0
    assert biou.miou() == pytest.approx(100 * (2 / 3 + 1 / 3 + 0) / 3)
    sd = biou.state_dict()
    biou.all_reduce()  # no process group: a no-op
    biou.reset()
    assert biou.union().sum().item() == 0
    biou.load_state_dict(sd)
    assert biou.union().tolist() == [*SQUARE_U, 0]
    with pytest.raises(ValueError, match="shape"):
        biou.update(SQUARE_PRED, SQUARE_GT[:, :3])


def test_boundary_iou_ignores_255():
    # 6×6, column 0 ignored, everything else class 1; the prediction is class 1 everywhere,
    # ignored column included. The GT mask of class 1 is columns 1-5: its contour runs along
    # the ignored column, so its band is the frame of columns 1-5 (18 px). The prediction at
    # ignored pixels is dropped too, so P_d = G_d: I = U = 18 and BIoU = 100 %.
    # Counting the ignored pixels gives U = 24; keeping the prediction there gives I = 14.
    target = torch.ones(1, 6, 6, dtype=torch.long)
    target[0, :, 0] = 255
    biou = BoundaryIoU(2)
    biou.update(torch.ones_like(target), target)
    assert biou.intersection().tolist() == [0, 18]
    assert biou.union().tolist() == [0, 18]
    # whatever is predicted at ignored pixels changes nothing
    junk = torch.ones_like(target)
    junk[0, :, 0] = 0
    other = BoundaryIoU(2)
    other.update(junk, target)
    assert torch.equal(other.counts, biou.counts)
    # an out-of-range target label is ignored like 255 (as in ConfusionMatrix)
    target_oor = target.clone()
    target_oor[0, :, 0] = 7
    third = BoundaryIoU(2)
    third.update(junk, target_oor)
    assert torch.equal(third.counts, biou.counts)


def test_boundary_iou_uses_each_images_own_diagonal():
    # 100×100 (d = 3) with a 60×60 square, predicted exactly: the square's band holds
    # 60² − 54² = 684 px (d = 2 would give 464, d = 4 896, d = 1 236).
    big = torch.zeros(1, 100, 100, dtype=torch.long)
    big[0, 20:80, 20:80] = 1
    biou = BoundaryIoU(2)
    biou.update(big, big)
    assert biou.union()[1].item() == biou.intersection()[1].item() == 684
    # then a 10×10 (d = 1) with a 6×6 square: 36 − 16 = 20 more (with the 100×100's d = 3 the
    # whole square, 36, would be band)
    small = torch.zeros(1, 10, 10, dtype=torch.long)
    small[0, 2:8, 2:8] = 1
    biou.update(small, small)
    assert biou.union()[1].item() == 684 + 20
    # the rule changes the result: a prediction 2 px off scores differently under d = 3 than
    # under a fixed d = 1 (with d = 1 the two 1-px rings barely overlap)
    shifted = torch.zeros(1, 100, 100, dtype=torch.long)
    shifted[0, 22:82, 22:82] = 1
    auto = BoundaryIoU(2)
    auto.update(shifted, big)
    fixed = BoundaryIoU(2, dilation_ratio=1e-9)  # d = max(1, 0) = 1 for every size
    fixed.update(shifted, big)
    assert auto.iou()[1].item() > fixed.iou()[1].item() + 0.2


def _reference_band(mask_hw: np.ndarray, d: int) -> np.ndarray:
    """The paper's rule with scipy: pad by one background pixel, erode d times with 3×3."""
    eroded = ndimage.binary_erosion(np.pad(mask_hw, 1), structure=np.ones((3, 3)), iterations=d)
    return mask_hw & ~eroded[1:-1, 1:-1]


def _reference_counts(
    pred_bhw: np.ndarray, target_bhw: np.ndarray, c: int, ignore: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """Slow per-image, per-class Boundary IoU counts, independent of BoundaryIoU."""
    inter, union = np.zeros(c, np.int64), np.zeros(c, np.int64)
    h, w = target_bhw.shape[-2:]
    d = max(1, int(round(0.02 * np.sqrt(h**2 + w**2))))
    for pred, target in zip(pred_bhw, target_bhw, strict=True):
        valid = target != ignore
        for k in range(c):
            g = _reference_band((target == k) & valid, d)
            p = _reference_band((pred == k) & valid, d)
            inter[k] += int((g & p).sum())
            union[k] += int((g | p).sum())
    return inter, union


def _blobs(g: torch.Generator, b: int, h: int, w: int, c: int, cell: int) -> torch.Tensor:
    """Random label maps made of ``cell``-sized blocks (regions with interiors), [B, H, W]."""
    coarse = torch.randint(0, c, (b, -(-h // cell), -(-w // cell)), generator=g)
    return coarse.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :h, :w]


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_boundary_iou_matches_scipy_reference(device):
    g = torch.Generator().manual_seed(0)
    c = 4
    biou = BoundaryIoU(c, device=device)
    ref_i, ref_u = np.zeros(c, np.int64), np.zeros(c, np.int64)
    # several sizes (d = 1, 1, 2, 3, 4), non-square ones included; blocky and pixel noise maps
    for b, h, w, cell in [(2, 6, 6, 2), (3, 17, 11, 3), (2, 64, 64, 9), (1, 9, 130, 5),
                          (1, 100, 150, 13), (2, 23, 31, 1)]:  # fmt: skip
        target = _blobs(g, b, h, w, c, cell)
        pred = torch.where(torch.rand(b, h, w, generator=g) < 0.1,
                           torch.randint(0, c, (b, h, w), generator=g),
                           _blobs(g, b, h, w, c, cell))  # fmt: skip
        pred = torch.where(torch.rand(b, h, w, generator=g) < 0.5, target, pred)
        target[torch.rand(b, h, w, generator=g) < 0.08] = 255  # sprinkled ignore pixels
        target[:, : h // 4, : w // 5] = 255  # and an ignored block
        biou.update(pred.to(device), target.to(device))
        i, u = _reference_counts(pred.numpy(), target.numpy(), c)
        ref_i += i
        ref_u += u
    assert biou.counts.device.type == device
    assert biou.intersection().cpu().tolist() == ref_i.tolist()
    assert biou.union().cpu().tolist() == ref_u.tolist()
    assert (ref_u > ref_i).all() and (ref_i > 0).all()  # the case is not degenerate


def _split_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pred, target = _split_data()
        biou, cm = BoundaryIoU(3), ConfusionMatrix(3)
        for i in range(rank, len(pred), world):  # every world-th image, as the eval loader
            biou.update(pred[i], target[i])
            cm.update(pred[i], target[i])
        biou.all_reduce()
        cm.all_reduce()
        torch.save({"biou": biou.counts, "cm": cm.mat}, f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def _split_data() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    sizes = [(12, 12), (30, 20), (64, 64), (9, 40), (50, 50)]  # d = 1, 1, 2, 1, 1
    target = [_blobs(g, 1, h, w, 3, 4) for h, w in sizes]
    pred = [_blobs(g, 1, h, w, 3, 4) for h, w in sizes]
    for t in target:
        t[torch.rand(t.shape, generator=g) < 0.1] = 255
    return pred, target


def test_boundary_iou_all_reduce_over_two_processes(tmp_path):
    # two gloo ranks, each with its share of the images, sum to one process over all of them
    mp.spawn(_split_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    pred, target = _split_data()
    single, single_cm = BoundaryIoU(3), ConfusionMatrix(3)
    for p, t in zip(pred, target, strict=True):
        single.update(p, t)
        single_cm.update(p, t)
    for rank in range(2):
        got = torch.load(tmp_path / f"r{rank}.pt", weights_only=True)
        assert torch.equal(got["biou"], single.counts)
        assert torch.equal(got["cm"], single_cm.mat)
