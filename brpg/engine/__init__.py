"""Training engine: the phases of a run, the trainer, optimiser/schedule, checkpoints, batching,
runtime (devices, DDP), metrics and inference. The training steps themselves are in
:mod:`brpg.frameworks`; BRPG's parts in :mod:`brpg.method`."""
