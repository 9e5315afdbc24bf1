"""The CPU smoke path of the reproduction: papermill, the launchers, resume, the results table.

``brpg reproduce --profile smoke`` runs one cell of each of the four tables end to end through
``book/experiments/train.ipynb`` on the miniature fixture data; ``brpg results`` tables them.

Machine: exact, same-machine, bound. Summaries, run evidence and tables of the smoke cells are
bookkeeping (exact; the smoke profile pins train.amp=off); a killed and rerun smoke cell's log and
mIoU equal the straight run's on the same machine (same-machine); that a BRPG cell formed
prototypes is bound.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from brpg import cli
from brpg.reproduce import report
from brpg.reproduce.cells import TABLES, Cell
from brpg.reproduce.experiment import ExperimentError, prepare
from brpg.reproduce.runner import SlurmOptions, cell_dir, reproduce

pytestmark = pytest.mark.slow

SMOKE_CELLS = [  # (table, cell, method, extra CLI args)
    ("voc_classic", "92", "brpg", []),
    ("voc_blended", "662", "suponly", []),
    ("cityscapes", "186", "brpg", ["--cpu-processes", "2"]),  # the torchrun path, on CPU
    ("coco", "925", "brpg", []),
]


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reproduce")
    for table, cell, method, extra in SMOKE_CELLS:
        args = ["reproduce", "--table", table, "--cells", cell, "--methods", method]
        assert cli.main([*args, "--profile", "smoke", "--out", str(out), *extra]) == 0
    return out


def _log_without_wall(path: Path) -> list[dict]:
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


def test_smoke_cells_run_end_to_end(smoke_root):
    for table, token, method, _ in SMOKE_CELLS:
        c = Cell(table, method, TABLES[table].cell_of(token))
        folder = cell_dir(smoke_root, "smoke", c)
        s = json.loads((folder / "summary.json").read_text())
        assert (s["table"], s["cell"], s["method"], s["profile"]) == (
            table,
            c.cell,
            method,
            "smoke",
        )
        assert s["steps"] == 8 and s["paper_miou"] == c.paper
        assert s["protocol"]["protocol"] == load_protocol(c)
        assert s["gpu"] == {"type": None, "count": 0}
        assert (folder / "curves.png").stat().st_size > 0
        assert (folder / "predictions.png").stat().st_size > 0
        nb = nbformat.read(folder / "train.ipynb", as_version=4)  # the executed notebook is kept
        code = [x for x in nb.cells if x.cell_type == "code"]
        assert all(x.get("execution_count") for x in code)
        assert any("injected-parameters" in x.metadata.get("tags", []) for x in code)
    cs = json.loads((cell_dir(smoke_root, "smoke", Cell("cityscapes", "brpg", "186"))
                     / "summary.json").read_text())  # fmt: skip
    assert cs["world_size"] == 2 and cs["processes"] == 2


def test_run_evidence_reads_the_cells_log(smoke_root):
    """Each loss term starts where the cell's config says its phase starts (log steps count from
    1); a BRPG cell forms prototypes; a SupOnly cell has neither L_u nor prototypes."""
    folder = cell_dir(smoke_root, "smoke", Cell("coco", "brpg", "1_128"))
    brpg = dict(report.run_evidence(folder))
    cfg = json.loads((folder / "summary.json").read_text())["config"]
    s, p = cfg["semi"]["sup_only_steps"], cfg["proto"]
    proto_start = p["sample_start_step"] + p["sample_steps"]
    assert brpg["steps run"] == "8 of 8"
    assert brpg["loss terms computed"] == (
        f"loss_sup from step 1, loss_unsup from step {s + 1}, loss_proto from step {proto_start + 1}"
    )
    assert int(brpg["prototypes formed"].split()[0]) > 0
    sup = dict(
        report.run_evidence(cell_dir(smoke_root, "smoke", Cell("voc_blended", "suponly", "662")))
    )
    assert sup["loss terms computed"] == "loss_sup from step 1"
    assert sup["prototypes formed"] == "— (no BRPG)"


def load_protocol(cell: Cell) -> str:
    from brpg.config import load_config

    return load_config(cell.preset).eval.protocol


def test_finished_cells_are_skipped(smoke_root, capsys):
    folder = cell_dir(smoke_root, "smoke", Cell("voc_blended", "suponly", "662"))
    before = (folder / "summary.json").stat().st_mtime_ns
    records = reproduce("voc_blended", ["662"], ["suponly"], profile="smoke", out=smoke_root)
    assert [r["status"] for r in records] == ["done"]
    assert (folder / "summary.json").stat().st_mtime_ns == before
    assert "skip voc_suponly_blended_662" in capsys.readouterr().out


def test_results_table_keeps_smoke_apart(smoke_root, tmp_path):
    assert cli.main(["results", "--root", str(smoke_root), "--out", str(tmp_path)]) == 0
    smoke = (tmp_path / "results_smoke.md").read_text()
    assert report.SMOKE_BANNER in smoke
    assert smoke.count("| voc_classic |") == smoke.count("| coco |") == 1
    assert len([ln for ln in smoke.splitlines() if ln.startswith("| voc") or ln.startswith(
        "| city") or ln.startswith("| coco")]) == 4  # fmt: skip
    assert "| — |" in smoke  # no difference to the paper for smoke runs
    assert "No full-profile cell has been run yet." in (tmp_path / "results_full.md").read_text()
    assert (tmp_path / "results_smoke.png").exists() and (tmp_path / "results_smoke.html").exists()


def _kill_tree(pid: int) -> None:
    parent = psutil.Process(pid)
    procs = [*parent.children(recursive=True), parent]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def test_killed_smoke_run_resumes_with_nothing_lost(smoke_root, tmp_path):
    """SIGKILL papermill, its kernel and the trainer after the first checkpoint; rerun; the
    finished run's log equals the straight run's (every step once, same losses, same mIoU)."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "brpg", "reproduce", "--table", "voc_classic", "--cells", "92",
           "--methods", "brpg", "--profile", "smoke", "--out", str(out)]  # fmt: skip
    folder = cell_dir(out, "smoke", Cell("voc_classic", "brpg", "92"))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (folder / "run" / "last.pt").exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        _kill_tree(proc.pid)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert not (folder / "summary.json").exists(), "the run finished before it was killed"
    log = _log_without_wall(folder / "run" / "log.jsonl")
    assert max(r["step"] for r in log) < 8

    subprocess.run(cmd, check=True, capture_output=True)
    resumed = _log_without_wall(folder / "run" / "log.jsonl")
    straight_dir = cell_dir(smoke_root, "smoke", Cell("voc_classic", "brpg", "92"))
    assert resumed == _log_without_wall(straight_dir / "run" / "log.jsonl")
    s_resumed = json.loads((folder / "summary.json").read_text())
    s_straight = json.loads((straight_dir / "summary.json").read_text())
    assert s_resumed["val_miou"] == s_straight["val_miou"]
    assert s_resumed["per_class_iou"] == s_straight["per_class_iou"]


def test_slurm_launcher_submits_through_submitit(tmp_path):
    """submitit's ``debug`` cluster runs the job in this process: the same papermill call a
    Slurm node makes."""
    pytest.importorskip("submitit")
    records = reproduce(
        "voc_classic",
        ["92"],
        ["suponly"],
        launcher="slurm",
        profile="smoke",
        out=tmp_path,
        slurm=SlurmOptions(cluster="debug"),
        wait=True,
    )
    assert [r["status"] for r in records] == ["finished"] and records[0]["job_id"]
    folder = cell_dir(tmp_path, "smoke", Cell("voc_classic", "suponly", "92"))
    assert json.loads((folder / "summary.json").read_text())["steps"] == 8
    assert (folder / "slurm").is_dir()


def test_bad_parameters_fail_in_the_first_cell(tmp_path):
    import papermill as pm

    from brpg.reproduce.runner import NOTEBOOK

    out = tmp_path / "bad.ipynb"
    with pytest.raises(pm.PapermillExecutionError, match="config='voc_brpg_classic_367'"):
        pm.execute_notebook(str(NOTEBOOK), str(out), kernel_name="python3", progress_bar=False,
                            parameters={"config": "voc_brpg_classic_367"})  # fmt: skip
    nb = nbformat.read(out, as_version=4)
    failed = [c for c in nb.cells if c.cell_type == "code" and any(
        o.get("output_type") == "error" for o in c.get("outputs", []))]  # fmt: skip
    assert len(failed) == 1 and "prepare(" in failed[0].source  # the parameter-check cell


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"config": "voc_brpg_clasic_366"}, "Did you mean 'voc_brpg_classic_366'"),
        ({"data_root": "/nonexistent/data"}, "data_root='/nonexistent/data' is not a folder"),
        ({"gpus": 1}, "gpus=1 but this machine shows 0 GPU"),
        ({"profile": "full"}, "only runs with profile='smoke'"),
        ({"profile": "quick"}, "profile='quick'"),
        ({"overrides": "train.steps=3"}, "give a list"),
        ({"batch_policy": "more"}, "batch_policy='more'"),
        ({"overrides": ["train.stepz=3"]}, "Did you mean 'steps'"),
    ],
)
def test_prepare_names_the_bad_parameter(tmp_path, kwargs, match):
    import torch

    if kwargs.get("gpus") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = {"config": "voc_brpg_classic_366", "data_root": "fixture", "profile": "smoke",
            "output_dir": tmp_path} | kwargs  # fmt: skip
    with pytest.raises(ExperimentError, match=match):
        prepare(**args)


def test_a_run_folder_is_not_resumed_with_another_config(tmp_path):
    exp = prepare("coco_suponly_1_128", "fixture", profile="smoke", output_dir=tmp_path)
    exp.cfg.train.steps = 2
    exp.train(progress=False)
    with pytest.raises(ExperimentError, match="train.steps: 2 -> 8"):
        prepare("coco_suponly_1_128", "fixture", profile="smoke", output_dir=tmp_path)
    with pytest.raises(ExperimentError, match="set resume=True"):
        prepare("coco_suponly_1_128", "fixture", profile="smoke", output_dir=tmp_path,
                resume=False)  # fmt: skip


def test_full_profile_needs_a_data_root(tmp_path):
    with pytest.raises(ExperimentError, match="--data-root is required"):
        reproduce("coco", ["1_32"], profile="full", out=tmp_path)
    with pytest.raises(ExperimentError, match="no table 'voc'"):
        reproduce("voc", profile="smoke", out=tmp_path)
