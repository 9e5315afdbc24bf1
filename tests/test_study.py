"""The study's rules and analysis (brpg.book.study) on hand-worked cases.

Machine: exact. Pure arithmetic on given numbers and small JSON files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from brpg.book import study


def test_t_interval_matches_hand_worked_values():
    # [1, 2, 3]: mean 2, s = 1, t(0.975, 2 df) = 4.303 (printed tables) -> 2 ± 4.303 / sqrt(3)
    mean, low, high = study.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert (high - mean) == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert (mean - low) == pytest.approx(high - mean)
    # five values 0.5 ... 2.5: s^2 = 2.5 / 4, t(0.975, 4 df) = 2.776 (not the normal 1.96)
    mean, low, high = study.t_interval([0.5, 1.0, 1.5, 2.0, 2.5])
    assert mean == pytest.approx(1.5)
    assert high - mean == pytest.approx(2.776 * math.sqrt(0.625) / math.sqrt(5), abs=1e-3)
    one = study.t_interval([4.0])
    assert one[0] == 4.0 and math.isnan(one[1]) and math.isnan(one[2])
    with pytest.raises(ValueError):
        study.t_interval([])


def test_budget_rule_takes_the_smallest_budget_within_tolerance_of_twice_it():
    # 2000 -> 4000 gains 10 points; 3000 -> 6000 gains 6; 4000 -> 8000 gains 1.0: B = 4000
    finals = {2000: 48.0, 3000: 55.0, 4000: 58.0, 6000: 61.0, 8000: 59.0}
    got = study.choose_budget(finals)
    assert got["budget"] == 4000 and got["flattened"] is True
    assert [c[0] for c in got["checks"]] == [2000, 3000, 4000]
    assert [c[3] for c in got["checks"]] == [False, False, True]
    # the tolerance is inclusive and absolute: a loss of 1.5 at 2B also passes
    assert study.choose_budget({2000: 50.0, 4000: 48.5})["budget"] == 2000
    assert study.choose_budget({2000: 50.0, 4000: 51.6})["budget"] is None  # 3000 missing
    # a smaller budget that the rule still needs is named, even when a larger one passes
    got = study.choose_budget({2000: 48.0, 4000: 58.0, 8000: 59.0})
    assert got["budget"] is None and got["missing"] == [3000, 6000]
    # nothing passes up to 8000 (vs 16000): B = 8000, the curves had not flattened
    finals = {b: float(b) / 100 for b in (2000, 3000, 4000, 6000, 8000, 12000, 16000)}
    got = study.choose_budget(finals)
    assert got["budget"] == 8000 and not any(c[3] for c in got["checks"])
    assert got["flattened"] is False
    assert study.choose_budget({**finals, 16000: 81.0})["flattened"] is True  # 8000 passes
    # every B below 8000 failed and there is no 16000 run: B = 8000 all the same
    del finals[16000]
    got = study.choose_budget(finals)
    assert (got["budget"], got["flattened"], got["missing"]) == (8000, None, [16000])
    # ... but not while the 8000 run itself is missing
    del finals[8000]
    assert study.choose_budget(finals)["budget"] is None


def test_study_splits_are_the_two_smallest_where_the_mean_teacher_helps():
    mt = {"1_16": 20.0, "1_8": 55.0, "1_4": 62.0}
    sup = {"1_16": 21.0, "1_8": 45.0, "1_4": 58.0}
    assert study.study_splits(mt, sup) == ["1_8", "1_4"]
    # 3 points exactly counts; ordering is by label fraction, not by name
    assert study.study_splits({"1_4": 61.0, "1_16": 30.0}, {"1_4": 58.0, "1_16": 27.0}) == [
        "1_16",
        "1_4",
    ]
    assert study.study_splits({"1_8": 46.0}, {"1_8": 45.0}) == []


def _write(dest: Path, preset: str, seed: int, miou: float, biou: float, **extra) -> None:
    run = dest / preset / f"seed{seed}"
    run.mkdir(parents=True)
    summary = {
        "val_miou": miou,
        "val_mbiou": biou,
        "per_class_iou": [miou + 10, miou - 10],
        "per_class_biou": [biou, biou],
        "amp_dtype": "fp32",
        "dataset_version": 3,
        "config": {"train": {"seed": seed}},
        **extra,
    }
    (run / "summary.json").write_text(json.dumps(summary))


def test_paired_differences_use_only_seeds_both_runs_have(tmp_path: Path):
    for seed, (a, b) in enumerate([(50.0, 48.0), (52.0, 49.0), (51.0, 50.0)]):
        _write(tmp_path, "digits_brpg_1_8", seed, a, a - 20)
        _write(tmp_path, "digits_meanteacher_1_8", seed, b, b - 21)
    _write(tmp_path, "digits_brpg_1_8", 7, 90.0, 90.0)  # no partner: left out
    p = study.paired(tmp_path, "digits_brpg_1_8", "digits_meanteacher_1_8")
    assert p.seeds == (0, 1, 2) and p.diffs == (2.0, 3.0, 1.0) and p.wins == 3
    assert p.mean == 2.0 and p.half_width == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert study.verdict(p) == (
        "no effect resolved: between −0.5 and +4.5 points (partial: 3 of 5 seeds)"
    )
    q = study.paired(tmp_path, "digits_brpg_1_8", "digits_meanteacher_1_8", "mbiou")
    assert q.diffs == (3.0, 4.0, 2.0)
    c1 = study.paired(tmp_path, "digits_brpg_1_8", "digits_meanteacher_1_8", cls=1)
    assert c1.diffs == p.diffs  # class 1 is miou - 10 in both
    # a statement written with fewer seeds: seed 7 has no partner, seed 5 no run at all
    r = study.paired(tmp_path, "digits_brpg_1_8", "digits_meanteacher_1_8", only=[0, 2, 5, 7])
    assert r.seeds == (0, 2) and r.diffs == (2.0, 1.0)
    with pytest.raises(ValueError, match="no seed has both"):
        study.paired(tmp_path, "digits_brpg_1_8", "digits_suponly_1_8")


def test_signed_writes_the_sign_and_a_typographic_minus():
    # the README's and the book's prose write "−2.4" (U+2212) and "+1.9": a hyphen, or a
    # positive number without its "+", would read differently from the text around it
    assert study.signed(-2.36) == "\u22122.4" and study.signed(1.88) == "+1.9"
    assert study.signed(0.013, 2) == "+0.01" and study.signed(-0.04, 2) == "\u22120.04"
    assert "-" not in study.signed(-15.0)


def test_paired_text_is_the_mean_and_interval_as_printed():
    # what chapters 5 and 8 and the comparison table print: a wrong bound, a hyphen or a
    # missing "no interval" for one seed would make the printed statement disagree with it
    two = study.Paired("a", "b", "miou", (0, 1), (1.0, -0.2), 0.4, -7.22, 8.02, 1)
    assert two.text == "+0.4 [\u22127.2, +8.0]"
    one = study.Paired("a", "b", "miou", (3,), (0.45,), 0.45, math.nan, math.nan, 1)
    assert one.text == "+0.5 no interval"


def test_verdict_words():
    def p(low: float, high: float, n: int = 5) -> study.Paired:
        return study.Paired("a", "b", "miou", tuple(range(n)), (0.0,) * n, 0.0, low, high, 0)

    assert study.verdict(p(0.2, 1.4)) == "helps: +0.2 to +1.4 points"
    assert study.verdict(p(-2.0, -0.1)) == "hurts: −2.0 to −0.1 points"
    assert study.verdict(p(-0.6, 0.9)) == "no effect resolved: between −0.6 and +0.9 points"
    assert study.verdict(p(math.nan, math.nan, 1)).startswith("one seed only")
    assert study.verdict(p(0.1, 5.0, 2)) == "helps: +0.1 to +5.0 points (partial: 2 of 5 seeds)"
    # a bound that one decimal would print as 0.0 gets two: "helps: +0.0 to ..." misreads
    assert study.verdict(p(0.013, 2.17)) == "helps: +0.01 to +2.2 points"
    assert study.verdict(p(-1.23, -0.04)) == "hurts: −1.2 to −0.04 points"
    assert study.verdict(p(-0.0, 0.9)) == "no effect resolved: between −0.0 and +0.9 points"
    # the same intervals, as the per-class panels and chapter 8's class list read them
    assert p(0.2, 1.4).excludes_zero and p(-2.0, -0.1).excludes_zero
    assert not p(-0.6, 0.9).excludes_zero and not p(0.0, 0.9).excludes_zero
    assert not p(math.nan, math.nan, 1).excludes_zero  # one seed: no interval, never listed


def test_fp32_check_refuses_a_bf16_or_older_run(tmp_path: Path):
    _write(tmp_path, "digits_meanteacher_1_8", 0, 50.0, 30.0)
    assert study.check_fp32(tmp_path) == 1
    _write(tmp_path, "digits_brpg_1_8", 0, 50.0, 30.0, amp_dtype="bfloat16")
    with pytest.raises(AssertionError, match="amp_dtype='bfloat16'"):
        study.check_fp32(tmp_path)
    other = tmp_path / "v2"
    _write(other, "digits_brpg_1_8", 0, 50.0, 30.0, dataset_version=2)
    with pytest.raises(AssertionError, match="dataset_version=2"):
        study.check_fp32(other)
    same = tmp_path / "fp"
    _write(same, "digits_brpg_1_8", 0, 50.0, 30.0, data_fingerprint="aa")
    _write(same, "digits_brpg_1_8", 1, 50.0, 30.0)  # made before summaries recorded it
    _write(same, "digits_meanteacher_1_8", 0, 50.0, 30.0, data_fingerprint="aa")
    assert study.check_fp32(same) == 3
    _write(same, "digits_meanteacher_1_8", 1, 50.0, 30.0, data_fingerprint="bb")
    with pytest.raises(AssertionError, match="different DigitScenes data"):
        study.check_fp32(same)


def test_warmup_identity_compares_the_logged_supervised_losses(tmp_path: Path):
    def log(config: str, losses: dict[int, float]) -> None:
        run = tmp_path / config / "seed0"
        run.mkdir(parents=True)
        rows = [{"step": s, "loss_sup": v} for s, v in losses.items()]
        (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    log("mt", {250: 1.0, 500: 0.5, 550: 0.4})
    log("brpg", {250: 1.0, 500: 0.5, 550: 0.3})  # differs only after the warm-up
    log("plain", {250: 1.0, 500: 0.5000001, 550: 0.4})
    assert study.warmup_identical(tmp_path, ["mt", "brpg"], 0)
    assert not study.warmup_identical(tmp_path, ["mt", "brpg"], 0, until=550)
    assert not study.warmup_identical(tmp_path, ["mt", "brpg", "plain"], 0)
    assert study.warmup_identical(tmp_path, ["mt", "absent"], 0)  # nothing to compare yet


def test_warmup_siblings_are_the_semi_supervised_variants_at_the_same_split():
    assert study.warmup_siblings("digits_brpg_nocpg_1_8") == [
        "digits_meanteacher_1_8",
        "digits_plainproto_1_8",
        "digits_brpg_1_8",
        "digits_brpg_noapo_1_8",
    ]
    assert "digits_brpg_1_16" in study.warmup_siblings("digits_meanteacher_1_16")
    # SupOnly trains another loop; a preset without a label fraction has no split
    assert study.warmup_siblings("digits_suponly_1_16") == []
    assert study.warmup_siblings("digits_brpg_full") == []


def test_warmup_mismatch_names_the_first_differing_loss_of_a_run_in_progress(tmp_path: Path):
    """A run still training (its last line torn) against the committed runs of its seed: the
    first step at which its loss_sup differs within the warm-up, or None."""
    dest = tmp_path / "study"
    committed = dest / "digits_meanteacher_1_16" / "seed3" / "log.jsonl"
    committed.parent.mkdir(parents=True)
    rows = [{"step": 50, "loss_sup": 1.25}, {"step": 100, "loss_sup": 1.0}]
    rows.append({"step": 600, "loss_sup": 0.5})  # after the warm-up: the variants differ
    committed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = tmp_path / "work" / "log.jsonl"
    log.parent.mkdir()
    assert study.warmup_mismatch(log, dest, "digits_brpg_1_16", 3) is None  # nothing logged
    log.write_text(json.dumps({"step": 50, "loss_sup": 1.25}) + '\n{"step": 10')  # torn
    assert study.warmup_mismatch(log, dest, "digits_brpg_1_16", 3) is None
    log.write_text(
        "".join(json.dumps({"step": s, "loss_sup": v}) + "\n" for s, v in
                [(50, 1.25), (100, 1.0), (600, 0.7)])
    )  # fmt: skip
    assert study.warmup_mismatch(log, dest, "digits_brpg_1_16", 3) is None  # 600: not warm-up
    assert study.warmup_mismatch(log, dest, "digits_brpg_1_16", 4) is None  # no run of seed 4
    assert study.warmup_mismatch(log, dest, "digits_brpg_1_8", 3) is None  # another split
    log.write_text(
        "".join(json.dumps({"step": s, "loss_sup": v}) + "\n" for s, v in
                [(50, 1.25), (100, 1.0000001)])
    )  # fmt: skip
    why = study.warmup_mismatch(log, dest, "digits_brpg_1_16", 3)
    assert why == f"loss_sup at step 100 is 1.0000001 here and 1.0 in {committed}"


def test_compare_split_lists_the_comparisons_that_have_both_variants(tmp_path: Path):
    for seed, (mt, br, sup) in enumerate([(50.0, 51.0, 40.0), (52.0, 52.5, 41.0)]):
        _write(tmp_path, "digits_meanteacher_1_8", seed, mt, mt - 20)
        _write(tmp_path, "digits_brpg_1_8", seed, br, br - 19)
        _write(tmp_path, "digits_suponly_1_8", seed, sup, sup - 20)
    _write(tmp_path, "digits_brpg_1_16", 0, 30.0, 10.0)  # another split: not read
    rows = study.compare_split(tmp_path, "1_8")
    assert [(r["a"], r["b"]) for r in rows] == [("meanteacher", "suponly"), ("brpg", "meanteacher")]
    assert rows[1]["primary"] and not rows[0]["primary"]
    assert rows[1]["miou"].diffs == (1.0, 0.5) and rows[1]["mbiou"].diffs == (2.0, 1.5)
    table = study.format_comparisons(rows)
    assert "| brpg − meanteacher | does BRPG help (primary) | 2 | +0.8 [" in table
    assert ", 2 of 2 |" in table


def test_idea_verdicts_name_every_idea_at_every_split(tmp_path: Path):
    for seed, (mt, br) in enumerate([(50.0, 52.0), (52.0, 55.0), (51.0, 52.0)]):
        _write(tmp_path, "digits_meanteacher_1_8", seed, mt, mt - 20)
        _write(tmp_path, "digits_brpg_1_8", seed, br, br - 20)
    by_split = {s: study.compare_split(tmp_path, s) for s in ("1_16", "1_8")}
    text = study.idea_verdicts(by_split)
    lines = text.splitlines()
    assert len(lines) == len(study.COMPARISONS)
    brpg = next(line for line in lines if line.startswith("* **BRPG as a whole**"))
    # diffs 2, 3, 1 in both metrics: mean 2, t(2) half-width 4.303 / sqrt(3) = 2.48
    assert brpg == (
        "* **BRPG as a whole** (brpg − meanteacher): at 1/16, no paired runs yet; at 1/8,"
        " mIoU no effect resolved: between −0.5 and +4.5 points (partial: 3 of 5 seeds);"
        " mBIoU no effect resolved: between −0.5 and +4.5 points (partial: 3 of 5 seeds)."
    )
    apo = next(line for line in lines if line.startswith("* **APO**"))
    assert apo == (
        "* **APO** (brpg − brpg_noapo): at 1/16, no paired runs yet; at 1/8, no paired runs yet."
    )
    assert study.idea_verdicts({}).count("no study split yet") == len(study.COMPARISONS)


def test_compare_classes_pairs_every_class_of_the_summaries(tmp_path: Path):
    for seed, (mt, br) in enumerate([(50.0, 52.0), (52.0, 55.0)]):
        _write(tmp_path, "digits_meanteacher_1_8", seed, mt, mt - 20)
        _write(tmp_path, "digits_brpg_1_8", seed, br, br - 21)
    # _write: class 0 is miou + 10, class 1 miou - 10; both boundary classes are mbiou
    per_class = study.compare_classes(tmp_path, "1_8", "brpg", "meanteacher", "miou")
    assert [p.diffs for p in per_class] == [(2.0, 3.0), (2.0, 3.0)]
    biou = study.compare_classes(tmp_path, "1_8", "brpg", "meanteacher", "mbiou")
    assert [p.diffs for p in biou] == [(1.0, 2.0), (1.0, 2.0)]
    with pytest.raises(ValueError, match="no committed run of digits_brpg_1_16"):
        study.compare_classes(tmp_path, "1_16", "brpg", "meanteacher", "miou")


def test_plot_class_differences_marks_resolved_classes(tmp_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    def p(diffs: tuple[float, ...]) -> study.Paired:
        mean, low, high = study.t_interval(list(diffs))
        return study.Paired("a", "b", "miou", tuple(range(len(diffs))), diffs, mean, low, high, 0)

    fig, ax = plt.subplots()
    study.plot_class_differences([p((1.0, 1.2, 1.1)), p((-1.0, 2.0, 0.5)), p((3.0,))], ax,
                                 ["bg", "0", "1"])  # fmt: skip
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bg", "0", "1"]
    bars = [c for c in ax.containers]  # one errorbar per class with an interval
    colours = [to_hex(b.lines[0].get_color()) for b in bars]
    assert colours == [to_hex("C3"), to_hex("C0")]  # resolved (above 0), not resolved
    plt.close(fig)


def test_val_curve_and_budget_runs_read_what_the_trainer_writes(tmp_path: Path):
    for steps, final in ((4000, 58.0), (8000, 60.0)):
        run = tmp_path / f"steps{steps}" / "digits_meanteacher_1_8" / "seed0"
        run.mkdir(parents=True)
        rows = [{"step": 50, "loss_sup": 1.0}, {"step": 500, "val_miou": 20.0, "val_mbiou": 9.0}]
        rows.append({"step": steps, "val_miou": final, "val_mbiou": 30.0, "final": True})
        (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (run / "summary.json").write_text(json.dumps({"steps": steps, "val_miou": final}))
    runs = study.budget_runs(tmp_path, "digits_meanteacher_1_8")
    assert sorted(runs) == [4000, 8000] and runs[8000]["val_miou"] == 60.0
    curve = study.val_curve(
        tmp_path / "steps4000" / "digits_meanteacher_1_8" / "seed0" / "log.jsonl"
    )
    assert curve == [(500, 20.0, 9.0), (4000, 58.0, 30.0)]


def test_apo_picks_reads_the_clustering_event_of_each_finished_seed(tmp_path: Path):
    proto = {"proto": {"num_high": 2, "num_low": 2}}
    events = {0: [5, 4, 4, 4, 5], 1: [6, 4, 3, 4, 4]}  # seed 1: two extra to class 0, 2 short
    for seed, counts in events.items():
        _write(
            tmp_path, "digits_brpg_1_8", seed, 50.0, 30.0, config={"train": {"seed": seed}, **proto}
        )
        log = tmp_path / "digits_brpg_1_8" / f"seed{seed}" / "log.jsonl"
        lines = [
            {"step": 550, "loss_sup": 0.5},
            {"step": 600, "event": "prototypes_per_class", "prototypes_per_class": counts},
            {"step": 600, "loss_sup": 0.4},
        ]
        log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert study.apo_picks(tmp_path, "digits_brpg_1_8") == {0: {0: 1, 4: 1}, 1: {0: 2}}
    (tmp_path / "digits_brpg_1_8" / "seed1" / "log.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="no clustering event"):
        study.apo_picks(tmp_path, "digits_brpg_1_8")


@pytest.mark.parametrize("sharey", [False, True])
def test_plot_comparisons_names_every_comparison_on_the_left_panel(tmp_path: Path, sharey: bool):
    """Chapter 8 draws the panels with sharey=True; blank labels on the right panel once blanked
    the left one's too, so the figure showed dots without saying which comparison they were."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for seed, (a, b) in enumerate([(50.0, 48.0), (52.0, 49.0)]):
        _write(tmp_path, "digits_brpg_1_8", seed, a, a - 20)
        _write(tmp_path, "digits_meanteacher_1_8", seed, b, b - 21)
    rows = study.compare_split(tmp_path, "1_8")
    fig, axes = plt.subplots(1, 2, sharey=sharey)
    study.plot_comparisons(rows, axes)
    fig.canvas.draw()
    left = [t.get_text() for t in axes[0].get_yticklabels()]
    assert left == [f"{r['a']} − {r['b']}" for r in rows] and left
    assert not any(t.get_visible() for t in axes[1].get_yticklabels())
    assert axes[0].get_ylim()[0] > axes[0].get_ylim()[1]  # first comparison on top
    plt.close(fig)


def test_paired_curve_pairs_the_logged_evaluations_step_by_step(tmp_path: Path):
    def log(preset: str, seed: int, points: dict[int, tuple[float, float]]) -> None:
        rows = [{"step": s, "loss_sup": 1.0} for s in (10, 20)]  # training rows: no val
        rows += [{"step": s, "val_miou": m, "val_mbiou": b} for s, (m, b) in points.items()]
        (tmp_path / preset / f"seed{seed}" / "log.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows)
        )

    for seed in (0, 1):
        _write(tmp_path, "digits_brpg_1_8", seed, 0.0, 0.0)
        _write(tmp_path, "digits_meanteacher_1_8", seed, 0.0, 0.0)
    _write(tmp_path, "digits_brpg_1_8", 2, 0.0, 0.0)  # no partner: left out
    log("digits_brpg_1_8", 0, {500: (30.0, 20.0), 1000: (40.0, 25.0), 1500: (45.0, 30.0)})
    log("digits_meanteacher_1_8", 0, {500: (29.0, 20.0), 1000: (37.0, 24.0), 1500: (41.0, 26.0)})
    log("digits_brpg_1_8", 1, {500: (31.0, 21.0), 1000: (42.0, 26.0)})  # stopped at 1000
    log("digits_meanteacher_1_8", 1, {500: (32.0, 21.0), 1000: (39.0, 25.0)})
    log("digits_brpg_1_8", 2, {500: (99.0, 99.0)})
    got = study.paired_curve(tmp_path, "1_8", "brpg", "meanteacher")
    assert [s for s, _ in got] == [500, 1000]  # 1500: not logged by seed 1
    assert got[0][1].diffs == (1.0, -1.0) and got[0][1].mean == 0.0 and got[0][1].wins == 1
    assert got[1][1].diffs == (3.0, 3.0) and got[1][1].seeds == (0, 1)
    assert got[1][1].low == got[1][1].high == 3.0  # no spread: a zero-width interval
    mb = study.paired_curve(tmp_path, "1_8", "brpg", "meanteacher", "mbiou")
    assert [p.diffs for _, p in mb] == [(0.0, 0.0), (1.0, 1.0)]
    with pytest.raises(ValueError, match="no seed has both"):
        study.paired_curve(tmp_path, "1_8", "brpg", "plainproto")


def test_late_gain_averages_each_finished_runs_gain_between_two_evaluations(tmp_path: Path):
    """Hand case: seed 0 gains 2.0 and seed 1 gains 1.0 from step 6,000 to 8,000; the mean is
    1.5. A run without a summary (unfinished) is not read; a log missing the step raises."""
    for seed, (m6, m8) in enumerate([(40.0, 42.0), (50.0, 51.0)]):
        _write(tmp_path, "digits_brpg_1_8", seed, m8, 0.0)
        rows = [{"step": 10, "loss_sup": 1.0}, {"step": 4000, "val_miou": 10.0}]
        rows += [{"step": 6000, "val_miou": m6}, {"step": 8000, "val_miou": m8, "final": True}]
        study.run_log(tmp_path, "digits_brpg_1_8", seed).write_text(
            "\n".join(json.dumps(r) for r in rows)
        )
    assert study.run_log(tmp_path, "x", 3) == tmp_path / "x" / "seed3" / "log.jsonl"
    assert study.late_gain(tmp_path, "digits_brpg_1_8", 6000, 8000) == 1.5
    assert study.late_gain(tmp_path, "digits_brpg_1_8", 4000, 8000) == (32.0 + 41.0) / 2
    assert study.late_gain(tmp_path, "digits_meanteacher_1_8", 6000, 8000) is None
    with pytest.raises(ValueError, match=r"no evaluation at step\(s\) \[7000\]"):
        study.late_gain(tmp_path, "digits_brpg_1_8", 7000, 8000)


def test_results_command_prints_the_paired_comparisons_per_split(tmp_path: Path, capsys):
    """`brpg results --paired`: the table, then each split's comparisons. Hand case at 1/8:
    BRPG − mean teacher is +2 and +4 on seeds 0 and 1: mean +3, t(1) = 12.706, sd = √2, so
    the half-width is 12.706 · √2 / √2 = 12.7: [−9.7, +15.7]."""
    from brpg import cli

    for seed, (b, m) in enumerate([(52.0, 50.0), (55.0, 51.0)]):
        _write(tmp_path, "digits_brpg_1_8", seed, b, b - 20, steps=10, wall_s=1.0)
        _write(tmp_path, "digits_meanteacher_1_8", seed, m, m - 20, steps=10, wall_s=1.0)
    assert cli.main(["results", "--root", str(tmp_path), "--paired"]) == 0
    out = capsys.readouterr().out
    assert "1/8 of the labels: paired differences" in out and "1/16 of the labels" not in out
    assert "| brpg − meanteacher | does BRPG help (primary) | 2 | +3.0 [−9.7, +15.7], 2 of 2" in out
    summary = tmp_path / "digits_brpg_1_8" / "seed1" / "summary.json"
    s = json.loads(summary.read_text())
    del s["val_mbiou"]  # a summary from before Boundary IoU
    summary.write_text(json.dumps(s))
    assert cli.main(["results", "--root", str(tmp_path), "--paired"]) == 1
    assert "needs val_mbiou" in capsys.readouterr().err


def test_more_seeds_follows_the_plans_rule_for_adding_seeds(tmp_path: Path):
    """Step 4 of the plan, hand-worked: plain − mean teacher differences 1, 2, 3, 4, 5 have
    sd sqrt(2.5) = 1.581 and a t(4) half-width 2.776 · 1.581 / sqrt(5) = 1.96 > 1: seed 5 next.
    Differences that barely vary meet the rule. Fewer than five seeds: the stage is not done;
    ten seeds in: the plan stops whatever the width."""

    def runs(dest: Path, plain_d: list[float], brpg_d: list[float]) -> list[dict]:
        for seed, (dp, db) in enumerate(zip(plain_d, brpg_d, strict=True)):
            mt = 50.0 + seed  # the seed's own level cancels in every paired difference
            _write(dest, "digits_meanteacher_1_8", seed, mt, mt - 20)
            _write(dest, "digits_plainproto_1_8", seed, mt + dp, mt - 20)
            _write(dest, "digits_brpg_1_8", seed, mt + db, mt - 20)
            # SupOnly's comparison is wide (±7) but not primary: it never asks for seeds
            _write(dest, "digits_suponly_1_8", seed, 30.0 + 8 * (seed % 2), 10.0)
        return study.compare_split(dest, "1_8")

    seed, why = study.more_seeds(runs(tmp_path / "wide", [1, 2, 3, 4, 5], [2, 2.1, 1.9, 2, 2]))
    assert seed == 5
    assert "plainproto − meanteacher ±1.96" in why and why.endswith("seed 5 next")
    narrow = runs(tmp_path / "narrow", [1, 1.1, 0.9, 1, 1], [2, 2.1, 1.9, 2, 2])
    assert study.more_seeds(narrow) == (
        None,
        "met with 5 seeds (plainproto − meanteacher ±0.09, brpg − meanteacher ±0.09,"
        " brpg − plainproto ±0.00)",
    )
    seed, why = study.more_seeds(runs(tmp_path / "four", [1, 2, 3, 4], [2, 2, 2, 2]))
    assert seed is None and why == "the planned 5 seeds are not all in yet (4)"
    seed, why = study.more_seeds(runs(tmp_path / "ten", [1, 5] * 5, [2] * 10))
    assert seed is None and why.endswith("the plan stops at 10")
    assert study.more_seeds([]) == (None, "the planned 5 seeds are not all in yet (0)")


def test_more_seeds_skips_a_seed_given_up_and_counts_it_as_spent(tmp_path: Path):
    """Issue 26's pre-declared rule: BRPG's seed 6 at 1/16 cannot be trained on the kind of
    CPU the session has; the comparisons go on without it (stand-in runs, at 1/8 here).
    Differences that never meet ±1
    (plain − mean teacher alternates 1, 5): without the rule the plan asks for seed 6 again;
    with it, seed 8 after seeds 0–7, and it stops once seeds 0–9 are in or given up."""
    why = "its seed's other runs were trained on another kind of CPU"

    def rows(n: int) -> list[dict]:
        dest = tmp_path / f"n{n}"
        for seed in range(n):
            mt = 50.0 + seed
            _write(dest, "digits_meanteacher_1_8", seed, mt, mt - 20)
            _write(dest, "digits_plainproto_1_8", seed, mt + (1, 5)[seed % 2], mt - 20)
            if seed != 6:  # BRPG seed 6 is missing
                _write(dest, "digits_brpg_1_8", seed, mt + 2, mt - 20)
        return study.compare_split(dest, "1_8")

    eight = rows(8)
    assert [r["miou"].n for r in eight if r["primary"]] == [8, 7, 7]
    assert study.more_seeds(eight)[0] == 6
    assert study.more_seeds(eight, {6: why})[0] == 8
    ten = rows(10)
    seed, text = study.more_seeds(ten)
    assert seed == 6 and text.startswith("not met with 9 seeds")
    seed, text = study.more_seeds(ten, {6: why})
    assert seed is None and text.endswith(f"the plan stops at 10; seed 6 left out: {why}")
    # a seed given up but trained after all is simply one of the seeds in
    assert study.more_seeds(ten, {3: why})[0] == 6
