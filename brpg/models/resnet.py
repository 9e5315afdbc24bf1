"""Dilated ResNet-50/101 encoder with the optional deep stem and multi-grid (appendix:
configurations).

The blocks are torchvision's ``Bottleneck``; this file only changes what the official
(U2PL) encoder changes:

* **deep stem** — three 3×3 convs (3→64 stride 2, 64→64, 64→128), each followed by BN and
  ReLU, then a 3×3 max-pool with stride 2, padding 1 and ``ceil_mode=True``; ``layer1``
  then starts from 128 channels instead of 64. The parameter names follow the community
  ``resnet101.pth`` checkpoint: ``conv1`` is ``Sequential(conv, bn, relu, conv, bn, relu,
  conv)`` and the last BN/ReLU are ``bn1``/``relu``. Without the deep stem the names are
  torchvision's, so both checkpoint layouts load without renaming (see ``weights.py``).
* **output stride** — ``replace_stride_with_dilation`` = [False, True, True] for OS8 and
  [False, False, True] for OS16 (torchvision convention: the first block of a dilated stage
  keeps the previous dilation).
* **multi-grid** — the 3×3 convs of ``layer4`` get dilation ``base × (1, 2, 4)`` where
  ``base`` is the stage dilation (4 at OS8, 2 at OS16), i.e. (4, 8, 16) at OS8 as in the appendix
  (configurations).

The encoder returns the stride-4 ``layer1`` feature (256 ch) and the final ``layer4``
feature (2048 ch, stride 8 or 16).
"""

from __future__ import annotations

import torchvision
from torch import Tensor, nn

MULTI_GRID: tuple[int, ...] = (1, 2, 4)

_DILATE = {8: [False, True, True], 16: [False, False, True]}
_BUILDERS = {"resnet50": torchvision.models.resnet50, "resnet101": torchvision.models.resnet101}


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def deep_stem_conv1() -> nn.Sequential:
    """The deep stem's ``conv1`` (appendix: configurations): indices 0..6 match the community
    checkpoint.

    The final conv (index 6) outputs 128 channels; its BN and ReLU are the encoder's
    ``bn1`` / ``relu`` so that the parameter names are ``conv1.{0,1,3,4,6}`` and ``bn1``.
    """
    return nn.Sequential(
        _conv3x3(3, 64, stride=2),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        _conv3x3(64, 64),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        _conv3x3(64, 128),
    )


class ResNetEncoder(nn.Module):
    """ResNet-50/101 trunk without ``avgpool``/``fc`` (appendix: configurations).

    Attributes:
        low_channels: channels of the stride-4 feature (256).
        high_channels: channels of the final feature (2048).
        output_stride: 8 or 16.
    """

    def __init__(
        self,
        depth: int = 101,
        output_stride: int = 8,
        deep_stem: bool = True,
        multi_grid: bool = True,
        zero_init_residual: bool = True,
    ) -> None:
        super().__init__()
        name = f"resnet{depth}"
        if name not in _BUILDERS:
            raise ValueError(f"ResNet depth must be 50 or 101, got {depth}")
        if output_stride not in _DILATE:
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        tv = _BUILDERS[name](
            weights=None,
            replace_stride_with_dilation=_DILATE[output_stride],
            zero_init_residual=zero_init_residual,
        )
        self.output_stride = output_stride
        self.low_channels = 256
        self.high_channels = 2048

        if deep_stem:
            self.conv1: nn.Module = deep_stem_conv1()
            self.bn1 = nn.BatchNorm2d(128)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
            # layer1 starts from 128 channels: only its first 1×1 conv and shortcut read them.
            first = tv.layer1[0]
            first.conv1 = nn.Conv2d(128, first.conv1.out_channels, kernel_size=1, bias=False)
            first.downsample[0] = nn.Conv2d(128, 256, kernel_size=1, bias=False)
            new_convs = [*self.conv1.modules(), first.conv1, first.downsample[0]]
            for m in new_convs:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        else:
            self.conv1 = tv.conv1
            self.bn1 = tv.bn1
            self.maxpool = tv.maxpool
        self.relu = nn.ReLU(inplace=True)
        self.layer1, self.layer2 = tv.layer1, tv.layer2
        self.layer3, self.layer4 = tv.layer3, tv.layer4

        if multi_grid:
            base = 4 if output_stride == 8 else 2  # dilation of layer4 (appendix: configurations)
            for block, grid in zip(self.layer4, MULTI_GRID, strict=True):
                d = base * grid
                block.conv2.dilation = (d, d)
                block.conv2.padding = (d, d)

    def layer4_dilations(self) -> tuple[int, ...]:
        """Dilation of each ``layer4`` block's 3×3 conv, e.g. (4, 8, 16) at OS8 with multi-grid."""
        return tuple(block.conv2.dilation[0] for block in self.layer4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B,3,H,W] → (low [B,256,H/4,W/4], high [B,2048,H/OS,W/OS]) (ceil sizes)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return low, high


def build_resnet(name: str, **kwargs: bool | int) -> ResNetEncoder:
    """``build_resnet("resnet101", output_stride=8, deep_stem=True, ...)``."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown ResNet '{name}'; expected one of {sorted(_BUILDERS)}")
    return ResNetEncoder(depth=int(name.removeprefix("resnet")), **kwargs)


__all__ = ["MULTI_GRID", "ResNetEncoder", "build_resnet", "deep_stem_conv1"]
