"""Finds the definitions shipped with the plugin: questionnaires/ and mappings/.

In a source checkout they sit beside the package; in an installed wheel
they are carried inside it (see pyproject.toml), under plugin/_data/.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import orjson
import yaml

PACKAGE = Path(__file__).resolve().parent


@cache
def data_root() -> Path:
    bundled = PACKAGE / "_data"
    return bundled if (bundled / "questionnaires").is_dir() else PACKAGE.parent


def questionnaires_dir() -> Path:
    return data_root() / "questionnaires"


def mappings_dir() -> Path:
    return data_root() / "mappings"


def read_json(path: Path) -> dict:
    return orjson.loads(path.read_bytes())


def definitions(resource_type: str) -> list[dict]:
    """Every published resource of one type (Questionnaire, CodeSystem), by file name order."""
    found = (read_json(p) for p in sorted(questionnaires_dir().glob("*.json")))
    return [r for r in found if r.get("resourceType") == resource_type]


def rule_files() -> list[dict]:
    return [yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(mappings_dir().glob("*.yaml"))]
