"""``brpg reproduce``: one papermill run of ``book/experiments/train.ipynb`` per table cell.

Every cell gets a folder ``<out>/<profile>/<table>/<preset>/`` holding the executed notebook
(``train.ipynb``), the run (``run/``: config, log, checkpoint), ``summary.json`` and the two
figures. A cell whose ``summary.json`` exists is skipped; an interrupted one resumes from its
checkpoint when the command is repeated (the notebook is called with ``resume=True``).

Launchers:

- ``local``: papermill runs here; the notebook trains in its kernel on one GPU (or the CPU),
  or through ``torchrun`` when ``--gpus`` > 1.
- ``torchrun``: as ``local``, but always through a ``torchrun`` subprocess (also for one GPU).
- ``slurm``: each cell is a Slurm job submitted with ``submitit``, one node with ``--gpus``
  GPUs; the job runs the same papermill call. Rerun the command after a time-out: finished
  cells are skipped and interrupted ones resume. The checkout, its ``.venv`` and the
  ``DATA_ROOT`` must be on a file system that the compute nodes share with the login node.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brpg.data.build import PROJECT_ROOT
from brpg.reproduce.cells import METHODS, Cell, get_table
from brpg.reproduce.experiment import FIXTURE, ExperimentError
from brpg.reproduce.profiles import BATCH_POLICIES, PROFILES

NOTEBOOK = PROJECT_ROOT / "book" / "experiments" / "train.ipynb"
LAUNCHERS = ("local", "torchrun", "slurm")


@dataclass
class SlurmOptions:
    """What ``submitit`` passes to ``sbatch`` (``cluster="debug"`` runs jobs in-process)."""

    partition: str | None = None
    timeout_min: int = 24 * 60
    cpus_per_task: int = 8
    mem_gb: int | None = None
    additional: dict[str, str] = field(default_factory=dict)
    cluster: str = "slurm"


def cell_dir(out: Path, profile: str, cell: Cell) -> Path:
    return out / profile / cell.table / cell.preset


def select_cells(table: str, cells: list[str] | None, methods: list[str] | None) -> list[Cell]:
    """The cells of ``table`` named in ``cells`` (folders or labeled counts; all if None)."""
    try:
        t = get_table(table)
        names = [t.cell_of(c) for c in cells] if cells else list(t.cells)
    except KeyError as err:
        raise ExperimentError(str(err.args[0])) from err
    for m in methods or []:
        if m not in METHODS:
            raise ExperimentError(f"--methods {m!r}: use {' and/or '.join(METHODS)}")
    return [Cell(table, m, c) for m in (methods or list(METHODS)) for c in names]


def notebook_parameters(
    cell: Cell,
    folder: Path,
    *,
    data_root: str,
    gpus: int,
    profile: str,
    overrides: list[str],
    batch_policy: str,
    launcher: str,
    cpu_processes: int = 1,
) -> dict[str, Any]:
    """The papermill parameters of one cell (the names of the notebook's parameters cell)."""
    return {
        "config": cell.preset,
        "data_root": data_root,
        "gpus": gpus,
        "profile": profile,
        "overrides": list(overrides),
        "output_dir": str(folder.resolve()),
        "resume": True,
        "batch_policy": batch_policy,
        "cpu_processes": cpu_processes,
        "force_torchrun": launcher == "torchrun",
    }


def execute_cell_notebook(
    parameters: dict[str, Any], output_notebook: str, notebook: str = str(NOTEBOOK)
) -> str:
    """Run the experiment notebook with papermill, streaming its output; returns the path of
    the executed notebook (kept even when a cell fails: papermill saves it as it goes)."""
    import papermill as pm

    Path(output_notebook).parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(
        notebook,
        output_notebook,
        parameters=parameters,
        kernel_name="python3",
        progress_bar=False,
        stdout_file=sys.stdout,
        stderr_file=sys.stderr,
        cwd=str(Path(output_notebook).parent),
    )
    return output_notebook


def _submit_slurm(jobs: list[tuple[Cell, dict[str, Any], Path]], gpus: int, opts: SlurmOptions):
    try:
        import submitit
    except ImportError as err:  # pragma: no cover - depends on the extra
        raise ExperimentError("--launcher slurm needs submitit: pip install 'brpg[slurm]'") from err
    submitted = []
    for cell, params, folder in jobs:
        executor = submitit.AutoExecutor(folder=folder / "slurm", cluster=opts.cluster)
        params_slurm: dict[str, Any] = {
            "name": cell.preset,
            "timeout_min": opts.timeout_min,
            "nodes": 1,
            "tasks_per_node": 1,  # torchrun inside the job starts one worker per GPU
            "cpus_per_task": opts.cpus_per_task,
        }
        if opts.cluster == "slurm":
            params_slurm["gpus_per_node"] = gpus
            if opts.partition:
                params_slurm["slurm_partition"] = opts.partition
            if opts.mem_gb:
                params_slurm["mem_gb"] = opts.mem_gb
            if opts.additional:
                params_slurm["slurm_additional_parameters"] = dict(opts.additional)
        executor.update_parameters(**params_slurm)
        job = executor.submit(execute_cell_notebook, params, str(folder / "train.ipynb"))
        print(f"{cell.preset}: submitted job {job.job_id} (logs in {folder / 'slurm'})")
        submitted.append(job)
    return submitted


def reproduce(
    table: str,
    cells: list[str] | None = None,
    methods: list[str] | None = None,
    gpus: int = 0,
    launcher: str = "local",
    profile: str = "full",
    data_root: str | None = None,
    out: Path = Path("runs/reproduce"),
    overrides: list[str] | None = None,
    batch_policy: str = "accumulate",
    cpu_processes: int = 1,
    slurm: SlurmOptions | None = None,
    wait: bool = False,
) -> list[dict[str, Any]]:
    """Run (or submit) every selected cell; returns one record per cell.

    ``data_root`` defaults to ``"fixture"`` for the smoke profile; the full profile needs the
    prepared ``DATA_ROOT``.
    """
    selected = select_cells(table, cells, methods)
    if launcher not in LAUNCHERS:
        raise ExperimentError(f"--launcher {launcher!r}: use one of {', '.join(LAUNCHERS)}")
    if profile not in PROFILES:
        raise ExperimentError(f"--profile {profile!r}: use one of {', '.join(PROFILES)}")
    if batch_policy not in BATCH_POLICIES:
        raise ExperimentError(f"--batch-policy {batch_policy!r}: use {', '.join(BATCH_POLICIES)}")
    if data_root is None:
        if profile != "smoke":
            raise ExperimentError(
                "--data-root is required with --profile full: the DATA_ROOT prepared by"
                " data_scripts/ (see data_scripts/README.md)"
            )
        data_root = FIXTURE
    elif data_root != FIXTURE and not Path(data_root).expanduser().is_dir():
        raise ExperimentError(f"--data-root {data_root}: no such folder")
    if launcher == "slurm" and gpus < 1 and (slurm is None or slurm.cluster == "slurm"):
        raise ExperimentError("--launcher slurm needs --gpus >= 1 (GPUs per job)")
    if launcher != "slurm" and not NOTEBOOK.exists():
        raise ExperimentError(f"{NOTEBOOK} not found: run brpg reproduce from a checkout")
    data_root = data_root if data_root == FIXTURE else str(Path(data_root).expanduser().resolve())

    records: list[dict[str, Any]] = []
    pending: list[tuple[Cell, dict[str, Any], Path]] = []
    for cell in selected:
        folder = cell_dir(Path(out), profile, cell)
        if (folder / "summary.json").exists():
            print(f"skip {cell.preset}: done ({folder / 'summary.json'})")
            records.append({"cell": cell, "folder": folder, "status": "done"})
            continue
        status = "resume" if (folder / "run" / "last.pt").exists() else "start"
        params = notebook_parameters(
            cell,
            folder,
            data_root=data_root,
            gpus=gpus,
            profile=profile,
            overrides=overrides or [],
            batch_policy=batch_policy,
            launcher=launcher,
            cpu_processes=cpu_processes,
        )
        records.append({"cell": cell, "folder": folder, "status": status})
        pending.append((cell, params, folder))

    if launcher == "slurm":
        jobs = _submit_slurm(pending, gpus, slurm or SlurmOptions())
        for rec, job in zip((r for r in records if r["status"] != "done"), jobs, strict=True):
            rec["job_id"] = job.job_id
            if wait:
                job.result()
                rec["status"] = "finished"
        return records

    for (cell, params, folder), rec in zip(
        pending, (r for r in records if r["status"] != "done"), strict=True
    ):
        print(f"== {cell.preset} ({rec['status']}) -> {folder}", flush=True)
        execute_cell_notebook(params, str(folder / "train.ipynb"))
        rec["status"] = "finished"
    return records
