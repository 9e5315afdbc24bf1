"""The semi-supervised frameworks BRPG plugs into, one module each (spec §4; paper §3):

- :mod:`.supervised` — the supervised loss (CE + OHEM) and the SupOnly step (spec §4.3, §4.10);
- :mod:`.ema_teacher` — the EMA teacher (spec §4.8);
- :mod:`.augment` — strong augmentation and CutMix (spec §4.2);
- :mod:`.u2pl_loss` — U2PL's entropy-filtered unlabeled loss (spec §4.4);
- :mod:`.mean_teacher` — the mean-teacher step (spec §4, §14);
- :mod:`.unimatch` — the UniMatch step;
- :mod:`.semi_method` — the state of a semi-supervised run: teacher + BRPG plug-in.
"""
