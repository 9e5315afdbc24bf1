"""Every test module says which machine-dependence cases its tests are in (tests/README.md).

The README defines the cases, one ``###`` heading each (``exact``, ``same-machine``, ...). Every
``tests/test_*.py`` module docstring has a paragraph that begins ``Machine:`` and whose first
sentence lists cases of the README, separated by commas; the rest of the paragraph says which
tests are in which. A module lists ``precision`` if and only if it uses the ``precision`` mark,
and a module that resumes a run and asserts ``torch.equal`` lists ``same-machine``.

Machine: exact. Reads source files and tests/README.md only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
README = TESTS / "README.md"
MODULES = sorted(TESTS.glob("test_*.py"))


def defined_cases(readme: str) -> set[str]:
    """The case names of the README's ``### `name` ...`` headings."""
    return set(re.findall(r"^### `([a-z0-9-]+)`", readme, flags=re.MULTILINE))


def listed_cases(docstring: str | None) -> list[str] | None:
    """The cases of the ``Machine:`` paragraph's first sentence; None without such a paragraph."""
    match = re.search(r"^Machine:([^.]*)\.", docstring or "", flags=re.MULTILINE)
    if match is None:
        return None
    return [item.strip() for item in match.group(1).split(",")]


def _uses_precision_mark(tree: ast.Module) -> bool:
    """``pytest.mark.precision`` anywhere in the code (decorator or ``pytestmark``)."""
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == "precision"
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "mark"
        for node in ast.walk(tree)
    )


def _resumes_and_compares_exactly(tree: ast.Module) -> bool:
    """A call of ``torch.equal`` and a resumed run (``resume=True`` or ``"--resume"``)."""
    equal = resume = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "equal":
                equal |= isinstance(f.value, ast.Name) and f.value.id == "torch"
            resume |= any(
                k.arg == "resume" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords
            )
        elif isinstance(node, ast.Constant) and node.value == "--resume":
            resume = True
    return equal and resume


def module_problems(source: str, cases: set[str]) -> list[str]:
    """What is wrong with a test module's ``Machine:`` paragraph (empty: nothing)."""
    tree = ast.parse(source)
    listed = listed_cases(ast.get_docstring(tree))
    known = ", ".join(sorted(cases))
    if listed is None:
        return [
            "its module docstring has no paragraph 'Machine: <cases>. <which tests are in "
            f"which>' (cases, from tests/README.md: {known})"
        ]
    problems = []
    unknown = [c for c in listed if c not in cases]
    if unknown:
        problems.append(
            f"'Machine:' lists {unknown}, not cases of tests/README.md ({known}); the first "
            "sentence is the comma-separated list of cases, the details come after it"
        )
    if len(set(listed)) != len(listed):
        problems.append(f"'Machine:' lists a case twice: {listed}")
    if _uses_precision_mark(tree) != ("precision" in listed):
        problems.append(
            "a module lists 'precision' if and only if it uses the precision mark "
            f"(mark used: {_uses_precision_mark(tree)}; listed: {listed})"
        )
    if _resumes_and_compares_exactly(tree) and "same-machine" not in listed:
        problems.append(
            "it resumes a run and asserts torch.equal: a resumed run equals the straight run "
            "only on the same machine and thread count, so 'Machine:' must list 'same-machine'"
        )
    return problems


CASES = defined_cases(README.read_text())


def test_the_readme_defines_the_cases():
    # change both on purpose: the names are used in every test module's docstring
    assert CASES == {"exact", "same-machine", "fp32-tolerance", "bound", "precision"}


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_every_module_says_which_cases_its_tests_are_in(path: Path):
    assert module_problems(path.read_text(), CASES) == [], path.name


def test_the_check_fails_on_a_module_that_breaks_a_rule():
    ok = '"""Doc.\n\nMachine: exact, bound. Details.\n"""\n'
    assert module_problems(ok, CASES) == []
    missing = '"""Doc without the paragraph."""\n'
    assert "no paragraph 'Machine:" in module_problems(missing, CASES)[0]
    assert module_problems("import torch\n", CASES)  # no docstring at all
    unknown = '"""Doc.\n\nMachine: exact, fp64-tolerance. Details.\n"""\n'
    assert "['fp64-tolerance']" in module_problems(unknown, CASES)[0]
    prose = '"""Doc.\n\nMachine: exact for the configs; bound for the run.\n"""\n'
    assert module_problems(prose, CASES)  # the list comes first, then the details
    twice = '"""Doc.\n\nMachine: exact, exact.\n"""\n'
    assert "twice" in module_problems(twice, CASES)[0]
    marked = ok + "import pytest\n\npytestmark = pytest.mark.precision\n"
    assert "precision mark" in module_problems(marked, CASES)[0]
    unmarked = '"""Doc.\n\nMachine: exact, precision.\n"""\n'
    assert "precision mark" in module_problems(unmarked, CASES)[0]
    resumed = ok + (
        "import torch\n\n\ndef test_resume():\n"
        "    a, b = run(), run(resume=True)\n    assert torch.equal(a, b)\n"
    )
    assert "same-machine" in module_problems(resumed, CASES)[0]
    same = resumed.replace("Machine: exact, bound.", "Machine: exact, same-machine.")
    assert module_problems(same, CASES) == []
