"""CPG — confidence-based prototype generation: sampling and memories (paper §"CPG"; appendix:
CPG, cost).

During the sampling window (appendix: timeline) every step routes stride-4 pixel features into
per-class FIFO memories that the one-shot clustering
(:func:`brpg.method.clustering.cluster_memories`) reads later:

- labeled pixels (student features): correctly classified (``pred == gt``, gt not ignored)
  with confidence ``≥ τ_h`` go to the *high* memory, those with ``low_threshold < conf < τ_h``
  to the *low* memory; misclassified pixels never (:func:`route_labeled`);
- unlabeled pixels (eval-mode teacher features on the weak view): teacher confidence ``≥ thr``
  go to the *high* memory with the teacher's argmax as class (:func:`route_unlabeled`);
- per step at most ``sample_pixel_num·2B`` random high rows (labeled and unlabeled together)
  and ``sample_pixel_num·B`` random low rows are kept (:func:`memory_rows`);
- under ``torch.distributed`` the rows of all ranks are gathered, so every rank holds the same
  memories, and each class keeps its most recent ``capacity`` (30000) rows
  (:class:`PrototypeMemory`);
- COCO only (``proto.back_queue``, appendix: CPG): at most ``back_per_class`` random labeled pixels
  of every class in the ground truth, correct or not, with their p_gt (:func:`route_back`),
  feed a per-class *back* queue that keeps the ``2·queue_len`` most confident rows
  (:class:`BackQueue`); at clustering time a memory with fewer than ``min_rows`` rows is
  refilled from it (:func:`apply_back_fallbacks`; the official ``ValueError`` when only the
  low memory is short is replaced by a fallback, appendix Q13).

Fixed-size rows, no host sync. Routing does not compact anything: it returns the features of
*all* ``N = B·h·w`` pixels, ``[N, D]``, with a class vector ``[N]`` that holds the class of a
selected row and :data:`NOT_SELECTED` (−1) elsewhere. Sub-sampling keeps that form (random
scores, invalid rows scored −inf, ``topk`` of a size known from shapes alone) and
:meth:`PrototypeMemory.push` ignores rows whose class is outside ``[0, C)``. Shapes therefore
never depend on the data, which is what lets ``all_gather`` use plain tensors.

The memories live on the device as one ring buffer ``[C, capacity, D]`` per kind with
per-class write pointers and fill counts (appendix: cost), instead of the official per-class CPU
tensors re-concatenated every step. Memory cost: ``C·capacity·D·4`` bytes per kind in
float32 (VOC: 21·30000·256·4 ≈ 0.65 GB).

The official memory rows also carry the confidence (257 columns); it is used only by the
unused "prob" prototype type and by the COCO path (appendix: clustering and APO, CPG), so high/low
rows here are features only and :class:`BackQueue` keeps its p_gt beside the features. The
class-specific "csp" thresholds of the appendix (CPG) are provided as :class:`AdaptiveThreshold`; no
official config uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "NOT_SELECTED",
    "AdaptiveThreshold",
    "BackRows",
    "LabeledRoutes",
    "Rows",
    "class_mean_gt_prob",
    "confidence",
    "downsample_labels",
    "flatten_features",
    "memory_rows",
    "route_back",
    "route_labeled",
    "rank_in_group",
    "route_unlabeled",
    "subsample",
    "subsample_indices",
]

NOT_SELECTED = -1  # class index of a row that goes to no memory


class Rows(NamedTuple):
    """Fixed-size memory rows: ``feats[N, D]`` and ``cls[N]`` (−1 = not selected)."""

    feats: Tensor
    cls: Tensor


class BackRows(NamedTuple):
    """Rows for the COCO back queue: ``feats[N, D]``, ``conf[N]`` (p_gt), ``cls[N]`` (−1 = not
    selected)."""

    feats: Tensor
    conf: Tensor
    cls: Tensor


class LabeledRoutes(NamedTuple):
    """Routing of the labeled pixels; ``high_feats`` and ``low_feats`` are the same tensor."""

    high_feats: Tensor
    high_cls: Tensor
    low_feats: Tensor
    low_cls: Tensor


# --------------------------------------------------------------------------- routing
def confidence(logits_bchw: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax confidence and prediction, ``(conf[B,h,w] float32, pred[B,h,w] long)``."""
    conf_bhw, pred_bhw = F.softmax(logits_bchw.detach().float(), dim=1).max(dim=1)
    return conf_bhw, pred_bhw


def downsample_labels(labels_bhw: Tensor, size: int | Sequence[int]) -> Tensor:
    """Nearest-neighbour label downsampling as the official code: ``F.interpolate`` with
    ``mode="nearest"`` on the float label map (appendix: CPG). Returns ``long [B, h, w]``."""
    size_hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    small = F.interpolate(labels_bhw[:, None].float(), size=size_hw, mode="nearest")
    return small[:, 0].long()


def flatten_features(rep_bdhw: Tensor) -> Tensor:
    """``[B, D, h, w]`` → ``[B·h·w, D]`` in (b, y, x) order, detached."""
    return rep_bdhw.detach().permute(0, 2, 3, 1).reshape(-1, rep_bdhw.shape[1])


def _per_class(thr: float | Tensor, cls_bhw: Tensor) -> float | Tensor:
    """A scalar threshold, or a per-class one ``[C]`` read at each pixel's class."""
    if isinstance(thr, Tensor) and thr.ndim == 1:
        return thr.to(cls_bhw.device)[cls_bhw.clamp(0, thr.shape[0] - 1)]
    return thr


def _check_spatial(rep_bdhw: Tensor, logits_bchw: Tensor) -> None:
    if rep_bdhw.shape[0] != logits_bchw.shape[0] or rep_bdhw.shape[2:] != logits_bchw.shape[2:]:
        raise ValueError(
            f"rep {tuple(rep_bdhw.shape)} and logits {tuple(logits_bchw.shape)} must share B, h, w"
        )


def route_labeled(
    rep_bdhw: Tensor,
    logits_bchw: Tensor,
    labels_small_bhw: Tensor,
    tau_h: float | Tensor = 0.8,
    low_threshold: float = 0.0,
    ignore_index: int = 255,
) -> LabeledRoutes:
    """Labeled routing (appendix: CPG), on student features at stride 4.

    A pixel is *correct* if its prediction equals the (downsampled) label and the label is not
    ``ignore_index``. Correct pixels with ``conf ≥ tau_h`` are high, correct pixels with
    ``low_threshold < conf < tau_h`` are low, misclassified ones are neither. ``tau_h`` may be a
    per-class tensor ``[C]`` (:class:`AdaptiveThreshold`), read at the label.
    """
    _check_spatial(rep_bdhw, logits_bchw)
    if labels_small_bhw.shape != logits_bchw.shape[:1] + logits_bchw.shape[2:]:
        raise ValueError("labels_small_bhw must be at the logits' resolution")
    conf_bhw, pred_bhw = confidence(logits_bchw)
    labels = labels_small_bhw.to(pred_bhw.device).long()
    correct = (pred_bhw == labels) & (labels != ignore_index)
    tau = _per_class(tau_h, labels)
    high = correct & (conf_bhw >= tau)
    low = correct & (conf_bhw > low_threshold) & (conf_bhw < tau)
    feats_nd = flatten_features(rep_bdhw)
    not_sel = torch.full_like(labels, NOT_SELECTED)
    return LabeledRoutes(
        high_feats=feats_nd,
        high_cls=torch.where(high, labels, not_sel).flatten(),
        low_feats=feats_nd,
        low_cls=torch.where(low, labels, not_sel).flatten(),
    )


def route_unlabeled(rep_t_bdhw: Tensor, logits_t_bchw: Tensor, thr: float | Tensor = 0.8) -> Rows:
    """Unlabeled routing of the appendix (CPG): teacher ``conf ≥ thr`` → high, class = teacher
    argmax.

    ``thr`` may be a per-class tensor ``[C]``, read at the teacher's prediction.
    """
    _check_spatial(rep_t_bdhw, logits_t_bchw)
    conf_bhw, pred_bhw = confidence(logits_t_bchw)
    high = conf_bhw >= _per_class(thr, pred_bhw)
    cls = torch.where(high, pred_bhw, torch.full_like(pred_bhw, NOT_SELECTED))
    return Rows(flatten_features(rep_t_bdhw), cls.flatten())


def rank_in_group(group_n: Tensor, order_n: Tensor, n_groups: int) -> Tensor:
    """Rank of every row within its group, ``[N]`` long, along ``order_n``.

    ``order_n`` is a permutation of the rows that lists the groups contiguously in increasing
    group id (e.g. a stable sort by group of some preferred order); ``group_n`` holds ids in
    ``[0, n_groups)``. Rank 0 is the first row of a group in that order.
    """
    n = group_n.shape[0]
    n_g = torch.zeros(n_groups, dtype=torch.long, device=group_n.device).index_add_(
        0, group_n, torch.ones_like(group_n)
    )
    starts_g = torch.cumsum(n_g, 0) - n_g  # exclusive prefix sum: first ordered row per group
    rank_sorted = torch.arange(n, device=group_n.device) - starts_g[group_n[order_n]]
    return torch.empty_like(group_n).scatter_(0, order_n, rank_sorted)


def route_back(
    rep_bdhw: Tensor,
    logits_bchw: Tensor,
    labels_small_bhw: Tensor,
    per_class: int = 5000,
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
) -> BackRows:
    """Labeled rows of the COCO back queue (appendix: CPG): for every class present in the
    downsampled labels, at most ``per_class`` uniformly random pixels of that class, **whether
    or not they are correctly classified**, with ``conf = p_gt`` (the softmax probability of the
    ground-truth class at stride 4).

    Pixels labeled ``ignore_index`` or outside ``[0, C)`` are never selected (the official
    ``np.unique`` would pick up 255 and crash, appendix Q15). Fixed shapes, no host sync: the
    pixels are shuffled (argsort of uniform scores drawn on ``generator``'s device), grouped by
    class with a stable sort, and a row is kept if its rank within its class is below
    ``per_class``. Returns all ``N = B·h·w`` rows with class −1 for the others.
    """
    _check_spatial(rep_bdhw, logits_bchw)
    prob_bchw = F.softmax(logits_bchw.detach().float(), dim=1)
    num_classes = prob_bchw.shape[1]
    labels_bhw = labels_small_bhw.to(prob_bchw.device).long()
    if labels_bhw.shape != prob_bchw.shape[:1] + prob_bchw.shape[2:]:
        raise ValueError("labels_small_bhw must be at the logits' resolution")
    valid_bhw = (labels_bhw != ignore_index) & (labels_bhw >= 0) & (labels_bhw < num_classes)
    safe_bhw = torch.where(valid_bhw, labels_bhw, 0)
    p_gt_n = prob_bchw.gather(1, safe_bhw[:, None])[:, 0].flatten()
    group_n = torch.where(valid_bhw, labels_bhw, num_classes).flatten()  # invalid: bucket C
    n = group_n.shape[0]
    device = generator.device if generator is not None else group_n.device
    scores_n = torch.rand(n, generator=generator, device=device).to(group_n.device)
    shuffled_n = torch.argsort(scores_n)
    order_n = shuffled_n[torch.sort(group_n[shuffled_n], stable=True).indices]
    rank_n = rank_in_group(group_n, order_n, num_classes + 1)
    keep_n = valid_bhw.flatten() & (rank_n < per_class)
    cls_n = torch.where(keep_n, group_n, NOT_SELECTED)
    return BackRows(flatten_features(rep_bdhw), p_gt_n, cls_n)


# --------------------------------------------------------------------------- sub-sampling
def subsample_indices(
    cls_n: Tensor, cap: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """A random subset of at most ``cap`` selected rows (``cls ≥ 0``), fixed size ``min(cap, N)``.

    Equivalent to the official "shuffle the selected rows, keep the first ``cap``" (appendix: CPG):
    every selected row gets a uniform score, unselected rows −inf, and ``topk`` keeps the
    ``min(cap, N)`` best in score order (a uniformly random order of the selected rows first).
    Returns ``(idx[k], cls[k])``; slots beyond the number of selected rows get class −1.
    The scores are drawn on ``generator``'s device (the rows' device without a generator).
    """
    n = cls_n.shape[0]
    k = min(int(cap), n)
    device = generator.device if generator is not None else cls_n.device
    scores = torch.rand(n, generator=generator, device=device).to(cls_n.device)
    scores = torch.where(cls_n >= 0, scores, torch.full_like(scores, float("-inf")))
    top = torch.topk(scores, k)
    cls_k = torch.where(top.values > float("-inf"), cls_n[top.indices], NOT_SELECTED)
    return top.indices, cls_k


def subsample(
    feats_nd: Tensor, cls_n: Tensor, cap: int, generator: torch.Generator | None = None
) -> Rows:
    """:func:`subsample_indices` applied to rows: ``(feats[k, D], cls[k])``."""
    idx_k, cls_k = subsample_indices(cls_n, cap, generator)
    return Rows(feats_nd[idx_k], cls_k)


def _gather_two(a_nd: Tensor, b_md: Tensor, idx_k: Tensor) -> Tensor:
    """Rows ``idx`` of ``cat(a, b)`` without materialising the concatenation."""
    n_a, n_b = a_nd.shape[0], b_md.shape[0]
    dtype = torch.promote_types(a_nd.dtype, b_md.dtype)
    from_a = (idx_k < n_a)[:, None]
    rows_a = a_nd[idx_k.clamp(max=max(n_a - 1, 0))] if n_a else None
    rows_b = b_md[(idx_k - n_a).clamp(min=0, max=max(n_b - 1, 0))] if n_b else None
    if rows_a is None:
        return rows_b.to(dtype)
    if rows_b is None:
        return rows_a.to(dtype)
    return torch.where(from_a, rows_a.to(dtype), rows_b.to(dtype))


def memory_rows(
    labeled: LabeledRoutes,
    unlabeled: Rows,
    batch_size: int,
    sample_pixel_num: int = 5000,
    generator: torch.Generator | None = None,
) -> tuple[Rows, Rows]:
    """The rows one step pushes (appendix: CPG "per-iteration budget"): ``(high, low)``.

    high = a random subset of at most ``sample_pixel_num·2B`` rows of
    ``cat(labeled high, unlabeled high)``; low = at most ``sample_pixel_num·B`` random rows of
    the labeled low set. ``B`` is the per-GPU batch size.
    """
    cls_cat = torch.cat([labeled.high_cls, unlabeled.cls.to(labeled.high_cls.device)])
    idx_h, cls_h = subsample_indices(cls_cat, sample_pixel_num * 2 * batch_size, generator)
    high = Rows(_gather_two(labeled.high_feats, unlabeled.feats, idx_h), cls_h)
    low = subsample(labeled.low_feats, labeled.low_cls, sample_pixel_num * batch_size, generator)
    return high, low


def cpg_rows(
    rep_l_bdhw: Tensor,
    logits_l_bchw: Tensor,
    labels_small_bhw: Tensor,
    rep_u_bdhw: Tensor | None,
    logits_u_bchw: Tensor | None,
    tau_h: float | Tensor = 0.8,
    *,
    low_threshold: float = 0.0,
    unlabeled_threshold: float | Tensor = 0.8,
    sample_pixel_num: int = 5000,
    generator: torch.Generator | None = None,
) -> tuple[Rows, Rows]:
    """CPG sampling of one step (appendix: CPG): ``(high, low)`` rows to push into the memories.

    :func:`route_labeled` on the student's labeled outputs, :func:`route_unlabeled` on the
    pseudo-label producer's unlabeled outputs (none when ``rep_u_bdhw`` is ``None``), then the
    per-step budget of :func:`memory_rows`.
    """
    lab = route_labeled(rep_l_bdhw, logits_l_bchw, labels_small_bhw, tau_h, low_threshold)
    if rep_u_bdhw is None or logits_u_bchw is None:
        unl = Rows(rep_l_bdhw.new_empty(0, rep_l_bdhw.shape[1]), lab.high_cls.new_empty(0))
    else:
        unl = route_unlabeled(rep_u_bdhw, logits_u_bchw, unlabeled_threshold)
    return memory_rows(lab, unl, rep_l_bdhw.shape[0], sample_pixel_num, generator)


# --------------------------------------------------------------------------- "csp" thresholds
def class_mean_gt_prob(
    logits_bchw: Tensor, labels_bhw: Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[Tensor, Tensor]:
    """Mean softmax probability of the true class over the pixels of each class (appendix: CPG).

    Returns ``(mean[C] float32, present[C] bool)``; ``mean`` is 0 for absent classes.
    """
    prob = F.softmax(logits_bchw.detach().float(), dim=1)
    labels = labels_bhw.to(prob.device).long()
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    safe = torch.where(valid, labels, 0)
    p_gt = prob.gather(1, safe[:, None])[:, 0]
    w = valid.float().flatten()
    sums = torch.zeros(num_classes, device=prob.device).index_add_(
        0, safe.flatten(), p_gt.flatten() * w
    )
    counts = torch.zeros(num_classes, device=prob.device).index_add_(0, safe.flatten(), w)
    return sums / counts.clamp_min(1.0), counts > 0


class AdaptiveThreshold:
    """Class-specific adaptive thresholds, threshold type "csp" (appendix: CPG).

    ``ema_c ← momentum·ema_c + (1 − momentum)·mean_pgt_c`` for the classes present in the
    labeled batch; the threshold of class ``c`` is ``clip(ema_c, thre_min, thre_max)``, or
    ``fixed_value`` for the classes in ``fix_class``. Every official config uses threshold type
    "fix" and has the csp keys commented out (appendix: CPG, Q9), so the defaults of
    ``thre_min``/``thre_max`` here (no clipping) are ours, not the authors'.
    """

    def __init__(
        self,
        num_classes: int,
        init: float = 0.8,
        momentum: float = 0.999,
        thre_min: float = 0.0,
        thre_max: float = 1.0,
        fix_class: Sequence[int] = (),
        fixed_value: float = 0.8,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_classes = int(num_classes)
        self.momentum, self.thre_min, self.thre_max = (
            float(momentum),
            float(thre_min),
            float(thre_max),
        )
        self.fixed_value = float(fixed_value)
        self.ema = torch.full((self.num_classes,), float(init), device=device)
        self.fixed = torch.zeros(self.num_classes, dtype=torch.bool, device=device)
        self.fixed[list(fix_class)] = True

    @torch.no_grad()
    def update(self, probs_gt_per_class_mean: Tensor, present_mask: Tensor) -> None:
        """EMA step for the present classes (see :func:`class_mean_gt_prob`)."""
        m = self.momentum
        new = m * self.ema + (1.0 - m) * probs_gt_per_class_mean.to(self.ema)
        self.ema = torch.where(present_mask.to(self.ema.device), new, self.ema)

    def thresholds(self) -> Tensor:
        """Per-class thresholds ``[C]`` (usable as ``tau_h`` / ``thr`` of the routing)."""
        t = self.ema.clamp(self.thre_min, self.thre_max)
        return torch.where(self.fixed, torch.full_like(t, self.fixed_value), t)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.clone(), "fixed": self.fixed.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = state["ema"].to(self.ema.device).clone()
        self.fixed = state["fixed"].to(self.fixed.device).clone()
