"""TensorBoard event files beside log.jsonl (issue 14): same numbers, one curve after a resume.

Machine: exact, same-machine. Which steps the event file holds after a crash and resume is exact;
its losses equal log.jsonl's of the same run (same-machine; pytest.approx absorbs TensorBoard's
float32 storage).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from brpg.config import load_config
from brpg.engine.tensorboard import TensorBoardLog, tensorboard_enabled
from brpg.engine.trainer import Trainer

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the tensorboard package is not installed",
)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(run_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_records_become_scalars(tmp_path):
    tb = TensorBoardLog(tmp_path)
    tb.record({"step": 5, "loss_sup": 0.5, "lr": 0.01, "wall_s": 3.0})
    tb.record({"step": 7, "event": "prototypes_per_class", "prototypes_per_class": [2, 3]})
    tb.record({"step": 9, "val_miou": 40.0, "val_mbiou": 20.0, "final": True})
    tb.close()
    got = scalars(tmp_path)
    assert got["loss/loss_sup"] == [(5, 0.5)]
    assert got["train/lr"] == [(5, pytest.approx(0.01))]
    assert got["proto/prototypes"] == [(7, 5.0)]
    assert got["proto/prototypes_per_class/1"] == [(7, 3.0)]
    assert got["val/miou"] == [(9, 40.0)] and got["val/mbiou"] == [(9, 20.0)]
    assert "train/wall_s" not in got and "train/final" not in got


def test_setting_auto_follows_the_package_and_never_turns_it_off():
    assert tensorboard_enabled("auto") and tensorboard_enabled("always")
    assert not tensorboard_enabled("never")


def _cfg(data_root: Path, steps: int, tensorboard: str = "auto"):
    return load_config(
        "digits_suponly_1_16",
        [
            f"data.root={data_root}",
            "data.digits_train=64",
            "data.digits_val=16",
            "model.width=8",
            "model.decoder_channels=16",
            "model.rep_dim=16",
            "train.device=cpu",
            "train.batch_size=2",
            f"train.steps={steps}",
            "train.ckpt_every=2",
            "train.log_every=1",
            "train.threads=1",
            f"train.tensorboard={tensorboard}",
            "optim.warmup_steps=2",
            "eval.batch_size=8",
        ],
    )


class Crash(RuntimeError):
    pass


def test_training_writes_events_and_a_resume_purges_the_lost_steps(tmp_path):
    data_root, run = tmp_path / "digits", tmp_path / "run"
    cfg = _cfg(data_root, steps=6)
    tr = Trainer(cfg, run, progress=False)
    original = tr.train_step

    def step(*a, **k):
        if tr.step == 5:  # steps 1-5 logged, last checkpoint at step 4
            raise Crash
        return original(*a, **k)

    tr.train_step = step  # type: ignore[method-assign]
    with pytest.raises(Crash):
        tr.fit()
    assert list(run.glob("events.out.tfevents.*"))
    assert [s for s, _ in scalars(run)["loss/loss_sup"]] == [1, 2, 3, 4, 5]

    Trainer(cfg, run, resume=True, progress=False).fit()
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss_sup"]) for r in records if "loss_sup" in r]
    got = scalars(run)
    assert [s for s, _ in got["loss/loss_sup"]] == [1, 2, 3, 4, 5, 6]  # step 5 once: purged
    assert got["loss/loss_sup"] == [(s, pytest.approx(v)) for s, v in losses]
    assert got["val/miou"][-1][0] == 6 and "train/lr" in got


def test_never_writes_no_event_file(tmp_path):
    Trainer(_cfg(tmp_path / "digits", steps=1, tensorboard="never"), tmp_path / "run",
            progress=False).fit()  # fmt: skip
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))
