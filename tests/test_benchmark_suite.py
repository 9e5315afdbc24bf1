"""The performance benchmark suite (``benchmarks/``) on tiny shapes.

Checks the CLI, the JSON schema (P1, P2, P3), the P2 step variants, and that the
official-style prototype step computes the same loss, gradients and EMA'd prototypes as
``brpg.method``. No timing is asserted anywhere: timings depend on the machine and its
load.

Machine: exact, fp32-tolerance, bound. The report's schema, the CLI, the step variants' phases and
the padding of official-style prototypes are exact; the official-style prototype step against
brpg.method is fp32-tolerance (loss, gradients and prototypes within 1e-5); timings, memory peaks
and inertias are only checked to be positive and finite (bound). No timing is compared. One thread.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest tests` does not put the repo root on sys.path
    sys.path.insert(0, str(ROOT))

from benchmarks import p1_prototype_step as p1  # noqa: E402
from benchmarks import p2_training_step as p2  # noqa: E402
from benchmarks.common import (  # noqa: E402
    rss_high_water_bytes,
    time_interleaved,
    torch_alloc_peak_bytes,
)
from benchmarks.official_style import OfficialStylePrototypes  # noqa: E402
from benchmarks.run import main  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: one thread avoids OpenMP overhead on a loaded shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    assert main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _check_measurement(m: dict) -> None:
    assert set(m) >= {"unit", "median", "min", "max", "repeats", "samples"}
    assert m["repeats"] == len(m["samples"]) >= 1
    assert 0 < m["min"] <= m["median"] <= m["max"]
    assert all(math.isfinite(s) for s in m["samples"])


def test_report_schema(quick_report: dict) -> None:
    r = quick_report
    assert r["schema"] == "brpg-benchmarks/1"
    assert r["quick"] is True
    assert r["threads"] == 1
    assert r["torch"] == torch.__version__
    for key in ("host", "cpu", "cpu_count", "torch_threads", "torch", "device", "cpu_model"):
        assert key in r["machine"]
    for key in ("loadavg_before", "loadavg_after"):
        assert r[key] is None or len(r[key]) == 3
    assert list(r["benchmarks"]) == ["p1", "p2", "p3", "p4"]


def test_p1_schema_and_agreement(quick_report: dict) -> None:
    res = quick_report["benchmarks"]["p1"]
    assert res["status"] == "ok"
    assert set(res["measurements"]) == {"ours", "official_style", "lower_bound"}
    for m in res["measurements"].values():
        assert m["unit"] == "ms"
        _check_measurement(m)
    mem = res["memory"]
    assert mem["primary_method"] == "torch_profiler_alloc"
    assert set(mem["methods"]) == {"torch_profiler_alloc", "rss_high_water"}
    for by in mem["peak_extra_bytes"].values():
        assert by["torch_profiler_alloc"] > 0
    assert set(res["ratios"]) == {
        "official_style_over_ours_time",
        "ours_over_lower_bound_time",
        "ours_over_official_style_peak_memory",
        "official_style_over_ours_time_min",
        "ours_over_lower_bound_time_min",
    }
    for t in res["targets"].values():
        assert set(t) == {"what", "value", "target", "met"}
    assert res["check"]["agree"] is True
    assert res["check"]["loss_max_abs_diff_official"] <= 1e-5
    assert res["check"]["prototypes_max_abs_diff_official"] <= 1e-5


def test_p2_schema(quick_report: dict) -> None:
    res = quick_report["benchmarks"]["p2"]
    assert res["status"] == "ok"
    meas = res["measurements"]
    assert set(meas) == {"meanteacher", "brpg", "brpg_sampling", "clustering"}
    for name, m in meas.items():
        assert m["unit"] == ("s" if name == "clustering" else "ms")
        _check_measurement(m)
    assert meas["meanteacher"]["repeats"] == meas["brpg"]["repeats"] == p2.QUICK.repeats
    assert set(res["ratios"]) == {
        "brpg_over_meanteacher_time",
        "brpg_over_meanteacher_time_min",
        "sampling_over_meanteacher_time",
        "sampling_over_meanteacher_time_min",
        "clustering_in_meanteacher_steps",
    }
    ratio = meas["brpg"]["median"] / meas["meanteacher"]["median"]
    assert res["ratios"]["brpg_over_meanteacher_time"] == pytest.approx(ratio)
    t = res["targets"]["step_vs_meanteacher"]
    assert set(t) == {"what", "value", "target", "met"} and t["target"] == "<= 1.1"
    cfg = res["config"]
    assert cfg["preset"] == "digits_brpg_1_16" and cfg["batch"] == p2.QUICK.batch
    assert cfg["steps"]["meanteacher"] == cfg["steps"]["brpg"]
    assert len(cfg["prototypes_per_class_after_fill"]) == 11
    assert len(cfg["clustering_memory"]["prototypes_per_class"]) == 11
    # every class of the filled memories gets its full high + low prototype budget
    assert min(cfg["clustering_memory"]["prototypes_per_class"]) >= 4
    check = res["check"]
    assert check["losses_finite"] is True
    assert check["brpg_has_loss_proto"] is True and check["meanteacher_has_loss_proto"] is False


def test_p2_variants_run_the_trainer_phases() -> None:
    """The step numbers put ``brpg`` in the proto phase, ``brpg_sampling`` in the sampling
    window and the mean teacher in its semi phase; a sampling step fills the memory."""
    from brpg.timeline import phase_of

    cfg_b = p2.make_config(p2.QUICK, "brpg")
    x, y = p2.make_batch(cfg_b, 2, 32, seed=0)
    assert x.shape == (2, 3, 32, 32) and y.shape == (2, 32, 32) and y.dtype == torch.long
    assert set(y.unique().tolist()) <= set(range(11)) | {255}
    p = cfg_b.proto
    var = p2.Variant(cfg_b, p.sample_start_step + 1, torch.device("cpu"))
    assert phase_of(var.step, cfg_b) == "sampling"
    var.method.plugin.memory = var.method.plugin.new_memory()
    logs = var.train_step({"image": x, "mask": y}, x.flip(0), seed=0)
    assert "loss_proto" not in logs
    assert int(sum(c.sum() for c in var.method.plugin.memory.count.values())) > 0
    memory = p2.fill_memory(cfg_b, torch.device("cpu"))
    assert all(bool((c == p.queue_len).all()) for c in memory.count.values())


def test_p3_schema(quick_report: dict) -> None:
    res = quick_report["benchmarks"]["p3"]
    if res["status"] != "ok":  # sklearn missing: skipped with a message
        assert res["status"] == "not_available" and "scikit-learn" in res["reason"]
        return
    assert set(res["measurements"]) == {"ours", "ours_subsample", "sklearn", "sklearn_batch100"}
    for m in res["measurements"].values():
        assert m["unit"] == "s"
        _check_measurement(m)
    cfg = res["config"]
    assert len(cfg["clusters_per_memory"]) == 2 * cfg["classes"]
    assert set(cfg["clusters_per_memory"]) <= {2, 3}
    assert cfg["sklearn_params"]["sklearn"]["n_init"] == 3
    assert cfg["sklearn_params"]["sklearn_batch100"]["batch_size"] == 100
    for v in res["inertia"]["total"].values():
        assert v > 0 and math.isfinite(v)
    assert set(res["targets"]) == {
        "speed_vs_sklearn",
        "inertia_vs_sklearn",
        "speed_vs_sklearn_subsample",
        "inertia_vs_sklearn_subsample",
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_style_matches_ours(seed: int) -> None:
    """Loss, gradient and EMA'd prototypes agree within 1e-5 over several steps."""
    check = p1.agreement(p1.QUICK, seed=seed, steps=4)
    assert check["same_valid_slots"]
    assert check["loss_max_abs_diff_official"] <= 1e-5
    assert check["grad_max_abs_diff_official"] <= 1e-5
    assert check["prototypes_max_abs_diff_official"] <= 1e-5
    assert check["prototypes_max_abs_change"] > 1e-4  # the EMA really moved the prototypes
    assert check["loss_abs_diff_lower_bound_step1"] <= 1e-5


def test_official_style_padding_repeats_last_prototype() -> None:
    high = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 2.0]])]
    low = [torch.tensor([[3.0, 3.0], [4.0, 4.0]]), torch.tensor([[5.0, 5.0]])]
    padded = OfficialStylePrototypes(high, low).padded()
    assert padded.shape == (2, 6, 2)
    assert torch.equal(padded[0, :3], torch.tensor([[1.0, 0.0]] * 3))
    assert torch.equal(padded[0, 3:], torch.tensor([[3.0, 3.0], [4.0, 4.0], [4.0, 4.0]]))
    assert torch.equal(padded[1, 3:], torch.tensor([[5.0, 5.0]] * 3))


def test_official_style_ema_maps_padded_slots() -> None:
    """A class with 1 high and 2 low prototypes: padded slot ids map to the real ones."""
    off = OfficialStylePrototypes([torch.zeros(1, 2)], [torch.tensor([[1.0, 0.0], [0.0, 1.0]])])
    feats = torch.tensor([[10.0, 10.0], [20.0, 0.0], [0.0, 30.0]])
    targets = torch.zeros(3, dtype=torch.long)
    ids = torch.tensor([[2], [3], [5]])  # padded high → high 0; low slot 3 → low 0; 5 → low 1
    off.ema_update(feats, targets, ids)
    a = off.momentum
    assert torch.allclose(off.high[0], (1 - a) * torch.tensor([[10.0, 10.0]]))
    assert torch.allclose(off.low[0][0], a * torch.tensor([1.0, 0.0]) + (1 - a) * feats[1])
    assert torch.allclose(off.low[0][1], a * torch.tensor([0.0, 1.0]) + (1 - a) * feats[2])


def test_memory_helpers_see_a_large_tensor() -> None:
    n = 4_000_000  # 16 MB of float32

    def make() -> None:
        x = torch.ones(n)
        del x

    assert torch_alloc_peak_bytes(make) >= 4 * n
    rss = rss_high_water_bytes(make)
    assert rss is None or rss >= 0


def test_time_interleaved_counts() -> None:
    calls: list[str] = []
    out = time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        {"a": 3, "b": 1},
        torch.device("cpu"),
        warmup={"a": 1, "b": 0},
    )
    assert [len(out["a"]), len(out["b"])] == [3, 1]
    assert calls == ["a", "a", "b", "a", "a"]


def test_cli_list_and_script_entry() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "p2" in proc.stdout and "not yet available" not in proc.stdout
    assert main(["--only", "p9"]) == 2


def test_p4_runs_both_versions_side_by_side(quick_report: dict) -> None:
    res = quick_report["benchmarks"]["p4"]
    if res["status"] == "not_available":  # e.g. a shallow clone without the baseline commit
        pytest.skip(res["reason"])
    assert res["status"] == "ok" and res["baseline_commit"] == "70781cd"
    names = {f"{m}_{v}" for m in ("suponly", "meanteacher", "brpg") for v in ("before", "now")}
    assert set(res["measurements"]) == names
    for m in res["measurements"].values():
        _check_measurement(m)
    med = {k: m["median"] for k, m in res["measurements"].items()}
    assert res["ratios"]["brpg: before / now"] == pytest.approx(
        med["brpg_before"] / med["brpg_now"]
    )
    assert set(res["targets"]) == {"mt", "brpg", "p2"}


def test_p4_baseline_is_the_old_package(tmp_path: Path) -> None:
    """The `before` workers import the baseline's brpg, not this checkout's: its DigitScenes
    generator is version 2 (this checkout's is 3)."""
    from benchmarks.common import BenchmarkUnavailable
    from benchmarks.p4_speed import extract_baseline

    try:
        root = extract_baseline(tmp_path / "before")
    except BenchmarkUnavailable as err:
        pytest.skip(str(err))
    text = (root / "brpg" / "data" / "digits.py").read_text()
    assert "GENERATOR_VERSION = 2" in text
    assert not (root / "brpg" / "engine" / "metrics.py").read_text().count("BoundaryIoU")
