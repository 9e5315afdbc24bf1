"""P4 — a DigitScenes training step, before (commit ``70781cd``) and now, side by side.

Issue 13 asks for a DigitScenes step at least 2× faster than at commit ``70781cd``, measured in
one run on one machine. P4 runs the *real* trainer of both versions of the package:

* ``before``: ``brpg/`` of the baseline commit, extracted with ``git archive`` into a
  temporary folder (no checkout is touched);
* ``now``: ``brpg/`` of this checkout.

Each variant is one worker process (``python benchmarks/p4_speed.py --worker``, with
``PYTHONPATH`` choosing the package) that builds a :class:`~brpg.engine.trainer.Trainer` for
its preset at 2 threads, fast-forwarded into the phase to time (mean teacher: after the
warm-up; BRPG: after the one-shot clustering, i.e. the prototype phase that makes up most of
a run), and then times the body of ``Trainer.fit``'s loop: fetch the labeled (and unlabeled)
batch, ``train_step``. The parent sends every worker ``k`` steps in turn, round after round,
and only one worker computes at a time, so the variants see the same machine load and never
compete for the cores. The first ``warmup`` steps of each worker are not timed (they also
fill ``now``'s in-memory scene cache: a full run spends well over 90 % of its steps warm).

Variants (``VARIANTS``): ``{suponly,meanteacher,brpg}_{before,now}`` on the ``digits_*_1_8``
presets, plus ``meanteacher_now_bf16`` and ``brpg_now_bf16`` (``train.amp=bf16``: what bf16
autocast does on this CPU, native or emulated). Every other variant runs in fp32
(``train.amp="off"``, as the DigitScenes presets pin it; the baseline's CPU steps are fp32 too).

Ratios: ``t(before) / t(now)`` per preset (target ≥ 2 for mean teacher and BRPG), and
``t(brpg_now) / t(meanteacher_now)`` (P2's target ≤ 1.10).

Standalone::

    python -m benchmarks.p4_speed                 # full, ~3 min on 2 cores
    python -m benchmarks --only p4 --out results/benchmarks/p4.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: `benchmarks` lives in the repo root; appended,
    # so that a worker's PYTHONPATH still decides which `brpg` is imported
    sys.path.append(str(Path(__file__).resolve().parents[1]))

TITLE = "P4 DigitScenes training step, before (70781cd) vs now"
AVAILABLE = True
REASON = ""
BASELINE = "70781cd"
REPO = Path(__file__).resolve().parents[1]
PRESETS = {"suponly": "digits_suponly_1_8", "meanteacher": "digits_meanteacher_1_8"}
PRESETS["brpg"] = "digits_brpg_1_8"


@dataclass(frozen=True)
class P4Shapes:
    rounds: int = 6
    steps_per_round: int = 5
    warmup: int = 25  # untimed steps per worker (BRPG clusters at step 2 of them)
    n_train: int = 400  # DigitScenes scenes: 50 labeled + 350 unlabeled at 1/8 (cost per step
    n_val: int = 50  # does not depend on it; a smaller set only warms the cache sooner)
    bf16: bool = True  # also time meanteacher_now_bf16 and brpg_now_bf16
    overrides: tuple[str, ...] = ()
    # more variants of `now`: (name, method, overrides), e.g. ("brpg_now_nhwc", "brpg",
    # ("train.channels_last=true",))
    extra: tuple[tuple[str, str, tuple[str, ...]], ...] = ()


FULL = P4Shapes()
QUICK = P4Shapes(
    rounds=2,
    steps_per_round=1,
    warmup=3,
    n_train=48,
    n_val=8,
    bf16=False,
    overrides=(
        "model.width=8",
        "model.decoder_channels=16",
        "model.rep_dim=16",
        "train.batch_size=2",
        "semi.unlabeled_batch_size=2",
        "proto.queue_len=200",
        "proto.kmeans_iters=5",
        "proto.kmeans_n_init=1",
    ),
)


def _overrides(method: str, shapes: P4Shapes, data_root: Path) -> list[str]:
    """Overrides that put a run of ``method`` straight into the phase to time."""
    out = [
        f"data.root={data_root}",
        f"data.digits_train={shapes.n_train}",
        f"data.digits_val={shapes.n_val}",
        "train.threads=2",
        'train.amp="off"',  # quoted: the baseline's config reads a YAML False as an error
        "train.ckpt_every=0",
        "train.log_every=100000",
    ]
    if method != "suponly":
        out.append("semi.sup_only_steps=0")  # semi-supervised from step 0: no warm-up to skip
    if method == "brpg":  # sample two steps, cluster, then every step is a prototype step
        out += ["proto.sample_start_step=0", "proto.sample_steps=2"]
    return out + list(shapes.overrides)


# ----------------------------------------------------------------------------- worker


def worker() -> None:
    """Build the trainer from the JSON spec on the first stdin line, then answer ``{"steps": n}``
    lines with ``{"seconds": [...]}`` (one wall time per step)."""
    import torch

    spec = json.loads(sys.stdin.readline())
    from brpg.config import load_config
    from brpg.engine.trainer import Trainer

    cfg = load_config(spec["preset"], spec["overrides"])
    torch.set_num_threads(2)
    trainer = Trainer(cfg, spec["run_dir"], progress=False)
    from brpg.engine.batches import step_loader

    t = cfg.train
    labeled = step_loader(trainer.labeled, t.batch_size, t.seed)
    unlabeled = trainer._unlabeled_batches() if trainer.method is not None else None

    def one_step() -> None:  # the body of Trainer.fit's loop (grad_accum = 1)
        batch = {k: v for k, v in next(labeled).items() if torch.is_tensor(v)}
        image_u = None if unlabeled is None else [next(unlabeled)["image"]]
        trainer.train_step([batch], image_u)
        trainer.step += 1

    import brpg

    print(json.dumps({"ready": True, "brpg": brpg.__file__}), flush=True)
    for line in sys.stdin:
        n = json.loads(line)["steps"]
        seconds = []
        for _ in range(n):
            t0 = time.perf_counter()
            one_step()
            seconds.append(time.perf_counter() - t0)
        print(json.dumps({"seconds": seconds}), flush=True)


# ----------------------------------------------------------------------------- parent


def extract_baseline(dest: Path, commit: str = BASELINE) -> Path:
    """``brpg/`` of ``commit`` extracted under ``dest`` (``git archive``); returns ``dest``."""
    from benchmarks.common import BenchmarkUnavailable

    try:
        blob = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit, "brpg"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise BenchmarkUnavailable(
            f"cannot read commit {commit} from git in {REPO} (a shallow clone? run `git fetch "
            f"--unshallow`): {err}"
        ) from err
    dest.mkdir(parents=True, exist_ok=True)
    import io

    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    return dest


class Worker:
    """One worker process of a variant; :meth:`steps` times ``n`` steps."""

    def __init__(self, pythonpath: Path, spec: dict[str, Any]) -> None:
        env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="2")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=str(pythonpath),
        )
        self._send(spec)
        self.info = self._read()

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"P4 worker exited with {self.proc.wait()}")
            if line.startswith("{"):
                return json.loads(line)

    def steps(self, n: int) -> list[float]:
        self._send({"steps": n})
        return self._read()["seconds"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def run(
    quick: bool = False,
    device: Any = None,
    repeats: int | None = None,
    shapes: P4Shapes | None = None,
) -> dict[str, Any]:
    """Time every variant, interleaved; the result dict of ``python -m benchmarks``."""
    from benchmarks.common import BenchmarkUnavailable, summarize, target

    if device is not None and str(device) != "cpu":
        raise BenchmarkUnavailable("P4 compares CPU steps (the DigitScenes presets' device)")
    shapes = shapes or (QUICK if quick else FULL)
    if repeats is not None:
        shapes = P4Shapes(**{**shapes.__dict__, "rounds": repeats})
    with tempfile.TemporaryDirectory(prefix="brpg-p4-") as tmp_str:
        tmp = Path(tmp_str)
        roots = {"before": extract_baseline(tmp / "before"), "now": REPO}
        variants: dict[str, tuple[str, str, list[str]]] = {}
        for method in PRESETS:
            for version in ("before", "now"):
                variants[f"{method}_{version}"] = (method, version, [])
        if shapes.bf16:
            variants["meanteacher_now_bf16"] = ("meanteacher", "now", ["train.amp=bf16"])
            variants["brpg_now_bf16"] = ("brpg", "now", ["train.amp=bf16"])
        for name, method, extra in shapes.extra:
            variants[name] = (method, "now", list(extra))
        workers: dict[str, Worker] = {}
        try:
            for name, (method, version, extra) in variants.items():
                spec = {
                    "preset": PRESETS[method],
                    # one data cache per version: the generator differs (v2 before, v3 now)
                    "overrides": _overrides(method, shapes, tmp / f"data-{version}") + extra,
                    "run_dir": str(tmp / "runs" / name),
                }
                workers[name] = Worker(roots[version], spec)
                got = Path(workers[name].info["brpg"]).resolve()
                if not got.is_relative_to(Path(roots[version]).resolve()):
                    raise RuntimeError(f"P4 worker {name} imported brpg from {got}")
            for w in workers.values():
                w.steps(shapes.warmup)
            per_step: dict[str, list[float]] = {name: [] for name in workers}
            for _ in range(shapes.rounds):
                for name, w in workers.items():
                    secs = w.steps(shapes.steps_per_round)
                    per_step[name].append(sum(secs) / len(secs))
        finally:
            for w in workers.values():
                w.close()
    meas = {name: summarize(s, "ms", 1000.0) for name, s in per_step.items()}
    med = {name: m["median"] for name, m in meas.items()}
    ratios = {f"{m}: before / now": med[f"{m}_before"] / med[f"{m}_now"] for m in ("suponly",)}
    ratios["meanteacher: before / now"] = med["meanteacher_before"] / med["meanteacher_now"]
    ratios["brpg: before / now"] = med["brpg_before"] / med["brpg_now"]
    ratios["brpg_now / meanteacher_now"] = med["brpg_now"] / med["meanteacher_now"]
    ratios["brpg_before / meanteacher_before"] = med["brpg_before"] / med["meanteacher_before"]
    for m in ("meanteacher", "brpg"):
        if f"{m}_now_bf16" in med:
            ratios[f"{m}: fp32 / bf16 now"] = med[f"{m}_now"] / med[f"{m}_now_bf16"]
    targets = {
        "mt": target(ratios["meanteacher: before / now"], ">=", 2.0, "mean-teacher step speed-up"),
        "brpg": target(ratios["brpg: before / now"], ">=", 2.0, "BRPG step speed-up"),
        "p2": target(ratios["brpg_now / meanteacher_now"], "<=", 1.10, "BRPG / MT step (P2)"),
    }
    return {
        "status": "ok",
        "title": TITLE,
        "baseline_commit": BASELINE,
        "shapes": shapes.__dict__,
        "measurements": meas,
        "ratios": ratios,
        "targets": targets,
    }


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        from benchmarks.run import format_result

        print(format_result("p4", run(quick="--quick" in sys.argv)))
