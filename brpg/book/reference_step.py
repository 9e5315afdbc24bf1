"""A slow, loop-based reference of one mean-teacher / BRPG training step (appendix: timeline, one
step, L_pro, CPG, clustering and APO, prototype EMA).

Written from the paper and the spec, not from the package: nothing here imports ``brpg``.
Every selection (OHEM, the entropy filter, CPG routing, the L_pro samples, the prototype EMA)
is a Python loop over pixels, classes or prototypes, so a reader can check it line by line.
Only torch primitives are used (``F.softmax``, ``F.interpolate``, ``F.normalize``).

Conventions this reference shares with the package, because the official code has none there
(appendix Q19): an empty selection gives a loss of 0, and a class without any prototype gets
the prototype-classifier logit ``EMPTY_LOGIT``.

The random draws of a step (strong augmentation, CutMix box) are not re-drawn here: the test
records what the package drew and hands it in (``x_strong``, ``cut_mask``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = 255
EMPTY_LOGIT = -1.0e4


@dataclass
class RefSettings:
    """The hyper-parameters the step reads (named as the package's config fields, where the
    names differ :func:`brpg.book.step_check.settings` maps them)."""

    # the schedule
    total_steps: int
    sup_only_steps: int  # S: warm-up length
    # L_s: 0.5 CE + 0.5 OHEM
    ce_weight: float = 0.5
    ohem_weight: float = 0.5
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100
    # L_u and the mean teacher
    unsup_weight: float = 1.0  # λ_u
    drop_percent: float = 80.0  # entropy percentile at step 0, rising to 100
    faithful_unsup_scale: bool = True  # U2PL's B·H·W/|K| factor (appendix Q4)
    entropy_teacher: str = "train"  # train | eval
    ema_cap: float = 0.99  # teacher decay min(1 − 1/(t+1), ema_cap)
    ema_buffers: bool = False  # average BN statistics too
    copy_buffers: bool = False  # copy them at teacher := student
    teacher_bn_warmup: bool = True  # teacher train-mode forwards in the warm-up
    # BRPG: the sampling window and CPG routing
    brpg: bool = False
    sample_start: int = 0  # Ds
    sample_steps: int = 1  # Dl
    high_threshold: float = 0.8
    low_threshold: float = 0.0
    unlabeled_threshold: float = 0.8
    # BRPG: L_pro and the prototype EMA
    grid_num: int = 32  # labeled L_pro samples: a (grid_num + 1)² grid
    tau: float = 0.1  # temperature of the prototype logits
    loss_weight: float = 1.0  # λ_pro
    faithful_loss_scale: bool = False  # the official 1/4 (appendix Q3)
    thr_start: float = 0.8  # unlabeled L_pro confidence ramp ...
    thr_end: float = 0.95  # ... to this value at the end
    thr_delay: int = 0  # step where the ramp is at thr_start (appendix Q5)
    thr_clamp_low: bool = False  # no value below thr_start before the delay
    proto_momentum: float = 0.99  # α of the prototype EMA


@dataclass
class RefResult:
    loss: Tensor
    terms: dict[str, float] = field(default_factory=dict)
    ema_feats: list[Tensor] = field(default_factory=list)
    ema_targets: list[int] = field(default_factory=list)
    memory_high: dict[int, list[Tensor]] = field(default_factory=dict)
    memory_low: dict[int, list[Tensor]] = field(default_factory=dict)
    n_unlabeled_proto: int = 0  # unlabeled L_pro samples that count in the loss


# --------------------------------------------------------------------------- small pieces
def up(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling with aligned corners (appendix: one step)."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def pixel_ce(logits_c: Tensor, target: int) -> Tensor:
    """``−log softmax(logits)[target]`` of one pixel (a vector of C logits)."""
    return -F.log_softmax(logits_c, dim=0)[target]


def mean_or_zero(values: list[Tensor], like: Tensor) -> Tensor:
    if not values:
        return like.sum() * 0.0
    return torch.stack(values).sum() / len(values)


def percentile_linear(sorted_vals: list[float], percent: float) -> float:
    """numpy's default percentile of an ascending list."""
    pos = (len(sorted_vals) - 1) * percent / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (pos - lo) * (sorted_vals[hi] - sorted_vals[lo])


def ema_decay_at(t: int, cap: float) -> float:
    """Teacher decay ``min(1 − 1/(t + 1), cap)``, ``t`` = steps since the end of the warm-up."""
    return min(1.0 - 1.0 / (t + 1), cap)


def drop_percent_at(step: int, s: RefSettings) -> float:
    """U2PL's entropy percentile: ``drop_percent`` at step 0, rising linearly to 100."""
    return 100.0 - (100.0 - s.drop_percent) * (1.0 - step / s.total_steps)


def proto_threshold_at(step: int, s: RefSettings) -> float:
    """The confidence ramp of the unlabeled L_pro samples (appendix: timeline, Q5)."""
    thr = s.thr_start + (s.thr_end - s.thr_start) * (step - s.thr_delay) / (
        s.total_steps - s.thr_delay
    )
    return max(thr, s.thr_start) if s.thr_clamp_low else thr


# --------------------------------------------------------------------------- losses
def supervised(logits: Tensor, labels: Tensor, s: RefSettings) -> Tensor:
    """``ce_weight·CE + ohem_weight·OHEM`` with loops over pixels (appendix: one step)."""
    b, _, h, w = logits.shape
    ces, pgt = [], []
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = int(labels[i, y, x])
                if t == IGNORE:
                    continue
                ce = pixel_ce(logits[i, :, y, x], t)
                ces.append(ce)
                pgt.append(math.exp(-float(ce.detach())))
    ce_term = mean_or_zero(ces, logits)
    # OHEM: keep the pixels whose ground-truth probability is at most
    # max(thresh, the min_kept-th smallest probability); all of them if there are too few
    if s.ohem_min_kept <= 0 or len(pgt) < s.ohem_min_kept:
        kept = ces
    else:
        cut = max(sorted(pgt)[s.ohem_min_kept - 1], s.ohem_thresh)
        kept = [ce for ce, p in zip(ces, pgt, strict=True) if p <= cut]
    return s.ce_weight * ce_term + s.ohem_weight * mean_or_zero(kept, logits)


def entropy_filtered(
    logits_u: Tensor, pseudo: Tensor, t_logits: Tensor, percent: float, faithful: bool
) -> tuple[Tensor, int]:
    """U2PL's L_u: drop the pixels whose teacher entropy reaches the percentile (appendix: one
    step).

    Returns the loss and the number of kept pixels.
    """
    b, _, h, w = logits_u.shape
    ent = {}
    for i in range(b):
        for y in range(h):
            for x in range(w):
                q = F.softmax(t_logits[i, :, y, x].float(), dim=0)
                ent[i, y, x] = float(-(q * torch.log(q + 1e-10)).sum())
    valid = [k for k in ent if int(pseudo[k]) != IGNORE]
    if not valid:
        return logits_u.sum() * 0.0, 0
    cut = percentile_linear(sorted(ent[k] for k in valid), percent)
    kept = [pixel_ce(logits_u[k[0], :, k[1], k[2]], int(pseudo[k])) for k in valid if ent[k] < cut]
    loss = mean_or_zero(kept, logits_u)
    if faithful and kept:
        loss = loss * (b * h * w / len(kept))
    return loss, len(kept)


def proto_logits(feat: Tensor, protos: Tensor, valid: Tensor, tau: float) -> Tensor:
    """``max_k cos(f, r_{c,k}) / τ`` per class, with a loop over classes and prototypes."""
    c_num, k_num, _ = protos.shape
    out = []
    for c in range(c_num):
        best = None
        for k in range(k_num):
            if bool(valid[c, k]):
                cos = F.normalize(feat, dim=0) @ F.normalize(protos[c, k], dim=0)
                best = cos if best is None else torch.maximum(best, cos)
        out.append(torch.tensor(EMPTY_LOGIT) if best is None else best / tau)
    return torch.stack(out)


def proto_ce(
    feats: list[Tensor], targets: list[int], protos: Tensor, valid: Tensor, tau: float
) -> tuple[Tensor, int]:
    """Mean CE of the prototype classifier over the samples whose class has a prototype."""
    terms = []
    for f, t in zip(feats, targets, strict=True):
        if 0 <= t < protos.shape[0] and bool(valid[t].any()):
            terms.append(pixel_ce(proto_logits(f, protos, valid, tau), t))
    like = feats[0] if feats else protos
    return mean_or_zero(terms, like), len(terms)


def grid_positions(n: int, grid_num: int) -> list[int]:
    """The labeled grid of the appendix (L_pro): ``0, d, …, (grid_num−1)·d`` and the last pixel."""
    d = (n - 1) // grid_num
    return [i * d for i in range(grid_num)] + [n - 1]


# --------------------------------------------------------------------------- state updates
def teacher_after(
    teacher_before: dict[str, Tensor],
    student_after: dict[str, Tensor],
    param_names: set[str],
    t: int,
    s: RefSettings,
) -> dict[str, Tensor]:
    """``θ_t ← d·θ_t + (1 − d)·θ_s`` per tensor; buffers averaged only with ``ema_buffers``."""
    d = ema_decay_at(t, s.ema_cap)
    out = {}
    for name, old in teacher_before.items():
        new = student_after[name]
        if name in param_names or (s.ema_buffers and old.is_floating_point()):
            out[name] = d * old + (1.0 - d) * new
        elif s.ema_buffers:
            out[name] = new.clone()  # integer buffers are copied
        else:
            out[name] = old.clone()
    return out


def bank_after(
    protos: Tensor, valid: Tensor, feats: list[Tensor], targets: list[int], momentum: float
) -> Tensor:
    """Prototype EMA (appendix: prototype EMA): each feature goes to the nearest prototype of its
    own class; every prototype with at least one feature moves to ``α·r + (1 − α)·mean``."""
    c_num, k_num, _ = protos.shape
    assigned: dict[tuple[int, int], list[Tensor]] = {}
    for f, t in zip(feats, targets, strict=True):
        if not (0 <= t < c_num) or not bool(valid[t].any()):
            continue
        best_k, best_cos = -1, -2.0
        for k in range(k_num):
            if bool(valid[t, k]):
                cos = float(F.normalize(f, dim=0) @ F.normalize(protos[t, k], dim=0))
                if cos > best_cos:  # strict: ties keep the first prototype
                    best_k, best_cos = k, cos
        assigned.setdefault((t, best_k), []).append(f)
    out = protos.clone()
    for (c, k), rows in assigned.items():
        out[c, k] = momentum * protos[c, k] + (1.0 - momentum) * torch.stack(rows).mean(0)
    return out


# --------------------------------------------------------------------------- the step
def phase(step: int, s: RefSettings) -> str:
    if step < s.sup_only_steps:
        return "warmup"
    if not s.brpg or step < s.sample_start:
        return "semi"
    return "sampling" if step < s.sample_start + s.sample_steps else "proto"


def cutmix(t: Tensor, mask: Tensor) -> Tensor:
    """Image ``i`` takes image ``i+1`` (cyclically) inside its box ``mask[i]``."""
    out = t.clone()
    b = t.shape[0]
    for i in range(b):
        j = (i + 1) % b
        for y in range(mask.shape[1]):
            for x in range(mask.shape[2]):
                if bool(mask[i, y, x]):
                    out[i, ..., y, x] = t[j, ..., y, x]
    return out


def nearest_down(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour label downsampling: small pixel ``y`` reads ``floor(y·H/h)``."""
    b, h_full, w_full = labels.shape
    h, w = size
    out = torch.empty(b, h, w, dtype=torch.long)
    for y in range(h):
        for x in range(w):
            out[:, y, x] = labels[:, (y * h_full) // h, (x * w_full) // w]
    return out


def reference_step(
    student: nn.Module,
    teacher: nn.Module | None,
    protos: Tensor | None,
    proto_valid: Tensor | None,
    x_l: Tensor,
    y_l: Tensor,
    x_u: Tensor | None,
    x_strong: Tensor | None,
    cut_mask: Tensor | None,
    step: int,
    s: RefSettings,
) -> RefResult:
    """The loss of one step on copies of ``student`` and ``teacher`` (which it runs in place:
    pass copies; a train-mode forward moves their BN statistics, as in the real step).

    ``teacher`` must already be the teacher of this step (at ``step == S`` the student's copy).
    ``protos [C, K, D]``/``proto_valid [C, K]``: the bank during the proto phase.
    """
    size = tuple(y_l.shape[-2:])
    b = x_l.shape[0]
    ph = phase(step, s)
    if ph == "warmup":
        student.train()
        logits = up(student(x_l)["logits"], size)
        loss = supervised(logits, y_l, s)
        if teacher is not None and s.teacher_bn_warmup:
            teacher.train()
            with torch.no_grad():
                teacher(x_l)
        return RefResult(loss, {"loss_sup": float(loss.detach())})
    assert teacher is not None and x_u is not None and x_strong is not None and cut_mask is not None
    # pseudo-labels: the eval-mode teacher on the weak view, at label resolution
    teacher.eval()
    with torch.no_grad():
        out_t = teacher(x_u)
        t_full = up(out_t["logits"], size)
        prob_t = F.softmax(t_full, dim=1)
        conf_u, pseudo_u = prob_t.max(dim=1)
    x_mix = cutmix(x_strong, cut_mask)
    pseudo_mix = cutmix(pseudo_u, cut_mask)
    conf_mix = cutmix(conf_u, cut_mask)
    student.train()
    out = student(torch.cat([x_l, x_mix]))
    logits_l = up(out["logits"][:b], size)
    logits_u = up(out["logits"][b:], size)
    loss_sup = supervised(logits_l, y_l, s)
    with torch.no_grad():
        if s.entropy_teacher == "train":
            teacher.train()
            t_logits = up(teacher(torch.cat([x_l, x_mix]))["logits"][b:], size)
        else:
            t_logits = cutmix(t_full, cut_mask)
    loss_unsup, _ = entropy_filtered(
        logits_u, pseudo_mix, t_logits, drop_percent_at(step, s), s.faithful_unsup_scale
    )
    loss = loss_sup + s.unsup_weight * loss_unsup
    res = RefResult(
        loss, {"loss_sup": float(loss_sup.detach()), "loss_unsup": float(loss_unsup.detach())}
    )
    if ph == "sampling":
        _route(res, out["rep"][:b], out["logits"][:b], y_l, out_t["rep"], out_t["logits"], s)
    if ph == "proto":
        assert protos is not None and proto_valid is not None
        rep_full = up(out["rep"], size)  # the official code reads L_pro samples at full size
        feats_l, tgt_l = [], []
        rows, cols = grid_positions(size[0], s.grid_num), grid_positions(size[1], s.grid_num)
        for i in range(b):
            for y in rows:
                for x in cols:
                    feats_l.append(rep_full[i, :, y, x])
                    tgt_l.append(int(y_l[i, y, x]))
        thr = proto_threshold_at(step, s)
        feats_u, tgt_u = [], []
        for i in range(x_u.shape[0]):
            for y in range(size[0]):
                for x in range(size[1]):
                    if float(conf_mix[i, y, x]) >= thr:
                        feats_u.append(rep_full[b + i, :, y, x])
                        tgt_u.append(int(pseudo_mix[i, y, x]))
        pro_l, _ = proto_ce(feats_l, tgt_l, protos, proto_valid, s.tau)
        pro_u, n_u = proto_ce(feats_u, tgt_u, protos, proto_valid, s.tau)
        l_pro = pro_l + pro_u
        scale = 0.25 if s.faithful_loss_scale else 1.0  # the official 1/world_size on 4 GPUs
        res.loss = loss + s.loss_weight * scale * l_pro
        res.terms.update(
            loss_proto=float(l_pro.detach()),
            pro_l=float(pro_l.detach()),
            pro_u=float(pro_u.detach()),
        )
        res.n_unlabeled_proto = n_u
        res.ema_feats = [f.detach() for f in feats_l + feats_u]
        res.ema_targets = tgt_l + tgt_u
    return res


def _route(
    res: RefResult,
    rep_l: Tensor,
    logits_l: Tensor,
    y_l: Tensor,
    rep_u: Tensor,
    logits_u: Tensor,
    s: RefSettings,
) -> None:
    """CPG routing (appendix: CPG) at the stride of the maps: labeled pixels predicted right are
    high (``conf ≥ τ_h``) or low (``low < conf < τ_h``); unlabeled pixels with teacher
    ``conf ≥ τ_u`` are high with the teacher's class."""
    h, w = logits_l.shape[-2:]
    labels = nearest_down(y_l, (h, w))
    for i in range(logits_l.shape[0]):
        for y in range(h):
            for x in range(w):
                p = F.softmax(logits_l[i, :, y, x].detach(), dim=0)
                conf, pred = float(p.max()), int(p.argmax())
                t = int(labels[i, y, x])
                if t == IGNORE or pred != t:
                    continue
                row = rep_l[i, :, y, x].detach()
                if conf >= s.high_threshold:
                    res.memory_high.setdefault(t, []).append(row)
                elif conf > s.low_threshold:
                    res.memory_low.setdefault(t, []).append(row)
    for i in range(logits_u.shape[0]):
        for y in range(h):
            for x in range(w):
                p = F.softmax(logits_u[i, :, y, x], dim=0)
                if float(p.max()) >= s.unlabeled_threshold:
                    res.memory_high.setdefault(int(p.argmax()), []).append(rep_u[i, :, y, x])


def copies(*modules: nn.Module | None) -> list[nn.Module | None]:
    return [None if m is None else copy.deepcopy(m) for m in modules]
