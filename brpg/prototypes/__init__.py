"""Prototype machinery of BRPG: bank + EMA, batched k-means, APO and L_pro (spec §5.4-§8).

- :mod:`.bank` — :class:`PrototypeBank` (multi-prototype cosine classifier, EMA update, spec §7)
  and :func:`pack_high_low` (slot layout of high / low prototypes);
- :mod:`.kmeans` — :func:`batched_kmeans` for the one-shot clustering (spec §5.4);
- :mod:`.apo` — dispersion scores and the extra-prototype selection of APO (spec §6), and
  :func:`cluster_memories` (APO + clustering → bank layout);
- :mod:`.loss` — labeled-grid / unlabeled sampling, :func:`prototype_loss` and the
  pseudo-label threshold ramp (spec §8, §1).
"""

from brpg.prototypes.apo import (
    apo_counts,
    cluster_memories,
    dispersed_mask,
    dispersion,
    dispersion_cos,
    higher_is_dispersed,
    n_add_classes,
    select_classes,
)
from brpg.prototypes.bank import EMPTY_CLASS_LOGIT, PrototypeBank, pack_high_low
from brpg.prototypes.kmeans import KMeansResult, batched_kmeans, batched_kmeans_full
from brpg.prototypes.loss import (
    grid_indices,
    grid_positions,
    prototype_loss,
    pseudo_threshold,
    sample_labeled_grid,
    sample_unlabeled,
)

__all__ = [
    "EMPTY_CLASS_LOGIT",
    "KMeansResult",
    "PrototypeBank",
    "apo_counts",
    "batched_kmeans",
    "batched_kmeans_full",
    "cluster_memories",
    "dispersed_mask",
    "dispersion",
    "dispersion_cos",
    "grid_indices",
    "grid_positions",
    "higher_is_dispersed",
    "n_add_classes",
    "pack_high_low",
    "prototype_loss",
    "pseudo_threshold",
    "sample_labeled_grid",
    "sample_unlabeled",
    "select_classes",
]
