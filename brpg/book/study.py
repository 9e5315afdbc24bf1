"""The DigitScenes v3 study (``results/digits_v3/PLAN.md``): its rules and its analysis.

One function per rule of the plan, the same code for every stage, so that chapter 8, the
README and the tests read one implementation:

* :func:`choose_budget`: the smallest budget B of the ladder whose final mean-teacher mIoU is
  within ``tol`` points of the run with budget 2B;
* :func:`study_splits`: the two smallest label fractions where the mean teacher beats SupOnly
  by at least ``min_gain`` points;
* :func:`paired`: the paired differences a − b over the seeds both have, with a 95 % t interval
  (n − 1 degrees of freedom) and the sign count, in mIoU or mBIoU, overall or per class;
* :func:`compare_classes` and :func:`plot_class_differences`: the same per class;
* :func:`paired_curve` and :func:`plot_paired_curve`: the same at every evaluation along the
  runs (exploratory, outside the plan);
* :func:`verdict`: the plan's wording of an interval; :func:`idea_verdicts`: the verdict per
  idea of :data:`COMPARISONS` (any prototype loss, BRPG, its confidence split, APO) at every
  split;
* :func:`more_seeds`: the plan's rule for adding seeds to the primary comparisons;
* :func:`check_fp32` and :func:`warmup_identical`: what the plan asserts of the committed runs
  before comparing them; :func:`warmup_mismatch`: the same check on a run still training.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

BUDGET_LADDER = (2000, 3000, 4000, 6000, 8000)
#: The label fractions the calibration measures, smallest first (:func:`study_splits` picks
#: the study's two among them); preset suffixes, ``digits_<variant>_<split>``.
CALIBRATION_SPLITS = ("1_16", "1_8", "1_4")


@dataclass(frozen=True)
class Comparison:
    """One comparison of the plan: variant ``a`` − variant ``b`` (presets
    ``digits_<variant>_<split>``), the question it answers, the idea whose verdict it gives
    (chapter 8, the intro, the README) and whether it is a primary comparison (the ones that
    get seeds until the interval rule is met)."""

    a: str
    b: str
    question: str
    idea: str
    primary: bool


#: The plan's comparisons at a split, in the order chapter 8 lists them.
COMPARISONS: tuple[Comparison, ...] = (
    Comparison("meanteacher", "suponly", "does the mean teacher help at all",
               "the mean teacher (the framework BRPG plugs into)", False),
    Comparison("plainproto", "meanteacher", "does any prototype loss help",
               "any prototype loss", True),
    Comparison("brpg", "meanteacher", "does BRPG help", "BRPG as a whole", True),
    Comparison("brpg", "plainproto", "do BRPG's ideas add to plain prototypes",
               "BRPG's own ideas together (confidence split, several prototypes per class,"
               " APO)", True),
    Comparison("brpg", "brpg_nocpg", "the confidence split (CPG)",
               "the confidence split (CPG)", False),
    Comparison("brpg", "brpg_noapo", "APO", "APO", False),
)  # fmt: skip
METRICS = {"miou": ("val_miou", "per_class_iou"), "mbiou": ("val_mbiou", "per_class_biou")}


def choose_budget(
    final_miou: dict[int, float], ladder: tuple[int, ...] = BUDGET_LADDER, tol: float = 1.5
) -> dict[str, Any]:
    """The plan's budget rule on ``{steps: final val mIoU}`` of the mean teacher (seed 0).

    Returns ``{"budget", "flattened", "checks": [(B, 2B, |Δ|, within) ...], "missing"}``: the
    checks made in ladder order up to the first B that passes. ``budget`` is ``None`` while a
    run that the rule still needs is missing (``missing`` names the step counts to run). Once
    every smaller B has failed, the last B of the ladder is the budget whether or not it passes
    itself: ``flattened`` says whether its check passed (``None`` while its 2B run is missing).
    """
    checks: list[tuple[int, int, float, bool]] = []
    for b in ladder:
        missing = [s for s in (b, 2 * b) if s not in final_miou]
        if missing:
            if b == ladder[-1] and b not in missing:  # decided; only "flattened" is unknown
                return {"budget": b, "flattened": None, "checks": checks, "missing": missing}
            return {"budget": None, "flattened": None, "checks": checks, "missing": missing}
        gap = abs(final_miou[2 * b] - final_miou[b])
        checks.append((b, 2 * b, gap, gap <= tol))
        if gap <= tol:
            return {"budget": b, "flattened": True, "checks": checks, "missing": []}
    return {"budget": ladder[-1], "flattened": False, "checks": checks, "missing": []}


def study_splits(
    meanteacher: dict[str, float], suponly: dict[str, float], min_gain: float = 3.0, k: int = 2
) -> list[str]:
    """The ``k`` smallest label fractions (``"1_16"``, ``"1_8"``, …) where the mean teacher's
    mIoU is at least ``min_gain`` points above SupOnly's (the plan's study splits)."""

    def fraction(split: str) -> float:
        num, den = split.split("_")
        return int(num) / int(den)

    ok = [s for s in meanteacher if s in suponly and meanteacher[s] - suponly[s] >= min_gain]
    return sorted(ok, key=fraction)[:k]


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the ``level`` t interval of the mean, n − 1 degrees of freedom
    (``low`` and ``high`` are NaN for a single value: no interval)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if n == 1:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class Paired:
    """Paired differences a − b of one metric over the seeds both runs have."""

    a: str
    b: str
    metric: str
    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    mean: float
    low: float
    high: float
    wins: int  # seeds with a > b

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        """The 95 % interval lies wholly above or below zero (never with one seed: its
        interval is NaN, and NaN compares False)."""
        return self.low > 0 or self.high < 0

    @property
    def text(self) -> str:
        """The mean with its 95 % interval, as the study prints them: "+1.0 [−1.5, +3.6]"
        ("+0.5 no interval" with one seed)."""
        ci = "no interval" if self.n < 2 else f"[{signed(self.low)}, {signed(self.high)}]"
        return f"{signed(self.mean)} {ci}"


def runs_by_seed(dest: str | Path, config: str) -> dict[int, dict[str, Any]]:
    """``{seed: summary}`` of the committed runs of ``config`` under ``dest``."""
    out = {}
    for path in sorted(Path(dest).glob(f"{config}/seed*/summary.json")):
        s = json.loads(path.read_text())
        out[int(s["config"]["train"]["seed"])] = s
    return out


def run_log(dest: str | Path, config: str, seed: int) -> Path:
    """The ``log.jsonl`` of one run: ``<dest>/<config>/seed<k>/log.jsonl`` (the layout
    ``brpg seeds`` writes)."""
    return Path(dest) / config / f"seed{seed}" / "log.jsonl"


def apo_picks(dest: str | Path, config: str) -> dict[int, dict[int, int]]:
    """``{seed: {class: extra prototypes}}`` of the committed runs of ``config`` under
    ``dest`` that have finished (appendix: clustering and APO), read from the clustering event
    in each ``log.jsonl``: a class's prototypes beyond ``proto.num_high + proto.num_low``. The
    log gives per-class totals, not which memory kind the extra one came from. A class that
    ends with *fewer* than the base (an empty memory) is left out."""
    out: dict[int, dict[int, int]] = {}
    for seed, summary in runs_by_seed(dest, config).items():
        log = run_log(dest, config, seed)
        events = [
            rec["prototypes_per_class"]
            for line in log.read_text().splitlines()
            if "prototypes_per_class" in (rec := json.loads(line))
        ]
        if not events:
            raise ValueError(f"{log}: no clustering event (is {config} a BRPG run?)")
        proto = summary["config"]["proto"]
        base = int(proto["num_high"]) + int(proto["num_low"])
        out[seed] = {c: n - base for c, n in enumerate(events[0]) if n > base}
    return out


def paired(
    dest: str | Path,
    a: str,
    b: str,
    metric: str = "miou",
    cls: int | None = None,
    only: Iterable[int] | None = None,
) -> Paired:
    """Paired differences of ``metric`` (``"miou"`` or ``"mbiou"``; of class ``cls`` when
    given) between configs ``a`` and ``b`` under ``dest``, seeds paired; 95 % t interval.
    ``only`` restricts it to those seeds (a statement written when fewer runs were in)."""
    overall, per_class = METRICS[metric]
    ra, rb = runs_by_seed(dest, a), runs_by_seed(dest, b)
    common = set(ra) & set(rb) if only is None else set(ra) & set(rb) & set(only)
    seeds = tuple(sorted(common))
    if not seeds:
        raise ValueError(f"no seed has both {a} and {b} under {dest}")

    def value(s: dict[str, Any]) -> float:
        return float(s[overall] if cls is None else s[per_class][cls])

    return _paired(a, b, metric, seeds, tuple(value(ra[s]) - value(rb[s]) for s in seeds))


def _paired(
    a: str, b: str, metric: str, seeds: tuple[int, ...], diffs: tuple[float, ...]
) -> Paired:
    mean, low, high = t_interval(list(diffs))
    return Paired(a, b, metric, seeds, diffs, mean, low, high, sum(d > 0 for d in diffs))


PLANNED_SEEDS = 5  # seeds per comparison and stage (PLAN.md); fewer is a partial result


#: Step 4 of the plan: seeds are added to the primary comparisons of a split until each one's
#: 95 % interval of the mIoU difference is at most this many points wide on either side ...
MAX_HALF_WIDTH = 1.0
MAX_SEEDS = 10  # ... or this many seeds are in

#: Seeds given up at a split, with why: the plan's addendum of 2026-12-07 (PLAN.md). A seed's
#: runs pair only on one kind of CPU, and BRPG's seed 6 at 1/16 could only be trained on the
#: Xeon that trained that seed's other runs; no session had that Xeon by the time seeds 8 and
#: 9 were in, so BRPG's comparisons at 1/16 are reported over its other nine seeds. Passed to
#: :func:`more_seeds` by chapter 8 and by the test of the study's queue.
GIVEN_UP: dict[str, dict[int, str]] = {
    "1_16": {
        6: (
            "BRPG's run could pair only on the Xeon that trained the seed's other runs, "
            "and no session had that Xeon by the time seeds 8 and 9 were in (PLAN.md)"
        )
    },
}


def more_seeds(
    rows: list[dict[str, Any]], given_up: Mapping[int, str] | None = None
) -> tuple[int | None, str]:
    """Step 4 of the plan at one split (``rows``: :func:`compare_split`): the seed to add next
    to the variants of the primary comparisons, or ``None`` (the stage's planned seeds are not
    all in, the rule is met, or :data:`MAX_SEEDS` are in), with the reason in words.

    ``given_up`` maps a seed that will not be completed to why (the study's rule, decided
    before the runs: a seed whose runs cannot all be trained on one kind of CPU is reported
    without, not re-trained): it is never asked for, and it counts toward :data:`MAX_SEEDS`
    as a seed the plan has spent."""
    given_up = dict(given_up or {})
    primary = [r for r in rows if r["primary"]]
    n_primary = sum(c.primary for c in COMPARISONS)
    common = set.intersection(*(set(r["miou"].seeds) for r in primary)) if primary else set()
    if len(primary) < n_primary or len(common) < PLANNED_SEEDS:
        return None, f"the planned {PLANNED_SEEDS} seeds are not all in yet ({len(common)})"
    widths = ", ".join(f"{r['a']} − {r['b']} ±{r['miou'].half_width:.2f}" for r in primary)
    n = len(common)
    if all(r["miou"].half_width <= MAX_HALF_WIDTH for r in primary):
        return None, f"met with {n} seeds ({widths})"
    spent = common | {s for s in given_up if s < MAX_SEEDS}
    if len(spent) >= MAX_SEEDS:
        left_out = "".join(
            f"; seed {s} left out: {why}" for s, why in sorted(given_up.items()) if s not in common
        )
        return None, f"not met with {n} seeds ({widths}); the plan stops at {MAX_SEEDS}{left_out}"
    seed = min(set(range(MAX_SEEDS)) - spent)
    return seed, f"not met with {n} seeds ({widths}): seed {seed} next"


def signed(x: float, digits: int = 1) -> str:
    """``x`` with its sign, ``digits`` decimals and a typographic minus ("−1.5", "+3.6"), as
    the README and the book's prose write differences."""
    return f"{x:+.{digits}f}".replace("-", "−")


def _bound(x: float) -> str:
    """An interval bound in points, signed: one decimal, or two where one would read as 0.0
    (a bound of +0.01 makes "helps", and "+0.0 to +2.2" would look like it should not)."""
    return signed(x, 2 if 0 < abs(x) < 0.05 else 1)


def verdict(p: Paired) -> str:
    """The plan's wording: "helps" (interval above 0), "hurts" (below 0), else the interval;
    marked partial while the comparison has fewer than :data:`PLANNED_SEEDS` seeds."""
    if p.n < 2:
        return f"one seed only ({signed(p.mean)} points): no interval"
    partial = f" (partial: {p.n} of {PLANNED_SEEDS} seeds)" if p.n < PLANNED_SEEDS else ""
    if p.low > 0:
        return f"helps: {_bound(p.low)} to {_bound(p.high)} points{partial}"
    if p.high < 0:
        return f"hurts: {_bound(p.low)} to {_bound(p.high)} points{partial}"
    return f"no effect resolved: between {_bound(p.low)} and {_bound(p.high)} points{partial}"


def check_fp32(dest: str | Path) -> int:
    """Assert that every summary under ``dest`` was computed in fp32 on DigitScenes v3, and that
    all summaries that record a data fingerprint (runs from 2026-12-05 on) saw the same scenes;
    returns how many were read (the plan compares no run made in another precision or on other
    data)."""
    paths = sorted(Path(dest).rglob("summary.json"))
    prints: dict[str, Path] = {}
    for path in paths:
        s = json.loads(path.read_text())
        if s.get("amp_dtype") != "fp32" or s.get("dataset_version") != 3:
            raise AssertionError(
                f"{path}: amp_dtype={s.get('amp_dtype')!r}, dataset_version="
                f"{s.get('dataset_version')!r}; the study reads fp32 DigitScenes v3 runs only"
            )
        if s.get("data_fingerprint"):
            prints.setdefault(s["data_fingerprint"], path)
    if len(prints) > 1:
        raise AssertionError(f"runs saw different DigitScenes data: {prints}")
    return len(paths)


def logged_values(log: str | Path, until: int) -> dict[tuple[int, str], float]:
    """``{(step, key): value}`` of the numbers a run logged up to step ``until`` (training
    lines and evaluations; the one-off events, logged before a step runs, and wall times left
    out)."""
    out = {}
    for line in Path(log).read_text().splitlines():
        rec = json.loads(line)
        if "event" in rec or rec.get("step", 0) > until:
            continue
        for k, v in rec.items():
            if k not in ("step", "wall_s", "final") and isinstance(v, float | int):
                out[rec["step"], k] = float(v)
    return out


def _loss_sup(log: Path, until: int) -> dict[int, float]:
    return {s: v for (s, k), v in logged_values(log, until).items() if k == "loss_sup"}


#: The variants whose runs of one seed at one split are one run up to the end of the warm-up
#: (PLAN.md: the same labeled subset, data order, warm-up and teacher), checked by
#: :func:`warmup_identical`; SupOnly trains another loop and is not among them.
WARMUP_SHARED = ("meanteacher", "plainproto", "brpg", "brpg_nocpg", "brpg_noapo")


def warmup_siblings(preset: str) -> list[str]:
    """The presets whose runs share the warm-up of ``preset``'s (:data:`WARMUP_SHARED` at its
    split), itself left out; ``[]`` for a preset outside them (SupOnly, a calibration split)."""
    variant, _, split = preset.removeprefix("digits_").rpartition("_1_")
    if variant not in WARMUP_SHARED or not split.isdigit():
        return []
    return [variant_preset(v, f"1_{split}") for v in WARMUP_SHARED if v != variant]


def warmup_mismatch(
    log: str | Path, dest: str | Path, preset: str, seed: int, until: int = 500
) -> str | None:
    """Why a run of ``preset`` with ``seed`` that is logging to ``log`` (in progress: a torn
    last line is skipped) cannot be paired with the runs of its seed under ``dest``: the first
    ``loss_sup`` it logged at a step ``≤ until`` that differs from a :func:`warmup_siblings`
    run's at that step, e.g. because another kind of CPU rounds its fp32 kernels differently.
    ``None`` while they agree or there is nothing to compare yet."""
    mine: dict[int, float] = {}
    for line in Path(log).read_text().splitlines() if Path(log).exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written
        if "loss_sup" in rec and "event" not in rec and rec["step"] <= until:
            mine[int(rec["step"])] = float(rec["loss_sup"])
    for sibling in warmup_siblings(preset):
        other = run_log(dest, sibling, seed)
        if not other.exists():
            continue
        theirs = _loss_sup(other, until)
        for step in sorted(set(mine) & set(theirs)):
            if mine[step] != theirs[step]:
                return (
                    f"loss_sup at step {step} is {mine[step]!r} here and {theirs[step]!r} in"
                    f" {other}"
                )
    return None


def warmup_identical(dest: str | Path, configs: list[str], seed: int, until: int = 500) -> bool:
    """True if every config's run of ``seed`` logged the same ``loss_sup`` at every logged step
    ``≤ until`` (the plan's check that paired runs share weights, data and draws up to the
    point where the variants differ); configs without that seed are skipped."""
    logs = [run_log(dest, c, seed) for c in configs]
    losses = [_loss_sup(p, until) for p in logs if p.exists()]
    if len(losses) < 2:
        return True
    if not losses[0]:
        raise ValueError(f"no loss_sup logged at steps <= {until} in {logs[0]}")
    return all(x == losses[0] for x in losses[1:])


def val_curve(log: str | Path) -> list[tuple[int, float, float]]:
    """``[(step, val mIoU, val mBIoU)]`` of the evaluations a run logged (every
    ``train.eval_every`` steps and the final one)."""
    out = []
    for line in Path(log).read_text().splitlines():
        r = json.loads(line)
        if "val_miou" in r:
            out.append((int(r["step"]), float(r["val_miou"]), float(r.get("val_mbiou", math.nan))))
    return out


def paired_curve(
    dest: str | Path, split: str, a: str, b: str, metric: str = "miou"
) -> list[tuple[int, Paired]]:
    """The paired difference a − b at every evaluation step along the runs (:func:`val_curve`
    of each seed's ``log.jsonl``), over the seeds both variants have, at the steps all of them
    logged: ``[(step, Paired)]`` in step order. Not part of the plan's analysis: it shows
    whether a difference at the budget is stable or still moving. Each run's learning rate
    decays to zero at its last step, so a point at step s is not what a budget of s steps
    would give."""
    pa, pb = variant_preset(a, split), variant_preset(b, split)
    seeds = tuple(sorted(set(runs_by_seed(dest, pa)) & set(runs_by_seed(dest, pb))))
    if not seeds:
        raise ValueError(f"no seed has both {pa} and {pb} under {dest}")
    k = {"miou": 1, "mbiou": 2}[metric]

    def curve(preset: str, seed: int) -> dict[int, float]:
        return {c[0]: c[k] for c in val_curve(run_log(dest, preset, seed))}

    pairs = {s: (curve(pa, s), curve(pb, s)) for s in seeds}
    steps = sorted(set.intersection(*(set(ca) & set(cb) for ca, cb in pairs.values())))
    return [
        (
            step,
            _paired(a, b, metric, seeds, tuple(ca[step] - cb[step] for ca, cb in pairs.values())),
        )
        for step in steps
    ]


def late_gain(dest: str | Path, config: str, start: int, end: int) -> float | None:
    """Mean val mIoU gained from step ``start`` to step ``end`` over the finished runs of
    ``config`` (read from their logged evaluations): how much the runs still improve near
    their budget. ``None`` if no run has finished."""
    gains = []
    for seed in runs_by_seed(dest, config):
        log = run_log(dest, config, seed)
        miou_at = {c[0]: c[1] for c in val_curve(log)}
        if missing := {start, end} - set(miou_at):
            raise ValueError(f"{log}: no evaluation at step(s) {sorted(missing)}")
        gains.append(miou_at[end] - miou_at[start])
    return sum(gains) / len(gains) if gains else None


def plot_paired_curve(curve: list[tuple[int, Paired]], ax: Any, label: str, color: str) -> None:
    """:func:`paired_curve` on ``ax``: the mean paired difference against the step, its 95 %
    t interval as a band, zero as a line."""
    steps = [s for s, _ in curve]
    ax.plot(steps, [p.mean for _, p in curve], "-", color=color, label=label)
    ax.fill_between(steps, [p.low for _, p in curve], [p.high for _, p in curve], color=color,
                    alpha=0.15, lw=0)  # fmt: skip
    ax.axhline(0, color="k", lw=0.8)
    ax.grid(alpha=0.3)


def budget_runs(budget_dir: str | Path, config: str, seed: int = 0) -> dict[int, dict[str, Any]]:
    """``{steps: summary}`` of the budget calibration's runs of ``config`` (folders
    ``steps<N>/<config>/seed<k>``)."""
    out = {}
    for path in sorted(Path(budget_dir).glob(f"steps*/{config}/seed{seed}/summary.json")):
        s = json.loads(path.read_text())
        out[int(s["steps"])] = s
    return out


def variant_preset(variant: str, split: str) -> str:
    """``digits_<variant>_<split>``, e.g. ``variant_preset("brpg_nocpg", "1_8")``."""
    return f"digits_{variant}_{split}"


def compare_split(dest: str | Path, split: str) -> list[dict[str, Any]]:
    """Every comparison of :data:`COMPARISONS` at ``split`` that has runs of both variants:
    ``{"a", "b", "question", "primary", "miou": Paired, "mbiou": Paired}``."""
    out = []
    for c in COMPARISONS:
        pa, pb = variant_preset(c.a, split), variant_preset(c.b, split)
        if not (set(runs_by_seed(dest, pa)) & set(runs_by_seed(dest, pb))):
            continue
        out.append(
            {
                "a": c.a,
                "b": c.b,
                "question": c.question,
                "primary": c.primary,
                "miou": paired(dest, pa, pb, "miou"),
                "mbiou": paired(dest, pa, pb, "mbiou"),
            }
        )
    return out


def compare_classes(dest: str | Path, split: str, a: str, b: str, metric: str) -> list[Paired]:
    """:func:`paired` of variants ``a`` − ``b`` at ``split``, one per class (class ``c`` of the
    summaries' ``per_class_iou`` / ``per_class_biou``), in class order."""
    pa, pb = variant_preset(a, split), variant_preset(b, split)
    runs = runs_by_seed(dest, pa)
    if not runs:
        raise ValueError(f"no committed run of {pa} under {dest}")
    num_classes = len(next(iter(runs.values()))[METRICS[metric][1]])
    return [paired(dest, pa, pb, metric, cls=c) for c in range(num_classes)]


def plot_class_differences(
    per_class: list[Paired], ax: Any, class_names: list[str], title: str = ""
) -> None:
    """One comparison's per-class paired differences (:func:`compare_classes`) on ``ax``:
    every seed's as a dot, the mean and its 95 % t interval as a bar (red where the
    interval excludes zero), zero as a line."""
    for x, p in enumerate(per_class):
        ax.plot([x] * p.n, p.diffs, "o", color="0.6", ms=3, zorder=2)
        if p.n >= 2 and not math.isnan(p.low):
            ax.errorbar(x, p.mean, yerr=[[p.mean - p.low], [p.high - p.mean]], fmt="D", ms=4,
                        color="C3" if p.excludes_zero else "C0", capsize=3, zorder=3)  # fmt: skip
        else:
            ax.plot(x, p.mean, "D", ms=4, color="C0", zorder=3)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(per_class)), class_names, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9, loc="left")


def format_comparisons(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`compare_split`: per comparison, n, the mean paired
    difference with its 95 % interval and the sign count, in mIoU and in mBIoU."""
    lines = [
        "| a − b | question | seeds | mIoU: mean [95 % CI], a ahead | mBIoU: mean [95 % CI], a ahead |",
        "|---|---|---|---|---|",
    ]

    def cell(p: Paired) -> str:
        return f"{p.text}, {p.wins} of {p.n}"

    for r in rows:
        star = " (primary)" if r["primary"] else ""
        lines.append(
            f"| {r['a']} − {r['b']} | {r['question']}{star} | {r['miou'].n} | {cell(r['miou'])} "
            f"| {cell(r['mbiou'])} |"
        )
    return "\n".join(lines)


def idea_verdicts(rows_by_split: dict[str, list[dict[str, Any]]]) -> str:
    """The verdict per idea of :data:`COMPARISONS`, in plain words: a Markdown list with, for
    each idea, its comparison and, per split of ``rows_by_split`` (``{"1_16": compare_split(...)}``),
    :func:`verdict` in mIoU and in mBIoU, or that the split has no runs of it yet."""
    lines = []
    for c in COMPARISONS:
        parts = []
        for split, rows in rows_by_split.items():
            at = f"at {split.replace('_', '/')}"
            row = next((r for r in rows if (r["a"], r["b"]) == (c.a, c.b)), None)
            if row is None:
                parts.append(f"{at}, no paired runs yet")
            else:
                parts.append(f"{at}, mIoU {verdict(row['miou'])}; mBIoU {verdict(row['mbiou'])}")
        where = "; ".join(parts) if parts else "no study split yet"
        lines.append(f"* **{c.idea}** ({c.a} − {c.b}): {where}.")
    return "\n".join(lines)


def plot_comparisons(rows: list[dict[str, Any]], axes: Any, title: str = "") -> None:
    """One row per comparison of :func:`compare_split`, one panel per metric (``axes[0]``:
    mIoU, ``axes[1]``: mBIoU): every seed's paired difference as a dot, the mean and its
    95 % t interval as a bar, and zero as a line."""
    labels = [f"{r['a']} − {r['b']}" for r in rows]
    for ax, metric in zip(axes, ("miou", "mbiou"), strict=True):
        for y, r in enumerate(rows):
            p: Paired = r[metric]
            ax.plot(p.diffs, [y] * p.n, "o", color="0.6", ms=4, zorder=2)
            if p.n >= 2:
                ax.errorbar(p.mean, y, xerr=[[p.mean - p.low], [p.high - p.mean]], fmt="D",
                            color="C3" if r["primary"] else "C0", capsize=4, zorder=3)  # fmt: skip
            else:
                ax.plot(p.mean, y, "D", color="C0", zorder=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel(f"paired difference, {'mIoU' if metric == 'miou' else 'mBIoU'} (points)")
        ax.grid(axis="x", alpha=0.3)
    # labels once, on the left panel: with sharey=True the panels share one tick formatter, so
    # blank labels set on the right panel would blank the left one's too
    axes[0].set_yticks(range(len(rows)), labels)
    axes[0].set_ylim(len(rows) - 0.5, -0.5)  # first comparison on top
    axes[1].tick_params(labelleft=False)
    if title:
        axes[0].set_title(title, fontsize=9, loc="left")
