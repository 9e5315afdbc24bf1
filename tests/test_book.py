"""The book's paired notebooks: every chapter has both files, in sync, with current Colab links.

Machine: exact. Notebook text, links and the table of contents.
"""

import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import jupytext
import pytest
import yaml

from brpg.book import tools as booktools

ROOT = Path(__file__).resolve().parents[1]
PAIRS = booktools.chapter_pairs(ROOT)

# The header's `jupytext_version:` line records which jupytext last wrote the file: a newer
# jupytext in CI (1.19.6 here, 1.19.7 there) renders another number for the same notebook.
# The test is about the cells, so the comparison leaves that line out.
_JUPYTEXT_VERSION = re.compile(r"^#\s+jupytext_version: .*$", re.MULTILINE)


def _without_jupytext_version(text: str) -> str:
    return _JUPYTEXT_VERSION.sub("#       jupytext_version: <any>", text)


def test_there_are_chapters():
    assert PAIRS, "no chapters found under book/"


@pytest.mark.parametrize("py,nb", PAIRS, ids=[p.stem for p, _ in PAIRS])
def test_pair_in_sync(py, nb):
    """`jupytext --sync` would change nothing: the .ipynb's inputs render to exactly the .py."""
    assert nb.exists(), f"{nb.name} is missing: run `jupytext --sync {py}`"
    rendered = jupytext.writes(jupytext.read(nb), fmt="py:percent")
    assert _without_jupytext_version(rendered) == _without_jupytext_version(py.read_text()), (
        f"{py.name} and {nb.name} differ: edit the .py, then run `jupytext --sync {py}` and"
        " re-execute the notebook"
    )


@pytest.mark.parametrize("py,nb", PAIRS, ids=[p.stem for p, _ in PAIRS])
def test_notebook_is_executed(py, nb):
    """Committed notebooks carry their outputs (readers on GitHub/Colab see results)."""
    book = jupytext.read(nb)
    code = [c for c in book.cells if c.cell_type == "code" and c.source.strip()]
    assert code and all(c.get("execution_count") for c in code), f"{nb.name} is not executed"


@pytest.mark.parametrize("py,nb", PAIRS, ids=[p.stem for p, _ in PAIRS])
def test_colab_links_follow_config(py, nb):
    """Badge (local image, link from ``_config.yml``) and install cell (current URL, tagged
    ``remove-cell``) as ``python -m brpg.book.tools stamp`` writes them."""
    assert booktools.chapter_problems(py, nb, ROOT) == []


@pytest.mark.parametrize("py,nb", PAIRS, ids=[p.stem for p, _ in PAIRS])
def test_no_markdown_line_starts_with_a_percent_sign(py, nb):
    """MyST reads a line that starts with ``%`` as a comment and drops it from the page (a
    wrapped "(79 %)" lost a sentence of chapter 6 this way): wrap the text elsewhere."""
    book = jupytext.read(nb)
    dropped = [
        line
        for cell in book.cells
        if cell.cell_type == "markdown"
        for line in cell.source.splitlines()
        if line.lstrip().startswith("%")
    ]
    assert dropped == [], f"{py.name}: these lines would not be rendered: {dropped}"


#: the characters a code box shows in the rendered book before its lines scroll sideways
#: (measured in headless Chromium at a 1400-pixel window: ~86); book/ruff.toml formats to 84
CODE_WIDTH = 84
#: a Markdown fence: its marker and info string (```` ```bash ````, ```` ```{warning} ````)
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*(\S*)")


def fenced_code(text: str) -> list[str]:
    """The lines of ``text``'s fenced code blocks (```` ```bash ````, ```` ```{code-block} ````);
    another MyST directive (```` ```{warning} ````) is prose, so its own lines are left out (a
    code block inside it is read)."""
    lines, open_fences = [], []  # open_fences: (marker, is code) of each fence not yet closed
    for line in text.splitlines():
        if m := _FENCE.match(line):
            marker, info = m.groups()
            if open_fences and marker == open_fences[-1][0] and not info:
                open_fences.pop()
            else:
                open_fences.append((marker, not info.startswith("{") or info.startswith("{code")))
        elif open_fences and open_fences[-1][1]:
            lines.append(line)
    return lines


def _too_long(lines: list[str]) -> list[str]:
    return [f"{len(line)}: {line.strip()[:60]}" for line in lines if len(line) > CODE_WIDTH]


def test_fenced_code_reads_code_blocks_not_directives():
    text = (
        "prose\n```{warning}\nprose in a box\n```bash\nmake test\n```\nmore prose\n```\n"
        "~~~\nplain block\n~~~\n````{note}\n```python\nx = 1\n```\n````\nend\n"
        "```{code-block} python\ny = 2\n```"
    )
    assert fenced_code(text) == ["make test", "plain block", "x = 1", "y = 2"]


@pytest.mark.parametrize("py,nb", PAIRS, ids=[p.stem for p, _ in PAIRS])
def test_code_lines_fit_the_rendered_box(py, nb):
    """Every line of a code cell (comments and strings too, which the formatter does not wrap)
    and of a code block in a Markdown cell fits the rendered code box, so that no reader
    scrolls sideways to read the end of a line."""
    book = jupytext.read(nb)
    code = [line for c in book.cells if c.cell_type == "code" for line in c.source.splitlines()]
    md = [line for c in book.cells if c.cell_type == "markdown" for line in fenced_code(c.source)]
    assert _too_long(code) == [], f"{py.name}: code cells' lines over {CODE_WIDTH} characters"
    assert _too_long(md) == [], f"{py.name}: Markdown code blocks' lines over {CODE_WIDTH}"


def test_code_blocks_of_the_book_pages_fit_the_rendered_box():
    """The same for the Markdown pages (intro, appendices)."""
    long = {
        md.name: _too_long(fenced_code(md.read_text()))
        for md in sorted((ROOT / "book").glob("*.md"))
    }
    assert not any(long.values()), long


def test_no_line_of_the_book_pages_starts_with_a_percent_sign():
    """The same for the Markdown pages (intro, appendices): MyST would drop the line."""
    dropped = [
        f"{md.name}: {line}"
        for md in sorted((ROOT / "book").glob("*.md"))
        for line in md.read_text().splitlines()
        if line.lstrip().startswith("%")
    ]
    assert dropped == [], dropped


def test_badge_image_is_local_and_relative():
    image = ROOT / booktools.BADGE_IMAGE
    assert ET.parse(image).getroot().tag.endswith("svg")
    assert "](../../_static/colab-badge.svg)" in booktools.colab_badge(
        "book/experiments/train.ipynb", ROOT
    )
    assert "](../_static/colab-badge.svg)" in booktools.colab_badge("book/02_x.ipynb", ROOT)


def test_stamp_rewrites_an_old_chapter(tmp_path):
    """A chapter with the remote badge and an untagged install cell comes out as ``check``
    wants it, in the .py and in the synced .ipynb."""
    shutil.copy(ROOT / "_config.yml", tmp_path / "_config.yml")
    (tmp_path / "book").mkdir()
    py = tmp_path / "book" / "01_old.py"
    py.write_text(
        "# ---\n# jupyter:\n#   jupytext:\n#     formats: ipynb,py:percent\n# ---\n\n"
        "# %% [markdown]\n# # Old\n#\n"
        "# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        "(https://colab.research.google.com/github/someone/else/blob/main/book/01_old.ipynb)\n\n"
        '# %%\nINSTALL_URL = "git+https://github.com/someone/else@main"\n\n# %%\nx = 1\n'
    )
    nb = py.with_suffix(".ipynb")
    assert booktools.chapter_problems(py, nb, tmp_path)
    booktools.stamp(tmp_path, chapters=[py])
    assert booktools.chapter_problems(py, nb, tmp_path) == []
    assert '# %% tags=["remove-cell"]\nINSTALL_URL' in py.read_text()
    assert "# %%\nx = 1" in py.read_text()  # other cells keep their (empty) metadata


def test_every_chapter_is_in_the_toc():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = {toc["root"]}
    for part in toc.get("parts", []):
        files |= {c["file"] for c in part["chapters"]}
    for py, _ in PAIRS:
        assert py.relative_to(ROOT).with_suffix("").as_posix() in files, f"{py.name} not in _toc"
