"""The book's paired notebooks: every chapter has both files, in sync, with current Colab links."""

from pathlib import Path

import jupytext
import pytest
import yaml

from brpg import booktools

ROOT = Path(__file__).resolve().parents[1]
PAIRS = booktools.chapter_pairs(ROOT)


def test_there_are_chapters():
    assert PAIRS, "no chapters found under book/"


@pytest.mark.parametrize("py,nb", PAIRS, ids=[p.stem for p, _ in PAIRS])
def test_pair_in_sync(py, nb):
    """`jupytext --sync` would change nothing: the .ipynb's inputs render to exactly the .py."""
    assert nb.exists(), f"{nb.name} is missing: run `jupytext --sync {py}`"
    rendered = jupytext.writes(jupytext.read(nb), fmt="py:percent")
    assert rendered == py.read_text(), (
        f"{py.name} and {nb.name} differ: edit the .py, then run `jupytext --sync {py}` and"
        " re-execute the notebook"
    )


@pytest.mark.parametrize("py,nb", PAIRS, ids=[p.stem for p, _ in PAIRS])
def test_notebook_is_executed(py, nb):
    """Committed notebooks carry their outputs (readers on GitHub/Colab see results)."""
    book = jupytext.read(nb)
    code = [c for c in book.cells if c.cell_type == "code" and c.source.strip()]
    assert code and all(c.get("execution_count") for c in code), f"{nb.name} is not executed"


def test_colab_links_follow_config():
    assert booktools.problems(ROOT) == []


def test_every_chapter_is_in_the_toc():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = {toc["root"]}
    for part in toc.get("parts", []):
        files |= {c["file"] for c in part["chapters"]}
    for py, _ in PAIRS:
        assert py.relative_to(ROOT).with_suffix("").as_posix() in files, f"{py.name} not in _toc"
