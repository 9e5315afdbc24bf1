"""Optimiser, parameter groups and the poly learning-rate schedule (appendix: optimiser).

Two parameter groups: the encoder (``model.backbone``) at the base LR and everything else (the
decoder: ASPP, low-level conv, classifier, representation head) at ``base × head_lr_mult``
(10 for VOC/COCO, 1 for Cityscapes). Weight decay applies to all parameters, BN and biases
included, as in the official code.

Schedule: ``lr_g(i) = base_g · (1 − i/total)^power``, ``i = 0, 1, …``, set at the *start* of
iteration ``i``. With :func:`build_scheduler` (a ``LambdaLR``) this means: build the scheduler
before the first step (that sets ``lr(0)``), then in every iteration run
``optimizer.step()`` followed by ``scheduler.step()``, so iteration ``i`` always runs with
``lr(i)``. On resume, restore ``scheduler.state_dict()`` together with the optimiser's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from brpg.config import ConfigError, OptimConfig
from brpg.distributed import unwrap_model

__all__ = [
    "OPTIMIZERS",
    "build_optimizer",
    "build_scheduler",
    "param_groups",
    "poly_lr_lambda",
]

OPTIMIZERS = ("sgd", "adamw")


def param_groups(model: nn.Module, head_lr_mult: float) -> list[dict[str, Any]]:
    """``[backbone group, head group]`` with an ``lr_mult`` key each (appendix: optimiser).

    The backbone group holds ``model.backbone``'s parameters (``lr_mult = 1``), the head group
    every other parameter of the model (``model.decoder`` and anything outside both,
    ``lr_mult = head_lr_mult``). Parameters with ``requires_grad=False`` are left out.
    DDP / ``torch.compile`` wrappers are unwrapped.
    """
    model = unwrap_model(model)
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"{type(model).__name__} has no 'backbone' submodule")
    backbone_ids = {id(p) for p in backbone.parameters()}
    enc = [p for p in backbone.parameters() if p.requires_grad]
    head = [p for p in model.parameters() if id(p) not in backbone_ids and p.requires_grad]
    return [
        {"params": enc, "lr_mult": 1.0, "name": "backbone"},
        {"params": head, "lr_mult": float(head_lr_mult), "name": "decoder"},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, no Nesterov) or AdamW over :func:`param_groups`, LR = ``cfg.lr × lr_mult``."""
    groups = param_groups(model, cfg.head_lr_mult)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    name = cfg.name.lower()
    if name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=False,
        )
    if name == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
    raise ConfigError(f"unknown optim.name '{cfg.name}'; valid: {', '.join(OPTIMIZERS)}")


def poly_lr_lambda(step: int, total_steps: int, power: float, warmup_steps: int = 0) -> float:
    """LR factor at iteration ``step``: ``(1 − step/total)^power`` (appendix: optimiser).

    ``step`` is clamped to ``[0, total]``, so the factor is 0 from ``total`` on. With
    ``warmup_steps > 0`` the factor is further multiplied by ``(step + 1) / warmup_steps`` for
    ``step < warmup_steps`` (a linear ramp from ``1/warmup_steps`` to 1; not in the official
    code, where warm-up is 0).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    s = min(max(step, 0), total_steps)
    factor = (1.0 - s / total_steps) ** power
    if warmup_steps > 0 and s < warmup_steps:
        factor *= (s + 1) / warmup_steps
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`poly_lr_lambda` to every group's initial LR.

    Right after construction every group has ``lr(0)``; call ``scheduler.step()`` once after
    each ``optimizer.step()`` (see the module docstring).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    power, warmup = float(cfg.poly_power), int(cfg.warmup_steps)

    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict stores None
        return poly_lr_lambda(step, total_steps, power, warmup)

    return LambdaLR(optimizer, lr_lambda=factor)
