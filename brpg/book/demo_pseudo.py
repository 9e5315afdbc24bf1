"""Chapter 2's measurements of a mean teacher's pseudo-labels on a committed run.

- :func:`pseudo_view` → the teacher's pseudo-labels and confidences on a weak view of some
  scenes, the strong view of the same scenes and one CutMix of it, with every map (the
  pseudo-labels, confidences and true labels) mixed by the same boxes (appendix: one step);
- :func:`entropy_filter` → U2PL's entropy filter (the unsupervised loss BRPG inherits,
  paper Sec. 3.1) on those mixed maps: the share of pixels it keeps, and how often the
  pseudo-label is right on the kept and on the dropped pixels.

The scenes are val scenes: their labels let the chapter *measure* pseudo-labels, which
training never does. Chapter 2 draws one run's view and checks its claim on every
committed seed with these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from brpg.book.demo import DemoRun, feature_batch
from brpg.frameworks.augment import StrongAug, apply_cutmix, maybe_cutmix
from brpg.frameworks.u2pl_loss import entropy_keep_mask
from brpg.models.logits import upsample_logits

__all__ = ["FilterCheck", "PseudoView", "entropy_filter", "pseudo_view"]


@dataclass(frozen=True)
class PseudoView:
    """A teacher's view of ``B`` scenes (full resolution ``H × W``); ``*_mix`` maps are mixed
    by the CutMix boxes ``cut_bhw`` (True: the pixel comes from the neighbouring scene)."""

    images_b3hw: Tensor  # weak view, normalised
    labels_bhw: Tensor  # true labels (255: ignore)
    logits_bchw: Tensor  # teacher logits of the weak view, upsampled to H × W
    mixed_b3hw: Tensor  # strong view, then CutMix
    pseudo_mix_bhw: Tensor
    conf_mix_bhw: Tensor
    labels_mix_bhw: Tensor
    logits_mix_bchw: Tensor  # the weak-view logits mixed by the same boxes
    cut_bhw: Tensor


def pseudo_view(run: DemoRun, n_images: int = 16, seed: int = 0) -> PseudoView:
    """The EMA teacher of ``run`` (a :func:`brpg.book.demo.run_state` result) on val scenes
    ``0 … n_images-1`` (eval mode, as the step computes pseudo-labels), the strong view and
    CutMix drawn from a CPU generator seeded with ``seed`` (torch's global RNG untouched)."""
    out = feature_batch(run, split="val", n_images=n_images, teacher=True)
    images, labels = out["images_b3hw"], out["labels_bhw"]
    logits = upsample_logits(out["logits_bchw"], tuple(labels.shape[-2:]))
    conf, pseudo = torch.softmax(logits, dim=1).max(dim=1)
    gen = torch.Generator().manual_seed(seed)
    strong = StrongAug(mean=run.cfg.data.mean, std=run.cfg.data.std)(images, gen)
    mixed, (pseudo_mix, conf_mix, labels_mix), cut = maybe_cutmix(
        strong, [pseudo, conf, labels], p=1.0, generator=gen
    )
    logits_mix = apply_cutmix(logits, [], cut)[0]
    return PseudoView(
        images, labels, logits, mixed, pseudo_mix, conf_mix, labels_mix, logits_mix, cut
    )


@dataclass(frozen=True)
class FilterCheck:
    """U2PL's entropy filter at percentile ``percent`` on a :class:`PseudoView`: the share of
    pixels it keeps and the pseudo-label accuracy (against the true labels, ignored pixels
    left out) on the kept and on the dropped pixels; the masks behind them."""

    percent: float
    kept_share: float
    acc_kept: float
    acc_dropped: float
    keep_bhw: Tensor  # the filter's verdict
    right_bhw: Tensor  # pseudo-label equals the true label (valid pixels only)
    valid_bhw: Tensor  # true label is not 255


def entropy_filter(view: PseudoView, percent: float) -> FilterCheck:
    """Apply :func:`brpg.frameworks.u2pl_loss.entropy_keep_mask` to the mixed weak-view
    logits and score its two sides (U2PL: keep the pixels below the ``percent``-th entropy
    percentile)."""
    keep = entropy_keep_mask(view.logits_mix_bchw, view.pseudo_mix_bhw, percent)
    valid = view.labels_mix_bhw != 255
    right = (view.pseudo_mix_bhw == view.labels_mix_bhw) & valid
    kept, dropped = keep & valid, ~keep & valid
    if not bool(kept.any()) or not bool(dropped.any()):
        raise ValueError(f"percent={percent}: the filter keeps all or none of the valid pixels")
    return FilterCheck(
        percent=float(percent),
        kept_share=float(keep.float().mean()),
        acc_kept=float((right & kept).sum() / kept.sum()),
        acc_dropped=float((right & dropped).sum() / dropped.sum()),
        keep_bhw=keep,
        right_bhw=right,
        valid_bhw=valid,
    )
