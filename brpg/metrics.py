"""Segmentation metrics: confusion matrix, IoU and mIoU (appendix: evaluation).

The official ``intersectionAndUnion`` sets predictions at ignore pixels to 255, then takes the
class histograms (over 0..C-1) of the intersection, of the prediction and of the target;
``union = output + target − intersection``. Histograms are summed over the whole validation set
(and all-reduced over ranks), ``IoU_c = I_c / (U_c + 1e-10)`` and mIoU is the plain mean over all
``C`` classes, so a class absent from both prediction and ground truth counts as 0.

:class:`ConfusionMatrix` accumulates the same quantities as a ``C×C`` int64 matrix
(rows: ground truth, columns: prediction) on the device: ``I = diag``, ``output = column sums``,
``target = row sums``. Target values outside ``[0, C)`` that are not ``ignore_index`` are treated
as ignored (the official code would still count the prediction at such pixels in ``output``;
well-formed labels never contain them). Predictions outside ``[0, C)`` are dropped too
(``argmax`` never produces them).

:class:`BoundaryIoU` accumulates Boundary IoU (Cheng et al., CVPR 2021) in the same way: per
class intersection and union counts of the masks' boundary bands, summed over the validation set.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BIOU_DILATION_RATIO",
    "BoundaryIoU",
    "ConfusionMatrix",
    "boundary_width",
    "inner_boundary",
    "intersection_and_union",
]

EPS = 1e-10
BIOU_DILATION_RATIO = 0.02  # Cheng et al., CVPR 2021: d = 2 % of the image diagonal


def intersection_and_union(
    pred_bhw: Tensor, target_bhw: Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[Tensor, Tensor, Tensor]:
    """``(area_intersection, area_union, area_target)``, each int64 ``[C]`` (appendix: evaluation).

    A direct transcription of the official semantics: predictions at ignore pixels become
    ``ignore_index``; values outside ``[0, C)`` fall out of every histogram.
    """
    pred = pred_bhw.reshape(-1).long()
    target = target_bhw.reshape(-1).long()
    pred = torch.where(target == ignore_index, torch.full_like(pred, ignore_index), pred)
    inter = pred[pred == target]

    def hist(x: Tensor) -> Tensor:
        x = x[(x >= 0) & (x < num_classes)]
        return torch.bincount(x, minlength=num_classes)[:num_classes]

    area_inter, area_pred, area_target = hist(inter), hist(pred), hist(target)
    return area_inter, area_pred + area_target - area_inter, area_target


class _IoUCounts:
    """What :class:`ConfusionMatrix` and :class:`BoundaryIoU` share: int64 counts on a device,
    summed over batches and ranks, with IoU = intersection / union per class."""

    _STATE_KEY = "counts"  # the counts' key in state_dict()

    def __init__(self, num_classes: int, ignore_index: int) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)

    @staticmethod
    def _check_shapes(pred_bhw: Tensor, target_bhw: Tensor) -> None:
        if pred_bhw.shape != target_bhw.shape:
            raise ValueError(
                f"pred shape {tuple(pred_bhw.shape)} != target shape {tuple(target_bhw.shape)}"
            )

    @property
    def _counts(self) -> Tensor:
        """The accumulated counts: reset and all-reduced as one tensor."""
        raise NotImplementedError

    def intersection(self) -> Tensor:
        raise NotImplementedError

    def union(self) -> Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        self._counts.zero_()

    def all_reduce(self) -> None:
        """Sum the counts over all ranks when ``torch.distributed`` is initialised."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._counts, op=dist.ReduceOp.SUM)

    def iou(self) -> Tensor:
        """Per-class IoU as a fraction in [0, 1], float64 ``[C]``; absent classes give 0."""
        return self.intersection().double() / (self.union().double() + EPS)

    def miou(self) -> float:
        """Mean IoU over all ``C`` classes, in PERCENT."""
        return float(self.iou().mean()) * 100.0

    def _extra_state(self) -> dict[str, object]:
        """Settings saved beside the counts (besides ``num_classes`` and ``ignore_index``)."""
        return {}

    def state_dict(self) -> dict[str, object]:
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            **self._extra_state(),
            self._STATE_KEY: self._counts.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        counts = state[self._STATE_KEY]
        assert isinstance(counts, Tensor)
        if counts.shape != self._counts.shape:
            raise ValueError(
                f"{self._STATE_KEY} shape {tuple(counts.shape)} does not match"
                f" num_classes={self.num_classes}"
            )
        self._counts.copy_(counts)


class ConfusionMatrix(_IoUCounts):
    """A ``C×C`` int64 confusion matrix accumulated on ``device`` (appendix: evaluation)."""

    _STATE_KEY = "matrix"

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(num_classes, ignore_index)
        self.mat = torch.zeros(
            (self.num_classes, self.num_classes), dtype=torch.int64, device=device
        )

    @torch.no_grad()
    def update(self, pred_bhw: Tensor, target_bhw: Tensor) -> None:
        """Add one batch of predicted and ground-truth label maps (same shape, any batch)."""
        self._check_shapes(pred_bhw, target_bhw)
        c = self.num_classes
        pred = pred_bhw.reshape(-1).to(self.mat.device, torch.int64)
        target = target_bhw.reshape(-1).to(self.mat.device, torch.int64)
        valid = (target >= 0) & (target < c) & (target != self.ignore_index)
        valid &= (pred >= 0) & (pred < c)
        # Invalid pixels go to an extra bin c*c that is dropped: no boolean indexing, no sync.
        idx = torch.where(valid, target * c + pred, torch.full_like(target, c * c))
        self.mat += torch.bincount(idx, minlength=c * c + 1)[: c * c].view(c, c)

    @property
    def _counts(self) -> Tensor:
        return self.mat

    # -- derived quantities -----------------------------------------------------------------
    def intersection(self) -> Tensor:
        return self.mat.diagonal()

    def union(self) -> Tensor:
        return self.mat.sum(0) + self.mat.sum(1) - self.mat.diagonal()

    def pixel_acc(self) -> float:
        """Correct / valid pixels, in PERCENT (0 when nothing was counted)."""
        total = self.mat.sum()
        return float(self.mat.diagonal().sum().double() / total.clamp_min(1).double()) * 100.0


def boundary_width(height: int, width: int, dilation_ratio: float = BIOU_DILATION_RATIO) -> int:
    """Boundary band width ``d`` in pixels: ``round(dilation_ratio · diagonal)``, at least 1.

    Cheng et al., "Boundary IoU", CVPR 2021 (d = 2 % of the image diagonal). ``round`` is
    Python's (half to even), as the paper's reference code; e.g. 100×100 → 2.83 → 3, 10×10 → 1.
    """
    return max(1, round(dilation_ratio * math.sqrt(height * height + width * width)))


def _window_any(x_bool: Tensor, k: int, dim: int) -> Tensor:
    """OR over every ``k`` consecutive entries along ``dim`` (a stride-1 max-pool of a bool
    tensor, without padding: the size along ``dim`` shrinks by ``k − 1``).

    Doubling: after step ``j`` entry ``i`` holds the OR of ``[i, i + 2^j)``; two overlapping
    windows of ``s = 2^j ≤ k`` then cover ``[i, i + k)``. ``⌊log2 k⌋ + 1`` ORs of shifted views
    instead of ``k`` comparisons per entry (``F.max_pool2d`` is ~20× slower on CPU here).
    """
    s = 1
    while 2 * s <= k:
        n = x_bool.shape[dim] - s
        x_bool = x_bool.narrow(dim, 0, n) | x_bool.narrow(dim, s, n)  # window s → 2s
        s *= 2
    if s < k:
        n = x_bool.shape[dim] - (k - s)
        x_bool = x_bool.narrow(dim, 0, n) | x_bool.narrow(dim, k - s, n)  # [i, i+s) ∪ [i+k-s, i+k)
    return x_bool


def inner_boundary(mask_bchw: Tensor, d: int) -> Tensor:
    """Pixels of ``mask_bchw`` (bool) within chessboard distance ``d`` of the mask's contour.

    ``mask AND NOT erode(mask)``, where the erosion uses a ``(2d+1)×(2d+1)`` square (the same as
    ``d`` iterations of a 3×3 erosion) and pixels outside the image count as background, so the
    image border is a contour. Computed as a max-pool (= OR, on bools) over the square of the
    complement padded with ``d`` ones (= the mask padded with zeros), one row and one column
    pass (max is separable).
    """
    if d < 1:
        raise ValueError(f"boundary width must be >= 1, got {d}")
    k = 2 * d + 1
    background = F.pad(~mask_bchw, (d, d, d, d), value=True)  # outside the image = background
    near_bg = _window_any(background, k, -1)  # rows: [.., H + 2d, W]
    near_bg = _window_any(near_bg, k, -2)  # columns: [.., H, W]
    return mask_bchw & near_bg


class BoundaryIoU(_IoUCounts):
    """Boundary IoU per class, accumulated over a validation set on ``device``.

    Cheng, Girshick, Dollár, Berg, Kirillov, "Boundary IoU: Improving Object-Centric Image
    Segmentation Evaluation", CVPR 2021 (the section defining Boundary IoU), applied per class
    of a semantic segmentation: for class ``c`` with ground-truth mask ``G`` and predicted mask
    ``P`` of one image,

    * ``G_d`` = pixels of ``G`` within distance ``d`` of ``G``'s own contour (inside ``G``),
      ``P_d`` likewise for ``P``; distance is chessboard (a ``(2d+1)×(2d+1)`` square erosion,
      = ``d`` iterations of a 3×3 one), and pixels outside the image count as background, so
      the image border is a contour;
    * ``d = max(1, round(dilation_ratio · sqrt(H² + W²)))`` with ``dilation_ratio = 0.02``,
      from each batch's own ``H×W`` (:func:`boundary_width`);
    * ``BIoU_c = Σ|G_d ∩ P_d| / Σ|G_d ∪ P_d|``, the counts summed over all images (and ranks)
      before dividing, like mIoU; mBIoU is the plain mean over all ``C`` classes, a class absent
      from both counting 0 (the :class:`ConfusionMatrix` convention).

    Ignored pixels (target ``ignore_index`` or outside ``[0, C)``) belong to no class's mask in
    the ground truth *nor in the prediction* (the prediction there is set to ignore, as the
    official ``intersectionAndUnion`` does), so both masks' contours run along ignored regions
    and the ignored pixels themselves are never counted. The result therefore depends on the
    prediction at valid pixels only: a prediction equal to the ground truth there scores 100 %.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        device: torch.device | str | None = None,
        dilation_ratio: float = BIOU_DILATION_RATIO,
    ) -> None:
        super().__init__(num_classes, ignore_index)
        self.dilation_ratio = float(dilation_ratio)
        self.counts = torch.zeros((2, self.num_classes), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred_bhw: Tensor, target_bhw: Tensor) -> None:
        """Add one batch of predicted and ground-truth label maps ``[B, H, W]`` (same shape)."""
        self._check_shapes(pred_bhw, target_bhw)
        c = self.num_classes
        h, w = pred_bhw.shape[-2:]
        pred = pred_bhw.reshape(-1, h, w).to(self.counts.device, torch.int64)
        target = target_bhw.reshape(-1, h, w).to(self.counts.device, torch.int64)
        valid_bhw = (target >= 0) & (target < c) & (target != self.ignore_index)
        # Ignored pixels and out-of-range labels get class c, whose one-hot channel is dropped.
        target = torch.where(valid_bhw, target, c)
        pred = torch.where(valid_bhw & (pred >= 0) & (pred < c), pred, c)
        classes = torch.arange(c, device=pred.device).view(1, c, 1, 1)
        # G and P stacked: [2B, C, H, W] bool, one max-pool pass for both
        masks = torch.cat([target, pred]).unsqueeze(1) == classes
        bands = inner_boundary(masks, boundary_width(h, w, self.dilation_ratio))
        gt_bchw, pred_bchw = bands.chunk(2)
        # both bands are empty at ignored pixels, so they are never counted
        self.counts[0] += (gt_bchw & pred_bchw).sum((0, 2, 3))
        self.counts[1] += (gt_bchw | pred_bchw).sum((0, 2, 3))

    @property
    def _counts(self) -> Tensor:
        return self.counts

    def _extra_state(self) -> dict[str, object]:
        return {"dilation_ratio": self.dilation_ratio}

    def intersection(self) -> Tensor:
        """``Σ |G_d ∩ P_d|`` per class, int64 ``[C]``."""
        return self.counts[0]

    def union(self) -> Tensor:
        """``Σ |G_d ∪ P_d|`` per class, int64 ``[C]``."""
        return self.counts[1]
