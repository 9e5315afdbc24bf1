"""Segmentation models: encoders + DeepLabV3+ decoder (appendix: configurations), and optional
SegFormer (MiT).

``build_model(cfg.model, num_classes)`` is the only entry point the rest of ``brpg`` needs::

    model = build_model(cfg.model, num_classes=21)
    out = model(images)            # {"logits": [B,C,h,w], "rep": [B,rep_dim,h,w]} at stride 4
    model.backbone, model.decoder  # parameter groups: the decoder gets the ×10 LR (appendix: optimiser)

``model.backbone: mit_b0`` … ``mit_b5`` builds a SegFormer instead (``segformer.py``: MiT
encoder from ``transformers``, all-MLP decoder + rep head; ``pip install 'brpg[segformer]'``).
"""

from __future__ import annotations

import logging

from torch import nn

from brpg.config import ModelConfig
from brpg.models.deeplabv3plus import ASPP, DeepLabV3PlusDecoder, SegModel
from brpg.models.resnet import ResNetEncoder, build_resnet
from brpg.models.segformer import MIT_VARIANTS  # transformers is imported only when used
from brpg.models.small import SmallEncoder
from brpg.models.weights import load_backbone_weights

BACKBONES = ("small", "resnet50", "resnet101", "xception65", *MIT_VARIANTS)

log = logging.getLogger(__name__)


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The encoder named by ``cfg.backbone``, randomly initialised (appendix: configurations)."""
    if cfg.backbone in ("resnet50", "resnet101"):
        return build_resnet(
            cfg.backbone,
            output_stride=cfg.output_stride,
            deep_stem=cfg.deep_stem,
            multi_grid=cfg.multi_grid,
            zero_init_residual=cfg.zero_init_residual,
        )
    if cfg.backbone == "xception65":
        from brpg.models.xception import XceptionEncoder  # timm is optional

        return XceptionEncoder(output_stride=cfg.output_stride)
    if cfg.backbone in MIT_VARIANTS:
        from brpg.models.segformer import MiTEncoder  # transformers is optional

        return MiTEncoder(cfg.backbone)
    if cfg.backbone == "small":
        return SmallEncoder(
            width=cfg.width,
            output_stride=cfg.output_stride,
            zero_init_residual=cfg.zero_init_residual,
        )
    raise ValueError(f"unknown backbone '{cfg.backbone}'; expected one of {BACKBONES}")


def build_model(cfg: ModelConfig, num_classes: int) -> SegModel:
    """Encoder + DeepLabV3+ decoder from ``cfg``; loads ``cfg.pretrained`` into the encoder if set.

    For ``cfg.backbone`` ``mit_b0`` … ``mit_b5`` a SegFormer (all-MLP decoder of width
    ``cfg.decoder_channels``) with the same output contract (``segformer.build_segformer``).
    """
    if cfg.backbone in MIT_VARIANTS:
        from brpg.models.segformer import build_segformer

        return build_segformer(cfg, num_classes)
    backbone = build_backbone(cfg)
    if cfg.pretrained:
        report = load_backbone_weights(backbone, cfg.pretrained, cfg.backbone)
        log.info(
            "loaded %d backbone tensors from %s (layout %s); %d missing, %d unexpected, %d mismatched",
            len(report["loaded"]),
            cfg.pretrained,
            report["layout"],
            len(report["missing"]),
            len(report["unexpected"]),
            len(report["mismatched"]),
        )
        skipped = [k for k in report["missing"] if not k.endswith("num_batches_tracked")]
        if skipped:
            log.warning(
                "%d backbone tensors keep their random init (e.g. %s); mismatched shapes: %s",
                len(skipped),
                ", ".join(skipped[:3]),
                report["mismatched"][:3],
            )
    decoder = DeepLabV3PlusDecoder(
        low_channels=backbone.low_channels,
        high_channels=backbone.high_channels,
        num_classes=num_classes,
        channels=cfg.decoder_channels,
        aspp_rates=cfg.aspp_rates,
        dropout=cfg.dropout,
        rep_dim=cfg.rep_dim if cfg.rep_head else None,
    )
    return SegModel(backbone, decoder, output_stride=cfg.output_stride, num_classes=num_classes)


__all__ = [
    "ASPP",
    "BACKBONES",
    "MIT_VARIANTS",
    "DeepLabV3PlusDecoder",
    "ResNetEncoder",
    "SegModel",
    "SmallEncoder",
    "build_backbone",
    "build_model",
    "load_backbone_weights",
]
