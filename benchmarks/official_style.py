"""An "official-style" prototype step, written from the spec's description of the official code.

This is the baseline of benchmark P1. It follows spec §7, §8 and §13 (our own code, written
from the spec's words, not copied from anywhere) and computes the same numbers as
``brpg.method`` — only the way it computes them is the official one:

- prototypes live in per-class Python lists (``high[c]``: ``k_high(c) × D``, ``low[c]``:
  ``k_low(c) × D``), as left by the one-shot clustering (spec §5.4);
- every step the padded ``C × 6 × D`` tensor is rebuilt with a Python loop over classes that
  repeats a class's last high (low) prototype until it has 3 (spec §7 "Padded tensor");
- the labeled targets are filtered with a numpy mask built on the host (ignore = 255 and
  classes ≥ C are dropped) that then indexes the feature tensor (spec §13, L1261-1269);
- similarities are ``F.cosine_similarity`` of broadcast shapes ``[N, 1, 1, D]`` and
  ``[1, C, 6, D]``, i.e. an ``N × C·6 × D`` intermediate (spec §13, L1308-1309 / L1359-1360);
  the class score is the max over the 6 slots, logits = score / τ, and
  ``L_pro = CE_labeled + CE_unlabeled`` (spec §8);
- after ``backward``, the EMA (spec §7) loops over ``np.unique`` of the targets on the host,
  then over each class's real prototypes, selecting the features of each prototype with a
  boolean mask and checking ``shape[0] > 0`` (one host sync per prototype); padded slot ids are
  mapped back to real prototypes exactly as spec §7 step 2 describes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class OfficialStylePrototypes:
    """Per-class prototype lists with the official per-step padding, loss and EMA.

    Args:
        high: ``C`` tensors ``[k_high(c), D]`` (1 ≤ ``k_high(c)`` ≤ ``k_high_max``).
        low: ``C`` tensors ``[k_low(c), D]``.
        k_high_max, k_low_max: padded slot budget (3 + 3 with APO, spec §6).
        momentum: EMA decay α (0.99).
        tau: temperature τ of the logits (0.1).
        ignore_index: label of ignored pixels (255).
    """

    def __init__(
        self,
        high: list[Tensor],
        low: list[Tensor],
        k_high_max: int = 3,
        k_low_max: int = 3,
        momentum: float = 0.99,
        tau: float = 0.1,
        ignore_index: int = 255,
    ) -> None:
        if len(high) != len(low):
            raise ValueError("high and low need one entry per class")
        self.high = [h.clone() for h in high]
        self.low = [lo.clone() for lo in low]
        self.num_classes = len(high)
        self.k_high_max, self.k_low_max = k_high_max, k_low_max
        self.momentum, self.tau, self.ignore_index = momentum, tau, ignore_index

    def padded(self) -> Tensor:
        """The ``C × (K_h + K_l) × D`` tensor, rebuilt by repeating each list's last prototype."""
        rows = []
        for c in range(self.num_classes):
            h = self.high[c]
            while h.shape[0] < self.k_high_max:
                h = torch.cat([h, h[-1:]], dim=0)
            lo = self.low[c]
            while lo.shape[0] < self.k_low_max:
                lo = torch.cat([lo, lo[-1:]], dim=0)
            rows.append(torch.cat([h, lo], dim=0).unsqueeze(0))
        return torch.cat(rows, dim=0)

    def _similarity(self, feats: Tensor, protos: Tensor) -> tuple[Tensor, Tensor]:
        """Max-over-slots cosine ``[N, C]`` and the arg-max slot ``[N, C]`` (broadcast cosine)."""
        sim_nck = F.cosine_similarity(feats[:, None, None, :], protos[None, :, :, :], dim=-1)
        return sim_nck.max(dim=2)

    def loss(
        self, feats_l: Tensor, targets_l: Tensor, feats_u: Tensor, targets_u: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """``L_pro`` and what the EMA needs: (features, targets, arg-max slot ids) of both sets."""
        protos = self.padded()
        t_np = targets_l.cpu().numpy()
        keep_np = (t_np != self.ignore_index) & (t_np < self.num_classes)
        keep = torch.from_numpy(keep_np).to(feats_l.device)
        f_l, y_l = feats_l[keep], targets_l[keep]
        sim_l, ids_l = self._similarity(f_l, protos)
        loss_l = F.cross_entropy(sim_l / self.tau, y_l)
        sim_u, ids_u = self._similarity(feats_u, protos)
        loss_u = F.cross_entropy(sim_u / self.tau, targets_u)
        saved = (
            torch.cat([f_l.detach(), feats_u.detach()], dim=0),
            torch.cat([y_l, targets_u], dim=0),
            torch.cat([ids_l, ids_u], dim=0),
        )
        return loss_l + loss_u, saved

    @torch.no_grad()
    def ema_update(self, feats: Tensor, targets: Tensor, slot_ids: Tensor) -> None:
        """``r ← α r + (1 − α) mean(features assigned to r)`` for every real prototype (spec §7)."""
        alpha = self.momentum
        kh = self.k_high_max
        for c_np in np.unique(targets.cpu().numpy()):
            c = int(c_np)
            if c < 0 or c >= self.num_classes:
                continue
            sel = targets == c
            f_c = feats[sel]
            ids = slot_ids[sel, c].clone()
            n_h, n_l = self.high[c].shape[0], self.low[c].shape[0]
            ids[(ids < kh) & (ids >= n_h)] = n_h - 1  # padded high slot → last real high
            ids[ids >= kh + n_l] = kh + n_l - 1  # padded low slot → last real low
            if n_h < kh:
                ids[ids >= kh] -= kh - n_h  # low slots follow the real high ones
            protos_c = torch.cat([self.high[c], self.low[c]], dim=0)
            for p in range(n_h + n_l):
                f_p = f_c[ids == p]
                if f_p.shape[0] > 0:
                    protos_c[p] = alpha * protos_c[p] + (1.0 - alpha) * f_p.mean(dim=0)
            self.high[c] = protos_c[:n_h]
            self.low[c] = protos_c[n_h:]

    def step(
        self, feats_l: Tensor, targets_l: Tensor, feats_u: Tensor, targets_u: Tensor
    ) -> Tensor:
        """Loss, backward, EMA: one prototype step. Returns the (detached) loss."""
        loss, (feats, targets, ids) = self.loss(feats_l, targets_l, feats_u, targets_u)
        loss.backward()
        self.ema_update(feats, targets, ids)
        return loss.detach()

    def as_bank_layout(self) -> tuple[Tensor, Tensor]:
        """``(protos[C, K_h + K_l, D], valid[C, K_h + K_l])`` with zeros in unused slots."""
        d = self.high[0].shape[1]
        k = self.k_high_max + self.k_low_max
        protos = self.high[0].new_zeros(self.num_classes, k, d)
        valid = torch.zeros(self.num_classes, k, dtype=torch.bool, device=protos.device)
        for c in range(self.num_classes):
            n_h, n_l = self.high[c].shape[0], self.low[c].shape[0]
            protos[c, :n_h] = self.high[c]
            protos[c, self.k_high_max : self.k_high_max + n_l] = self.low[c]
            valid[c, :n_h] = True
            valid[c, self.k_high_max : self.k_high_max + n_l] = True
        return protos, valid
