"""Chapter 3's measurement: are low-confidence pixels closer to a class boundary?

- :func:`route_scenes` → the CPG routing (appendix: CPG) of a run's labeled scenes, as the
  sampling window's student computes it: which stride-4 pixels go to the high memory, to the
  low one, or nowhere (misclassified);
- :func:`confidence_vs_boundary` → the mean distance to the nearest class boundary of the high
  and of the low pixels, pooled and per class, and how often each set reaches the border of
  the map.

Chapter 3 derives both on one run and then checks its claim on every committed seed with
them. Deterministic (seeded dropout, :func:`brpg.book.demo.feature_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from brpg.book.demo import DemoRun, boundary_distance, feature_batch
from brpg.method.cpg import LabeledRoutes, route_labeled

__all__ = ["BoundaryStats", "Routing", "confidence_vs_boundary", "route_scenes"]


@dataclass
class Routing:
    """Where the CPG routing sends every stride-4 pixel of a batch of labeled scenes.

    ``batch`` is :func:`brpg.book.demo.feature_batch`'s output; ``routes`` the
    :func:`brpg.method.cpg.route_labeled` result; the masks are ``[B, h, w]``: ``high`` and
    ``low`` (correct, confidence above / below ``tau_h``), ``wrong`` (misclassified, dropped)
    and ``valid`` (not an ignored label; ``high | low | wrong == valid``).
    """

    batch: dict[str, Tensor]
    routes: LabeledRoutes
    high: Tensor
    low: Tensor
    wrong: Tensor
    valid: Tensor


def route_scenes(
    run: DemoRun, n_images: int | None = None, tau_h: float = 0.8, seed: int = 0
) -> Routing:
    """Route the first ``n_images`` labeled scenes (default: all) as the sampling window does:
    the student's features in train mode (dropout seeded by ``seed``), the labels downsampled
    to stride 4, high confidence from ``tau_h`` (appendix: CPG)."""
    n = len(run.labeled) if n_images is None else n_images  # type: ignore[arg-type]
    fb = feature_batch(run, "labeled", n_images=n, train_mode=True, seed=seed)
    labels_s = fb["labels_small_bhw"]
    routes = route_labeled(fb["rep_bdhw"], fb["logits_bchw"], labels_s, tau_h=tau_h)
    shape = labels_s.shape
    valid = labels_s != 255
    return Routing(
        batch=fb,
        routes=routes,
        high=(routes.high_cls >= 0).view(shape),
        low=(routes.low_cls >= 0).view(shape),
        wrong=valid & (fb["pred_bhw"] != labels_s),
        valid=valid,
    )


@dataclass
class BoundaryStats:
    """Distances (full-resolution pixels) to the nearest class boundary of routed pixels.

    ``pooled_high`` / ``pooled_low``: mean over all high / low pixels; ``per_class``: rows
    ``(class index, mean high, mean low, n high, n low)`` of the classes with at least
    ``min_pixels`` of each; ``ring_high`` / ``ring_low``: share of the high / low background
    pixels on the outermost ring of the stride-4 map.
    """

    pooled_high: float
    pooled_low: float
    per_class: list[tuple[int, float, float, int, int]]
    ring_high: float
    ring_low: float

    @property
    def classes_closer(self) -> int:
        """Classes whose low pixels are, on average, closer to a boundary than their high ones."""
        return sum(low < high for _, high, low, _, _ in self.per_class)


def confidence_vs_boundary(routing: Routing, min_pixels: int = 10) -> BoundaryStats:
    """Chapter 3's claim on one routing: the boundary distance of its high and low pixels,
    pooled, per class (classes with ``min_pixels`` of each) and on the map's border ring.
    The distance is :func:`brpg.book.demo.boundary_distance`, read at the stride-4 positions."""
    labels_s = routing.batch["labels_small_bhw"]
    dist = boundary_distance(routing.batch["labels_bhw"], size=tuple(labels_s.shape[-2:]))
    high, low = routing.high, routing.low
    per_class = []
    for c in range(routing.batch["logits_bchw"].shape[1]):
        h_c, l_c = dist[high & (labels_s == c)], dist[low & (labels_s == c)]
        if h_c.numel() >= min_pixels and l_c.numel() >= min_pixels:
            per_class.append((c, h_c.mean().item(), l_c.mean().item(), h_c.numel(), l_c.numel()))
    border = torch.zeros(labels_s.shape[-2:], dtype=torch.bool)  # outermost ring of the map
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    background = labels_s == 0
    ring = {
        name: float(border.expand_as(m)[m].float().mean())
        for name, m in (("high", high & background), ("low", low & background))
    }
    return BoundaryStats(
        pooled_high=dist[high].mean().item(),
        pooled_low=dist[low].mean().item(),
        per_class=per_class,
        ring_high=ring["high"],
        ring_low=ring["low"],
    )
