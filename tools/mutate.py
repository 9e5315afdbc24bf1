"""Mutation testing of the core modules with mutmut, one module at a time (issue 18).

    python tools/mutate.py                 # every module below
    python tools/mutate.py teacher metrics # some of them (by the short names below)
    make mutate                            # the same as the first line

Each module is mutated with only the tests that exercise it selected, in a scratch copy of the
checkout (``.mutmut/<name>/``, git-ignored), so a run finishes in minutes on a 2-core CPU rather
than running the whole suite per mutant. The summary (killed / survived / other per module and
the surviving mutant names) goes to stdout and to ``.mutmut/report.txt``; inspect a survivor
with ``cd .mutmut/<name> && mutmut show <mutant>``; the known survivors and why each is
equivalent are in ``tools/mutation_survivors.md``. Not part of CI.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutmut"

# short name -> (module to mutate, the tests that exercise it)
MODULES: dict[str, tuple[str, list[str]]] = {
    "teacher": (
        "brpg/frameworks/ema_teacher.py",
        ["tests/test_teacher.py", "tests/test_teacher_state.py"],
    ),
    "unsup_loss": (
        "brpg/frameworks/u2pl_loss.py",
        ["tests/test_unsup_loss.py", "tests/test_loss_details.py"],
    ),
    "losses": (
        "brpg/frameworks/supervised.py",
        ["tests/test_losses.py", "tests/test_loss_details.py"],
    ),
    "metrics": (
        "brpg/metrics.py",
        [
            "tests/test_metrics.py",
            "tests/test_metrics_details.py",
            "tests/test_eval_protocol.py::test_confusion_matrix_drops_an_ignore_index_inside_the_classes",
        ],
    ),
    "inference": (
        "brpg/engine/inference.py",
        [
            "tests/test_inference.py",
            "tests/test_inference_details.py",
            "tests/test_eval_protocol.py::test_sliding_windows_are_placed_as_the_authors_offline_eval",
        ],
    ),
    # upsample_logits, mutated with inference.py's tests until issue 27 moved it out of there
    "logits": (
        "brpg/models/logits.py",
        ["tests/test_inference.py", "tests/test_inference_details.py"],
    ),
    "proto_loss": ("brpg/method/prototype_loss.py", ["tests/test_prototypes_loss.py"]),
    "bank": ("brpg/method/prototype_ema.py", ["tests/test_prototypes_bank.py"]),
    "cpg": (
        "brpg/method/cpg.py",
        ["tests/test_cpg.py", "tests/test_plugin.py", "tests/test_back_queue.py"],
    ),
    "apo": ("brpg/method/apo.py", ["tests/test_prototypes_apo.py"]),
    "step": (
        "brpg/frameworks/mean_teacher.py",
        ["tests/test_semi.py", "tests/test_step_reference.py"],
    ),
    "config": ("brpg/config.py", ["tests/test_config.py", "tests/test_guards.py"]),
    "memory": (
        "brpg/method/memory.py",
        [
            "tests/test_cpg.py",
            "tests/test_back_queue.py",
            "tests/test_prototypes_apo.py",
            "tests/test_memory_clustering_edges.py",
        ],
    ),
    "clustering": (
        "brpg/method/clustering.py",
        [
            "tests/test_prototypes_apo.py",
            "tests/test_plugin.py",
            "tests/test_memory_clustering_edges.py",
        ],
    ),
    "kmeans": ("brpg/method/kmeans.py", ["tests/test_prototypes_kmeans.py"]),
    "unimatch": ("brpg/frameworks/unimatch.py", ["tests/test_unimatch.py"]),
}

PYPROJECT = """[tool.mutmut]
source_paths = ["brpg"]
only_mutate = ["{module}"]
pytest_add_cli_args_test_selection = [{tests}]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]
also_copy = ["tests"]
"""


def _prepare(name: str) -> Path:
    module, tests = MODULES[name]
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "brpg", work / "brpg", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    quoted = ", ".join(f'"{t}"' for t in tests)
    (work / "pyproject.toml").write_text(PYPROJECT.format(module=module, tests=quoted))
    return work


def _run(name: str, children: int) -> dict[str, list[str]]:
    work = _prepare(name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    mutmut = [sys.executable, "-m", "mutmut"]
    with open(work / "run.log", "w") as log:  # mutmut's progress display, for the curious
        subprocess.run(
            [*mutmut, "run", "--max-children", str(children)], cwd=work, env=env, stdout=log
        )
    out = subprocess.run(
        [*mutmut, "results", "--all", "true"], cwd=work, env=env, capture_output=True, text=True
    ).stdout
    status: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+):\s*(.+)$", line)
        if m:
            status.setdefault(m.group(2).strip(), []).append(m.group(1))
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    p.add_argument("--children", type=int, default=2, help="parallel mutant runs")
    args = p.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        p.error(f"unknown module(s) {unknown}; choose from {', '.join(MODULES)}")
    lines = []
    for name in args.modules or list(MODULES):
        status = _run(name, args.children)
        killed = len(status.get("killed", []))
        survived = status.get("survived", [])
        other = {k: len(v) for k, v in status.items() if k not in ("killed", "survived")}
        total = killed + len(survived)
        rate = 100.0 * killed / total if total else float("nan")
        lines.append(
            f"{name} ({MODULES[name][0]}): killed {killed}/{total} ({rate:.0f} %), other {other}"
        )
        lines += [f"    survived: {s}" for s in survived]
        print("\n".join(lines[-1 - len(survived) :]), flush=True)
    WORK.mkdir(exist_ok=True)
    (WORK / "report.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
