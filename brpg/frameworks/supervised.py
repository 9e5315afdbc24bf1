"""Supervised losses: cross-entropy and OHEM cross-entropy (appendix: one step).

``L_s = ce_weight · CE(logits, y, ignore) + ohem_weight · OHEM(logits, y)``.

Both terms are computed from one per-pixel cross-entropy map, fully on device: there is no
``.item()`` and no data-dependent Python branch, so the loss never forces a host sync.

All-ignore targets (no valid pixel, or OHEM keeping nothing) give a loss of exactly ``0`` that
still has a ``grad_fn`` (its gradient is zero), so ``backward()`` works and the step is a no-op
for this term. The official code returns NaN there (appendix Q19); we deliberately do not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brpg.config import Config, LossConfig
from brpg.models.logits import upsample_logits

__all__ = ["keep_in_graph", "ohem_ce", "pixel_ce", "suponly_step", "supervised_loss"]


def pixel_ce(logits_bchw: Tensor, target_bhw: Tensor, ignore_index: int = 255) -> Tensor:
    """Per-pixel cross-entropy ``[B,H,W]`` (float32), ``0`` at ``ignore_index`` pixels."""
    return F.cross_entropy(
        logits_bchw.float(), target_bhw.long(), ignore_index=ignore_index, reduction="none"
    )


def _masked_mean(values_bhw: Tensor, keep_bhw: Tensor) -> Tensor:
    """Mean of ``values`` over ``keep``; 0 (with grad_fn) when nothing is kept, never NaN."""
    keep = keep_bhw.to(values_bhw.dtype)
    return (values_bhw * keep).sum() / keep.sum().clamp_min(1.0)


def _ohem_keep_mask(ce_bhw: Tensor, valid_bhw: Tensor, thresh: float, min_kept: int) -> Tensor:
    """The pixels OHEM keeps (appendix: one step), computed without a host sync.

    ``p_gt = exp(-CE)`` is the softmax probability of the ground-truth class. If fewer than
    ``min_kept`` pixels are valid, every valid pixel is kept; otherwise
    ``τ = max(thresh, the min_kept-th smallest p_gt among valid pixels)`` and the valid pixels
    with ``p_gt ≤ τ`` are kept. ``min_kept ≤ 0`` keeps every valid pixel (plain CE), as the
    official ``OhemCrossEntropy2dTensor`` does: its filtering sits inside ``if min_kept > 0``,
    so ``thresh`` alone is never applied.
    """
    p_gt = torch.exp(-ce_bhw.detach()).flatten()
    valid = valid_bhw.flatten()
    if min_kept <= 0 or min_kept > p_gt.numel():
        # min_kept ≤ 0: no filtering (official). min_kept > #pixels ≥ #valid: keep all valid
        # pixels (known without looking at the data).
        return valid_bhw
    # Invalid pixels get p = 2 (> any probability), so for k ≤ #valid the k-th smallest over all
    # pixels is the k-th smallest over the valid ones.
    p_masked = torch.where(valid, p_gt, torch.full_like(p_gt, 2.0))
    kth = torch.kthvalue(p_masked, min_kept).values
    tau = torch.clamp(kth, min=thresh)
    n_valid = valid.sum()
    tau = torch.where(n_valid < min_kept, torch.full_like(tau, float("inf")), tau)
    return valid_bhw & (p_gt.view_as(valid_bhw) <= tau)


def ohem_ce(
    logits_bchw: Tensor,
    target_bhw: Tensor,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    ignore_index: int = 255,
) -> Tensor:
    """OHEM cross-entropy (OhemCrossEntropy2dTensor, appendix: one step).

    Args:
        logits_bchw: class scores at the label resolution (upsampled beforehand).
        target_bhw: integer labels; ``ignore_index`` marks unlabeled pixels.
        thresh: probability threshold (0.7 in all released configs).
        min_kept: at least this many of the hardest valid pixels are kept, per call (the
            official value 100000 is per GPU); ``≤ 0`` turns the filter off (plain CE over the
            valid pixels, as officially).

    Returns:
        The mean CE over the kept pixels, a float32 scalar; 0 (with grad_fn) if none is kept.
    """
    ce_bhw = pixel_ce(logits_bchw, target_bhw, ignore_index)
    valid_bhw = target_bhw != ignore_index
    return _masked_mean(ce_bhw, _ohem_keep_mask(ce_bhw, valid_bhw, thresh, min_kept))


def supervised_loss(
    logits_bchw: Tensor, target_bhw: Tensor, cfg: LossConfig, ignore_index: int = 255
) -> Tensor:
    """``ce_weight · CE(ignore) + ohem_weight · OHEM`` (appendix: one step); a zero-weight term is
    skipped.

    Shares one per-pixel CE map between the two terms. With both weights 0 it returns a zero
    that is still connected to ``logits_bchw``.
    """
    ce_bhw = pixel_ce(logits_bchw, target_bhw, ignore_index)
    valid_bhw = target_bhw != ignore_index
    loss = ce_bhw.sum() * 0.0
    if cfg.ce_weight != 0:
        loss = loss + cfg.ce_weight * _masked_mean(ce_bhw, valid_bhw)
    if cfg.ohem_weight != 0:
        keep_bhw = _ohem_keep_mask(ce_bhw, valid_bhw, cfg.ohem_thresh, cfg.ohem_min_kept)
        loss = loss + cfg.ohem_weight * _masked_mean(ce_bhw, keep_bhw)
    return loss


def keep_in_graph(loss: Tensor, rep: Tensor | None) -> Tensor:
    """``loss + 0·Σ rep``: a representation head whose output no loss reads still gets a
    (zero) gradient, DDP's every-parameter-used contract (appendix: one step). Bit-identical
    values."""
    return loss if rep is None else loss + 0.0 * rep.sum()


def suponly_step(
    model: nn.Module, batch: dict[str, Tensor], cfg: Config, need_rep: bool = True
) -> tuple[Tensor, dict[str, Tensor]]:
    """One supervised step's loss: L_s = w_ce·CE + w_ohem·OHEM on the labeled batch (appendix:
    timeline).

    ``need_rep=False`` skips the representation head, which this loss never reads."""
    image_b3hw, mask_bhw = batch["image"], batch["mask"]
    out = model(image_b3hw, need_rep=need_rep)
    logits_bchw = upsample_logits(out["logits"], tuple(mask_bhw.shape[-2:]))
    loss = supervised_loss(logits_bchw.float(), mask_bhw, cfg.loss, cfg.data.ignore_index)
    return keep_in_graph(loss, out.get("rep")), {"loss_sup": loss.detach()}
