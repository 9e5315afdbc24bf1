"""Joint image/mask transforms built on ``torchvision.transforms.v2`` (appendix: data).

A :class:`SegTransform` runs three named stages on a ``tv_tensors.Image`` / ``tv_tensors.Mask``
pair, in this order:

1. ``to_float``: uint8 -> float32 in [0, 1] (the mask is untouched);
2. ``geometric``: random scale, random crop with padding, optional horizontal flip;
3. ``photometric``: colour changes of the image only (empty for labeled data; the strong
   view of unlabeled images will plug ColorJitter / grayscale / blur in here, appendix: data);
4. ``normalize``: ``(x - mean) / std``.

Geometry runs on the [0, 1] image *before* normalisation, but pads it with the mean colour,
so a padded pixel is exactly 0 after normalisation, as in the official pipeline (which
normalises first and pads with 0, appendix: data). The mask is padded with ``pad_label``:
255 (ignored) by default; the official code pads with 0 (appendix Q6), reproducible with
``data.pad_label=0``. Resizing is bilinear for the image (``align_corners=False``, no
antialias, as ``F.interpolate`` in the official code) and nearest for the mask; v2 picks the
kernel from the tensor type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from brpg.config import DataConfig


def _size_hw(flat_inputs: list[Any]) -> tuple[int, int]:
    for inpt in flat_inputs:
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return int(inpt.shape[-2]), int(inpt.shape[-1])
    raise TypeError("expected a tv_tensors.Image or tv_tensors.Mask among the inputs")


class RandomScale(v2.Transform):
    """Resize by a random factor ``s`` keeping the aspect ratio (appendix: data).

    ``mode="u2pl"`` (the official sampling) draws ``s ~ U(lo, 1)`` or ``s ~ U(1, hi)`` with
    probability 1/2 each when ``lo < 1 < hi``, so shrinking and growing are equally likely;
    ``mode="uniform"`` draws ``s ~ U(lo, hi)``. Random numbers come from torch's global RNG.
    """

    def __init__(
        self, scale_range: Sequence[float], mode: str = "u2pl", antialias: bool = False
    ) -> None:
        super().__init__()
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
        if mode not in ("u2pl", "uniform"):
            raise ValueError(f"mode must be 'u2pl' or 'uniform', got {mode!r}")
        self.lo, self.hi, self.mode, self.antialias = lo, hi, mode, antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lo, hi = self.lo, self.hi
        u = torch.rand(2).tolist()
        if self.mode == "u2pl" and lo < 1.0 < hi:
            lo, hi = (lo, 1.0) if u[0] < 0.5 else (1.0, hi)
        scale = lo + (hi - lo) * u[1]
        h, w = _size_hw(flat_inputs)
        return {"size": [max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, params["size"], antialias=self.antialias)


def _pad_amounts(h: int, w: int, size: tuple[int, int]) -> list[int]:
    """Symmetric padding ``[left, top, right, bottom]`` that makes ``h x w`` at least ``size``."""
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    return [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2]


class _PadCrop(v2.Transform):
    """Pad symmetrically up to ``size`` (image: ``image_fill``, mask: ``pad_label``), then crop."""

    def __init__(
        self, size: int | Sequence[int], image_fill: Sequence[float], pad_label: int
    ) -> None:
        super().__init__()
        self.size = (int(size), int(size)) if isinstance(size, int) else tuple(map(int, size))
        self.image_fill = [float(v) for v in image_fill]
        self.pad_label = int(pad_label)

    def _offset(self, free_h: int, free_w: int) -> tuple[int, int]:
        raise NotImplementedError

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = _size_hw(flat_inputs)
        padding = _pad_amounts(h, w, self.size)
        top, left = self._offset(
            h + padding[1] + padding[3] - self.size[0], w + padding[0] + padding[2] - self.size[1]
        )
        return {"padding": padding, "top": top, "left": left}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if any(params["padding"]):
            fill = self.pad_label if isinstance(inpt, tv_tensors.Mask) else self.image_fill
            inpt = self._call_kernel(TF.pad, inpt, padding=params["padding"], fill=fill)
        return self._call_kernel(
            TF.crop, inpt, params["top"], params["left"], self.size[0], self.size[1]
        )


class RandomCropPad(_PadCrop):
    """Random ``size`` crop; smaller inputs are first padded symmetrically (appendix: data)."""

    def _offset(self, free_h: int, free_w: int) -> tuple[int, int]:
        top = int(torch.randint(0, free_h + 1, ())) if free_h > 0 else 0
        left = int(torch.randint(0, free_w + 1, ())) if free_w > 0 else 0
        return top, left


class CenterCropPad(_PadCrop):
    """Center ``size`` crop with symmetric padding (the validation crop of the appendix (data))."""

    def _offset(self, free_h: int, free_w: int) -> tuple[int, int]:
        return free_h // 2, free_w // 2


class SegTransform:
    """``to_float -> geometric -> photometric -> normalize`` on an image (and mask).

    Call as ``image, mask = t(image, mask)`` or ``image = t(image)``; inputs are a
    ``tv_tensors.Image`` uint8 ``[3,H,W]`` and a ``tv_tensors.Mask`` ``[H,W]`` of integers
    (its dtype is kept; uint8 is fastest, :class:`SplitListDataset` returns int64 at the end).
    The stages are public so a two-view (weak/strong) pipeline can share the geometry.
    """

    def __init__(
        self,
        geometric: Sequence[v2.Transform] = (),
        photometric: Sequence[v2.Transform] = (),
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        self.to_float = v2.ToDtype(torch.float32, scale=True)  # images only; masks untouched
        self.geometric = v2.Compose(list(geometric)) if geometric else v2.Identity()
        self.photometric = v2.Compose(list(photometric)) if photometric else v2.Identity()
        self.normalize = v2.Normalize(list(mean), list(std))

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> Any:
        if not isinstance(image, tv_tensors.Image):
            image = tv_tensors.Image(image)
        image = self.to_float(image)
        if mask is None:
            return self.normalize(self.photometric(self.geometric(image)))
        if not isinstance(mask, tv_tensors.Mask):
            mask = tv_tensors.Mask(mask)
        image, mask = self.geometric(image, mask)
        image = self.normalize(self.photometric(image))
        return image, mask

    def __repr__(self) -> str:
        return (
            f"SegTransform(geometric={self.geometric}, photometric={self.photometric}, "
            f"normalize={self.normalize})"
        )


def build_train_transform(
    cfg: DataConfig, photometric: Sequence[v2.Transform] = (), scale_mode: str = "u2pl"
) -> SegTransform:
    """Labeled-image augmentation (appendix: data): scale, crop with pad, optional flip, normalise."""
    geometric: list[v2.Transform] = [
        RandomScale(cfg.scale_range, mode=scale_mode),
        RandomCropPad(cfg.crop_size, image_fill=cfg.mean, pad_label=cfg.pad_label),
    ]
    if cfg.hflip:  # off for digits: a mirrored 2 is not a 2
        geometric.append(v2.RandomHorizontalFlip(p=0.5))
    return SegTransform(geometric, photometric, cfg.mean, cfg.std)


def build_eval_transform(cfg: DataConfig, crop_size: int | None = None) -> SegTransform:
    """Validation transform: normalise only, or a padded center crop if ``crop_size`` is set
    (the official in-training validation crop, appendix: data)."""
    geometric = (
        [CenterCropPad(crop_size, image_fill=cfg.mean, pad_label=cfg.pad_label)]
        if crop_size
        else []
    )
    return SegTransform(geometric, (), cfg.mean, cfg.std)
