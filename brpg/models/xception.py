"""Aligned Xception-65 encoder for COCO, built from ``timm`` (appendix: configurations).

The official code returns ``c1`` (256 ch, stride 4) — the entry-flow block-2 feature taken
*before* that block's strided separable conv — and the final 2048-ch feature at output
stride 8. timm's ``xception65`` is the same DeepLab "aligned" Xception; this wrapper keeps
its ``stem``/``blocks`` (so a timm ``xception65`` state dict loads by name) and reads the
same stride-4 tap.

Deviation: the official Xception uses plain BN with momentum 0.0003 (appendix Q14), which
only makes sense on top of pretrained statistics; timm's default (0.1) is kept unless
``bn_momentum`` is given. ``timm`` is an optional dependency (``pip install brpg[xception]``)
and is imported only when this encoder is built.
"""

from __future__ import annotations

from types import ModuleType

from torch import Tensor, nn

_TAP_BLOCK = 1  # entry-flow block whose pre-stride activation is the stride-4 feature


def _import_timm() -> ModuleType:
    try:
        import timm
    except ImportError as err:  # pragma: no cover - exercised only without timm
        raise ImportError(
            "The xception65 backbone needs timm: pip install brpg[xception]  (or pip install timm)"
        ) from err
    return timm


class XceptionEncoder(nn.Module):
    """timm ``xception65`` trunk returning (stride-4 256-ch, final 2048-ch) features (appendix:
    configurations).

    Attributes:
        low_channels: 256. high_channels: 2048. output_stride: 8 or 16.
    """

    def __init__(self, output_stride: int = 8, bn_momentum: float | None = None) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        timm = _import_timm()
        net = timm.create_model(
            "xception65", pretrained=False, num_classes=0, output_stride=output_stride
        )
        self.stem: nn.Sequential = net.stem
        self.blocks: nn.Sequential = net.blocks
        self.output_stride = output_stride
        self.low_channels = next(f["num_chs"] for f in net.feature_info if f["reduction"] == 4)
        self.high_channels = net.num_features
        if bn_momentum is not None:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = bn_momentum

    @staticmethod
    def _block_with_tap(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """Run an Xception block, also returning the input of its last (strided) conv."""
        tap = x
        for layer in list(block.stack)[:-1]:  # act1 is not in-place, so x is preserved
            tap = layer(tap)
        out = block.stack[-1](tap)
        if not block.no_skip:
            out = out + (block.shortcut(x) if block.shortcut is not None else x)
        return out, tap

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B,3,H,W] → (low [B,256,H/4,W/4], high [B,2048,H/OS,W/OS]) (ceil sizes)."""
        x = self.stem(x)
        low = x
        for i, block in enumerate(self.blocks):
            if i == _TAP_BLOCK:
                x, low = self._block_with_tap(block, x)
            else:
                x = block(x)
        return low, x
