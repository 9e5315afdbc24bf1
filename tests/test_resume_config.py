"""Resuming a run with another config is refused, with the changed keys listed (issue 18).

Free to change on resume (``RESUME_FREE_KEYS``): where and how fast a run trains and what it
logs (data root and workers, device, threads, log/checkpoint/eval intervals, eval batch size).
Everything else, ``train.steps`` included (it moves the LR schedule and every ramp), needs
``--allow-config-change`` / ``Trainer(allow_config_change=True)``. Evaluation-only users of a
checkpoint (``brpg eval``, the reproduce figures) may override anything.

Machine: exact. Which config changes a resume refuses. train.threads is free to change on resume:
the run continues correctly, but after a change of thread count it is no longer bit-identical to a
straight run (tests/README.md).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from brpg import cli
from brpg.config import load_config
from brpg.engine.evaluate_run import evaluate_run
from brpg.engine.trainer import RESUME_FREE_KEYS, RunDirError, Trainer, changed_keys


def sets(data_root: Path, *extra: str) -> list[str]:
    return [
        f"data.root={data_root}",
        "data.digits_train=16",
        "data.digits_val=8",
        "model.width=8",
        "model.decoder_channels=16",
        "model.rep_dim=8",
        "train.batch_size=4",
        "train.steps=2",
        "train.ckpt_every=1",
        "train.log_every=1",
        "train.threads=1",
        "optim.warmup_steps=1",
        "eval.batch_size=8",
        *extra,
    ]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    run = tmp_path_factory.mktemp("run")
    Trainer(load_config("digits_suponly_1_16", sets(root)), run, progress=False).fit()
    return root, run


def test_changed_keys_lists_nested_differences():
    a = {"name": "x", "train": {"steps": 2, "lr": 1.0}, "eval": {"protocol": "full"}}
    b = {"name": "x", "train": {"steps": 4, "lr": 1.0}, "eval": {"protocol": "sliding"}}
    assert changed_keys(a, b) == ["eval.protocol", "train.steps"]
    assert changed_keys(a, a) == []


def test_resume_with_a_changed_config_is_refused_and_lists_the_keys(run_dir):
    root, run = run_dir
    cfg = load_config("digits_suponly_1_16", sets(root, "train.steps=4", "optim.lr=0.5"))
    with pytest.raises(RunDirError) as err:
        Trainer(cfg, run, resume=True, progress=False)
    msg = str(err.value)
    assert "train.steps: 2 -> 4" in msg and "optim.lr: 0.003 -> 0.5" in msg
    assert "--allow-config-change" in msg


def test_settings_that_change_no_result_may_differ(run_dir):
    root, run = run_dir
    assert "train.steps" not in RESUME_FREE_KEYS
    cfg = load_config(
        "digits_suponly_1_16",
        sets(root, "train.threads=2", "train.log_every=7", "eval.batch_size=3"),
    )
    tr = Trainer(cfg, run, resume=True, progress=False)
    assert tr.step == 2


def test_allow_config_change_extends_a_run(run_dir, tmp_path):
    root, run = run_dir
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    cfg = load_config("digits_suponly_1_16", sets(root, "train.steps=3"))
    tr = Trainer(cfg, copy, resume=True, progress=False, allow_config_change=True)
    assert tr.fit()["steps"] == 3


def test_brpg_eval_may_override_the_eval_settings(run_dir, tmp_path):
    root, run = run_dir
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    res = evaluate_run(
        copy, ["eval.protocol=sliding", "eval.crop_size=48", "eval.stride=32"], progress=False
    )
    assert res["step"] == 2


def test_cli_refuses_then_accepts_with_the_flag(run_dir, tmp_path, capsys):
    root, run = run_dir
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    args = ["train", "--config", "digits_suponly_1_16", "--out", str(copy), "--resume"]
    args += ["--no-progress", *(a for s in sets(root, "train.steps=3") for a in ("--set", s))]
    assert cli.main(args) == 2
    assert "train.steps: 2 -> 3" in capsys.readouterr().err
    assert cli.main([*args, "--allow-config-change"]) == 0
    assert "after 3 steps" in capsys.readouterr().out
