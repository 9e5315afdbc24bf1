"""P1 — one prototype step at the VOC paper shapes: ours vs an official-style loop vs a lower bound.

One step = prototype logits + ``L_pro`` (labeled + unlabeled term) + ``backward`` + EMA update of
the prototypes (spec §7, §8). Shapes (spec §8, §6): ``C = 21`` classes, 6 prototype slots per
class (3 high + 3 low; APO gives 2 or 3 real ones of each kind), ``D = 256``; labeled rows are
the 33 × 33 grid of 4 images (4 · 1089 rows, about 5 % with the ignore label 255) and the
unlabeled rows 4 × 1000 pseudo-labelled samples. The feature rows are given directly (a leaf
tensor that receives the gradient), so only the prototype step itself is timed.

Variants:

- ``ours``: :class:`brpg.method.prototype_ema.PrototypeBank` — :func:`brpg.method.prototype_loss.prototype_loss`
  (which calls ``bank.logits``) for both terms, ``backward``, ``bank.ema_update``;
- ``official_style``: :class:`benchmarks.official_style.OfficialStylePrototypes` (per-class
  padding loop, broadcast ``F.cosine_similarity``, host-side masks, per-class / per-prototype
  EMA loops);
- ``lower_bound``: one normalised matmul ``normalize(f) @ normalize(P)ᵀ``, max over slots, CE,
  ``backward``; no EMA and no validity mask (duplicate-padded prototypes).

:func:`agreement` checks that the three compute the same loss and gradient, and that ours and
the official-style loop leave the same prototypes after a few steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import (
    MEMORY_METHODS,
    peak_memory,
    primary_memory_method,
    summarize,
    target,
    time_interleaved,
)
from benchmarks.official_style import OfficialStylePrototypes
from brpg.method.apo import n_add_classes
from brpg.method.prototype_ema import PrototypeBank
from brpg.method.prototype_loss import prototype_loss

TITLE = "P1 prototype step (logits + L_pro + backward + EMA)"
IGNORE = 255


@dataclass(frozen=True)
class P1Shapes:
    classes: int = 21
    k_high: int = 3
    k_low: int = 3
    dim: int = 256
    images: int = 4
    grid: int = 33
    unlabeled_per_image: int = 1000
    ignore_fraction: float = 0.05
    noise: float = 2.0
    tau: float = 0.1
    momentum: float = 0.99

    @property
    def n_labeled(self) -> int:
        return self.images * self.grid * self.grid

    @property
    def n_unlabeled(self) -> int:
        return self.images * self.unlabeled_per_image

    @property
    def slots(self) -> int:
        return self.k_high + self.k_low


FULL = P1Shapes()
QUICK = P1Shapes(classes=5, dim=16, images=2, grid=9, unlabeled_per_image=50)


@dataclass
class P1Inputs:
    protos: Tensor  # [C, K, D], zeros in unused slots
    valid: Tensor  # [C, K]
    n_high: list[int]
    n_low: list[int]
    feats_l: Tensor  # [N_l, D]
    targets_l: Tensor  # [N_l], some 255
    feats_u: Tensor  # [N_u, D]
    targets_u: Tensor  # [N_u]


def make_inputs(shapes: P1Shapes, seed: int = 0, device: str | torch.device = "cpu") -> P1Inputs:
    """Random prototypes (2 or 3 high / low per class as APO gives) and features near them."""
    g = torch.Generator().manual_seed(seed)
    c, d, kh = shapes.classes, shapes.dim, shapes.k_high
    n_add = n_add_classes(c)
    n_high = torch.full((c,), kh - 1, dtype=torch.long)
    n_low = torch.full((c,), shapes.k_low - 1, dtype=torch.long)
    n_high[torch.randperm(c, generator=g)[:n_add]] += 1
    n_low[torch.randperm(c, generator=g)[:n_add]] += 1
    protos = torch.randn(c, shapes.slots, d, generator=g)
    ar = torch.arange(shapes.slots)
    valid = (ar[None, :] < n_high[:, None]) | (
        (ar[None, :] >= kh) & (ar[None, :] < kh + n_low[:, None])
    )
    protos = protos * valid[:, :, None]

    def rows(n: int, ignore_fraction: float) -> tuple[Tensor, Tensor]:
        cls = torch.randint(0, c, (n,), generator=g)
        r = (torch.rand(n, generator=g) * (n_high[cls] + n_low[cls])).long()
        slot = torch.where(r < n_high[cls], r, kh + r - n_high[cls])
        feats = protos[cls, slot] + shapes.noise * torch.randn(n, d, generator=g)
        ignore = torch.rand(n, generator=g) < ignore_fraction
        return feats, torch.where(ignore, torch.full_like(cls, IGNORE), cls)

    feats_l, targets_l = rows(shapes.n_labeled, shapes.ignore_fraction)
    feats_u, targets_u = rows(shapes.n_unlabeled, 0.0)
    dev = torch.device(device)
    return P1Inputs(
        protos.to(dev),
        valid.to(dev),
        n_high.tolist(),
        n_low.tolist(),
        feats_l.to(dev),
        targets_l.to(dev),
        feats_u.to(dev),
        targets_u.to(dev),
    )


class Variant:
    """A step closure plus the leaf feature tensors whose gradient it computes."""

    def __init__(self, step: Callable[[], Tensor], grads: Callable[[], Tensor]) -> None:
        self.step = step
        self.grads = grads


def build_ours(inp: P1Inputs, shapes: P1Shapes) -> tuple[Variant, PrototypeBank]:
    c, k, d = inp.protos.shape
    bank = PrototypeBank(c, d, k, momentum=shapes.momentum, sync=False).to(inp.protos.device)
    bank.set_prototypes(inp.protos, inp.valid)
    feats = torch.cat([inp.feats_l, inp.feats_u]).requires_grad_(True)
    targets = torch.cat([inp.targets_l, inp.targets_u])
    n_l = inp.feats_l.shape[0]

    def step() -> Tensor:
        feats.grad = None
        loss = prototype_loss(bank, feats[:n_l], targets[:n_l], shapes.tau) + prototype_loss(
            bank, feats[n_l:], targets[n_l:], shapes.tau
        )
        loss.backward()
        bank.ema_update(feats.detach(), targets)
        return loss.detach()

    return Variant(step, lambda: feats.grad), bank


def build_official(inp: P1Inputs, shapes: P1Shapes) -> tuple[Variant, OfficialStylePrototypes]:
    kh = shapes.k_high
    high = [inp.protos[c, : inp.n_high[c]] for c in range(shapes.classes)]
    low = [inp.protos[c, kh : kh + inp.n_low[c]] for c in range(shapes.classes)]
    off = OfficialStylePrototypes(
        high, low, kh, shapes.k_low, momentum=shapes.momentum, tau=shapes.tau, ignore_index=IGNORE
    )
    feats_l = inp.feats_l.clone().requires_grad_(True)
    feats_u = inp.feats_u.clone().requires_grad_(True)

    def step() -> Tensor:
        feats_l.grad = None
        feats_u.grad = None
        return off.step(feats_l, inp.targets_l, feats_u, inp.targets_u)

    return Variant(step, lambda: torch.cat([feats_l.grad, feats_u.grad])), off


def build_lower_bound(inp: P1Inputs, shapes: P1Shapes) -> Variant:
    kh = shapes.k_high
    high = [inp.protos[c, : inp.n_high[c]] for c in range(shapes.classes)]
    low = [inp.protos[c, kh : kh + inp.n_low[c]] for c in range(shapes.classes)]
    padded = OfficialStylePrototypes(high, low, kh, shapes.k_low).padded()  # once, not per step
    c, k, d = padded.shape
    protos_md = padded.reshape(c * k, d)
    feats = torch.cat([inp.feats_l, inp.feats_u]).requires_grad_(True)
    targets = torch.cat([inp.targets_l, inp.targets_u])
    n_l = inp.feats_l.shape[0]

    def step() -> Tensor:
        feats.grad = None
        sim = F.normalize(feats, dim=1) @ F.normalize(protos_md, dim=1).t()
        logits = sim.view(-1, c, k).amax(dim=2) / shapes.tau
        loss = F.cross_entropy(logits[:n_l], targets[:n_l], ignore_index=IGNORE) + F.cross_entropy(
            logits[n_l:], targets[n_l:], ignore_index=IGNORE
        )
        loss.backward()
        return loss.detach()

    return Variant(step, lambda: feats.grad)


def agreement(
    shapes: P1Shapes, seed: int = 0, steps: int = 3, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Max absolute differences between ours, the official-style loop and the lower bound.

    Ours and the official-style loop run ``steps`` steps on the same rows (each step's loss
    uses the prototypes the previous EMA left); the lower bound, which has no EMA, is compared
    on the first step only.
    """
    inp = make_inputs(shapes, seed, device)
    ours, bank = build_ours(inp, shapes)
    off_v, off = build_official(inp, shapes)
    low_v = build_lower_bound(inp, shapes)
    loss_diff, grad_diff = 0.0, 0.0
    loss_first = None
    for i in range(steps):
        l_ours = ours.step()
        l_off = off_v.step()
        loss_diff = max(loss_diff, abs(float(l_ours) - float(l_off)))
        grad_diff = max(grad_diff, float((ours.grads() - off_v.grads()).abs().max()))
        if i == 0:
            l_low = low_v.step()
            loss_first = float(l_ours)
            low_loss_diff = abs(float(l_ours) - float(l_low))
            low_grad_diff = float((ours.grads() - low_v.grads()).abs().max())
    protos_off, valid_off = off.as_bank_layout()
    same_valid = bool(torch.equal(valid_off, bank.valid))
    moved = float((bank.prototypes - inp.protos).abs().max())
    proto_diff = float((bank.prototypes - protos_off).abs().max())
    return {
        "steps": steps,
        "first_loss": loss_first,
        "loss_max_abs_diff_official": loss_diff,
        "grad_max_abs_diff_official": grad_diff,
        "prototypes_max_abs_diff_official": proto_diff,
        "prototypes_max_abs_change": moved,
        "same_valid_slots": same_valid,
        "loss_abs_diff_lower_bound_step1": low_loss_diff,
        "grad_max_abs_diff_lower_bound_step1": low_grad_diff,
    }


def _largest_intermediate_bytes(shapes: P1Shapes) -> dict[str, int]:
    """Analytical size of the largest single tensor each variant creates (float32)."""
    n_l_kept = round(shapes.n_labeled * (1 - shapes.ignore_fraction))
    k = shapes.slots
    return {
        "official_style": 4 * n_l_kept * shapes.classes * k * shapes.dim,  # [N, C, 6, D] broadcast
        "ours": 4 * (shapes.n_labeled + shapes.n_unlabeled) * max(shapes.classes * k, shapes.dim),
        "lower_bound": 4
        * (shapes.n_labeled + shapes.n_unlabeled)
        * max(shapes.classes * k, shapes.dim),
    }


def run(quick: bool, device: torch.device, repeats: int | None = None) -> dict[str, Any]:
    """Time the three variants side by side, measure peak memory, check agreement."""
    shapes = QUICK if quick else FULL
    if repeats is not None:
        reps = {"ours": repeats, "official_style": max(1, repeats // 4), "lower_bound": repeats}
    elif quick:
        reps = {"ours": 3, "official_style": 2, "lower_bound": 3}
    else:
        reps = {"ours": 40, "official_style": 3, "lower_bound": 40}
    check = agreement(shapes, seed=0, steps=3 if quick else 2, device=device)
    tol = 1e-5
    check["tolerance"] = tol
    check["agree"] = bool(
        check["loss_max_abs_diff_official"] <= tol
        and check["prototypes_max_abs_diff_official"] <= tol
        and check["loss_abs_diff_lower_bound_step1"] <= tol
        and check["same_valid_slots"]
    )

    inp = make_inputs(shapes, seed=1, device=device)
    variants = {
        "ours": build_ours(inp, shapes)[0],
        "official_style": build_official(inp, shapes)[0],
        "lower_bound": build_lower_bound(inp, shapes),
    }
    # The official-style loop already ran at these shapes in `agreement`: no extra warm-up.
    warmup = {"ours": 2, "official_style": 0, "lower_bound": 2}
    samples = time_interleaved({n: v.step for n, v in variants.items()}, reps, device, warmup)
    meas = {n: summarize(s, "ms", 1e3) for n, s in samples.items()}
    memory = {n: peak_memory(v.step, device) for n, v in variants.items()}
    key = primary_memory_method(device)

    t_ours, t_off, t_low = (meas[n]["median"] for n in ("ours", "official_style", "lower_bound"))
    speedup = t_off / t_ours
    vs_lower = t_ours / t_low
    mem_ratio = memory["ours"][key] / max(memory["official_style"][key], 1)
    return {
        "status": "ok",
        "title": (
            f"P1 prototype step (logits + L_pro + backward + EMA), C={shapes.classes} "
            f"K={shapes.slots} D={shapes.dim} N={shapes.n_labeled}+{shapes.n_unlabeled}"
        ),
        "config": {
            **asdict(shapes),
            "n_labeled": shapes.n_labeled,
            "n_unlabeled": shapes.n_unlabeled,
        },
        "measurements": meas,
        "memory": {
            "primary_method": key,
            "methods": {m: MEMORY_METHODS[m] for m in memory["ours"]},
            "peak_extra_bytes": memory,
            "analytic_largest_tensor_bytes": _largest_intermediate_bytes(shapes),
        },
        "ratios": {
            "official_style_over_ours_time": speedup,
            "ours_over_lower_bound_time": vs_lower,
            "ours_over_official_style_peak_memory": mem_ratio,
            # the same time ratios from the fastest repeat of each (less sensitive to load)
            "official_style_over_ours_time_min": meas["official_style"]["min"]
            / meas["ours"]["min"],
            "ours_over_lower_bound_time_min": meas["ours"]["min"] / meas["lower_bound"]["min"],
        },
        "targets": {
            "speedup_vs_official_style": target(
                speedup, ">=", 100.0, "t(official_style) / t(ours)"
            ),
            "ours_vs_lower_bound": target(vs_lower, "<=", 2.0, "t(ours) / t(lower_bound)"),
            "memory_vs_official_style": target(
                mem_ratio, "<=", 1 / 20, f"peak extra memory ours / official_style ({key})"
            ),
        },
        "check": check,
        "notes": [
            "times are medians over repeats run round-robin in one process after a warm-up; "
            "targets use the medians, *_min ratios use the fastest repeat of each variant",
            "feature rows are given directly (no backbone); the gradient goes to them",
        ],
    }
