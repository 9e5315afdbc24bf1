"""Metric details that mutation testing found unpinned (issue 18, ``make mutate``): default and
negative ignore values, absent top classes, a one-pixel accuracy, exact integer counts, the
state-dict format and its errors, the all-reduce under a (one-process) process group.

Machine: exact. Integer counts, state dicts and messages.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from brpg.metrics import (
    BoundaryIoU,
    ConfusionMatrix,
    inner_boundary,
    intersection_and_union,
)


def test_intersection_and_union_default_ignore_and_absent_classes():
    pred = torch.tensor([[0, 0, 1, 0]])
    target = torch.tensor([[0, 255, 255, 0]])
    inter, union, area_t = intersection_and_union(pred, target, num_classes=4)
    # the two 255 pixels are ignored whatever was predicted; classes 1-3 absent: zeros, not
    # a shorter histogram
    assert inter.tolist() == [2, 0, 0, 0]
    assert union.tolist() == [2, 0, 0, 0]
    assert area_t.tolist() == [2, 0, 0, 0]


def test_intersection_and_union_with_a_negative_ignore_value():
    pred = torch.tensor([[0, 1, 1]])
    target = torch.tensor([[0, -1, 1]])
    inter, union, _ = intersection_and_union(pred, target, num_classes=2, ignore_index=-1)
    assert inter.tolist() == [1, 1] and union.tolist() == [1, 1]


def test_pixel_accuracy_of_one_pixel():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[1]]), torch.tensor([[1]]))
    assert cm.pixel_acc() == 100.0


def test_boundary_iou_ignores_255_by_default_and_counts_exactly():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, :, 4:] = 1
    pred = target.clone()
    biou = BoundaryIoU(2, dilation_ratio=0.1)
    biou.update(pred, target)
    perfect = biou.counts.clone()
    assert biou.counts.dtype == torch.int64  # exact beyond 2^24 pixels (float32 is not)
    # the same image with a wrong prediction only where the target says 255: nothing changes
    target2, pred2 = target.clone(), pred.clone()
    target2[:, :2, :2] = 255
    pred2[:, :2, :2] = 1
    other = BoundaryIoU(2, dilation_ratio=0.1)
    other.update(pred2, target2)
    assert other.miou() == pytest.approx(100.0, abs=1e-6)
    assert biou.miou() == pytest.approx(100.0, abs=1e-6) and perfect.sum() > 0


def test_state_dict_format_and_errors():
    biou = BoundaryIoU(3, ignore_index=7, dilation_ratio=0.05)
    state = biou.state_dict()
    assert set(state) == {"num_classes", "ignore_index", "dilation_ratio", "counts"}
    assert (state["num_classes"], state["ignore_index"], state["dilation_ratio"]) == (3, 7, 0.05)
    with pytest.raises(ValueError, match=r"counts shape \(2, 2\) does not match num_classes=3"):
        biou.load_state_dict({**state, "counts": torch.zeros(2, 2, dtype=torch.int64)})
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"matrix shape \(2, 2\) does not match num_classes=3"):
        cm.load_state_dict({**cm.state_dict(), "matrix": torch.zeros(2, 2, dtype=torch.int64)})


def test_all_reduce_under_a_one_process_group(tmp_path):
    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
    )
    try:
        cm = ConfusionMatrix(2)
        cm.update(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 0]]))
        before = cm.mat.clone()
        cm.all_reduce()
        assert torch.equal(cm.mat, before)
        biou = BoundaryIoU(2, dilation_ratio=0.2)
        biou.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long))
        counts = biou.counts.clone()
        biou.all_reduce()
        assert torch.equal(biou.counts, counts)
    finally:
        dist.destroy_process_group()


def test_inner_boundary_rejects_a_width_below_one():
    with pytest.raises(ValueError, match="boundary width must be >= 1, got 0"):
        inner_boundary(torch.ones(1, 1, 4, 4, dtype=torch.bool), 0)
