"""The paper's published numbers, in one place (the paper's tables).

Source: the "Results" section of the official repository's README (djh-dzxw/BRPG at commit
8693114), mIoU in %. The paper's body (its own tables, the SupOnly protocol, the backbone of
each table) was not available; the spec infers ResNet-101 for VOC and Cityscapes, Xception-65
for COCO, and the evaluation protocols of the appendix (evaluation). Note the printed blended 1/2
BRPG number (80.78) is *below* blended 1/4 (81.83); it is recorded as printed.

``PAPER[table][method][cell]`` where ``cell`` is the published split folder
(:mod:`brpg.reproduce.cells`): ``"92"`` … ``"1464"``, ``"662"`` … ``"5291"``, ``"186"`` …
``"1488"``, ``"1_128"`` … ``"1_16"``.
"""

from __future__ import annotations

PAPER_SOURCE = (
    "official BRPG repository README, 'Results' (djh-dzxw/BRPG @ 8693114); the paper's tables. "
    "The paper body was not available."
)

PAPER: dict[str, dict[str, dict[str, float]]] = {
    "voc_classic": {
        "suponly": {"92": 45.77, "183": 54.92, "366": 65.88, "732": 71.69, "1464": 72.50},
        "brpg": {"92": 73.62, "183": 76.55, "366": 78.00, "732": 79.78, "1464": 81.91},
    },
    "voc_blended": {
        "suponly": {"662": 67.87, "1323": 71.55, "2646": 75.80, "5291": 77.13},
        "brpg": {"662": 79.40, "1323": 81.61, "2646": 81.83, "5291": 80.78},
    },
    "cityscapes": {
        "suponly": {"186": 65.74, "372": 72.53, "744": 74.43, "1488": 77.83},
        "brpg": {"186": 76.37, "372": 78.56, "744": 79.46, "1488": 80.26},
    },
    "coco": {
        "suponly": {"1_128": 33.60, "1_64": 37.80, "1_32": 42.24, "1_16": 45.12},
        "brpg": {"1_128": 41.73, "1_64": 45.91, "1_32": 50.55, "1_16": 53.73},
    },
}

#: The hardware the published numbers were trained on (the README's environment).
PAPER_HARDWARE = "4x Tesla V100 32 GB (CUDA 10.2, torch 1.8.0)"


def paper_miou(table: str, method: str, cell: str) -> float | None:
    """The published mIoU of one cell, or None when the paper reports none for it."""
    return PAPER.get(table, {}).get(method, {}).get(cell)
