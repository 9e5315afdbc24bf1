"""Segmentation metrics: confusion matrix, IoU and mIoU (spec §10).

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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ConfusionMatrix", "intersection_and_union"]

EPS = 1e-10


def intersection_and_union(
    pred_bhw: Tensor, target_bhw: Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[Tensor, Tensor, Tensor]:
    """``(area_intersection, area_union, area_target)``, each int64 ``[C]`` (spec §10).

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


class ConfusionMatrix:
    """A ``C×C`` int64 confusion matrix accumulated on ``device`` (spec §10)."""

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat = torch.zeros(
            (self.num_classes, self.num_classes), dtype=torch.int64, device=device
        )

    @torch.no_grad()
    def update(self, pred_bhw: Tensor, target_bhw: Tensor) -> None:
        """Add one batch of predicted and ground-truth label maps (same shape, any batch)."""
        if pred_bhw.shape != target_bhw.shape:
            raise ValueError(
                f"pred shape {tuple(pred_bhw.shape)} != target shape {tuple(target_bhw.shape)}"
            )
        c = self.num_classes
        pred = pred_bhw.reshape(-1).to(self.mat.device, torch.int64)
        target = target_bhw.reshape(-1).to(self.mat.device, torch.int64)
        valid = (target >= 0) & (target < c) & (target != self.ignore_index)
        valid &= (pred >= 0) & (pred < c)
        # Invalid pixels go to an extra bin c*c that is dropped: no boolean indexing, no sync.
        idx = torch.where(valid, target * c + pred, torch.full_like(target, c * c))
        self.mat += torch.bincount(idx, minlength=c * c + 1)[: c * c].view(c, c)

    def reset(self) -> None:
        self.mat.zero_()

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks when ``torch.distributed`` is initialised."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    # -- derived quantities -----------------------------------------------------------------
    def intersection(self) -> Tensor:
        return self.mat.diagonal()

    def union(self) -> Tensor:
        return self.mat.sum(0) + self.mat.sum(1) - self.mat.diagonal()

    def iou(self) -> Tensor:
        """Per-class IoU as a fraction in [0, 1], float64 ``[C]``; absent classes give 0."""
        return self.intersection().double() / (self.union().double() + EPS)

    def miou(self) -> float:
        """Mean IoU over all ``C`` classes, in PERCENT."""
        return float(self.iou().mean()) * 100.0

    def pixel_acc(self) -> float:
        """Correct / valid pixels, in PERCENT (0 when nothing was counted)."""
        total = self.mat.sum()
        return float(self.mat.diagonal().sum().double() / total.clamp_min(1).double()) * 100.0

    def state_dict(self) -> dict[str, object]:
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "matrix": self.mat.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        mat = state["matrix"]
        assert isinstance(mat, Tensor)
        if tuple(mat.shape) != (self.num_classes, self.num_classes):
            raise ValueError(
                f"matrix shape {tuple(mat.shape)} does not match num_classes={self.num_classes}"
            )
        self.mat.copy_(mat)
