"""TensorBoard event files beside ``log.jsonl``: the same records, for a live view of a run.

``log.jsonl`` stays the record the book and the results tables read; this mirror only lets a
reader watch a run with ``tensorboard --logdir runs/``. Scalars written per logged step:
``loss/*`` (every ``loss_*`` of the step), ``train/lr``, ``train/pseudo_*``, ``val/miou``,
``val/mbiou`` and, once per clustering, ``proto/prototypes`` (total) and
``proto/prototypes_per_class/<c>``. On resume the writer purges the events after the
checkpoint's step (``purge_step``), as :meth:`brpg.engine.trainer.Trainer._truncate_log`
drops the JSON records written after it, so a resumed run shows one curve.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

__all__ = ["TensorBoardLog", "tensorboard_available", "tensorboard_enabled"]

_SKIP = ("step", "wall_s", "final", "event")  # bookkeeping fields, not curves


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (which ``torch.utils.tensorboard`` needs) imports."""
    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_enabled(setting: str) -> bool:
    """``train.tensorboard``: ``auto`` (on where the package is importable), ``always``, ``never``."""
    if setting == "always" and not tensorboard_available():
        raise RuntimeError(
            "train.tensorboard=always but the tensorboard package is not installed:"
            " pip install 'brpg[tensorboard]' (or set train.tensorboard=auto)"
        )
    return setting == "always" or (setting == "auto" and tensorboard_available())


def _tag(key: str) -> str:
    if key.startswith("loss"):
        return f"loss/{key}"
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    return f"train/{key}"


class TensorBoardLog:
    """Writes each ``log.jsonl`` record's numbers as scalars into ``run_dir``'s event files.

    ``purge_step``: the step a resumed run restarts from; TensorBoard hides the events at and
    after it that the killed process had written (``None`` for a fresh run).
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def record(self, rec: dict[str, Any]) -> None:
        step = int(rec.get("step", 0))
        for key, value in rec.items():
            if key in _SKIP or isinstance(value, bool):
                continue
            if key == "prototypes_per_class":  # the clustering's event: one value per class
                self.writer.add_scalar("proto/prototypes", sum(value), step)
                for c, n in enumerate(value):
                    self.writer.add_scalar(f"proto/prototypes_per_class/{c}", n, step)
            elif isinstance(value, (int, float)):
                self.writer.add_scalar(_tag(key), value, step)
        self.writer.flush()  # a killed run keeps what it logged, as log.jsonl does

    def close(self) -> None:
        self.writer.close()
