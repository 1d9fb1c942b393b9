"""Finds the definitions shipped with the plugin: questionnaires/ and mappings/.

In a source checkout they sit beside the package; in an installed wheel
they are carried inside it (see pyproject.toml), under plugin/_data/.
"""

from __future__ import annotations

import hashlib
import os
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


def definitions(resource_type: str) -> list[dict]:
    """Every published resource of one type (Questionnaire, CodeSystem), by file name order."""
    return [r for r in _published() if r["resourceType"] == resource_type]


@cache
def _published() -> tuple[dict, ...]:
    """Reads and validates (fhir.resources R4B) every definition once per process.

    A hand-edited definition that is not valid FHIR R4 stops the plugin at
    start-up, before any response is scored against it. Validating takes a
    few tenths of a second (most of a `score` or a short `batch`), so the
    digest of definitions that passed is remembered in the user's cache by the
    short-lived commands that ask for it (`score`, `batch`, `submit`): the same
    bytes with the same fhir.resources are not validated twice. The service and
    `sync` never write it (in the image only their volumes are writable), and
    validate once per start.
    """
    files = [(path, path.read_bytes()) for path in sorted(questionnaires_dir().glob("*.json"))]
    found = [orjson.loads(raw) for _, raw in files]
    marker = _validated_marker(files)
    if marker is None or not marker.exists():
        for (path, _), resource in zip(files, found):
            _validate(path, resource)
        _remember(marker)
    return tuple(found)


def _validate(path: Path, resource: dict) -> None:
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except (KeyError, ValidationError) as error:
        raise ValueError(f"{path.name} is not a valid FHIR R4 resource: {error}") from None


_cache_validation = False  # set by remember_validation(): only short-lived commands gain from it


def remember_validation() -> None:
    """Lets this process keep (and trust) the user-cache marker of definitions that passed validation."""
    global _cache_validation
    _cache_validation = True


def _validated_marker(files: list[tuple[Path, bytes]]) -> Path | None:
    """Where the cache marks these definitions as valid (None when there is no cache directory, or this
    process did not ask for the cache)."""
    if not _cache_validation:
        return None
    import fhir.resources  # the package alone, not its models: cheap

    digest = hashlib.sha256(f"fhir.resources {fhir.resources.__version__}".encode())
    for path, raw in files:
        digest.update(b"\0%s\0%d\0" % (path.name.encode(), len(raw)) + raw)
    try:
        cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no home directory
        return None
    return cache_home / "backpain-screen" / f"definitions-{digest.hexdigest()}.valid"


def _remember(marker: Path | None) -> None:
    if marker is None:
        return
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:  # a read-only home: validate at every start, as before
        pass


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
# libyaml's parser when PyYAML has it (10x faster at start-up; the same safe constructor, so the same data)
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def rule_files() -> list[dict]:
    """The rule files: every YAML file of mappings/ but the references (a misnamed rule file is still loaded,
    and its checks say what is wrong, rather than being passed over)."""
    paths = [p for p in sorted(mappings_dir().glob("*.yaml")) if p.name not in REFERENCE_FILES]
    return [yaml.load(p.read_text(encoding="utf-8"), Loader=SAFE_LOADER) for p in paths]
