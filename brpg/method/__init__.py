"""BRPG itself, one module per idea of the paper (each described in the book's appendix, "What the
authors' code does"); the frameworks it plugs into are in :mod:`brpg.frameworks`.

- :mod:`.cpg` — CPG: confidence routing of pixel features and their sub-sampling,
  with the class-specific "csp" thresholds;
- :mod:`.memory` — the CPG memories and COCO's back queue;
- :mod:`.apo` — APO: dispersion scores and the extra-prototype selection;
- :mod:`.kmeans` — batched k-means over classes;
- :mod:`.clustering` — the one-shot clustering: APO + k-means into the bank layout;
- :mod:`.prototype_ema` — the prototype bank and its EMA update;
- :mod:`.prototype_loss` — L_pro and its pixel sampling;
- :mod:`.plugin` — :class:`~brpg.method.plugin.BRPGPlugin`, which attaches all of the above to
  a framework's step.
"""
