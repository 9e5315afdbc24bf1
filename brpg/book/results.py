"""Committed results with provenance: run a config over seeds, store, load, summarise.

The book's chapters do not re-train everything at build time (that would take hours on a
CPU); they load results committed under ``results/``, each produced by a command recorded
next to it, and re-run one short run live. Layout::

    results/digits/<config>/seed<k>/summary.json   (the run's summary, config and commit)
    results/digits/<config>/seed<k>/log.jsonl      (its training log)
    results/digits/<config>/seed<k>/provenance.json (command, commit, machine, date)

The commands (:mod:`brpg.cli`)::

    brpg seeds --configs digits_suponly_1_16 digits_suponly_full --seeds 0 1 2 \
        --dest results/digits
    brpg results --root results/digits
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from brpg.engine import runtime


def load_runs(dest: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``{config_name: [summary, ...]}`` for every ``<config>/seed*/summary.json`` under dest."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(dest).glob("*/seed*/summary.json")):
        summary = json.loads(path.read_text())
        prov = path.with_name("provenance.json")
        if prov.exists():
            summary["provenance"] = json.loads(prov.read_text())
        out.setdefault(path.parent.parent.name, []).append(summary)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        raise ValueError("no values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(dest: str | Path) -> list[dict[str, Any]]:
    """One row per config: mean ± std of val mIoU over seeds, steps and wall time.

    Also mean ± std of val mBIoU (Boundary IoU) over the seeds whose summary has it
    (``mbiou_seeds`` of them); summaries written before it was computed lack the key, and a
    config with none gets ``mbiou_mean = mbiou_std = None``.
    """
    rows = []
    for name, runs in load_runs(dest).items():
        m, s = mean_std([r["val_miou"] for r in runs])
        mbious = [r["val_mbiou"] for r in runs if r.get("val_mbiou") is not None]
        bm, bs = mean_std(mbious) if mbious else (None, None)
        rows.append(
            {
                "config": name,
                "seeds": len(runs),
                "miou_mean": m,
                "miou_std": s,
                "mious": [r["val_miou"] for r in runs],
                "mbiou_mean": bm,
                "mbiou_std": bs,
                "mbiou_seeds": len(mbious),
                "steps": runs[0]["steps"],
                "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs),
            }
        )
    return rows


def mean_std_text(mean: float, std: float, n: int, show_n: bool = False) -> str:
    """``"m ± s"`` over ``n`` seeds (``"m ± s (n=k)"`` with ``show_n``); ``"m (one seed)"`` for
    one, whose spread is unknown rather than zero."""
    if n == 1:
        return f"{mean:.1f} (one seed)"
    return f"{mean:.1f} ± {std:.1f}" + (f" (n={n})" if show_n else "")


def _mbiou_cell(r: dict[str, Any]) -> str:
    """``mean ± std``; "—" when no seed has mBIoU; ``(k of n seeds)`` when only some have it."""
    if r.get("mbiou_mean") is None:
        return "—"
    if r["mbiou_seeds"] == 1 < r["seeds"]:  # say which one seed, not "(one seed)" twice
        return f"{r['mbiou_mean']:.1f} (1 of {r['seeds']} seeds)"
    cell = mean_std_text(r["mbiou_mean"], r["mbiou_std"], r["mbiou_seeds"])
    if r["mbiou_seeds"] != r["seeds"]:
        cell += f" ({r['mbiou_seeds']} of {r['seeds']} seeds)"
    return cell


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| config | seeds | val mIoU (%) | per seed | val mBIoU (%) | steps | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = ", ".join(f"{v:.1f}" for v in r["mious"])
        lines.append(
            f"| {r['config']} | {r['seeds']} | {mean_std_text(r['miou_mean'], r['miou_std'], r['seeds'])} | {per}"
            f" | {_mbiou_cell(r)} | {r['steps']} | {r['wall_s_mean']:.0f} |"
        )
    return "\n".join(lines)


def miou_by_seed(dest: str | Path, config: str) -> dict[int, float]:
    """``{seed: val mIoU}`` of the committed runs of ``config`` under ``dest``."""
    out = {}
    for run in load_runs(dest).get(config, []):
        out[int(run["config"]["train"]["seed"])] = float(run["val_miou"])
    return out


# Issue 13's calibration of DigitScenes v3 (a benchmark where semi-supervision has room and
# shows): (name, config a, config b or None, bound). Without b: every seed of a has mIoU >=
# bound. With b: every seed s has a(s) - b(s) >= bound, seeds paired.
DIGITS_CALIBRATION: tuple[tuple[str, str, str | None, float], ...] = (
    ("SupOnly full >= 70 % mIoU", "digits_suponly_full", None, 70.0),
    (
        "SupOnly full - SupOnly 1/16 >= 15 points",
        "digits_suponly_full",
        "digits_suponly_1_16",
        15.0,
    ),
    ("SupOnly full - SupOnly 1/8 >= 15 points", "digits_suponly_full", "digits_suponly_1_8", 15.0),
    (
        "mean teacher - SupOnly, 1/16 >= 3 points",
        "digits_meanteacher_1_16",
        "digits_suponly_1_16",
        3.0,
    ),
    (
        "mean teacher - SupOnly, 1/8 >= 3 points",
        "digits_meanteacher_1_8",
        "digits_suponly_1_8",
        3.0,
    ),
)


def calibration_checks(
    dest: str | Path | list[str | Path],
    checks: tuple[tuple[str, str, str | None, float], ...] = DIGITS_CALIBRATION,
    seeds_needed: int = 3,
) -> list[dict[str, Any]]:
    """Each check of ``checks`` on the runs under ``dest``: per-seed values and a status.

    ``dest`` may be a list of folders: each config's runs are read from the first folder
    that has any (e.g. the study's runs, then the calibration's for a config the study has
    not run). ``status``: ``"met"`` (every seed passes and there are ``seeds_needed`` of
    them), ``"holds so far"`` (every seed passes, fewer seeds), ``"missed"`` (a seed fails)
    or ``"no runs"``. A difference uses only the seeds both configs have.
    """
    dests = dest if isinstance(dest, list) else [dest]

    def runs(config: str) -> dict[int, float]:
        return next((v for d in dests if (v := miou_by_seed(d, config))), {})

    out = []
    for name, a, b, bound in checks:
        va = runs(a)
        if b is None:
            values = va
        else:
            vb = runs(b)
            values = {s: va[s] - vb[s] for s in sorted(set(va) & set(vb))}
        if not values:
            status = "no runs"
        elif any(v < bound for v in values.values()):
            status = "missed"
        else:
            status = "met" if len(values) >= seeds_needed else "holds so far"
        out.append({"check": name, "bound": bound, "values": values, "status": status})
    return out


def format_calibration(checks: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`calibration_checks`: check, per-seed values, status."""
    lines = ["| check | per seed | status |", "|---|---|---|"]
    for c in checks:
        per = ", ".join(f"seed {s}: {v:.1f}" for s, v in c["values"].items()) or "—"
        lines.append(f"| {c['check']} | {per} | {c['status']} |")
    return "\n".join(lines)


def work_dir(work_root: str | Path, dest: str | Path, config: str, seed: int) -> Path:
    """Where :func:`run_and_store` trains ``config`` with ``seed`` for ``dest``:
    ``work_root/<dest name>/<config>/seed<k>`` (checkpoints and the growing log)."""
    return Path(work_root) / Path(dest).name / config / f"seed{seed}"


def run_and_store(
    config: str,
    seed: int,
    dest: Path,
    overrides: list[str],
    progress: bool = False,
    work_root: str | Path = "runs/results",
) -> dict[str, Any]:
    """Train ``config`` with ``train.seed=seed``; keep summary, log and provenance in ``dest``.

    The run itself lives in ``work_root/<dest name>/<config>/seed<k>`` (checkpoints, not
    committed); an interrupted run resumes from there when the command is repeated.
    """
    from brpg.config import load_config
    from brpg.engine.trainer import Trainer

    sets = [*overrides, f"train.seed={seed}"]
    cfg = load_config(config, sets)
    target = dest / cfg.name / f"seed{seed}"
    if (target / "summary.json").exists():
        print(f"skip {target} (done)")
        return json.loads((target / "summary.json").read_text())
    # Train in a persistent work dir so that a crash or a kill loses at most ckpt_every steps:
    # rerunning the same command resumes from its last checkpoint.
    work = work_dir(work_root, dest, cfg.name, seed)
    resume = (work / "last.pt").exists()
    if resume:
        print(f"resume {work}")
    # the code that runs is the checkout at start (modules are imported once); a commit made
    # while the run trains must not be recorded as its provenance
    commit_at_start = runtime.git_commit()
    trainer = Trainer(cfg, work, resume=resume, progress=progress)
    summary = trainer.fit()
    target.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "log.jsonl", "config.yaml"):
        shutil.copy(work / name, target / name)
    cmd = f"brpg train --config {config} " + " ".join(f"--set {s}" for s in sets)
    provenance = {
        "command": cmd,
        "commit": commit_at_start,
        "commit_at_end": runtime.git_commit(),
        "machine": summary["machine"],
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    (target / "provenance.json").write_text(json.dumps(provenance, indent=2))
    print(
        f"{cfg.name} seed {seed}: {summary['val_miou']:.2f} % mIoU,"
        f" {summary['val_mbiou']:.2f} % mBIoU ({summary['wall_s']:.0f} s)"
    )
    return summary
