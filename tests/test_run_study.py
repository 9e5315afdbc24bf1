"""tools/run_study.py, the driver that trains issue 26's runs across sessions and commits each
one as it finishes: its jobs file, its per-job states (``--status``) and one whole pass over
a tiny queue, with a stand-in for ``brpg seeds`` and a throwaway git repository.

Machine: exact. No training: the stand-in writes a summary; everything checked is files,
processes and git.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "run_study.py"


@pytest.fixture
def tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The driver as a module, its main checkout (``MAIN``) moved to a fresh git repository."""
    spec = importlib.util.spec_from_file_location("run_study", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    main = tmp_path / "main"
    main.mkdir()
    for args in (["init", "-q"], ["config", "user.email", "t@t"], ["config", "user.name", "t"]):
        subprocess.run(["git", "-C", str(main), *args], check=True)
    (main / "README").write_text("x\n")
    subprocess.run(["git", "-C", str(main), "add", "README"], check=True)
    subprocess.run(["git", "-C", str(main), "commit", "-q", "-m", "init"], check=True)
    monkeypatch.setattr(mod, "MAIN", main)
    return mod


def _summary(run: Path, miou: float, mbiou: float) -> None:
    run.mkdir(parents=True, exist_ok=True)
    s = {"val_miou": miou, "val_mbiou": mbiou, "steps": 8, "amp_dtype": "fp32", "wall_s": 3.0}
    (run / "summary.json").write_text(json.dumps(s))


def test_parse_jobs_reads_comments_and_overrides_and_names_a_bad_line(tool):
    text = "# stage 1\nresults/s digits_brpg_1_16 0 train.steps=8000  # first\n\nresults/s x 12\n"
    assert tool.parse_jobs(text) == [
        ("results/s", "digits_brpg_1_16", 0, ["train.steps=8000"]),
        ("results/s", "x", 12, []),
    ]
    for bad in ("results/s digits_brpg_1_16", "results/s p zero", "results/s p 1 steps"):
        with pytest.raises(SystemExit, match="jobs line 2"):
            tool.parse_jobs(f"results/s p 0\n{bad}\n")


def test_job_state_tells_done_running_interrupted_and_queued_apart(
    tool, tmp_path, capsys, monkeypatch
):
    wt = tmp_path / "wt"
    job = ("results/digits_v3/study", "digits_brpg_1_8", 3, ["train.steps=8000"])
    assert tool.job_state(job, wt) == ("queued", "")
    work = tool._work_dir(job, wt)
    assert work == wt / "runs/results/study/digits_brpg_1_8/seed3"  # run_and_store's layout
    work.mkdir(parents=True)
    rows = [{"step": 50, "loss_sup": 1.0}, {"step": 100, "loss_sup": 0.9}]
    rows.append({"step": 100, "val_miou": 20.0})
    (work / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert tool.job_state(job, wt) == ("interrupted", "step 100 of 8000")  # no lock
    with monkeypatch.context() as m:  # no lock, but a process trains it (a killed driver's)
        m.setattr(tool, "_live_runs", lambda: {("results/digits_v3/study", "digits_brpg_1_8", 3)})
        assert tool.job_state(job, wt) == ("running", "step 100 of 8000")
    locks = tool.MAIN / "runs" / "study_locks"
    locks.mkdir(parents=True)
    (locks / f"{tool._key(job)}.lock").write_text(str(os.getpid()))  # a live process holds it
    assert tool.job_state(job, wt) == ("running", "step 100 of 8000")
    _summary(tool.MAIN / job[0] / job[1] / "seed3", 51.234, 37.5)
    assert tool.job_state(job, wt) == ("done", "51.23 % mIoU, 37.50 % mBIoU")
    other = ("results/digits_v3/study", "digits_brpg_1_8", 4, [])
    assert tool.print_status([job, other], wt) == {"done": 1, "queued": 1}
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("done") and "seed 3: 51.23 % mIoU" in out[0]
    assert out[-2] == "1 done, 1 queued (of 2 jobs)"
    assert out[-1].startswith("runs left: 1, time not known yet at 2 runs side by side")


def _stand_in(tmp_path: Path) -> tuple[Path, Path]:
    """``(python, worktree)``: a stand-in for ``python -m brpg seeds`` that checks the driver's
    arguments and writes the summary where the real one would (mIoU 40 + seed), and a
    worktree that is a checkout as far as the driver checks."""
    fake = tmp_path / "fake_python"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib, sys\n"
        "a = sys.argv[1:]\n"
        "assert a[:3] == ['-m', 'brpg', 'seeds'], a\n"
        "preset, seed, dest = a[a.index('--configs') + 1], a[a.index('--seeds') + 1],"
        " a[a.index('--dest') + 1]\n"
        "assert 'train.threads=1' in a, a\n"
        "run = pathlib.Path(dest) / preset / f'seed{seed}'\n"
        "run.mkdir(parents=True)\n"
        "s = {'val_miou': 40.0 + int(seed), 'val_mbiou': 30.0, 'steps': 8, 'amp_dtype': 'fp32',"
        " 'wall_s': 1.0}\n"
        "(run / 'summary.json').write_text(json.dumps(s))\n"
    )
    fake.chmod(0o755)
    wt = tmp_path / "wt"
    (wt / "brpg").mkdir(parents=True)
    (wt / "brpg" / "__init__.py").write_text("")
    return fake, wt


def test_a_pass_trains_each_job_once_and_commits_each_finished_run(tool, tmp_path, monkeypatch):
    """A stand-in for ``python -m brpg seeds`` writes the summary where the real one would; the
    driver must start every job not yet done (the finished one is skipped), commit each run
    folder with its scores in the message, and leave no lock behind."""
    fake, wt = _stand_in(tmp_path)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("res/study p_a 0 train.steps=8\nres/study p_a 1\nres/study p_b 0\n")
    _summary(tool.MAIN / "res/study/p_b/seed0", 1.0, 1.0)  # done before: not started again
    subprocess.run(["git", "-C", str(tool.MAIN), "add", "res"], check=True)
    subprocess.run(["git", "-C", str(tool.MAIN), "commit", "-q", "-m", "earlier run"], check=True)
    real_sleep = time.sleep
    monkeypatch.setattr(tool.time, "sleep", lambda s: real_sleep(min(s, 0.05)))
    # lanes beyond any study runs this machine may be training (the driver counts them all)
    with pytest.raises(SystemExit) as done:
        tool.main(
            ["--jobs", str(jobs), "--worktree", str(wt), "--python", str(fake), "--lanes", "9"]
        )
    assert done.value.code == 0  # no job failed
    log = subprocess.run(
        ["git", "-C", str(tool.MAIN), "log", "--format=%s"], capture_output=True, text=True
    ).stdout.splitlines()
    assert sorted(log[:2]) == [
        "study run: res/study: p_a seed 0: 40.00 % mIoU, 30.00 % mBIoU, 8 steps, fp32, 1 s",
        "study run: res/study: p_a seed 1: 41.00 % mIoU, 30.00 % mBIoU, 8 steps, fp32, 1 s",
    ]
    assert log[2:] == ["earlier run", "init"]
    status = subprocess.run(
        ["git", "-C", str(tool.MAIN), "status", "--porcelain", "res"],
        capture_output=True,
        text=True,
    ).stdout
    assert status == ""  # every run folder committed
    assert not list((tool.MAIN / "runs" / "study_locks").glob("*.lock"))
    starts = sorted(p.name for p in (wt / "runs" / "study_logs").iterdir())
    assert starts == ["res_study__p_a__seed0.log", "res_study__p_a__seed1.log"]


def test_the_driver_refuses_a_worktree_with_uncommitted_changes(tool, tmp_path):
    wt = tool.MAIN  # a checkout of itself, for the check
    (wt / "brpg").mkdir()
    (wt / "brpg" / "__init__.py").write_text("")
    subprocess.run(["git", "-C", str(wt), "add", "brpg"], check=True)
    subprocess.run(["git", "-C", str(wt), "commit", "-q", "-m", "pkg"], check=True)
    (wt / "README").write_text("edited\n")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("res/study p_a 0\n")
    with pytest.raises(SystemExit, match="uncommitted changes"):
        tool.main(["--jobs", str(jobs), "--worktree", str(wt)])


def _log(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_time_left_from_the_pace_of_finished_runs_hand_worked(tool, tmp_path):
    """Pace = median seconds per step between logged steps (a pause falls out); with no run
    trained here, the time left is each unfinished run's steps to go times its variant's
    committed pace, the slowest variant's for a variant with no finished run, over the lanes."""
    wt = tmp_path / "wt"
    done_a = ("res/study", "digits_a_1_16", 0, ["train.steps=200"])
    done_b = ("res/study", "digits_b_1_16", 0, ["train.steps=100"])
    for job, walls in ((done_a, [10, 20, 30, 100]), (done_b, [0, 25, 50])):
        run = tool.MAIN / job[0] / job[1] / "seed0"
        _summary(run, 50.0, 40.0)
        rows = [{"step": 50 * (i + 1), "wall_s": w} for i, w in enumerate(walls)]
        rows.insert(1, {"step": 50, "val_miou": 10.0})  # an evaluation: no wall time
        _log(run / "log.jsonl", rows)
    a_log = tool.MAIN / "res/study/digits_a_1_16/seed0/log.jsonl"
    assert tool.pace(a_log) == pytest.approx(0.2)  # 0.2, 0.2 and 1.4 (the pause) s/step
    queued_a = ("res/study", "digits_a_1_8", 1, ["train.steps=1000"])  # 1000 x 0.2 s
    interrupted_c = ("res/study", "digits_c_1_8", 0, ["train.steps=1000"])
    _log(tool._work_dir(interrupted_c, wt) / "log.jsonl", [{"step": 400, "wall_s": 1.0}])
    jobs = [done_a, done_b, queued_a, interrupted_c]
    # 1000 * 0.2 + (1000 - 400) * 0.5 (digits_c has no finished run: the slowest pace, b's)
    assert tool.time_left(jobs, wt, lanes=2) == (2, pytest.approx((200 + 300) / 2))
    assert tool.time_left([done_a, done_b], wt, lanes=2) == (0, 0.0)
    no_steps = ("res/study", "digits_a_1_4", 0, [])  # the preset's steps: not known here
    assert tool.time_left([done_a, no_steps], wt, lanes=2) == (1, None)
    assert tool.time_left([queued_a], wt, lanes=2) == (1, None)  # no finished run to time


def test_run_rate_counts_everything_but_the_steps_a_resumed_run_logs_again(tool, tmp_path):
    log = tmp_path / "log.jsonl"
    _log(log, [{"step": 50 * (i + 1), "wall_s": w} for i, w in enumerate([10, 20, 30, 100])])
    assert tool.run_rate(log) == pytest.approx((10 + 10 + 70) / 150)  # the pause counts
    resumed = [(100, 20), (150, 30), (100, 25), (150, 35), (200, 45)]  # back to the step-100 state
    _log(log, [{"step": s, "wall_s": w} for s, w in resumed])
    assert tool.run_rate(log) == pytest.approx((10 + 10 + 10) / 150)
    _log(log, [{"step": 50, "wall_s": 1.0}, {"step": 50, "val_miou": 3.0}])
    assert tool.run_rate(log) is None


def test_step_seconds_and_run_seconds_hand_worked(tool, tmp_path):
    """A variant that trained here: its rate here. One that did not: its committed pace times
    this machine's ratio (here / committed, median over variants with both). One with neither:
    the slowest. A run's time: its steps to go times its variant's rate."""
    wt = tmp_path / "wt"
    done_a = ("res/study", "digits_a_1_16", 0, ["train.steps=150"])
    done_b = ("res/study", "digits_b_1_16", 0, ["train.steps=150"])
    for job, per_step in ((done_a, 0.2), (done_b, 0.5)):
        run = tool.MAIN / job[0] / job[1] / "seed0"
        _summary(run, 50.0, 40.0)
        _log(run / "log.jsonl", [{"step": s, "wall_s": s * per_step} for s in (50, 100, 150)])
    here_a = ("res/study", "digits_a_1_8", 1, ["train.steps=1000"])  # interrupted here at 400
    _log(tool._work_dir(here_a, wt) / "log.jsonl",
         [{"step": 200, "wall_s": 20.0}, {"step": 400, "wall_s": 40.0}])  # fmt: skip
    queued_c = ("res/study", "digits_c_1_8", 0, ["train.steps=1000"])
    jobs = [done_a, done_b, here_a, queued_c]
    rates = tool.step_seconds(jobs, wt)
    # a: 0.1 here (committed 0.2, so this machine is 2x faster); b: 0.5 x 0.5; c: the slowest
    assert rates == pytest.approx({"digits_a": 0.1, "digits_b": 0.25, "digits_c": 0.25})
    assert tool.run_seconds(here_a, wt, rates) == pytest.approx(600 * 0.1)
    assert tool.run_seconds(queued_c, wt, rates) == pytest.approx(1000 * 0.25)
    assert tool.run_seconds(("res/study", "digits_a_1_4", 0, []), wt, rates) is None
    assert tool.step_seconds([queued_c], wt) == {}


def test_until_holds_back_a_run_expected_to_end_too_late(tool, tmp_path, monkeypatch, capsys):
    """With --until the driver starts only runs expected to end before it (a fresh checkout
    would lose the rest), and exits when nothing else fits, even with --follow."""
    fake, wt = _stand_in(tmp_path)
    done = tool.MAIN / "res/study/p_a/seed9"  # a finished run: 1 s a step
    _summary(done, 1.0, 1.0)
    _log(done / "log.jsonl", [{"step": s, "wall_s": float(s)} for s in (10, 20, 30)])
    subprocess.run(["git", "-C", str(tool.MAIN), "add", "res"], check=True)
    subprocess.run(["git", "-C", str(tool.MAIN), "commit", "-q", "-m", "earlier run"], check=True)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(
        "res/study p_a 9 train.steps=30\n"
        "res/study p_a 0 train.steps=3600\n"  # about an hour: ends after the deadline
        "res/study p_a 1 train.steps=60\n"  # a minute
        "res/study p_b 0\n"  # steps not known: started
        "res/study p_a 2 train.steps=7200\n"  # two hours: also held back
    )
    real_sleep = time.sleep
    monkeypatch.setattr(tool.time, "sleep", lambda s: real_sleep(min(s, 0.05)))
    until = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 1800))
    args = ["--jobs", str(jobs), "--worktree", str(wt), "--python", str(fake), "--lanes", "9"]
    with pytest.raises(SystemExit) as done_code:
        tool.main([*args, "--follow", "--until", until])
    assert done_code.value.code == 0
    starts = sorted(p.name for p in (wt / "runs" / "study_logs").iterdir())
    assert starts == ["res_study__p_a__seed1.log", "res_study__p_b__seed0.log"]
    out = capsys.readouterr().out
    assert "held back (--until): res/study p_a seed 0, about 60 min" in out
    assert "(and 1 more queued after it)" in out  # one line for both held-back runs
    assert out.count("held back") == 1  # reported once, not on every pass


def test_until_reads_a_clock_time_or_an_iso_time_and_names_a_bad_one(tool, capsys):
    t = tool._deadline("16:40")
    assert time.strftime("%H:%M:%S", time.localtime(t)) == "16:40:00"
    assert time.time() < t < time.time() + 86400  # the next 16:40, never one already past
    # a session crossing midnight: 01:00 given at 22:45 is the next day's, 23:30 the same day's
    evening = datetime(2026, 12, 6, 22, 45)
    assert tool._deadline("01:00", now=evening) == datetime(2026, 12, 7, 1, 0).timestamp()
    assert tool._deadline("23:30", now=evening) == datetime(2026, 12, 6, 23, 30).timestamp()
    assert tool._deadline("2026-12-06T16:40") == pytest.approx(
        time.mktime((2026, 12, 6, 16, 40, 0, 0, 0, -1))
    )
    with pytest.raises(SystemExit):
        tool.main(["--jobs", "x", "--worktree", "y", "--until", "tea time"])
    assert "--until 'tea time': expected HH:MM" in capsys.readouterr().err


def _stand_in_logging(tmp_path: Path) -> tuple[Path, Path]:
    """Like :func:`_stand_in`, but the run first logs its step-50 ``loss_sup`` (1 + seed / 10)
    in its work folder, where the real one logs, then trains for a second before it writes its
    summary: the time the driver has to check the warm-up (30 s for the run the test expects
    to be stopped, so that a slow machine cannot let it finish first)."""
    fake, wt = _stand_in(tmp_path)
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib, sys, time\n"
        "a = sys.argv[1:]\n"
        "preset, seed, dest = a[a.index('--configs') + 1], int(a[a.index('--seeds') + 1]),"
        " a[a.index('--dest') + 1]\n"
        "work = pathlib.Path('runs/results') / pathlib.Path(dest).name / preset / f'seed{seed}'\n"
        "work.mkdir(parents=True)\n"
        "row = {'loss_sup': 1.0 + seed / 10, 'step': 50, 'lr': 0.003, 'wall_s': 1.0}\n"
        "(work / 'log.jsonl').write_text(json.dumps(row) + '\\n')\n"
        "time.sleep(30.0 if (preset, seed) == ('digits_brpg_1_16', 1) else 1.0)\n"
        "run = pathlib.Path(dest) / preset / f'seed{seed}'\n"
        "run.mkdir(parents=True)\n"
        "s = {'val_miou': 40.0 + seed, 'val_mbiou': 30.0, 'steps': 8, 'amp_dtype': 'fp32',"
        " 'wall_s': 1.0}\n"
        "(run / 'summary.json').write_text(json.dumps(s))\n"
    )
    return fake, wt


def test_a_run_whose_warmup_differs_from_its_seeds_committed_runs_is_stopped(
    tool, tmp_path, monkeypatch, capsys
):
    """Paired runs are one run up to the end of the warm-up; a run on another kind of CPU is
    not (the first logged loss already differs). The driver must stop such a run, remove its
    work folder (a checkpoint to resume from would carry the difference on), start no other
    job of that seed at that split, and still train the rest; a run that agrees is committed
    with ``cpu.json``, the machine that trained it."""
    fake, wt = _stand_in_logging(tmp_path)
    dest = tool.MAIN / "res/study"
    # the committed mean-teacher runs: seed 0 logged what the stand-in logs, seed 1 did not
    for seed, loss in ((0, 1.0), (1, 1.2345)):
        run = dest / "digits_meanteacher_1_16" / f"seed{seed}"
        _summary(run, 40.0, 30.0)
        _log(run / "log.jsonl", [{"loss_sup": loss, "step": 50, "wall_s": 1.0}])
    subprocess.run(["git", "-C", str(tool.MAIN), "add", "res"], check=True)
    subprocess.run(["git", "-C", str(tool.MAIN), "commit", "-q", "-m", "earlier runs"], check=True)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(
        "res/study digits_brpg_1_16 0\n"  # agrees with its seed's run: trained, committed
        "res/study digits_brpg_1_16 1\n"  # differs: stopped
        "res/study digits_plainproto_1_16 1\n"  # the same seed and split: not started
        "res/study digits_brpg_1_8 1\n"  # another split, nothing committed: trained
    )
    real_sleep = time.sleep
    monkeypatch.setattr(tool.time, "sleep", lambda s: real_sleep(min(s, 0.05)))
    monkeypatch.setattr(tool, "_training_runs", lambda: 0)  # not this machine's study runs
    args = ["--jobs", str(jobs), "--worktree", str(wt), "--python", str(fake), "--lanes", "1"]
    with pytest.raises(SystemExit) as done:
        tool.main(args)
    assert done.value.code == 0  # a stopped run is not a failure
    starts = sorted(p.name for p in (wt / "runs" / "study_logs").iterdir())
    assert starts == [
        "res_study__digits_brpg_1_16__seed0.log",
        "res_study__digits_brpg_1_16__seed1.log",
        "res_study__digits_brpg_1_8__seed1.log",
    ]
    assert (dest / "digits_brpg_1_16/seed0/summary.json").exists()
    assert (dest / "digits_brpg_1_8/seed1/summary.json").exists()
    assert not (dest / "digits_brpg_1_16/seed1").exists()  # stopped before its summary
    assert not tool._work_dir(("res/study", "digits_brpg_1_16", 1, []), wt).exists()
    assert tool._work_dir(("res/study", "digits_brpg_1_16", 0, []), wt).exists()
    out = capsys.readouterr().out
    assert "stopped res/study digits_brpg_1_16 seed 1: loss_sup at step 50 is 1.1 here" in out
    assert "1.2345 in" in out and "does not reproduce the committed warm-up of seed 1" in out
    cpu = json.loads((dest / "digits_brpg_1_16/seed0/cpu.json").read_text())
    assert {"cpu_model", "cpu_id", "cpu_capability"} <= set(cpu) and cpu["torch_threads"] == 1
    tracked = subprocess.run(
        ["git", "-C", str(tool.MAIN), "ls-files", "res/study/digits_brpg_1_16/seed0"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert "res/study/digits_brpg_1_16/seed0/cpu.json" in tracked


def test_live_runs_reads_the_job_of_every_training_process(tool, monkeypatch):
    """A driver started again while a killed driver's runs still train must see them (their
    lock files name the dead driver): read from the ``brpg seeds`` command lines."""
    lines = [
        f"12 /v/python -m brpg seeds --configs digits_brpg_1_16 --seeds 7 --dest {tool.MAIN}"
        "/results/digits_v3/study --set train.threads=1",
        "13 /v/python -m brpg seeds --configs digits_suponly_1_8 --seeds 2 --dest /elsewhere/x",
        "14 /v/python -m brpg seeds --help",
    ]

    class Done:
        stdout = "\n".join(lines) + "\n"

    monkeypatch.setattr(tool.subprocess, "run", lambda *a, **k: Done())
    assert tool._live_runs() == {
        ("results/digits_v3/study", "digits_brpg_1_16", 7),
        ("/elsewhere/x", "digits_suponly_1_8", 2),
    }
