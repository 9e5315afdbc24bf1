"""Prototype loss L_pro and its pixel sampling (paper Eq. for L_pro; appendix: L_pro, timeline, Q5,
Q19).

``L_pro = CE(s(f, ·)/τ, y)`` with ``s(f, c) = max_k cos(f, r_{c,k})`` and τ = 0.1, on two sets
of student features from the stride-4 representation map:

- labeled: a 33×33 grid per image with the ground-truth labels (:func:`sample_labeled_grid`);
- unlabeled: up to ``1000·B`` random pixels whose teacher confidence reaches the ramped
  threshold :func:`pseudo_threshold`, with the teacher pseudo-labels (:func:`sample_unlabeled`).

The official code upsamples the whole representation map to the crop size (bilinear,
``align_corners=True``) only to read these pixels (appendix: cost). Here the values are read from
the stride-4 map directly: exactly at feature pixels when the grid lands on them (appendix: L_pro,
e.g. 513 → 129 and 769 → 193), otherwise by bilinear interpolation of the 4 neighbours at the same
source coordinates the upsampling would use, which gives the same values.

The sampling and the loss are fixed-size and sync-free: no ``.item()``, no boolean indexing
with a data-dependent size; unselected positions simply carry the ignore target 255.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from brpg.method.prototype_ema import PrototypeBank

__all__ = [
    "grid_indices",
    "grid_positions",
    "prototype_loss",
    "pseudo_threshold",
    "sample_labeled_grid",
    "sample_unlabeled",
]


def grid_positions(n_full: int, grid_num: int = 32) -> list[int]:
    """Full-resolution grid rows (or columns) ``{0, d, …, (grid_num−1)·d} ∪ {n_full − 1}``,
    ``d = (n_full − 1) // grid_num`` (appendix: L_pro; 33 positions for ``grid_num = 32``)."""
    if n_full < 1 or grid_num < 1:
        raise ValueError("n_full and grid_num must be positive")
    d = (n_full - 1) // grid_num
    return [i * d for i in range(grid_num)] + [n_full - 1]


def _grid_is_exact(n_feat: int, n_full: int, grid_num: int) -> bool:
    """Whether every grid pixel lands exactly on a feature pixel (pure Python, shapes only).

    With ``align_corners=True`` full-res pixel ``p`` reads source coordinate
    ``p·(n_feat−1)/(n_full−1)``; it is exact iff that number is an integer.
    """
    if n_full == 1:
        return True  # a 1-pixel output reads source coordinate 0 (scale 0 in PyTorch)
    return all(p * (n_feat - 1) % (n_full - 1) == 0 for p in grid_positions(n_full, grid_num))


def _grid_full(n_full: int, grid_num: int, device: torch.device) -> Tensor:
    """:func:`grid_positions` as a LongTensor built on ``device`` (no host-to-device copy)."""
    d = (n_full - 1) // grid_num
    last = torch.full((1,), n_full - 1, dtype=torch.long, device=device)
    return torch.cat([torch.arange(grid_num, device=device) * d, last])


def _to_feature_index(pos_full: Tensor, n_feat: int, n_full: int) -> Tensor:
    """Exact feature index of full-res positions (valid only when :func:`_grid_is_exact`)."""
    return pos_full * (n_feat - 1) // max(n_full - 1, 1)


def grid_indices(
    h_feat: int, w_feat: int, crop: int | tuple[int, int], grid_num: int = 32
) -> Tensor:
    """Stride-4 feature indices on which the official 33×33 labeled grid lands (appendix: L_pro).

    The official grid uses the same indices for rows and columns (square crops, appendix Q11),
    so this returns one LongTensor ``[grid_num + 1]`` shared by both axes, e.g.
    ``0, 4, …, 128`` for a 513 crop and a 129 map, ``0, 6, …, 192`` for 769 / 193.

    Raises:
        ValueError: if the crop or the map is not square, or if some grid pixel does not land
            exactly on a feature pixel (``crop − 1`` must be a multiple of ``h_feat − 1`` and
            every grid position a multiple of the ratio).
    """
    h_full, w_full = (crop, crop) if isinstance(crop, int) else crop
    if h_feat != w_feat or h_full != w_full:
        raise ValueError("the official grid assumes square crops and maps (appendix Q11)")
    if not _grid_is_exact(h_feat, h_full, grid_num):
        raise ValueError(
            f"grid of a {h_full} crop does not land exactly on a {h_feat} feature map "
            f"(need (crop-1) divisible by (h_feat-1) and the grid step by the ratio)"
        )
    return _to_feature_index(_grid_full(h_full, grid_num, torch.device("cpu")), h_feat, h_full)


def _source_coords(pos_full: Tensor, n_feat: int, n_full: int) -> Tensor:
    """``align_corners=True`` source coordinate of full-res positions (float32)."""
    scale = (n_feat - 1) / (n_full - 1) if n_full > 1 else 0.0
    return pos_full.float() * scale


def _point_reader(rep_bdhw: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """``read(b_m, p_m)``: the feature vectors ``rep[b, :, p]`` at flat pixel ``p = y·w + x``
    of image ``b``, ``[M, D]``, with a backward that gives the same bits at any CPU thread count.

    Points repeat (bilinear neighbours and grid or random pixels share feature pixels), so the
    backward adds several gradients into one pixel. Advanced indexing ``flat[b_m, :, p_m]`` does
    that with ``index_put_(accumulate=True)``, which on the CPU with two threads adds them in
    an order that changes from run to run (measured: 39 of 40 backward passes of a
    ``[32, 64, 16, 16]`` map at 16,000 points differed in the last bits; so did chapter 8's
    live run). On the CPU the points are therefore read with ``index_select`` from one
    channels-last copy of the map: its backward, ``index_add_``, adds in index order, the same
    bits at one thread as advanced indexing there. Elsewhere advanced indexing on the view
    avoids the copy.
    """
    b, d, h, w = rep_bdhw.shape
    if rep_bdhw.device.type == "cpu":
        rows_pd = rep_bdhw.permute(0, 2, 3, 1).reshape(b * h * w, d)  # copies unless channels-last
        return lambda b_m, p_m: rows_pd.index_select(0, b_m * (h * w) + p_m)
    flat_bdp = rep_bdhw.flatten(2)  # a view: no copy of the whole map
    return lambda b_m, p_m: flat_bdp[b_m, :, p_m]


def _bilinear_points(rep_bdhw: Tensor, b_m: Tensor, sy_m: Tensor, sx_m: Tensor) -> Tensor:
    """Bilinear read of ``rep`` at image ``b`` and source coordinates ``(sy, sx)``, ``[M, D]``."""
    _, _, h, w = rep_bdhw.shape
    read = _point_reader(rep_bdhw)
    y0 = sy_m.floor().long().clamp(0, h - 1)
    x0 = sx_m.floor().long().clamp(0, w - 1)
    y1, x1 = (y0 + 1).clamp_max(h - 1), (x0 + 1).clamp_max(w - 1)
    wy = (sy_m - y0.float()).unsqueeze(1)
    wx = (sx_m - x0.float()).unsqueeze(1)

    def at(y: Tensor, x: Tensor) -> Tensor:
        return read(b_m, y * w + x)  # [M, D]

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


def sample_labeled_grid(rep: Tensor, labels: Tensor, grid_num: int = 32) -> tuple[Tensor, Tensor]:
    """Labeled term's samples: the 33×33 grid of every image (appendix: L_pro "sup_sample: grid").

    Features are read from the stride-4 map at the grid pixels' source coordinates (direct
    indexing when exact, else bilinear; no full-resolution upsampling); targets are the labels
    at the matching full-resolution pixels, 255 kept (to be ignored by the loss).
    Rows and columns are computed from the label height and width respectively (identical to
    the official indices for square crops).

    Returns:
        ``(feats[B·G_h·G_w, D], targets[B·G_h·G_w])`` ordered by image, row, column, from
        ``rep[B, D, h, w]`` and ``labels[B, H, W]``.
    """
    rep_bdhw, labels_bhw = rep, labels
    b, d, h, w = rep_bdhw.shape
    h_full, w_full = labels_bhw.shape[-2:]
    dev = rep_bdhw.device
    rows_full, cols_full = _grid_full(h_full, grid_num, dev), _grid_full(w_full, grid_num, dev)
    targets = labels_bhw.to(dev)[:, rows_full][:, :, cols_full].reshape(-1).long()
    if _grid_is_exact(h, h_full, grid_num) and _grid_is_exact(w, w_full, grid_num):
        r = _to_feature_index(rows_full, h, h_full)
        c = _to_feature_index(cols_full, w, w_full)
        feats = rep_bdhw[:, :, r][:, :, :, c].permute(0, 2, 3, 1).reshape(-1, d)
        return feats, targets
    gy, gx = rows_full.numel(), cols_full.numel()
    b_m = torch.arange(b, device=dev).view(b, 1, 1).expand(b, gy, gx).reshape(-1)
    sy_m = _source_coords(rows_full, h, h_full).view(1, gy, 1).expand(b, gy, gx).reshape(-1)
    sx_m = _source_coords(cols_full, w, w_full).view(1, 1, gx).expand(b, gy, gx).reshape(-1)
    return _bilinear_points(rep_bdhw, b_m, sy_m, sx_m), targets


def sample_unlabeled(
    rep_s: Tensor,
    conf: Tensor,
    pseudo: Tensor,
    thr: float | Tensor,
    num_per_image: int = 1000,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
) -> tuple[Tensor, Tensor]:
    """Unlabeled term's samples (appendix: L_pro "unsup_sample: random"), without a host sync.

    Candidates are the pixels of ``conf`` (full resolution or stride 4) with ``conf ≥ thr``.
    If there are at least ``M = num_per_image·B`` candidates over the whole batch, a uniformly
    random subset of ``M`` is taken, otherwise all of them. Implementation: every pixel draws a
    uniform score, non-candidates get −1, and the top ``M`` scores are kept — a fixed-size
    selection. Positions that are not candidates (only when fewer than ``M`` exist) get the
    target ``ignore_index`` so a fixed-size ``[M]`` tensor flows on. Features are read from the
    student map at the pixels' source coordinates (bilinear, ``align_corners=True``; direct
    indexing when ``conf`` has the map's size).

    Args:
        generator: optional ``torch.Generator`` on ``conf``'s device.

    Returns:
        ``(feats[M, D], targets[M])`` with ``M = min(num_per_image·B, B·H·W)``, from
        ``rep_s[B, D, h, w]``, ``conf[B, H, W]`` and ``pseudo[B, H, W]``.
    """
    rep_s_bdhw, conf_bhw, pseudo_bhw = rep_s, conf, pseudo
    b, _, h, w = rep_s_bdhw.shape
    _, h_full, w_full = conf_bhw.shape
    dev = rep_s_bdhw.device
    n_pix = b * h_full * w_full
    m = min(num_per_image * b, n_pix)
    cand_p = (conf_bhw >= thr).reshape(-1).to(dev)
    score_p = torch.rand(n_pix, generator=generator, device=conf_bhw.device).to(dev)
    score_p = torch.where(cand_p, score_p, torch.full_like(score_p, -1.0))
    top = score_p.topk(m, sorted=False)
    idx_m, chosen_m = top.indices, top.values >= 0
    pseudo_m = pseudo_bhw.to(dev).reshape(-1)[idx_m].long()
    targets = torch.where(chosen_m, pseudo_m, torch.full_like(pseudo_m, ignore_index))
    b_m = idx_m // (h_full * w_full)
    rem_m = idx_m % (h_full * w_full)
    y_m, x_m = rem_m // w_full, rem_m % w_full
    if (h_full, w_full) == (h, w):
        feats = _point_reader(rep_s_bdhw)(b_m, rem_m)
    else:
        sy_m = _source_coords(y_m, h, h_full)
        sx_m = _source_coords(x_m, w, w_full)
        feats = _bilinear_points(rep_s_bdhw, b_m, sy_m, sx_m)
    return feats, targets


def prototype_loss(
    bank: PrototypeBank,
    feats: Tensor,
    targets: Tensor,
    tau: float = 0.1,
) -> Tensor:
    """Mean ``CE(bank.logits(f, τ), y)`` over the usable targets (appendix: L_pro).

    A target is usable if it lies in ``[0, C)`` (255 and other out-of-range values are
    ignored) and its class has at least one valid prototype (only possible when a memory was
    empty at clustering time, where the official code would crash). With no usable target it
    returns 0, still connected to ``feats``, instead of NaN (appendix Q19).
    """
    logits_nc = bank.logits(feats, tau)
    targets_n = targets.to(logits_nc.device).long()
    c = bank.num_classes
    in_range_n = (targets_n >= 0) & (targets_n < c)
    cls_n = torch.where(in_range_n, targets_n, torch.zeros_like(targets_n))
    use_n = in_range_n & bank.valid.any(dim=1)[cls_n]
    ce_n = F.cross_entropy(logits_nc, cls_n, reduction="none")
    w_n = use_n.to(ce_n.dtype)
    return (ce_n * w_n).sum() / w_n.sum().clamp_min(1.0)


def pseudo_threshold(
    step: int,
    steps_per_epoch: int,
    total_epochs: int,
    start: float = 0.8,
    end: float = 0.95,
    delay_epochs: int = 5,
    clamp_low: bool = False,
) -> float:
    """Confidence threshold of the unlabeled L_pro term at global step ``step`` (appendix: timeline,
    Q5).

    ``thr = start + (end − start)·(step − delay·L)/((E − delay)·L)``: ``start`` at epoch
    ``delay`` (hard-coded 5 in the official code), ``end`` at the end of training, and below
    ``start`` before epoch ``delay`` (≈ 0.794 at the start of epoch 2 on VOC) unless
    ``clamp_low``. A plain Python float: no tensor, no sync.
    """
    span = (total_epochs - delay_epochs) * steps_per_epoch
    if span <= 0:
        raise ValueError("total_epochs must exceed delay_epochs")
    thr = start + (end - start) * (step - delay_epochs * steps_per_epoch) / span
    return max(thr, start) if clamp_low else thr
