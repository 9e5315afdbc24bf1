"""UniMatch-style framework: the FP forward, the step's losses, config checks, exact resume, DDP.

Machine: exact, same-machine, fp32-tolerance, bound. Config checks, the wiring and the views fed to
the model are exact. need_fp=False against the decoder written out by hand, resume, and the two
gloo ranks are compared bit for bit (same-machine). The loss formulas of the logged parts (rtol
1e-6), confident_ce by hand (rel 1e-6), the teacher's confidence and the clean half of the FP
forward (1e-5) are fp32-tolerance. Non-zero losses in the tiny runs and an FP half that differs by
more than 1e-3 are bound.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ddp_helpers import run_torchrun
from test_semi import _run, tiny

from brpg.config import ConfigError, ModelConfig, load_config
from brpg.engine import trainer as trainer_mod
from brpg.engine.trainer import Trainer
from brpg.frameworks import unimatch as unimatch_mod
from brpg.frameworks.semi_method import SemiMethod
from brpg.frameworks.unimatch import confident_ce, unimatch_step
from brpg.models import build_model
from brpg.models.deeplabv3plus import _upsample

# UniMatch on the tiny runs of test_semi (warm-up 0-2, semi 3, sampling 4-6, clustering before 7,
# proto 7-11); low thresholds so that an untrained model has confident pixels and memory rows
UM = (
    "train.framework=unimatch",
    "semi.eval_model=student",
    "semi.conf_thresh=0.1",
    "proto.unlabeled_threshold=0.1",
    "proto.thr_start=0.1",
    "proto.thr_end=0.3",
)
UM_EMA = (*UM, "semi.unimatch_teacher=ema", "semi.ema_buffers=true", "semi.eval_model=teacher")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits")


# --------------------------------------------------------------------------- need_fp
def _tiny_model() -> torch.nn.Module:
    cfg = ModelConfig(width=8, decoder_channels=16, rep_dim=16, aspp_rates=(1, 2, 3))
    return build_model(cfg, num_classes=11)


def test_need_fp_shapes_and_the_perturbed_half():
    torch.manual_seed(0)
    model = _tiny_model().train()
    x_b3hw = torch.randn(3, 3, 32, 32)
    out = model(x_b3hw, need_fp=True, fp_dropout=0.5)
    assert set(out) == {"logits", "logits_fp", "rep"}
    assert out["logits"].shape == out["logits_fp"].shape == (3, 11, 8, 8)
    assert out["rep"].shape == (3, 16, 8, 8)
    assert (out["logits"] - out["logits_fp"]).abs().max() > 1e-3  # the dropped features differ
    (out["logits"].sum() + out["logits_fp"].sum() + out["rep"].sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_need_fp_false_is_the_plain_forward():
    """``need_fp=False`` is the decoder of spec §2.3 written out by hand, bit for bit; in eval
    mode (BN on running statistics, no decoder dropout) the clean half of ``need_fp`` agrees."""
    torch.manual_seed(1)
    model = _tiny_model().eval()
    x_b3hw = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x_b3hw)
        low, high = model.backbone(x_b3hw)
        dec = model.decoder
        context = dec.head(dec.aspp(high))
        fused = torch.cat([dec.low_conv(low), _upsample(context, low.shape[-2:])], dim=1)
        assert set(out) == {"logits", "rep"}
        assert torch.equal(out["logits"], dec.classifier(fused))
        assert torch.equal(out["rep"], dec.rep_head(fused))
        fp = model(x_b3hw, need_fp=True)
    torch.testing.assert_close(fp["logits"], out["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fp["rep"], out["rep"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fp["logits_fp"], out["logits"], atol=1e-3)


# --------------------------------------------------------------------------- the step
def _step_setup(data_root: Path, *extra: str):
    """A tiny model, its SemiMethod and a random labeled / unlabeled batch (no data set)."""
    sets = tiny(data_root, "semi", (*UM, "semi.sup_only_steps=0", *extra))
    cfg = load_config("digits_suponly_1_16", sets)
    torch.manual_seed(2)
    model = build_model(cfg.model, cfg.data.num_classes).train()
    method = SemiMethod(cfg, model, torch.device("cpu"))
    batch = {"image": torch.randn(4, 3, 32, 32), "mask": torch.randint(0, 11, (4, 32, 32))}
    batch["mask"][0, :4] = 255  # some ignored labels
    return cfg, model, method, batch, torch.randn(3, 3, 32, 32)


def test_total_is_the_weighted_formula_of_the_logged_parts(data_root):
    w = (0.7, 0.3, 0.2, 0.9)
    cfg, model, method, batch, x_u = _step_setup(
        data_root, "semi.conf_thresh=0.0", f"semi.unimatch_weights={list(w)}"
    )
    assert method.teacher is None and method.plugin is None  # the model is its own teacher
    loss, logs, ema_rows = unimatch_step(model, method, batch, x_u, step=1)
    assert ema_rows is None
    assert set(logs) == {"loss_sup", "loss_s1", "loss_s2", "loss_fp", "pseudo_conf", "pseudo_ratio"}
    parts = [logs[k] for k in ("loss_sup", "loss_s1", "loss_s2", "loss_fp")]
    assert all(p > 0 for p in parts) and logs["pseudo_ratio"] == 1.0
    want = (w[0] * parts[0] + w[1] * parts[1] + w[2] * parts[2] + w[3] * parts[3]) / 2.0
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=0.0)
    loss.backward()  # every parameter in the graph: DDP's contract
    assert all(p.grad is not None for p in model.parameters())


def test_no_confident_pixel_leaves_the_supervised_term_alone(data_root):
    cfg, model, method, batch, x_u = _step_setup(data_root)
    cfg.semi.conf_thresh = 1.01  # above any probability (a loaded config must lie in [0, 1])
    loss, logs, _ = unimatch_step(model, method, batch, x_u, step=1)
    for k in ("loss_s1", "loss_s2", "loss_fp", "pseudo_ratio"):
        assert logs[k] == 0.0, k
    torch.testing.assert_close(loss.detach(), 1.0 * logs["loss_sup"] / 2.0, rtol=1e-6, atol=0.0)


def test_confident_ce_divides_by_all_pixels():
    # 2 classes, 4 pixels. Logits (ln 3, 0): p = (3/4, 1/4). Pixel 0 (target 0, CE ln 4/3) and
    # pixel 1 (target 1, CE ln 4) are confident; pixel 2 sits at the threshold (kept: ≥); pixel 3
    # is below it. Sum ln(4/3) + ln 4 + ln(4/3), divided by all 4 pixels, not by the 3 kept.
    logits = torch.tensor([[[[math.log(3.0)] * 4], [[0.0] * 4]]])  # [1, 2, 1, 4]
    pseudo = torch.tensor([[[0, 1, 0, 1]]])
    conf = torch.tensor([[[0.9, 0.6, 0.5, 0.49]]])
    want = (2 * math.log(4 / 3) + math.log(4.0)) / 4
    assert float(confident_ce(logits, pseudo, conf, 0.5)) == pytest.approx(want, rel=1e-6)


class _Recorder:
    """Wraps StrongAug: records every input and output."""

    def __init__(self, aug) -> None:
        self.aug, self.calls = aug, []

    def __call__(self, x):
        y = self.aug(x)
        self.calls.append((x, y))
        return y


def test_two_strong_views_are_independent_draws(data_root, monkeypatch):
    cfg, model, method, batch, x_u = _step_setup(data_root, "semi.cutmix_p=1.0")
    method.strong = _Recorder(method.strong)
    masks, fed = [], []
    real_cutmix = unimatch_mod.maybe_cutmix

    def cutmix(x, maps, p):
        out = real_cutmix(x, maps, p=p)
        masks.append(out[2])
        return out

    def forward(x, **kw):  # the model's inputs: cat(labeled, weak), then cat(strong 1, strong 2)
        fed.append(x)
        return real_forward(x, **kw)

    real_forward = model.forward
    monkeypatch.setattr(unimatch_mod, "maybe_cutmix", cutmix)
    monkeypatch.setattr(model, "forward", forward)
    unimatch_step(model, method, batch, x_u, step=1)
    (in1, s1), (in2, s2) = method.strong.calls
    assert torch.equal(in1, x_u) and torch.equal(in2, x_u)  # both from the weak view
    assert not torch.allclose(s1, s2)  # different colour draws
    assert len(masks) == 2 and masks[0].any() and not torch.equal(masks[0], masks[1])
    assert len(fed) == 2 and torch.equal(fed[0], torch.cat([batch["image"], x_u]))
    assert fed[1].shape[0] == 2 * x_u.shape[0]


def test_ema_teacher_makes_the_pseudo_labels(data_root):
    sets = ("semi.unimatch_teacher=ema", "semi.ema_buffers=true")
    cfg, model, method, batch, x_u = _step_setup(data_root, *sets)
    assert method.teacher is not None
    with torch.no_grad():
        method.teacher.module.eval()
        logits_t = method.teacher(x_u)["logits"]
        conf = F.softmax(_upsample(logits_t, (32, 32)), dim=1).max(dim=1).values
    _, logs, _ = unimatch_step(model, method, batch, x_u, step=1)
    torch.testing.assert_close(logs["pseudo_conf"], conf.mean())


# --------------------------------------------------------------------------- config
def test_config_checks(data_root):
    base = "digits_suponly_1_16"
    with pytest.raises(ConfigError, match="train.brpg=true needs a semi-supervised framework"):
        load_config(base, tiny(data_root, "brpg", ("train.framework=suponly",)))
    with pytest.raises(ConfigError, match="train.framework='fixmatch' is not one of"):
        load_config(base, tiny(data_root, "semi", ("train.framework=fixmatch",)))
    with pytest.raises(ConfigError, match="semi.eval_model=student"):
        load_config(base, tiny(data_root, "semi", ("train.framework=unimatch",)))
    with pytest.raises(ConfigError, match="ema_buffers"):
        load_config(base, tiny(data_root, "brpg", (*UM, "semi.unimatch_teacher=ema")))
    with pytest.raises(ConfigError, match="fp_dropout"):
        load_config(base, tiny(data_root, "semi", (*UM, "semi.fp_dropout=1.0")))
    with pytest.raises(ConfigError, match="semi.unimatch_teacher"):
        load_config(base, tiny(data_root, "semi", (*UM, "semi.unimatch_teacher=mean")))
    cfg = load_config(base, tiny(data_root, "semi", UM))
    assert cfg.semi.unimatch_weights == (1.0, 0.25, 0.25, 0.5)
    assert load_config(base, tiny(data_root, "semi")).train.framework == "meanteacher"


# --------------------------------------------------------------------------- runs and resume
def _state(tr: Trainer) -> dict[str, torch.Tensor]:
    """Student, teacher (if any) and prototype bank (if any) tensors."""
    out = {f"student.{k}": v for k, v in tr.model.state_dict().items()}
    m = tr.method
    if m.teacher is not None:
        out.update({f"teacher.{k}": v for k, v in m.teacher.module.state_dict().items()})
    if m.plugin is not None:
        out["bank.prototypes"], out["bank.valid"] = m.plugin.bank.prototypes, m.plugin.bank.valid
    return out


def _records(d: Path) -> list[dict]:
    out = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in out]


VARIANTS = {"semi": ("semi", UM), "brpg": ("brpg", UM), "brpg_ema": ("brpg", UM_EMA)}


@pytest.fixture(scope="module")
def straight_runs(data_root, tmp_path_factory):
    """One straight run per variant, made when a test first asks for it."""
    runs: dict[str, tuple[Trainer, Path]] = {}

    def get(name: str) -> tuple[Trainer, Path]:
        if name not in runs:
            method, extra = VARIANTS[name]
            cfg = load_config("digits_suponly_1_16", tiny(data_root, method, extra))
            run = tmp_path_factory.mktemp(f"straight_{name}")
            runs[name] = (_run(cfg, run), run)
        return runs[name]

    return get


def test_unimatch_brpg_run_goes_through_every_phase(straight_runs):
    tr, run = straight_runs("brpg")
    by_step = {r["step"]: r for r in _records(run) if "loss_sup" in r}
    assert "loss_s1" not in by_step[3] and by_step[4]["loss_s1"] > 0 and by_step[4]["loss_fp"] > 0
    assert "loss_proto" not in by_step[7] and "loss_proto" in by_step[8]
    events = [r for r in _records(run) if "prototypes_per_class" in r]
    assert len(events) == 1 and events[0]["step"] == 7
    assert tr.method.teacher is None and tr.method.plugin.bank.valid.any()
    assert tr.eval_model() is tr.model  # the self-taught model is evaluated
    assert torch.load(run / "last.pt", weights_only=False)["method"]["teacher"] is None


@pytest.mark.parametrize(
    ("variant", "crash_at"),
    [
        ("semi", 2),  # warm-up
        ("semi", 5),
        ("brpg", 2),
        ("brpg", 5),  # sampling window
        ("brpg", 7),  # at the clustering
        ("brpg", 9),  # proto phase
        ("brpg_ema", 5),
    ],
)
def test_resume_is_exact(data_root, tmp_path, straight_runs, variant, crash_at):
    ref, ref_dir = straight_runs(variant)
    method, extra = VARIANTS[variant]
    cfg = load_config("digits_suponly_1_16", tiny(data_root, method, extra))
    run = tmp_path / "crashed"
    _run(cfg, run, crash_at=crash_at)
    assert torch.load(run / "last.pt", weights_only=False)["step"] == crash_at
    resumed = _run(cfg, run, resume=True)
    a, b = _state(ref), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after a crash before step {crash_at}"
    assert _records(run) == _records(ref_dir)


def test_two_process_gloo_ddp_unimatch_brpg(data_root, tmp_path):
    script = tmp_path / "ddp_unimatch.py"
    sets = tiny(data_root, "brpg", (*UM, "train.device=cpu"))
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, torch, torch.distributed as dist
            from brpg.config import load_config
            from brpg.engine.trainer import Trainer
            cfg = load_config("digits_suponly_1_16", {sets!r})
            tr = Trainer(cfg, sys.argv[1], progress=False)
            tr.fit()
            state = {{n: p.detach() for n, p in tr.model.module.named_parameters()}}
            state.update(tr.method.plugin.bank.state_dict())
            torch.save(state, f"{{sys.argv[1]}}/rank{{dist.get_rank()}}.pt")
            """
        )
    )
    out = tmp_path / "ddp"
    r = run_torchrun(
        [
            str(script),
            str(out),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s0 = torch.load(out / "rank0.pt", weights_only=False)
    s1 = torch.load(out / "rank1.pt", weights_only=False)
    assert s0["valid"].any()
    for k, v in s0.items():
        if torch.is_tensor(v):
            assert torch.equal(v, s1[k]), f"{k} differs between the ranks"
    by_step = {r["step"]: r for r in _records(out) if "loss_sup" in r}
    assert "loss_proto" in by_step[12]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


# ------------------------------------------- wiring found by mutation testing (issue 18)
@pytest.mark.filterwarnings("error")  # e.g. a softmax without its dim warns
def test_the_step_passes_its_config_values_on(data_root, monkeypatch):
    """Non-default settings reach the callees: a dropped argument would fall back to the
    callee's default, which the presets share, so no preset run could tell."""
    cfg, model, method, batch, x_u = _step_setup(data_root, "semi.fp_dropout=0.3")
    cfg.data.ignore_index = 254
    batch["mask"][batch["mask"] == 255] = 254
    seen = {}
    real_sup = unimatch_mod.supervised_loss

    def sup_spy(logits, target, loss_cfg, ignore_index=255):
        seen["ignore_index"] = ignore_index
        return real_sup(logits, target, loss_cfg, ignore_index)

    monkeypatch.setattr(unimatch_mod, "supervised_loss", sup_spy)

    def fp_spy(_m, _args, kwargs):
        seen.setdefault("fp_dropout", kwargs.get("fp_dropout"))  # the first (FP) forward

    model.register_forward_pre_hook(fp_spy, with_kwargs=True)
    unimatch_step(model, method, batch, x_u, step=1)
    assert seen == {"ignore_index": 254, "fp_dropout": 0.3}


def test_without_strong_augmentation_or_rep_head_the_views_are_the_weak_image(data_root):
    cfg, model, method, batch, x_u = _step_setup(
        data_root, "semi.strong_aug=false", "semi.cutmix_p=0.0", "model.rep_head=false"
    )
    assert method.strong is None
    inputs = []
    model.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    loss, _, _ = unimatch_step(model, method, batch, x_u, step=1)
    assert torch.isfinite(loss)
    assert torch.equal(inputs[1], torch.cat([x_u, x_u]))  # both "strong" views: no augmentation


def test_pseudo_ratio_counts_pixels_at_the_threshold(data_root):
    """A zeroed classifier gives every class probability exactly 1/C: at a threshold of 1/C
    every pixel is confident (conf ≥ thr, as the loss mask)."""
    cfg, model, method, batch, x_u = _step_setup(data_root)
    last = [m for m in model.decoder.classifier.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
    cfg.semi.conf_thresh = 1 / cfg.data.num_classes
    _, logs, _ = unimatch_step(model, method, batch, x_u, step=1)
    assert logs["pseudo_ratio"] == 1.0


def test_the_ema_variant_needs_its_teacher(data_root):
    cfg, model, method, batch, x_u = _step_setup(data_root, *UM_EMA[len(UM) :])
    method.teacher = None
    with pytest.raises(AssertionError, match="semi.unimatch_teacher=ema needs the EMA teacher"):
        unimatch_step(model, method, batch, x_u, step=1)


def test_a_proto_step_adds_the_prototype_loss(data_root, tmp_path, monkeypatch):
    """Through a run's proto phase: the returned loss is the UniMatch formula + L_pro."""
    extra = (*UM, "proto.loss_weight=1.0", "proto.faithful_loss_scale=false")
    cfg = load_config("digits_suponly_1_16", tiny(data_root, "brpg", extra))
    real, steps = unimatch_mod.unimatch_step, []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        steps.append(out)
        return out

    monkeypatch.setattr(trainer_mod, "unimatch_step", spy)  # the trainer's own reference
    _run(cfg, tmp_path)
    proto = [(loss, logs) for loss, logs, _ in steps if "loss_proto" in logs]
    assert proto, "the run reached no proto step"
    w_x, w_s1, w_s2, w_fp = cfg.semi.unimatch_weights
    for loss, logs in proto:
        base = (
            w_x * logs["loss_sup"]
            + w_s1 * logs["loss_s1"]
            + w_s2 * logs["loss_s2"]
            + w_fp * logs["loss_fp"]
        ) / 2.0
        assert logs["loss_proto"] > 0
        torch.testing.assert_close(loss.detach(), base + logs["loss_proto"], rtol=1e-6, atol=0.0)
