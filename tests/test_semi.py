"""Mean teacher + BRPG training: phases, exact resume in every phase, DDP-identical prototypes.

Machine: exact, same-machine, bound. The phase timeline, the config checks, the teacher's copy of
the student and weights loaded from a checkpoint are exact. A crash and resume in every phase, the
two gloo ranks' prototypes, and runs that skip the rep head against runs that always compute it are
compared bit for bit on the same machine at train.threads=1 (same-machine). That the tiny BRPG run
forms prototypes is bound.
"""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from ddp_helpers import run_torchrun

from brpg.config import ConfigError, load_config
from brpg.engine import trainer as trainer_mod
from brpg.engine.checkpoint import load_checkpoint
from brpg.engine.trainer import Trainer
from brpg.method import clustering as clustering_mod
from brpg.timeline import cluster_due, phase_of, sampling_active

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12  # warm-up 0-2, semi 3, sampling 4-6, clustering before 7, proto 7-11


def tiny(data_root: Path, method: str = "brpg", extra: tuple[str, ...] = ()) -> list[str]:
    return [
        f"data.root={data_root}",
        "data.digits_train=64",
        "data.digits_val=16",
        "model.width=8",
        "model.decoder_channels=16",
        "model.rep_dim=16",
        "model.rep_head=true",
        f"train.framework={'suponly' if method == 'suponly' else 'meanteacher'}",
        f"train.brpg={str(method == 'brpg').lower()}",
        "train.batch_size=4",
        f"train.steps={STEPS}",
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
        *extra,
    ]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits")


def test_phases_follow_the_timeline(data_root):
    cfg = load_config("digits_suponly_1_16", tiny(data_root))
    phases = [phase_of(s, cfg) for s in range(STEPS)]
    assert phases == ["warmup"] * 3 + ["semi"] + ["sampling"] * 3 + ["proto"] * 5
    assert [s for s in range(STEPS) if cluster_due(s, cfg)] == [7]
    assert [s for s in range(STEPS) if sampling_active(s, cfg)] == [4, 5, 6]
    re = load_config("digits_suponly_1_16", tiny(data_root, extra=("proto.recluster_every=2",)))
    assert [s for s in range(STEPS) if cluster_due(s, re)] == [7, 9, 11]
    assert all(sampling_active(s, re) for s in range(4, STEPS))
    mt = load_config("digits_suponly_1_16", tiny(data_root, "meanteacher"))
    assert {phase_of(s, mt) for s in range(3, STEPS)} == {"semi"}


def test_config_rejects_sampling_before_the_teacher(data_root):
    with pytest.raises(ConfigError, match="sample_start_step"):
        load_config("digits_suponly_1_16", tiny(data_root, extra=("proto.sample_start_step=1",)))
    with pytest.raises(ConfigError, match="kmeans_subsample"):
        load_config("digits_suponly_1_16", tiny(data_root, extra=("proto.kmeans_subsample=-1",)))
    with pytest.raises(ConfigError, match="train.framework='fixmatch' is not one of"):
        load_config("digits_suponly_1_16", tiny(data_root, extra=("train.framework=fixmatch",)))


class Crash(RuntimeError):
    pass


def _run(cfg, run_dir: Path, crash_at: int | None = None, resume: bool = False) -> Trainer:
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


def _state(tr: Trainer) -> dict[str, torch.Tensor]:
    out = {f"student.{k}": v for k, v in tr.model.state_dict().items()}
    m = tr.method
    out.update({f"teacher.{k}": v for k, v in m.teacher.module.state_dict().items()})
    if m.plugin is not None:
        out["bank.prototypes"], out["bank.valid"] = m.plugin.bank.prototypes, m.plugin.bank.valid
    return out


@pytest.fixture(scope="module")
def straight(data_root, tmp_path_factory):
    cfg = load_config("digits_suponly_1_16", tiny(data_root))
    run = tmp_path_factory.mktemp("straight")
    return _run(cfg, run), run


@pytest.mark.parametrize("crash_at", [2, 5, 7, 9])  # warm-up, sampling, at clustering, proto
def test_resume_is_exact_in_every_phase(data_root, tmp_path, straight, crash_at):
    ref, ref_dir = straight
    cfg = load_config("digits_suponly_1_16", tiny(data_root))
    run = tmp_path / "crashed"
    _run(cfg, run, crash_at=crash_at)
    ckpt = torch.load(run / "last.pt", weights_only=False)
    assert ckpt["step"] == crash_at
    in_window = 4 < crash_at <= 7  # the memories are checkpointed until they are clustered
    assert (ckpt["method"]["memory"] is not None) == in_window
    resumed = _run(cfg, run, resume=True)
    a, b = _state(ref), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after a crash before step {crash_at}"
    sa = json.loads((ref_dir / "summary.json").read_text())
    sb = json.loads((run / "summary.json").read_text())
    assert sa["val_miou"] == sb["val_miou"]

    def records(d: Path) -> list[dict]:
        out = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in out]

    assert records(run) == records(ref_dir)  # no record lost or duplicated by the resume


def test_brpg_run_logs_every_loss_and_clusters_once(straight):
    tr, run = straight
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "loss_sup" in r}
    assert "loss_unsup" not in by_step[3] and "loss_unsup" in by_step[4]
    assert "loss_proto" not in by_step[7] and "loss_proto" in by_step[8]
    events = [r for r in records if "prototypes_per_class" in r]
    assert len(events) == 1 and events[0]["step"] == 7
    assert tr.method.plugin.memory is None  # freed after the one-shot clustering
    assert tr.method.plugin.bank.valid.any()


def test_teacher_is_evaluated_and_starts_from_the_student(data_root, tmp_path, monkeypatch):
    cfg = load_config("digits_suponly_1_16", tiny(data_root, "meanteacher"))
    copies = []
    real = trainer_mod.SemiMethod.before_step

    def spy(self, step, student):
        out = real(self, step, student)
        if step == 3:  # teacher := student at the end of the warm-up (spec §1)
            for (name, p_t), p_s in zip(
                self.teacher.module.named_parameters(), student.parameters(), strict=True
            ):
                copies.append((name, torch.equal(p_t, p_s)))
        return out

    monkeypatch.setattr(trainer_mod.SemiMethod, "before_step", spy)
    tr = _run(cfg, tmp_path / "mt")
    assert copies and all(eq for _, eq in copies)
    assert tr.eval_model() is tr.method.teacher.module
    assert tr.method.plugin is None


def test_random_memory_ablation_and_csp_thresholds_run(data_root, tmp_path, monkeypatch):
    extra = ("proto.memory=random", "proto.threshold_type=csp", "proto.kmeans_subsample=16")
    cfg = load_config("digits_suponly_1_16", tiny(data_root, extra=extra))
    seen = []
    original = clustering_mod.batched_kmeans_full

    def spy(*a, **k):
        seen.append(k.get("subsample"))
        return original(*a, **k)

    monkeypatch.setattr(clustering_mod, "batched_kmeans_full", spy)
    tr = _run(cfg, tmp_path / "random")
    c, k, _ = tr.method.plugin.bank.shape
    assert k == cfg.proto.num_high + cfg.proto.num_low + cfg.proto.add_num
    assert tr.method.plugin.csp is not None
    assert seen == [16]  # the one-shot clustering, with the configured subsample


def test_two_process_gloo_ddp_keeps_identical_prototypes(data_root, tmp_path):
    script = tmp_path / "ddp_brpg.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, torch, torch.distributed as dist
            from brpg.config import load_config
            from brpg.engine.trainer import Trainer
            cfg = load_config("digits_suponly_1_16", {tiny(data_root, extra=("train.device=cpu",))!r})
            tr = Trainer(cfg, sys.argv[1], progress=False)
            tr.fit()
            torch.save(tr.method.plugin.bank.state_dict(), f"{{sys.argv[1]}}/bank{{dist.get_rank()}}.pt")
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
    b0 = torch.load(out / "bank0.pt", weights_only=False)
    b1 = torch.load(out / "bank1.pt", weights_only=False)
    assert b0["valid"].any()
    assert torch.equal(b0["prototypes"], b1["prototypes"]) and torch.equal(b0["valid"], b1["valid"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2


def test_load_weights_starts_student_and_teacher_from_a_checkpoint(data_root, tmp_path, straight):
    """Fine-tuning from another run: both nets start from its weights; misuse fails clearly."""
    src_tr, src_dir = straight
    cfg = load_config("digits_suponly_1_16", tiny(data_root, "meanteacher"))
    tr = Trainer(cfg, tmp_path / "ft", progress=False)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.load_weights(src_dir)  # a run directory: its last.pt
    loaded = load_checkpoint(src_dir / "last.pt")["model"]
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, loaded[k]), k
        assert torch.equal(tr.method.teacher.module.state_dict()[k], loaded[k]), k
    assert any(not torch.equal(before[k], loaded[k]) for k in before)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        tr.load_weights(tmp_path / "nowhere")
    other = load_config("digits_suponly_1_16", tiny(data_root, "meanteacher", ("model.width=4",)))
    with pytest.raises(ValueError, match="another model"):
        Trainer(other, tmp_path / "other", progress=False).load_weights(src_dir)
    tr.fit()
    with pytest.raises(Exception, match="already at step"):
        tr.load_weights(src_dir)


def _always_rep(monkeypatch) -> None:
    """Make every SegModel forward compute the representation head, as before issue 13."""
    from brpg.models.deeplabv3plus import SegModel

    original = SegModel.forward

    def forward(self, x, need_fp=False, fp_dropout=0.5, need_rep=True):
        return original(self, x, need_fp, fp_dropout, need_rep=True)

    monkeypatch.setattr(SegModel, "forward", forward)


def test_mean_teacher_skips_the_unread_rep_head_without_changing_anything_else(
    data_root, tmp_path, monkeypatch
):
    """The mean teacher alone never reads ``rep``: skipping its head (issue 13's speed-up) must
    leave every other weight, the teacher and the logs bit for bit as when it is computed."""
    # as in the DigitScenes presets: no train-mode teacher forward follows the student's
    quiet = ("semi.entropy_teacher=eval", "semi.teacher_bn_warmup=false")
    cfg = load_config("digits_suponly_1_16", tiny(data_root, "meanteacher", quiet))
    fast = _run(cfg, tmp_path / "fast")
    assert not fast._warmup_rep
    with monkeypatch.context() as m:
        _always_rep(m)
        slow = _run(cfg, tmp_path / "slow")
    rep = "decoder.rep_head."
    fast_s, slow_s = _state(fast), _state(slow)
    assert fast_s.keys() == slow_s.keys()
    for k in fast_s:
        if rep in k:
            continue
        assert torch.equal(fast_s[k], slow_s[k]), k
    # the skipped head really was skipped: its BN statistics never moved from their init
    bn_mean = fast.model.state_dict()[f"{rep}1.running_mean"]
    assert torch.equal(bn_mean, torch.zeros_like(bn_mean))
    assert not torch.equal(slow.model.state_dict()[f"{rep}1.running_mean"], bn_mean)
    logs = [(tmp_path / d / "log.jsonl").read_text().splitlines() for d in ("fast", "slow")]
    strip = [
        [{k: v for k, v in json.loads(ln).items() if k != "wall_s"} for ln in lg] for lg in logs
    ]
    assert strip[0] == strip[1]


def test_brpg_keeps_the_rep_head_in_the_warm_up(data_root, tmp_path, monkeypatch, straight):
    """BRPG's warm-up trains the rep head's BN statistics and weight decay that shape the
    features the memories sample later: its run must equal one that always computes rep."""
    tr, _ = straight
    assert tr._warmup_rep
    cfg = load_config("digits_suponly_1_16", tiny(data_root))
    with monkeypatch.context() as m:
        _always_rep(m)
        ref = _run(cfg, tmp_path / "ref")
    a, b = _state(tr), _state(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mean_teacher_keeps_the_rep_head_where_a_random_draw_follows(
    data_root, tmp_path, monkeypatch
):
    """With the official train-mode teacher forwards (entropy filter, BN warm-up) the rep
    head's dropout draws precede the teacher's: skipping it would change the run."""
    cfg = load_config("digits_suponly_1_16", tiny(data_root, "meanteacher"))
    assert cfg.semi.entropy_teacher == "train" and cfg.semi.teacher_bn_warmup
    fast = _run(cfg, tmp_path / "fast")
    with monkeypatch.context() as m:
        _always_rep(m)
        ref = _run(cfg, tmp_path / "ref")
    a, b = _state(fast), _state(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)
