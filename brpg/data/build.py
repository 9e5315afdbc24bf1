"""Build the datasets and loaders a run needs from its :class:`~brpg.config.DataConfig`."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from brpg.config import Config, ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_root(root: str) -> Path:
    """Absolute data root: relative paths are taken from ``$BRPG_HOME``, else the checkout.

    A checkout (``pyproject.toml`` beside the package) keeps data under its own ``data/``
    whether a command runs from the repository root or a notebook runs from ``book/``;
    an installed package falls back to the current directory.
    """
    path = Path(os.path.expanduser(root))
    if path.is_absolute():
        return path
    home = os.environ.get("BRPG_HOME")
    if home:
        return Path(home) / path
    if (PROJECT_ROOT / "pyproject.toml").exists():
        return PROJECT_ROOT / path
    return Path.cwd() / path


def digit_datasets(cfg: Config) -> tuple[Dataset, Dataset, Dataset]:
    """``(labeled, unlabeled, val)`` DigitScenes datasets for ``cfg`` (generated if needed)."""
    from brpg.data import build_digit_datasets

    d = cfg.data
    local = replace(d, root=str(resolve_data_root(d.root)))
    try:
        return build_digit_datasets(local, **d.digits_knobs)
    except TypeError as e:  # an unknown knob name
        raise ConfigError(f"data.digits_knobs: {e}") from e


def build_datasets(cfg: Config) -> tuple[Dataset, Dataset]:
    """``(labeled_train, val)`` for the supervised trainer (see :func:`build_train_datasets`)."""
    labeled, _unlabeled, val = build_train_datasets(cfg, unlabeled=False)
    return labeled, val


def build_train_datasets(
    cfg: Config, unlabeled: bool = True
) -> tuple[Dataset, Dataset | None, Dataset]:
    """``(labeled_train, unlabeled_train or None, val)`` for a run.

    Under DDP rank 0 generates/checks the data first while the others wait, so that two
    processes never write the same cache. An empty unlabeled set (the ``full`` split) with
    ``unlabeled=True`` is an error that says so.
    """
    first = not dist.is_initialized() or dist.get_rank() == 0
    if not first:
        dist.barrier()
    try:
        labeled, unl, val = _build(cfg, unlabeled)
    finally:
        if first and dist.is_initialized():
            dist.barrier()
    if unlabeled and (unl is None or len(unl) == 0):  # type: ignore[arg-type]
        raise ConfigError(
            f"{cfg.name}: the unlabeled split {cfg.data.unlabeled_split!r} is empty; a "
            "semi-supervised method needs unlabeled images (use a split such as 1_16)"
        )
    return labeled, unl, val


def _build(cfg: Config, unlabeled: bool) -> tuple[Dataset, Dataset | None, Dataset]:
    d = cfg.data
    if d.name == "digits":
        return digit_datasets(cfg)
    from brpg.data.benchmarks import BENCHMARKS

    if d.name in BENCHMARKS:
        labeled, val = benchmark_datasets(cfg)
        unl = None
        if unlabeled:
            from brpg.data import benchmarks

            local = replace(cfg, data=replace(d, root=str(resolve_data_root(d.root))))
            unl = benchmarks.unlabeled_dataset(local)
        return labeled, unl, val
    raise ConfigError(
        f"data.name={d.name!r} is not a dataset; use one of: digits, {', '.join(BENCHMARKS)}"
    )


def benchmark_datasets(cfg: Config) -> tuple[Dataset, Dataset]:
    """``(labeled, val)`` of a real benchmark (PASCAL VOC, Cityscapes, COCO) for ``cfg``.

    ``data.root`` (the ``DATA_ROOT`` of ``data_scripts/``) is resolved with
    :func:`resolve_data_root`; a missing prepared folder raises
    :class:`~brpg.data.benchmarks.DataNotPreparedError` naming ``data_scripts/prepare_<name>.py``.
    The val set follows ``cfg.eval``'s protocol (centre-cropped for ``center_crop``).
    """
    from brpg.data import benchmarks

    local = replace(cfg, data=replace(cfg.data, root=str(resolve_data_root(cfg.data.root))))
    return benchmarks.labeled_dataset(local), benchmarks.val_dataset(local)


def build_eval_loader(cfg: Config, val: Dataset, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Val loader; under DDP each rank takes every ``world_size``-th image (no duplicates).

    The per-rank confusion matrices are summed by :func:`brpg.engine.inference.evaluate`.
    """
    if world_size > 1:
        val = Subset(val, list(range(rank, len(val), world_size)))  # type: ignore[arg-type]
    return DataLoader(
        val,
        batch_size=cfg.eval.batch_size,
        shuffle=False,
        num_workers=cfg.data.num_workers,
    )
