"""A UniMatch-style framework step, with BRPG attached through the same plug-in (paper §15 claim).

UniMatch (Yang, Qi, Feng, Zhang, Shi: "Revisiting Weak-to-Strong Consistency in Semi-Supervised
Semantic Segmentation", CVPR 2023) trains one model, which is also its own teacher, with
weak-to-strong consistency in an image-level and a feature-level stream. One step here, written
from that description (``train.framework: unimatch``):

1. one train-mode forward of the model on ``cat(x_l, x_w)`` with ``need_fp=True``
   (:meth:`brpg.models.deeplabv3plus.SegModel.forward`): the plain predictions and those of a
   second decoder pass on ``Dropout2d(semi.fp_dropout)`` encoder features (the feature
   perturbation, FP);
2. pseudo-labels and confidences: the weak-view predictions, detached
   (``semi.unimatch_teacher: self``), or the EMA teacher's in eval mode on ``x_w`` (``ema``;
   the teacher then follows the model by the EMA of the appendix (one step) after each step);
3. two strong views of the weak image, independent :class:`~brpg.frameworks.augment.StrongAug` draws, each
   with its own CutMix (:func:`~brpg.frameworks.augment.maybe_cutmix`, independent coin and boxes) mixing
   the pseudo-labels and confidences with the same boxes; one forward on ``cat(x_s1, x_s2)``;
4. ``L_x``: the supervised loss (``loss`` config, appendix: one step) on the labeled part; ``L_s1``,
   ``L_s2``, ``L_fp``: the CE of each strong view and of the FP predictions against the
   pseudo-labels, counted where the confidence is ``≥ semi.conf_thresh`` (0.95), summed and
   divided by the number of pixels ``B·H·W``;
   ``loss = (w_x L_x + w_s1 L_s1 + w_s2 L_s2 + w_fp L_fp) / 2`` with
   ``semi.unimatch_weights = (1, 0.25, 0.25, 0.5)``.

BRPG (``train.brpg: true``) plugs in as for the mean teacher (:mod:`brpg.method.plugin`):
``observe`` gets the labeled student rep/logits and the weak-view rep/logits of whatever made the
pseudo-labels (the model itself or the EMA teacher), ``loss`` gets the labeled rep and strong view
1's rep with its mixed pseudo-labels and confidences; ``λ_pro·L_pro`` is added to the total
above (outside the ``/ 2``).

Differences from UniMatch, all deliberate:

- **CutMix partner.** UniMatch mixes each strong view with images of a *second* unlabeled batch
  (with its own eval-mode forward for that batch's pseudo-labels). Here the partner is image
  ``(i + 1) mod B`` of the same batch, as the mean teacher's CutMix of the appendix (one step),
  whose pseudo-labels this step has already computed: one unlabeled stream stays one step-indexed
  stream (exact resume: the loop draws batches by step index), and no extra forward is spent. The boxes are
  those of the appendix (one step) (one coin per batch, about half the image), not UniMatch's own.
- **Normaliser.** UniMatch divides by the pixels that are not padding (its loader marks them
  with 255); our unlabeled loader returns no ignore mask, so the divisor is ``B·H·W``.
- **Supervised loss.** ``supervised_loss`` with the run's ``loss`` config (0.5 CE + 0.5 OHEM by
  default) instead of UniMatch's plain CE.

Same contract as :func:`brpg.frameworks.mean_teacher.semi_step`: ``(loss, logs, ema_rows)``, no host sync,
every parameter in the graph (DDP), every random draw from torch's global RNG (seeded per step
by the trainer), so gradient accumulation, resume and DDP work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brpg.frameworks.augment import maybe_cutmix
from brpg.frameworks.semi_method import SemiMethod
from brpg.frameworks.supervised import keep_in_graph, supervised_loss
from brpg.method.plugin import EMARows
from brpg.models.logits import upsample_logits

__all__ = ["confident_ce", "unimatch_step"]


def confident_ce(
    logits_bchw: Tensor, pseudo_bhw: Tensor, conf_bhw: Tensor, thresh: float
) -> Tensor:
    """``Σ CE(logits, pseudo)·[conf ≥ thresh] / (B·H·W)``: UniMatch's unlabeled loss, a float32
    scalar (0 with a ``grad_fn`` when no pixel is confident enough)."""
    ce_bhw = F.cross_entropy(logits_bchw.float(), pseudo_bhw.long(), reduction="none")
    keep_bhw = (conf_bhw >= thresh).to(ce_bhw.dtype)
    return (ce_bhw * keep_bhw).sum() / ce_bhw.numel()


def unimatch_step(
    student: nn.Module,
    method: SemiMethod,
    batch_l: dict[str, Tensor],
    image_u: Tensor,
    step: int,
) -> tuple[Tensor, dict[str, Tensor], EMARows | None]:
    """One UniMatch step after the warm-up (module docstring); returns ``(loss, logs,
    ema_rows)`` as :func:`~brpg.frameworks.mean_teacher.semi_step`. Logs: ``loss_sup`` (L_x), ``loss_s1``,
    ``loss_s2``, ``loss_fp``, ``pseudo_conf`` (mean confidence), ``pseudo_ratio`` (share of
    weak-view pixels at or above ``semi.conf_thresh``) and, in the proto phase, ``loss_proto``."""
    cfg, s = method.cfg, method.cfg.semi
    x_l, y_l, x_w = batch_l["image"], batch_l["mask"], image_u  # [B,3,H,W], [B,H,W], [B_u,3,H,W]
    b, b_u, size = x_l.shape[0], x_w.shape[0], tuple(y_l.shape[-2:])

    # 1. the model on labeled + weak, with the feature-perturbed decoder pass
    out = student(torch.cat([x_l, x_w]), need_fp=True, fp_dropout=s.fp_dropout)
    logits_all, rep_all = out["logits"], out.get("rep")  # [B+B_u,C,h,w], [B+B_u,D,h,w]
    logits_fp_u = out["logits_fp"][b:]  # [B_u,C,h,w]

    # 2. pseudo-labels from the model itself (detached) or from the eval-mode EMA teacher
    if s.unimatch_teacher == "ema":
        teacher = method.teacher
        assert teacher is not None, "semi.unimatch_teacher=ema needs the EMA teacher"
        with torch.no_grad():
            teacher.eval()
            out_t = teacher(x_w)
        logits_src, rep_src = out_t["logits"], out_t.get("rep")  # [B_u,C,h,w], [B_u,D,h,w]
    else:
        logits_src = logits_all[b:].detach()
        rep_src = None if rep_all is None else rep_all[b:].detach()
    with torch.no_grad():
        prob_u = F.softmax(upsample_logits(logits_src.float(), size), dim=1)
        conf_u, pseudo_u = prob_u.max(dim=1)  # [B_u,H,W] float, long

    # 3. two strong views, each with its own StrongAug draw and CutMix (in-batch partner)
    views, maps = [], []
    for _ in range(2):
        x_s = method.strong(x_w) if method.strong is not None else x_w
        x_mix, (pseudo_mix, conf_mix), _ = maybe_cutmix(x_s, [pseudo_u, conf_u], p=s.cutmix_p)
        views.append(x_mix)
        maps.append((pseudo_mix, conf_mix))
    out_s = student(torch.cat(views))
    logits_s1, logits_s2 = out_s["logits"].split(b_u)  # [B_u,C,h,w] each
    (pseudo_1, conf_1), (pseudo_2, conf_2) = maps

    # 4. L_x + the three confident-pixel consistency losses
    thr = s.conf_thresh
    loss_x = supervised_loss(
        upsample_logits(logits_all[:b], size).float(), y_l, cfg.loss, cfg.data.ignore_index
    )
    loss_s1 = confident_ce(upsample_logits(logits_s1, size), pseudo_1, conf_1, thr)
    loss_s2 = confident_ce(upsample_logits(logits_s2, size), pseudo_2, conf_2, thr)
    loss_fp = confident_ce(upsample_logits(logits_fp_u, size), pseudo_u, conf_u, thr)
    w_x, w_s1, w_s2, w_fp = s.unimatch_weights
    loss = (w_x * loss_x + w_s1 * loss_s1 + w_s2 * loss_s2 + w_fp * loss_fp) / 2.0
    logs = {
        "loss_sup": loss_x.detach(),
        "loss_s1": loss_s1.detach(),
        "loss_s2": loss_s2.detach(),
        "loss_fp": loss_fp.detach(),
        "pseudo_conf": conf_u.mean(),
        "pseudo_ratio": (conf_u >= thr).float().mean(),
    }

    # 5. BRPG through the plug-in: memories from the pseudo-label producer, L_pro on view 1
    ema_rows = None
    plugin = method.plugin
    if plugin is not None:
        assert rep_all is not None and rep_src is not None
        loss_pro, logs_pro, ema_rows = plugin.step(
            step,
            (rep_all[:b], logits_all[:b]),
            y_l,
            (rep_src, logits_src),
            (out_s["rep"][:b_u], conf_1, pseudo_1),
        )
        if loss_pro is not None:
            logs.update(logs_pro)
            return loss + loss_pro, logs, ema_rows
    return keep_in_graph(loss, rep_all), logs, ema_rows
