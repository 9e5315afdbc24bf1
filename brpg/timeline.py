"""The training timeline of the appendix (timeline), shared by every framework and the BRPG plug-in.

One training run moves through four phases, decided by the global step ``s`` alone
(:func:`phase_of`), so that a resumed run knows where it is without any saved flag:

========== ============================================= =====================================
phase      steps                                         what happens
========== ============================================= =====================================
warmup     ``s < S``                                     supervised only (appendix: timeline)
semi       ``S ≤ s``, outside the windows below          the framework's step (mean teacher
                                                         of the appendix (one step), or UniMatch)
sampling   ``Ds ≤ s < Ds + Dl`` (BRPG)                   + CPG memory pushes (appendix: CPG)
proto      ``s ≥ Ds + Dl`` (BRPG)                        + L_pro and prototype EMA (appendix)
========== ============================================= =====================================

with ``S = semi.sup_only_steps``, ``Ds = proto.sample_start_step`` and
``Dl = proto.sample_steps``. The last two phases exist only for ``train.brpg: true``; they are
the plug-in's (:class:`brpg.method.plugin.BRPGPlugin`) and do not depend on the framework.
"""

from __future__ import annotations

from brpg.config import Config

__all__ = ["PHASES", "cluster_due", "phase_of", "sampling_active"]

PHASES = ("warmup", "semi", "sampling", "proto")


def phase_of(step: int, cfg: Config) -> str:
    """The phase of global step ``step`` (0-based): warmup | semi | sampling | proto."""
    if cfg.train.framework == "suponly" or step < cfg.semi.sup_only_steps:
        return "warmup"
    if not cfg.train.brpg:
        return "semi"
    p = cfg.proto
    end = p.sample_start_step + p.sample_steps
    if step < p.sample_start_step:
        return "semi"
    if step < end:
        return "sampling"
    return "proto"


def sampling_active(step: int, cfg: Config) -> bool:
    """Whether step ``step`` pushes rows into the memories (the window, or periodic re-clustering)."""
    ph = phase_of(step, cfg)
    return ph == "sampling" or (ph == "proto" and cfg.proto.recluster_every > 0)


def cluster_due(step: int, cfg: Config) -> bool:
    """Whether the memories are clustered before step ``step`` (one-shot, or periodically)."""
    if not cfg.train.brpg:
        return False
    p = cfg.proto
    end = p.sample_start_step + p.sample_steps
    if step == end:
        return True
    return p.recluster_every > 0 and step > end and (step - end) % p.recluster_every == 0
