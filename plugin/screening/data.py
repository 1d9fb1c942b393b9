"""Finds the definitions shipped with the plugin: questionnaires/ and mappings/.

In a source checkout they sit beside the package; in an installed wheel
they are carried inside it (see pyproject.toml), under plugin/_data/.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import orjson
import yaml

PACKAGE = Path(__file__).resolve().parents[1]  # plugin/, where a wheel carries _data/


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
    return [r for r in _published() if r["resourceType"] == resource_type]


@cache
def _published() -> tuple[dict, ...]:
    """Reads and validates (fhir.resources R4B) every definition once per process.

    A hand-edited definition that is not valid FHIR R4 stops the plugin at
    start-up, before any response is scored against it.
    """
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    found = []
    for path in sorted(questionnaires_dir().glob("*.json")):
        resource = read_json(path)
        try:
            get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        except (KeyError, ValidationError) as error:
            raise ValueError(f"{path.name} is not a valid FHIR R4 resource: {error}") from None
        found.append(resource)
    return tuple(found)


def canonical_forms(url: str) -> str:
    """A search value matching a response to any published version of a Questionnaire, whether its
    canonical names the version or not (`url,url|1.0.0,url|1.1.0`): servers match canonicals as given."""
    versions = [q["version"] for q in definitions("Questionnaire") if q["url"] == url]
    return ",".join([url, *(f"{url}|{version}" for version in versions)])


@cache
def safety_netting(audience: str) -> str:
    """What to do if new symptoms appear, for `patient` or `clinician` (mappings' `safety_netting`)."""
    texts = [raw["safety_netting"][audience] for raw in rule_files() if audience in raw.get("safety_netting", {})]
    return " ".join(texts[0].split()) if texts else ""


REFERENCE_FILES = frozenset({"external-codes.yaml"})  # mappings/ YAML that is not a rule file


def rule_files() -> list[dict]:
    """The rule files: every YAML file of mappings/ but the references (a misnamed rule file is still loaded,
    and its checks say what is wrong, rather than being passed over)."""
    paths = [p for p in sorted(mappings_dir().glob("*.yaml")) if p.name not in REFERENCE_FILES]
    return [yaml.safe_load(p.read_text(encoding="utf-8")) for p in paths]
