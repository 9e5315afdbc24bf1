"""The stride-s reference predictor of brpg.data.resolution, on hand-worked label maps.

Machine: exact. Label maps and IoUs from integer counts on hand-worked maps.
"""

import pytest
import torch

from brpg.data.resolution import stride_ceiling, stride_oracle


def test_a_split_on_a_cell_edge_is_resolved_exactly() -> None:
    # 64 px, stride 4: columns 0-31 are class 0, 32-63 class 1, i.e. cells 0-7 and 8-15.
    # Upsampled with align_corners=True, grid point j sits at pixel 4.2·j; the shares cross
    # 0.5 halfway between j = 7 (29.4) and j = 8 (33.6), at 31.5: the split is exact.
    target = torch.zeros(1, 64, 64, dtype=torch.long)
    target[..., 32:] = 1
    assert torch.equal(stride_oracle(target, 2, 4), target)
    assert stride_ceiling(target, 2, 4) == pytest.approx({"miou": 100.0, "mbiou": 100.0})


def test_a_one_pixel_stroke_vanishes_on_the_stride_4_grid() -> None:
    # a 1-px line fills a quarter of each cell it crosses: the background wins everywhere
    target = torch.zeros(1, 32, 32, dtype=torch.long)
    target[..., 9] = 1
    assert (stride_oracle(target, 2, 4) == 0).all()
    res = stride_ceiling(target, 2, 4)
    assert res["miou"] < 50.0  # class 1 scores 0; background 992 / 1024
    assert res["miou"] == pytest.approx(100 * (992 / 1024) / 2)
    # at stride 1 nothing is lost
    assert stride_ceiling(target, 2, 1) == pytest.approx({"miou": 100.0, "mbiou": 100.0})


def test_ignored_pixels_do_not_vote() -> None:
    # a cell half class 1, half ignored: its share of class 1 is 1, not 0.5
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, :4, :4] = 1
    target[:, :2, :4] = 255
    pred = stride_oracle(target, 2, 4)
    assert pred[0, 0, 0] == 1  # a background-vs-ignore mix would have lost this corner
