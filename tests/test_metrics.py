"""Confusion matrix, IoU and mIoU (spec §10)."""

from __future__ import annotations

import pytest
import torch

from brpg.engine.metrics import ConfusionMatrix, intersection_and_union

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
