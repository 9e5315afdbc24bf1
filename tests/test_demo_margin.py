"""brpg.book.demo_margin: chapter 4's prototype margins against a hand-worked case and a
scalar reference.

Machine: fp32-tolerance. Three classes in 2-D: class 0 has high rows along
(1, 0) and three times as many low rows along (0, 1), class 1 lies along (-1, 0), class 2
along (0, -1).
"""

import math

import pytest
import torch

from brpg.book.demo_margin import class_centres, prototype_margins
from brpg.method.memory import PrototypeMemory


def _memory() -> PrototypeMemory:
    mem = PrototypeMemory(3, 2, capacity=8, device="cpu", sync=False)
    mem.push("high", torch.tensor([[1.0, 0.0], [3.0, 0.0], [-1.0, 0.0], [0.0, -2.0]]),
             torch.tensor([0, 0, 1, 2]))  # fmt: skip
    mem.push("low", torch.tensor([[0.0, 1.0]] * 3 + [[-2.0, 0.0], [0.0, -1.0]]),
             torch.tensor([0, 0, 0, 1, 2]))  # fmt: skip
    return mem


def test_centres_weight_the_two_memories_equally():
    """Class 0: high direction (1, 0), low (0, 1), so its centre is at 45 degrees whatever
    the row counts (a centre over all five rows would be (4, 3)/5 normalised)."""
    mu = class_centres(_memory())
    expected = torch.tensor([[1.0, 1.0], [-math.sqrt(2.0), 0.0], [0.0, -math.sqrt(2.0)]])
    assert torch.allclose(mu, expected / math.sqrt(2.0), atol=1e-6)


def test_margins_match_a_scalar_reference_and_skip_invalid_slots():
    """Slot 0 high, slots 1-2 low (k_high = 1); slot 2 of classes 0 and 1 is invalid and holds
    a prototype deep in another class (it would drag m_low and the rival if counted). A
    margin against the wrong centre, a max that includes the own class, an m_low over
    invalid slots or a swapped high/low split fails it."""
    mu = class_centres(_memory())
    protos = torch.tensor(
        [
            [[1.0, 0.0], [-0.2, 1.0], [0.0, -1.0]],
            [[-1.0, 0.1], [-1.0, 1.0], [0.0, -1.0]],
            [[0.0, -1.0], [0.5, -1.0], [0.2, -1.0]],
        ]
    )
    valid = torch.tensor([[True, True, False], [True, True, False], [True, True, True]])
    got = prototype_margins(protos, valid, mu, k_high=1)
    ref = torch.empty(3, 3)
    for c in range(3):
        for k in range(3):
            p = protos[c, k] / protos[c, k].norm()
            cos = [float(p @ mu[e]) for e in range(3)]
            ref[c, k] = cos[c] - max(cos[e] for e in range(3) if e != c)
    assert torch.allclose(got.margin, ref, atol=1e-6)
    assert got.m_high.tolist() == pytest.approx(ref[:, 0].tolist(), abs=1e-6)
    m_low = [float(ref[0, 1]), float(ref[1, 1]), float(ref[2, 1:].mean())]
    assert got.m_low.tolist() == pytest.approx(m_low, abs=1e-6)
    # class 0's rival by hand: among its valid prototypes, (-0.2, 1) has the largest cosine
    # to another centre, 0.196 to class 1's (-1, 0); its invalid slot (0, -1) would make it 2
    assert got.rival.tolist()[0] == 1
