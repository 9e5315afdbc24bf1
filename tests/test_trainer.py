"""The supervised trainer end to end through the CLI: summary, exact resume after SIGKILL, DDP.

Machine: exact, same-machine, fp32-tolerance, bound, precision. CLI errors, summary keys,
evaluation steps and the grad-accum step order are exact. Same-machine, all at one thread: the
weights after SIGKILL and resume, and after a grad-accum resume, equal the straight run's; the two
gloo ranks end with equal parameters; brpg eval equals the in-training evaluation (abs 1e-6). The
grad-accum gradient and update against two by-hand backward passes are fp32-tolerance (rtol 1e-6,
train.amp=off stated) and marked precision; the mIoU as the mean of the per-class IoUs is
fp32-tolerance too. The mIoU's range and per-class IoUs that differ are bound.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ddp_helpers import run_torchrun

from brpg.config import ConfigError, load_config
from brpg.engine.batches import _mix, step_loader
from brpg.engine.trainer import Trainer
from brpg.frameworks.supervised import suponly_step

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(data_root: Path, steps: int, ckpt_every: int) -> list[str]:
    sets = [
        f"data.root={data_root}",
        "data.digits_train=64",
        "data.digits_val=16",
        "model.width=8",
        "model.decoder_channels=16",
        "model.rep_dim=16",
        "train.batch_size=4",
        f"train.steps={steps}",
        f"train.ckpt_every={ckpt_every}",
        "train.log_every=5",
        "train.threads=1",
        "optim.warmup_steps=3",
        "eval.batch_size=8",
    ]
    return [a for s in sets for a in ("--set", s)]


def brpg(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "brpg", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits")


def test_train_writes_summary_and_eval_agrees(tmp_path, data_root):
    out = tmp_path / "run"
    r = brpg(
        "train",
        "--config",
        "digits_suponly_1_8",
        "--out",
        str(out),
        "--no-progress",
        *tiny_overrides(data_root, steps=6, ckpt_every=3),
        *("--set", "train.eval_every=3"),  # one evaluation during training, one at the end
    )
    assert r.returncode == 0, r.stderr
    assert "mBIoU" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in ("val_miou", "per_class_iou", "val_mbiou", "per_class_biou", "steps", "wall_s",
                "config", "commit"):  # fmt: skip
        assert key in summary
    assert summary["steps"] == 6 and len(summary["per_class_iou"]) == 11
    # mIoU / mBIoU are the plain means of the per-class values, which are not all equal
    assert summary["val_miou"] == pytest.approx(sum(summary["per_class_iou"]) / 11)
    assert len(set(summary["per_class_iou"])) > 1 and 0.0 < summary["val_miou"] <= 100.0
    assert len(summary["per_class_biou"]) == 11
    assert summary["val_mbiou"] == pytest.approx(sum(summary["per_class_biou"]) / 11)
    assert summary["best_val_miou"] >= summary["val_miou"]
    assert summary["biou_dilation_ratio"] == 0.02
    assert summary["config"]["data"]["labeled_split"] == "splits/1_8/labeled.txt"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("loss_sup" in rec for rec in log)
    evals = [rec for rec in log if "val_miou" in rec]
    assert [rec["step"] for rec in evals] == [3, 6] and evals[-1]["final"]
    assert all(0.0 <= rec["val_mbiou"] <= 100.0 for rec in evals)
    assert evals[-1]["val_mbiou"] == summary["val_mbiou"]

    r = brpg("eval", "--run", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "eval.json").read_text())
    assert res["miou"] == pytest.approx(summary["val_miou"], abs=1e-6)
    assert res["mbiou"] == pytest.approx(summary["val_mbiou"], abs=1e-6)
    assert json.loads(r.stdout)["mbiou"] == pytest.approx(res["mbiou"])

    # the run directory is not silently overwritten
    r = brpg(
        "train",
        "--config",
        "digits_suponly_1_8",
        "--out",
        str(out),
        "--no-progress",
        *tiny_overrides(data_root, steps=6, ckpt_every=3),
    )
    assert r.returncode == 2 and "--resume" in r.stderr


def test_cli_errors_are_clear(tmp_path):
    r = brpg("train", "--config", "digits_suponly_1_61")
    assert r.returncode == 2 and "digits_suponly_1_16" in r.stderr
    r = brpg("train", "--config", "digits_suponly_1_16", "--set", "train.stpes=3")
    assert r.returncode == 2 and "train.stpes" in r.stderr and "steps" in r.stderr
    r = brpg("train", "--config", "digits_suponly_1_16", "--out", str(tmp_path / "x"), "--resume")
    assert r.returncode == 2 and "no checkpoint" in r.stderr


def test_sigkill_and_resume_gives_identical_weights(tmp_path, data_root):
    steps, every = 30, 10
    args = tiny_overrides(data_root, steps=steps, ckpt_every=every)
    straight = tmp_path / "straight"
    r = brpg(
        "train", "--config", "digits_suponly_1_8", "--out", str(straight), "--no-progress", *args
    )
    assert r.returncode == 0, r.stderr

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "brpg",
            "train",
            "--config",
            "digits_suponly_1_8",
            "--out",
            str(killed),
            "--no-progress",
            *args,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (killed / "summary.json").exists()
    step_at_kill = torch.load(killed / "last.pt", weights_only=True)["step"]
    assert 0 < step_at_kill < steps

    r = brpg(
        "train",
        "--config",
        "digits_suponly_1_8",
        "--out",
        str(killed),
        "--resume",
        "--no-progress",
        *args,
    )
    assert r.returncode == 0, r.stderr
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from step {step_at_kill}"
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((killed / "summary.json").read_text())
    assert sa["val_miou"] == sb["val_miou"]


def test_two_process_gloo_ddp(tmp_path, data_root):
    out = tmp_path / "ddp"
    r = run_torchrun(
        [
            "-m",
            "brpg",
            "train",
            "--config",
            "digits_suponly_1_8",
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "train.device=cpu",
            *tiny_overrides(data_root, steps=4, ckpt_every=2),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert 0.0 <= summary["val_mbiou"] <= 100.0  # the all-reduced Boundary IoU


# -- gradient accumulation (train.grad_accum) ---------------------------------------------------
BRPG_STEPS = 12  # warm-up 0-2, semi 3, sampling 4-6, clustering before 7, proto 7-11


def accum_sets(data_root: Path, method: str, steps: int, grad_accum: int) -> list[str]:
    """A tiny in-process run on the CPU: ``grad_accum`` micro-batches of 2 images per step."""
    return [
        f"data.root={data_root}",
        "data.digits_train=64",
        "data.digits_val=16",
        "model.width=8",
        "model.decoder_channels=16",
        "model.rep_dim=16",
        f"model.rep_head={'true' if method == 'brpg' else 'false'}",
        f"train.framework={'suponly' if method == 'suponly' else 'meanteacher'}",
        f"train.brpg={str(method == 'brpg').lower()}",
        "train.device=cpu",
        "train.amp=off",  # fp32 on every CPU: the by-hand references run outside autocast
        "train.batch_size=2",
        f"train.grad_accum={grad_accum}",
        f"train.steps={steps}",
        "train.ckpt_every=1",
        "train.log_every=1",
        "train.threads=1",
        "optim.warmup_steps=2",
        "eval.batch_size=8",
        "semi.sup_only_steps=3",
        "proto.sample_start_step=4",
        "proto.sample_steps=3",
        "proto.sample_pixel_num=8",
        "proto.queue_len=64",
        "proto.grid_num=7",
        "proto.unsup_sample_num=16",
        "proto.kmeans_iters=5",
        "proto.kmeans_n_init=1",
    ]


class Crash(RuntimeError):
    pass


def run_trainer(cfg, run_dir: Path, crash_at: int | None = None, resume: bool = False) -> Trainer:
    """``fit()`` a Trainer; with ``crash_at``, raise before that optimiser step (after its ckpt)."""
    tr = Trainer(cfg, run_dir, resume=resume, progress=False)
    if crash_at is not None:
        original = tr.train_step

        def step(*a, **k):
            if tr.step == crash_at:
                raise Crash(f"simulated crash before step {crash_at}")
            return original(*a, **k)

        tr.train_step = step  # type: ignore[method-assign]
        with pytest.raises(Crash):
            tr.fit()
        return tr
    tr.fit()
    return tr


def trainer_state(tr: Trainer) -> dict[str, torch.Tensor]:
    """Student (+ teacher and prototype bank when there is a method) tensors of a trainer."""
    out = {f"student.{k}": v for k, v in tr.model.state_dict().items()}
    if tr.method is not None:
        out.update({f"teacher.{k}": v for k, v in tr.method.teacher.module.state_dict().items()})
        if tr.method.plugin is not None:
            out["bank.prototypes"], out["bank.valid"] = (
                tr.method.plugin.bank.prototypes,
                tr.method.plugin.bank.valid,
            )
    return out


def log_records(run_dir: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in recs]


def test_grad_accum_below_one_is_rejected(data_root):
    with pytest.raises(ConfigError, match=r"train\.grad_accum=0 must be >= 1"):
        load_config("digits_suponly_1_8", accum_sets(data_root, "suponly", 1, 0))


@pytest.mark.precision
def test_grad_accum_step_averages_the_micro_batch_gradients(data_root, tmp_path):
    """k = 2: the trainer's gradient is the mean of two by-hand backward passes on the same
    model, the same two batches (stream positions 0 and 1) and the same RNG stream (one seed per
    optimiser step, the micro-batches drawing their dropout masks in order); so is the update."""
    cfg = load_config("digits_suponly_1_8", accum_sets(data_root, "suponly", 1, 2))
    tr = Trainer(cfg, tmp_path / "accum", progress=False)
    init = {k: v.clone() for k, v in tr.model.state_dict().items()}
    summary = tr.fit()
    assert summary["grad_accum"] == 2 and summary["effective_batch"] == 2 * 2 * 1
    got = {n: p.grad for n, p in tr.model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in got.values())  # every parameter takes part in L_s

    ref = Trainer(cfg, tmp_path / "by_hand", progress=False)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, init[k]), f"{k}: the two trainers start from different weights"
    params = {n: p for n, p in ref.model.named_parameters() if p.requires_grad}
    stream = step_loader(ref.labeled, 2, cfg.train.seed)  # the labeled stream from position 0
    torch.manual_seed(_mix(cfg.train.seed, 104729, 0, 0))  # the trainer's seed of step 0
    ref.model.train()
    per_micro: list[dict[str, torch.Tensor]] = []  # separate backward passes, no accumulation
    for _ in range(2):
        batch = {k: v for k, v in next(stream).items() if torch.is_tensor(v)}
        loss, _ = suponly_step(ref.model, batch, cfg)
        grads = torch.autograd.grad(loss, list(params.values()))
        per_micro.append(dict(zip(params, grads, strict=True)))
    g0, g1 = per_micro
    assert max((g0[n] - g1[n]).abs().max().item() for n in params) > 1e-3  # batches differ
    for n in params:
        want = (g0[n] + g1[n]) / 2
        torch.testing.assert_close(got[n], want, rtol=1e-6, atol=1e-9, msg=f"gradient of {n}")
        params[n].grad = want
    ref.optimizer.step()  # the first step: same LR, momentum and weight decay as the trainer's
    after, want_state = tr.model.state_dict(), ref.model.state_dict()
    for k in after:  # parameters within float rounding; BN statistics: the same two forwards
        torch.testing.assert_close(after[k], want_state[k], rtol=1e-6, atol=1e-9, msg=k)
    assert any(not torch.equal(after[n], init[n]) for n in params)


@pytest.mark.parametrize(
    ("method", "steps", "crash_at"),
    [
        ("suponly", 6, 3),
        ("brpg", BRPG_STEPS, 2),  # resumes in the warm-up: unlabeled stream opens at 3
        ("brpg", BRPG_STEPS, 5),  # in the sampling window, crosses the clustering at 7
        ("brpg", BRPG_STEPS, 9),  # in the proto phase: unlabeled stream resumes at 2·(9-3)
    ],
)
def test_grad_accum_resume_is_exact(data_root, tmp_path, method, steps, crash_at):
    cfg = load_config("digits_suponly_1_16", accum_sets(data_root, method, steps, 2))
    ref = run_trainer(cfg, tmp_path / "straight")
    run = tmp_path / "crashed"
    run_trainer(cfg, run, crash_at=crash_at)
    assert torch.load(run / "last.pt", weights_only=False)["step"] == crash_at
    resumed = run_trainer(cfg, run, resume=True)
    a, b = trainer_state(ref), trainer_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after a crash before step {crash_at}"
    assert log_records(run) == log_records(tmp_path / "straight")
    if method == "brpg":
        by_step = {r["step"]: r for r in log_records(run) if "loss_sup" in r}
        assert "loss_proto" in by_step[BRPG_STEPS]  # the run reached the proto phase


def test_train_until_stops_before_the_clustering_and_the_run_continues_exactly(data_root, tmp_path):
    """``train_until(7)`` in BRPG (sampling window 4-6, clustering at the start of step 7): the
    run stops with full memories and an empty bank, saves a checkpoint there, and a resumed
    ``fit()`` ends where the straight run ends, log included. A loop that ran one step too far
    (the clustering done and the memories freed), or a checkpoint not written at the stop,
    fails it."""
    sets = [*accum_sets(data_root, "brpg", BRPG_STEPS, 1), "train.ckpt_every=0"]  # stop's own
    cfg = load_config("digits_suponly_1_16", sets)
    straight = run_trainer(cfg, tmp_path / "straight")
    run = tmp_path / "stopped"
    tr = Trainer(cfg, run, progress=False)
    tr.train_until(7)
    plugin = tr.method.plugin
    assert tr.step == 7 and torch.load(run / "last.pt", weights_only=False)["step"] == 7
    assert plugin.memory is not None and not plugin.bank.valid.any()
    pushed = sum(int(plugin.memory.count[k].sum()) for k in plugin.memory.kinds)
    assert pushed > 0  # three sampling steps pushed rows
    assert not (run / "summary.json").exists()
    with pytest.raises(ValueError, match=r"train_until\(3\): this run is at step 7"):
        tr.train_until(3)
    resumed = run_trainer(cfg, run, resume=True)
    a, b = trainer_state(straight), trainer_state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after stopping at step 7"
    assert log_records(run) == log_records(tmp_path / "straight")


def test_grad_accum_step_order_in_the_proto_phase(data_root, tmp_path, monkeypatch):
    """k = 2 in BRPG: per optimiser step one seed, one ``before_step``, two backward passes, one
    optimiser / teacher step, then the two micro-batches' prototype EMA rows in their order."""
    from brpg.engine import trainer as trainer_mod

    cfg = load_config("digits_suponly_1_16", accum_sets(data_root, "brpg", 9, 2))
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    events: list[tuple] = []
    rows_made: list[tuple[torch.Tensor, torch.Tensor]] = []

    def wrap(obj, name, tag):
        original = getattr(obj, name)

        def call(*a, **k):
            out = original(*a, **k)
            events.append((tag, tr.step))
            return out

        monkeypatch.setattr(obj, name, call)

    def semi_step(*a, **k):
        loss, logs, rows = real_semi_step(*a, **k)
        if rows is not None:
            rows_made.append(rows)
        return loss, logs, rows

    def ema_update(feats, targets):
        assert feats is rows_made[len(emas)][0] and targets is rows_made[len(emas)][1]
        emas.append(tr.step)
        events.append(("ema", tr.step))
        return real_ema_update(feats, targets)

    real_semi_step, real_ema_update, emas = (
        trainer_mod.semi_step,
        tr.method.plugin.bank.ema_update,
        [],
    )
    monkeypatch.setattr(trainer_mod, "semi_step", semi_step)
    monkeypatch.setattr(tr.method.plugin.bank, "ema_update", ema_update)
    real_manual_seed = torch.manual_seed

    def manual_seed(value):  # the step seeds only (the samples' augmentation seeds are not)
        if value == _mix(cfg.train.seed, 104729, tr.step, 0):
            events.append(("seed", tr.step))
        return real_manual_seed(value)

    monkeypatch.setattr(torch, "manual_seed", manual_seed)
    wrap(tr.method, "before_step", "before")
    wrap(tr.scaler, "scale", "backward")
    wrap(tr.scaler, "step", "opt")
    wrap(tr.method.teacher, "update", "teacher")
    tr.fit()

    def of_step(s: int) -> list[str]:
        return [tag for tag, step in events if step == s]

    for s in range(3):  # warm-up: no teacher EMA, no prototypes
        assert of_step(s) == ["seed", "before", "backward", "backward", "opt"], s
    for s in (3, 4, 5, 6):
        want = ["seed", "before", "backward", "backward", "opt", "teacher"]
        assert of_step(s) == want, s
    for s in (7, 8):
        want = ["seed", "before", "backward", "backward", "opt", "teacher", "ema", "ema"]
        assert of_step(s) == want, s
    assert emas == [7, 7, 8, 8] and len(rows_made) == 4


def test_grad_accum_under_two_process_ddp_keeps_ranks_identical(data_root, tmp_path):
    """k = 2 with gloo DDP: the first micro-batch runs under ``no_sync``, the last all-reduces,
    so both ranks step with the same averaged gradient and end with the same parameters (the
    BatchNorm running statistics are per rank on the CPU: no SyncBatchNorm there)."""
    script = tmp_path / "ddp_accum.py"
    sets = accum_sets(data_root, "suponly", 3, 2)
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "from brpg.config import load_config\n"
        "from brpg.engine.trainer import Trainer\n"
        f"cfg = load_config('digits_suponly_1_8', {sets!r})\n"
        "tr = Trainer(cfg, sys.argv[1], progress=False)\n"
        "tr.fit()\n"
        "params = {n: p.detach() for n, p in tr.model.module.named_parameters()}\n"
        "torch.save(params, f'{sys.argv[1]}/rank{dist.get_rank()}.pt')\n"
    )
    out = tmp_path / "ddp"
    r = run_torchrun(
        [
            str(script),
            str(out),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    w0 = torch.load(out / "rank0.pt", weights_only=True)
    w1 = torch.load(out / "rank1.pt", weights_only=True)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k} differs between the ranks"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["grad_accum"] == 2
    assert summary["effective_batch"] == 2 * 2 * 2
