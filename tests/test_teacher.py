"""EMA teacher (spec §4.8, §1, §12 Q14).

Machine: exact, fp32-tolerance. EMA updates against their formula are fp32-tolerance; copies,
untouched buffers and state dicts are exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from brpg.distributed import unwrap_model
from brpg.frameworks.ema_teacher import EMATeacher, ema_decay


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def _perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(torch.rand(b.shape, generator=g))
            else:
                b.add_(7)


def test_ema_decay_values():
    assert ema_decay(0) == 0.0
    assert ema_decay(1) == 0.5
    assert ema_decay(99) == pytest.approx(0.99)
    assert ema_decay(1000) == 0.99
    assert ema_decay(3, max_decay=0.5) == 0.5
    assert ema_decay(2, max_decay=0.999) == pytest.approx(2 / 3)


def test_teacher_is_frozen_copy():
    student = _net()
    teacher = EMATeacher(student)
    assert teacher.module is not student
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 4, 4)
    student.eval(), teacher.eval()
    torch.testing.assert_close(teacher(x), student(x))


def test_update_averages_parameters_only():
    student = _net()
    teacher = EMATeacher(student)
    t0 = [p.clone() for p in teacher.module.parameters()]
    tb0 = [b.clone() for b in teacher.module.buffers()]
    _perturb(student, 1)
    d = teacher.update(student, step=3)  # decay 0.75: teacher and student weights differ
    assert d == 0.75
    for pt, p0, ps in zip(teacher.module.parameters(), t0, student.parameters(), strict=True):
        torch.testing.assert_close(pt, 0.75 * p0 + 0.25 * ps)
        assert not torch.allclose(pt, 0.25 * p0 + 0.75 * ps)  # roles swapped would differ
    for bt, b0 in zip(teacher.module.buffers(), tb0, strict=True):
        assert torch.equal(bt, b0)  # buffers untouched
    assert teacher.step == 4
    # t = 0 → the teacher becomes the student exactly; the counter drives the default t
    teacher.step = 0
    assert teacher.update(student) == 0.0
    for pt, ps in zip(teacher.module.parameters(), student.parameters(), strict=True):
        assert torch.equal(pt, ps)
    assert teacher.step == 1


def test_ema_buffers_option():
    student = _net()
    teacher = EMATeacher(student, ema_buffers=True)
    tb0 = [b.clone() for b in teacher.module.buffers()]
    _perturb(student, 2)
    teacher.update(student, step=3)  # decay 0.75
    for bt, b0, bs in zip(teacher.module.buffers(), tb0, student.buffers(), strict=True):
        if bt.is_floating_point():
            torch.testing.assert_close(bt, 0.75 * b0 + 0.25 * bs)
        else:
            assert torch.equal(bt, bs)  # num_batches_tracked is copied


def test_copy_from_parameters_and_optionally_buffers():
    student = _net()
    teacher = EMATeacher(student)
    teacher.step = 17
    _perturb(student, 3)
    tb0 = [b.clone() for b in teacher.module.buffers()]
    teacher.copy_from(student)
    assert teacher.step == 0
    for pt, ps in zip(teacher.module.parameters(), student.parameters(), strict=True):
        assert torch.equal(pt, ps)
    for bt, b0 in zip(teacher.module.buffers(), tb0, strict=True):
        assert torch.equal(bt, b0)
    teacher.copy_from(student, buffers=True)
    for bt, bs in zip(teacher.module.buffers(), student.buffers(), strict=True):
        assert torch.equal(bt, bs)


def test_state_dict_round_trip():
    student = _net()
    teacher = EMATeacher(student, max_decay=0.9)
    _perturb(student, 4)
    for _ in range(5):
        teacher.update(student)
    state = teacher.state_dict()
    other = EMATeacher(_net(seed=9))
    other.load_state_dict(state)
    assert other.step == 5 and other.max_decay == 0.9
    for a, b in zip(teacher.state_dict().values(), other.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    # both continue identically
    teacher.update(student), other.update(student)
    for pa, pb in zip(teacher.parameters(), other.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_ddp_wrapped_student(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        plain = nn.Linear(3, 2)
        ddp = nn.parallel.DistributedDataParallel(plain)
        assert unwrap_model(ddp) is plain
        teacher = EMATeacher(ddp)
        assert isinstance(teacher.module, nn.Linear)
        p0 = [p.clone() for p in teacher.parameters()]
        with torch.no_grad():
            plain.weight.add_(1.0)
        teacher.update(ddp, step=1)
        torch.testing.assert_close(teacher.module.weight, 0.5 * p0[0] + 0.5 * plain.weight)
        teacher.copy_from(ddp)
        assert torch.equal(teacher.module.weight, plain.weight)
    finally:
        dist.destroy_process_group()


def test_mismatched_student_rejected():
    teacher = EMATeacher(_net())
    with pytest.raises(ValueError):
        teacher.update(nn.Linear(2, 2))


def test_update_runs_on_meta_device():
    """EMA and copy are sync-free: they work on meta tensors."""
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).to("meta")
    teacher = EMATeacher(student, ema_buffers=True)
    teacher.update(student)
    teacher.update(student)
    teacher.copy_from(student, buffers=True)
    assert teacher.step == 0
