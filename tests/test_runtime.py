"""Run-time choices that change how a step computes: autocast dtype, channels_last.

The autocast tests are marked ``precision``: ``make test`` runs them again with
``BRPG_NATIVE_BF16=1`` and ``=0``, so that every machine checks both what ``train.amp: auto``
does on a CPU with native bf16 and on one without (tests/README.md).

Machine: exact, same-machine, fp32-tolerance, bound, precision. The autocast tests are precision;
the parser of the CPU flags is exact. channels_last: a crashed and resumed run equals the straight
run bit for bit (same-machine), and its first loss matches NCHW's within rel 1e-5 (fp32-tolerance,
train.amp=off stated). That a SupOnly run moves the rep head's BN statistics is bound.
"""

import json
from pathlib import Path

import pytest
import torch

from brpg.config import list_presets, load_config
from brpg.engine import runtime
from brpg.engine.trainer import Trainer

CPU = torch.device("cpu")


@pytest.mark.precision
def test_amp_auto_on_cpu_follows_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    # without native bf16 oneDNN emulates it: a DigitScenes step was ~13x slower (P4)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.amp_dtype("auto", CPU) is None
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.amp_dtype("auto", CPU) is torch.bfloat16
    assert runtime.amp_dtype("off", CPU) is None
    assert runtime.amp_dtype("fp16", CPU) is None  # a CUDA preset's setting in a CPU smoke run
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.amp_dtype("bf16", CPU) is torch.bfloat16  # asked for explicitly
    assert runtime.amp_dtype("auto", torch.device("meta")) is None
    with pytest.raises(ValueError, match="train.amp='fp8'"):
        runtime.amp_dtype("fp8", CPU)
    assert runtime.dtype_name(None) == "fp32" and runtime.dtype_name(torch.bfloat16) == "bfloat16"


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import builtins

    real_open = builtins.open
    flags = {"value": "fpu avx2 fma"}

    def fake_open(path, *a, **k):
        if path == "/proc/cpuinfo":
            fake = tmp_path / "cpuinfo"
            fake.write_text(f"processor\t: 0\nflags\t\t: {flags['value']}\n")
            return real_open(fake, *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.delenv("BRPG_NATIVE_BF16", raising=False)  # make test sets it in one pass
    assert runtime.cpu_has_native_bf16() is False
    flags["value"] = "fpu avx512f avx512_bf16"
    assert runtime.cpu_has_native_bf16() is True
    flags["value"] = "fpu amx_tile amx_bf16"
    assert runtime.cpu_has_native_bf16() is True
    # the tests' switch overrides the flags both ways; anything else is an error naming it
    monkeypatch.setenv("BRPG_NATIVE_BF16", "0")
    assert runtime.cpu_has_native_bf16() is False
    flags["value"] = "fpu avx2 fma"
    monkeypatch.setenv("BRPG_NATIVE_BF16", "1")
    assert runtime.cpu_has_native_bf16() is True
    monkeypatch.setenv("BRPG_NATIVE_BF16", "yes")
    with pytest.raises(ValueError, match="BRPG_NATIVE_BF16='yes'"):
        runtime.cpu_has_native_bf16()
    monkeypatch.setenv("BRPG_NATIVE_BF16", "")  # empty: read the flags again
    assert runtime.cpu_has_native_bf16() is False


DIGITS_PRESETS = [p for p in list_presets() if p.startswith("digits_")]


@pytest.mark.precision
@pytest.mark.parametrize("native", ["0", "1"])
def test_every_digits_preset_runs_in_fp32_on_every_cpu(
    native: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DigitScenes number depends on the seed and the commit, not on the CPU (issue 25)."""
    monkeypatch.setenv("BRPG_NATIVE_BF16", native)
    assert len(DIGITS_PRESETS) >= 20  # SupOnly, MT, BRPG, ablations, other frameworks
    for preset in DIGITS_PRESETS:
        cfg = load_config(preset)
        assert cfg.train.amp == "off", preset
        assert runtime.dtype_name(runtime.amp_dtype(cfg.train.amp, CPU)) == "fp32", preset
    # bf16 stays one --set away, and `off` is what a user types (YAML reads it as False)
    assert load_config("digits_brpg_1_8", ["train.amp=bf16"]).train.amp == "bf16"
    assert load_config("digits_brpg_1_8", ["train.amp=auto"]).train.amp == "auto"
    assert load_config("voc_brpg_classic_1464", ["train.amp=off"]).train.amp == "off"


def _tiny(data_root: Path, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        f"data.root={data_root}",
        "data.digits_train=48",
        "data.digits_val=8",
        "model.width=8",
        "model.decoder_channels=16",
        "train.batch_size=4",
        f"train.steps={steps}",
        "train.ckpt_every=2",
        "train.log_every=1",
        "train.threads=1",
        "eval.batch_size=8",
        *extra,
    ]


@pytest.mark.precision
def test_channels_last_trains_resumes_exactly_and_matches_fp32_closely(tmp_path: Path) -> None:
    data = tmp_path / "digits"
    # fp32 stated, not inherited: the NCHW comparison below has an fp32 tolerance (in bf16 the
    # two layouts round differently, 2.26312 vs 2.26246 on an AMX CPU)
    cl = ("train.channels_last=true", "train.amp=off")
    cfg = load_config("digits_suponly_1_8", _tiny(data, 4, cl))
    straight = Trainer(cfg, tmp_path / "straight", progress=False)
    conv = straight.model.backbone.stem[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    summary = straight.fit()
    assert summary["amp_dtype"] == "fp32" and summary["dataset_version"] == 3
    # a crash before step 3 (checkpoint at step 2), a new trainer resumes: the same weights
    half = Trainer(cfg, tmp_path / "r", progress=False)
    original = half.train_step

    def crash_at_3(*args, **kwargs):
        if half.step == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    half.train_step = crash_at_3  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        half.fit()
    resumed = Trainer(cfg, tmp_path / "r", resume=True, progress=False)
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # NHWC only reorders memory: the same run in NCHW has the same first loss up to float
    # rounding (later steps drift apart: AdamW normalises even rounding-sized gradients)
    nchw_cfg = load_config("digits_suponly_1_8", _tiny(data, 4, ("train.amp=off",)))
    nchw = Trainer(nchw_cfg, tmp_path / "n")
    nchw.fit()
    first = [
        json.loads((tmp_path / d / "log.jsonl").read_text().splitlines()[0])["loss_sup"]
        for d in ("straight", "n")
    ]
    assert first[0] == pytest.approx(first[1], rel=1e-5)


def test_suponly_keeps_training_the_rep_head_statistics(tmp_path: Path) -> None:
    """A SupOnly run with a rep head (the book's warm model) must move the head's BN
    statistics: chapters 3-7 read its features after training."""
    cfg = load_config("digits_suponly_1_8", _tiny(tmp_path / "digits", 2, ("model.rep_head=true",)))
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    assert tr._warmup_rep
    tr.fit()
    mean = tr.model.state_dict()["decoder.rep_head.1.running_mean"]
    assert not torch.equal(mean, torch.zeros_like(mean))


@pytest.mark.precision
def test_amp_auto_trains_in_the_dtype_it_records(tmp_path: Path) -> None:
    """``train.amp=auto`` on this CPU (or the one BRPG_NATIVE_BF16 pretends it is): the summary
    records the dtype, and the step really runs in it. In bf16 the first loss differs from the
    fp32 run's by bf16 rounding (and not by more); in fp32 it is the same number. Two steps of a
    tiny model, so that the emulated-bf16 pass stays short."""
    data = tmp_path / "digits"
    native = runtime.cpu_has_native_bf16()
    first = {}
    for amp in ("auto", "off"):
        cfg = load_config("digits_suponly_1_8", _tiny(data, 2, (f"train.amp={amp}",)))
        summary = Trainer(cfg, tmp_path / amp, progress=False).fit()
        assert summary["amp_dtype"] == ("bfloat16" if native and amp == "auto" else "fp32")
        log = (tmp_path / amp / "log.jsonl").read_text().splitlines()
        first[amp] = json.loads(log[0])["loss_sup"]
    if native:
        assert first["auto"] != first["off"]  # autocast is on, not only recorded
        assert first["auto"] == pytest.approx(first["off"], rel=2e-2)
    else:
        assert first["auto"] == first["off"]
