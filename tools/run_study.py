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
  is committed in the main checkout, with the run's mIoU and mBIoU in the message;
* the jobs file is read again whenever a lane frees, so jobs can be appended while runs
  train (``--follow`` keeps waiting for them); a lock file per job, and the command lines of
  the runs training now, keep two drivers from training the same run, and ``--lanes`` counts
  every driver's runs;
* paired runs must be one run up to the end of the warm-up (PLAN.md), and a run on another
  kind of CPU is not (its fp32 kernels round differently: already the first logged loss
  differs). So each run is checked as it logs its warm-up against the committed runs of its
  seed (:func:`brpg.book.study.warmup_mismatch`); one that differs is stopped, its work folder
  removed, and the seed's other jobs at that split are left for a session on the kind of CPU
  that made the committed ones. Each committed run gets ``cpu.json``, the machine that
  trained it (:func:`brpg.engine.runtime.machine_info`).

Jobs file: one job a line, ``DEST PRESET SEED [KEY=VALUE ...]``; ``#`` starts a comment.
DEST is relative to the main checkout, e.g. ``results/digits_v3/budget/steps4000``.

    python tools/run_study.py --jobs jobs.txt --worktree /tmp/study --follow

(Create the worktree first: ``git worktree add --detach /tmp/study <commit>``.) With ``--status``
it trains nothing and prints each job's state instead: done (its mIoU and mBIoU), running or
interrupted (the last logged step of its work folder), or queued; then the counts and an
estimate of the wall time the rest will take (:func:`time_left`).

Each session gets a fresh checkout, without the work folders (checkpoints) of the last one: a
run cut off by the end of a session starts again from step 0. ``--until 16:30`` starts only the
runs expected to finish by then (each variant's seconds per step as trained here, or as
committed scaled to this machine: :func:`step_seconds`) and exits when the last one ends.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

from brpg.book.results import work_dir
from brpg.book.study import warmup_mismatch

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


def _key(job: tuple[str, str, int, list[str]]) -> str:
    dest, preset, seed, _ = job
    return f"{dest.replace('/', '_')}__{preset}__seed{seed}"


def _target(job: tuple[str, str, int, list[str]]) -> Path:
    dest, preset, seed, _ = job
    return MAIN / dest / preset / f"seed{seed}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _lock(job: tuple[str, str, int, list[str]]) -> Path:
    return MAIN / "runs" / "study_locks" / f"{_key(job)}.lock"  # runs/ is git-ignored


def _held(lock: Path) -> bool:
    """True if ``lock`` names a live process."""
    try:
        return lock.exists() and _alive(int(lock.read_text().strip() or 0))
    except ValueError:
        return False


def _claim(job: tuple[str, str, int, list[str]]) -> Path | None:
    """A lock file for ``job`` (so that two drivers never train the same run), or ``None``
    when a live process holds it."""
    lock = _lock(job)
    lock.parent.mkdir(parents=True, exist_ok=True)
    if lock.exists():
        if _held(lock):
            return None
        lock.unlink()  # stale: its process is gone
    lock.write_text(str(os.getpid()))
    return lock


def _commit_finished(job: tuple[str, str, int, list[str]]) -> str | None:
    """Commit the run folder of ``job`` if its summary exists and is not committed yet;
    returns the commit message (``None`` if there was nothing to commit)."""
    target = _target(job)
    summary = target / "summary.json"
    rel = str(target.relative_to(MAIN))
    if not summary.exists():
        return None
    tracked = subprocess.run(
        ["git", "-C", str(MAIN), "ls-files", "--error-unmatch", f"{rel}/summary.json"],
        capture_output=True,
    )
    if tracked.returncode == 0:
        return None
    cpu = _cpu_record(job)
    if cpu.exists():  # written when this machine started the run (a fresh checkout has none)
        shutil.copyfile(cpu, target / "cpu.json")
    s = json.loads(summary.read_text())
    msg = (
        f"{job[0]}: {job[1]} seed {job[2]}: {s['val_miou']:.2f} % mIoU, {s['val_mbiou']:.2f} %"
        f" mBIoU, {s['steps']} steps, {s['amp_dtype']}, {s['wall_s']:.0f} s"
    )
    _git("add", rel)
    _git("commit", "-q", "-m", f"study run: {msg}", "--", rel)
    print(f"[{time.strftime('%H:%M:%S')}] committed {msg}", flush=True)
    return msg


def _machine() -> dict[str, str | int | bool]:
    """This machine, as a run's provenance names it (imported here: torch is slow to load)."""
    import torch

    from brpg.engine.runtime import machine_info

    return machine_info(torch.device("cpu")) | {"torch_threads": 1}  # each run's setting


def _cpu_record(job: tuple[str, str, int, list[str]]) -> Path:
    """Where the driver that starts ``job`` notes the machine it trains on (in the git-ignored
    ``runs/``, so a fresh checkout has none), to be committed beside the run as ``cpu.json``."""
    path = MAIN / "runs" / "study_cpu" / f"{_key(job)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _seeds_processes() -> list[str]:
    """``PID COMMAND LINE`` of every ``brpg seeds`` process running now, of any driver."""
    out = subprocess.run(["pgrep", "-af", "--", "-m brpg seeds"], capture_output=True, text=True)
    return out.stdout.splitlines()


def _live_runs() -> set[tuple[str, str, int]]:
    """``(dest, preset, seed)`` of every ``brpg seeds`` run training now, of any driver, read
    from the command lines (a driver killed and started again has lost its lock files' pids but
    must not start a second process on a run that is still training)."""
    live = set()
    for line in _seeds_processes():
        words = line.split()
        try:
            preset = words[words.index("--configs") + 1]
            seed = int(words[words.index("--seeds") + 1])
            dest = Path(words[words.index("--dest") + 1])
        except (ValueError, IndexError):
            continue
        rel = dest.relative_to(MAIN) if dest.is_relative_to(MAIN) else dest
        live.add((str(rel), preset, seed))
    return live


def _split_seed(job: tuple[str, str, int, list[str]]) -> tuple[str, str, int]:
    """``(dest, split, seed)``: the runs of one seed at one split, which share their warm-up."""
    dest, preset, seed, _ = job
    return dest, preset.rsplit("_1_", 1)[-1], seed


def _start(job: tuple[str, str, int, list[str]], worktree: Path, python: str):
    dest, preset, seed, sets = job
    logs = worktree / "runs" / "study_logs"  # runs/ is git-ignored
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{_key(job)}.log"
    cmd = [python, "-m", "brpg", "seeds", "--configs", preset, "--seeds", str(seed)]
    cmd += ["--dest", str(MAIN / dest)]
    for s in ["train.threads=1", *sets]:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(worktree), "OMP_NUM_THREADS": "1"}
    _cpu_record(job).write_text(json.dumps(_machine(), indent=2) + "\n")
    print(f"[{time.strftime('%H:%M:%S')}] start {dest} {preset} seed {seed}", flush=True)
    fh = open(log, "a")  # noqa: SIM115 (closed when the run ends)
    proc = subprocess.Popen(cmd, cwd=worktree, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return proc, fh, log


def _work_dir(job: tuple[str, str, int, list[str]], worktree: Path) -> Path:
    """Where ``brpg seeds``, run in ``worktree``, trains ``job``: checkpoints and the growing
    log (:func:`brpg.book.results.work_dir` under the worktree's ``runs/results``)."""
    dest, preset, seed, _ = job
    return work_dir(worktree / "runs" / "results", dest, preset, seed)


def job_state(job: tuple[str, str, int, list[str]], worktree: Path) -> tuple[str, str]:
    """``(state, detail)`` of one job: ``done`` (its scores), ``running`` or ``interrupted``
    (the last step its work folder logged, of ``train.steps`` when the job sets it) or
    ``queued``."""
    summary = _target(job) / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        return "done", f"{s['val_miou']:.2f} % mIoU, {s['val_mbiou']:.2f} % mBIoU"
    last = _last_step(job, worktree)
    if last is None:
        return "queued", ""
    total = _steps(job) or "?"
    live = _held(_lock(job)) or tuple(job[:3]) in _live_runs()  # a killed driver's run too
    return ("running" if live else "interrupted"), f"step {last} of {total}"


def _last_step(job: tuple[str, str, int, list[str]], worktree: Path) -> int | None:
    """The last step the work folder of ``job`` logged (``None``: it has not started)."""
    log = _work_dir(job, worktree) / "log.jsonl"
    if not log.exists():
        return None
    return max((int(json.loads(line)["step"]) for line in log.read_text().splitlines()
                if line.strip()), default=0)  # fmt: skip


def _steps(job: tuple[str, str, int, list[str]]) -> int | None:
    """``train.steps`` as the job sets it (``None`` when it leaves the preset's)."""
    return next((int(w.split("=", 1)[1]) for w in job[3] if w.startswith("train.steps=")), None)


def _variant(preset: str) -> str:
    """``digits_brpg_1_16`` -> ``digits_brpg``: a preset without its label fraction."""
    return re.sub(r"_(1_\d+|full)$", "", preset)


def pace(log: Path) -> float | None:
    """Seconds of wall time per training step of one run: the median over the intervals between
    its logged steps, so that a pause (the study stopped while a CI check ran) or an evaluation
    does not count; ``None`` for a log with fewer than two timed steps."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    timed = [(r["step"], r["wall_s"]) for r in rows if "wall_s" in r]
    pairs = zip(timed, timed[1:], strict=False)  # consecutive timed steps
    rates = [(w1 - w0) / (s1 - s0) for (s0, w0), (s1, w1) in pairs if s1 > s0]
    return statistics.median(rates) if rates else None


def run_rate(log: Path) -> float | None:
    """Seconds of wall time per training step of one run, everything included (evaluations,
    checkpoints, pauses): the wall time between its first and last timed steps over the steps
    between them, summed over the intervals where both grow (a resumed run logs some steps
    again); ``None`` for a log with fewer than two timed steps."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    timed = [(r["step"], r["wall_s"]) for r in rows if "wall_s" in r]
    pairs = [(s1 - s0, w1 - w0) for (s0, w0), (s1, w1) in zip(timed, timed[1:], strict=False)
             if s1 > s0 and w1 >= w0]  # fmt: skip
    steps = sum(ds for ds, _ in pairs)
    return sum(dw for _, dw in pairs) / steps if steps else None


def step_seconds(jobs: list[tuple[str, str, int, list[str]]], worktree: Path) -> dict[str, float]:
    """Expected wall seconds per step of each variant in ``jobs``, everything included
    (:func:`run_rate`), on the machine that trains them now: the median rate of the variant's
    runs in this checkout's work folders (trained here, finished or not); for a variant with
    none, the median :func:`pace` of its committed runs (other machines, other sessions; pauses
    and evaluations left out) times the median ratio of rate here to committed pace over the
    variants that have both (this machine's speed and the evaluations' share); for a variant
    with neither, the slowest estimate. Empty when no run of any variant has a rate."""
    here: dict[str, list[float]] = {}
    committed: dict[str, list[float]] = {}
    for job in jobs:
        for rates, log, measure in (
            (here, _work_dir(job, worktree) / "log.jsonl", run_rate),
            (committed, _target(job) / "log.jsonl", pace),
        ):
            r = measure(log) if log.exists() else None
            if r is not None:
                rates.setdefault(_variant(job[1]), []).append(r)
    med_here = {v: statistics.median(rs) for v, rs in here.items()}
    med_committed = {v: statistics.median(rs) for v, rs in committed.items()}
    ratios = [med_here[v] / med_committed[v] for v in med_here if v in med_committed]
    factor = statistics.median(ratios) if ratios else 1.0
    est = {v: r * factor for v, r in med_committed.items()} | med_here
    if est:
        slowest = max(est.values())
        est |= {_variant(j[1]): slowest for j in jobs if _variant(j[1]) not in est}
    return est


def run_seconds(
    job: tuple[str, str, int, list[str]], worktree: Path, rates: dict[str, float]
) -> float | None:
    """Expected wall seconds until ``job`` finishes: its steps still to train times its
    variant's rate (:func:`step_seconds`); ``None`` when either is not known."""
    total, rate = _steps(job), rates.get(_variant(job[1]))
    if total is None or rate is None:
        return None
    return (total - (_last_step(job, worktree) or 0)) * rate


def time_left(
    jobs: list[tuple[str, str, int, list[str]]], worktree: Path, lanes: int
) -> tuple[int, float | None]:
    """``(runs not done, wall seconds to train them with lanes runs side by side)``: the sum of
    their :func:`run_seconds` over the lanes. The time is ``None`` when no run has a rate yet
    or a job leaves ``train.steps`` unset."""
    left = [job for job in jobs if not (_target(job) / "summary.json").exists()]
    if not left:
        return 0, 0.0
    rates = step_seconds(jobs, worktree)
    secs = [run_seconds(job, worktree, rates) for job in left]
    if any(x is None for x in secs):
        return len(left), None
    return len(left), sum(secs) / lanes


def print_status(
    jobs: list[tuple[str, str, int, list[str]]], worktree: Path, lanes: int = 2
) -> dict[str, int]:
    """One line per job (see :func:`job_state`), then how many are in each state and the
    time the rest will take (:func:`time_left`)."""
    counts: dict[str, int] = {}
    for job in jobs:
        state, detail = job_state(job, worktree)
        counts[state] = counts.get(state, 0) + 1
        print(f"{state:<11} {job[0]} {job[1]} seed {job[2]}" + (f": {detail}" if detail else ""))
    print(", ".join(f"{n} {state}" for state, n in counts.items()) + f" (of {len(jobs)} jobs)")
    n_left, secs = time_left(jobs, worktree, lanes)
    if n_left:
        eta = "time not known yet" if secs is None else f"about {secs / 3600:.1f} h of wall time"
        print(f"runs left: {n_left}, {eta} at {lanes} runs side by side (each variant's seconds"
              " per step as trained here, or as committed scaled to this machine)")  # fmt: skip
    return counts


def _deadline(text: str, now: datetime | None = None) -> float:
    """``--until``: ``HH:MM`` (local time, the next time the clock shows it: ``01:00`` given at
    22:45 is tomorrow's) or an ISO date and time, as a Unix time."""
    now = now or datetime.now()
    try:
        if re.fullmatch(r"\d{1,2}:\d{2}", text):
            h, m = map(int, text.split(":"))
            at = now.replace(hour=h, minute=m, second=0, microsecond=0)
            # a session that crosses midnight: a clock time already past today means tomorrow
            return (at + timedelta(days=1) if at <= now else at).timestamp()
        return datetime.fromisoformat(text).timestamp()
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--until {text!r}: expected HH:MM or an ISO time like 2026-12-06T16:40 ({err})"
        ) from None


def _held_back_line(jobs: list[tuple[str, str, int, list[str]]], secs: float) -> str:
    """One log line for the jobs ``--until`` has just held back: the first (expected to take
    ``secs``), and how many more (one line per job made 25 lines of noise when the deadline
    first bit)."""
    first = jobs[0]
    end = time.strftime("%H:%M", time.localtime(time.time() + secs))
    more = f" (and {len(jobs) - 1} more queued after it)" if len(jobs) > 1 else ""
    return (f"[{time.strftime('%H:%M:%S')}] held back (--until): {first[0]} {first[1]} seed"
            f" {first[2]}, about {secs / 60:.0f} min, would end at {end}{more}")  # fmt: skip


def _training_runs() -> int:
    """Training runs of this study now running, of every driver (``brpg seeds`` processes)."""
    return len(_seeds_processes())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", required=True, type=Path, help="re-read whenever a lane frees")
    ap.add_argument("--worktree", required=True, type=Path, help="git worktree the runs import")
    ap.add_argument("--lanes", type=int, default=2, help="runs side by side, all drivers together")
    ap.add_argument("--follow", action="store_true", help="wait for more jobs instead of exiting")
    ap.add_argument("--python", default=str(MAIN / ".venv" / "bin" / "python"))
    ap.add_argument("--status", action="store_true", help="print each job's state; train nothing")
    ap.add_argument(
        "--until",
        type=_deadline,
        help="HH:MM (today) or an ISO time: start no run expected to end later (a fresh checkout\n"
        "has none of an unfinished run's checkpoints, so a run cut off by the end of a session\n"
        "is lost); then exit once the running ones finish",
    )
    args = ap.parse_args(argv)
    jobs = parse_jobs(args.jobs.read_text())  # a malformed file is an error before anything
    wt = args.worktree.resolve()
    if args.status:
        print_status(jobs, wt, args.lanes)
        return
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
    running: dict[str, tuple] = {}  # key -> (job, proc, log file, log path, lock)
    failed: set[str] = set()
    held: set[str] = set()  # jobs --until has held back (each is reported once)
    foreign: set[tuple[str, str, int]] = set()  # (dest, split, seed) this CPU cannot pair
    while True:
        for key, (job, proc, fh, log, lock) in list(running.items()):
            why = None
            if proc.poll() is None:
                work_log = _work_dir(job, wt) / "log.jsonl"
                why = warmup_mismatch(work_log, MAIN / job[0], job[1], job[2])
                if why is None:
                    continue
                proc.terminate()  # its warm-up is not its seed's: no pair to compare it with
                proc.wait()
                shutil.rmtree(_work_dir(job, wt), ignore_errors=True)  # nor to resume from
                foreign.add(_split_seed(job))  # this job's group too: not started again
                print(
                    f"[{time.strftime('%H:%M:%S')}] stopped {job[0]} {job[1]} seed {job[2]}:"
                    f" {why}; this CPU does not reproduce the committed warm-up of seed"
                    f" {job[2]}, so its jobs at this split are left for a session on the kind"
                    " of CPU that trained them",
                    flush=True,
                )
            fh.close()
            del running[key]
            lock.unlink(missing_ok=True)
            if why is None and _commit_finished(job) is None:
                if not (_target(job) / "summary.json").exists():
                    failed.add(key)
                    print(f"FAILED {key} (rc {proc.returncode}, log {log})", flush=True)
        try:
            jobs = parse_jobs(args.jobs.read_text())
        except SystemExit as err:  # an edit in progress: keep the running jobs, retry
            print(err, flush=True)
            jobs = []
        for job in jobs:
            _commit_finished(job)  # a run that finished under a killed driver
        pending = [
            j
            for j in jobs
            if _key(j) not in running
            and _key(j) not in failed
            and _split_seed(j) not in foreign
            and not (_target(j) / "summary.json").exists()
        ]
        if args.until is not None and pending and len(running) < args.lanes:
            rates = step_seconds(jobs, wt)  # read only when a lane is free: it reads every log
            secs = {_key(j): run_seconds(j, wt, rates) for j in pending}
            # a run expected to end after the deadline waits; one whose time is not known starts
            late = {k for k, t in secs.items() if t is not None and time.time() + t > args.until}
            newly_held = [j for j in pending if _key(j) in late and _key(j) not in held]
            if newly_held:  # each job is reported once, not on every pass
                print(_held_back_line(newly_held, secs[_key(newly_held[0])]), flush=True)
                held.update(_key(j) for j in newly_held)
            pending = [j for j in pending if _key(j) not in late]
        while pending and len(running) < args.lanes and _training_runs() < args.lanes:
            job = pending.pop(0)
            if tuple(job[:3]) in _live_runs():
                continue  # trained by a process this driver did not start (a killed driver's)
            lock = _claim(job)
            if lock is None:
                continue  # another driver trains it
            proc, fh, log = _start(job, wt, args.python)
            running[_key(job)] = (job, proc, fh, log, lock)
            time.sleep(2)  # let the new process show up in _training_runs
        if not running and not pending and (not args.follow or args.until is not None):
            break  # with --until, a job held back now stays held back: the deadline only nears
        time.sleep(15)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
