"""The package's import layers (brpg/__init__.py): the training loop (engine/) is on top of the
method and the frameworks, which never import it; nothing below the book imports the book.

Machine: exact. It reads the source files' import statements.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import brpg

ROOT = Path(brpg.__file__).parent

#: Each part of the package and its layer; a module may import its own part and any part of a
#: lower layer, nothing above (brpg/__init__.py draws the same table).
LAYERS = {
    "config": 0,
    "prepare": 0,
    "timeline": 1,
    "distributed": 1,
    "metrics": 1,
    "data": 2,
    "models": 2,
    "method": 3,
    "frameworks": 4,
    "engine": 5,
    "book": 6,
    "reproduce": 7,
    "cli": 8,
    "__main__": 9,
}


def part_of(module: str) -> str:
    """``brpg.engine.trainer`` -> ``engine``; ``brpg.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def absolute(node: ast.ImportFrom, module: str) -> str:
    """The module a ``from ... import`` names, a relative one resolved against ``module``
    (``from ..engine import x`` in ``brpg.method.plugin`` -> ``brpg.engine``)."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".")[: -node.level]  # a module's package is its name minus the last
    return ".".join(package + ([node.module] if node.module else []))


def brpg_imports(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``brpg`` import in ``path`` (the module ``module``), lazy ones
    inside functions and relative ones included; ``from brpg import x`` counts as importing
    ``brpg.x``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("brpg.")]
        elif isinstance(node, ast.ImportFrom):
            target = absolute(node, module)
            if target == "brpg":
                out += [(node.lineno, f"brpg.{a.name}") for a in node.names]
            elif target.startswith("brpg."):
                out.append((node.lineno, target))
    return out


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        here = part_of(module)
        if here == "__init__":
            continue
        for line, target in brpg_imports(path, module):
            there = part_of(target)
            if there != here and LAYERS[there] >= LAYERS[here]:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {here} imports {target}")
    return bad


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.name != "__pycache__"}
    parts -= {"__init__", "configs", "py"}
    assert parts <= set(LAYERS), parts - set(LAYERS)


def test_no_module_imports_a_higher_layer():
    assert violations() == []


def test_the_layer_check_catches_a_method_module_importing_the_loop(tmp_path: Path):
    pkg = tmp_path / "brpg"
    for part in ("method", "engine", "frameworks"):
        (pkg / part).mkdir(parents=True)
    (pkg / "method" / "x.py").write_text("def f():\n    from brpg.engine.trainer import Trainer\n")
    (pkg / "frameworks" / "y.py").write_text("from brpg.engine import runtime\n")
    (pkg / "frameworks" / "rel.py").write_text("from ..engine.inference import evaluate\n")
    (pkg / "method" / "__init__.py").write_text("from .. import engine\n")
    (pkg / "engine" / "z.py").write_text("from brpg.book.demo import warm_model\n")
    (pkg / "engine" / "ok.py").write_text(
        "from brpg.method.x import f\nfrom brpg import timeline\n"
    )
    got = violations(pkg)
    assert got == [
        "brpg/engine/z.py:1: engine imports brpg.book.demo",
        "brpg/frameworks/rel.py:1: frameworks imports brpg.engine.inference",
        "brpg/frameworks/y.py:1: frameworks imports brpg.engine",
        "brpg/method/__init__.py:1: method imports brpg.engine",
        "brpg/method/x.py:2: method imports brpg.engine.trainer",
    ]


@pytest.mark.parametrize("part", ["method", "frameworks"])
def test_the_method_and_the_frameworks_never_name_the_engine(part):
    text = "\n".join(p.read_text() for p in (ROOT / part).rglob("*.py"))
    assert "import brpg.engine" not in text and "from brpg.engine" not in text
