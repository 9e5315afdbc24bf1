"""The package's training step, checked against the loop-based reference of
:mod:`brpg.book.reference_step` (book chapter 8; the tests run the same check).

For a tiny model and fixed inputs, ``Trainer.train_step`` runs one step at a chosen global
step; the reference recomputes every loss term on copies of the student and the teacher taken
before the step, and the state the step must leave: the teacher's EMA (decay counted from the
end of the warm-up), the CPG memories, the prototype bank. The random draws of the step (strong
augmentation, CutMix box) are recorded from the package and handed to the reference; the
model has no dropout, and the sampling budgets are large enough that every candidate row is
kept, so nothing else in the step is random.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import operator
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from brpg.book.reference_step import RefSettings, bank_after, reference_step, teacher_after
from brpg.config import Config, load_config
from brpg.engine.trainer import Trainer
from brpg.frameworks import mean_teacher as semi_mod
from brpg.timeline import phase_of

if TYPE_CHECKING:
    from IPython.display import Markdown

__all__ = [
    "CHECK_STEPS",
    "check_run",
    "check_step",
    "facts_table",
    "recording",
    "settings",
    "sharpen",
    "step_inputs",
    "tiny_overrides",
]

CHECK_STEPS = 12  # warm-up 0-2, semi 3, sampling 4-6, clustering before 7, proto 7-11
S, DS, DL = 3, 4, 3
HW = 16  # image side: 4 x 4 maps at stride 4
B = 2
NUM_CLASSES = 11


def tiny_overrides(data_root: Path, *extra: str) -> list[str]:
    """A DigitScenes BRPG config small enough to check by loops: 16-px images, 1 + 1 prototypes,
    budgets that keep every candidate row, thresholds that a random model crosses."""
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
        f"train.steps={CHECK_STEPS}",
        "train.threads=1",
        "train.amp=off",  # the loop reference computes in fp32: so must the package, on every CPU
        "train.tensorboard=never",
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


# RefSettings fields whose config field has another name; every other field is looked up by
# its own name in cfg.loss, cfg.semi and cfg.proto
_RENAMED = {
    "total_steps": "train.steps",
    "brpg": "train.brpg",
    "ema_cap": "semi.ema_decay",
    "sample_start": "proto.sample_start_step",
    "thr_delay": "proto.thr_delay_steps",
    "proto_momentum": "proto.ema_momentum",
}


def settings(cfg: Config) -> RefSettings:
    """The reference's settings, read from the package's config (an unknown field raises)."""
    values = {}
    for f in dataclasses.fields(RefSettings):
        path = _RENAMED.get(f.name) or next(
            (
                f"{sec}.{f.name}"
                for sec in ("loss", "semi", "proto")
                if hasattr(getattr(cfg, sec), f.name)
            ),
            None,
        )
        if path is None:
            raise AttributeError(f"RefSettings.{f.name} has no config field; add it to _RENAMED")
        values[f.name] = operator.attrgetter(path)(cfg)
    return RefSettings(**values)


def step_inputs(
    seed: int, model: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_l, y_l, x_u)``: a labeled batch whose labels agree with the model's prediction on
    the left half (so that CPG has correct pixels to route), random classes on the right, an
    ignored corner; and an unlabeled batch."""
    g = torch.Generator().manual_seed(seed)
    x_l = torch.randn(B, 3, HW, HW, generator=g)
    x_u = torch.randn(B, 3, HW, HW, generator=g)
    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        logits = probe(torch.cat([x_l, x_u]))["logits"][:B]
        pred = F.interpolate(logits, size=(HW, HW), mode="bilinear", align_corners=True)
    y = torch.randint(0, NUM_CLASSES, (B, HW, HW), generator=g)
    y[:, :, : HW // 2] = pred.argmax(1)[:, :, : HW // 2]
    y[:, :3, -3:] = 255
    return x_l, y, x_u


def sharpen(model: torch.nn.Module, factor: float) -> None:
    """Scale the classifier so that a random model has a spread of confidences."""
    last = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.out_channels == NUM_CLASSES
    ]
    with torch.no_grad():
        for m in last:
            m.weight.mul_(factor)


def _canon(rows: torch.Tensor) -> torch.Tensor:
    """Rows in a canonical order (the memory order within one push is random)."""
    if rows.numel() == 0:
        return rows
    key = rows @ torch.linspace(1.0, 2.0, rows.shape[1])
    return rows[torch.argsort(key)]


@contextlib.contextmanager
def recording(tr: Trainer) -> Iterator[dict[str, Any]]:
    """Record what the package draws in a step (strong view, CutMix box), the loss it
    backpropagates and the bank it uses; the trainer is restored on exit."""
    rec: dict[str, Any] = {}
    method = tr.method
    assert method is not None and method.plugin is not None, "a BRPG trainer is needed"
    plugin = method.plugin
    strong, orig_cutmix = method.strong, semi_mod.maybe_cutmix
    orig_scale, orig_before = tr.scaler.scale, method.before_step

    def strong_spy(x: torch.Tensor) -> torch.Tensor:
        rec["x_strong"] = out = strong(x)
        return out

    def cutmix_spy(x, maps, p=0.5, generator=None):  # type: ignore[no-untyped-def]
        rec.setdefault("x_strong", x)
        out = orig_cutmix(x, maps, p=p, generator=generator)
        rec["mask"] = out[2]
        return out

    def scale_spy(loss: torch.Tensor) -> torch.Tensor:
        rec["loss"] = loss.detach().clone()
        return orig_scale(loss)

    def before_spy(step: int, student: torch.nn.Module) -> dict[str, Any]:
        logs = orig_before(step, student)
        if plugin.bank is not None:  # the bank this step uses (after any clustering)
            rec["protos"] = plugin.bank.prototypes.detach().clone()
            rec["valid"] = plugin.bank.valid.clone()
        return logs

    if strong is not None:
        method.strong = strong_spy  # type: ignore[assignment]
    semi_mod.maybe_cutmix = cutmix_spy  # type: ignore[assignment]
    tr.scaler.scale = scale_spy  # type: ignore[method-assign]
    method.before_step = before_spy  # type: ignore[method-assign]
    try:
        yield rec
    finally:
        method.strong = strong  # type: ignore[assignment]
        semi_mod.maybe_cutmix = orig_cutmix  # type: ignore[assignment]
        tr.scaler.scale = orig_scale  # type: ignore[method-assign]
        method.before_step = orig_before  # type: ignore[method-assign]


def _memory_rows(tr: Trainer, kind: str) -> dict[int, torch.Tensor]:
    assert tr.method is not None and tr.method.plugin is not None
    mem = tr.method.plugin.memory
    if mem is None:
        return {}
    feats, valid = mem.get(kind, ordered=True)
    return {c: feats[c][valid[c]].clone() for c in range(feats.shape[0])}


def _close(got: float, want: float, rel: float, abs_tol: float, what: str) -> None:
    if not math.isclose(got, want, rel_tol=rel, abs_tol=abs_tol):
        raise AssertionError(f"{what}: package {got!r}, reference {want!r}")


def check_step(
    tr: Trainer,
    rec: dict[str, Any],
    step: int,
    x_l: torch.Tensor,
    y_l: torch.Tensor,
    x_u: torch.Tensor,
    atol: float = 1e-5,
) -> dict[str, Any]:
    """Run the package's step ``step`` and check it against the reference; raises
    ``AssertionError`` naming the first quantity that differs. Returns the step's facts: the
    reference's loss terms, the package's logged terms, the unlabeled L_pro samples and the
    rows pushed into the memories."""
    s = settings(tr.cfg)
    method = tr.method
    assert method is not None and method.teacher is not None and method.plugin is not None
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
    mem_high0, mem_low0 = _memory_rows(tr, "high"), _memory_rows(tr, "low")
    rec.clear()
    logs = tr.train_step({"image": x_l, "mask": y_l}, None if step < S else x_u)
    ref = reference_step(
        student0,
        teacher0,
        rec.get("protos"),
        rec.get("valid"),
        x_l,
        y_l,
        x_u,
        rec.get("x_strong"),
        rec.get("mask"),
        step,
        s,
    )
    # every loss term and the total that was backpropagated
    for key, value in ref.terms.items():
        if key in logs:
            _close(float(logs[key]), value, 1e-5, atol, f"step {step}: {key}")
    _close(float(rec["loss"]), float(ref.loss.detach()), 1e-5, atol, f"step {step}: total loss")
    # ... and its gradient
    ref.loss.backward()
    for (name, p_ref), p in zip(student0.named_parameters(), tr.model.parameters(), strict=True):
        g_ref = torch.zeros_like(p_ref) if p_ref.grad is None else p_ref.grad
        g = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=f"grad {name} @ {step}")
    # the teacher: own BN statistics in the warm-up, EMA from the end of the warm-up on
    got_t = method.teacher.module.state_dict()
    if step < s.sup_only_steps:
        want_t = teacher0.state_dict()
    else:
        names = {n for n, _ in teacher0.named_parameters()}
        want_t = teacher_after(
            teacher0.state_dict(), tr.model.state_dict(), names, step - s.sup_only_steps, s
        )
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
            for c, rows in _memory_rows(tr, kind).items():
                want = [before[c]] if c in before else []
                want += [torch.stack(new[c])] if c in new else []
                want_rows = torch.cat(want) if want else rows[:0]
                torch.testing.assert_close(
                    _canon(rows), _canon(want_rows), atol=1e-5, rtol=1e-5,
                    msg=f"{kind} memory of class {c} @ {step}",
                )  # fmt: skip
    # the prototype bank after its EMA
    if ref.ema_targets:
        want_p = bank_after(
            rec["protos"], rec["valid"], ref.ema_feats, ref.ema_targets, s.proto_momentum
        )
        torch.testing.assert_close(
            method.plugin.bank.prototypes, want_p, atol=1e-5, rtol=1e-5, msg=f"bank @ {step}"
        )
    return {
        "phase": phase_of(step, tr.cfg),
        "terms": ref.terms,
        "logged": {k: float(logs[k]) for k in ref.terms if k in logs},
        "n_u": ref.n_unlabeled_proto,
        "n_mem": sum(len(v) for v in ref.memory_high.values())
        + sum(len(v) for v in ref.memory_low.values()),
    }


def check_run(data_root: Path, run_dir: Path, *extra: str, seed: int = 0) -> list[dict[str, Any]]:
    """A :data:`CHECK_STEPS`-step run crossing every phase boundary, each step checked against
    the reference (:func:`check_step`); ``extra`` overrides go after :func:`tiny_overrides`."""
    cfg = load_config("digits_brpg_1_16", tiny_overrides(data_root, *extra))
    torch.manual_seed(seed)
    tr = Trainer(cfg, run_dir, progress=False)
    sharpen(tr.model, 20.0)
    facts = []
    with recording(tr) as rec:
        for step in range(CHECK_STEPS):
            x_l, y_l, x_u = step_inputs(100 + step, tr.model)
            facts.append(check_step(tr, rec, step, x_l, y_l, x_u))
    return facts


def facts_table(facts: list[dict[str, Any]]) -> Markdown:
    """The facts of :func:`check_run` as a Markdown table: per step, its phase, each loss term
    as "package / reference", the memory rows pushed and the unlabeled L_pro samples."""
    from IPython.display import Markdown

    def pair(f: dict[str, Any], key: str) -> str:
        if key not in f["terms"]:
            return ""
        return f"{f['logged'][key]:.5f} / {f['terms'][key]:.5f}"

    lines = [
        "| step | phase | L_s package / loops | L_u | L_pro | rows pushed | unlabeled L_pro samples |",
        "|---|---|---|---|---|---|---|",
    ]
    for step, f in enumerate(facts):
        cells = [step, f["phase"], pair(f, "loss_sup"), pair(f, "loss_unsup")]
        cells += [pair(f, "loss_proto"), f["n_mem"] or "", f["n_u"] or ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return Markdown("\n".join(lines))
