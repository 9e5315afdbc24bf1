"""Batched strong augmentation and CutMix of the unlabeled images (appendix: data, one step).

Strong view (:class:`StrongAug`, appendix: data), applied in this order to each image with its own
random parameters:

1. ColorJitter(brightness 0.5, contrast 0.5, saturation 0.5, hue 0.25) with p = 0.8 — the four
   adjustments in a random order per image, factors ``U(0.5, 1.5)`` and hue ``U(−0.25, 0.25)``
   (torchvision's ColorJitter semantics);
2. RandomGrayscale with p = 0.2 (3-channel luma);
3. Gaussian blur with ``σ ~ U(0.1, 2.0)`` with p = 0.5.

It works on float images in [0, 1], ``[B, 3, H, W]``. Given ``mean``/``std`` it accepts
*normalised* images instead: they are mapped back to [0, 1], augmented and normalised again.
The random parameters are drawn on the CPU (a CPU ``torch.Generator`` makes the result
deterministic), so the images may live on the GPU without any device→host sync. The kernels
are ``torchvision.transforms.v2.functional``; the loop is over the B images of a batch, never
over pixels.

Deviations from the official PIL pipeline: the image stays float between the steps (PIL rounds
to uint8 after each one), and the blur is torchvision's separable Gaussian with kernel size
``2⌈3σ⌉ + 1`` and reflect padding instead of PIL's box-blur approximation. Both change pixel
values by a few grey levels at most.

CutMix (appendix: one step): one coin with p = 0.5 for the whole batch; if heads, image ``i`` takes
the pixels of image ``(i + 1) mod B`` inside its own box of about half the image area
(:func:`cutmix_boxes`), and so do the pseudo-labels and confidences (:func:`apply_cutmix`).
:func:`maybe_cutmix` keeps the coin as a 0-dim tensor and blends with ``torch.where``: no
data-dependent Python branch, no host sync.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "StrongAug",
    "StrongAugParams",
    "apply_cutmix",
    "cutmix_boxes",
    "maybe_cutmix",
]


def _rand(shape: Sequence[int], generator: torch.Generator | None) -> Tensor:
    """Uniform [0, 1) numbers on the generator's device (the CPU without a generator)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(tuple(shape), generator=generator, device=device)


# --------------------------------------------------------------------------- strong view
class StrongAugParams(NamedTuple):
    """Per-image random parameters of :class:`StrongAug` (CPU tensors, first dim B)."""

    jitter: Tensor  # [B] bool: apply ColorJitter
    order: Tensor  # [B, 4] long: permutation of (brightness, contrast, saturation, hue)
    factors: Tensor  # [B, 4] float: brightness, contrast, saturation, hue factors
    gray: Tensor  # [B] bool: convert to grayscale
    blur: Tensor  # [B] bool: blur
    sigma: Tensor  # [B] float: blur σ


class StrongAug:
    """The strong colour augmentation of the appendix (data) on a batch ``[B, 3, H, W]``.

    Args:
        brightness, contrast, saturation: jitter strengths ``s`` (factor ``U(1 − s, 1 + s)``).
        hue: hue shift bound ``h`` (shift ``U(−h, h)``, ``h ≤ 0.5``).
        p_jitter, p_gray, p_blur: probabilities of the three steps.
        sigma: the blur's ``σ`` range.
        mean, std: if given, inputs (and outputs) are normalised with them; otherwise inputs
            are [0, 1] images and outputs stay in [0, 1].
    """

    def __init__(
        self,
        brightness: float = 0.5,
        contrast: float = 0.5,
        saturation: float = 0.5,
        hue: float = 0.25,
        p_jitter: float = 0.8,
        p_gray: float = 0.2,
        p_blur: float = 0.5,
        sigma: tuple[float, float] = (0.1, 2.0),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5], got {hue}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.brightness, self.contrast, self.saturation, self.hue = (
            float(brightness),
            float(contrast),
            float(saturation),
            float(hue),
        )
        self.p_jitter, self.p_gray, self.p_blur = float(p_jitter), float(p_gray), float(p_blur)
        self.sigma = (float(sigma[0]), float(sigma[1]))
        self.mean = None if mean is None else [float(m) for m in mean]
        self.std = None if std is None else [float(s) for s in std]

    def sample_params(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> StrongAugParams:
        """Draw every random parameter of a batch at once, on the CPU."""
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("StrongAug draws its parameters on the CPU: pass a CPU generator")
        u = _rand((batch_size, 8), generator)
        order = _rand((batch_size, 4), generator).argsort(dim=1)
        lo = torch.tensor([1 - self.brightness, 1 - self.contrast, 1 - self.saturation, -self.hue])
        hi = torch.tensor([1 + self.brightness, 1 + self.contrast, 1 + self.saturation, self.hue])
        lo[:3] = lo[:3].clamp_min(0.0)
        factors = lo + (hi - lo) * u[:, 1:5]
        s0, s1 = self.sigma
        return StrongAugParams(
            jitter=u[:, 0] < self.p_jitter,
            order=order,
            factors=factors,
            gray=u[:, 5] < self.p_gray,
            blur=u[:, 6] < self.p_blur,
            sigma=s0 + (s1 - s0) * u[:, 7],
        )

    def apply(self, x_bchw: Tensor, params: StrongAugParams) -> Tensor:
        """Augment ``x_bchw`` with given parameters (see :meth:`sample_params`)."""
        if x_bchw.ndim != 4 or x_bchw.shape[1] != 3:
            raise ValueError(f"expected [B, 3, H, W] images, got {tuple(x_bchw.shape)}")
        dtype = x_bchw.dtype
        x = x_bchw.float()
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
            x = x * std + mean
        h, w = x.shape[-2:]
        max_kernel = max(1, 2 * ((min(h, w) - 1) // 2) + 1)  # odd, reflect padding < size
        jitter, gray, blur = params.jitter.tolist(), params.gray.tolist(), params.blur.tolist()
        order, factors, sigma = (
            params.order.tolist(),
            params.factors.tolist(),
            params.sigma.tolist(),
        )
        out = []
        for b in range(x.shape[0]):
            img = x[b]
            if jitter[b]:
                for op in order[b]:
                    img = _JITTER_OPS[op](img, factors[b][op])
            if gray[b]:
                img = TF.rgb_to_grayscale(img, num_output_channels=3)
            if blur[b]:
                k = min(2 * math.ceil(3 * sigma[b]) + 1, max_kernel)
                img = TF.gaussian_blur(img, [k, k], [sigma[b], sigma[b]])
            out.append(img)
        y = torch.stack(out)
        if self.mean is not None:
            y = (y - mean) / std
        return y.to(dtype)

    def __call__(self, x_bchw: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.apply(x_bchw, self.sample_params(x_bchw.shape[0], generator))


_JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


# --------------------------------------------------------------------------- CutMix
def cutmix_boxes(
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """One CutMix box per image as a mask ``BoolTensor[B, H, W]`` (True inside; appendix: one step).

    Width ``w_b`` is a uniform integer in ``[⌊W/2⌋ + 1, W − 1]`` (numpy ``randint(W/2 + 1, W)``),
    height ``h_b = round(H·W/2 / w_b)`` (area ≈ 50 %), and the box lies entirely inside the
    image at a uniformly random position. Randoms come from ``generator`` (on its device).
    """
    w_lo = width // 2 + 1
    w_hi = max(width - 1, w_lo)  # inclusive; only degenerate for width ≤ 2
    u = _rand((batch_size, 3), generator).double()  # float64: h_b rounds like Python
    w_b = (w_lo + (u[:, 0] * (w_hi - w_lo + 1)).floor()).clamp(max=w_hi).clamp(max=width)
    h_b = torch.round(height * width / 2 / w_b).clamp(1, height)
    x0 = (u[:, 1] * (width - w_b + 1)).floor().clamp(max=width - w_b)
    y0 = (u[:, 2] * (height - h_b + 1)).floor().clamp(max=height - h_b)
    boxes = torch.stack([x0, y0, w_b, h_b], dim=1).long()
    if device is not None:
        boxes = boxes.to(device, non_blocking=True)
    cols = torch.arange(width, device=boxes.device)
    rows = torch.arange(height, device=boxes.device)
    x0, y0, w_b, h_b = boxes.unbind(1)
    in_x = (cols[None] >= x0[:, None]) & (cols[None] < (x0 + w_b)[:, None])  # [B, W]
    in_y = (rows[None] >= y0[:, None]) & (rows[None] < (y0 + h_b)[:, None])  # [B, H]
    return in_y[:, :, None] & in_x[:, None, :]


def _mask_like(mask_bhw: Tensor, t: Tensor) -> Tensor:
    """``mask_bhw`` reshaped to broadcast against ``t`` = ``[B, ..., H, W]``."""
    if t.ndim < 3 or t.shape[0] != mask_bhw.shape[0] or t.shape[-2:] != mask_bhw.shape[-2:]:
        raise ValueError(f"cannot mix a {tuple(t.shape)} map with a {tuple(mask_bhw.shape)} mask")
    b, h, w = mask_bhw.shape
    return mask_bhw.view(b, *([1] * (t.ndim - 3)), h, w)


def apply_cutmix(
    x_bchw: Tensor, maps: Sequence[Tensor], mask_bhw: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """Mix image ``i`` with image ``(i + 1) mod B`` inside ``mask_bhw[i]`` (appendix: one step).

    Every tensor of ``maps`` (``[B, H, W]`` or ``[B, C, H, W]``: pseudo-labels, confidences,
    …) is mixed with the same mask and partner. Returns ``(x_mixed, maps_mixed)``.
    """
    mask = mask_bhw.to(device=x_bchw.device, dtype=torch.bool)

    def mix(t: Tensor) -> Tensor:
        partner = torch.roll(t, shifts=-1, dims=0)  # partner[i] = t[(i + 1) % B]
        return torch.where(_mask_like(mask, t), partner, t)

    return mix(x_bchw), [mix(m) for m in maps]


def maybe_cutmix(
    x_bchw: Tensor,
    maps: Sequence[Tensor],
    p: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, list[Tensor], Tensor]:
    """CutMix the whole batch with probability ``p`` (one coin per batch, appendix: one step).

    The coin and the boxes are always drawn (coin first), so the random stream does not depend
    on the outcome. Returns ``(x_out, maps_out, mask_bhw)``; ``mask_bhw`` is the mask actually
    used (all False when the coin said no).
    """
    coin = (_rand((), generator) < p).to(x_bchw.device, non_blocking=True)
    b, _, h, w = x_bchw.shape
    mask = cutmix_boxes(b, h, w, generator, device=x_bchw.device) & coin
    x_out, maps_out = apply_cutmix(x_bchw, maps, mask)
    return x_out, maps_out, mask
