"""The EMA teacher of the mean-teacher framework (appendix: timeline, one step, Q14).

The teacher is a copy of the student that is never trained by gradients. After every
semi-supervised optimiser step its parameters follow the student's by an exponential moving
average, ``θ_t ← d·θ_t + (1 − d)·θ_s``, with a decay that ramps up from 0:

    d(t) = min(1 − 1/(t + 1), max_decay),    t = steps since the end of the warm-up

(``t = i − S·L`` in the spec; ``max_decay`` = 0.99). So the first update (t = 0) makes the
teacher equal to the student, the second (t = 1) averages them half/half, and from t = 99 on
the decay is 0.99.

Timeline (appendix: timeline): during the supervised warm-up the teacher only runs train-mode
forwards on labeled batches (to move its BN running statistics); at the first semi-supervised step
its *parameters* are set to the student's (:meth:`EMATeacher.copy_from`); buffers are not copied.
Buffers are never averaged either (appendix: one step, Q14): the teacher's BN statistics come from
its own train-mode forwards (appendix: one step). ``ema_buffers=True`` / ``copy_from(buffers=True)``
are opt-in variants.

All arithmetic is done with ``torch._foreach_*`` over the whole parameter list (a few fused
kernels per step, no per-parameter Python arithmetic, no host sync). The step counter is a
Python ``int`` kept in the module's extra state, so ``state_dict()`` round-trips it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from brpg.distributed import unwrap_model

__all__ = ["EMATeacher", "ema_decay"]


def ema_decay(step_since_start: int, max_decay: float = 0.99) -> float:
    """``min(1 − 1/(t + 1), max_decay)`` (appendix: one step): 0 at t = 0, 0.5 at t = 1, 0.99 at t ≥ 99."""
    if step_since_start < 0:
        raise ValueError(f"step_since_start must be ≥ 0, got {step_since_start}")
    return min(1.0 - 1.0 / (step_since_start + 1), max_decay)


def _float_buffers(module: nn.Module) -> list[Tensor]:
    return [b for b in module.buffers() if b.is_floating_point()]


def _other_buffers(module: nn.Module) -> list[Tensor]:
    return [b for b in module.buffers() if not b.is_floating_point()]


class EMATeacher(nn.Module):
    """A frozen deep copy of the student, updated by parameter EMA (appendix: one step).

    Args:
        student: the student model, possibly wrapped in DDP (``.module`` is unwrapped).
        max_decay: the cap of :func:`ema_decay` (0.99 in every official config).
        ema_buffers: also average floating-point buffers (BN running mean/var) and copy the
            integer ones (``num_batches_tracked``). Off by default: the official code leaves
            the teacher's buffers to its own train-mode forwards (appendix Q14).

    ``teacher(x)`` calls the wrapped copy; ``teacher.module`` is that copy. ``step`` is the
    ``t`` that the next :meth:`update` uses when none is given.
    """

    def __init__(
        self, student: nn.Module, max_decay: float = 0.99, ema_buffers: bool = False
    ) -> None:
        super().__init__()
        src = unwrap_model(student)
        self.module = copy.deepcopy(src)
        for p in self.module.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.max_decay = float(max_decay)
        self.ema_buffers = bool(ema_buffers)
        self.step = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def _pairs(self, student: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        t_params = list(self.module.parameters())
        s_params = [p.detach() for p in unwrap_model(student).parameters()]
        if len(t_params) != len(s_params):
            raise ValueError(
                f"teacher has {len(t_params)} parameters, student {len(s_params)}: not the same model"
            )
        return t_params, s_params

    @torch.no_grad()
    def copy_from(self, student: nn.Module, buffers: bool = False, reset_step: bool = True) -> None:
        """Teacher := student (appendix: timeline, epoch S step 0): parameters, and buffers if
        asked.

        ``reset_step`` sets ``step = 0`` so that the next :meth:`update` uses decay 0.
        """
        t_params, s_params = self._pairs(student)
        torch._foreach_copy_(t_params, s_params)
        if buffers:
            t_bufs, s_bufs = list(self.module.buffers()), list(unwrap_model(student).buffers())
            if len(t_bufs) != len(s_bufs):
                raise ValueError("teacher and student have different buffers")
            if t_bufs:
                torch._foreach_copy_(t_bufs, [b.detach() for b in s_bufs])
        if reset_step:
            self.step = 0

    @torch.no_grad()
    def update(self, student: nn.Module, step: int | None = None) -> float:
        """One EMA step ``θ_t ← d·θ_t + (1 − d)·θ_s`` with ``d = ema_decay(step)``.

        ``step`` defaults to the internal counter; afterwards the counter is ``step + 1``.
        Returns the decay used (a Python float: no host sync).
        """
        t = self.step if step is None else int(step)
        decay = ema_decay(t, self.max_decay)
        t_params, s_params = self._pairs(student)
        _ema_(t_params, s_params, decay)
        if self.ema_buffers:
            s_mod = unwrap_model(student)
            t_float, s_float = _float_buffers(self.module), _float_buffers(s_mod)
            t_other, s_other = _other_buffers(self.module), _other_buffers(s_mod)
            if len(t_float) != len(s_float) or len(t_other) != len(s_other):
                raise ValueError("teacher and student have different buffers")
            _ema_(t_float, [b.detach() for b in s_float], decay)
            if t_other:
                torch._foreach_copy_(t_other, s_other)
        self.step = t + 1
        return decay

    def get_extra_state(self) -> dict[str, Any]:
        return {"step": self.step, "max_decay": self.max_decay, "ema_buffers": self.ema_buffers}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.max_decay = float(state.get("max_decay", self.max_decay))
        self.ema_buffers = bool(state.get("ema_buffers", self.ema_buffers))


def _ema_(targets: list[Tensor], sources: list[Tensor], decay: float) -> None:
    """In place ``targets ← decay·targets + (1 − decay)·sources`` (fused ``_foreach`` ops)."""
    if not targets:
        return
    if decay == 0.0:  # exactly the student, also when the teacher holds inf/NaN
        torch._foreach_copy_(targets, sources)
        return
    torch._foreach_mul_(targets, decay)
    torch._foreach_add_(targets, sources, alpha=1.0 - decay)
