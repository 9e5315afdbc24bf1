"""Run a queue of DigitScenes study runs in parallel lanes and commit each run as it finishes.

Issue 26's runs take many hours on a 2-core CPU and span sessions; this driver makes that safe:

* the runs train from a separate git worktree (``--worktree``, checked out at a commit), so
  that editing the main checkout while they train can change neither the code they import nor
  the commit their provenance records;
* each job is ``brpg seeds`` for one preset and seed (it skips a finished run and resumes an
  interrupted one from its last checkpoint), with one torch thread per run and ``--lanes``
  runs side by side (two runs at one thread each did more steps per hour than one at two
  threads: results/digits_v3/README.md);
* the moment a run's ``summary.json`` exists, its folder (summary, log, config, provenance)
  is committed in the main checkout, with the run's mIoU and mBIoU in the message.

Jobs file: one job a line, ``DEST PRESET SEED [KEY=VALUE ...]``; ``#`` starts a comment.
DEST is relative to the main checkout, e.g. ``results/digits_v3/budget/steps4000``.

    python tools/run_study.py --jobs jobs.txt --worktree /tmp/study --commit HEAD

(Create the worktree first: ``git worktree add --detach /tmp/study HEAD``.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MAIN = Path(__file__).resolve().parents[1]
_git_lock = threading.Lock()


def parse_jobs(text: str) -> list[tuple[str, str, int, list[str]]]:
    """``[(dest, preset, seed, overrides)]`` of a jobs file (see the module docstring)."""
    jobs = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 3 or not words[2].isdigit() or any("=" not in w for w in words[3:]):
            raise SystemExit(
                f"jobs line {n}: expected 'DEST PRESET SEED [KEY=VALUE ...]': {line!r}"
            )
        jobs.append((words[0], words[1], int(words[2]), words[3:]))
    return jobs


def _git(*args: str) -> None:
    for attempt in range(30):  # another git command (the developer's) may hold index.lock
        with _git_lock:
            res = subprocess.run(["git", "-C", str(MAIN), *args], capture_output=True, text=True)
        if res.returncode == 0:
            return
        if "index.lock" not in res.stderr:
            raise RuntimeError(f"git {' '.join(args)}: {res.stderr.strip()}")
        time.sleep(2 + attempt)
    raise RuntimeError(f"git {' '.join(args)}: index.lock held for minutes")


def run_job(job: tuple[str, str, int, list[str]], worktree: Path, python: str) -> str:
    dest, preset, seed, sets = job
    target = MAIN / dest / preset / f"seed{seed}"
    logs = worktree / "runs" / "study_logs"  # runs/ is git-ignored
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{Path(dest).name}__{preset}__seed{seed}.log"
    cmd = [python, "-m", "brpg", "seeds", "--configs", preset, "--seeds", str(seed)]
    cmd += ["--dest", str(MAIN / dest)]
    for s in ["train.threads=1", *sets]:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(worktree), "OMP_NUM_THREADS": "1"}
    print(f"[{time.strftime('%H:%M:%S')}] start {dest} {preset} seed {seed}", flush=True)
    with open(log, "a") as fh:
        rc = subprocess.run(
            cmd, cwd=worktree, env=env, stdout=fh, stderr=subprocess.STDOUT
        ).returncode
    summary = target / "summary.json"
    if rc != 0 or not summary.exists():
        msg = f"FAILED {dest} {preset} seed {seed} (rc {rc}, log {log})"
        print(msg, flush=True)
        return msg
    s = json.loads(summary.read_text())
    msg = (
        f"{dest}: {preset} seed {seed}: {s['val_miou']:.2f} % mIoU, {s['val_mbiou']:.2f} % mBIoU,"
        f" {s['steps']} steps, {s['amp_dtype']}, {s['wall_s']:.0f} s"
    )
    rel = str(target.relative_to(MAIN))
    _git("add", rel)
    _git("commit", "-q", "-m", f"study run: {msg}", "--", rel)
    print(f"[{time.strftime('%H:%M:%S')}] committed {msg}", flush=True)
    return msg


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", required=True, type=Path)
    ap.add_argument("--worktree", required=True, type=Path, help="git worktree the runs import")
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--python", default=str(MAIN / ".venv" / "bin" / "python"))
    args = ap.parse_args(argv)
    jobs = parse_jobs(args.jobs.read_text())
    wt = args.worktree.resolve()
    if not (wt / "brpg" / "__init__.py").exists():
        raise SystemExit(f"{wt} is not a checkout of this repository (git worktree add ...)")
    dirty = subprocess.run(
        ["git", "-C", str(wt), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout
    if dirty.strip():
        raise SystemExit(f"{wt} has uncommitted changes; runs must record a clean commit")
    data = wt / "data"
    if not data.exists() and (MAIN / "data").exists():
        data.symlink_to(MAIN / "data")  # the generated DigitScenes cache, shared
    with ThreadPoolExecutor(args.lanes) as pool:
        results = list(pool.map(lambda j: run_job(j, wt, args.python), jobs))
    print("\n".join(results))
    sys.exit(1 if any(r.startswith("FAILED") for r in results) else 0)


if __name__ == "__main__":
    main()
