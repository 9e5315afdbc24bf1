"""BRPG itself, one module per idea of the paper (spec §5-§8); the frameworks it plugs into are
in :mod:`brpg.frameworks`.

- :mod:`.cpg` — CPG: confidence routing of pixel features and their sub-sampling (§5.1, §5.3),
  with the class-specific "csp" thresholds;
- :mod:`.memory` — the CPG memories and COCO's back queue (§5.2, §5.5);
- :mod:`.apo` — APO: dispersion scores and the extra-prototype selection (§6);
- :mod:`.kmeans` — batched k-means over classes (§5.4);
- :mod:`.clustering` — the one-shot clustering: APO + k-means into the bank layout (§5.4);
- :mod:`.prototype_ema` — the prototype bank and its EMA update (§7);
- :mod:`.prototype_loss` — L_pro and its pixel sampling (§8);
- :mod:`.plugin` — :class:`~brpg.method.plugin.BRPGPlugin`, which attaches all of the above to
  a framework's step.
"""
