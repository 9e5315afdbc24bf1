"""Resizing a model's logits to a mask's size: how the stride-4 output of every model here is
compared with full-resolution labels, in training and in evaluation (appendix: evaluation).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def upsample_logits(logits_bchw: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with ``align_corners=True`` (appendix: evaluation); a no-op at the same size."""
    if tuple(logits_bchw.shape[-2:]) == tuple(size):
        return logits_bchw
    return F.interpolate(logits_bchw, size=tuple(size), mode="bilinear", align_corners=True)
