"""The supervised trainer end to end through the CLI: summary, exact resume after SIGKILL, DDP."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    for key in ("val_miou", "per_class_iou", "steps", "wall_s", "config", "commit"):
        assert key in summary
    assert summary["steps"] == 6 and len(summary["per_class_iou"]) == 11
    assert 0.0 <= summary["val_miou"] <= 100.0
    assert summary["config"]["data"]["labeled_split"] == "splits/1_8/labeled.txt"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("loss_sup" in rec for rec in log)

    r = brpg("eval", "--run", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "eval.json").read_text())
    assert res["miou"] == pytest.approx(summary["val_miou"], abs=1e-6)

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp(tmp_path, data_root):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
            "--master_addr=127.0.0.1",
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
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
