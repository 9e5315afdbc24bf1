"""The study's numbers written by hand in the README, the intro and chapter 8's summary are the
committed runs'.

Machine: exact. Reads the committed summaries (JSON) under results/digits_v3/study and the
text of README.md, book/intro.md and chapter 8's Markdown cells; no training.

Each statement names the seeds it was written with ("seeds 0–3"), so that a run landing later
does not make it wrong, only older; the test recomputes that paired difference from those
seeds' summaries. A typo, a number copied from the wrong row or a stale interval fails it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from brpg.book import study

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "results" / "digits_v3" / "study"
VARIANTS = {
    "BRPG": "brpg",
    "plain prototypes": "plainproto",
    "mean teacher": "meanteacher",
    "SupOnly": "suponly",
}
_NUM = r"([+−-]\d+\.\d)"
_NAME = "|".join(VARIANTS)
#: "BRPG − mean teacher **+7.2 [+4.1, +10.4]** (mBIoU +5.5 [+3.3, +7.8]) at 1/16, seeds 0–3"
STATEMENT = re.compile(
    rf"({_NAME})\s+−\s+({_NAME})\s+\*\*{_NUM} \[{_NUM},\s+{_NUM}\]\*\*\s+\(mBIoU\s+{_NUM}\s+"
    rf"\[{_NUM},\s+{_NUM}\]\)\s+at\s+1/(\d+),\s+seeds\s+(\d+)–(\d+)"
)


def _num(s: str) -> float:
    return float(s.replace("−", "-"))


def statements(text: str) -> list[tuple[str, ...]]:
    return [m.groups() for m in STATEMENT.finditer(text)]


def prose(doc: str) -> str:
    """The text a reader sees: a Markdown page as it is, a notebook's Markdown cells."""
    path = ROOT / doc
    if path.suffix != ".ipynb":
        return path.read_text()
    cells = json.loads(path.read_text())["cells"]
    return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def test_the_pattern_reads_a_hand_written_statement():
    text = (
        "paired: BRPG − mean teacher **+7.2 [+4.1, +10.4]** (mBIoU +5.5\n[+3.3, +7.8]) at"
        " 1/16, seeds 0–2; plain prototypes − SupOnly **−0.3 [−1.0, +0.4]** (mBIoU −0.1"
        " [−0.9, +0.7]) at 1/8, seeds 0–4"
    )
    got = statements(text)
    assert got[0] == ("BRPG", "mean teacher", "+7.2", "+4.1", "+10.4", "+5.5", "+3.3", "+7.8",
                      "16", "0", "2")  # fmt: skip
    assert got[1][:3] == ("plain prototypes", "SupOnly", "−0.3") and got[1][-3:] == ("8", "0", "4")


@pytest.mark.parametrize("doc", ["README.md", "book/intro.md", "book/08_putting_it_together.ipynb"])
def test_stated_paired_differences_are_the_committed_runs(doc: str):
    found = statements(prose(doc))
    # a rewording that the pattern no longer reads must fail here, not check nothing
    assert len(found) >= 3, f"{doc}: expected the three primary comparisons, found {found}"
    for a, b, *nums, denom, first, last in found:
        split = f"1_{denom}"
        pa, pb = (study.variant_preset(VARIANTS[v], split) for v in (a, b))
        seeds = range(int(first), int(last) + 1)
        want = []
        for metric in ("miou", "mbiou"):
            p = study.paired(STUDY, pa, pb, metric, only=seeds)
            assert p.seeds == tuple(seeds), f"{doc}: {a} − {b}: seeds {p.seeds} committed"
            want += [round(p.mean, 1), round(p.low, 1), round(p.high, 1)]
        stated = [_num(x) for x in nums]
        assert stated == pytest.approx(want, abs=0.051), f"{doc}: {a} − {b} at 1/{denom}"


#: "(1/16, % val mIoU by seed 0, 1, 2, 3): BRPG 51.4, 49.2, 39.9, 37.0; plain prototypes …"
PER_SEED = re.compile(
    r"\(1/(\d+),\s+%\s+val\s+mIoU\s+by\s+seed\s+([\d,\s]+)\):(.*?)\(each\s+seed", re.S
)


def test_readme_per_seed_scores_are_the_committed_runs():
    """Every per-seed list of the README (one per split): each variant's scores, in the order
    of the seeds the list names."""
    found = list(PER_SEED.finditer((ROOT / "README.md").read_text()))
    # a rewording that the pattern no longer reads must fail here, not check nothing
    assert {m.group(1) for m in found} >= {"16", "8"}, "README.md: a per-seed list is missing"
    for m in found:
        split, seeds = f"1_{m.group(1)}", [int(s) for s in m.group(2).split(",")]
        rows = re.findall(r"(?:the )?(" + _NAME + r") ((?:\d+\.\d(?:,\s+)?)+)", m.group(3))
        assert {name for name, _ in rows} == set(VARIANTS), (split, rows)
        for name, values in rows:
            runs = study.runs_by_seed(STUDY, study.variant_preset(VARIANTS[name], split))
            stated = [float(v) for v in re.split(r",\s+", values)]
            assert stated == [round(runs[s]["val_miou"], 1) for s in seeds], (split, name)


def test_intro_per_seed_scores_are_the_committed_runs():
    """The intro's "(51.4, 49.2, 39.9 and 37.0 % mIoU against 43.3, …)": BRPG's and the mean
    teacher's final mIoU at 1/16 for the seeds its statements name (seeds 0, 1, … in order)."""
    text = (ROOT / "book" / "intro.md").read_text()
    m = re.search(r"\(([\d.,\sand]+) % mIoU\s+against\s+([\d.,\sand]+) %\)", text)
    assert m, "book/intro.md: the per-seed scores of BRPG and the mean teacher are missing"
    for name, values in zip(("BRPG", "mean teacher"), m.groups(), strict=True):
        stated = [float(v) for v in re.split(r",\s+|\s+and\s+", values.strip())]
        runs = study.runs_by_seed(STUDY, study.variant_preset(VARIANTS[name], "1_16"))
        assert stated == [round(runs[s]["val_miou"], 1) for s in range(len(stated))], name
