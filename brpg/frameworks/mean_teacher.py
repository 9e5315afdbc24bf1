"""The mean-teacher training step, with BRPG attached through its plug-in (paper §3; appendix:
timeline, one step).

The phases of a run (warmup | semi | sampling | proto, appendix: timeline) are in
:mod:`brpg.timeline`; everything BRPG adds (CPG memories, COCO back queue, clustering,
prototype bank, L_pro, csp thresholds) is :class:`brpg.method.plugin.BRPGPlugin`, which the
UniMatch framework (:mod:`brpg.frameworks.unimatch`) uses unchanged. At ``s == S`` the teacher
takes the student's parameters. The run's state (teacher, plug-in) is
:class:`brpg.frameworks.semi_method.SemiMethod`.

:func:`semi_step` is the whole step of the appendix (one step) in one function. It has no host sync
and no Python loop over pixels, classes or prototypes; the only per-step Python branches depend on
the step number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brpg.frameworks.augment import apply_cutmix, maybe_cutmix
from brpg.frameworks.semi_method import SemiMethod
from brpg.frameworks.supervised import keep_in_graph, supervised_loss
from brpg.frameworks.u2pl_loss import drop_percent_schedule, unsup_loss
from brpg.method.plugin import EMARows
from brpg.models.logits import upsample_logits
from brpg.timeline import sampling_active

__all__ = ["semi_step"]


def semi_step(
    student: nn.Module,
    method: SemiMethod,
    batch_l: dict[str, Tensor],
    image_u: Tensor,
    step: int,
) -> tuple[Tensor, dict[str, Tensor], EMARows | None]:
    """One mean-teacher / BRPG step after the warm-up (appendix: one step); returns
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
        logits_t_full = upsample_logits(out_t["logits"].float(), size)
        conf_u, pseudo_u = F.softmax(logits_t_full, dim=1).max(dim=1)

    # 4.2 strong view + CutMix (one coin per batch), the maps mixed with the same boxes
    x_s = method.strong(x_w) if method.strong is not None else x_w
    x_mix, (pseudo_mix, conf_mix), cut = maybe_cutmix(x_s, [pseudo_u, conf_u], p=s.cutmix_p)

    # 4.3 one student forward on labeled + unlabeled, supervised loss on the labeled half
    out = student(torch.cat([x_l, x_mix]), need_rep=need_rep)
    logits_all, rep_all = out["logits"], out.get("rep")
    logits_l_full = upsample_logits(logits_all[:b], size).float()
    logits_u_full = upsample_logits(logits_all[b:], size).float()
    loss_sup = supervised_loss(logits_l_full, y_l, cfg.loss, ignore)

    # 4.4 U2PL entropy-filtered pseudo-label loss, percentile rising from drop_percent to 100
    with torch.no_grad():
        if s.entropy_teacher == "train":  # official: train-mode teacher on the mixed images
            teacher.train()
            t_logits = upsample_logits(teacher(torch.cat([x_l, x_mix]))["logits"][b:].float(), size)
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
        loss_pro, logs_pro, ema_rows = plugin.step(
            step,
            (rep_all[:b], logits_all[:b]),
            y_l,
            (out_t.get("rep"), out_t["logits"]),
            (rep_all[b:], conf_mix, pseudo_mix),
        )
        if loss_pro is not None:
            logs.update(logs_pro)
            return loss + loss_pro, logs, ema_rows
    return keep_in_graph(loss, rep_all), logs, ema_rows
