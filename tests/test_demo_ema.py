"""brpg.book.demo_ema: chapter 6's measures on hand-worked banks.

Machine: fp32-tolerance. Cosines and means compared with a 1e-6 tolerance.
"""

import math

import pytest
import torch

from brpg.book.demo_ema import cell_fit, proto_cos
from brpg.method.prototype_ema import PrototypeBank


def _bank() -> PrototypeBank:
    """Class 0: slots (1, 0) and (0, 1) valid, slot 2 invalid; class 1: slot 0 = (-1, 0)."""
    bank = PrototypeBank(2, 2, 3, momentum=0.9)
    protos = torch.tensor(
        [[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], [[-1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]]
    )
    valid = torch.tensor([[True, True, False], [True, False, False]])
    bank.set_prototypes(protos, valid)
    return bank


def test_proto_cos_is_nan_on_invalid_slots():
    got = proto_cos(_bank(), torch.tensor([[1.0, 1.0], [-1.0, 0.0]]))
    r = 1 / math.sqrt(2.0)
    assert got[0, :2].tolist() == pytest.approx([r, r]) and got[1, 0].item() == pytest.approx(1.0)
    assert torch.isnan(got[0, 2]) and torch.isnan(got[1, 1:]).all()


def test_cell_fit_by_hand():
    """Class 0's features (2, 0.2) and (2, -0.2) choose slot 0 (their mean (2, 0): cos 1),
    (0.1, 1) chooses slot 1 (cos 1/sqrt(1.01)); class 1's (-1, 1) is alone in its cell (cos
    1/sqrt(2)); the invalid slot, however near, gets nothing and is not averaged. A fit that
    averaged over empty cells, counted the invalid slot or pooled the classes fails it."""
    feats = torch.tensor([[2.0, 0.2], [2.0, -0.2], [0.1, 1.0], [-1.0, 1.0]])
    targets = torch.tensor([0, 0, 0, 1])
    expected = (1.0 + 1 / math.sqrt(1.01) + 1 / math.sqrt(2.0)) / 3
    assert cell_fit(_bank(), feats, targets) == pytest.approx(expected, abs=1e-6)
    # a class-1 feature never joins a class-0 cell, however close to it
    assert cell_fit(_bank(), feats[:1], torch.tensor([1])) == pytest.approx(-2 / math.sqrt(4.04))
