"""The study's numbers written by hand in the README (prose and tables), the intro and chapter
8's summary are the committed runs'.

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
    "CPG off": "brpg_nocpg",
    "APO off": "brpg_noapo",
}
#: the variants of stages 1 and 2, which the README's table of per-seed scores must all have
PRIMARY = ("BRPG", "plain prototypes", "mean teacher", "SupOnly")
#: what a per-seed cell says for a split whose runs are not all in yet
RUNNING = "running"
_NUM = r"([+−-]\d+\.\d)"
_NAME = "|".join(VARIANTS)
#: the seeds a statement names: "0–4", or ranges and single seeds joined by ", " or " and " when a
#: variant lacks a seed ("0–5 and 7–9"); a following "5 of 5" is a sign count, not a seed
_SEEDS = r"(\d+(?:–\d+)?(?:(?:,\s+|\s+and\s+)\d+(?:–\d+)?(?![\d–]|\s+of\b))*)"
#: "BRPG − mean teacher **+7.2 [+4.1, +10.4]** (mBIoU +5.5 [+3.3, +7.8]) at 1/16, seeds 0–3"
STATEMENT = re.compile(
    rf"({_NAME})\s+−\s+({_NAME})\s+\*\*{_NUM} \[{_NUM},\s+{_NUM}\]\*\*\s+\(mBIoU\s+{_NUM}\s+"
    rf"\[{_NUM},\s+{_NUM}\]\)\s+at\s+1/(\d+),\s+seeds\s+{_SEEDS}"
)


def _num(s: str) -> float:
    return float(s.replace("−", "-"))


def seed_list(spec: str) -> tuple[int, ...]:
    """The seeds of a :data:`_SEEDS` match: ``"0–5 and 7–9"`` → ``(0, 1, 2, 3, 4, 5, 7, 8, 9)``."""
    out: list[int] = []
    for part in re.split(r",\s+|\s+and\s+", spec.strip()):
        first, _, last = part.partition("–")
        out += range(int(first), int(last or first) + 1)
    return tuple(out)


#: a table cell "**+6.8 [+3.3, +10.2]** (mBIoU +5.2 [+2.4, +8.0]), 5 of 5" under a header cell
#: "at 1/16, seeds 0–4", in a row headed "BRPG − mean teacher"; a cell over fewer seeds than its
#: header names says which: "…, 9 of 9 (seeds 0–5 and 7–9)"
CELL = re.compile(
    rf"\*\*{_NUM} \[{_NUM},\s+{_NUM}\]\*\*\s+\(mBIoU\s+{_NUM}\s+\[{_NUM},\s+{_NUM}\]\),"
    rf"\s+(\d+) of (\d+)(?:\s+\(seeds {_SEEDS}\))?"
)
HEAD = re.compile(rf"1/(\d+), seeds {_SEEDS}")


def md_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in ``text`` as rows of stripped cells, the header row first and the
    ``|---|`` line left out."""
    tables: list[list[list[str]]] = []
    rows: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif rows:
            tables.append(rows)
            rows = []
    return tables


def table_statements(text: str) -> list[tuple[str, ...]]:
    """The paired differences stated in tables: ``(a, b, six numbers, denominator, seeds, wins,
    n)`` for each cell that :data:`CELL` reads (``seeds`` as written, e.g. ``"0–4"``)."""
    out = []
    for header, *rows in md_tables(text):
        for row in rows:
            pair = re.fullmatch(rf"({_NAME}) − ({_NAME})", row[0])
            for head, cell in zip(header[1:], row[1:], strict=True):
                m, h = CELL.fullmatch(cell), HEAD.search(head)
                if pair and m and h:
                    denom, seeds = h.groups()
                    own = m.group(9)  # the cell's own seeds, where it names them
                    out.append((*pair.groups(), *m.groups()[:6], denom, own or seeds,
                                *m.groups()[6:8]))  # fmt: skip
    return out


def statements(text: str) -> list[tuple[str | None, ...]]:
    """Every paired difference stated in ``text``, in prose or in a table, as
    ``(a, b, six numbers, denominator, seeds, wins, n)``; prose states no sign
    count, so its ``wins`` and ``n`` are ``None``."""
    prose_ = [(*m.groups(), None, None) for m in STATEMENT.finditer(text)]
    return prose_ + table_statements(text)


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
                      "16", "0–2", None, None)  # fmt: skip
    assert got[1][:3] == ("plain prototypes", "SupOnly", "−0.3") and got[1][8:] == (
        "8", "0–4", None, None)  # fmt: skip


def test_a_statement_may_name_seeds_with_a_gap():
    """A variant that lacks a seed is stated over the seeds it has; the sign count after the
    seeds is not read as one."""
    text = (
        "BRPG − mean teacher **+6.2 [+3.8, +8.6]** (mBIoU +4.8 [+2.9, +6.7]) at 1/16, seeds"
        " 0–5 and 7–9, 9 of 9; BRPG − SupOnly **+1.0 [+0.1, +2.0]** (mBIoU +1.0 [+0.1, +2.0])"
        " at 1/8, seeds 0, 2, 5–6, 5 of 5"
    )
    assert [st[8:10] for st in statements(text)] == [("16", "0–5 and 7–9"), ("8", "0, 2, 5–6")]
    assert seed_list("0–5 and 7–9") == (0, 1, 2, 3, 4, 5, 7, 8, 9)
    assert seed_list("0, 2, 5–6") == (0, 2, 5, 6)
    assert seed_list("3") == (3,)
    head = "at 1/16, seeds 0–5, 7"
    assert HEAD.search(head).groups() == ("16", "0–5, 7")


def test_the_table_reader_reads_a_hand_written_table():
    text = (
        "| a − b | at 1/16, seeds 0–4 | at 1/8, seeds 0–2 |\n|---|---|---|\n"
        "| BRPG − mean teacher | **+6.8 [+3.3, +10.2]** (mBIoU +5.2 [+2.4, +8.0]), 5 of 5 "
        "| **−0.4 [−1.3, +0.2]** (mBIoU +0.2 [−0.2, +0.7]), 1 of 3 |\n"
        "| BRPG − APO off | **+1.0 [−1.5, +3.6]** (mBIoU +0.8 [−1.1, +2.6]), 4 of 5 | running |\n"
        "| BRPG − SupOnly | **+2.0 [+1.0, +3.0]** (mBIoU +1.0 [+0.5, +1.5]), 4 of 4 (seeds 0–2 and"
        " 4) | — |\n"
        "| note | not a statement | — |\n\nafter the table"
    )
    assert md_tables(text)[0][4] == ["note", "not a statement", "—"]
    got = table_statements(text)
    assert got == [
        ("BRPG", "mean teacher", "+6.8", "+3.3", "+10.2", "+5.2", "+2.4", "+8.0", "16", "0–4",
         "5", "5"),
        ("BRPG", "mean teacher", "−0.4", "−1.3", "+0.2", "+0.2", "−0.2", "+0.7", "8", "0–2",
         "1", "3"),
        ("BRPG", "APO off", "+1.0", "−1.5", "+3.6", "+0.8", "−1.1", "+2.6", "16", "0–4",
         "4", "5"),
        ("BRPG", "SupOnly", "+2.0", "+1.0", "+3.0", "+1.0", "+0.5", "+1.5", "16", "0–2 and 4",
         "4", "4"),
    ]  # fmt: skip
    assert statements(text) == got


@pytest.mark.parametrize(
    "doc, in_tables",
    [("README.md", 6), ("book/intro.md", 0), ("book/08_putting_it_together.ipynb", 0)],
)
def test_stated_paired_differences_are_the_committed_runs(doc: str, in_tables: int):
    """Each stated paired difference (mean and interval, mIoU and mBIoU) and, where a table
    gives it, the sign count ("5 of 5": on how many of its seeds a was ahead in mIoU)."""
    found = statements(prose(doc))
    # a rewording that the pattern no longer reads must fail here, not check nothing
    assert len(found) >= 3, f"{doc}: expected the three primary comparisons, found {found}"
    tabled = sum(wins is not None for *_, wins, _ in found)
    assert tabled >= in_tables, f"{doc}: expected both splits' primary comparisons in a table"
    for a, b, *nums, denom, spec, wins, n in found:
        split = f"1_{denom}"
        pa, pb = (study.variant_preset(VARIANTS[v], split) for v in (a, b))
        seeds = seed_list(spec)
        want = []
        for metric in ("miou", "mbiou"):
            p = study.paired(STUDY, pa, pb, metric, only=seeds)
            assert p.seeds == tuple(seeds), f"{doc}: {a} − {b}: seeds {p.seeds} committed"
            want += [round(p.mean, 1), round(p.low, 1), round(p.high, 1)]
            if metric == "miou" and wins is not None:
                assert (int(wins), int(n)) == (p.wins, p.n), f"{doc}: {a} − {b} at 1/{denom}"
        stated = [_num(x) for x in nums]
        assert stated == pytest.approx(want, abs=0.051), f"{doc}: {a} − {b} at 1/{denom}"


#: a header cell "1/16, seeds 0, 1, 2, 3, 4" over one variant's scores "51.4, 49.2, 39.9, …"
SEED_HEAD = re.compile(r"1/(\d+), seeds ((?:\d+, )*\d+)")


def test_readme_per_seed_scores_are_the_committed_runs():
    """The README's table of final scores (one column per split): each variant's scores, in the
    order of the seeds its column names, "—" for a seed the variant has no run of (the whole
    cell "—" when it has none of them); a stage-3 variant's cell may say "running" instead."""
    tables = [t for t in md_tables((ROOT / "README.md").read_text()) if t[0][0] == "variant"]
    assert tables, "README.md: the table of per-seed scores is missing"
    header, *rows = tables[0]
    columns = [(i, m) for i, h in enumerate(header) if (m := SEED_HEAD.fullmatch(h))]
    # a rewording that the pattern no longer reads must fail here, not check nothing
    assert {m.group(1) for _, m in columns} >= {"16", "8"}, header
    assert set(PRIMARY) <= {row[0] for row in rows} <= set(VARIANTS), rows
    for i, m in columns:
        split, seeds = f"1_{m.group(1)}", [int(x) for x in m.group(2).split(", ")]
        for row in rows:
            if row[i] == RUNNING and row[0] not in PRIMARY:
                continue
            runs = study.runs_by_seed(STUDY, study.variant_preset(VARIANTS[row[0]], split))
            if row[i] == "—":  # a variant the rule for adding seeds did not train on these
                assert not set(runs) & set(seeds), (split, row[0], "has runs of", seeds)
                continue
            stated = [None if v == "—" else float(v) for v in row[i].split(", ")]
            want = [round(runs[s]["val_miou"], 1) if s in runs else None for s in seeds]
            assert stated == want, (split, row[0])


def test_readme_budget_check_is_the_committed_runs():
    """The README's "a 16,000-step run of the mean teacher at 1/8, seed 0, ends 3.3 points
    higher, 66.4 against 63.2 % mIoU": the longer run's and the budget's final mIoU and their
    difference, from the calibration's committed runs."""
    text = re.sub(r"\s+", " ", (ROOT / "README.md").read_text())
    m = re.search(
        r"a ([\d,]+)-step run of the mean teacher at 1/8, seed 0, ends (\d+\.\d) points higher,"
        r" (\d+\.\d) against (\d+\.\d) % mIoU",
        text,
    )
    assert m, "README.md: the budget's check against a longer run is missing"
    runs = study.budget_runs(ROOT / "results" / "digits_v3" / "budget", "digits_meanteacher_1_8")
    long_steps = int(m.group(1).replace(",", ""))
    budget = study.choose_budget({s: r["val_miou"] for s, r in runs.items()})["budget"]
    assert long_steps == 2 * budget
    long, short = runs[long_steps]["val_miou"], runs[budget]["val_miou"]
    stated = [float(x) for x in m.groups()[1:]]
    assert stated == [round(long - short, 1), round(long, 1), round(short, 1)]
