"""Loading ImageNet backbone weights from a local file (appendix: configurations).

Nothing is downloaded. Accepted layouts (auto-detected from the keys):

* ``torchvision`` — a torchvision ResNet state dict (``conv1.weight`` 7×7, ``bn1.*``,
  ``layer1.0.conv1.weight``, …; ``fc.*`` is dropped);
* ``deep-stem`` — the community U2PL/UniMatch ``resnet101.pth``: ``conv1.{0,1,3,4,6}.*``
  (a Sequential deep stem), ``bn1.*``, ``layer*``;
* ``timm`` — a timm ``xception65`` state dict (``stem.*``, ``blocks.*``; ``head.*`` dropped);
* the encoder's own ``state_dict()`` (any backbone, including ``small``).

The encoders in this package use exactly these names (``resnet.py``), so no renaming is
needed. A checkpoint may be wrapped in a ``state_dict`` or ``model`` key and may carry a
``module.`` prefix (DDP). Loading is non-strict like the official code (``strict=False``),
but keys whose shapes differ are skipped and reported instead of raising, and a file that
matches *no* key raises.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

_WHERE = {
    "resnet": (
        "Get the ImageNet deep-stem ResNet checkpoint linked from the U2PL README "
        "(https://github.com/Haochen-Wang409/U2PL, 'resnet101.pth'), or save a torchvision one on "
        "a machine with internet: torch.save(torchvision.models.resnet101(weights='IMAGENET1K_V1')"
        ".state_dict(), PATH) (torchvision weights have a 7×7 stem: use model.deep_stem=false)."
    ),
    "xception": (
        "Save timm's ImageNet Xception-65 on a machine with internet: torch.save(timm.create_model("
        "'xception65', pretrained=True).state_dict(), PATH)."
    ),
    "small": "The 'small' backbone has no published weights; use a state dict saved from it.",
}
_HEAD_PREFIXES = ("fc.", "head.")


def _hint(kind: str) -> str:
    for key, text in _WHERE.items():
        if kind.startswith(key):
            return text
    return ""


def unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """Strip ``state_dict``/``model`` wrappers and ``module.`` prefixes; keep tensors only."""
    while isinstance(obj, dict):
        inner = next(
            (obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None
        )
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    out: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def detect_layout(state: dict[str, Tensor]) -> str:
    """'deep-stem', 'torchvision', 'timm' or 'other' from characteristic keys."""
    if "conv1.0.weight" in state:
        return "deep-stem"
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        return "torchvision"
    if any(k.startswith("stem.") for k in state) and any(k.startswith("blocks.") for k in state):
        return "timm"
    return "other"


def load_backbone_weights(backbone: nn.Module, path: str, kind: str) -> dict[str, Any]:
    """Load the matching tensors of the file at ``path`` into ``backbone`` (in place).

    Args:
        backbone: an encoder from this package (``SegModel.backbone``).
        path: a ``.pth`` file readable with ``torch.load(..., weights_only=True)``.
        kind: the backbone name (``cfg.model.backbone``), used for error hints.

    Returns:
        ``{"layout", "loaded", "missing", "unexpected", "mismatched"}``: the detected
        layout, the keys loaded, the backbone keys left at their initial values, the file keys
        with no counterpart (classifier heads excluded) and ``(key, file_shape, model_shape)``
        for keys skipped because their shapes differ.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message says where to get weights).
        ValueError: no key of the file matches the backbone (wrong file).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"Pretrained weights for backbone '{kind}' not found at '{path}'. {_hint(kind)} "
            "Then set model.pretrained to its path, or model.pretrained=null to train from scratch."
        )
    state = unwrap_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    layout = detect_layout(state)
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}

    own = backbone.state_dict()
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if not loadable:
        sample = ", ".join(list(state)[:5]) or "(no tensors)"
        raise ValueError(
            f"None of the {len(state)} tensors in '{path}' (layout '{layout}', first keys: "
            f"{sample}) matches the '{kind}' backbone (first keys: {', '.join(list(own)[:5])}). "
            f"Is this the right file? {_hint(kind)}"
        )
    backbone.load_state_dict(loadable, strict=False)
    return {
        "layout": layout,
        "loaded": sorted(loadable),
        "missing": sorted(k for k in own if k not in loadable),
        "unexpected": sorted(k for k in state if k not in own),
        "mismatched": mismatched,
    }
