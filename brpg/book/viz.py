"""Figures shared by the book's chapters (matplotlib is imported lazily: a ``book`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from brpg.data.digits import DIGIT_CLASSES, PALETTE, colorize


def denormalize(image_3hw: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised image tensor back to an HWC float array in [0, 1] for plotting."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (image_3hw.cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


def scene_grid(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    titles: Sequence[str] | None = None,
    cols: int = 4,
    extra: Sequence[Sequence[np.ndarray]] = (),
    extra_names: Sequence[str] = (),
) -> Any:
    """A grid of (image | mask | extra...) panels; ``masks``/``extra`` are label maps."""
    import matplotlib.pyplot as plt

    per = 2 + len(extra)
    rows = int(np.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols * per, figsize=(1.6 * cols * per, 1.7 * rows))
    axes = np.atleast_2d(axes)
    for ax in axes.flat:
        ax.axis("off")
    for i, (img, mask) in enumerate(zip(images, masks, strict=True)):
        r, c = divmod(i, cols)
        panels = [img, colorize(mask)] + [colorize(e[i]) for e in extra]
        names = ["image", "label", *extra_names]
        for j, (p, name) in enumerate(zip(panels, names, strict=True)):
            ax = axes[r, c * per + j]
            ax.imshow(p, interpolation="nearest")
            if r == 0:
                ax.set_title(name, fontsize=8)
        if titles:
            axes[r, c * per].set_title(titles[i], fontsize=7)
    fig.tight_layout()
    return fig


def class_legend(ax: Any, names: Sequence[str] = DIGIT_CLASSES) -> None:
    """Add colour patches for each class (and the ignore band) to ``ax``."""
    from matplotlib.patches import Patch

    handles = [Patch(color=np.asarray(PALETTE[i]) / 255, label=n) for i, n in enumerate(names)]
    handles.append(Patch(color=np.asarray(PALETTE[255]) / 255, label="ignore (255)"))
    ax.legend(handles=handles, loc="center", ncol=6, fontsize=8, frameon=False)
    ax.axis("off")


@torch.inference_mode()
def predict_masks(model: torch.nn.Module, images_b3hw: torch.Tensor) -> np.ndarray:
    """Argmax label maps at input resolution for a batch of normalised images."""
    import torch.nn.functional as F

    model.eval()
    logits = model(images_b3hw)["logits"]
    logits = F.interpolate(logits, size=images_b3hw.shape[-2:], mode="bilinear", align_corners=True)
    return logits.argmax(1).cpu().numpy().astype(np.uint8)
