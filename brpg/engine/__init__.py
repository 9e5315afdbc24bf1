"""Training engine: losses live in :mod:`brpg.losses`; metrics, inference, optimiser/schedule,
checkpoints, batching and the trainer live in the submodules of this package."""
