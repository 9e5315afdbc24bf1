"""Helpers for the book's chapters: Colab badge and install cell from one setting.

``_config.yml``'s ``repository.url`` is the single source of the repository address. Each
chapter starts with a Colab badge and a cell that installs ``brpg`` from that repository when
(and only when) it runs on Colab. The badge image is the book's own ``_static/colab-badge.svg``
(a relative path, so the rendered book needs no network), and the install cell carries the
``remove-cell`` tag (it runs on Colab, the rendered page does not show it).
``python -m brpg.book.tools stamp [CHAPTER.py ...]`` rewrites badge, install line and tag (in
every chapter, or only in those named); ``python -m brpg.book.tools check`` (run by the tests)
fails when a chapter disagrees.

The module is also a Sphinx extension (``sphinx.extra_extensions`` in ``_config.yml``): when
``make mathjax`` has fetched MathJax into ``_vendor/mathjax/`` (git-ignored), it serves that
copy as ``_static/mathjax/`` and points ``mathjax_path`` at it, so the book's math is typeset
without a network connection. (Not kept in ``_static/`` itself: jupyter-book adds every
``.js`` file under ``_static/`` to every page.)
"""

from __future__ import annotations

import inspect
import json
import posixpath
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from IPython.display import Markdown
    from sphinx.application import Sphinx
    from sphinx.config import Config

ROOT = Path(__file__).resolve().parents[2]
# The badge line, whatever its image (the old remote Colab SVG or the local copy), so that
# `stamp` also rewrites chapters written before the image became local.
BADGE_RE = re.compile(
    r"\[!\[Open In Colab\]\([^)\s]+\)\]"
    r"\(https://colab\.research\.google\.com/github/[^)\s]+\)"
)
INSTALL_RE = re.compile(r"INSTALL_URL = \"git\+[^\"]+\"")
BADGE_IMAGE = "_static/colab-badge.svg"  # repository-relative
REMOVE_TAG = "remove-cell"
VENDOR_DIR = "_vendor"  # repository-relative; _vendor/mathjax/ is served as _static/mathjax/
MATHJAX_LOCAL = "mathjax/tex-mml-chtml.js"  # relative to _vendor/ and to the book's _static/


def book_settings(root: Path = ROOT) -> dict[str, str]:
    cfg = yaml.safe_load((root / "_config.yml").read_text())
    repo = cfg["repository"]
    return {"url": repo["url"].rstrip("/"), "branch": repo.get("branch", "main")}


def colab_badge(notebook: str, root: Path = ROOT) -> str:
    """The Markdown Colab badge for ``notebook`` (a repository-relative ``.ipynb`` path): the
    local badge image, by a path relative to the notebook, linked to the notebook on Colab."""
    s = book_settings(root)
    slug = s["url"].removeprefix("https://github.com/")
    link = f"https://colab.research.google.com/github/{slug}/blob/{s['branch']}/{notebook}"
    image = posixpath.relpath(BADGE_IMAGE, posixpath.dirname(notebook) or ".")
    return f"[![Open In Colab]({image})]({link})"


def install_line(root: Path = ROOT) -> str:
    s = book_settings(root)
    return f'INSTALL_URL = "git+{s["url"]}@{s["branch"]}"'


def chapter_pairs(root: Path = ROOT) -> list[tuple[Path, Path]]:
    """(``.py``, ``.ipynb``) pairs of every chapter under ``book/`` (and of the experiment
    notebooks under ``book/experiments/``)."""
    book = root / "book"
    sources = {*book.rglob("[0-9]*.py"), *(book / "experiments").glob("*.py")}
    return [(p, p.with_suffix(".ipynb")) for p in sorted(sources)]


def execute(py: Path, timeout: int = 900) -> Path:
    """Write ``py``'s paired ``.ipynb`` from the source and execute it in place (kernel
    ``python3``, working directory the notebook's folder); returns the ``.ipynb`` path."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb_path = Path(py).with_suffix(".ipynb")
    nb = jupytext.read(py)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(nb_path.parent)}},
    )
    client.execute()
    nbformat.write(nb, nb_path)
    return nb_path


def _source(path: Path) -> str:
    """Plain text of a ``.py`` chapter, or the joined cell sources of an ``.ipynb``."""
    if path.suffix == ".ipynb":
        nb = json.loads(path.read_text())
        return "\n".join("".join(c["source"]) for c in nb["cells"])
    return path.read_text()


def _install_cell_tags(path: Path) -> list[list[str]]:
    """The tags of every cell of ``path`` (``.py`` or ``.ipynb``) that sets ``INSTALL_URL``."""
    import jupytext

    nb = jupytext.read(path)
    return [
        list(c.metadata.get("tags", []))
        for c in nb.cells
        if c.cell_type == "code" and INSTALL_RE.search(c.source)
    ]


def chapter_problems(py: Path, nb: Path, root: Path = ROOT) -> list[str]:
    """How one chapter's badge or install cell disagrees with ``_config.yml`` (empty when fine)."""
    out = []
    rel_nb = nb.relative_to(root).as_posix()
    for path in (py, nb):
        if not path.exists():
            out.append(f"{path.relative_to(root)}: missing (run jupytext --sync {py.name})")
            continue
        text = _source(path)
        badges = BADGE_RE.findall(text)
        installs = INSTALL_RE.findall(text)
        if not badges or any(b != colab_badge(rel_nb, root) for b in badges):
            out.append(
                f"{path.relative_to(root)}: Colab badge missing or not {colab_badge(rel_nb, root)}"
            )
        if not installs or any(i != install_line(root) for i in installs):
            out.append(f"{path.relative_to(root)}: install cell missing or out of date")
        elif any(REMOVE_TAG not in tags for tags in _install_cell_tags(path)):
            out.append(f"{path.relative_to(root)}: install cell lacks the {REMOVE_TAG} tag")
    return out


def problems(root: Path = ROOT) -> list[str]:
    """Chapters whose badge or install cell disagrees with ``_config.yml`` (empty when fine)."""
    return [p for py, nb in chapter_pairs(root) for p in chapter_problems(py, nb, root)]


def _tag_install_cell(text: str) -> str:
    """``text`` (a py:percent chapter) with ``tags=["remove-cell"]`` on the install cell."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not INSTALL_RE.search(line):
            continue
        head = next(j for j in range(i, -1, -1) if lines[j].startswith("# %%"))
        if REMOVE_TAG in lines[head]:
            continue
        if lines[head].strip() != "# %%":
            raise ValueError(
                f"install cell header {lines[head]!r}: add the {REMOVE_TAG} tag by hand"
            )
        lines[head] = f'# %% tags=["{REMOVE_TAG}"]'
    return "\n".join(lines)


def stamp(root: Path = ROOT, chapters: list[Path] | None = None) -> None:
    """Rewrite badge, install line and install-cell tag in every ``.py`` chapter (or only in
    ``chapters``), then sync the ``.ipynb`` (its outputs are kept)."""
    wanted = None if chapters is None else {Path(c).resolve().with_suffix(".py") for c in chapters}
    for py, nb in chapter_pairs(root):
        if wanted is not None and py.resolve() not in wanted:
            continue
        rel_nb = nb.relative_to(root).as_posix()
        badge, install = colab_badge(rel_nb, root), install_line(root)
        text = BADGE_RE.sub(lambda _m, b=badge: b, py.read_text())
        text = INSTALL_RE.sub(lambda _m, i=install: i, text)
        text = _tag_install_cell(text)
        py.write_text(text)
        subprocess.run([sys.executable, "-m", "jupytext", "--sync", str(py)], check=True)


def show_source(obj: object) -> Markdown:
    """``inspect.getsource(obj)`` as a fenced Python block, an ``IPython.display.Markdown``.

    Chapters show the package's own code with it instead of re-typing it (STYLE.md, d2l.ai).
    """
    from IPython.display import Markdown

    source = inspect.getsource(obj)
    return Markdown(f"```python\n{source.rstrip()}\n```")


def markdown_table(header: list[str], rows: list[list[object]]) -> Markdown:
    """A Markdown table (the book renders ``text/markdown`` outputs with MyST, tables included)."""
    from IPython.display import Markdown

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return Markdown("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["stamp"]:
        stamp(chapters=[Path(a) for a in args[1:]] or None)
        return 0
    if len(args) >= 2 and args[0] == "execute":
        for py in args[1:]:
            print(f"executed {execute(Path(py).with_suffix('.py'))}")
        return 0
    if args == ["check"]:
        found = problems()
        print("\n".join(found) or "all chapters agree with _config.yml")
        return 1 if found else 0
    print(
        "usage: python -m brpg.book.tools {stamp [CHAPTER.py...]|check|execute CHAPTER.py...}",
        file=sys.stderr,
    )
    return 2


def _use_local_mathjax(app: Sphinx, config: Config) -> None:
    """Serve ``_vendor/mathjax/`` as ``_static/mathjax/`` and point ``mathjax_path`` at it,
    when the local copy is there."""
    from sphinx.util import logging

    vendor = Path(app.srcdir) / VENDOR_DIR
    local = vendor / MATHJAX_LOCAL
    if local.is_file():
        config.html_static_path = [*config.html_static_path, str(vendor)]
        config.mathjax_path = MATHJAX_LOCAL  # Sphinx prefixes _static/ and makes it relative
    else:
        logging.getLogger(__name__).info(
            f"brpg.book.tools: no {local.relative_to(app.srcdir)}; MathJax comes from"
            " its CDN (run `make mathjax` for a book that typesets math offline)"
        )


def setup(app: Sphinx) -> dict[str, object]:
    """Sphinx extension entry point (see the module docstring)."""
    app.connect("config-inited", _use_local_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    raise SystemExit(main())
