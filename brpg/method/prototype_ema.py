"""The prototype bank: multi-prototype cosine classifier and its EMA update (appendix: prototype
EMA, L_pro).

Paper: the prototypes r_{c,k} of class c (high- and low-confidence ones, §"CPG") score a
pixel feature f by ``s(f, c) = max_k cos(f, r_{c,k})``; the prototype classifier's logits are
``s(f, ·) / τ``. After each step every prototype moves towards the mean of the features
assigned to it, ``r_{c,k} ← α r_{c,k} + (1 − α) f̄_{c,k}`` (appendix: prototype EMA, α = 0.99).

Layout. The official code rebuilds, every step, a padded tensor ``C × 6 × 256`` by repeating a
class's last high (or low) prototype until it has 3 of each (appendix: prototype EMA). We keep one
persistent ``prototypes[C, K, D]`` plus a ``valid[C, K]`` mask instead (appendix: cost): invalid
slots are excluded from every max. A repeated prototype never changes a max, and the official code
maps a padded slot back to the prototype it copies, so masking gives the same logits and the same
EMA assignments as repeat-padding.

Nothing in the per-step path (:meth:`PrototypeBank.logits`, :meth:`PrototypeBank.ema_update`)
synchronises with the host: no ``.item()``, no data-dependent Python branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from brpg.distributed import is_distributed

__all__ = ["EMPTY_CLASS_LOGIT", "PrototypeBank", "pack_high_low"]

# Logit of a class that has no valid prototype (cosine logits lie in [-1/τ, 1/τ]). Finite, so
# softmax/CE stay NaN-free; such a class gets probability exp(-1e4) = 0 in float32.
EMPTY_CLASS_LOGIT = -1.0e4


class PrototypeBank(nn.Module):
    """``C`` classes × ``K`` prototype slots of dimension ``D``, with a validity mask.

    Args:
        num_classes: ``C``.
        dim: feature dimension ``D`` (256 in the paper).
        max_per_class: slot budget ``K`` per class (``K_h + K_l = 3 + 3`` with APO, appendix:
            clustering and APO).
        momentum: EMA decay α (appendix: prototype EMA; ``prototype_ema_decay`` = 0.99).
        sync: default for :meth:`ema_update`'s ``sync`` (all-reduce sums and counts across
            ranks when ``torch.distributed`` is initialised; fixes appendix Q2).

    Buffers ``prototypes`` (float32 ``[C, K, D]``, unnormalised as in the official code) and
    ``valid`` (bool ``[C, K]``) follow ``.to(device)`` and are in ``state_dict()``; so is the
    momentum (as extra state). A fresh bank has no valid slot until :meth:`set_prototypes`.
    """

    prototypes: Tensor
    valid: Tensor

    def __init__(
        self,
        num_classes: int,
        dim: int,
        max_per_class: int,
        momentum: float = 0.99,
        sync: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1 or dim < 1 or max_per_class < 1:
            raise ValueError("num_classes, dim and max_per_class must be positive")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.num_classes, self.dim, self.max_per_class = num_classes, dim, max_per_class
        self.momentum = float(momentum)
        self.sync = sync
        self.register_buffer("prototypes", torch.zeros(num_classes, max_per_class, dim))
        self.register_buffer("valid", torch.zeros(num_classes, max_per_class, dtype=torch.bool))

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "momentum": self.momentum,
            "num_classes": self.num_classes,
            "dim": self.dim,
            "max_per_class": self.max_per_class,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        shape = (state["num_classes"], state["max_per_class"], state["dim"])
        if shape != (self.num_classes, self.max_per_class, self.dim):
            raise ValueError(f"checkpoint bank has shape {shape}, this bank {self.shape}")
        self.momentum = float(state["momentum"])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, K, D)``."""
        return (self.num_classes, self.max_per_class, self.dim)

    def extra_repr(self) -> str:
        c, k, d = self.shape
        return f"num_classes={c}, max_per_class={k}, dim={d}, momentum={self.momentum}"

    # ------------------------------------------------------------------ set-up
    @torch.no_grad()
    def set_prototypes(self, protos: Tensor, valid: Tensor) -> None:
        """Replace all prototypes ``protos[C, K, D]`` and the mask ``valid[C, K]`` (appendix: clustering and APO)."""
        protos_ckd, valid_ck = protos, valid
        if tuple(protos_ckd.shape) != self.shape:
            raise ValueError(f"prototypes must have shape {self.shape}, got {protos_ckd.shape}")
        if tuple(valid_ck.shape) != self.shape[:2]:
            raise ValueError(f"valid must have shape {self.shape[:2]}, got {valid_ck.shape}")
        self.prototypes.copy_(protos_ckd.detach().to(self.prototypes))
        self.valid.copy_(valid_ck.to(device=self.valid.device, dtype=torch.bool))

    def num_valid(self) -> Tensor:
        """Number of valid prototypes per class, LongTensor ``[C]``."""
        return self.valid.sum(dim=1)

    # ------------------------------------------------------------------ similarity
    def cosine(self, feats: Tensor) -> Tensor:
        """``cos(f_n, r_{c,k})`` for every slot, float32 ``[N, C, K]``; invalid slots = -inf.

        Computed as ``normalize(f) @ normalize(P)ᵀ`` in float32 (autocast off), never as the
        ``N × C·K × D`` broadcast of the official code (appendix: cost). Gradient flows to
        ``feats`` (``[N, D]``) only.
        """
        feats_nd = feats
        n = feats_nd.shape[0]
        c, k, d = self.shape
        with torch.autocast(device_type=feats_nd.device.type, enabled=False):
            f_nd = F.normalize(feats_nd.float(), dim=1)
            p_md = F.normalize(self.prototypes.detach().float(), dim=2).reshape(c * k, d)
            cos_nck = (f_nd @ p_md.t()).view(n, c, k)
        return cos_nck.masked_fill(~self.valid, float("-inf"))

    def logits(self, feats: Tensor, tau: float) -> Tensor:
        """Prototype-classifier logits ``max_{valid k} cos(f_n, r_{c,k}) / τ``, ``[N, C]``
        (appendix: L_pro).

        A hard max over the class's valid slots (not a logsumexp). A class without any valid
        prototype gets :data:`EMPTY_CLASS_LOGIT` (finite, so no NaN appears in the CE).
        Prototypes receive no gradient.
        """
        sim_nc = self.cosine(feats).amax(dim=2)
        has_proto_c = self.valid.any(dim=1)
        return torch.where(has_proto_c, sim_nc / tau, EMPTY_CLASS_LOGIT)

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def assign(self, feats: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest valid prototype of each feature's OWN target class (appendix: prototype EMA).

        Returns ``(slot_n, use_n)``: the global slot id ``c·K + k*`` (LongTensor ``[N]``) and
        whether the feature takes part (target in ``[0, C)`` and its class has a valid slot).
        Ties go to the lowest slot (first maximum, as ``argmax``).
        """
        c, k, _ = self.shape
        targets_n = targets.long()
        in_range_n = (targets_n >= 0) & (targets_n < c)
        cls_n = torch.where(in_range_n, targets_n, torch.zeros_like(targets_n))
        cos_nck = self.cosine(feats.detach())
        own_nk = cos_nck.gather(1, cls_n.view(-1, 1, 1).expand(-1, 1, k)).squeeze(1)
        k_star_n = own_nk.argmax(dim=1)
        use_n = in_range_n & self.valid[cls_n].any(dim=1)
        return cls_n * k + k_star_n, use_n

    @torch.no_grad()
    def ema_update(self, feats: Tensor, targets: Tensor, sync: bool | None = None) -> None:
        """One EMA step ``r ← α r + (1 − α) f̄`` for every prototype with ≥ 1 feature (appendix:
        prototype EMA).

        ``f̄`` is the plain mean of the raw (unnormalised) features assigned to the slot
        (``fault_weight`` is effectively 1, appendix Q22). Targets outside ``[0, C)``
        (255 = ignore) are skipped; prototypes with no assigned feature are unchanged.
        Vectorised over all ``C·K`` slots with ``index_add_``. With ``sync`` (default
        ``self.sync``) and an initialised process group of more than one rank, the per-slot
        sums and counts are all-reduced first, so all ranks apply the same update and keep
        identical prototypes (the official code lets them drift apart, appendix Q2).
        """
        c, k, d = self.shape
        slot_n, use_n = self.assign(feats, targets)
        f_nd = feats.detach().float()
        w_n = use_n.to(f_nd.dtype)
        sums_md = torch.zeros(c * k, d, device=f_nd.device).index_add_(
            0, slot_n, f_nd * w_n[:, None]
        )
        counts_m = torch.zeros(c * k, device=f_nd.device).index_add_(0, slot_n, w_n)
        if (self.sync if sync is None else sync) and is_distributed():
            dist.all_reduce(sums_md)
            dist.all_reduce(counts_m)
        mean_md = sums_md / counts_m.clamp_min(1.0)[:, None]
        alpha = self.momentum
        p_md = self.prototypes.view(c * k, d)
        moved_md = alpha * p_md + (1.0 - alpha) * mean_md.to(p_md)
        hit_m = (counts_m > 0) & self.valid.view(-1)
        p_md.copy_(torch.where(hit_m[:, None], moved_md, p_md))


def _pad_slots(
    centres: Tensor | Sequence[Tensor],
    valid_or_counts: Tensor | None,
    slots: int | None,
) -> tuple[Tensor, Tensor]:
    """Per-class centres → ``([C, slots, D], valid[C, slots])``; see :func:`pack_high_low`."""
    if isinstance(centres, Tensor):
        x_ckd = centres
        if valid_or_counts is None:
            valid_ck = torch.ones(x_ckd.shape[:2], dtype=torch.bool, device=x_ckd.device)
        elif valid_or_counts.dtype == torch.bool:
            valid_ck = valid_or_counts.to(x_ckd.device)
        else:  # counts [C]: the first count[c] slots are valid
            ar_k = torch.arange(x_ckd.shape[1], device=x_ckd.device)
            valid_ck = ar_k[None, :] < valid_or_counts.to(x_ckd.device)[:, None]
    else:
        if valid_or_counts is not None:
            raise ValueError("pass per-class lists without a mask or counts")
        if not centres:
            raise ValueError("need at least one class")
        width = max(int(t.shape[0]) for t in centres)
        d = centres[0].shape[-1]
        ref = centres[0]
        x_ckd = ref.new_zeros(len(centres), width, d)
        valid_ck = torch.zeros(len(centres), width, dtype=torch.bool, device=ref.device)
        for i, t in enumerate(centres):  # one-time set-up, not per step
            x_ckd[i, : t.shape[0]] = t
            valid_ck[i, : t.shape[0]] = True
    width = x_ckd.shape[1]
    slots = width if slots is None else slots
    if slots < width:
        if bool(valid_ck[:, slots:].any()):
            raise ValueError(f"a class has more than {slots} valid centres")
        x_ckd, valid_ck = x_ckd[:, :slots], valid_ck[:, :slots]
    elif slots > width:
        pad = slots - width
        x_ckd = torch.cat([x_ckd, x_ckd.new_zeros(x_ckd.shape[0], pad, x_ckd.shape[2])], 1)
        valid_ck = torch.cat([valid_ck, valid_ck.new_zeros(valid_ck.shape[0], pad)], 1)
    return x_ckd, valid_ck


def pack_high_low(
    high: Tensor | Sequence[Tensor],
    low: Tensor | Sequence[Tensor],
    high_valid: Tensor | None = None,
    low_valid: Tensor | None = None,
    k_high: int | None = None,
    k_low: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Build the bank's slot layout from per-class high and low centres (appendix: prototype EMA).

    ``high`` / ``low`` are either padded tensors ``[C, k, D]`` — with ``*_valid`` a BoolTensor
    ``[C, k]`` (e.g. ``batched_kmeans_full(...).center_valid``) or a LongTensor ``[C]`` of
    counts (first ``count[c]`` slots valid), or ``None`` for all valid — or lists of ``C``
    tensors ``[k_c, D]``. ``k_high`` / ``k_low`` fix the slot budgets (default: the inputs'
    widths; the official budget is 3 + 3 with APO).

    Returns ``(protos[C, k_high + k_low, D], valid[C, k_high + k_low])``: slots
    ``0 … k_high−1`` hold high prototypes and ``k_high …`` low ones. Unused slots are zero and
    invalid; the official code repeats the last prototype instead, which gives the same max
    and the same EMA (see module docstring), so no duplicate padding is needed.
    """
    hi_ckd, hi_valid_ck = _pad_slots(high, high_valid, k_high)
    lo_ckd, lo_valid_ck = _pad_slots(low, low_valid, k_low)
    if hi_ckd.shape[0] != lo_ckd.shape[0] or hi_ckd.shape[2] != lo_ckd.shape[2]:
        raise ValueError("high and low must have the same number of classes and feature dim")
    protos_ckd = torch.cat([hi_ckd.float(), lo_ckd.float().to(hi_ckd.device)], dim=1)
    valid_ck = torch.cat([hi_valid_ck, lo_valid_ck.to(hi_valid_ck.device)], dim=1)
    return protos_ckd, valid_ck
