"""Performance benchmarks of brpg (issue 3): ``python -m benchmarks`` or ``python benchmarks/run.py``.

- P1 (:mod:`benchmarks.p1_prototype_step`): one prototype step, ours vs an official-style loop
  (:mod:`benchmarks.official_style`) vs a one-matmul lower bound;
- P2 (:mod:`benchmarks.p2_training_step`): BRPG training step vs mean-teacher step (same model and batch);
- P3 (:mod:`benchmarks.p3_clustering`): the one-shot clustering, batched k-means vs an sklearn loop.

See ``benchmarks/README.md``.
"""
