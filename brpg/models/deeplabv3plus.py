"""DeepLabV3+ decoder with a representation head, and the encoder-decoder ``SegModel`` (appendix:
configurations).

Shapes for a 513×513 crop with ResNet-101 at OS8 (``C`` classes, ``D`` = decoder width 256)::

    low  [B,256,129,129] ──low_conv (1×1, bias, BN, ReLU)────────────────────┐
    high [B,2048,65,65] ─ASPP (5×D)─head (3×3, BN, ReLU, Dropout2d)─upsample─┴ concat [B,2D,129,129]
        ├─ classifier: 3×3 → BN → ReLU → Dropout2d → 3×3 → BN → ReLU → Dropout2d → 1×1 → logits [B,C,…]
        └─ rep head:   same layers, last 1×1 → rep [B,rep_dim,…] (raw, not normalised)

Logits stay at stride 4; callers upsample them (bilinear, ``align_corners=True``).

``SegModel.forward(x, need_fp=True)`` adds UniMatch's feature perturbation (Yang et al., CVPR
2023): one decoder pass on ``cat([features, Dropout2d(features)])`` along the batch, split in
halves, giving ``logits_fp`` next to ``logits``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _upsample(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _conv_bn_relu(
    c_in: int, c_out: int, kernel: int, dilation: int = 1, bias: bool = False
) -> list[nn.Module]:
    pad = dilation * (kernel // 2)
    return [
        nn.Conv2d(c_in, c_out, kernel, padding=pad, dilation=dilation, bias=bias),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (appendix: configurations): pool, 1×1 and three atrous 3×3
    branches.

    Each branch is conv (no bias) → BN → ReLU with ``channels`` outputs; the output is the
    concatenation, ``5 * channels`` channels, at the input's resolution.
    """

    def __init__(self, in_channels: int, channels: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_channels, channels, 1))
        self.branches = nn.ModuleList([nn.Sequential(*_conv_bn_relu(in_channels, channels, 1))])
        for r in rates:
            self.branches.append(nn.Sequential(*_conv_bn_relu(in_channels, channels, 3, r)))
        self.out_channels = channels * (len(rates) + 2)

    def forward(self, x: Tensor) -> Tensor:
        """x [B,Cin,h,w] → [B,(n_rates+2)·channels,h,w]."""
        pooled = _upsample(self.pool(x), x.shape[-2:])
        return torch.cat([pooled, *(branch(x) for branch in self.branches)], dim=1)


def _stride4_head(
    in_channels: int, channels: int, out_channels: int, dropout: float
) -> nn.Sequential:
    """classifier / representation head of the appendix (configurations): two 3×3 conv-BN-ReLU-dropout, then 1×1."""
    return nn.Sequential(
        *_conv_bn_relu(in_channels, channels, 3, bias=True),
        nn.Dropout2d(dropout),
        *_conv_bn_relu(channels, channels, 3, bias=True),
        nn.Dropout2d(dropout),
        nn.Conv2d(channels, out_channels, 1),
    )


class DeepLabV3PlusDecoder(nn.Module):
    """Everything after the encoder (appendix: configurations); it gets the ×10 learning rate.

    Args:
        low_channels: channels of the encoder's stride-4 feature.
        high_channels: channels of the encoder's final feature.
        num_classes: ``C``.
        channels: decoder width ``D`` (256 in the paper).
        aspp_rates: atrous rates of the three 3×3 ASPP branches, (12, 24, 36) in the paper.
        dropout: Dropout2d probability (0.1).
        rep_dim: output width of the representation head, or None for no head.
    """

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        num_classes: int,
        channels: int = 256,
        aspp_rates: Sequence[int] = (12, 24, 36),
        dropout: float = 0.1,
        rep_dim: int | None = 256,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(high_channels, channels, aspp_rates)
        self.head = nn.Sequential(
            *_conv_bn_relu(self.aspp.out_channels, channels, 3), nn.Dropout2d(dropout)
        )
        self.low_conv = nn.Sequential(*_conv_bn_relu(low_channels, channels, 1, bias=True))
        self.classifier = _stride4_head(2 * channels, channels, num_classes, dropout)
        self.rep_head = (
            _stride4_head(2 * channels, channels, rep_dim, dropout) if rep_dim is not None else None
        )

    def fuse(self, low: Tensor, high: Tensor) -> Tensor:
        """low [B,Cl,h,w], high [B,Ch,h',w'] → the fused stride-4 map [B,2D,h,w] both heads read."""
        context = self.head(self.aspp(high))  # [B,D,h',w']
        return torch.cat([self.low_conv(low), _upsample(context, low.shape[-2:])], dim=1)

    def forward(self, low: Tensor, high: Tensor, need_rep: bool = True) -> dict[str, Tensor]:
        """low [B,Cl,h,w], high [B,Ch,h',w'] → {"logits": [B,C,h,w], "rep": [B,rep_dim,h,w]}
        (no ``"rep"`` with ``need_rep=False``)."""
        fused = self.fuse(low, high)  # [B,2D,h,w]
        out = {"logits": self.classifier(fused)}  # [B,C,h,w]
        if self.rep_head is not None and need_rep:
            out["rep"] = self.rep_head(fused)  # [B,rep_dim,h,w], raw
        return out


class SegModel(nn.Module):
    """Encoder + DeepLabV3+ decoder (appendix: configurations).

    ``forward(x [B,3,H,W])`` returns ``{"logits": [B,C,h,w]}`` plus ``"rep": [B,rep_dim,h,w]``
    when the representation head exists, where ``h, w`` is the encoder's stride-4 size
    (ceil rule: 513 → 129). ``backbone`` and ``decoder`` split the parameters for the ×10
    decoder learning rate (appendix: optimiser). ``need_fp=True`` adds ``"logits_fp": [B,C,h,w]``,
    the feature-perturbed pass of UniMatch (:meth:`forward`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        decoder: DeepLabV3PlusDecoder,
        output_stride: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.output_stride = output_stride
        self.num_classes = num_classes

    @property
    def has_rep(self) -> bool:
        return self.decoder.rep_head is not None

    def forward(
        self, x: Tensor, need_fp: bool = False, fp_dropout: float = 0.5, need_rep: bool = True
    ) -> dict[str, Tensor]:
        """x [B,3,H,W] → ``{"logits", "rep"}``; with ``need_fp`` also ``"logits_fp"``.

        ``need_rep=False`` skips the representation head (a caller that never reads ``rep``,
        e.g. the mean teacher without BRPG, saves its forward and backward); the logits are
        the same, since the head runs after the classifier.

        ``need_fp`` (UniMatch's feature perturbation, Yang et al. CVPR 2023): the encoder runs
        once; the decoder runs once on ``cat([low, Dropout2d(low)])`` and
        ``cat([high, Dropout2d(high)])`` (``fp_dropout``, independent channel masks, applied
        in train and eval mode alike), so its BatchNorm layers see both halves together, as
        in UniMatch. The first half gives ``logits`` (and ``rep``: the representation head
        reads only the clean half, no perturbed features are ever asked for), the second
        ``logits_fp [B,C,h,w]``. ``need_fp=False`` is the plain forward, unchanged.
        """
        low, high = self.backbone(x)
        if not need_fp:
            return self.decoder(low, high, need_rep)
        n = x.shape[0]
        low_2b = torch.cat([low, F.dropout2d(low, fp_dropout, training=True)])
        high_2b = torch.cat([high, F.dropout2d(high, fp_dropout, training=True)])
        fused_2b = self.decoder.fuse(low_2b, high_2b)  # [2B,2D,h,w]
        logits, logits_fp = self.decoder.classifier(fused_2b).split(n)  # [B,C,h,w] each
        out = {"logits": logits, "logits_fp": logits_fp}
        if self.decoder.rep_head is not None and need_rep:
            out["rep"] = self.decoder.rep_head(fused_2b[:n])  # [B,rep_dim,h,w], clean half
        return out
