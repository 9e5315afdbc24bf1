"""The two figures of a cell run: training curves and predictions on validation images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brpg.config import Config


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a run's ``log.jsonl`` (empty if the file is absent)."""
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def save_curves(log_path: Path, out: Path) -> Path:
    """Loss terms and val mIoU (and mBIoU, where logged) against the step, from ``log.jsonl``;
    saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    steps = [r for r in records if "lr" in r]
    evals = [r for r in records if "val_miou" in r]
    keys = sorted({k for r in steps for k in r if k.startswith("loss")})
    fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(9, 3.2))
    for k in keys:
        pts = [(r["step"], r[k]) for r in steps if k in r]
        ax_l.plot(*zip(*pts, strict=True), label=k, lw=1)
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("loss")
    ax_l.set_title("training losses")
    if keys:
        ax_l.legend(fontsize=7)
    if evals:
        ax_m.plot([r["step"] for r in evals], [r["val_miou"] for r in evals], "o-", label="mIoU")
    bevals = [r for r in evals if "val_mbiou" in r]  # logs written before Boundary IoU lack it
    if bevals:
        ax_m.plot(
            [r["step"] for r in bevals], [r["val_mbiou"] for r in bevals], "s--", label="mBIoU"
        )
        ax_m.legend(fontsize=7)
    ax_m.set_xlabel("step")
    ax_m.set_ylabel("val mIoU / mBIoU (%)" if bevals else "val mIoU (%)")
    ax_m.set_title("validation")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@torch.inference_mode()
def save_predictions(cfg: Config, run_dir: Path, out: Path, n_images: int = 3) -> Path:
    """Image, ground truth and prediction of the first ``n_images`` val images (the evaluated
    model of the run's last checkpoint, under the run's protocol); saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from brpg.book.viz import denormalize
    from brpg.data.benchmarks import BENCHMARKS
    from brpg.engine.inference import predict_logits
    from brpg.engine.trainer import Trainer

    trainer = Trainer(cfg, run_dir, resume=True, progress=False, allow_config_change=True)
    model = trainer.eval_model().eval()
    bench = BENCHMARKS.get(cfg.data.name)
    n = min(n_images, len(trainer.val))  # type: ignore[arg-type]
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.4 * n), squeeze=False)
    for i in range(n):
        item = trainer.val[i]
        image = item["image"].unsqueeze(0).to(trainer.device)
        logits = predict_logits(
            model,
            image,
            protocol=cfg.eval.protocol,
            crop_size=cfg.eval.crop_size,
            stride=cfg.eval.stride,
        )
        pred = logits.argmax(1)[0].cpu()
        mask = item["mask"]
        colour = bench.colorize if bench else (lambda m: np.asarray(m))
        panels = [
            ("image", denormalize(item["image"], cfg.data.mean, cfg.data.std)),
            ("ground truth", colour(mask)),
            ("prediction", colour(pred)),
        ]
        for ax, (title, data) in zip(axes[i], panels, strict=True):
            ax.imshow(data, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
