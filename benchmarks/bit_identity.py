"""Bit-identity of training across two checkouts (issue 14): a refactor must not change a run.

Runs 12-step CPU trainings of every variant (SupOnly, mean teacher, BRPG through every phase,
CPG off, csp, COCO back queue, ``grad_accum=2``, UniMatch with and without BRPG and with an EMA
teacher, SegFormer + BRPG) on tiny settings in one checkout and prints a SHA-256 per variant of
the final student, teacher, prototype bank, memories, optimiser state and the losses of
``log.jsonl``. Then, with ``--resume-from``, it resumes the checkpoints another checkout left
mid-run (sampling window and proto phase) and hashes those too: old checkpoints must resume to
the same weights. Usage (from this checkout; ``git worktree add /tmp/base 6a604a4`` for the base)::

    python -m benchmarks.bit_identity --repo /tmp/base --out /tmp/bitid/base
    python -m benchmarks.bit_identity --repo . --out /tmp/bitid/new --resume-from /tmp/bitid/base
    python -m benchmarks.bit_identity --compare /tmp/bitid/base /tmp/bitid/new

Each run is a subprocess with ``PYTHONPATH=REPO`` and ``cwd=REPO``, so the code under test is
that checkout's; only this driver is shared. The driver uses the stable entry points
``brpg.config.load_config`` and ``brpg.engine.trainer.Trainer``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

STEPS = 12  # warm-up 0-2, semi 3, sampling 4-6, clustering before 7, proto 7-11
BRPG_TINY = [
    "semi.sup_only_steps=3",
    "proto.sample_start_step=4",
    "proto.sample_steps=3",
    "proto.sample_pixel_num=8",
    "proto.queue_len=64",
    "proto.grid_num=7",
    "proto.unsup_sample_num=16",
    "proto.kmeans_iters=5",
    "proto.kmeans_n_init=1",
    "proto.thr_delay_steps=2",
]
# name -> (preset, framework, brpg on, extra overrides); framework None: SupOnly
VARIANTS: dict[str, tuple[str, str | None, bool, list[str]]] = {
    "suponly": ("digits_suponly_1_16", None, False, []),
    "meanteacher": ("digits_meanteacher_1_16", "meanteacher", False, []),
    "brpg": ("digits_brpg_1_16", "meanteacher", True, []),
    "brpg_nocpg": ("digits_brpg_1_16", "meanteacher", True, ["proto.memory=random"]),
    "brpg_csp": ("digits_brpg_1_16", "meanteacher", True, ["proto.threshold_type=csp"]),
    "brpg_back": ("digits_brpg_1_16", "meanteacher", True, ["proto.back_queue=true"]),
    "brpg_recluster": ("digits_brpg_1_16", "meanteacher", True, ["proto.recluster_every=2"]),
    "brpg_accum2": ("digits_brpg_1_16", "meanteacher", True, ["train.grad_accum=2"]),
    "unimatch": ("digits_unimatch_1_16", "unimatch", False, []),
    "unimatch_brpg": ("digits_unimatch_brpg_1_16", "unimatch", True, []),
    "unimatch_brpg_ema": (
        "digits_unimatch_brpg_1_16",
        "unimatch",
        True,
        ["semi.unimatch_teacher=ema", "semi.eval_model=teacher"],
    ),
    "segformer_brpg": ("digits_segformer_brpg_1_16", "meanteacher", True, []),
}
# resumed from the other checkout's checkpoint taken before this step
RESUMES = {"brpg": 9, "brpg_back": 5, "meanteacher": 5, "unimatch_brpg": 6}


def overrides(name: str, data_root: str) -> list[str]:
    preset, framework, brpg_on, extra = VARIANTS[name]
    sets = [
        f"data.root={data_root}",
        "data.digits_train=64",
        "data.digits_val=16",
        "model.width=8",
        "model.decoder_channels=16",
        "model.rep_dim=16",
        f"model.rep_head={'true' if brpg_on else 'false'}",
        "train.device=cpu",
        "train.batch_size=2",
        f"train.steps={STEPS}",
        "train.ckpt_every=1",
        "train.log_every=1",
        "train.threads=1",
        "optim.warmup_steps=2",
        "eval.batch_size=8",
        *(BRPG_TINY if framework is not None else []),
        *extra,
    ]
    return sets + method_sets(framework, brpg_on)


def method_sets(framework: str | None, brpg_on: bool) -> list[str]:
    """The framework / BRPG choice in the config schema of the checkout under test."""
    from brpg.config import TrainConfig

    if "method" in TrainConfig.__dataclass_fields__:  # before issue 14: one packed field
        method = "brpg" if brpg_on else ("suponly" if framework is None else "semi")
        return [f"train.method={method}"] + (
            [] if framework is None else [f"semi.framework={framework}"]
        )
    return [f"train.framework={framework or 'suponly'}", f"train.brpg={str(brpg_on).lower()}"]


def digest(run_dir: Path) -> dict[str, str]:
    """SHA-256 of each part of the final state: weights, method state, optimiser, losses."""
    import torch

    state = torch.load(run_dir / "last.pt", weights_only=False, map_location="cpu")
    parts = {
        "model": state["model"],
        "method": state["method"],
        "optimizer": state["optimizer"],
        "step": state["step"],
    }
    out = {k: _hash(v) for k, v in parts.items()}
    recs = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    losses = [{k: v for k, v in r.items() if k != "wall_s"} for r in recs]
    out["log"] = hashlib.sha256(json.dumps(losses, sort_keys=True).encode()).hexdigest()
    out["method_keys"] = ",".join(sorted(state["method"] or {}))
    return out


def _hash(obj: object) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: hashlib._Hash, obj: object) -> None:
    import torch

    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(f"K{k}".encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(repr(obj).encode())


def run_one(name: str, out: Path, data_root: str, crash_at: int | None, resume: bool) -> None:
    """One variant in this process (the checkout on ``sys.path``)."""
    import torch

    from brpg.config import load_config
    from brpg.engine.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(VARIANTS[name][0], overrides(name, data_root))
    tr = Trainer(cfg, out, resume=resume, progress=False)
    if crash_at is not None:
        original = tr.train_step

        def step(*a: object, **k: object) -> object:
            if tr.step == crash_at:
                raise SystemExit(0)  # the checkpoint of step crash_at is on disk
            return original(*a, **k)

        tr.train_step = step  # type: ignore[method-assign]
    tr.fit()


def spawn(repo: Path, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    subprocess.run(cmd, cwd=repo, env=env, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, help="checkout whose brpg is tested")
    p.add_argument("--out", type=Path, help="folder for the runs and hashes.json")
    p.add_argument("--data-root", default="/tmp/bitid_digits", help="DigitScenes cache")
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="a subset of variants")
    p.add_argument("--resume-from", type=Path, help="resume the crashed runs of another --out")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # name out crash_at resume
    a = p.parse_args()
    if a.child:
        name, out, crash, resume = a.child
        crash_at = None if crash == "-" else int(crash)
        run_one(name, Path(out), a.data_root, crash_at, resume == "1")
        return
    if a.compare:
        compare(*a.compare)
        return
    repo, out = a.repo.resolve(), a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    hashes: dict[str, dict[str, str]] = {}
    for name in a.only or list(VARIANTS):
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        spawn(repo, ["--data-root", a.data_root, "--child", name, str(run_dir), "-", "0"])
        hashes[name] = digest(run_dir)
        if name in RESUMES:  # a run stopped after step k's checkpoint, for the other checkout
            crashed = out / f"{name}.crashed"
            shutil.rmtree(crashed, ignore_errors=True)
            spawn(
                repo,
                [
                    "--data-root",
                    a.data_root,
                    "--child",
                    name,
                    str(crashed),
                    str(RESUMES[name]),
                    "0",
                ],
            )
        if a.resume_from is not None and name in RESUMES:
            resumed = out / f"{name}.resumed"
            shutil.rmtree(resumed, ignore_errors=True)
            shutil.copytree(a.resume_from.resolve() / f"{name}.crashed", resumed)
            spawn(repo, ["--data-root", a.data_root, "--child", name, str(resumed), "-", "1"])
            hashes[f"{name}.resumed"] = digest(resumed)
        print(name, hashes[name]["model"][:16], flush=True)
    (out / "hashes.json").write_text(json.dumps(hashes, indent=2))


def compare(a: Path, b: Path) -> None:
    """Exit 1 unless every variant of ``a`` has the same hashes in ``b`` (resumes against the
    straight run of ``a``)."""
    ha, hb = (json.loads((d / "hashes.json").read_text()) for d in (a, b))
    bad = 0
    for name, ref in ha.items():
        for key in ("model", "method", "optimizer", "step", "log", "method_keys"):
            got = hb.get(name, {}).get(key)
            ok = got == ref[key]
            bad += not ok
            print(
                f"{'ok  ' if ok else 'DIFF'} {name:20s} {key:11s} {ref[key][:16]} {str(got)[:16]}"
            )
        resumed = hb.get(f"{name}.resumed")
        if resumed is not None:  # an old checkpoint resumed here == the old straight run
            for key in ("model", "method", "optimizer", "step", "log"):
                ok = resumed[key] == ref[key]
                bad += not ok
                print(f"{'ok  ' if ok else 'DIFF'} {name + '.resumed':20s} {key:11s}")
    print("bit-identical" if not bad else f"{bad} differences")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
