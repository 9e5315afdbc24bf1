"""brpg.book.demo_confidence: chapter 3's boundary-distance measurement on a hand-worked map.

Machine: exact. A 6 x 6 scene, background with a class-1 stripe in the last column: the
boundary is columns 4 and 5 (both sides of the label change), so a background pixel in
column x lies 4 - x pixels from it.
"""

import pytest
import torch

from brpg.book.demo_confidence import Routing, confidence_vs_boundary


def _routing(high_cols: dict[int, list[int]], low_cols: dict[int, list[int]]) -> Routing:
    labels = torch.zeros(1, 6, 6, dtype=torch.long)
    labels[0, :, 5] = 1

    def mask(cols: dict[int, list[int]]) -> torch.Tensor:
        m = torch.zeros(1, 6, 6, dtype=torch.bool)
        for x, rows in cols.items():
            m[0, rows, x] = True
        return m

    high, low = mask(high_cols), mask(low_cols)
    batch = {
        "labels_bhw": labels,
        "labels_small_bhw": labels,
        "logits_bchw": torch.zeros(1, 3, 6, 6),
    }
    valid = torch.ones(1, 6, 6, dtype=torch.bool)
    return Routing(batch, None, high, low, valid & ~high & ~low, valid)  # type: ignore[arg-type]


def test_distances_per_class_pooled_and_on_the_border_ring():
    """High background pixels in column 0 (4 px away), low ones in column 3 (1 px away); the
    stripe's pixels are on the boundary: high rows 0-2, low rows 3-5. A swap of high and low,
    a class filter that leaks, a ring that is not the outermost one, or min_pixels ignored
    changes one of these numbers."""
    rows = list(range(6))
    routing = _routing({0: rows, 5: [0, 1, 2]}, {3: rows, 5: [3, 4, 5]})
    st = confidence_vs_boundary(routing, min_pixels=3)
    assert st.per_class == [(0, 4.0, 1.0, 6, 6), (1, 0.0, 0.0, 3, 3)]  # class 2: no pixels
    assert st.classes_closer == 1  # background yes; the stripe: a tie is not closer
    assert st.pooled_high == pytest.approx(24 / 9) and st.pooled_low == pytest.approx(6 / 9)
    assert st.ring_high == 1.0  # column 0 is all border
    assert st.ring_low == pytest.approx(2 / 6)  # column 3: only rows 0 and 5
    fewer = confidence_vs_boundary(routing, min_pixels=4)
    assert [c for c, *_ in fewer.per_class] == [0]  # the stripe has 3 of each: left out
