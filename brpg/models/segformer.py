"""SegFormer: a Mix Transformer (MiT-B0…B5) encoder with an all-MLP decoder and a rep head.

Not part of the BRPG paper (which uses DeepLabV3+, appendix: configurations); an optional extra
(``pip install 'brpg[segformer]'``). The encoder is Hugging Face ``transformers``'
``SegformerModel`` (randomly initialised unless ``model.pretrained`` is set); the decoder is
written here. ``model.backbone: mit_b0`` … ``mit_b5`` selects it in :func:`brpg.models.build_model`.

Shapes for an ``H×W`` input (``Ci`` = the variant's hidden sizes, ``D`` = decoder width)::

    stage1 [B,C1,H/4,W/4]   ─1×1 → D─────────────┐
    stage2 [B,C2,H/8,W/8]   ─1×1 → D─upsample─────┤
    stage3 [B,C3,H/16,W/16] ─1×1 → D─upsample─────┼ concat [B,4D,H/4,W/4]
    stage4 [B,C4,H/32,W/32] ─1×1 → D─upsample─────┘   └ fuse: 1×1 conv → BN → ReLU = f [B,D,…]
        f ├─ classifier: Dropout2d → 1×1 → logits [B,C,H/4,W/4]
          └─ rep head:   3×3 → BN → ReLU → Dropout2d → 3×3 → BN → ReLU → Dropout2d → 1×1
                         → rep [B,rep_dim,H/4,W/4] (raw; the DeepLabV3+ rep-head design)

Sizes use the ceil rule like the other encoders (65 → 17 at stride 4). The model keeps the
``SegModel`` contract: ``forward`` returns ``{"logits", "rep"?}`` at stride 4,
``model.backbone`` is the encoder (base LR) and ``model.decoder`` everything else (the ×10
head LR of the appendix (optimiser) applies to the all-MLP decoder and the rep head only).

Variants (:data:`MIT_VARIANTS`): the B0 numbers are ``SegformerConfig()``'s defaults (its
docstring: "nvidia/segformer-b0-finetuned-ade-512-512 style configuration"); B1–B5 follow
the table of the ``transformers`` SegFormer documentation (model_doc/segformer) and the
``config.json`` of the ``nvidia/mit-b*`` checkpoints (e.g. ``nvidia/mit-b5``: depths
[3, 6, 40, 3], hidden sizes [64, 128, 320, 512], decoder_hidden_size 768). All variants
share heads (1, 2, 5, 8), sequence-reduction ratios (8, 4, 2, 1), MLP ratio 4, patch sizes
(7, 3, 3, 3) and strides (4, 2, 2, 2). Encoder parameter counts measured here (transformers
5.24): 3.32, 13.15, 24.20, 44.07, 60.84, 81.44 M for B0…B5.

Decoder width: ``model.decoder_channels`` is used as ``D``. The published SegFormer heads
use 256 for B0/B1 and 768 for B2–B5 (:data:`MIT_VARIANTS` ``decoder_channels``); the
``ModelConfig`` default (256) matches B0/B1, so set ``model.decoder_channels=768`` for a
paper-sized B2–B5 head. The rep head's hidden width is ``D`` too, as in DeepLabV3+ (two
3×3 convs at stride 4: about 10.6 M parameters at ``D = 768``).

``model.output_stride`` is ignored (MiT always ends at stride 32). Weights: see
:func:`load_mit_weights`; nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brpg.config import ModelConfig
from brpg.models.deeplabv3plus import SegModel, _conv_bn_relu, _stride4_head, _upsample
from brpg.models.weights import unwrap_state_dict

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'brpg[segformer]'  (or pip install 'transformers>=4.40')"


@dataclass(frozen=True)
class MiTSpec:
    """Hyper-parameters of one Mix Transformer variant (see the module docstring)."""

    hidden_sizes: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_attention_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratios: tuple[int, int, int, int] = (4, 4, 4, 4)
    decoder_channels: int = 256  # the published SegFormer decode-head width


_WIDE = (64, 128, 320, 512)
MIT_VARIANTS: dict[str, MiTSpec] = {
    "mit_b0": MiTSpec((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": MiTSpec(_WIDE, (2, 2, 2, 2)),
    "mit_b2": MiTSpec(_WIDE, (3, 4, 6, 3), decoder_channels=768),
    "mit_b3": MiTSpec(_WIDE, (3, 4, 18, 3), decoder_channels=768),
    "mit_b4": MiTSpec(_WIDE, (3, 8, 27, 3), decoder_channels=768),
    "mit_b5": MiTSpec(_WIDE, (3, 6, 40, 3), decoder_channels=768),
}
# The architecture fields a checkpoint's config must share with the variant to be loadable.
_ARCH_FIELDS = (
    "hidden_sizes",
    "depths",
    "num_attention_heads",
    "sr_ratios",
    "mlp_ratios",
    "patch_sizes",
    "strides",
    "num_channels",
)
_HEAD_PREFIXES = ("classifier.", "decode_head.", "head.")
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _import_transformers() -> ModuleType:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            f"The SegFormer (mit_b*) backbones need Hugging Face transformers: {INSTALL_HINT}"
        ) from err
    return transformers


def mit_config(spec: str | MiTSpec, drop_path_rate: float = 0.1) -> Any:
    """The ``transformers.SegformerConfig`` of a variant name (``"mit_b0"``…) or a :class:`MiTSpec`.

    ``drop_path_rate`` 0.1 is the SegFormer / ``SegformerConfig`` default (stochastic depth).
    """
    if isinstance(spec, str):
        if spec not in MIT_VARIANTS:
            raise ValueError(f"unknown MiT variant '{spec}'; expected one of {tuple(MIT_VARIANTS)}")
        spec = MIT_VARIANTS[spec]
    transformers = _import_transformers()
    return transformers.SegformerConfig(
        num_encoder_blocks=4,
        hidden_sizes=list(spec.hidden_sizes),
        depths=list(spec.depths),
        num_attention_heads=list(spec.num_attention_heads),
        sr_ratios=list(spec.sr_ratios),
        mlp_ratios=list(spec.mlp_ratios),
        patch_sizes=[7, 3, 3, 3],
        strides=[4, 2, 2, 2],
        drop_path_rate=drop_path_rate,
        decoder_hidden_size=spec.decoder_channels,
        reshape_last_stage=True,
    )


class MiTEncoder(nn.Module):
    """A ``transformers.SegformerModel`` returning its four stage outputs (strides 4…32).

    ``self.mit`` is the ``SegformerModel`` (so ``encoder.mit.save_pretrained(dir)`` writes a
    folder that ``model.pretrained`` accepts). Attributes: ``variant`` (a name, or
    ``"custom"`` for a :class:`MiTSpec`), ``hidden_sizes``, ``output_stride`` (32).
    """

    def __init__(self, variant: str | MiTSpec = "mit_b0", drop_path_rate: float = 0.1) -> None:
        super().__init__()
        transformers = _import_transformers()
        config = mit_config(variant, drop_path_rate)
        self.variant = variant if isinstance(variant, str) else "custom"
        self.mit = transformers.SegformerModel(config)
        self.hidden_sizes = tuple(config.hidden_sizes)
        self.output_stride = 32

    @property
    def config(self) -> Any:
        return self.mit.config

    def forward(self, x: Tensor) -> list[Tensor]:
        """x [B,3,H,W] → [B,Ci,⌈H/s⌉,⌈W/s⌉] for s = 4, 8, 16, 32."""
        out = self.mit(pixel_values=x, output_hidden_states=True, return_dict=True)
        return list(out.hidden_states)


class AllMLPDecoder(nn.Module):
    """SegFormer's all-MLP decode head plus the DeepLabV3+-style rep head (module docstring).

    Args:
        in_channels: channels of the four encoder stages.
        num_classes: ``C``.
        channels: decoder width ``D``.
        dropout: Dropout2d probability before the classifier and inside the rep head.
        rep_dim: output width of the representation head, or None for no head.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        dropout: float = 0.1,
        rep_dim: int | None = 256,
    ) -> None:
        super().__init__()
        # a per-pixel linear layer on a [B,Ci,h,w] map is a 1×1 conv with bias
        self.proj = nn.ModuleList([nn.Conv2d(c, channels, 1) for c in in_channels])
        self.fuse = nn.Sequential(*_conv_bn_relu(len(in_channels) * channels, channels, 1))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.rep_head = (
            _stride4_head(channels, channels, rep_dim, dropout) if rep_dim is not None else None
        )

    def fused(self, feats: Sequence[Tensor]) -> Tensor:
        """Four maps, the first at stride 4 → the fused map ``[B,D,h,w]`` both heads read."""
        size = feats[0].shape[-2:]
        projected = [proj(f) for proj, f in zip(self.proj, feats, strict=True)]
        projected = [p if p.shape[-2:] == size else _upsample(p, size) for p in projected]
        return self.fuse(torch.cat(projected, dim=1))  # [B,D,h,w]

    def forward(self, feats: Sequence[Tensor], need_rep: bool = True) -> dict[str, Tensor]:
        """Four maps, the first at stride 4 → {"logits": [B,C,h,w], "rep": [B,rep_dim,h,w]}
        (no ``"rep"`` with ``need_rep=False``)."""
        fused = self.fused(feats)  # [B,D,h,w]
        out = {"logits": self.classifier(self.dropout(fused))}
        if self.rep_head is not None and need_rep:
            out["rep"] = self.rep_head(fused)  # raw, not normalised
        return out


class SegFormer(SegModel):
    """MiT encoder + all-MLP decoder with the ``SegModel`` interface (``backbone``, ``decoder``)."""

    def __init__(self, backbone: MiTEncoder, decoder: AllMLPDecoder, num_classes: int) -> None:
        super().__init__(
            backbone, decoder, output_stride=backbone.output_stride, num_classes=num_classes
        )

    def forward(
        self, x: Tensor, need_fp: bool = False, fp_dropout: float = 0.5, need_rep: bool = True
    ) -> dict[str, Tensor]:
        """x [B,3,H,W] → ``{"logits", "rep"?}`` at stride 4; with ``need_fp`` also
        ``"logits_fp"``: UniMatch's feature perturbation, as :meth:`SegModel.forward` does it
        for DeepLabV3+ (one decoder pass on ``cat([f, Dropout2d(f)])`` for each of the four
        stage maps, split in halves; ``rep`` reads the clean half only). ``need_rep=False``
        skips the representation head."""
        feats = self.backbone(x)
        if not need_fp:
            return self.decoder(feats, need_rep)
        n = x.shape[0]
        feats_2b = [torch.cat([f, F.dropout2d(f, fp_dropout, training=True)]) for f in feats]
        dec = self.decoder
        fused_2b = dec.fused(feats_2b)  # [2B,D,h,w]
        logits, logits_fp = dec.classifier(dec.dropout(fused_2b)).split(n)  # [B,C,h,w] each
        out = {"logits": logits, "logits_fp": logits_fp}
        if dec.rep_head is not None and need_rep:
            out["rep"] = dec.rep_head(fused_2b[:n])  # [B,rep_dim,h,w], clean half
        return out


def build_segformer(cfg: ModelConfig, num_classes: int, spec: MiTSpec | None = None) -> SegFormer:
    """SegFormer from ``cfg`` (``cfg.backbone`` names the variant unless ``spec`` is given).

    ``cfg.decoder_channels`` is the decoder width, ``cfg.rep_dim``/``cfg.rep_head`` the rep
    head, ``cfg.dropout`` the dropout; ``cfg.pretrained`` is loaded into the encoder with
    :func:`load_mit_weights`. ``spec`` builds a non-standard MiT (e.g. a slimmer one for a CPU).
    """
    encoder = MiTEncoder(spec if spec is not None else cfg.backbone)
    if cfg.pretrained:
        report = load_mit_weights(encoder, cfg.pretrained)
        log.info(
            "loaded %d MiT tensors from %s (%s)", report["loaded"], cfg.pretrained, report["layout"]
        )
    if spec is None and cfg.decoder_channels != MIT_VARIANTS[cfg.backbone].decoder_channels:
        log.info(
            "%s decoder width %d (the published SegFormer head uses %d)",
            cfg.backbone,
            cfg.decoder_channels,
            MIT_VARIANTS[cfg.backbone].decoder_channels,
        )
    decoder = AllMLPDecoder(
        encoder.hidden_sizes,
        num_classes,
        channels=cfg.decoder_channels,
        dropout=cfg.dropout,
        rep_dim=cfg.rep_dim if cfg.rep_head else None,
    )
    return SegFormer(encoder, decoder, num_classes)


# ---------------------------------------------------------------- pretrained weights


def _where(variant: str) -> str:
    if variant not in MIT_VARIANTS:
        return "A custom MiT has no published weights; use a state dict saved from it."
    hub = variant.replace("_", "-")
    return (
        f"Download the ImageNet MiT weights on a machine with internet, e.g. "
        f"'huggingface-cli download nvidia/{hub} --local-dir {hub}' ('hf download' in recent "
        "huggingface_hub; or "
        f"SegformerModel.from_pretrained('nvidia/{hub}').save_pretrained('{hub}')), copy the "
        "folder here and set model.pretrained to its path (model.pretrained=null trains from "
        "scratch)."
    )


def _check_config(encoder: MiTEncoder, config: Any, source: str) -> None:
    diffs = [
        f"{k}: file {_as_list(getattr(config, k, None))} vs model {_as_list(getattr(encoder.config, k))}"
        for k in _ARCH_FIELDS
        if _as_list(getattr(config, k, None)) != _as_list(getattr(encoder.config, k))
    ]
    if diffs:
        raise ValueError(
            f"The MiT checkpoint '{source}' does not fit the '{encoder.variant}' backbone: "
            + "; ".join(diffs)
            + ". Pick the model.backbone variant the checkpoint was saved from."
        )


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value


def _from_pretrained(encoder: MiTEncoder, source: str, layout: str) -> dict[str, Any]:
    """Load a ``from_pretrained`` source (a folder, or a hub id already in the local cache)."""
    transformers = _import_transformers()
    loaded, info = transformers.SegformerModel.from_pretrained(
        source, local_files_only=True, output_loading_info=True
    )
    _check_config(encoder, loaded.config, source)
    missing = sorted(info.get("missing_keys", []))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", []))
    unexpected = sorted(
        k for k in info.get("unexpected_keys", []) if not k.startswith(_HEAD_PREFIXES)
    )
    if missing or mismatched or unexpected:
        raise ValueError(
            f"The MiT checkpoint '{source}' does not match the '{encoder.variant}' encoder: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(mismatched)} with other shapes (e.g. {mismatched[:3]})."
        )
    state = loaded.state_dict()
    encoder.mit.load_state_dict(state, strict=True)
    return {"layout": layout, "loaded": len(state)}


def _read_state_dict(file: Path) -> dict[str, Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file  # installed with transformers

        return load_file(str(file), device="cpu")
    return unwrap_state_dict(torch.load(file, map_location="cpu", weights_only=True))


def _from_state_dict(encoder: MiTEncoder, file: Path) -> dict[str, Any]:
    """Load a ``.pth``/``.safetensors`` state dict of the encoder, strictly."""
    raw = _read_state_dict(file)
    own = encoder.mit.state_dict()
    # accepted: SegformerModel.state_dict() (no prefix), MiTEncoder.state_dict() ("mit."),
    # a SegformerFor* task model ("segformer."; its classifier/decode_head is dropped)
    best: dict[str, Tensor] = {}
    for prefix in ("", "mit.", "segformer.", "backbone.mit."):
        cand = {
            k[len(prefix) :]: v
            for k, v in raw.items()
            if k.startswith(prefix) and not k[len(prefix) :].startswith(_HEAD_PREFIXES)
        }
        if sum(k in own for k in cand) > sum(k in own for k in best):
            best = cand
    state = best or {k: v for k, v in raw.items() if not k.startswith(_HEAD_PREFIXES)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"The state dict '{file}' does not match the '{encoder.variant}' encoder "
            f"({len(own)} tensors): {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(mismatched)} with "
            f"other shapes (e.g. {mismatched[:3]}). Expected the state_dict() of a "
            "transformers SegformerModel of this variant (or of model.backbone). A checkpoint "
            "from another transformers version or another variant loads best as a folder: "
            "SegformerModel.from_pretrained(...).save_pretrained(DIR), model.pretrained=DIR."
        )
    encoder.mit.load_state_dict(state, strict=True)
    return {"layout": "state-dict", "loaded": len(state)}


def load_mit_weights(encoder: MiTEncoder, path: str) -> dict[str, Any]:
    """Load pretrained MiT weights into ``encoder`` (in place); nothing is downloaded.

    ``path`` is one of:

    * a folder written by ``SegformerModel.save_pretrained`` / a Hugging Face checkpoint
      folder (``config.json`` + weights, e.g. what ``huggingface-cli download nvidia/mit-b0
      --local-dir DIR`` writes; a ``SegformerForImageClassification`` checkpoint's classifier
      is dropped). Loaded with ``from_pretrained(..., local_files_only=True)``, so key names
      from other ``transformers`` versions are converted by ``transformers`` itself;
    * a ``.pth``/``.pt``/``.bin``/``.safetensors`` state dict of the encoder
      (``SegformerModel.state_dict()``, ``model.backbone.state_dict()`` or a ``SegformerFor*``
      state dict with a ``segformer.`` prefix);
    * a hub id such as ``nvidia/mit-b0``, only if it is already in the local Hugging Face cache.

    Returns ``{"layout", "loaded"}`` (layout ``"folder"``, ``"hub-cache"`` or ``"state-dict"``;
    ``loaded`` = number of tensors).

    Raises:
        FileNotFoundError: nothing at ``path`` (a hub id not in the local cache included); the
            message says how to download the weights elsewhere.
        ValueError: the checkpoint's architecture or keys do not fit the variant (strict: no
            missing, unexpected or reshaped tensors); the message names the file and variant.
    """
    file = Path(path).expanduser()
    if file.is_dir():
        if not (file / "config.json").is_file():
            raise ValueError(
                f"'{path}' is a folder without config.json: expected a folder written by "
                f"SegformerModel.save_pretrained (for backbone '{encoder.variant}'), or pass the "
                "path of a .pth/.safetensors state dict."
            )
        return _from_pretrained(encoder, str(file), "folder")
    if file.is_file():
        return _from_state_dict(encoder, file)
    if _HUB_ID.match(path) and file.suffix not in _WEIGHT_SUFFIXES:
        try:
            return _from_pretrained(encoder, path, "hub-cache")
        except OSError as err:  # not in the local cache: never downloaded here
            raise FileNotFoundError(
                f"'{path}' looks like a Hugging Face hub id, but it is not in the local cache and "
                f"brpg never downloads weights (backbone '{encoder.variant}'). On a machine with "
                f"internet run 'huggingface-cli download {path} --local-dir DIR' ('hf download' "
                "in recent huggingface_hub; or "
                f"SegformerModel.from_pretrained('{path}').save_pretrained(DIR)), copy DIR here "
                "and set model.pretrained=DIR."
            ) from err
    raise FileNotFoundError(
        f"Pretrained weights for backbone '{encoder.variant}' not found at '{path}'. "
        f"{_where(encoder.variant)}"
    )
