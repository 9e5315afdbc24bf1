"""The semi-supervised frameworks BRPG plugs into, one module each (appendix: one step; paper §3):

- :mod:`.supervised` — the supervised loss (CE + OHEM) and the SupOnly step (appendix: one step,
timeline);
- :mod:`.ema_teacher` — the EMA teacher (appendix: one step);
- :mod:`.augment` — strong augmentation and CutMix (appendix: one step);
- :mod:`.u2pl_loss` — U2PL's entropy-filtered unlabeled loss (appendix: one step);
- :mod:`.mean_teacher` — the mean-teacher step (appendix: one step);
- :mod:`.unimatch` — the UniMatch step;
- :mod:`.semi_method` — the state of a semi-supervised run: teacher + BRPG plug-in.
"""
