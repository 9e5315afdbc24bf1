"""The state of a semi-supervised run, for either framework: the EMA teacher and the BRPG
plug-in, with ``state_dict()`` / ``load_state_dict()`` (appendix: timeline, one step; paper §3).

A checkpoint taken in any phase resumes exactly; its keys are ``teacher, memory, back, bank,
csp`` (the last four the plug-in's, ``None`` without it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from brpg.config import Config
from brpg.frameworks.augment import StrongAug
from brpg.frameworks.ema_teacher import EMATeacher
from brpg.method.plugin import PLUGIN_STATE_KEYS, BRPGPlugin, EMARows

__all__ = ["SemiMethod", "needs_teacher"]


def needs_teacher(cfg: Config) -> bool:
    """Whether the run keeps an EMA teacher: the mean teacher always, UniMatch with ``ema``."""
    s = cfg.semi
    return cfg.train.framework == "meanteacher" or s.unimatch_teacher == "ema"


class SemiMethod(nn.Module):
    """State of a semi-supervised run: the EMA teacher and, for BRPG, the plug-in.

    ``teacher`` is the EMA teacher (``None`` for UniMatch with ``semi.unimatch_teacher: self``,
    where the model is its own teacher); ``plugin`` is the :class:`BRPGPlugin` (memories, back
    queue, prototype bank, csp thresholds) when ``train.brpg``, else ``None``.
    """

    def __init__(self, cfg: Config, student: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.semi
        self.teacher: EMATeacher | None = (
            EMATeacher(student, s.ema_decay, s.ema_buffers) if needs_teacher(cfg) else None
        )
        self.strong = StrongAug(mean=cfg.data.mean, std=cfg.data.std) if s.strong_aug else None
        self.device = device
        self.plugin: BRPGPlugin | None = BRPGPlugin(cfg, device) if cfg.train.brpg else None

    # ------------------------------------------------------------------ the step's lifecycle
    # The trainer calls, per optimiser step: before_step, then per micro-batch either the
    # supervised step + warmup_step (warm-up phase) or the framework's step, then the optimiser,
    # then after_step. Everything a framework or BRPG keeps between steps changes only here.
    def before_step(self, step: int, student: nn.Module) -> dict[str, Any]:
        """Phase changes at the start of ``step`` (appendix: timeline): at ``s == S`` the teacher
        takes the student's weights; the plug-in allocates memories / clusters. Returns log entries.
        """
        cfg, logs = self.cfg, {}
        if (
            self.teacher is not None
            and cfg.train.framework != "suponly"
            and step == cfg.semi.sup_only_steps
        ):
            self.teacher.copy_from(student, buffers=cfg.semi.copy_buffers)
        if self.plugin is not None:
            logs.update(self.plugin.before_step(step))
        return logs

    @torch.no_grad()
    def warmup_step(self, image_l: Tensor) -> None:
        """After a warm-up micro-batch's supervised forward: the official code also runs the
        teacher in train mode on the labeled images, so its BN statistics follow the data before
        it takes the student's weights (appendix: timeline; ``semi.teacher_bn_warmup``)."""
        if self.teacher is not None and self.cfg.semi.teacher_bn_warmup:
            self.teacher.train()
            self.teacher(image_l)

    def after_step(self, step: int, student: nn.Module, ema_rows: list[EMARows]) -> None:
        """After the optimiser step of a semi-supervised ``step``: the teacher EMA (appendix: one
        step), counted from the end of the warm-up, then the prototype EMA of each micro-batch's
        rows in their order (appendix: prototype EMA)."""
        if self.teacher is not None:
            self.teacher.update(student, step=step - self.cfg.semi.sup_only_steps)
        if self.plugin is not None:
            self.plugin.after_step(ema_rows)
        else:
            assert not ema_rows, "prototype EMA rows without a BRPG plug-in"

    # ------------------------------------------------------------------ state
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        out: dict[str, Any] = {
            "teacher": None if self.teacher is None else self.teacher.state_dict()
        }
        if self.plugin is not None:
            out.update(self.plugin.state_dict())
        else:  # the checkpoint keys of a run without BRPG, as ever
            out.update({k: None for k in PLUGIN_STATE_KEYS})
        return out

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> Any:  # type: ignore[override]
        if self.teacher is not None:
            if state.get("teacher") is None:
                raise ValueError(
                    "the checkpoint has no EMA teacher (UniMatch with semi.unimatch_teacher=self)"
                    " but this config needs one"
                )
            self.teacher.load_state_dict(state["teacher"])
        elif state.get("teacher") is not None:
            raise ValueError(
                "the checkpoint has an EMA teacher but this config has none (UniMatch with"
                " semi.unimatch_teacher=self): resume with the config it was trained with"
            )
        if self.plugin is not None:
            self.plugin.load_state_dict(state)
