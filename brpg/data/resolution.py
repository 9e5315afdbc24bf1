"""What a stride-``s`` prediction can resolve of a label map at best (DigitScenes v3, issue 13).

DeepLabV3+ predicts logits on the stride-4 grid and upsamples them bilinearly
(``align_corners=True``, appendix: evaluation) to the image. Even a perfect stride-4 predictor is
then limited by the grid: a 64-px scene is a 16 × 16 map. :func:`stride_ceiling` measures that limit
on ground truth alone: it area-averages the one-hot ground truth onto the model's stride-``s`` grid
(the best a cell can say is the share of each class inside it), upsamples these soft "logits" back
the way the model's are, takes the argmax and scores it against the ground truth with the same mIoU
and Boundary IoU as every evaluation. What it cannot reach no model of that stride reaches either,
so it tells how much room the boundary metric has at a scene size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from brpg.metrics import BoundaryIoU, ConfusionMatrix

__all__ = ["stride_ceiling", "stride_oracle"]


def stride_oracle(
    target_bhw: Tensor, num_classes: int, stride: int = 4, ignore_index: int = 255
) -> Tensor:
    """The best stride-``stride`` prediction of ``target_bhw`` ``[B, H, W]``, as labels.

    Class shares per cell of the ``ceil(H/s) × ceil(W/s)`` grid (ignored pixels excluded;
    a cell the image edge cuts is averaged over what lies inside), upsampled bilinearly with
    ``align_corners=True`` and argmaxed: ``[B, H, W]`` int64.
    """
    b, h, w = target_bhw.shape
    valid = (target_bhw >= 0) & (target_bhw < num_classes) & (target_bhw != ignore_index)
    labels = torch.where(valid, target_bhw, num_classes).long()
    onehot = F.one_hot(labels, num_classes + 1)[..., :num_classes]  # [B,H,W,C]
    onehot = onehot.permute(0, 3, 1, 2).float()  # [B,C,H,W]
    gh, gw = math.ceil(h / stride), math.ceil(w / stride)
    pad = (0, gw * stride - w, 0, gh * stride - h)
    share = F.avg_pool2d(F.pad(onehot, pad), stride)  # [B,C,gh,gw]
    inside = F.avg_pool2d(F.pad(torch.ones_like(onehot[:, :1]), pad), stride)  # [B,1,gh,gw]
    share = share / inside.clamp_min(1e-6)
    up = F.interpolate(share, size=(h, w), mode="bilinear", align_corners=True)
    return up.argmax(1)


def stride_ceiling(
    target_bhw: Tensor, num_classes: int, stride: int = 4, ignore_index: int = 255
) -> dict[str, float]:
    """``{"miou", "mbiou"}`` (percent) of :func:`stride_oracle` against the ground truth."""
    pred = stride_oracle(target_bhw, num_classes, stride, ignore_index)
    cm = ConfusionMatrix(num_classes, ignore_index)
    biou = BoundaryIoU(num_classes, ignore_index)
    cm.update(pred, target_bhw)
    biou.update(pred, target_bhw)
    return {"miou": cm.miou(), "mbiou": biou.miou()}
