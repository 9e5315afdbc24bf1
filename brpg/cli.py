"""The ``brpg`` command line: ``train``, ``eval`` and ``presets``.

Examples::

    brpg train --config digits_suponly_1_16
    brpg train --config digits_suponly_1_16 --set train.steps=200 --set optim.lr=0.01
    brpg train --config digits_suponly_1_16 --out runs/x --resume
    brpg eval --run runs/x
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from brpg.config import ConfigError, list_presets, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="brpg", description="Train and evaluate BRPG models.")
    sub = p.add_subparsers(dest="cmd", required=True)

    tr = sub.add_parser("train", help="train one config into a run directory")
    tr.add_argument("--config", required=True, help="preset name (see `brpg presets`) or YAML path")
    tr.add_argument("--out", help="run directory (default: runs/<config name>)")
    tr.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )
    tr.add_argument("--resume", action="store_true", help="continue from the run's last.pt")
    tr.add_argument("--no-progress", action="store_true", help="hide progress bars")

    ev = sub.add_parser("eval", help="evaluate a run's checkpoint on its val split")
    ev.add_argument("--run", required=True, help="run directory holding config.yaml and last.pt")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--no-progress", action="store_true")

    sub.add_parser("presets", help="list the config presets")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "presets":
        print("\n".join(list_presets()))
        return 0
    # Heavy imports only once a command needs them (keeps `brpg --help` instant).
    from brpg.data.splitlist import DatasetError
    from brpg.engine.trainer import RunDirError, Trainer

    try:
        if args.cmd == "train":
            cfg = load_config(args.config, args.set)
            if cfg.name == "unnamed":
                cfg.name = Path(args.config).stem
            out = Path(args.out) if args.out else Path("runs") / cfg.name
            trainer = Trainer(cfg, out, resume=args.resume, progress=not args.no_progress)
            summary = trainer.fit()
            if trainer.dist.is_main:
                print(
                    f"{cfg.name}: val mIoU {summary['val_miou']:.2f} % after {summary['steps']}"
                    f" steps ({summary['wall_s']:.0f} s) -> {out / 'summary.json'}"
                )
            return 0
        if args.cmd == "eval":
            from brpg.engine.evaluate_run import evaluate_run

            res = evaluate_run(Path(args.run), args.set, progress=not args.no_progress)
            print(json.dumps({k: res[k] for k in ("miou", "per_class_iou")}, indent=2))
            return 0
    except (ConfigError, DatasetError, RunDirError, FileNotFoundError) as e:
        print(f"brpg: error: {e}", file=sys.stderr)
        return 2
    return 1
