"""Guards: every config range rejects the first value outside it; a non-finite loss stops a run.

Machine: exact, bound. The range table and its rejections are exact; the non-finite-loss run checks
where it stops (exact) and that the saved weights are finite (bound).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from brpg import config as C
from brpg.config import ConfigError, load_config
from brpg.engine import trainer as trainer_mod
from brpg.engine.trainer import CKPT_NAME, Trainer


def _field_type(path: str) -> type:
    section, key = path.split(".")
    cls = type(getattr(C.Config(), section))
    (f,) = [f for f in dataclasses.fields(cls) if f.name == key]
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return type(value[0]) if isinstance(value, tuple) else type(value)


def _outside(path: str) -> list[str]:
    """The nearest values just outside the range of ``path``, as override strings."""
    r = C._RANGES[path]
    is_int = _field_type(path) is int
    eps = 1 if is_int else 1e-3
    out = []
    if r.lo is not None:
        out.append(r.lo if r.lo_open else r.lo - eps)
    if r.hi is not None:
        out.append(r.hi if r.hi_open else r.hi + eps)
    tuple_field = isinstance(
        getattr(getattr(C.Config(), path.split(".")[0]), path.split(".")[1]), tuple
    )
    fmt = (lambda v: f"{int(v) if is_int else float(v)}") if not tuple_field else None
    if tuple_field:  # one bad element among good defaults is enough
        default = getattr(getattr(C.Config(), path.split(".")[0]), path.split(".")[1])
        return [f"{path}={[v, *default[1:]]}" for v in out]
    assert fmt is not None
    return [f"{path}={fmt(v)}" for v in out]


RANGE_CASES = [case for path in C._RANGES for case in _outside(path)]


def test_every_range_is_exercised():
    assert len(RANGE_CASES) >= len(C._RANGES)


@pytest.mark.parametrize("override", RANGE_CASES)
def test_a_value_just_outside_its_range_is_rejected(override):
    path = override.split("=")[0]
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        load_config("digits_suponly_1_16", [override])


def test_a_non_finite_loss_stops_the_run_before_it_is_checkpointed(tmp_path, monkeypatch):
    cfg = load_config(
        "digits_suponly_1_16",
        [
            f"data.root={tmp_path / 'digits'}",
            "data.digits_train=16",
            "data.digits_val=8",
            "model.width=8",
            "model.decoder_channels=16",
            "model.rep_dim=8",
            "train.batch_size=4",
            "train.steps=4",
            "train.ckpt_every=1",
            "train.log_every=1",
            "train.threads=1",
            "optim.warmup_steps=1",
        ],
    )
    real = trainer_mod.suponly_step

    def step(model, batch, cfg, need_rep=True):
        loss, logs = real(model, batch, cfg, need_rep)
        if tr.step == 2:  # the third step's loss is NaN
            loss = loss * float("nan")
            logs = {"loss_sup": loss.detach()}
        return loss, logs

    monkeypatch.setattr(trainer_mod, "suponly_step", step)
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3"):
        tr.fit()
    # the checkpoint on disk is the last finite one (step 2), its weights finite
    state = torch.load(Path(tmp_path / "run" / CKPT_NAME), weights_only=False)
    assert state["step"] == 2
    assert all(math.isfinite(float(v.float().abs().sum())) for v in state["model"].values())


# The allowed ranges, spelled out (and reviewed) here: a bound is a decision (e.g. an EMA momentum of 1
# would freeze the teacher), and the range tests above read the bounds from the table itself,
# so an edited bound would move their probe with it. Change both on purpose.
DOCUMENTED_RANGES = {
    ">= 1": [
        "data.num_classes",
        "data.crop_size",
        "data.digits_size",
        "data.digits_train",
        "data.digits_val",
        "model.aspp_rates",
        "model.decoder_channels",
        "model.rep_dim",
        "model.width",
        "train.steps",
        "train.batch_size",
        "train.grad_accum",
        "train.log_every",
        "proto.sample_steps",
        "proto.sample_pixel_num",
        "proto.queue_len",
        "proto.back_per_class",
        "proto.num_high",
        "proto.kmeans_iters",
        "proto.kmeans_n_init",
        "proto.grid_num",
        "eval.crop_size",
        "eval.stride",
        "eval.batch_size",
    ],
    "> 0": [
        "data.scale_range",
        "data.std",
        "optim.lr",
        "optim.head_lr_mult",
        "proto.tau",
    ],
    ">= 0": [
        "data.num_workers",
        "data.digits_seed",
        "optim.weight_decay",
        "optim.poly_power",
        "optim.warmup_steps",
        "loss.ce_weight",
        "loss.ohem_weight",
        "train.seed",
        "train.eval_every",
        "train.ckpt_every",
        "train.threads",
        "semi.sup_only_steps",
        "semi.unlabeled_batch_size",
        "semi.unsup_weight",
        "semi.unimatch_weights",
        "proto.sample_start_step",
        "proto.back_len",
        "proto.min_rows",
        "proto.num_low",
        "proto.add_num",
        "proto.kmeans_subsample",
        "proto.recluster_every",
        "proto.loss_weight",
        "proto.unsup_sample_num",
        "proto.thr_delay_steps",
    ],
    "in [0, 1)": [
        "model.dropout",
        "optim.momentum",
        "optim.betas",
        "semi.ema_decay",
        "semi.fp_dropout",
        "proto.csp_momentum",
        "proto.ema_momentum",
    ],
    "in [0, 1]": [
        "loss.ohem_thresh",
        "semi.cutmix_p",
        "semi.conf_thresh",
        "proto.high_threshold",
        "proto.low_threshold",
        "proto.unlabeled_threshold",
        "proto.csp_min",
        "proto.csp_max",
        "proto.add_proportion",
        "proto.thr_start",
        "proto.thr_end",
    ],
    "in [0, 100]": [
        "semi.drop_percent",
    ],
}


def test_the_range_table_is_the_documented_one():
    got = {path: str(r) for path, r in C._RANGES.items()}
    assert got == {p: r for r, paths in DOCUMENTED_RANGES.items() for p in paths}
