"""EMA teacher details that mutation testing found unpinned (issue 18, ``make mutate``):
defaults, keyword forwarding, the extra state round trip, decay 0 over a non-finite teacher,
and the messages of its errors.

Machine: exact, fp32-tolerance. Defaults, the extra state and messages are exact; the forward's
keywords and the decay-0 copy are compared with assert_close (fp32-tolerance).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brpg.frameworks.ema_teacher import EMATeacher, ema_decay


class _Net(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 1)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.bn(self.conv(x)) * scale


def test_defaults_are_the_official_ones():
    teacher = EMATeacher(_Net())
    assert teacher.max_decay == 0.99 and teacher.ema_buffers is False and teacher.step == 0


def test_forward_passes_keyword_arguments():
    torch.manual_seed(0)
    teacher = EMATeacher(_Net()).eval()
    x = torch.randn(1, 3, 2, 2)
    torch.testing.assert_close(teacher(x, scale=3.0), 3.0 * teacher(x))


def test_extra_state_round_trips_every_setting():
    src = EMATeacher(_Net(), max_decay=0.9, ema_buffers=True)
    src.step = 7
    dst = EMATeacher(_Net(), max_decay=0.5, ema_buffers=False)
    dst.load_state_dict(src.state_dict())
    assert (dst.step, dst.max_decay, dst.ema_buffers) == (7, 0.9, True)
    # a state from before the settings were saved keeps this teacher's own settings
    old = EMATeacher(_Net(), max_decay=0.7, ema_buffers=True)
    old.set_extra_state({"step": 3})
    assert (old.step, old.max_decay, old.ema_buffers) == (3, 0.7, True)


def test_decay_zero_copies_the_student_even_over_a_non_finite_teacher():
    student = _Net()
    teacher = EMATeacher(student)
    with torch.no_grad():
        for p in teacher.module.parameters():
            p.fill_(float("nan"))
        for p in student.parameters():
            p.add_(1.0)
    assert teacher.update(student, step=0) == 0.0
    for pt, ps in zip(teacher.module.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(pt, ps)


def test_error_messages_name_the_problem():
    with pytest.raises(ValueError, match="step_since_start must be ≥ 0, got -1"):
        ema_decay(-1)
    teacher = EMATeacher(_Net())
    with pytest.raises(ValueError, match="teacher has 4 parameters, student 2"):
        teacher.update(nn.Conv2d(3, 4, 1))
