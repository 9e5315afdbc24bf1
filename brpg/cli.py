"""The ``brpg`` command line: ``train``, ``eval``, ``presets``, ``seeds``, ``reproduce`` and
``results``.

Examples::

    brpg train --config digits_suponly_1_16
    brpg train --config digits_suponly_1_16 --set train.steps=200 --set optim.lr=0.01
    brpg train --config digits_suponly_1_16 --out runs/x --resume
    brpg eval --run runs/x
    brpg reproduce --table voc_classic --cells 366 --gpus 4 --data-root data
    brpg reproduce --table coco --profile smoke        # CPU pipeline check on fixture data
    brpg seeds --configs digits_suponly_1_16 digits_brpg_1_16 --seeds 0 1 2 --dest results/digits
    brpg results --root results/digits                  # mean ± std over seeds per config
    brpg results --root runs/reproduce                  # the paper's tables beside ours
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
    tr.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: continue even if the config differs from the checkpoint's",
    )
    tr.add_argument("--no-progress", action="store_true", help="hide progress bars")
    tr.add_argument(
        "--progress-interval",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="at most one progress update per this many seconds (e.g. 60 in a log file)",
    )

    ev = sub.add_parser("eval", help="evaluate a run's checkpoint on its val split")
    ev.add_argument("--run", required=True, help="run directory holding config.yaml and last.pt")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--no-progress", action="store_true")

    sub.add_parser("presets", help="list the config presets")

    rp = sub.add_parser(
        "reproduce",
        help="run the paper's table cells through book/experiments/train.ipynb (papermill)",
        description="Run (or submit) one papermill execution of book/experiments/train.ipynb"
        " per table cell. Finished cells are skipped; interrupted ones resume.",
    )
    rp.add_argument("--table", required=True, help="voc_classic | voc_blended | cityscapes | coco")
    rp.add_argument("--cells", nargs="+", help="split folders or labeled counts (default: all)")
    rp.add_argument("--methods", nargs="+", help="brpg and/or suponly (default: both)")
    rp.add_argument("--gpus", type=int, default=0, help="GPUs per cell (0: CPU)")
    rp.add_argument("--launcher", choices=("local", "torchrun", "slurm"), default="local")
    rp.add_argument("--profile", choices=("full", "smoke"), default="full")
    rp.add_argument("--data-root", help="prepared DATA_ROOT (default for smoke: fixture data)")
    rp.add_argument("--out", default="runs/reproduce", help="root of the cell folders")
    rp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    rp.add_argument(
        "--batch-policy",
        choices=("accumulate", "batch", "linear", "none"),
        default="accumulate",
        help="how fewer than 4 GPUs keep the paper's batch (default: gradient accumulation)",
    )
    rp.add_argument("--cpu-processes", type=int, default=1, help=argparse.SUPPRESS)
    rp.add_argument("--slurm-partition")
    rp.add_argument("--slurm-time-min", type=int, default=24 * 60)
    rp.add_argument("--slurm-cpus", type=int, default=8, help="CPUs per job")
    rp.add_argument("--slurm-mem-gb", type=int)
    rp.add_argument(
        "--slurm-param", action="append", default=[], metavar="KEY=VALUE",
        help="extra sbatch parameter (e.g. account=abc, qos=high)",
    )  # fmt: skip
    rp.add_argument("--slurm-cluster", default="slurm", help=argparse.SUPPRESS)
    rp.add_argument("--wait", action="store_true", help="slurm: wait for the jobs to finish")

    sd = sub.add_parser(
        "seeds",
        help="train presets over seeds and keep each run's summary, log and provenance",
        description="Train every --configs preset with each of --seeds (train.seed) and keep"
        " summary.json, log.jsonl, config.yaml and provenance.json in DEST/<config>/seed<k>/"
        " (the layout of the book's committed results). Finished runs are skipped; an"
        " interrupted one resumes from runs/results/ when the command is repeated.",
    )
    sd.add_argument("--configs", nargs="+", required=True, help="preset names or YAML paths")
    sd.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    sd.add_argument("--dest", type=Path, default=Path("results/digits"))
    sd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    rs = sub.add_parser(
        "results",
        help="tables of stored results: seed studies (mean ± std) or paper cells (vs the paper)",
        description="Table the summary.json files under --root. A folder of seed studies"
        " (<config>/seed<k>/summary.json, written by `brpg seeds`) gives one row per config with"
        " mean ± std over seeds; a folder of paper cells (written by `brpg reproduce`) gives the"
        " paper's tables beside ours, as Markdown, HTML and a plot.",
    )
    rs.add_argument("--root", default="runs/reproduce", help="folder searched for summary.json")
    rs.add_argument("--out", help="paper cells: where the tables and plots go (default: --root)")
    rs.add_argument(
        "--paired", action="store_true",
        help="seed studies: also the paired comparisons of the DigitScenes study (book chapter"
        " 8) at every split that has them, with 95 %% t intervals",
    )  # fmt: skip
    return p


def _results(root: Path, out: str | None, paired: bool = False) -> int:
    """``brpg results``: a seed-study table, or the paper-cell report (see the subcommand);
    with ``paired``, the study's paired comparisons per split after the table."""
    from brpg.book.results import format_table, summarise
    from brpg.reproduce.report import build_report, load_summaries

    if not root.is_dir():
        print(f"error: --root {root}: no such folder", file=sys.stderr)
        return 1
    study_rows = summarise(root)
    if study_rows and not load_summaries(root):
        print(format_table(study_rows))
        return _paired_tables(root) if paired else 0
    for r in build_report(root, out).values():
        print(r["markdown"])
        print("wrote " + ", ".join(str(f) for f in r["files"]) + "\n")
    return 0


def _paired_tables(root: Path) -> int:
    """The comparisons of :data:`brpg.book.study.COMPARISONS` at each split of ``root`` that
    has runs of both sides (the analysis of book chapter 8)."""
    from brpg.book.study import CALIBRATION_SPLITS, compare_split, format_comparisons

    found = False
    for split in CALIBRATION_SPLITS:
        try:
            rows = compare_split(root, split)
        except KeyError as err:  # a summary from before Boundary IoU
            print(
                f"error: --paired needs val_mbiou in every summary; missing {err}", file=sys.stderr
            )
            return 1
        if rows:
            found = True
            print(
                f"\n{split.replace('_', '/')} of the labels: paired differences a − b in points,"
                " mean [95 % t interval, n − 1 degrees of freedom], seeds where a is ahead"
            )
            print(format_comparisons(rows))  # fmt: skip
    if not found:
        print("\nno paired comparison: no split has runs of both variants of one", file=sys.stderr)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from brpg.reproduce.runner import SlurmOptions, reproduce

    extra = {}
    for item in args.slurm_param:
        if "=" not in item:
            raise ConfigError(f"--slurm-param {item!r}: use KEY=VALUE (e.g. account=abc)")
        k, v = item.split("=", 1)
        extra[k] = v
    slurm = SlurmOptions(
        partition=args.slurm_partition,
        timeout_min=args.slurm_time_min,
        cpus_per_task=args.slurm_cpus,
        mem_gb=args.slurm_mem_gb,
        additional=extra,
        cluster=args.slurm_cluster,
    )
    records = reproduce(
        args.table,
        cells=args.cells,
        methods=args.methods,
        gpus=args.gpus,
        launcher=args.launcher,
        profile=args.profile,
        data_root=args.data_root,
        out=Path(args.out),
        overrides=args.set,
        batch_policy=args.batch_policy,
        cpu_processes=args.cpu_processes,
        slurm=slurm,
        wait=args.wait,
    )
    for r in records:
        print(f"{r['cell'].preset}: {r['status']} ({r['folder']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "presets":
        print("\n".join(list_presets()))
        return 0
    if args.cmd == "results":
        return _results(Path(args.root), args.out, args.paired)
    # Heavy imports only once a command needs them (keeps `brpg --help` instant).
    from brpg.data.splitlist import DatasetError
    from brpg.engine.trainer import RunDirError, Trainer
    from brpg.reproduce.experiment import ExperimentError

    try:
        if args.cmd == "train":
            cfg = load_config(args.config, args.set)
            if cfg.name == "unnamed":
                cfg.name = Path(args.config).stem
            out = Path(args.out) if args.out else Path("runs") / cfg.name
            trainer = Trainer(
                cfg,
                out,
                resume=args.resume,
                progress=not args.no_progress,
                progress_interval=args.progress_interval,
                allow_config_change=args.allow_config_change,
            )
            summary = trainer.fit()
            if trainer.dist.is_main:
                print(
                    f"{cfg.name}: val mIoU {summary['val_miou']:.2f} %,"
                    f" mBIoU {summary['val_mbiou']:.2f} % after {summary['steps']}"
                    f" steps ({summary['wall_s']:.0f} s) -> {out / 'summary.json'}"
                )
            return 0
        if args.cmd == "seeds":
            from brpg.book.results import format_table, run_and_store, summarise

            for config in args.configs:
                for seed in args.seeds:
                    run_and_store(config, seed, args.dest, args.set)
            print(format_table(summarise(args.dest)))
            return 0
        if args.cmd == "reproduce":
            return _reproduce(args)
        if args.cmd == "eval":
            from brpg.engine.evaluate_run import evaluate_run

            res = evaluate_run(Path(args.run), args.set, progress=not args.no_progress)
            keys = ("miou", "per_class_iou", "mbiou", "per_class_biou", "biou_dilation_ratio")
            print(json.dumps({k: res[k] for k in keys}, indent=2))
            return 0
    except (ConfigError, DatasetError, RunDirError, FileNotFoundError, ExperimentError) as e:
        print(f"brpg: error: {e}", file=sys.stderr)
        return 2
    return 1
