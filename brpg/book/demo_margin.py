"""Chapter 4's measurement: are low-confidence prototypes closer to the decision boundary?

- :func:`class_centres` → each class's centre ``μ_c``: the normalised mean direction of its
  CPG memory rows, the high and the low memory weighted equally;
- :func:`prototype_margins` → the margin ``m(p) = cos(p, μ_c) − max_{c' ≠ c} cos(p, μ_{c'})``
  of every prototype (how far it lies on its own class's side of the nearest-centre cosine
  classifier's boundary), and each class's mean margin per kind.

Chapter 4 derives the margin on one run and then checks its claim on every committed seed
with these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from brpg.method.memory import PrototypeMemory

__all__ = ["Margins", "class_centres", "mean_direction", "prototype_margins"]


def mean_direction(feats_cnd: Tensor, valid_cn: Tensor) -> Tensor:
    """Normalised mean of each class's valid rows, ``[C, D]`` (a class without rows: 0)."""
    w = valid_cn[..., None].float()
    return F.normalize((feats_cnd * w).sum(1) / w.sum(1).clamp_min(1.0), dim=1)


def class_centres(memory: PrototypeMemory) -> Tensor:
    """``μ_c``, ``[C, D]``: the high and the low memory's mean directions, summed and
    normalised, so that whichever memory holds more rows does not pull the centre towards
    its own prototypes."""
    high_f, high_v = memory.get("high")
    low_f, low_v = memory.get("low")
    return F.normalize(mean_direction(high_f, high_v) + mean_direction(low_f, low_v), dim=1)


@dataclass
class Margins:
    """``margin[C, K]`` of every slot (meaningless where the slot is invalid), ``rival[C]``
    (the other centre closest to the class's valid prototypes), ``m_high[C]`` / ``m_low[C]`` (mean
    margin of the class's valid high / low prototypes, NaN without any)."""

    margin: Tensor
    rival: Tensor
    m_high: Tensor
    m_low: Tensor


def prototype_margins(protos_ckd: Tensor, valid_ck: Tensor, mu_cd: Tensor, k_high: int) -> Margins:
    """The margins of a bank laid out as the clustering packs it (slots ``0 … k_high-1`` high,
    the rest low; appendix: clustering and APO), against the centres ``mu_cd``."""
    num_classes = mu_cd.shape[0]
    p_hat = F.normalize(protos_ckd, dim=2)  # prototypes are compared by cosine
    cos_cke = torch.einsum("ckd,ed->cke", p_hat, mu_cd)  # prototype vs every centre
    diag = torch.arange(num_classes)
    own = cos_cke[diag, :, diag]  # [C, K]
    others = cos_cke.clone()
    others[diag, :, diag] = -2.0  # below any cosine: never the max
    margin = own - others.amax(2)
    is_high = torch.arange(protos_ckd.shape[1]) < k_high
    others_valid = others.masked_fill(~valid_ck[..., None], -2.0)  # invalid slots choose no rival
    return Margins(
        margin=margin,
        rival=others_valid.amax(1).argmax(1),
        m_high=torch.where(valid_ck & is_high, margin, torch.nan).nanmean(1),
        m_low=torch.where(valid_ck & ~is_high, margin, torch.nan).nanmean(1),
    )
