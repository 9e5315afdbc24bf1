"""CPG — confidence-based prototype generation: sampling and memories (paper §"CPG"; spec
§5.1–5.3, §5.5, §13).

During the sampling window (spec §1) every step routes stride-4 pixel features into per-class
FIFO memories that the one-shot clustering (:func:`brpg.prototypes.apo.cluster_memories`)
reads later:

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
- COCO only (``proto.back_queue``, spec §5.5): at most ``back_per_class`` random labeled pixels
  of every class in the ground truth, correct or not, with their p_gt (:func:`route_back`),
  feed a per-class *back* queue that keeps the ``2·queue_len`` most confident rows
  (:class:`BackQueue`); at clustering time a memory with fewer than ``min_rows`` rows is
  refilled from it (:func:`apply_back_fallbacks`; the official ``ValueError`` when only the
  low memory is short is replaced by a fallback, spec §12 Q13).

Fixed-size rows, no host sync. Routing does not compact anything: it returns the features of
*all* ``N = B·h·w`` pixels, ``[N, D]``, with a class vector ``[N]`` that holds the class of a
selected row and :data:`NOT_SELECTED` (−1) elsewhere. Sub-sampling keeps that form (random
scores, invalid rows scored −inf, ``topk`` of a size known from shapes alone) and
:meth:`PrototypeMemory.push` ignores rows whose class is outside ``[0, C)``. Shapes therefore
never depend on the data, which is what lets ``all_gather`` use plain tensors.

The memories live on the device as one ring buffer ``[C, capacity, D]`` per kind with
per-class write pointers and fill counts (spec §13), instead of the official per-class CPU
tensors re-concatenated every step. Memory cost: ``C·capacity·D·4`` bytes per kind in
float32 (VOC: 21·30000·256·4 ≈ 0.65 GB).

The official memory rows also carry the confidence (257 columns); it is used only by the
unused "prob" prototype type and by the COCO path (spec §5.4, §5.5), so high/low rows here are
features only and :class:`BackQueue` keeps its p_gt beside the features. The class-specific
"csp" thresholds of spec §5.3 are provided as :class:`AdaptiveThreshold`; no official config
uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FALLBACK_HIGH",
    "FALLBACK_LOW",
    "FALLBACK_NONE",
    "FALLBACK_SPLIT",
    "NOT_SELECTED",
    "AdaptiveThreshold",
    "BackQueue",
    "BackRows",
    "LabeledRoutes",
    "PrototypeMemory",
    "Rows",
    "apply_back_fallbacks",
    "class_mean_gt_prob",
    "confidence",
    "downsample_labels",
    "flatten_features",
    "memory_rows",
    "route_back",
    "route_labeled",
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
    ``mode="nearest"`` on the float label map (spec §5.1). Returns ``long [B, h, w]``."""
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
    """Labeled routing of spec §5.1 (student features at stride 4).

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
    """Unlabeled routing of spec §5.1: teacher ``conf ≥ thr`` → high, class = teacher argmax.

    ``thr`` may be a per-class tensor ``[C]``, read at the teacher's prediction.
    """
    _check_spatial(rep_t_bdhw, logits_t_bchw)
    conf_bhw, pred_bhw = confidence(logits_t_bchw)
    high = conf_bhw >= _per_class(thr, pred_bhw)
    cls = torch.where(high, pred_bhw, torch.full_like(pred_bhw, NOT_SELECTED))
    return Rows(flatten_features(rep_t_bdhw), cls.flatten())


def _rank_in_group(group_n: Tensor, order_n: Tensor, n_groups: int) -> Tensor:
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
    """Labeled rows of the COCO back queue (spec §5.5): for every class present in the
    downsampled labels, at most ``per_class`` uniformly random pixels of that class, **whether
    or not they are correctly classified**, with ``conf = p_gt`` (the softmax probability of the
    ground-truth class at stride 4).

    Pixels labeled ``ignore_index`` or outside ``[0, C)`` are never selected (the official
    ``np.unique`` would pick up 255 and crash, spec §12 Q15). Fixed shapes, no host sync: the
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
    rank_n = _rank_in_group(group_n, order_n, num_classes + 1)
    keep_n = valid_bhw.flatten() & (rank_n < per_class)
    cls_n = torch.where(keep_n, group_n, NOT_SELECTED)
    return BackRows(flatten_features(rep_bdhw), p_gt_n, cls_n)


# --------------------------------------------------------------------------- sub-sampling
def subsample_indices(
    cls_n: Tensor, cap: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """A random subset of at most ``cap`` selected rows (``cls ≥ 0``), fixed size ``min(cap, N)``.

    Equivalent to the official "shuffle the selected rows, keep the first ``cap``" (spec §5.1):
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
    """The rows one step pushes (spec §5.1 "per-iteration budget"): ``(high, low)``.

    high = a random subset of at most ``sample_pixel_num·2B`` rows of
    ``cat(labeled high, unlabeled high)``; low = at most ``sample_pixel_num·B`` random rows of
    the labeled low set. ``B`` is the per-GPU batch size.
    """
    cls_cat = torch.cat([labeled.high_cls, unlabeled.cls.to(labeled.high_cls.device)])
    idx_h, cls_h = subsample_indices(cls_cat, sample_pixel_num * 2 * batch_size, generator)
    high = Rows(_gather_two(labeled.high_feats, unlabeled.feats, idx_h), cls_h)
    low = subsample(labeled.low_feats, labeled.low_cls, sample_pixel_num * batch_size, generator)
    return high, low


# --------------------------------------------------------------------------- memories
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_cat(t: Tensor) -> Tensor:
    """Concatenation in rank order of ``t`` from every rank (all ranks: the same shape)."""
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


class PrototypeMemory:
    """Per-class FIFO feature memories as device ring buffers (spec §5.2, §13).

    Args:
        num_classes: ``C``.
        dim: feature width ``D`` (256).
        capacity: rows kept per class and kind (``queue_len`` = 30000).
        kinds: memory names ("high", "low"; COCO's "back" queue is :class:`BackQueue`).
        device, dtype: where and how the rows are stored (float32 as the official fp32 queues).
        sync: all-gather pushed rows across ranks when ``torch.distributed`` is initialised
            with more than one process (every rank must push the same number of rows).

    For each kind: ``feats[C, capacity, D]`` (a ring per class), ``ptr[C]`` the next write slot
    and ``count[C]`` the fill count, all on ``device``. One extra scratch row receives the rows
    that are dropped, so a push is a single ``index_copy_`` with no data-dependent shape.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        capacity: int = 30000,
        kinds: Sequence[str] = ("high", "low"),
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        sync: bool = True,
    ) -> None:
        if num_classes <= 0 or dim <= 0 or capacity <= 0:
            raise ValueError("num_classes, dim and capacity must be positive")
        self.num_classes, self.dim, self.capacity = int(num_classes), int(dim), int(capacity)
        self.kinds = tuple(kinds)
        self.sync = bool(sync)
        device = torch.device(device) if device is not None else torch.device("cpu")
        n = self.num_classes * self.capacity
        self._buf = {
            k: torch.zeros(n + 1, self.dim, device=device, dtype=dtype) for k in self.kinds
        }
        self.ptr = {
            k: torch.zeros(self.num_classes, dtype=torch.long, device=device) for k in self.kinds
        }
        self.count = {
            k: torch.zeros(self.num_classes, dtype=torch.long, device=device) for k in self.kinds
        }

    @property
    def device(self) -> torch.device:
        return next(iter(self._buf.values())).device

    def feats(self, kind: str) -> Tensor:
        """The raw ring storage ``[C, capacity, D]`` of ``kind`` (a view, ring order)."""
        c, q = self.num_classes, self.capacity
        return self._buf[kind][: c * q].view(c, q, self.dim)

    @torch.no_grad()
    def push(self, kind: str, feats_nd: Tensor, cls_n: Tensor, sync: bool | None = None) -> None:
        """Append rows to their classes' rings; rows with class outside ``[0, C)`` are ignored.

        Rows of one class are appended in row order; if more than ``capacity`` rows of a class
        arrive at once only the last ``capacity`` are kept (the official ``[-30000:]``).
        Vectorised: each row's rank within its class comes from a stable sort by class, and row
        ``r`` of class ``c`` goes to slot ``(ptr[c] + r) mod capacity``.
        """
        if feats_nd.ndim != 2 or feats_nd.shape[1] != self.dim:
            raise ValueError(f"expected rows [N, {self.dim}], got {tuple(feats_nd.shape)}")
        if cls_n.shape != feats_nd.shape[:1]:
            raise ValueError("cls_n must have one entry per row")
        buf, device = self._buf[kind], self.device
        feats_nd, cls_n = feats_nd.detach(), cls_n.detach().long()
        if (self.sync if sync is None else sync) and _distributed():
            feats_nd, cls_n = _all_gather_cat(feats_nd), _all_gather_cat(cls_n)
        feats_nd, cls_n = feats_nd.to(device), cls_n.to(device)
        c_all, q = self.num_classes, self.capacity
        n = cls_n.shape[0]
        valid = (cls_n >= 0) & (cls_n < c_all)
        c = torch.where(valid, cls_n, c_all)  # invalid rows in an extra bucket C
        n_c = torch.zeros(c_all + 1, dtype=torch.long, device=device).index_add_(
            0, c, torch.ones_like(c)
        )
        order = torch.sort(c, stable=True).indices
        starts = torch.cumsum(n_c, 0) - n_c  # exclusive prefix sum: first sorted row per class
        rank_sorted = torch.arange(n, device=device) - starts[c[order]]
        rank = torch.empty_like(c).scatter_(0, order, rank_sorted)
        keep = valid & (rank >= n_c[c] - q)  # the last `capacity` rows of each class
        ptr = torch.cat([self.ptr[kind], self.ptr[kind].new_zeros(1)])
        slot = c * q + (ptr[c] + rank) % q
        slot = torch.where(keep, slot, torch.full_like(slot, c_all * q))  # dropped → scratch
        buf.index_copy_(0, slot, feats_nd.to(buf.dtype))
        added = n_c[:c_all]
        self.ptr[kind] = (self.ptr[kind] + added) % q
        self.count[kind] = torch.clamp(self.count[kind] + added, max=q)

    def get(self, kind: str, ordered: bool = False) -> tuple[Tensor, Tensor]:
        """``(feats[C, capacity, D], valid[C, capacity])`` for batched k-means.

        ``ordered=False`` returns the ring storage itself (no copy); the valid rows are then the
        first ``count[c]`` slots, as the ring fills from slot 0. ``ordered=True`` returns a copy
        in chronological order (oldest first), valid rows first.
        """
        q = self.capacity
        ar = torch.arange(q, device=self.device)
        valid = ar[None] < self.count[kind][:, None]
        feats = self.feats(kind)
        if ordered:
            start = (self.ptr[kind] - self.count[kind]) % q
            idx = (start[:, None] + ar[None]) % q
            feats = feats.gather(1, idx[:, :, None].expand(-1, -1, self.dim))
        return feats, valid

    @torch.no_grad()
    def replace(self, kind: str, replace_c: Tensor, feats_kd: Tensor, cls_k: Tensor) -> None:
        """Empty the ``kind`` memory of every class with ``replace_c[c]`` (``[C]`` bool), then
        push the rows of those classes (rows of other classes are ignored). Local: no gather,
        the caller passes the same rows on every rank (used by :func:`apply_back_fallbacks`)."""
        replace_c = replace_c.to(self.device)
        self.ptr[kind] = torch.where(replace_c, 0, self.ptr[kind])
        self.count[kind] = torch.where(replace_c, 0, self.count[kind])
        cls_k = cls_k.to(self.device).long()
        in_range = (cls_k >= 0) & (cls_k < self.num_classes)
        mine = in_range & replace_c[cls_k.clamp(0, self.num_classes - 1)]
        self.push(kind, feats_kd, torch.where(mine, cls_k, NOT_SELECTED), sync=False)

    def clear(self) -> None:
        """Empty every memory (counts and pointers to 0; storage kept)."""
        for k in self.kinds:
            self.ptr[k].zero_()
            self.count[k].zero_()

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "dim": self.dim,
            "capacity": self.capacity,
            "kinds": list(self.kinds),
            "memories": {
                k: {
                    "feats": self.feats(k).clone(),
                    "ptr": self.ptr[k].clone(),
                    "count": self.count[k].clone(),
                }
                for k in self.kinds
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = (state["num_classes"], state["dim"], state["capacity"], tuple(state["kinds"]))
        if meta != (self.num_classes, self.dim, self.capacity, self.kinds):
            raise ValueError(
                f"memory layout {meta} does not match "
                f"{(self.num_classes, self.dim, self.capacity, self.kinds)}"
            )
        for k in self.kinds:
            mem = state["memories"][k]
            self.feats(k).copy_(mem["feats"])
            self.ptr[k].copy_(mem["ptr"])
            self.count[k].copy_(mem["count"])


# --------------------------------------------------------------------------- COCO back queue
class BackQueue:
    """Per-class COCO 'back' queue: the ``capacity`` most confident rows (spec §5.5, §13).

    Args:
        num_classes: ``C``.
        dim: feature width ``D``.
        capacity: rows kept per class (``2·queue_len`` = 60000 officially).
        device, dtype: storage of the rows (float32 as the official queue).
        sync: all-gather pushed rows across ranks under ``torch.distributed`` (as
            :class:`PrototypeMemory`; every rank must push the same number of rows).

    State: ``feats[C, capacity, D]``, ``conf[C, capacity]`` (p_gt, −inf in an empty slot) and
    ``count[C]``, on ``device``. Slots are unordered; the official queue is re-sorted by p_gt
    on the CPU after every append and truncated to its most confident ``capacity`` rows. Here
    :meth:`push` is a top-k merge on the device: the pushed rows are ranked by p_gt within their
    class, the best ``min(N, capacity)`` of each class become candidates ``[C, W]``, one
    ``topk`` over ``cat(queue, candidates)`` ``[C, capacity + W]`` decides what is kept, and the
    entering rows are written into the freed slots with a single ``index_copy_`` (no host sync,
    no per-class loop, no copy of the queue). Which of two rows with equal p_gt is kept is up to
    ``topk`` (the official stable argsort keeps the later one). Memory: ``C·capacity·(D + 1)·4``
    bytes (COCO: 81·60000·257·4 ≈ 5 GB).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        capacity: int = 60000,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        sync: bool = True,
    ) -> None:
        if num_classes <= 0 or dim <= 0 or capacity <= 0:
            raise ValueError("num_classes, dim and capacity must be positive")
        self.num_classes, self.dim, self.capacity = int(num_classes), int(dim), int(capacity)
        self.sync = bool(sync)
        device = torch.device(device) if device is not None else torch.device("cpu")
        n = self.num_classes * self.capacity
        self._feats = torch.zeros(n + 1, self.dim, device=device, dtype=dtype)  # + scratch row
        self._conf = torch.full((n + 1,), float("-inf"), device=device)
        self.count = torch.zeros(self.num_classes, dtype=torch.long, device=device)

    @property
    def device(self) -> torch.device:
        return self._feats.device

    def feats(self) -> Tensor:
        """Storage ``[C, capacity, D]`` (a view; slot order is arbitrary)."""
        return self._feats[: self.num_classes * self.capacity].view(
            self.num_classes, self.capacity, self.dim
        )

    def conf(self) -> Tensor:
        """p_gt per slot ``[C, capacity]`` (a view; −inf marks an empty slot)."""
        return self._conf[: self.num_classes * self.capacity].view(self.num_classes, self.capacity)

    @torch.no_grad()
    def push(
        self, feats_nd: Tensor, conf_n: Tensor, cls_n: Tensor, sync: bool | None = None
    ) -> None:
        """Merge rows into their classes' queues, keeping the ``capacity`` highest p_gt per class.

        Rows whose class is outside ``[0, C)`` are ignored. Under ``torch.distributed`` (and
        ``sync``) the rows of all ranks are gathered first, so every rank keeps the same queues.
        """
        if feats_nd.ndim != 2 or feats_nd.shape[1] != self.dim:
            raise ValueError(f"expected rows [N, {self.dim}], got {tuple(feats_nd.shape)}")
        if cls_n.shape != feats_nd.shape[:1] or conf_n.shape != feats_nd.shape[:1]:
            raise ValueError("conf_n and cls_n must have one entry per row")
        feats_nd, conf_n, cls_n = feats_nd.detach(), conf_n.detach().float(), cls_n.detach().long()
        if (self.sync if sync is None else sync) and _distributed():
            feats_nd, conf_n, cls_n = (_all_gather_cat(t) for t in (feats_nd, conf_n, cls_n))
        device = self.device
        feats_nd, conf_n, cls_n = feats_nd.to(device), conf_n.to(device), cls_n.to(device)
        c_all, q, n = self.num_classes, self.capacity, cls_n.shape[0]
        w = min(n, q)  # candidates per class: more than `capacity` can never all enter
        if w == 0:
            return
        valid_n = (cls_n >= 0) & (cls_n < c_all)
        group_n = torch.where(valid_n, cls_n, c_all)
        # rank of each row within its class, most confident first (ties: row order)
        key_n = torch.where(valid_n, conf_n, float("-inf"))
        by_conf_n = torch.sort(key_n, descending=True, stable=True).indices
        order_n = by_conf_n[torch.sort(group_n[by_conf_n], stable=True).indices]
        rank_n = _rank_in_group(group_n, order_n, c_all + 1)
        cand_n = valid_n & (rank_n < w)
        # candidates [C, w], −inf where a class has fewer than w rows (scratch index c_all·w)
        flat_n = torch.where(cand_n, group_n * w + rank_n, c_all * w)
        cand_conf = torch.full((c_all * w + 1,), float("-inf"), device=device)
        cand_conf.index_copy_(0, flat_n, torch.where(cand_n, conf_n, float("-inf")))
        scores_cm = torch.cat([self.conf(), cand_conf[: c_all * w].view(c_all, w)], dim=1)
        top = torch.topk(scores_cm, q, dim=1)
        chosen_cm = torch.zeros_like(scores_cm, dtype=torch.bool)
        chosen_cm.scatter_(1, top.indices, top.values > float("-inf"))
        kept_cq, entering_cw = chosen_cm[:, :q], chosen_cm[:, q:]
        # j-th entering candidate of a class → j-th slot of that class not kept
        free_cq = ~kept_cq
        free_rank_cq = torch.cumsum(free_cq.long(), 1) - 1
        slot_of_cq = torch.zeros(c_all, q + 1, dtype=torch.long, device=device)
        slot_of_cq.scatter_(
            1,
            torch.where(free_cq, free_rank_cq, q),  # kept slots → scratch column q
            torch.arange(q, device=device).expand(c_all, q),
        )
        enter_rank_cw = (torch.cumsum(entering_cw.long(), 1) - 1).clamp_min(0)
        dest_cw = slot_of_cq.gather(1, enter_rank_cw)
        c_safe_n, r_safe_n = group_n.clamp(max=c_all - 1), rank_n.clamp(max=w - 1)
        enter_n = cand_n & entering_cw[c_safe_n, r_safe_n]
        dst_n = torch.where(enter_n, c_safe_n * q + dest_cw[c_safe_n, r_safe_n], c_all * q)
        self._feats.index_copy_(0, dst_n, feats_nd.to(self._feats.dtype))
        self._conf.index_copy_(0, dst_n, conf_n)
        self._conf[-1] = float("-inf")
        self.count = chosen_cm.sum(1)

    def ascending(self) -> Tensor:
        """Slot indices ``[C, capacity]`` by increasing p_gt, the ``count[c]`` filled slots
        first (the official queue order; one sort, used at clustering time)."""
        conf_cq = self.conf()
        key_cq = torch.where(conf_cq > float("-inf"), conf_cq, float("inf"))
        return torch.sort(key_cq, dim=1, stable=True).indices

    def clear(self) -> None:
        """Empty every queue (storage kept)."""
        self._conf.fill_(float("-inf"))
        self.count.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "dim": self.dim,
            "capacity": self.capacity,
            "feats": self.feats().clone(),
            "conf": self.conf().clone(),
            "count": self.count.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = (state["num_classes"], state["dim"], state["capacity"])
        if meta != (self.num_classes, self.dim, self.capacity):
            raise ValueError(
                f"back queue layout {meta} does not match "
                f"{(self.num_classes, self.dim, self.capacity)}"
            )
        self.feats().copy_(state["feats"])
        self.conf().copy_(state["conf"])
        self.count.copy_(state["count"])


FALLBACK_NONE = 0  # high ≥ min_rows and low ≥ min_rows: memories unchanged
FALLBACK_LOW = 1  # only low is short: low := least confident half of back (official: ValueError)
FALLBACK_HIGH = 2  # only high is short: high := most confident min(fill, queue_len) rows of back
FALLBACK_SPLIT = 3  # both short: low := less confident half of back, high := the other half


@torch.no_grad()
def apply_back_fallbacks(memory: PrototypeMemory, back: BackQueue, min_rows: int = 10) -> Tensor:
    """COCO clustering-time fallbacks (spec §5.5), in place on ``memory``; returns the case of
    each class, ``[C]`` long (:data:`FALLBACK_NONE` … :data:`FALLBACK_SPLIT`).

    With ``n`` the fill of class ``c``'s back queue in increasing p_gt order and ``half = n // 2``:

    - high ≥ ``min_rows`` and low ≥ ``min_rows``: unchanged;
    - high ≥ ``min_rows``, low short: low := the ``half`` least confident back rows.
      **Deliberate fix** (spec §12 Q13): the official code raises ``ValueError`` here;
    - high short, low ≥ ``min_rows``: high := the ``min(n, queue_len)`` most confident rows;
    - both short: low := the first (less confident) ``half`` rows, high := the other
      ``n − half`` rows (as the official split of the ascending queue at half its fill).

    A refilled memory holds at most ``queue_len`` rows: where a half is longer (only when
    ``back.capacity > 2·queue_len``) low takes the least and high the most confident rows. A
    short memory is replaced even when the back queue is empty (as officially). Runs once,
    before APO and k-means, so the dispersion sees the memories after the fallback; the host
    syncs here (one ``nonzero`` per memory kind) are fine.
    """
    if memory.num_classes != back.num_classes or memory.dim != back.dim:
        raise ValueError("memory and back queue must have the same classes and width")
    q, cap, d, device = memory.capacity, back.capacity, back.dim, memory.device
    high_ok_c = memory.count["high"].to(device) >= min_rows
    low_ok_c = memory.count["low"].to(device) >= min_rows
    case_c = torch.where(
        high_ok_c,
        torch.where(low_ok_c, FALLBACK_NONE, FALLBACK_LOW),
        torch.where(low_ok_c, FALLBACK_HIGH, FALLBACK_SPLIT),
    )
    n_c = back.count.to(device)
    half_c = n_c // 2
    asc_cq = back.ascending().to(device)
    back_rows = back.feats().reshape(-1, d)
    j_q = torch.arange(q, device=device)
    m_low_c = half_c.clamp(max=q)
    m_high_c = torch.where(case_c == FALLBACK_HIGH, n_c, n_c - half_c).clamp(max=q)
    plans = {
        "low": (case_c == FALLBACK_LOW) | (case_c == FALLBACK_SPLIT),
        "high": (case_c == FALLBACK_HIGH) | (case_c == FALLBACK_SPLIT),
    }
    starts = {"low": torch.zeros_like(n_c), "high": n_c - m_high_c}  # ranks in ascending order
    sizes = {"low": m_low_c, "high": m_high_c}
    for kind, replace_c in plans.items():  # two memory kinds, each batched over classes
        take_cq = replace_c[:, None] & (j_q[None] < sizes[kind][:, None])
        src_rank_cq = (starts[kind][:, None] + j_q[None]).clamp(max=cap - 1)
        cls_k, j_k = take_cq.nonzero(as_tuple=True)
        src_k = cls_k * cap + asc_cq[cls_k, src_rank_cq[cls_k, j_k]].to(device)
        memory.replace(kind, replace_c, back_rows[src_k.to(back_rows.device)], cls_k)
    return case_c


# --------------------------------------------------------------------------- "csp" thresholds
def class_mean_gt_prob(
    logits_bchw: Tensor, labels_bhw: Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[Tensor, Tensor]:
    """Mean softmax probability of the true class over the pixels of each class (spec §5.3).

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
    """Class-specific adaptive thresholds, threshold type "csp" (spec §5.3).

    ``ema_c ← momentum·ema_c + (1 − momentum)·mean_pgt_c`` for the classes present in the
    labeled batch; the threshold of class ``c`` is ``clip(ema_c, thre_min, thre_max)``, or
    ``fixed_value`` for the classes in ``fix_class``. Every official config uses threshold type
    "fix" and has the csp keys commented out (spec §5.3, §12 Q9), so the defaults of
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
