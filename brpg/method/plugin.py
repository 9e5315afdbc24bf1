"""BRPG as a plug-in of a semi-supervised framework (paper title and abstract; appendix: CPG, L_pro,
clustering and APO, prototype EMA).

The paper calls BRPG "a general end-to-end paradigm" and claims robustness "across diverse
datasets, segmentation networks, and semi-supervised frameworks" (arXiv 2307.10097v2 abstract,
the paper's tables); the official code has only the mean-teacher framework (appendix:
configurations). Here everything BRPG adds lives in one object, :class:`BRPGPlugin`, and a framework
only has to hand it tensors it already computes:

=========================================== ===================================================
call (once per step unless noted)           what the plug-in does
=========================================== ===================================================
``before_step(step) -> logs``               at the sampling window's start: fresh memories (and
                                            the COCO back queue); at its end: back-queue
                                            fallbacks, APO + k-means into the bank, memories
                                            freed (appendix: clustering and APO, CPG); periodic
                                            re-clustering
``observe(step, rep_l, logits_l,            sampling window only: CPG routing and memory push
labels_l, rep_u, logits_u)``                (appendix: CPG). Labeled rows come from the
                                            student, unlabeled rows from whatever makes the
                                            framework's pseudo-labels (mean teacher: the EMA
                                            teacher; UniMatch: the model itself on the weak view)
``loss(step, rep_l, labels_l, rep_u,        proto phase only: ``λ_pro·L_pro`` on the labeled grid
conf_u, pseudo_u)``                         and the confident unlabeled pixels of the view the
``-> (loss or None, logs, ema_rows)``       student saw (appendix: L_pro), and the rows of the EMA
``after_step([ema_rows, ...])``             after the optimiser step: the prototype EMA
``step(step, ...)``                         ``observe`` then ``loss``, as a framework calls them
``state_dict()`` / ``load_state_dict()``    memories, back queue, bank, csp thresholds
=========================================== ===================================================

Shapes: ``rep_* [B, D, h, w]`` and ``logits_* [B, C, h, w]`` at the model's stride 4,
``labels_l [B, H, W]``, ``conf_u [B, H, W]`` (float) and ``pseudo_u [B, H, W]`` (long) at label
resolution. The step number decides what each call does (:mod:`brpg.timeline`), so the
plug-in keeps no phase flag and a checkpoint taken in any phase resumes exactly. The calls add
no host sync (the one-off logs of the clustering aside).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from brpg.config import Config
from brpg.method.clustering import cluster_prototypes, slot_budgets
from brpg.method.cpg import (
    AdaptiveThreshold,
    Rows,
    class_mean_gt_prob,
    cpg_rows,
    downsample_labels,
    route_back,
    route_labeled,
    route_unlabeled,
    subsample,
)
from brpg.method.memory import BackQueue, PrototypeMemory, apply_back_fallbacks
from brpg.method.prototype_ema import PrototypeBank
from brpg.method.prototype_loss import (
    prototype_loss,
    pseudo_threshold,
    sample_labeled_grid,
    sample_unlabeled,
)
from brpg.timeline import cluster_due, phase_of, sampling_active

__all__ = ["PLUGIN_STATE_KEYS", "BRPGPlugin", "EMARows"]

EMARows = tuple[
    Tensor, Tensor
]  # (feats[N, D], targets[N]) of the prototype EMA (appendix: prototype EMA)
PLUGIN_STATE_KEYS = ("memory", "back", "bank", "csp")  # checkpoint keys of the plug-in
OFFICIAL_WORLD_SIZE = 4  # the official runs train on 4 GPUs: effective λ_pro 1/4 (appendix Q3)


class BRPGPlugin(nn.Module):
    """Everything BRPG adds to a framework: CPG memories, back queue, bank, csp (module docstring).

    ``memory`` is ``None`` outside the sampling window (freed after the one-shot clustering, as
    the official ``del``), ``back`` is the COCO back queue (appendix: CPG) alongside it when
    ``proto.back_queue``, and ``csp`` is the class-specific threshold of the appendix (CPG) when
    ``proto.threshold_type == "csp"``. Only for ``train.brpg: true``.
    """

    def __init__(self, cfg: Config, device: torch.device) -> None:
        super().__init__()
        if not cfg.model.rep_head:
            raise ValueError("train.brpg=true needs model.rep_head=true (features for L_pro)")
        self.cfg = cfg
        self.device = device
        p = cfg.proto
        self.memory: PrototypeMemory | None = None
        self.back: BackQueue | None = None
        k_h, k_l = slot_budgets(p)
        self.bank = PrototypeBank(
            cfg.data.num_classes, cfg.model.rep_dim, k_h + k_l, momentum=p.ema_momentum
        ).to(device)
        self.csp: AdaptiveThreshold | None = None
        if p.threshold_type == "csp":
            self.csp = AdaptiveThreshold(
                cfg.data.num_classes,
                init=p.high_threshold,
                momentum=p.csp_momentum,
                thre_min=p.csp_min,
                thre_max=p.csp_max,
                device=device,
            )

    def new_memory(self) -> PrototypeMemory:
        """Empty CPG memories: high + low (``proto.memory: cpg``) or one of twice the length."""
        p = self.cfg.proto
        kinds, cap = (
            (("high", "low"), p.queue_len) if p.memory == "cpg" else (("all",), 2 * p.queue_len)
        )
        return PrototypeMemory(
            self.cfg.data.num_classes, self.cfg.model.rep_dim, cap, kinds, device=self.device
        )

    def new_back(self) -> BackQueue | None:
        """The COCO back queue (appendix: CPG), ``None`` unless ``proto.back_queue``."""
        p = self.cfg.proto
        if not p.back_queue:
            return None
        cap = p.back_len or 2 * p.queue_len
        return BackQueue(self.cfg.data.num_classes, self.cfg.model.rep_dim, cap, self.device)

    # ------------------------------------------------------------------ the interface
    def before_step(self, step: int) -> dict[str, Any]:
        """Memory allocation and (re-)clustering at the start of ``step`` (appendix: timeline, clustering and APO, CPG)."""
        cfg, logs = self.cfg, {}
        if sampling_active(step, cfg) and self.memory is None:
            self.memory = self.new_memory()
            self.back = self.new_back()
        if cluster_due(step, cfg):
            assert self.memory is not None, "the sampling window left no memory"
            if self.back is not None:  # before APO and k-means (appendix: CPG)
                cases = apply_back_fallbacks(self.memory, self.back, cfg.proto.min_rows)
                logs["back_fallback"] = cases.tolist()  # per class, once: host sync ok
            protos, valid = cluster_prototypes(self.memory, cfg, seed=cfg.train.seed + step)
            self.bank.set_prototypes(protos, valid)
            logs["prototypes_per_class"] = self.bank.num_valid().tolist()  # once: host sync ok
            # [high, low] per class: a class can end with one kind only (an empty memory)
            k_high = slot_budgets(cfg.proto)[0]  # slots 0 … k_high-1 are high (pack_high_low)
            v = self.bank.valid
            logs["prototypes_high_low"] = torch.stack(
                [v[:, :k_high].sum(1), v[:, k_high:].sum(1)], dim=1
            ).tolist()
            if cfg.proto.recluster_every <= 0:
                self.memory = (
                    None  # the official code deletes the memories (appendix: clustering and APO)
                )
                self.back = None
        return logs

    @torch.no_grad()
    def observe(
        self,
        step: int,
        rep_l: Tensor,
        logits_l: Tensor,
        labels_l: Tensor,
        rep_u: Tensor | None,
        logits_u: Tensor,
    ) -> None:
        """CPG sampling of one step (appendix: CPG): route, sub-sample, push (all-gathered under
        DDP).

        ``rep_l [B, D, h, w]``, ``logits_l [B, C, h, w]``: the student on the labeled images;
        ``labels_l [B, H, W]``; ``rep_u [B_u, D, h, w]``, ``logits_u [B_u, C, h, w]``: the
        pseudo-label producer on the weak unlabeled view (``None`` is allowed outside the
        sampling window, where this is a no-op).
        """
        cfg = self.cfg
        if not sampling_active(step, cfg):
            return
        p, memory = cfg.proto, self.memory
        assert memory is not None, "observe() in the sampling window before before_step()"
        assert rep_u is not None, "observe() in the sampling window needs the unlabeled rep"
        rep_l, logits_l, rep_u, logits_u = (t.detach() for t in (rep_l, logits_l, rep_u, logits_u))
        labels_small = downsample_labels(labels_l, logits_l.shape[-2:])
        tau_h: float | Tensor = p.high_threshold
        if self.csp is not None:
            mean_c, present_c = class_mean_gt_prob(logits_l, labels_small, cfg.data.num_classes)
            self.csp.update(mean_c, present_c)
            tau_h = self.csp.thresholds()
        if p.memory == "cpg":
            high, low = cpg_rows(
                rep_l,
                logits_l,
                labels_small,
                rep_u,
                logits_u,
                tau_h,
                low_threshold=p.low_threshold,
                unlabeled_threshold=p.unlabeled_threshold,
                sample_pixel_num=p.sample_pixel_num,
            )
            memory.push("high", *high)
            memory.push("low", *low)
            if self.back is not None:  # COCO (appendix: CPG): p_gt-ranked rows, 255 excluded
                back = route_back(
                    rep_l, logits_l, labels_small, p.back_per_class, cfg.data.ignore_index
                )
                self.back.push(*back)
            return
        # random (no CPG split): every correct labeled pixel + the confident unlabeled ones
        lab = route_labeled(rep_l, logits_l, labels_small, tau_h, p.low_threshold)
        unl = route_unlabeled(rep_u, logits_u, p.unlabeled_threshold)
        b = labels_l.shape[0]
        cls_l = torch.where(lab.high_cls >= 0, lab.high_cls, lab.low_cls)
        rows = Rows(torch.cat([lab.high_feats, unl.feats]), torch.cat([cls_l, unl.cls]))
        memory.push("all", *subsample(rows.feats, rows.cls, p.sample_pixel_num * 3 * b))

    def loss(
        self,
        step: int,
        rep_l: Tensor,
        labels_l: Tensor,
        rep_u: Tensor,
        conf_u: Tensor,
        pseudo_u: Tensor,
    ) -> tuple[Tensor | None, dict[str, Tensor], EMARows | None]:
        """``λ_pro·L_pro`` of one step (appendix: L_pro), ``(None, {}, None)`` outside the proto
        phase.

        ``rep_l [B, D, h, w]`` (student, labeled, with grad), ``labels_l [B, H, W]``;
        ``rep_u [B_u, D, h, w]``: the student on the unlabeled view it is trained on, with that
        view's pseudo-labels ``pseudo_u [B_u, H, W]`` and confidences ``conf_u [B_u, H, W]``
        (mixed by the same CutMix). Labeled grid + unlabeled pixels above the ramped threshold
        (appendix: timeline, Q5). ``proto.faithful_loss_scale`` multiplies by
        ``1/OFFICIAL_WORLD_SIZE`` = 1/4: the official code divides L_pro by its world size and DDP
        averages the gradients, so its effective λ_pro is 1/4 on its 4 GPUs (appendix Q3). The
        factor is a constant, not this run's process count: the weight of L_pro relative to the
        other losses is then the official one on any number of GPUs and with any batch policy
        (gradient accumulation and DDP average every loss alike). Returns ``(weighted loss, {"loss_proto": L_pro}, ema_rows)`` with
        ``ema_rows = (feats[N, D], targets[N])`` detached, for :meth:`after_step`.
        """
        cfg = self.cfg
        if phase_of(step, cfg) != "proto":
            return None, {}, None
        p, ignore = cfg.proto, cfg.data.ignore_index
        feats_l, tgt_l = sample_labeled_grid(rep_l, labels_l, p.grid_num)
        thr = pseudo_threshold(step, 1, cfg.train.steps, p.thr_start, p.thr_end,
                               p.thr_delay_steps, p.thr_clamp_low)  # fmt: skip
        feats_u, tgt_u = sample_unlabeled(
            rep_u, conf_u, pseudo_u, thr, p.unsup_sample_num, ignore_index=ignore
        )
        loss_pro = prototype_loss(self.bank, feats_l, tgt_l, p.tau) + prototype_loss(
            self.bank, feats_u, tgt_u, p.tau
        )
        scale = 1.0 / OFFICIAL_WORLD_SIZE if p.faithful_loss_scale else 1.0
        weighted = p.loss_weight * scale * loss_pro
        ema_rows = (torch.cat([feats_l, feats_u]).detach(), torch.cat([tgt_l, tgt_u]))
        return weighted, {"loss_proto": loss_pro.detach()}, ema_rows

    def step(
        self,
        step: int,
        student_l: tuple[Tensor, Tensor],
        labels_l: Tensor,
        producer_u: tuple[Tensor | None, Tensor],
        view_u: tuple[Tensor, Tensor, Tensor],
    ) -> tuple[Tensor | None, dict[str, Tensor], EMARows | None]:
        """:meth:`observe` then :meth:`loss`, as every framework calls them in its step.

        ``student_l = (rep_l, logits_l)``: the student on the labeled images; ``producer_u =
        (rep, logits)`` of the pseudo-label producer on the weak view; ``view_u = (rep_u,
        conf_u, pseudo_u)``: the student on the unlabeled view it trains on, with that view's
        confidences and pseudo-labels."""
        (rep_l, logits_l), (rep_src, logits_src) = student_l, producer_u
        self.observe(step, rep_l, logits_l, labels_l, rep_src, logits_src)
        return self.loss(step, rep_l, labels_l, *view_u)

    def after_step(self, ema_rows: list[EMARows]) -> None:
        """After the optimiser step: the prototype EMA of the appendix (prototype EMA) with the rows
        :meth:`loss` gave for each micro-batch, in micro-batch order (the bank moves after the
        step)."""
        for feats, targets in ema_rows:
            self.bank.ema_update(feats, targets)

    # ------------------------------------------------------------------ state
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """``{"memory", "back", "bank", "csp"}`` (``None`` where absent): the checkpoint keys."""
        return {
            "memory": None if self.memory is None else self.memory.state_dict(),
            "back": None if self.back is None else self.back.state_dict(),
            "bank": self.bank.state_dict(),
            "csp": None if self.csp is None else self.csp.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> Any:  # type: ignore[override]
        if state.get("memory") is not None:
            self.memory = self.new_memory()
            self.memory.load_state_dict(state["memory"])
        else:
            self.memory = None
        self.back = None
        if state.get("back") is not None:
            self.back = self.new_back()
            if self.back is None:
                raise ValueError("the checkpoint has a back queue but proto.back_queue is false")
            self.back.load_state_dict(state["back"])
        if state.get("bank") is not None:
            self.bank.load_state_dict(state["bank"])
        if self.csp is not None and state.get("csp") is not None:
            self.csp.load_state_dict(state["csp"])
