"""Every LOINC and SNOMED CT code the plugin uses is listed, with how it was verified, in mappings/external-codes.yaml.

SCREENING.md §4: a standard coding goes beside our own only once it is verified. The codes are gathered from
where they can appear: the Questionnaires and CodeSystems, the rule files, the results built for every example
response (with each referral strategy), and the codes the plugin's own modules read or order.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from plugin.ehr import cds_cards, populate
from plugin.screening import data, systems
from plugin.screening.pipeline import Screener, Settings

ROOT = Path(__file__).resolve().parent.parent
STANDARD = {"http://loinc.org", systems.SNOMED}
OBSERVATION_EXTRACT = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-observationExtract"
LAB_ITEMS = ("hla-b27", "crp-elevated")  # answered from lab results by $populate: never extracted again
LOINC_IN_SOURCE = re.compile(r"""["'](\d{1,7}-\d)["']""")


@cache
def listed() -> dict[tuple[str, str], dict]:
    raw = yaml.safe_load((ROOT / "mappings" / "external-codes.yaml").read_text(encoding="utf-8"))
    return {(entry["system"], str(entry["code"])): entry for entry in raw["codes"]}


def codings(node: Any) -> Iterator[dict]:
    """Every dict with a standard `system` and a `code`, anywhere in a JSON or YAML tree."""
    if isinstance(node, dict):
        if node.get("system") in STANDARD and "code" in node:
            yield node
        for value in node.values():
            yield from codings(value)
    elif isinstance(node, list):
        for value in node:
            yield from codings(value)


def definitions() -> list[dict]:
    return [orjson.loads(p.read_bytes()) for p in sorted((ROOT / "questionnaires").glob("*.json"))]


def rule_files() -> list[Any]:
    return [yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted((ROOT / "mappings").glob("*.yaml"))
            if p.name not in data.REFERENCE_FILES]


@cache
def built_results() -> list[dict]:
    """The result Bundles of every example response, under each referral strategy."""
    bodies = [p.read_bytes() for p in sorted((ROOT / "questionnaires" / "examples").glob("qr-*.json"))]
    bundles = []
    for strategy in ("asas-2015", "nice-ng65"):
        screener = Screener(Settings(strategy=strategy))
        bundles += [screener.process_body(body, "application/fhir+json").bundle for body in bodies]
    return bundles


def read_or_ordered_by_the_plugin() -> set[tuple[str, str]]:
    """Codes the plugin's modules name themselves, plus any LOINC-shaped string in its source (so a new one
    cannot slip in unlisted)."""
    loinc = {("http://loinc.org", code) for code in populate.LAB_CODES}
    loinc |= {("http://loinc.org", code) for path in (ROOT / "plugin").rglob("*.py")
              for code in LOINC_IN_SOURCE.findall(path.read_text(encoding="utf-8"))}
    snomed = {cds_cards.REFERRAL, *((c["system"], c["code"]) for c in cds_cards.LAB_CATEGORY["coding"])}
    return loinc | snomed


def used() -> dict[tuple[str, str], list[dict]]:
    found: dict[tuple[str, str], list[dict]] = {}
    for tree in (*definitions(), *rule_files(), *built_results()):
        for coding in codings(tree):
            found.setdefault((coding["system"], str(coding["code"])), []).append(coding)
    for key in read_or_ordered_by_the_plugin():
        found.setdefault(key, [])
    return found


def test_every_standard_code_used_is_listed_with_how_it_was_verified():
    unlisted = sorted(set(used()) - set(listed()))
    assert not unlisted, f"add these to mappings/external-codes.yaml, with how each was verified: {unlisted}"
    for key, entry in listed().items():
        assert entry.get("verified", "").strip() and entry.get("used", "").strip(), key


def test_no_listed_code_is_stale_and_displays_agree():
    found = used()
    stale = sorted(set(listed()) - set(found))
    assert not stale, f"listed but used nowhere: {stale}"
    for key, seen in found.items():
        displays = {c["display"] for c in seen if "display" in c}
        assert displays <= {listed()[key]["display"]}, (key, displays)


def _items(items: list[dict]) -> Iterator[dict]:
    for item in items:
        yield item
        yield from _items(item.get("item", []))


@pytest.mark.parametrize("path", sorted((ROOT / "questionnaires").glob("back-pain-screening*.json")),
                         ids=lambda p: p.name)
def test_only_items_with_a_verified_standard_code_are_marked_for_observation_extraction(path: Path):
    """A generic SDC engine extracts an Observation for each marked item; its code must mean what was asked."""
    questionnaire = orjson.loads(path.read_bytes())
    assert not any(e["url"] == OBSERVATION_EXTRACT for e in questionnaire.get("extension", [])), \
        "marking the whole Questionnaire would extract every coded item, our own codes alone included"
    for item in _items(questionnaire["item"]):
        marked = [e["valueBoolean"] for e in item.get("extension", []) if e["url"] == OBSERVATION_EXTRACT]
        if marked == [True]:
            standard = [c for c in item["code"] if (c["system"], c["code"]) in listed()]
            assert standard, f"{item['linkId']} is extracted without a verified standard code"
            assert item["code"][0]["system"] == systems.ITEMS, "our own coding stays first"
            assert item["linkId"] not in LAB_ITEMS


def test_the_screening_extracts_the_reported_age_as_loinc_21612_7():
    screening = orjson.loads((ROOT / "questionnaires" / "back-pain-screening.json").read_bytes())
    marked = {item["linkId"]: item for item in _items(screening["item"])
              if any(e["url"] == OBSERVATION_EXTRACT and e["valueBoolean"] for e in item.get("extension", []))}
    assert list(marked) == ["age"]
    assert [(c["system"], c["code"]) for c in marked["age"]["code"]] == [
        (systems.ITEMS, "age"), ("http://loinc.org", "21612-7")]


def test_the_hla_b27_test_task_carries_loinc_26028_1_after_our_own_code():
    tasks = [e["resource"] for bundle in built_results() for e in bundle.get("entry", [])
             if e["resource"]["resourceType"] == "Task"
             and e["resource"]["code"]["coding"][0]["code"] == "hla-b27-test"]
    assert tasks, "no example response led to the HLA-B27 test suggestion"
    for task in tasks:
        assert [(c["system"], c["code"]) for c in task["code"]["coding"]] == [
            (systems.RESULTS, "hla-b27-test"), ("http://loinc.org", "26028-1")]
