"""Inference protocols and the evaluation loop (appendix: evaluation).

* ``center_crop``: the eval transform has already centre-cropped image and mask (in-training
  validation, appendix: data, evaluation); inference is a plain forward, i.e. the same as ``full``.
* ``full``: one forward on the whole image at its own resolution.
* ``sliding``: the image is zero-padded to at least ``crop_size`` on each side, square windows
  of ``crop_size`` are taken every ``stride`` pixels (the last window of a row/column is moved
  back to end at the border), each window's logits are upsampled to the window size, and the
  window **logits** (not probabilities) are summed and divided by the number of windows that
  covered each pixel; the result is cropped back to ``H×W`` (Cityscapes eval.py, appendix:
  evaluation). Where the padding goes is not fixed by the spec; we centre it (``pad//2`` before, the
  rest after). Windows of the whole batch are stacked and run ``window_batch`` crops at a time.

Every protocol also accumulates Boundary IoU (Cheng et al., CVPR 2021) from the same argmax
(:class:`brpg.metrics.BoundaryIoU`), at the mask's resolution.

In every protocol the model's logits (stride 4 for DeepLabV3+) are upsampled bilinearly with
``align_corners=True`` (appendix: evaluation); the model must return a dict with key ``"logits"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from brpg.metrics import BIOU_DILATION_RATIO, BoundaryIoU, ConfusionMatrix
from brpg.models.logits import upsample_logits

__all__ = [
    "PROTOCOLS",
    "evaluate",
    "predict_logits",
    "window_starts",
]

PROTOCOLS = ("full", "center_crop", "sliding")


def _forward(model: nn.Module, image_b3hw: Tensor) -> Tensor:
    """The model's logits upsampled to the input size, as float32."""
    out = model(image_b3hw)
    if not isinstance(out, Mapping) or "logits" not in out:
        raise TypeError("the model must return a dict with key 'logits'")
    return upsample_logits(out["logits"].float(), tuple(image_b3hw.shape[-2:]))


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of sliding windows along one axis of (padded) ``length ≥ crop``.

    ``ceil((length − crop) / stride) + 1`` windows at ``0, stride, 2·stride, …``; the last one
    is shifted back so that it ends exactly at ``length``.
    """
    if length < crop:
        raise ValueError(f"length {length} < crop {crop}: pad the image first")
    n = -(-(length - crop) // stride) + 1
    return [min(i * stride, length - crop) for i in range(n)]


def _sliding_logits(
    model: nn.Module, image_b3hw: Tensor, crop_size: int, stride: int, window_batch: int
) -> Tensor:
    b, _, h, w = image_b3hw.shape
    pad_h, pad_w = max(crop_size - h, 0), max(crop_size - w, 0)
    top, left = pad_h // 2, pad_w // 2
    padded = F.pad(image_b3hw, (left, pad_w - left, top, pad_h - top), value=0.0)
    hp, wp = padded.shape[-2:]
    windows = [
        (y, x)
        for y in window_starts(hp, crop_size, stride)
        for x in window_starts(wp, crop_size, stride)
    ]

    count_hw = torch.zeros((hp, wp), dtype=torch.float32, device=image_b3hw.device)
    for y, x in windows:
        count_hw[y : y + crop_size, x : x + crop_size] += 1
    sum_bchw: Tensor | None = None
    per_forward = max(1, window_batch // b)  # windows per forward; each window holds b crops
    for i in range(0, len(windows), per_forward):
        chunk = windows[i : i + per_forward]
        crops = torch.cat([padded[:, :, y : y + crop_size, x : x + crop_size] for y, x in chunk])
        logits = _forward(model, crops)  # [len(chunk)*b, C, crop, crop]
        if sum_bchw is None:
            sum_bchw = logits.new_zeros((b, logits.shape[1], hp, wp))
        for j, (y, x) in enumerate(chunk):
            sum_bchw[:, :, y : y + crop_size, x : x + crop_size] += logits[j * b : (j + 1) * b]
    assert sum_bchw is not None
    mean_bchw = sum_bchw / count_hw
    return mean_bchw[:, :, top : top + h, left : left + w]


def predict_logits(
    model: nn.Module,
    image_b3hw: Tensor,
    protocol: str = "full",
    crop_size: int = 513,
    stride: int = 513,
    num_classes: int | None = None,
    window_batch: int = 8,
) -> Tensor:
    """Float32 logits ``[B, C, H, W]`` at the input resolution under ``protocol`` (appendix:
    evaluation).

    Args:
        model: returns ``{"logits": [N, C, h, w], ...}`` for an ``[N, 3, H', W']`` input; it is
            used as is (call ``model.eval()`` and ``torch.inference_mode()`` yourself, or use
            :func:`evaluate`).
        protocol: ``"full"``, ``"center_crop"`` (same as full here) or ``"sliding"``.
        crop_size, stride: sliding-window size and step (ignored by the other protocols).
        num_classes: if given, the number of logit channels is checked against it.
        window_batch: sliding only: at most this many crops per forward pass (at least one
            window of the whole batch).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown eval protocol '{protocol}'; valid: {', '.join(PROTOCOLS)}")
    if image_b3hw.dim() != 4:
        raise ValueError(f"expected an image batch [B,3,H,W], got shape {tuple(image_b3hw.shape)}")
    if protocol == "sliding":
        if crop_size <= 0 or stride <= 0:
            raise ValueError(
                f"sliding needs crop_size > 0 and stride > 0, got {crop_size}, {stride}"
            )
        logits_bchw = _sliding_logits(model, image_b3hw, crop_size, stride, window_batch)
    else:
        logits_bchw = _forward(model, image_b3hw)
    if num_classes is not None and logits_bchw.shape[1] != num_classes:
        raise ValueError(f"model returned {logits_bchw.shape[1]} classes, expected {num_classes}")
    return logits_bchw


def _pairs(batch: Mapping[str, Any]) -> Iterable[tuple[Tensor, Tensor]]:
    """(image [B,3,H,W], mask [B,H,W]) pairs of a batch; lists of variable-size images allowed."""
    image, mask = batch["image"], batch["mask"]
    if isinstance(image, (list, tuple)):
        for im, m in zip(image, mask, strict=True):
            yield im.unsqueeze(0), m.reshape(1, *m.shape[-2:])
        return
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    yield image, mask


def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    num_classes: int,
    protocol: str = "full",
    crop_size: int = 513,
    stride: int = 513,
    device: torch.device | str | None = None,
    ignore_index: int = 255,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    window_batch: int = 8,
) -> dict[str, Any]:
    """mIoU and Boundary IoU of ``model`` over ``loader`` (appendix: evaluation; Cheng et al., CVPR
    2021).

    ``loader`` yields dicts with ``"image"`` ``[B,3,H,W]`` and ``"mask"`` ``[B,H,W]`` (or lists
    of per-image tensors for variable sizes; batch size 1 with variable sizes works as is).
    Logits are upsampled to the mask size if they differ (align_corners=True), argmaxed and
    accumulated in a :class:`ConfusionMatrix` and a :class:`BoundaryIoU` (boundary band
    ``d = 2 %`` of each image's diagonal), both all-reduced over ranks at the end.
    The model is put in eval mode and its previous mode restored afterwards.

    Returns:
        ``{"miou": %, "per_class_iou": [%] * C, "pixel_acc": %, "mbiou": %,
        "per_class_biou": [%] * C, "biou_dilation_ratio": 0.02}`` (plain Python floats).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown eval protocol '{protocol}'; valid: {', '.join(PROTOCOLS)}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    cm = ConfusionMatrix(num_classes, ignore_index, device)
    biou = BoundaryIoU(num_classes, ignore_index, device, BIOU_DILATION_RATIO)

    def autocast() -> contextlib.AbstractContextManager:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True):
                for image_b3hw, mask_bhw in _pairs(batch):
                    image_b3hw = image_b3hw.to(device, non_blocking=True)
                    mask_bhw = mask_bhw.to(device, non_blocking=True)
                    with autocast():
                        logits_bchw = predict_logits(
                            model,
                            image_b3hw,
                            protocol,
                            crop_size,
                            stride,
                            num_classes,
                            window_batch,
                        )
                    logits_bchw = upsample_logits(logits_bchw.float(), tuple(mask_bhw.shape[-2:]))
                    pred_bhw = logits_bchw.argmax(1)
                    cm.update(pred_bhw, mask_bhw)
                    biou.update(pred_bhw, mask_bhw)
    finally:
        model.train(was_training)
    cm.all_reduce()
    biou.all_reduce()
    iou_pct = cm.iou() * 100.0
    biou_pct = biou.iou() * 100.0
    return {
        "miou": float(iou_pct.mean()),
        "per_class_iou": [float(v) for v in iou_pct.tolist()],
        "pixel_acc": cm.pixel_acc(),
        "mbiou": float(biou_pct.mean()),
        "per_class_biou": [float(v) for v in biou_pct.tolist()],
        "biou_dilation_ratio": biou.dilation_ratio,
    }
