"""Parameter groups, optimisers and the poly schedule (spec §9).

Machine: exact. Parameter groups and the poly schedule in Python float arithmetic; pytest.approx
only absorbs the rounding of the hand-written expected values.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from brpg.config import ConfigError, OptimConfig
from brpg.engine.optim import build_optimizer, build_scheduler, param_groups, poly_lr_lambda


class TinySeg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.decoder = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.decoder(self.backbone(x))}


def test_param_groups_disjoint_and_complete():
    model = TinySeg()
    enc, head = param_groups(model, 10.0)
    enc_ids = {id(p) for p in enc["params"]}
    head_ids = {id(p) for p in head["params"]}
    assert not enc_ids & head_ids
    assert enc_ids | head_ids == {id(p) for p in model.parameters()}
    assert enc_ids == {id(p) for p in model.backbone.parameters()}
    assert head_ids == {id(p) for p in model.decoder.parameters()}
    assert enc["lr_mult"] == 1.0 and head["lr_mult"] == 10.0


def test_param_groups_needs_backbone():
    with pytest.raises(ValueError, match="backbone"):
        param_groups(nn.Linear(2, 2), 10.0)


def test_sgd_lr_ratio_and_settings():
    cfg = OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, head_lr_mult=10.0)
    opt = build_optimizer(TinySeg(), cfg)
    assert isinstance(opt, torch.optim.SGD)
    enc, head = opt.param_groups
    assert enc["lr"] == pytest.approx(0.01)
    assert head["lr"] / enc["lr"] == pytest.approx(10.0)
    for g in opt.param_groups:  # weight decay on every parameter, BN and biases included
        assert g["weight_decay"] == 1e-4 and g["momentum"] == 0.9 and g["nesterov"] is False


def test_adamw_and_bad_name():
    cfg = OptimConfig(name="adamw", lr=1e-3, betas=(0.8, 0.99), weight_decay=0.01)
    opt = build_optimizer(TinySeg(), cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)
    with pytest.raises(ConfigError, match=r"'adam'.*valid: sgd, adamw"):
        build_optimizer(TinySeg(), OptimConfig(name="adam"))
    assert issubclass(ConfigError, ValueError)


def test_poly_lambda_values():
    total = 100
    assert poly_lr_lambda(0, total, 0.9) == pytest.approx(1.0)
    assert poly_lr_lambda(50, total, 0.9) == pytest.approx(0.5**0.9)
    assert poly_lr_lambda(99, total, 0.9) == pytest.approx(0.01**0.9)
    assert poly_lr_lambda(100, total, 0.9) == 0.0
    assert poly_lr_lambda(150, total, 0.9) == 0.0
    # warm-up: (step + 1) / warmup on top of the poly factor
    assert poly_lr_lambda(0, total, 0.9, warmup_steps=4) == pytest.approx(0.25)
    assert poly_lr_lambda(3, total, 0.9, warmup_steps=4) == pytest.approx(0.97**0.9)
    assert poly_lr_lambda(4, total, 0.9, warmup_steps=4) == pytest.approx(0.96**0.9)
    with pytest.raises(ValueError):
        poly_lr_lambda(0, 0, 0.9)


def _lrs_over_run(total: int, cfg: OptimConfig) -> list[list[float]]:
    """The LR each iteration runs with, calling the scheduler as the trainer does."""
    model = TinySeg()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total)
    seen = []
    for _ in range(total):
        seen.append([g["lr"] for g in opt.param_groups])
        model(torch.randn(1, 3, 5, 5))["logits"].sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return seen


def test_scheduler_sets_lr_at_start_of_each_iteration():
    total, base = 10, 0.02
    cfg = OptimConfig(lr=base, head_lr_mult=10.0, poly_power=0.9)
    seen = _lrs_over_run(total, cfg)
    for i in (0, total // 2, total - 1):
        factor = (1 - i / total) ** 0.9
        assert seen[i][0] == pytest.approx(base * factor)
        assert seen[i][1] == pytest.approx(10 * base * factor)


def test_scheduler_state_dict_round_trip():
    cfg = OptimConfig(lr=0.1, warmup_steps=2)
    model = TinySeg()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 20)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = build_optimizer(TinySeg(), cfg)
    sched2 = build_scheduler(opt2, cfg, 20)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 7
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 8 / 20) ** 0.9)
