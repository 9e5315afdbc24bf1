"""``brpg eval``: re-evaluate a finished or interrupted run from its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from brpg.config import apply_overrides, config_from_dict
from brpg.engine.trainer import CKPT_NAME, Trainer


def evaluate_run(run_dir: Path, overrides: list[str], progress: bool = True) -> dict[str, Any]:
    """Load ``run_dir/config.yaml`` and ``last.pt``, evaluate, write ``eval.json``.

    ``eval.json`` holds everything :func:`brpg.engine.inference.evaluate` returns (mIoU,
    per-class IoU, pixel accuracy, mBIoU and per-class Boundary IoU) plus the step.
    """
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: is {run_dir} a run directory?")
    if not (run_dir / CKPT_NAME).exists():
        raise FileNotFoundError(f"{run_dir / CKPT_NAME} not found: the run saved no checkpoint yet")
    cfg = config_from_dict(apply_overrides(yaml.safe_load(cfg_path.read_text()), overrides))
    # evaluation only: overrides (e.g. eval.protocol) change no training, so they are allowed
    trainer = Trainer(cfg, run_dir, resume=True, progress=progress, allow_config_change=True)
    res = trainer.evaluate()
    res["step"] = trainer.step
    (run_dir / "eval.json").write_text(json.dumps(res, indent=2))
    return res
