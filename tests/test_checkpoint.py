"""Atomic checkpoints, weights_only loading and RNG capture/restore.

Machine: exact. Tensors saved and loaded are the same; a restored RNG state repeats the same seeded
draws.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from brpg.engine import checkpoint as ckpt
from brpg.engine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _draw() -> tuple[float, float, float, float, list[float]]:
    return (
        random.random(),
        random.gauss(0, 1),
        float(np.random.rand()),
        float(np.random.randn()),
        torch.rand(3).tolist(),
    )


def _full_state() -> dict:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 7,
        "best_miou": 12.5,
        "config": {"name": "x", "optim": {"betas": [0.9, 0.999], "pretrained": None}},
        "rng": capture_rng_state(),
    }


def test_round_trip_and_rng_restore(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gauss_next in Python's state
    np.random.randn()  # and a cached gaussian in NumPy's
    state = _full_state()
    expected = _draw()
    path = save_checkpoint(tmp_path / "last.pt", state)
    assert path == tmp_path / "last.pt"

    _draw()  # move every generator on
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["best_miou"] == 12.5
    assert loaded["config"] == state["config"]
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    restore_rng_state(loaded["rng"])
    assert _draw() == expected


def test_rng_state_is_weights_only_safe():
    state = capture_rng_state()
    ckpt._check_safe(state)  # no exception
    assert isinstance(state["torch"], torch.Tensor)
    assert state["numpy"]["keys"].dtype == torch.int64
    assert state["python"]["state"].numel() == 625


def test_atomic_save_leaves_no_temp_file(tmp_path):
    save_checkpoint(tmp_path / "last.pt", {"a": torch.ones(2)})
    save_checkpoint(tmp_path / "last.pt", {"a": torch.zeros(2)})  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["a"], torch.zeros(2))


def test_interrupted_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(3)})

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "w": torch.arange(5)})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    old = load_checkpoint(path)
    assert old["step"] == 1 and torch.equal(old["w"], torch.arange(3))


def test_missing_and_truncated_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(missing)
    path = tmp_path / "last.pt"
    save_checkpoint(path, _full_state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="last.pt"):
        load_checkpoint(path)


def test_unsafe_objects_fail_at_save_time(tmp_path):
    with pytest.raises(TypeError, match=r"state\['rng'\]\['np'\].*numpy"):
        save_checkpoint(tmp_path / "x.pt", {"rng": {"np": np.zeros(3)}})
    assert not list(tmp_path.iterdir())


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / ".last.pt.abc.tmp").write_bytes(b"x")  # a leftover temp file is not a checkpoint
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 10, 9):
        save_checkpoint(tmp_path / f"ckpt_{step}.pt", {"step": step})
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_10.pt"
    save_checkpoint(tmp_path / "last.pt", {"step": 11})
    assert latest_checkpoint(tmp_path) == tmp_path / "last.pt"


def test_load_with_map_location_and_restore(tmp_path):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "last.pt", {"rng": capture_rng_state()})
    expected = torch.rand(2)
    restore_rng_state(load_checkpoint(path, map_location=torch.device("cpu"))["rng"])
    assert torch.equal(torch.rand(2), expected)
    assert os.path.getsize(path) > 0
