"""The hazard log (mappings/safety-case.md) names real tests for every control.

Every `### H<n>:` section must have its Cause, Control, Tests and Residual
risk lines, and each test it names (`tests/<path>.py::<test_name>`) must be a
test function in that file, found with `ast` (so a renamed or deleted test
fails here, not silently in the log).
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "mappings" / "safety-case.md"
HEADING = re.compile(r"^### (H\d+): (.+)$", re.MULTILINE)
TEST_REF = re.compile(r"^- `(tests/[\w/]+\.py)::(\w+)`", re.MULTILINE)
FIELDS = ("**Cause**", "**Control**", "**Tests**", "**Residual risk**")


def hazards() -> dict[str, str]:
    """Hazard id -> the text of its section."""
    text = LOG.read_text(encoding="utf-8")
    marks = list(HEADING.finditer(text))
    return {m.group(1): text[m.start():marks[i + 1].start() if i + 1 < len(marks) else len(text)]
            for i, m in enumerate(marks)}


@cache
def names_in(path: str) -> frozenset[str]:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    return frozenset(node.name for node in tree.body
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"))


def test_the_log_has_hazards_numbered_once():
    ids = [m.group(1) for m in HEADING.finditer(LOG.read_text(encoding="utf-8"))]
    assert len(ids) >= 10 and len(ids) == len(set(ids))


@pytest.mark.parametrize("hazard", sorted(hazards(), key=lambda h: int(h[1:])))
def test_every_control_is_tied_to_tests_that_exist(hazard: str):
    section = hazards()[hazard]
    for field in FIELDS:
        assert field in section, f"{hazard} has no {field} line"
    refs = TEST_REF.findall(section)
    assert refs, f"{hazard} names no test for its control"
    for path, name in refs:
        assert (ROOT / path).is_file(), f"{hazard}: {path} does not exist"
        assert name in names_in(path), f"{hazard}: {path} has no test {name}"


def test_a_missing_test_would_be_caught():
    """The check itself: a name that is not a test in the file is not found."""
    assert "test_every_control_is_tied_to_tests_that_exist" in names_in("tests/test_safety_case.py")
    assert "no_such_test" not in names_in("tests/test_safety_case.py")
