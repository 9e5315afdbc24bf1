"""Helpers for the book's chapters: Colab badge and install cell from one setting.

``_config.yml``'s ``repository.url`` is the single source of the repository address. Each
chapter starts with a Colab badge and a cell that installs ``brpg`` from that repository when
(and only when) it runs on Colab. ``python -m brpg.booktools stamp`` rewrites them in every
chapter after the URL changes; ``python -m brpg.booktools check`` (run by the tests) fails
when a chapter disagrees with ``_config.yml``.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from IPython.display import Markdown

ROOT = Path(__file__).resolve().parents[1]
BADGE_RE = re.compile(
    r"\[!\[Open In Colab\]\(https://colab\.research\.google\.com/assets/colab-badge\.svg\)\]"
    r"\(https://colab\.research\.google\.com/github/[^)\s]+\)"
)
INSTALL_RE = re.compile(r"INSTALL_URL = \"git\+[^\"]+\"")


def book_settings(root: Path = ROOT) -> dict[str, str]:
    cfg = yaml.safe_load((root / "_config.yml").read_text())
    repo = cfg["repository"]
    return {"url": repo["url"].rstrip("/"), "branch": repo.get("branch", "main")}


def colab_badge(notebook: str, root: Path = ROOT) -> str:
    """The Markdown Colab badge for ``notebook`` (a repository-relative ``.ipynb`` path)."""
    s = book_settings(root)
    slug = s["url"].removeprefix("https://github.com/")
    link = f"https://colab.research.google.com/github/{slug}/blob/{s['branch']}/{notebook}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({link})"


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


def problems(root: Path = ROOT) -> list[str]:
    """Chapters whose badge or install cell disagrees with ``_config.yml`` (empty when fine)."""
    out = []
    for py, nb in chapter_pairs(root):
        rel_nb = nb.relative_to(root).as_posix()
        for path in (py, nb):
            if not path.exists():
                out.append(f"{path.relative_to(root)}: missing (run jupytext --sync {py.name})")
                continue
            text = _source(path)
            badges = BADGE_RE.findall(text)
            installs = INSTALL_RE.findall(text)
            if not badges or any(b != colab_badge(rel_nb, root) for b in badges):
                out.append(f"{path.relative_to(root)}: Colab badge missing or not {rel_nb}")
            if not installs or any(i != install_line(root) for i in installs):
                out.append(f"{path.relative_to(root)}: install cell missing or out of date")
    return out


def stamp(root: Path = ROOT) -> None:
    """Rewrite badge and install line in every ``.py`` chapter, then sync the ``.ipynb``."""
    for py, nb in chapter_pairs(root):
        rel_nb = nb.relative_to(root).as_posix()
        badge, install = colab_badge(rel_nb, root), install_line(root)
        text = BADGE_RE.sub(lambda _m, b=badge: b, py.read_text())
        text = INSTALL_RE.sub(lambda _m, i=install: i, text)
        py.write_text(text)
        subprocess.run([sys.executable, "-m", "jupytext", "--sync", str(py)], check=True)


def show_source(obj: object) -> Markdown:
    """``inspect.getsource(obj)`` as a fenced Python block, an ``IPython.display.Markdown``.

    Chapters show the package's own code with it instead of re-typing it (STYLE.md, d2l.ai).
    """
    from IPython.display import Markdown

    source = inspect.getsource(obj)
    return Markdown(f"```python\n{source.rstrip()}\n```")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["stamp"]:
        stamp()
        return 0
    if len(args) >= 2 and args[0] == "execute":
        for py in args[1:]:
            print(f"executed {execute(Path(py).with_suffix('.py'))}")
        return 0
    if args == ["check"]:
        found = problems()
        print("\n".join(found) or "all chapters agree with _config.yml")
        return 1 if found else 0
    print("usage: python -m brpg.booktools {stamp|check|execute CHAPTER.py...}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
