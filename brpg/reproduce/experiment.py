"""One table cell, end to end: what ``book/experiments/train.ipynb`` runs.

The notebook is a thin papermill front end (its ``parameters`` cell holds the arguments of
:func:`prepare`); the logic lives here so that it is tested and used once:

1. :func:`prepare` checks every parameter *before* anything runs (an unknown config, a
   missing ``data_root``, more GPUs than the machine has) and resolves the config: the preset,
   the ``smoke`` profile, the GPU-count policy (:mod:`brpg.reproduce.profiles`), the user's
   overrides, in that order.
2. :meth:`Experiment.train` trains in this process on one device, or runs
   ``torchrun --nproc_per_node N -m brpg train`` for several processes and streams its log. A
   checkpoint in ``output_dir/run/`` is resumed (``resume=True``), so rerunning an interrupted
   cell loses at most ``train.ckpt_every`` steps.
3. :meth:`Experiment.finish` writes ``output_dir/summary.json``: the trainer's summary (val
   mIoU under the cell's protocol, per-class IoU, steps, wall time, config and its hash,
   commit) extended with the table cell, the paper's number, the protocol, the profile, the GPU
   type and count; plus ``curves.png`` and ``predictions.png``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from brpg.config import Config, ConfigError, load_config, save_config
from brpg.reproduce.cells import Cell, all_cells
from brpg.reproduce.profiles import (
    BATCH_POLICIES,
    FIXTURE_SPLIT_OF_DATASET,
    PROFILES,
    ProfileError,
    gpu_overrides,
    smoke_overrides,
)

FIXTURE = "fixture"
#: A notebook keeps every progress update as output: at most one a minute over a long run.
PROGRESS_INTERVAL_S = 60.0


class ExperimentError(ValueError):
    """A bad notebook / ``brpg reproduce`` parameter; the message names it and the fix."""


def cell_of_preset(name: str) -> Cell | None:
    """The table cell whose preset is ``name`` (None for other configs)."""
    return next((c for c in all_cells() if c.preset == name), None)


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def fixture_root(output_dir: Path, dataset: str) -> Path:
    """A miniature prepared ``DATA_ROOT`` of ``dataset`` (built once, then reused)."""
    from brpg.prepare.fixtures import prepare_fixture

    root = output_dir / "fixture_data" / dataset
    done = root / ".prepared"
    if not done.exists():
        report = prepare_fixture(root, dataset)
        if not report.get("ok", False):
            raise ExperimentError(f"the {dataset} fixture data could not be prepared: {report}")
        done.write_text("ok\n")
    return root


@dataclass
class Experiment:
    """A resolved, checked cell run; see the module docstring."""

    cfg: Config
    config: str  # as given (preset name or YAML path)
    output_dir: Path
    profile: str
    gpus: int
    processes: int
    resume: bool
    overrides: list[str] = field(default_factory=list)  # everything applied to the preset
    cell: Cell | None = None
    data_root: str = ""
    force_torchrun: bool = False

    @property
    def uses_torchrun(self) -> bool:
        return self.processes > 1 or self.force_torchrun

    @property
    def run_dir(self) -> Path:
        return self.output_dir / "run"

    @property
    def summary_path(self) -> Path:
        return self.output_dir / "summary.json"

    def describe(self) -> str:
        where = (
            f"{self.processes} process(es) via torchrun" if self.uses_torchrun else "this process"
        )
        cell = (
            f"{self.cell.table} / {self.cell.method} / {self.cell.cell}"
            if self.cell
            else "(not a table cell)"
        )
        t = self.cfg.train
        return "\n".join(
            [
                f"config      {self.cfg.name}  (cell {cell})",
                f"profile     {self.profile}",
                f"data_root   {self.data_root}",
                f"device      {self.gpus} GPU(s); training in {where}",
                f"steps       {t.steps} x batch {t.batch_size}"
                f" x accumulation {getattr(t, 'grad_accum', 1)} per process",
                f"eval        {self.cfg.eval.protocol} (crop {self.cfg.eval.crop_size})",
                f"output_dir  {self.output_dir}",
                f"resume      {self.resume and (self.run_dir / 'last.pt').exists()}",
            ]
        )

    # ------------------------------------------------------------------ training
    def train(self, progress: bool = True) -> dict[str, Any]:
        """Train (or resume) into ``run_dir``; returns the trainer's summary."""
        done = self.run_dir / "summary.json"
        if done.exists():
            print(f"{done} exists: training already finished, nothing to do")
            return json.loads(done.read_text())
        resume = (self.run_dir / "last.pt").exists()
        if resume:
            print(f"resuming from {self.run_dir / 'last.pt'}")
        if not self.uses_torchrun:
            from brpg.engine.trainer import Trainer

            trainer = Trainer(
                self.cfg,
                self.run_dir,
                resume=resume,
                progress=progress,
                progress_interval=PROGRESS_INTERVAL_S,
            )
            return trainer.fit()
        return self._train_torchrun(resume, progress)

    def torchrun_command(self, resume: bool, progress: bool = True) -> list[str]:
        cfg_path = self.output_dir / "config.yaml"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={self.processes}",
            "-m",
            "brpg",
            "train",
            "--config",
            str(cfg_path),
            "--out",
            str(self.run_dir),
        ]
        cmd += ["--progress-interval", str(PROGRESS_INTERVAL_S)] if progress else ["--no-progress"]
        return [*cmd, "--resume"] if resume else cmd

    def _train_torchrun(self, resume: bool, progress: bool) -> dict[str, Any]:
        save_config(self.cfg, self.output_dir / "config.yaml")
        cmd = self.torchrun_command(resume, progress)
        print("$ " + shlex.join(cmd), flush=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        tail: deque[str] = deque(maxlen=40)
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        ) as proc:
            assert proc.stdout is not None
            # text mode reads tqdm's carriage returns as line ends: one line per update
            for line in proc.stdout:  # stream the workers' log into the notebook
                tail.append(line)
                print(line, end="", flush=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"torchrun exited with {proc.returncode}; last lines:\n" + "".join(tail)
            )
        return json.loads((self.run_dir / "summary.json").read_text())

    # ------------------------------------------------------------------ results
    def finish(self, summary: dict[str, Any], figures: bool = True) -> dict[str, Any]:
        """Write the extended ``summary.json`` (and the figures); returns it."""
        from brpg.engine import runtime

        c = self.cell
        gpu_type = torch.cuda.get_device_name(0) if self.gpus > 0 else None
        out = dict(summary)
        out.update(
            {
                "table": c.table if c else None,
                "method": c.method
                if c
                else ("brpg" if self.cfg.train.brpg else self.cfg.train.framework),
                "cell": c.cell if c else None,
                "preset": c.preset if c else self.config,
                "labeled": c.n_sup if c else None,
                "paper_miou": c.paper if c else None,
                "profile": self.profile,
                "protocol": dict(self.cfg.to_dict()["eval"]),
                "gpu": {"type": gpu_type, "count": self.gpus},
                "processes": self.processes,
                "hours": round(summary["wall_s"] / 3600, 4),
                "config_hash": self.cfg.hash(),
                "overrides": self.overrides,
                "data_root": self.data_root,
                "commit": summary.get("commit") or runtime.git_commit(),
            }
        )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if figures:
            from brpg.reproduce.figures import save_curves, save_predictions

            save_curves(self.run_dir / "log.jsonl", self.output_dir / "curves.png")
            save_predictions(self.cfg, self.run_dir, self.output_dir / "predictions.png")
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(out, indent=2))
        tmp.replace(self.summary_path)  # written last and atomically: it marks the cell done
        return out


def _check_same_config(saved_path: Path, cfg: Config) -> None:
    """A run directory is only resumed with the config it was started with."""
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text())
    now = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    diff = [
        f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {value!r}"
        for section, values in now.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if saved.get(section, {}).get(key) != value
    ]
    if diff:
        raise ExperimentError(
            f"{saved_path.parent} was started with another config; resuming it with this one"
            " would mix two runs. Changed: " + "; ".join(diff) + ". Use another output_dir"
            " (or the original parameters)."
        )


def _check_params(profile: str, gpus: Any, batch_policy: str, overrides: Any) -> None:
    if profile not in PROFILES:
        raise ExperimentError(f"profile={profile!r}: use one of {', '.join(PROFILES)}")
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
        raise ExperimentError(f"gpus={gpus!r}: use 0 (no GPU) or the number of GPUs to train on")
    available = visible_gpus()
    if gpus > available:
        raise ExperimentError(
            f"gpus={gpus} but this machine shows {available} GPU(s)"
            f" (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}):"
            f" set gpus to at most {available}"
        )
    if batch_policy not in BATCH_POLICIES:
        raise ExperimentError(
            f"batch_policy={batch_policy!r}: use one of {', '.join(BATCH_POLICIES)}"
        )
    if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, str) for o in overrides):
        raise ExperimentError(
            f"overrides={overrides!r}: give a list of 'key.path=value' strings,"
            " e.g. ['train.steps=100']"
        )


def prepare(
    config: str,
    data_root: str,
    gpus: int = 0,
    profile: str = "full",
    overrides: list[str] | tuple[str, ...] = (),
    output_dir: str | Path = "",
    resume: bool = True,
    batch_policy: str = "accumulate",
    cpu_processes: int = 1,
    force_torchrun: bool = False,
) -> Experiment:
    """Check the parameters and resolve the config of one run (see the module docstring).

    Args:
        config: a preset name (``brpg presets``; the table cells are ``voc_brpg_classic_366``
            and alike) or a YAML path.
        data_root: the prepared ``DATA_ROOT`` (``data_scripts/``), or ``"fixture"`` (smoke
            profile only) for the miniature data of the tests, built under ``output_dir``.
        gpus: GPUs to train on: 0 = none (CPU, or ``train.device``), 1 = one GPU in this
            process, N > 1 = ``torchrun`` with N processes.
        profile: ``full`` (the preset as written) or ``smoke`` (an 8-step pipeline check).
        overrides: ``key.path=value`` strings applied last.
        output_dir: where ``run/``, ``summary.json`` and the figures go (default
            ``runs/reproduce/<profile>/<config>``).
        resume: continue from ``output_dir/run/last.pt`` if present; with False an existing
            checkpoint is an error (nothing is overwritten).
        batch_policy: how fewer than 4 GPUs keep the paper's batch (full profile only;
            :mod:`brpg.reproduce.profiles`).
        cpu_processes: with ``gpus=0``, the number of CPU (gloo) processes; > 1 runs the
            ``torchrun`` path on a CPU (used by the tests).
        force_torchrun: train through ``torchrun`` even with one process.
    """
    _check_params(profile, gpus, batch_policy, overrides)
    if not isinstance(cpu_processes, int) or cpu_processes < 1:
        raise ExperimentError(f"cpu_processes={cpu_processes!r}: use an integer >= 1")
    processes = gpus if gpus > 0 else cpu_processes
    try:
        base = load_config(config)
    except ConfigError as err:
        raise ExperimentError(f"config={config!r}: {err}") from err
    cell = cell_of_preset(base.name)
    out = Path(output_dir) if output_dir else Path("runs") / "reproduce" / profile / base.name

    if str(data_root) == FIXTURE:
        if profile != "smoke":
            raise ExperimentError(
                "data_root='fixture' is the miniature test data and only runs with"
                " profile='smoke'; give the DATA_ROOT that data_scripts/ prepared"
            )
        if base.data.name not in FIXTURE_SPLIT_OF_DATASET:
            raise ExperimentError(
                f"there is no fixture for data.name={base.data.name!r}; give a data_root"
            )
        root = fixture_root(out, base.data.name).resolve()
        fixture_split: str | None = FIXTURE_SPLIT_OF_DATASET[base.data.name]
    else:
        root = Path(str(data_root)).expanduser()
        if not str(data_root) or not root.is_dir():
            raise ExperimentError(
                f"data_root={str(data_root)!r} is not a folder. Prepare the data with"
                f" data_scripts/ (see data_scripts/README.md) and pass its DATA_ROOT, or use"
                f" data_root='fixture' with profile='smoke'"
            )
        root = root.resolve()
        fixture_split = None

    sets = [f"data.root={root}"]
    try:
        if profile == "smoke":
            sets += smoke_overrides(base, fixture_split)
        else:
            sets += gpu_overrides(base, processes, batch_policy)
        if gpus == 0 and processes > 1:
            sets.append("train.device=cpu")
        sets += list(overrides)
        cfg = load_config(config, sets)
    except (ConfigError, ProfileError) as err:
        raise ExperimentError(f"{err}") from err
    if cfg.name == "unnamed":
        cfg.name = Path(config).stem

    ckpt = out / "run" / "last.pt"
    if ckpt.exists() and not resume:
        raise ExperimentError(
            f"{out} already holds a run ({ckpt}); set resume=True to continue it or choose"
            " another output_dir"
        )
    _check_same_config(out / "run" / "config.yaml", cfg)
    out.mkdir(parents=True, exist_ok=True)
    return Experiment(
        cfg=cfg,
        config=config,
        output_dir=out,
        profile=profile,
        gpus=gpus,
        processes=processes,
        resume=resume,
        overrides=sets,
        cell=cell,
        data_root=str(root),
        force_torchrun=bool(force_torchrun),
    )
