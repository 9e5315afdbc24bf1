"""The package's training step against the loop-based reference of ``reference_step.py``.

For a tiny model and fixed inputs, ``Trainer.train_step`` runs one step at a chosen global
step; the reference recomputes every loss term on copies of the student and the teacher taken
before the step, and the state the step must leave: the teacher's EMA (decay counted from the
end of the warm-up), the CPG memories, the prototype bank. The random draws of the step (strong
augmentation, CutMix box) are recorded from the package and handed to the reference; the
model has no dropout, and the sampling budgets are large enough that every candidate row is
kept, so nothing else in the step is random.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from reference_step import (
    RefSettings,
    bank_after,
    drop_percent_at,
    ema_decay_at,
    entropy_filtered,
    proto_ce,
    proto_threshold_at,
    reference_step,
    supervised,
    teacher_after,
)

from brpg.config import Config, load_config
from brpg.engine.trainer import Trainer
from brpg.frameworks import mean_teacher as semi_mod
from brpg.frameworks.supervised import supervised_loss
from brpg.frameworks.u2pl_loss import unsup_loss
from brpg.method.prototype_ema import PrototypeBank
from brpg.method.prototype_loss import prototype_loss

STEPS = 12  # warm-up 0-2, semi 3, sampling 4-6, clustering before 7, proto 7-11
S, DS, DL = 3, 4, 3
HW = 16  # image side: 4 x 4 maps at stride 4
B = 2


def overrides(data_root: Path, *extra: str) -> list[str]:
    return [
        f"data.root={data_root}",
        "data.digits_train=16",
        "data.digits_val=8",
        "model.width=8",
        "model.decoder_channels=16",
        "model.rep_dim=8",
        "model.rep_head=true",
        "model.dropout=0.0",
        "train.framework=meanteacher",
        "train.brpg=true",
        f"train.batch_size={B}",
        f"train.steps={STEPS}",
        "train.threads=1",
        "optim.warmup_steps=2",
        f"semi.sup_only_steps={S}",
        "semi.unlabeled_batch_size=2",
        "semi.cutmix_p=1.0",
        f"proto.sample_start_step={DS}",
        f"proto.sample_steps={DL}",
        "proto.sample_pixel_num=1000",  # every routed row is pushed
        "proto.queue_len=512",
        "proto.grid_num=5",
        f"proto.unsup_sample_num={HW * HW}",  # every confident pixel is sampled
        "proto.num_high=1",
        "proto.num_low=1",
        "proto.apo=false",
        "proto.kmeans_iters=3",
        "proto.kmeans_n_init=1",
        "proto.high_threshold=0.5",
        "proto.unlabeled_threshold=0.3",
        "proto.thr_start=0.05",
        "proto.thr_end=0.25",
        "proto.thr_delay_steps=2",
        "proto.ema_momentum=0.9",
        "loss.ohem_min_kept=100",
        *extra,
    ]


def settings(cfg: Config) -> RefSettings:
    s, p, lo = cfg.semi, cfg.proto, cfg.loss
    return RefSettings(
        total_steps=cfg.train.steps,
        sup_only_steps=s.sup_only_steps,
        ce_weight=lo.ce_weight,
        ohem_weight=lo.ohem_weight,
        ohem_thresh=lo.ohem_thresh,
        ohem_min_kept=lo.ohem_min_kept,
        unsup_weight=s.unsup_weight,
        drop_percent=s.drop_percent,
        faithful_unsup_scale=s.faithful_unsup_scale,
        entropy_teacher=s.entropy_teacher,
        ema_cap=s.ema_decay,
        ema_buffers=s.ema_buffers,
        copy_buffers=s.copy_buffers,
        teacher_bn_warmup=s.teacher_bn_warmup,
        brpg=cfg.train.brpg,
        sample_start=p.sample_start_step,
        sample_steps=p.sample_steps,
        high_threshold=p.high_threshold,
        low_threshold=p.low_threshold,
        unlabeled_threshold=p.unlabeled_threshold,
        grid_num=p.grid_num,
        tau=p.tau,
        loss_weight=p.loss_weight,
        faithful_loss_scale=p.faithful_loss_scale,
        thr_start=p.thr_start,
        thr_end=p.thr_end,
        thr_delay=p.thr_delay_steps,
        thr_clamp_low=p.thr_clamp_low,
        proto_momentum=p.ema_momentum,
    )


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits")


def inputs(seed: int, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A labeled batch whose labels agree with the model's prediction on the left half (so that
    CPG has correct pixels to route), random classes on the right, an ignored corner."""
    g = torch.Generator().manual_seed(seed)
    x_l = torch.randn(B, 3, HW, HW, generator=g)
    x_u = torch.randn(B, 3, HW, HW, generator=g)
    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        logits = probe(torch.cat([x_l, x_u]))["logits"][:B]
        pred = F.interpolate(logits, size=(HW, HW), mode="bilinear", align_corners=True)
    y = torch.randint(0, 11, (B, HW, HW), generator=g)
    y[:, :, : HW // 2] = pred.argmax(1)[:, :, : HW // 2]
    y[:, :3, -3:] = 255
    return x_l, y, x_u


def sharpen(model: torch.nn.Module, factor: float) -> None:
    """Scale the classifier so that a random model has a spread of confidences."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 11]
    with torch.no_grad():
        for m in last:
            m.weight.mul_(factor)


def canon(rows: torch.Tensor) -> torch.Tensor:
    """Rows in a canonical order (the memory order within one push is random)."""
    if rows.numel() == 0:
        return rows
    key = rows @ torch.linspace(1.0, 2.0, rows.shape[1])
    return rows[torch.argsort(key)]


class Recorder:
    """Records what the package drew in a step and the loss it backpropagated."""

    def __init__(self, tr: Trainer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rec: dict[str, Any] = {}
        method = tr.method
        assert method is not None
        strong = method.strong
        if strong is not None:

            def strong_spy(x: torch.Tensor) -> torch.Tensor:
                self.rec["x_strong"] = out = strong(x)
                return out

            method.strong = strong_spy  # type: ignore[assignment]
        orig_cutmix = semi_mod.maybe_cutmix

        def cutmix_spy(x, maps, p=0.5, generator=None):
            self.rec.setdefault("x_strong", x)
            out = orig_cutmix(x, maps, p=p, generator=generator)
            self.rec["mask"] = out[2]
            return out

        monkeypatch.setattr(semi_mod, "maybe_cutmix", cutmix_spy)
        orig_scale = tr.scaler.scale

        def scale_spy(loss):
            self.rec["loss"] = loss.detach().clone()
            return orig_scale(loss)

        tr.scaler.scale = scale_spy  # type: ignore[method-assign]
        orig_before = method.before_step

        def before_spy(step, student):
            logs = orig_before(step, student)
            if method.plugin.bank is not None:  # the bank this step uses (after any clustering)
                self.rec["protos"] = method.plugin.bank.prototypes.detach().clone()
                self.rec["valid"] = method.plugin.bank.valid.clone()
            return logs

        method.before_step = before_spy  # type: ignore[method-assign]


def memory_rows(tr: Trainer, kind: str) -> dict[int, torch.Tensor]:
    mem = tr.method.plugin.memory
    if mem is None:
        return {}
    feats, valid = mem.get(kind, ordered=True)
    return {c: feats[c][valid[c]].clone() for c in range(feats.shape[0])}


def check_step(
    tr: Trainer, rec: Recorder, step: int, x_l, y_l, x_u, atol: float = 1e-5
) -> dict[str, Any]:
    """Run the package's step ``step`` and check it against the reference; returns facts."""
    s = settings(tr.cfg)
    method = tr.method
    tr.step = step
    student0 = copy.deepcopy(tr.model)
    teacher0 = copy.deepcopy(method.teacher.module)
    if step == s.sup_only_steps:  # teacher := student at the first semi-supervised step
        with torch.no_grad():
            for pt, ps in zip(teacher0.parameters(), student0.parameters(), strict=True):
                pt.copy_(ps)
            if s.copy_buffers:
                for bt, bs in zip(teacher0.buffers(), student0.buffers(), strict=True):
                    bt.copy_(bs)
    mem_high0, mem_low0 = memory_rows(tr, "high"), memory_rows(tr, "low")
    rec.rec.clear()
    logs = tr.train_step({"image": x_l, "mask": y_l}, None if step < S else x_u)
    r = rec.rec
    ref = reference_step(
        student0,
        teacher0,
        r.get("protos"),
        r.get("valid"),
        x_l,
        y_l,
        x_u,
        r.get("x_strong"),
        r.get("mask"),
        step,
        s,
    )
    # every loss term and the total that was backpropagated
    for key, value in ref.terms.items():
        if key in logs:
            assert float(logs[key]) == pytest.approx(value, rel=1e-5, abs=atol), (step, key)
    assert float(r["loss"]) == pytest.approx(float(ref.loss.detach()), rel=1e-5, abs=atol), step
    # ... and its gradient
    ref.loss.backward()
    for (name, p_ref), p in zip(student0.named_parameters(), tr.model.parameters(), strict=True):
        g_ref = torch.zeros_like(p_ref) if p_ref.grad is None else p_ref.grad
        g = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=f"grad {name} @ {step}")
    # the teacher: own BN statistics in the warm-up, EMA from the end of the warm-up on
    got_t = method.teacher.module.state_dict()
    if step < S:
        want_t = teacher0.state_dict()
    else:
        names = {n for n, _ in teacher0.named_parameters()}
        want_t = teacher_after(teacher0.state_dict(), tr.model.state_dict(), names, step - S, s)
    for name, want in want_t.items():
        torch.testing.assert_close(
            got_t[name].float(), want.float(), rtol=1e-5, atol=1e-6, msg=f"teacher {name} @ {step}"
        )
    # the memories: the rows of this step appended to each class
    if ref.memory_high or ref.memory_low:
        for kind, before, new in (
            ("high", mem_high0, ref.memory_high),
            ("low", mem_low0, ref.memory_low),
        ):
            after = memory_rows(tr, kind)
            for c, rows in after.items():
                want = [before[c]] if c in before else []
                want += [torch.stack(new[c])] if c in new else []
                want_rows = torch.cat(want) if want else rows[:0]
                torch.testing.assert_close(canon(rows), canon(want_rows), atol=1e-5, rtol=1e-5)
    # the prototype bank after its EMA
    if ref.ema_targets:
        want_p = bank_after(
            r["protos"], r["valid"], ref.ema_feats, ref.ema_targets, s.proto_momentum
        )
        torch.testing.assert_close(method.plugin.bank.prototypes, want_p, atol=1e-5, rtol=1e-5)
    return {
        "terms": ref.terms,
        "n_u": ref.n_unlabeled_proto,
        "n_mem": sum(len(v) for v in ref.memory_high.values())
        + sum(len(v) for v in ref.memory_low.values()),
    }


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
    cfg = load_config("digits_brpg_1_16", overrides(data_root, *extra))
    torch.manual_seed(0)
    tr = Trainer(cfg, tmp_path_factory.mktemp("ref"), progress=False)
    sharpen(tr.model, 20.0)
    mp = pytest.MonkeyPatch()
    rec = Recorder(tr, mp)
    facts = []
    try:
        for step in range(STEPS):
            x_l, y_l, x_u = inputs(100 + step, tr.model)
            facts.append(check_step(tr, rec, step, x_l, y_l, x_u))
    finally:
        mp.undo()
    return facts


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
    assert float(ref) == pytest.approx(ln2 * 4 / 3, rel=1e-5)
    assert float(unsup_loss(stud, pseudo, t, 80.0)) == pytest.approx(ln2 * 4 / 3, rel=1e-5)
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


def test_faithful_loss_scale_and_loss_weight_reach_the_backpropagated_loss(
    data_root, tmp_path, monkeypatch
):
    """One proto step with λ_pro = 2 and the official 1/4: the total loss and its gradient."""
    cfg = load_config(
        "digits_brpg_1_16",
        overrides(data_root, "proto.loss_weight=2.0", "proto.faithful_loss_scale=true"),
    )
    torch.manual_seed(0)
    tr = Trainer(cfg, tmp_path, progress=False)
    sharpen(tr.model, 20.0)
    rec = Recorder(tr, monkeypatch)
    for step in range(DS + DL + 1):  # through the sampling window and one proto step
        x_l, y_l, x_u = inputs(200 + step, tr.model)
        facts = check_step(tr, rec, step, x_l, y_l, x_u)
    assert facts["terms"]["pro_u"] > 0
