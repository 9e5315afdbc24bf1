"""The package's training step against the loop-based reference (``brpg.book.reference_step``)
through the harness of ``brpg.book.step_check`` (its docstring says what is compared), plus
hand-worked values for the smallest cases and a check that a wrong step is caught.

Precision: fp32 on every CPU. The loops compute in fp32 and the comparison has fp32 tolerances,
so ``tiny_overrides`` states ``train.amp=off``; the ``precision`` mark has ``make test`` run
this file again as if the CPU had native bf16 and as if it had not (tests/README.md).

Machine: exact, fp32-tolerance, precision. The package's step against the loop reference is
fp32-tolerance (losses rel 1e-5, gradients rtol 1e-4 / atol 1e-5, teacher and bank 1e-5;
hand-worked values rel 1e-6); the schedules and the wiring tests (which arguments and inputs reach
each loss) are exact; the whole module is marked precision.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from brpg.book.reference_step import (
    RefSettings,
    bank_after,
    drop_percent_at,
    ema_decay_at,
    entropy_filtered,
    proto_ce,
    proto_threshold_at,
    supervised,
)
from brpg.book.step_check import (
    CHECK_STEPS,
    check_run,
    check_step,
    recording,
    sharpen,
    step_inputs,
    tiny_overrides,
)
from brpg.config import load_config
from brpg.engine.trainer import Trainer
from brpg.frameworks import mean_teacher as mt_mod
from brpg.frameworks.mean_teacher import semi_step
from brpg.frameworks.supervised import supervised_loss
from brpg.frameworks.u2pl_loss import unsup_loss
from brpg.method.prototype_ema import PrototypeBank
from brpg.method.prototype_loss import prototype_loss

pytestmark = pytest.mark.precision

STEPS, S, DS, DL = CHECK_STEPS, 3, 4, 3


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits")


@pytest.fixture(scope="module", params=["train", "eval"])
def run(request, data_root, tmp_path_factory) -> list[dict[str, Any]]:
    """A short run crossing every phase boundary, checked step by step; both entropy teachers
    (``eval`` with the buffer EMA and buffer copy of the DigitScenes presets)."""
    extra: tuple[str, ...] = (
        "semi.entropy_teacher=train",
        "semi.ema_buffers=false",
        "semi.copy_buffers=false",
        "semi.teacher_bn_warmup=true",
    )
    if request.param == "eval":
        extra = ("semi.entropy_teacher=eval", "semi.ema_buffers=true", "semi.copy_buffers=true")
    return check_run(data_root, tmp_path_factory.mktemp("ref"), *extra)


def test_every_step_matches_the_reference(run):
    # the run is meaningful: every term is non-zero where its phase has it, the sampling window
    # pushed rows, and the unlabeled L_pro term has samples in every proto step
    for step, f in enumerate(run):
        assert f["terms"]["loss_sup"] > 0
        if step >= S:
            assert f["terms"]["loss_unsup"] > 0
        if DS <= step < DS + DL:
            assert f["n_mem"] > 0
        if step >= DS + DL:
            assert f["terms"]["pro_l"] > 0 and f["terms"]["pro_u"] > 0
            assert f["n_u"] > 0


def test_schedules_of_the_reference_by_hand():
    s = RefSettings(total_steps=12, sup_only_steps=3, drop_percent=80.0, thr_delay=2)
    assert ema_decay_at(0, 0.99) == 0.0
    assert ema_decay_at(1, 0.99) == 0.5
    assert ema_decay_at(3, 0.99) == 0.75
    assert ema_decay_at(500, 0.99) == 0.99
    assert drop_percent_at(0, s) == 80.0
    assert drop_percent_at(6, s) == pytest.approx(90.0)
    assert drop_percent_at(12, s) == 100.0
    assert proto_threshold_at(2, s) == pytest.approx(0.8)
    assert proto_threshold_at(12, s) == pytest.approx(0.95)
    assert proto_threshold_at(7, s) == pytest.approx(0.875)
    assert proto_threshold_at(0, s) == pytest.approx(0.77)  # below the start before the delay


def test_smallest_case_by_hand():
    """Two-class, four-pixel numbers checked by hand, for the reference and the package."""
    ln2 = math.log(2.0)
    # L_s: logits (0, 0) at one pixel, (ln 3, 0) at another for class 0 → p = 1/2 and 3/4;
    # a third pixel ignored. CE = ln 2 and ln(4/3); OHEM off (min_kept 0) = plain CE.
    logits = torch.tensor([[[[0.0, math.log(3.0), 5.0]], [[0.0, 0.0, 0.0]]]])  # [1, 2, 1, 3]
    labels = torch.tensor([[[0, 0, 255]]])
    s = RefSettings(total_steps=10, sup_only_steps=0, ce_weight=1.0, ohem_weight=0.0)
    want = (ln2 + math.log(4 / 3)) / 2
    assert float(supervised(logits, labels, s)) == pytest.approx(want, rel=1e-6)
    cfg = load_config("digits_suponly_1_16", ["loss.ce_weight=1.0", "loss.ohem_weight=0.0"])
    assert float(supervised_loss(logits, labels, cfg.loss)) == pytest.approx(want, rel=1e-6)
    # OHEM with min_kept 1, thresh 0.6: cut = max(1/2, 0.6) keeps only the p = 1/2 pixel
    s_ohem = RefSettings(
        total_steps=10, sup_only_steps=0, ce_weight=0.0, ohem_weight=1.0, ohem_min_kept=1,
        ohem_thresh=0.6,
    )  # fmt: skip
    assert float(supervised(logits, labels, s_ohem)) == pytest.approx(ln2, rel=1e-6)
    # L_u: teacher logit gaps 10, 5, 2, 0 → entropies ≈ 0.0005, 0.040, 0.362, ln 2 = 0.693;
    # the 80th percentile (numpy's linear rule: position 2.4) is 0.362 + 0.4·0.331 ≈ 0.49,
    # so three pixels are kept and the uniform one dropped. Student logits 0 → CE = ln 2 each;
    # faithful factor 4 / 3.
    t = torch.tensor([[[[10.0, 5.0, 2.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]]])
    stud = torch.zeros(1, 2, 1, 4, requires_grad=True)
    pseudo = torch.tensor([[[0, 0, 0, 0]]])
    ref, kept = entropy_filtered(stud, pseudo, t, 80.0, faithful=True)
    assert kept == 3
    assert float(ref.detach()) == pytest.approx(ln2 * 4 / 3, rel=1e-5)
    assert float(unsup_loss(stud, pseudo, t, 80.0).detach()) == pytest.approx(ln2 * 4 / 3, rel=1e-5)
    # L_pro: prototypes e0 (class 0), e1 (class 1), τ = 1; f = e0 → logits (1, 0):
    # CE = ln(1 + e^-1) for target 0, 1 + ln(1 + e^-1) for target 1; 255 ignored
    protos = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    valid = torch.ones(2, 1, dtype=torch.bool)
    f = torch.tensor([[2.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    tg = torch.tensor([0, 1, 255])
    want_pro = (math.log1p(math.exp(-1)) + 1 + math.log1p(math.exp(-1))) / 2
    ref_pro, n = proto_ce(list(f), tg.tolist(), protos, valid, 1.0)
    assert n == 2 and float(ref_pro) == pytest.approx(want_pro, rel=1e-6)
    bank = PrototypeBank(2, 2, 1, momentum=0.5)
    bank.set_prototypes(protos, valid)
    assert float(prototype_loss(bank, f, tg, 1.0)) == pytest.approx(want_pro, rel=1e-6)
    # prototype EMA, α = 1/2: class 0 gets mean (2, 0) → (1.5, 0); class 1 gets (3, 0) →
    # (1.5, 0.5); the 255 row moves nothing
    want_bank = torch.tensor([[[1.5, 0.0]], [[1.5, 0.5]]])
    torch.testing.assert_close(bank_after(protos, valid, list(f), tg.tolist(), 0.5), want_bank)
    bank.ema_update(f, tg)
    torch.testing.assert_close(bank.prototypes, want_bank)


def _tiny_trainer(data_root: Path, run_dir: Path, *extra: str) -> Trainer:
    """The tiny BRPG trainer of :func:`tiny_overrides`, ``extra`` overrides last."""
    cfg = load_config("digits_brpg_1_16", tiny_overrides(data_root, *extra))
    torch.manual_seed(0)
    return Trainer(cfg, run_dir, progress=False)


def test_faithful_loss_scale_and_loss_weight_reach_the_backpropagated_loss(data_root, tmp_path):
    """One proto step with λ_pro = 2 and the official 1/4: the total loss and its gradient."""
    tr = _tiny_trainer(
        data_root, tmp_path, "proto.loss_weight=2.0", "proto.faithful_loss_scale=true"
    )
    sharpen(tr.model, 20.0)
    with recording(tr) as rec:
        for step in range(DS + DL + 1):  # through the sampling window and one proto step
            x_l, y_l, x_u = step_inputs(200 + step, tr.model)
            facts = check_step(tr, rec, step, x_l, y_l, x_u)
    assert facts["terms"]["pro_u"] > 0


def test_a_wrong_step_is_caught(data_root, tmp_path, monkeypatch):
    """The check is not vacuous: a package step whose L_pro skips its unlabeled term fails it."""
    from brpg.method import plugin as plugin_mod

    real = plugin_mod.prototype_loss
    calls = {"n": 0}

    def labeled_only(bank, feats, targets, tau):  # the unlabeled term is the second call
        calls["n"] += 1
        out = real(bank, feats, targets, tau)
        return out * 0.0 if calls["n"] % 2 == 0 else out

    monkeypatch.setattr(plugin_mod, "prototype_loss", labeled_only)
    with pytest.raises(AssertionError, match="step 7"):
        check_run(data_root, tmp_path)


# ------------------------------------- wiring of the step, found by mutation testing (issue 18)
def _mt_trainer(data_root: Path, run_dir: Path, *extra: str) -> Trainer:
    """A tiny mean-teacher trainer (no BRPG) whose step is called directly at step S."""
    return _tiny_trainer(data_root, run_dir, "train.brpg=false", *extra)


def _one_step(tr: Trainer, seed: int = 300):
    x_l, y_l, x_u = step_inputs(seed, tr.model)
    y_l[y_l == 255] = tr.cfg.data.ignore_index  # the ignored corner, in the config's value
    assert tr.method is not None
    tr.method.before_step(S, tr.model)  # the teacher takes the student's weights
    return semi_step(tr.model, tr.method, {"image": x_l, "mask": y_l}, x_u, S), x_l, x_u


def test_the_step_passes_its_config_values_to_every_loss(data_root, tmp_path, monkeypatch):
    """Non-default settings reach the callee (a dropped argument would silently use the
    callee's default, which equals the presets' value, so no preset run could tell)."""
    seen: dict[str, inspect.BoundArguments] = {}

    def spy(name: str) -> None:
        real = getattr(mt_mod, name)

        def wrapper(*args, **kwargs):
            bound = inspect.signature(real).bind(*args, **kwargs)
            bound.apply_defaults()
            seen[name] = bound
            return real(*args, **kwargs)

        monkeypatch.setattr(mt_mod, name, wrapper)

    for name in ("supervised_loss", "unsup_loss", "drop_percent_schedule", "maybe_cutmix"):
        spy(name)
    extra = ("semi.drop_percent=37", "semi.faithful_unsup_scale=false", "semi.cutmix_p=0.25")
    tr = _mt_trainer(data_root, tmp_path, *extra)
    tr.cfg.data.ignore_index = 254  # no preset uses another value; the step must still read it
    _one_step(tr)
    assert seen["supervised_loss"].arguments["ignore_index"] == 254
    unsup = seen["unsup_loss"].arguments
    assert unsup["ignore_index"] == 254 and unsup["faithful_scale"] is False
    assert seen["drop_percent_schedule"].args[2] == 37
    assert seen["maybe_cutmix"].arguments["p"] == 0.25


@pytest.mark.filterwarnings("error")  # e.g. a softmax without its dim warns
@pytest.mark.parametrize("strong_aug", [True, False])
def test_the_student_sees_the_strong_view_and_logs_the_step(
    data_root, tmp_path, monkeypatch, strong_aug
):
    tr = _mt_trainer(data_root, tmp_path, f"semi.strong_aug={str(strong_aug).lower()}")
    tr.cfg.semi.cutmix_p = 0.0  # no box: the unlabeled half is the strong view itself
    assert tr.method is not None and (tr.method.strong is not None) == strong_aug
    if strong_aug:
        monkeypatch.setattr(tr.method, "strong", lambda x: -x)  # a view we can recognise
    inputs = []
    tr.model.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    teacher_rep = []
    assert tr.method.teacher is not None
    tr.method.teacher.module.decoder.rep_head.register_forward_hook(
        lambda *_: teacher_rep.append(1)
    )
    (loss, logs, ema_rows), x_l, x_u = _one_step(tr)
    b = x_l.shape[0]
    assert torch.equal(
        inputs[-1][:b], x_l
    )  # the last forward is the step's (step_inputs probes a copy)
    assert torch.equal(inputs[-1][b:], -x_u if strong_aug else x_u)
    assert not teacher_rep  # the mean teacher alone never computes the teacher's rep head
    assert ema_rows is None and set(logs) == {"loss_sup", "loss_unsup", "pseudo_conf"}
    torch.testing.assert_close(loss.detach(), logs["loss_sup"] + logs["loss_unsup"])
    with torch.no_grad():  # the logged confidence is the eval teacher's on the weak view
        tr.method.teacher.eval()
        logits = tr.method.teacher(x_u)["logits"]
        logits = F.interpolate(logits, size=x_u.shape[-2:], mode="bilinear", align_corners=True)
    torch.testing.assert_close(logs["pseudo_conf"], logits.softmax(1).amax(1).mean())


def test_an_unread_rep_head_still_gets_a_zero_gradient(data_root, tmp_path):
    """With a train-mode teacher forward the mean teacher computes rep without reading it; it
    must stay in the graph (DDP requires every parameter to receive a gradient)."""
    tr = _mt_trainer(data_root, tmp_path, "semi.entropy_teacher=train")
    (loss, _, _), _, _ = _one_step(tr)
    loss.backward()
    rep = [p.grad for n, p in tr.model.named_parameters() if "rep_head" in n]
    assert rep and all(g is not None and not g.any() for g in rep)
    assert all(p.grad is not None for p in tr.model.parameters())


def test_the_step_needs_a_teacher(data_root, tmp_path):
    tr = _mt_trainer(data_root, tmp_path)
    assert tr.method is not None
    tr.method.teacher = None
    x_l, y_l, x_u = step_inputs(0, tr.model)
    with pytest.raises(AssertionError, match="the mean teacher needs its EMA teacher"):
        semi_step(tr.model, tr.method, {"image": x_l, "mask": y_l}, x_u, S)


def test_the_teacher_computes_its_rep_head_only_in_the_sampling_window(data_root, tmp_path):
    """Its rep feeds the unlabeled memory rows only: elsewhere the head is skipped (speed)."""
    quiet = ("semi.entropy_teacher=eval", "semi.teacher_bn_warmup=false")
    tr = _tiny_trainer(data_root, tmp_path, *quiet)
    assert tr.method is not None and tr.method.teacher is not None
    calls: list[int] = []
    tr.method.teacher.module.decoder.rep_head.register_forward_hook(
        lambda *_: calls.append(tr.step)
    )
    for step in range(CHECK_STEPS):
        tr.step = step
        x_l, y_l, x_u = step_inputs(400 + step, tr.model)
        tr.train_step({"image": x_l, "mask": y_l}, None if step < S else x_u)
    assert calls == list(range(DS, DS + DL))
