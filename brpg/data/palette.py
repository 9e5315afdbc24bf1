"""The PASCAL VOC colour map, shared by DigitScenes, the real benchmarks and data preparation."""

from __future__ import annotations

import numpy as np


def voc_colour_map() -> np.ndarray:
    """The 256-entry VOC colour map ``[256, 3]`` uint8.

    Colour ``i`` spreads the bits of ``i`` over the three channels, most significant bit first:
    0 is black, 1 dark red (128, 0, 0), ..., 255 (ignore) the light (224, 224, 192).
    """
    idx = np.arange(256)
    pal = np.zeros((256, 3), dtype=np.int64)
    for bit in range(8):
        for ch in range(3):
            pal[:, ch] |= ((idx >> (3 * bit + ch)) & 1) << (7 - bit)
    return pal.astype(np.uint8)
