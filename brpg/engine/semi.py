"""The mean-teacher training step, with BRPG attached through its plug-in (paper §3; spec §1,
§4, §14).

The phases of a run (warmup | semi | sampling | proto, spec §1) are in
:mod:`brpg.engine.phases`; everything BRPG adds (CPG memories, COCO back queue, clustering,
prototype bank, L_pro, csp thresholds) is :class:`brpg.engine.plugin.BRPGPlugin`, which the
UniMatch framework (:mod:`brpg.engine.unimatch`) uses unchanged. At ``s == S`` the teacher
takes the student's parameters.

:func:`semi_step` is the whole step of spec §4 in one function. It has no host sync and no
Python loop over pixels, classes or prototypes; the only per-step Python branches depend on the
step number. :class:`SemiMethod` holds the state of any framework (EMA teacher, the plug-in)
with ``state_dict()`` / ``load_state_dict()``, so a checkpoint taken in any phase resumes
exactly; its checkpoint keys are ``teacher, memory, back, bank, csp`` as before the plug-in.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brpg.augment import StrongAug, apply_cutmix, maybe_cutmix
from brpg.config import Config
from brpg.cpg import AdaptiveThreshold, BackQueue, PrototypeMemory
from brpg.engine.phases import PHASES, cluster_due, phase_of, sampling_active
from brpg.engine.plugin import BRPGPlugin, EMARows, cluster_prototypes
from brpg.losses import supervised_loss
from brpg.prototypes import PrototypeBank
from brpg.teacher import EMATeacher
from brpg.unsup_loss import drop_percent_schedule, unsup_loss

__all__ = [
    "PHASES",
    "SemiMethod",
    "cluster_due",
    "cluster_prototypes",
    "phase_of",
    "sampling_active",
    "semi_step",
    "upsample_to",
]

# SemiMethod attributes that live in the plug-in (read and assigned through properties)
_PLUGIN_STATE = ("memory", "back", "bank", "csp")


def upsample_to(logits_bchw: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling with ``align_corners=True``, as the official code does (spec §4.3)."""
    if tuple(logits_bchw.shape[-2:]) == tuple(size):
        return logits_bchw
    return F.interpolate(logits_bchw, size=size, mode="bilinear", align_corners=True)


def needs_teacher(cfg: Config) -> bool:
    """Whether the run keeps an EMA teacher: the mean teacher always, UniMatch with ``ema``."""
    s = cfg.semi
    return s.framework == "meanteacher" or s.unimatch_teacher == "ema"


class SemiMethod(nn.Module):
    """State of a semi-supervised run: the EMA teacher and, for BRPG, the plug-in.

    ``teacher`` is the EMA teacher (``None`` for UniMatch with ``semi.unimatch_teacher: self``,
    where the model is its own teacher); ``plugin`` is the :class:`BRPGPlugin` when
    ``train.method == "brpg"``, else ``None``. ``memory``, ``back``, ``bank`` and ``csp`` (and
    :meth:`new_memory`, :meth:`new_back`) are the plug-in's, ``None`` without it; assigning
    them sets the plug-in's.
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
        self.plugin: BRPGPlugin | None = (
            BRPGPlugin(cfg, device) if cfg.train.method == "brpg" else None
        )

    # ------------------------------------------------------------------ the plug-in's state
    @property
    def brpg(self) -> bool:
        return self.plugin is not None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PLUGIN_STATE:  # the property setters, even for a Module (the bank)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _set_plugin_state(self, name: str, value: Any) -> None:
        if self.plugin is None:
            if value is not None:
                raise AttributeError(f"{name}: only train.method=brpg has a BRPG plug-in")
            return
        setattr(self.plugin, name, value)

    @property
    def memory(self) -> PrototypeMemory | None:
        return None if self.plugin is None else self.plugin.memory

    @memory.setter
    def memory(self, value: PrototypeMemory | None) -> None:
        self._set_plugin_state("memory", value)

    @property
    def back(self) -> BackQueue | None:
        return None if self.plugin is None else self.plugin.back

    @back.setter
    def back(self, value: BackQueue | None) -> None:
        self._set_plugin_state("back", value)

    @property
    def bank(self) -> PrototypeBank | None:
        return None if self.plugin is None else self.plugin.bank

    @bank.setter
    def bank(self, value: PrototypeBank | None) -> None:
        self._set_plugin_state("bank", value)

    @property
    def csp(self) -> AdaptiveThreshold | None:
        return None if self.plugin is None else self.plugin.csp

    @csp.setter
    def csp(self, value: AdaptiveThreshold | None) -> None:
        self._set_plugin_state("csp", value)

    def new_memory(self) -> PrototypeMemory:
        if self.plugin is None:
            raise AttributeError("new_memory: only train.method=brpg has CPG memories")
        return self.plugin.new_memory()

    def new_back(self) -> BackQueue | None:
        """The COCO back queue (spec §5.5), ``None`` unless BRPG with ``proto.back_queue``."""
        return None if self.plugin is None else self.plugin.new_back()

    # ------------------------------------------------------------------ phase changes
    def before_step(self, step: int, student: nn.Module) -> dict[str, Any]:
        """Phase changes that happen at the start of ``step`` (spec §1); returns log entries."""
        cfg, logs = self.cfg, {}
        if (
            self.teacher is not None
            and cfg.train.method != "suponly"
            and step == cfg.semi.sup_only_steps
        ):
            self.teacher.copy_from(student, buffers=cfg.semi.copy_buffers)
        if self.plugin is not None:
            logs.update(self.plugin.before_step(step))
        return logs

    def ema_update(self, ema_rows: EMARows) -> None:
        """The prototype EMA (spec §7) of one micro-batch's rows, after the optimiser step."""
        assert self.plugin is not None, "prototype EMA rows without a BRPG plug-in"
        self.plugin.ema_update(ema_rows)

    # ------------------------------------------------------------------ state
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        out: dict[str, Any] = {
            "teacher": None if self.teacher is None else self.teacher.state_dict()
        }
        if self.plugin is not None:
            out.update(self.plugin.state_dict())
        else:
            out.update({k: None for k in _PLUGIN_STATE})
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


def semi_step(
    student: nn.Module,
    method: SemiMethod,
    batch_l: dict[str, Tensor],
    image_u: Tensor,
    step: int,
) -> tuple[Tensor, dict[str, Tensor], EMARows | None]:
    """One mean-teacher / BRPG step after the warm-up (spec §4, §14); returns
    ``(loss, logs, ema_rows)`` where ``ema_rows = (feats[N, D], targets[N])`` feed the prototype
    EMA after the optimiser step (``None`` outside the proto phase)."""
    cfg, s = method.cfg, method.cfg.semi
    teacher, ignore = method.teacher, cfg.data.ignore_index
    assert teacher is not None, "the mean teacher needs its EMA teacher"
    x_l, y_l, x_w = batch_l["image"], batch_l["mask"], image_u
    b, size = x_l.shape[0], tuple(y_l.shape[-2:])

    plugin = method.plugin
    # The mean teacher alone never reads a representation: skip the rep head. Bit-identical
    # only if no random draw follows the student's forward (the head's dropout would shift
    # it): the official train-mode teacher forward does, so it keeps the head; DDP needs
    # every parameter in the graph.
    need_rep = (
        plugin is not None
        or s.entropy_teacher == "train"
        or isinstance(student, nn.parallel.DistributedDataParallel)
    )

    # 4.1 eval-mode teacher on the weak view: pseudo-labels and confidences at full resolution
    with torch.no_grad():
        teacher.eval()
        # eval mode: skipping the teacher's rep head changes no state and draws no randoms
        out_t = teacher(x_w, need_rep=plugin is not None and sampling_active(step, cfg))
        logits_t_full = upsample_to(out_t["logits"].float(), size)
        conf_u, pseudo_u = F.softmax(logits_t_full, dim=1).max(dim=1)

    # 4.2 strong view + CutMix (one coin per batch), the maps mixed with the same boxes
    x_s = method.strong(x_w) if method.strong is not None else x_w
    x_mix, (pseudo_mix, conf_mix), cut = maybe_cutmix(x_s, [pseudo_u, conf_u], p=s.cutmix_p)

    # 4.3 one student forward on labeled + unlabeled, supervised loss on the labeled half
    out = student(torch.cat([x_l, x_mix]), need_rep=need_rep)
    logits_all, rep_all = out["logits"], out.get("rep")
    logits_l_full = upsample_to(logits_all[:b], size).float()
    logits_u_full = upsample_to(logits_all[b:], size).float()
    loss_sup = supervised_loss(logits_l_full, y_l, cfg.loss, ignore)

    # 4.4 U2PL entropy-filtered pseudo-label loss, percentile rising from drop_percent to 100
    with torch.no_grad():
        if s.entropy_teacher == "train":  # official: train-mode teacher on the mixed images
            teacher.train()
            t_logits = upsample_to(teacher(torch.cat([x_l, x_mix]))["logits"][b:].float(), size)
        else:  # cheaper: the weak-view teacher logits, mixed like the pseudo-labels
            t_logits = apply_cutmix(logits_t_full, [], cut)[0]
    percent = drop_percent_schedule(step / cfg.train.steps, 1.0, s.drop_percent)
    loss_unsup = unsup_loss(
        logits_u_full, pseudo_mix, t_logits, percent, ignore, s.faithful_unsup_scale
    )
    loss = loss_sup + s.unsup_weight * loss_unsup
    logs = {"loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach()}
    logs["pseudo_conf"] = conf_u.mean()

    # 4.5 BRPG through the plug-in: CPG memories in the sampling window (labeled rows from the
    # student, unlabeled rows from the eval-mode teacher), L_pro + prototype EMA afterwards
    ema_rows = None
    if plugin is not None:
        plugin.observe(step, rep_all[:b], logits_all[:b], y_l, out_t.get("rep"), out_t["logits"])
        loss_pro, logs_pro, ema_rows = plugin.loss(
            step, rep_all[:b], y_l, rep_all[b:], conf_mix, pseudo_mix
        )
        if loss_pro is not None:
            loss = loss + loss_pro
            logs.update(logs_pro)
            return loss, logs, ema_rows
    if rep_all is not None:
        loss = loss + 0.0 * rep_all.sum()  # keeps DDP's every-parameter-used contract (spec §4.6)
    return loss, logs, ema_rows
