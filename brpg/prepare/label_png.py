"""Label maps as palette PNGs (the PASCAL VOC colour map), their values and sizes checked,
and class histograms for the validation reports.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image

from brpg.prepare.atomic import atomic_write_bytes
from brpg.prepare.base import PrepareError


def voc_colour_map() -> np.ndarray:
    """The 256-entry VOC colour map ``[256, 3]`` uint8, shared by DigitScenes, the real
    benchmarks and data preparation.

    Colour ``i`` spreads the bits of ``i`` over the three channels, most significant bit first:
    0 is black, 1 dark red (128, 0, 0), ..., 255 (ignore) the light (224, 224, 192).
    """
    idx = np.arange(256)
    pal = np.zeros((256, 3), dtype=np.int64)
    for bit in range(8):
        for ch in range(3):
            pal[:, ch] |= ((idx >> (3 * bit + ch)) & 1) << (7 - bit)
    return pal.astype(np.uint8)


@functools.cache
def voc_palette() -> list[int]:
    """The 256-entry PASCAL VOC colour map as a flat ``[r0, g0, b0, r1, ...]`` list."""
    return voc_colour_map().reshape(-1).tolist()


def encode_label_png(label: np.ndarray) -> bytes:
    """Encode an ``HxW`` uint8 label map as a palette PNG (the values are the palette indices)."""
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"label map must be 2-D uint8, got {label.dtype} {label.shape}")
    image = Image.fromarray(label)
    image.putpalette(voc_palette())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_label_png(path: Path, label: np.ndarray) -> None:
    """Write ``label`` to ``path`` as a palette PNG, atomically."""
    atomic_write_bytes(path, encode_label_png(label))


def read_label_png(path: Path) -> np.ndarray:
    """Read a palette or grayscale label PNG as an ``HxW`` uint8 array of label values."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise PrepareError(
                    f"{path} is a {image.mode} image, not a palette or grayscale label map: "
                    "the archive is not the expected release; download it again"
                )
            return np.asarray(image, dtype=np.uint8).copy()
    except (OSError, SyntaxError) as exc:
        raise PrepareError(
            f"cannot read label map {path} ({exc}); delete it and re-run (add --force if needed)"
        ) from exc


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file, reading only its header."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError) as exc:
        raise PrepareError(
            f"cannot read image {path} ({exc}): the file is corrupt; delete it and re-run"
        ) from exc


def check_label_values(label: np.ndarray, allowed: np.ndarray, what: Path | str, fix: str) -> None:
    """Raise :class:`PrepareError` if ``label`` holds values whose ``allowed[value]`` is False."""
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    bad = [int(v) for v in present if not allowed[v]]
    if bad:
        raise PrepareError(f"{what} holds label values {bad} outside the dataset's classes; {fix}")


def check_same_size(image: Path, mask_size: tuple[int, int], mask: Path | str) -> None:
    """Raise :class:`PrepareError` unless the image at ``image`` is ``mask_size`` (w, h)."""
    size = image_size(image)
    if size != mask_size:
        raise PrepareError(
            f"image/mask size mismatch: {image} is {size[0]}x{size[1]} but {mask} is "
            f"{mask_size[0]}x{mask_size[1]}; the archives do not belong together or one is "
            "corrupt: download them again"
        )


def label_histogram(label: np.ndarray) -> np.ndarray:
    """Pixel count of every value 0..255 in ``label`` (int64, length 256)."""
    return np.bincount(label.ravel(), minlength=256).astype(np.int64)


def histogram_dict(hist: np.ndarray) -> dict[str, int]:
    """The non-zero entries of a 256-bin histogram as ``{"value": count}`` for JSON."""
    return {str(int(v)): int(hist[v]) for v in np.flatnonzero(hist)}
