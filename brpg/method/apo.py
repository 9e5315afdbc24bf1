"""APO — adaptive prototype optimisation (paper §"APO"; appendix: clustering and APO): how many
prototypes each class gets at the one-shot clustering (:mod:`brpg.method.clustering`, appendix:
clustering and APO).

APO gives ``add_num`` (= 1) extra prototype to the ``n_add = max(1, round(0.05·C))`` classes
whose feature memory is most dispersed. Dispersion is judged separately for the high- and the
low-confidence memory, so a class can get an extra high prototype, an extra low one, both or
neither. The official metric ("cos_sim") is the mean cosine similarity of the memory rows to the
normalised memory mean: LOW means dispersed. The unused "l2" / "l2_norm" metrics (mean distance
to the mean of raw / normalised rows) are provided too: for them LARGE means dispersed.

Classes with an empty memory have an undefined dispersion (NaN): they are never selected and
keep the base count; the clustering then marks all their prototypes invalid (the official code
would crash there, appendix: clustering and APO, Q13).

APO runs once per training run; it is batched over classes but may sync with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "METRICS",
    "apo_counts",
    "dispersed_mask",
    "dispersion",
    "dispersion_cos",
    "higher_is_dispersed",
    "n_add_classes",
    "select_classes",
]

METRICS = ("cos_sim", "l2", "l2_norm")


def _valid_mask(x_bnd: Tensor, valid_bn: Tensor | None) -> Tensor:
    if valid_bn is None:
        return torch.ones(x_bnd.shape[:2], dtype=torch.bool, device=x_bnd.device)
    return valid_bn.to(device=x_bnd.device, dtype=torch.bool)


def _masked_mean_rows(v_bn: Tensor, valid_bn: Tensor) -> Tensor:
    """Mean of ``v`` over valid rows, ``[B]``; NaN for a row with no valid entry."""
    n_b = valid_bn.sum(1).to(v_bn.dtype)
    s_b = torch.where(valid_bn, v_bn, torch.zeros_like(v_bn)).sum(1)
    return torch.where(n_b > 0, s_b / n_b.clamp_min(1.0), torch.full_like(s_b, float("nan")))


def _masked_mean_vec(x_bnd: Tensor, valid_bn: Tensor) -> Tensor:
    """Mean row ``[B, D]`` over valid rows (zero for an empty row)."""
    w_bn1 = valid_bn.unsqueeze(-1).to(x_bnd.dtype)
    return (x_bnd * w_bn1).sum(1) / w_bn1.sum(1).clamp_min(1.0)


def dispersion_cos(x: Tensor, valid: Tensor | None = None) -> Tensor:
    """Official APO score "cos_sim" (appendix: clustering and APO): ``s_b = mean_n cos(x_{b,n},
    normalize(mean_n x_{b,n}))``.

    The mean is taken over the raw valid rows of memory ``b``. Returns float32 ``[B]`` in
    ``[-1, 1]``; LOW means dispersed; NaN for an empty memory.
    """
    x_bnd = x.float()
    valid_bn = _valid_mask(x_bnd, valid)
    mu_bd = F.normalize(_masked_mean_vec(x_bnd, valid_bn), dim=1)
    cos_bn = (F.normalize(x_bnd, dim=2) * mu_bd.unsqueeze(1)).sum(2)
    return _masked_mean_rows(cos_bn, valid_bn)


def _dispersion_l2(x_bnd: Tensor, valid_bn: Tensor) -> Tensor:
    mean_bd = _masked_mean_vec(x_bnd, valid_bn)
    return _masked_mean_rows((x_bnd - mean_bd.unsqueeze(1)).norm(dim=2), valid_bn)


def higher_is_dispersed(metric: str) -> bool:
    """Convention of a metric: False for "cos_sim" (low = dispersed), True for "l2"/"l2_norm"."""
    if metric not in METRICS:
        raise ValueError(f"unknown APO metric {metric!r}; expected one of {METRICS}")
    return metric != "cos_sim"


def dispersion(x: Tensor, valid: Tensor | None = None, metric: str = "cos_sim") -> Tensor:
    """Dispersion score ``[B]`` of each memory under ``metric`` (appendix: clustering and APO).

    "cos_sim": :func:`dispersion_cos` (low = dispersed). "l2": mean L2 distance of the raw rows
    to their mean; "l2_norm": the same on L2-normalised rows (large = dispersed). NaN for an
    empty memory. Use :func:`higher_is_dispersed` for the direction.
    """
    higher_is_dispersed(metric)  # validates the name
    x_bnd = x.float()
    valid_bn = _valid_mask(x_bnd, valid)
    if metric == "cos_sim":
        return dispersion_cos(x_bnd, valid_bn)
    if metric == "l2_norm":
        x_bnd = F.normalize(x_bnd, dim=2)
    return _dispersion_l2(x_bnd, valid_bn)


def n_add_classes(num_classes: int, proportion: float = 0.05) -> int:
    """``max(1, round(proportion·C))`` with Python's round (VOC 1, Cityscapes 1, COCO 4)."""
    return max(1, round(proportion * num_classes))


def dispersed_mask(
    scores: Tensor, proportion: float = 0.05, higher_is_dispersed: bool = False
) -> Tensor:
    """Classes selected by APO, BoolTensor ``[C]`` (appendix: clustering and APO).

    ``threshold`` = the ``n_add``-th most dispersed finite score; every class at least as
    dispersed as the threshold is selected, so ties can select more than ``n_add`` classes.
    Non-finite scores (empty memories) are never selected; if fewer than ``n_add`` scores are
    finite, all finite ones are selected.
    """
    s_c = scores.float()
    s_c = -s_c if higher_is_dispersed else s_c  # now: low = dispersed
    finite_c = torch.isfinite(s_c)
    s_c = torch.where(finite_c, s_c, torch.full_like(s_c, float("inf")))
    n_add = min(n_add_classes(s_c.numel(), proportion), s_c.numel())
    threshold = s_c.sort().values[n_add - 1]
    return finite_c & (s_c <= threshold)


def select_classes(
    scores: Tensor,
    proportion: float = 0.05,
    add_num: int = 1,
    higher_is_dispersed: bool = False,
) -> Tensor:
    """Extra prototypes per class, LongTensor ``[C]``: ``add_num`` where :func:`dispersed_mask`."""
    return dispersed_mask(scores, proportion, higher_is_dispersed).long() * add_num


def apo_counts(
    scores: Tensor,
    base: int,
    proportion: float = 0.05,
    add_num: int = 1,
    metric: str = "cos_sim",
) -> Tensor:
    """Number of prototypes per class for ONE memory kind: ``base`` (+ ``add_num``), ``[C]``.

    Call it once with the high-memory scores and once with the low-memory scores: the two
    selections are independent (appendix: clustering and APO).
    """
    return base + select_classes(scores, proportion, add_num, higher_is_dispersed(metric))
