"""The mean-teacher and BRPG training step (paper §3; spec §1, §4, §5-§8, §14).

One training run moves through four phases, decided by the global step ``s`` alone
(:func:`phase_of`), so that a resumed run knows where it is without any saved flag:

========== ============================================= =====================================
phase      steps                                         what happens
========== ============================================= =====================================
warmup     ``s < S``                                     supervised only (spec §4.10)
semi       ``S ≤ s``, outside the windows below          L_s + L_u, teacher EMA (spec §4)
sampling   ``Ds ≤ s < Ds + Dl`` (BRPG)                   + CPG memory pushes (spec §5.1)
proto      ``s ≥ Ds + Dl`` (BRPG)                        + L_pro and prototype EMA (spec §7-§8)
========== ============================================= =====================================

with ``S = semi.sup_only_steps``, ``Ds = proto.sample_start_step`` and
``Dl = proto.sample_steps``. At ``s == S`` the teacher takes the student's parameters; at
``s == Ds + Dl`` the memories are clustered once (APO + k-means, spec §5.4, §6) into the
prototype bank and freed (or kept and re-clustered every ``proto.recluster_every`` steps). With
``proto.back_queue`` (COCO, spec §5.5) the sampling window also fills a per-class 'back' queue of
the most confident labeled pixels, and the short memories fall back on it before clustering.

:func:`semi_step` is the whole step of spec §4 in one function. It has no host sync and no
Python loop over pixels, classes or prototypes; the only per-step Python branches depend on the
step number. :class:`SemiMethod` holds the state (teacher, memories, bank, csp thresholds) with
``state_dict()`` / ``load_state_dict()``, so a checkpoint taken in any phase resumes exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brpg.augment import StrongAug, apply_cutmix, maybe_cutmix
from brpg.config import Config
from brpg.cpg import (
    AdaptiveThreshold,
    BackQueue,
    PrototypeMemory,
    Rows,
    apply_back_fallbacks,
    class_mean_gt_prob,
    downsample_labels,
    memory_rows,
    route_back,
    route_labeled,
    route_unlabeled,
    subsample,
)
from brpg.losses import supervised_loss
from brpg.prototypes import (
    PrototypeBank,
    apo_counts,
    batched_kmeans_full,
    cluster_memories,
    dispersion,
    pack_high_low,
    prototype_loss,
    pseudo_threshold,
    sample_labeled_grid,
    sample_unlabeled,
)
from brpg.teacher import EMATeacher
from brpg.unsup_loss import drop_percent_schedule, unsup_loss

__all__ = ["SemiMethod", "cluster_prototypes", "phase_of", "semi_step", "upsample_to"]

PHASES = ("warmup", "semi", "sampling", "proto")


def upsample_to(logits_bchw: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling with ``align_corners=True``, as the official code does (spec §4.3)."""
    if tuple(logits_bchw.shape[-2:]) == tuple(size):
        return logits_bchw
    return F.interpolate(logits_bchw, size=size, mode="bilinear", align_corners=True)


def phase_of(step: int, cfg: Config) -> str:
    """The phase of global step ``step`` (0-based): warmup | semi | sampling | proto."""
    if cfg.train.method == "suponly" or step < cfg.semi.sup_only_steps:
        return "warmup"
    if cfg.train.method != "brpg":
        return "semi"
    p = cfg.proto
    end = p.sample_start_step + p.sample_steps
    if step < p.sample_start_step:
        return "semi"
    if step < end:
        return "sampling"
    return "proto"


def sampling_active(step: int, cfg: Config) -> bool:
    """Whether step ``step`` pushes rows into the memories (the window, or periodic re-clustering)."""
    ph = phase_of(step, cfg)
    return ph == "sampling" or (ph == "proto" and cfg.proto.recluster_every > 0)


def cluster_due(step: int, cfg: Config) -> bool:
    """Whether the memories are clustered before step ``step`` (one-shot, or periodically)."""
    if cfg.train.method != "brpg":
        return False
    p = cfg.proto
    end = p.sample_start_step + p.sample_steps
    if step == end:
        return True
    return p.recluster_every > 0 and step > end and (step - end) % p.recluster_every == 0


def _slots(cfg: Config) -> tuple[int, int]:
    """``(K_h, K_l)``: slot budgets of the bank (``K_l = 0`` for the single random memory)."""
    p = cfg.proto
    extra = p.add_num if p.apo else 0
    if p.memory == "random":
        return p.num_high + p.num_low + extra, 0
    return p.num_high + extra, p.num_low + extra


def cluster_prototypes(memory: PrototypeMemory, cfg: Config, seed: int) -> tuple[Tensor, Tensor]:
    """APO + k-means of the memories → ``(protos[C, K, D], valid[C, K])`` (spec §5.4, §6).

    ``memory = "cpg"``: high and low memories are clustered separately with
    :func:`~brpg.prototypes.cluster_memories`. ``"random"`` (CPG ablation, spec §5.6): the one
    memory gets ``num_high + num_low`` clusters (+ ``add_num`` for the APO-selected classes).
    """
    p = cfg.proto
    if p.memory == "cpg":
        high, high_valid = memory.get("high")
        low, low_valid = memory.get("low")
        return cluster_memories(
            high,
            high_valid,
            low,
            low_valid,
            base_high=p.num_high,
            base_low=p.num_low,
            add_num=p.add_num,
            proportion=p.add_proportion,
            metric=p.dispersion,
            apo=p.apo,
            iters=p.kmeans_iters,
            seed=seed,
            n_init=p.kmeans_n_init,
            subsample=p.kmeans_subsample or None,
        )
    feats, valid = memory.get("all")
    base = p.num_high + p.num_low
    k_c = torch.full((feats.shape[0],), base, dtype=torch.long)
    if p.apo:
        k_c = apo_counts(dispersion(feats, valid, p.dispersion), base, p.add_proportion, p.add_num)
    res = batched_kmeans_full(
        feats,
        k_c,
        valid=valid,
        iters=p.kmeans_iters,
        seed=seed,
        n_init=p.kmeans_n_init,
        subsample=p.kmeans_subsample or None,
    )
    k_all, _ = _slots(cfg)
    empty = res.centers[:, :0]
    return pack_high_low(
        res.centers, empty, res.center_valid, res.center_valid[:, :0], k_high=k_all, k_low=0
    )


class SemiMethod(nn.Module):
    """State of a mean-teacher or BRPG run: EMA teacher, CPG memories, prototype bank.

    ``memory`` is ``None`` outside the sampling window (freed after the one-shot clustering, as
    the official ``del``), ``back`` is the COCO back queue (spec §5.5) alongside it when
    ``proto.back_queue``, and ``csp`` is the class-specific threshold of spec §5.3 when
    ``proto.threshold_type == "csp"``.
    """

    def __init__(self, cfg: Config, student: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.cfg = cfg
        s, p = cfg.semi, cfg.proto
        self.teacher = EMATeacher(student, s.ema_decay, s.ema_buffers)
        self.strong = StrongAug(mean=cfg.data.mean, std=cfg.data.std) if s.strong_aug else None
        self.brpg = cfg.train.method == "brpg"
        self.memory: PrototypeMemory | None = None
        self.back: BackQueue | None = None
        self.bank: PrototypeBank | None = None
        self.csp: AdaptiveThreshold | None = None
        self.device = device
        if self.brpg:
            if not cfg.model.rep_head:
                raise ValueError("train.method=brpg needs model.rep_head=true (features for L_pro)")
            k_h, k_l = _slots(cfg)
            self.bank = PrototypeBank(
                cfg.data.num_classes, cfg.model.rep_dim, k_h + k_l, momentum=p.ema_momentum
            ).to(device)
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
        p = self.cfg.proto
        kinds, cap = (
            (("high", "low"), p.queue_len) if p.memory == "cpg" else (("all",), 2 * p.queue_len)
        )
        return PrototypeMemory(
            self.cfg.data.num_classes, self.cfg.model.rep_dim, cap, kinds, device=self.device
        )

    def new_back(self) -> BackQueue | None:
        """The COCO back queue (spec §5.5), ``None`` unless ``proto.back_queue``."""
        p = self.cfg.proto
        if not (self.brpg and p.back_queue):
            return None
        cap = p.back_len or 2 * p.queue_len
        return BackQueue(self.cfg.data.num_classes, self.cfg.model.rep_dim, cap, self.device)

    # ------------------------------------------------------------------ phase changes
    def before_step(self, step: int, student: nn.Module) -> dict[str, Any]:
        """Phase changes that happen at the start of ``step`` (spec §1); returns log entries."""
        cfg, logs = self.cfg, {}
        if cfg.train.method != "suponly" and step == cfg.semi.sup_only_steps:
            self.teacher.copy_from(student, buffers=cfg.semi.copy_buffers)
        if self.brpg and sampling_active(step, cfg) and self.memory is None:
            self.memory = self.new_memory()
            self.back = self.new_back()
        if self.brpg and cluster_due(step, cfg):
            assert self.memory is not None, "the sampling window left no memory"
            if self.back is not None:  # before APO and k-means (spec §5.5)
                cases = apply_back_fallbacks(self.memory, self.back, cfg.proto.min_rows)
                logs["back_fallback"] = cases.tolist()  # per class, once: host sync ok
            protos, valid = cluster_prototypes(self.memory, cfg, seed=cfg.train.seed + step)
            assert self.bank is not None
            self.bank.set_prototypes(protos, valid)
            logs["prototypes_per_class"] = self.bank.num_valid().tolist()  # once: host sync ok
            if cfg.proto.recluster_every <= 0:
                self.memory = None  # the official code deletes the memories (spec §5.4)
                self.back = None
        return logs

    # ------------------------------------------------------------------ state
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return {
            "teacher": self.teacher.state_dict(),
            "memory": None if self.memory is None else self.memory.state_dict(),
            "back": None if self.back is None else self.back.state_dict(),
            "bank": None if self.bank is None else self.bank.state_dict(),
            "csp": None if self.csp is None else self.csp.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> Any:  # type: ignore[override]
        self.teacher.load_state_dict(state["teacher"])
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
        if self.bank is not None and state.get("bank") is not None:
            self.bank.load_state_dict(state["bank"])
        if self.csp is not None and state.get("csp") is not None:
            self.csp.load_state_dict(state["csp"])


def _memory_push(
    method: SemiMethod,
    rep_l: Tensor,
    logits_l: Tensor,
    labels_l: Tensor,
    rep_t: Tensor,
    logits_t: Tensor,
    cfg: Config,
) -> None:
    """CPG sampling of one step (spec §5.1): route, sub-sample, push (all-gathered under DDP)."""
    p, memory = cfg.proto, method.memory
    assert memory is not None
    labels_small = downsample_labels(labels_l, logits_l.shape[-2:])
    tau_h: float | Tensor = p.high_threshold
    if method.csp is not None:
        mean_c, present_c = class_mean_gt_prob(logits_l, labels_small, cfg.data.num_classes)
        method.csp.update(mean_c, present_c)
        tau_h = method.csp.thresholds()
    lab = route_labeled(rep_l, logits_l, labels_small, tau_h, p.low_threshold)
    unl = route_unlabeled(rep_t, logits_t, p.unlabeled_threshold)
    b = labels_l.shape[0]
    if p.memory == "cpg":
        high, low = memory_rows(lab, unl, b, p.sample_pixel_num)
        memory.push("high", *high)
        memory.push("low", *low)
        if method.back is not None:  # COCO (spec §5.5): p_gt-ranked rows, 255 excluded
            back = route_back(
                rep_l, logits_l, labels_small, p.back_per_class, cfg.data.ignore_index
            )
            method.back.push(*back)
        return
    # random (no CPG split): every correct labeled pixel + the confident unlabeled ones
    cls_l = torch.where(lab.high_cls >= 0, lab.high_cls, lab.low_cls)
    rows = Rows(torch.cat([lab.high_feats, unl.feats]), torch.cat([cls_l, unl.cls]))
    memory.push("all", *subsample(rows.feats, rows.cls, p.sample_pixel_num * 3 * b))


def semi_step(
    student: nn.Module,
    method: SemiMethod,
    batch_l: dict[str, Tensor],
    image_u: Tensor,
    step: int,
    world_size: int = 1,
) -> tuple[Tensor, dict[str, Tensor], tuple[Tensor, Tensor] | None]:
    """One mean-teacher / BRPG step after the warm-up (spec §4, §14); returns
    ``(loss, logs, ema_rows)`` where ``ema_rows = (feats[N, D], targets[N])`` feed the prototype
    EMA after the optimiser step (``None`` outside the proto phase)."""
    cfg, s, p = method.cfg, method.cfg.semi, method.cfg.proto
    teacher, ignore = method.teacher, cfg.data.ignore_index
    x_l, y_l, x_w = batch_l["image"], batch_l["mask"], image_u
    b, size = x_l.shape[0], tuple(y_l.shape[-2:])
    ph = phase_of(step, cfg)

    # 4.1 eval-mode teacher on the weak view: pseudo-labels and confidences at full resolution
    with torch.no_grad():
        teacher.eval()
        out_t = teacher(x_w)
        logits_t_full = upsample_to(out_t["logits"].float(), size)
        conf_u, pseudo_u = F.softmax(logits_t_full, dim=1).max(dim=1)

    # 4.2 strong view + CutMix (one coin per batch), the maps mixed with the same boxes
    x_s = method.strong(x_w) if method.strong is not None else x_w
    x_mix, (pseudo_mix, conf_mix), cut = maybe_cutmix(x_s, [pseudo_u, conf_u], p=s.cutmix_p)

    # 4.3 one student forward on labeled + unlabeled, supervised loss on the labeled half
    out = student(torch.cat([x_l, x_mix]))
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

    # 4.5 BRPG: CPG memories in the sampling window, L_pro + prototype EMA afterwards
    ema_rows = None
    if method.brpg and sampling_active(step, cfg):
        with torch.no_grad():
            _memory_push(
                method, rep_all[:b], logits_all[:b], y_l, out_t["rep"], out_t["logits"], cfg
            )
    if method.brpg and ph == "proto":
        assert method.bank is not None and rep_all is not None
        feats_l, tgt_l = sample_labeled_grid(rep_all[:b], y_l, p.grid_num)
        thr = pseudo_threshold(step, 1, cfg.train.steps, p.thr_start, p.thr_end,
                               p.thr_delay_steps, p.thr_clamp_low)  # fmt: skip
        feats_u, tgt_u = sample_unlabeled(
            rep_all[b:], conf_mix, pseudo_mix, thr, p.unsup_sample_num, ignore_index=ignore
        )
        loss_pro = prototype_loss(method.bank, feats_l, tgt_l, p.tau) + prototype_loss(
            method.bank, feats_u, tgt_u, p.tau
        )
        scale = 1.0 / world_size if p.faithful_loss_scale else 1.0
        loss = loss + p.loss_weight * scale * loss_pro
        logs["loss_proto"] = loss_pro.detach()
        ema_rows = (torch.cat([feats_l, feats_u]).detach(), torch.cat([tgt_l, tgt_u]))
    elif rep_all is not None:
        loss = loss + 0.0 * rep_all.sum()  # keeps DDP's every-parameter-used contract (spec §4.6)
    return loss, logs, ema_rows
