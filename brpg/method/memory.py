"""CPG memories: per-class FIFO ring buffers of pixel features and COCO's back queue (paper
§"CPG"; appendix: CPG, cost).

The routed and sub-sampled rows of :mod:`brpg.method.cpg` are pushed here during the sampling
window; the one-shot clustering (:func:`brpg.method.clustering.cluster_prototypes`) reads them.

- :class:`PrototypeMemory`: the high / low memories (or the single random one), each class
  keeping its most recent ``capacity`` (30000) rows; under ``torch.distributed`` the rows of
  all ranks are gathered, so every rank holds the same memories;
- :class:`BackQueue` (COCO only, ``proto.back_queue``): per class the ``2·queue_len`` most
  confident labeled rows with their p_gt, and :func:`apply_back_fallbacks`, which refills a
  memory with fewer than ``min_rows`` rows from it at clustering time (the official
  ``ValueError`` when only the low memory is short is replaced by a fallback, appendix Q13).

The memories live on the device as one ring buffer ``[C, capacity, D]`` per kind with
per-class write pointers and fill counts (appendix: cost), instead of the official per-class CPU
tensors re-concatenated every step. Memory cost: ``C·capacity·D·4`` bytes per kind in
float32 (VOC: 21·30000·256·4 ≈ 0.65 GB). No host sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from brpg.distributed import is_distributed
from brpg.method.cpg import NOT_SELECTED, rank_in_group

__all__ = [
    "FALLBACK_HIGH",
    "FALLBACK_LOW",
    "FALLBACK_NONE",
    "FALLBACK_SPLIT",
    "BackQueue",
    "PrototypeMemory",
    "apply_back_fallbacks",
]


def _all_gather_cat(t: Tensor) -> Tensor:
    """Concatenation in rank order of ``t`` from every rank (all ranks: the same shape)."""
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def _queue_shape(num_classes: int, dim: int, capacity: int) -> tuple[int, int, int]:
    """``(num_classes, dim, capacity)`` as ints, checked to be positive."""
    if num_classes <= 0 or dim <= 0 or capacity <= 0:
        raise ValueError(
            f"num_classes, dim and capacity must be positive, got {num_classes}, {dim}, {capacity}"
        )
    return int(num_classes), int(dim), int(capacity)


class PrototypeMemory:
    """Per-class FIFO feature memories as device ring buffers (appendix: CPG, cost).

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
        self.num_classes, self.dim, self.capacity = _queue_shape(num_classes, dim, capacity)
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
        if (self.sync if sync is None else sync) and is_distributed():
            feats_nd, cls_n = _all_gather_cat(feats_nd), _all_gather_cat(cls_n)
        feats_nd, cls_n = feats_nd.to(device), cls_n.to(device)
        c_all, q = self.num_classes, self.capacity
        valid = (cls_n >= 0) & (cls_n < c_all)
        c = torch.where(valid, cls_n, c_all)  # invalid rows in an extra bucket C
        n_c = torch.zeros(c_all + 1, dtype=torch.long, device=device).index_add_(
            0, c, torch.ones_like(c)
        )
        rank = rank_in_group(c, torch.sort(c, stable=True).indices, c_all + 1)  # arrival order
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
    """Per-class COCO 'back' queue: the ``capacity`` most confident rows (appendix: CPG, cost).

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
        self.num_classes, self.dim, self.capacity = _queue_shape(num_classes, dim, capacity)
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
        if (self.sync if sync is None else sync) and is_distributed():
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
        rank_n = rank_in_group(group_n, order_n, c_all + 1)
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
    """COCO clustering-time fallbacks (appendix: CPG), in place on ``memory``; returns the case of
    each class, ``[C]`` long (:data:`FALLBACK_NONE` … :data:`FALLBACK_SPLIT`).

    With ``n`` the fill of class ``c``'s back queue in increasing p_gt order and ``half = n // 2``:

    - high ≥ ``min_rows`` and low ≥ ``min_rows``: unchanged;
    - high ≥ ``min_rows``, low short: low := the ``half`` least confident back rows.
      **Deliberate fix** (appendix Q13): the official code raises ``ValueError`` here;
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
