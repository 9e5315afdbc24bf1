"""U2PL's entropy-filtered pseudo-label loss L_u (appendix: one step, cost, Q4).

Per step, with ``p`` from :func:`drop_percent_schedule`:

1. ``H = −Σ_c q_c log(q_c + 1e−10)``, ``q = softmax(teacher logits)``: the entropy of the
   *train-mode* teacher on the mixed strong images (appendix Q4), not of the eval-mode teacher
   that made the pseudo-labels;
2. ``t`` = the ``p``-th percentile of ``H`` over the pixels whose pseudo-label is not ignored
   (linear interpolation, as ``numpy.percentile``);
3. pixels with ``H ≥ t`` get the ignore target (dropped), so about ``(100 − p) %`` are dropped;
4. ``L_u = (B·H·W / #kept) · mean_{kept} CE(student logits, pseudo-label)``.

The factor ``B·H·W / #kept`` comes on top of a mean (U2PL's normalisation, appendix Q4);
``faithful_scale=False`` gives the plain mean CE over the kept pixels instead.

Everything stays on the device: the percentile is read from a full sort of the masked entropy
(invalid pixels sorted to the end as +inf) with tensor indices, so there is no ``.item()``,
no ``np.percentile`` and no size limit (``torch.quantile`` refuses more than 2^24 values).
When nothing is kept the loss is 0 (with a ``grad_fn``), where the official code gives NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "drop_percent_schedule",
    "entropy_keep_mask",
    "masked_percentile",
    "pixel_entropy",
    "unsup_loss",
]


def drop_percent_schedule(epoch: float, total_epochs: float, start: float = 80.0) -> float:
    """Entropy percentile ``p = 100 − (100 − start)·(1 − epoch/E)`` (appendix: one step).

    ``start`` (the config's ``drop_percent``, 80) at epoch 0, rising linearly to 100 at ``E``.
    """
    return 100.0 - (100.0 - start) * (1.0 - epoch / total_epochs)


def pixel_entropy(logits_bchw: Tensor, eps: float = 1e-10) -> Tensor:
    """``−Σ_c q log(q + eps)`` with ``q = softmax(logits)`` over dim 1, float32 ``[B, H, W]``."""
    q = F.softmax(logits_bchw.detach().float(), dim=1)
    return -(q * torch.log(q + eps)).sum(dim=1)


def masked_percentile(values: Tensor, valid: Tensor, percent: float | Tensor) -> Tensor:
    """The ``percent``-th percentile of ``values[valid]`` (numpy's default "linear" method).

    With ``n`` valid values sorted ascending as ``v``, ``pos = (n − 1)·percent/100`` and the
    result is ``v[⌊pos⌋] + (pos − ⌊pos⌋)·(v[⌊pos⌋ + 1] − v[⌊pos⌋])``. Computed with a sort of
    all values (invalid ones moved to the end) and tensor indexing: no host sync. Returns a
    0-dim float32 tensor; ``+inf`` when no value is valid.
    """
    v = values.detach().float().flatten()
    ok = valid.flatten()
    v_sorted = torch.sort(torch.where(ok, v, torch.full_like(v, float("inf")))).values
    n = ok.sum()
    q = percent.to(v.device, torch.float64) if isinstance(percent, Tensor) else float(percent)
    pos = (n - 1).clamp_min(0).to(torch.float64) * (q / 100.0)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (n - 1).clamp_min(0))
    frac = (pos - lo.to(torch.float64)).to(torch.float32)
    # index with 1-element tensors: a 0-dim tensor index would be read back with .item()
    a = v_sorted.index_select(0, lo.view(1)).squeeze(0)
    b = v_sorted.index_select(0, hi.view(1)).squeeze(0)
    out = a + frac * (b - a)
    out = torch.where(frac == 0, a, out)  # avoid inf·0 when b is +inf and frac is 0
    return torch.where(n > 0, out, torch.full_like(out, float("inf")))


def entropy_keep_mask(
    teacher_logits_bchw: Tensor,
    pseudo_bhw: Tensor,
    percent: float | Tensor,
    ignore_index: int = 255,
) -> Tensor:
    """Pixels that keep their pseudo-label: valid and entropy below the percentile."""
    entropy_bhw = pixel_entropy(teacher_logits_bchw)
    valid_bhw = pseudo_bhw != ignore_index
    thresh = masked_percentile(entropy_bhw, valid_bhw, percent)
    return valid_bhw & (entropy_bhw < thresh)


def unsup_loss(
    logits_u_bchw: Tensor,
    pseudo_bhw: Tensor,
    teacher_logits_bchw: Tensor,
    percent: float | Tensor,
    ignore_index: int = 255,
    faithful_scale: bool = True,
) -> Tensor:
    """Entropy-filtered pseudo-label CE (U2PL ``compute_unsupervised_loss``, appendix: one step).

    Args:
        logits_u_bchw: student logits on the (mixed) strong images, at label resolution.
        pseudo_bhw: teacher pseudo-labels (mixed like the images); ``ignore_index`` = none.
        teacher_logits_bchw: logits whose entropy decides what is dropped (the train-mode
            teacher on the same mixed images), same shape as ``logits_u_bchw``.
        percent: the entropy percentile ``p`` (:func:`drop_percent_schedule`).
        faithful_scale: multiply the mean CE by ``B·H·W / #kept`` as the official code does.

    Returns:
        A float32 scalar; 0 (with grad_fn) when no pixel is kept.
    """
    if logits_u_bchw.shape != teacher_logits_bchw.shape:
        raise ValueError(
            f"student {tuple(logits_u_bchw.shape)} and teacher {tuple(teacher_logits_bchw.shape)} logits differ"
        )
    keep_bhw = entropy_keep_mask(teacher_logits_bchw, pseudo_bhw, percent, ignore_index)
    target_bhw = torch.where(
        keep_bhw, pseudo_bhw.long(), torch.full_like(pseudo_bhw.long(), ignore_index)
    )
    ce_bhw = F.cross_entropy(
        logits_u_bchw.float(), target_bhw, ignore_index=ignore_index, reduction="none"
    )
    n_kept = keep_bhw.sum().to(ce_bhw.dtype).clamp_min(1.0)
    loss = ce_bhw.sum() / n_kept
    if faithful_scale:
        loss = loss * (keep_bhw.numel() / n_kept)
    return loss
