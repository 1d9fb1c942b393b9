"""The published definitions: Questionnaires, CodeSystems, mappings and examples (SCREENING.md §1, §3-§5).

Expectations come from SCREENING.md (the public contract), encoded here
independently of the code, so a drift in either the JSON or the plugin fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
import yaml
from fhir.resources.R4B import get_fhir_model_class

from plugin.screening import data, systems
from plugin.screening.codesystem import results_codesystem
from plugin.screening.pipeline import Screener, Settings

ROOT = Path(__file__).resolve().parents[2]
QUESTIONNAIRES = ROOT / "questionnaires"
EXAMPLES = QUESTIONNAIRES / "examples"
MAPPINGS = ROOT / "mappings"

SCREENING_URL = f"{systems.BASE}/Questionnaire/back-pain-screening"
BASDAI_URL = f"{systems.BASE}/Questionnaire/basdai"
UCUM = "http://unitsofmeasure.org"
MIN_VALUE = "http://hl7.org/fhir/StructureDefinition/minValue"
MAX_VALUE = "http://hl7.org/fhir/StructureDefinition/maxValue"
UNIT = "http://hl7.org/fhir/StructureDefinition/questionnaire-unit"

# SCREENING.md §1, row by row: (group, linkId, type, answer codes in order)
CONTRACT: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("pain", "pain-duration", "choice", ("lt-6w", "6w-3m", "3m-1y", "1y-5y", "gt-5y")),
    ("pain", "onset-age", "integer", ()),
    ("pain", "age", "integer", ()),
    ("pain", "onset-gradual", "boolean", ()),
    ("pain", "better-with-exercise", "boolean", ()),
    ("pain", "better-with-rest", "boolean", ()),
    ("pain", "night-pain", "boolean", ()),
    ("pain", "night-pain-eases-on-rising", "boolean", ()),
    ("pain", "night-waking-second-half", "boolean", ()),
    ("pain", "morning-stiffness-minutes", "integer", ()),
    ("pain", "buttock-pain", "choice", ("none", "one-side", "alternating", "both-sides")),
    ("pain", "worse-with-activity", "boolean", ()),
    ("pain", "leg-pain-below-knee", "boolean", ()),
    ("pain", "nsaid-response", "choice", ("not-tried", "much-better", "a-little", "no-effect")),
    ("history", "uveitis", "boolean", ()),
    ("history", "psoriasis", "boolean", ()),
    ("history", "ibd", "boolean", ()),
    ("history", "enthesitis", "boolean", ()),
    ("history", "dactylitis", "boolean", ()),
    ("history", "peripheral-arthritis", "boolean", ()),
    ("history", "family-history-first-degree-spa", "boolean", ()),
    ("history", "family-history-related", "boolean", ()),
    ("clinician", "hla-b27", "choice", ("positive", "negative", "not-tested")),
    ("clinician", "crp-elevated", "choice", ("raised", "normal", "not-tested")),
    ("clinician", "sacroiliitis-imaging", "choice", ("present", "absent", "not-done")),
    ("red-flags", "rf-saddle-numbness", "boolean", ()),
    ("red-flags", "rf-bladder-bowel", "boolean", ()),
    ("red-flags", "rf-leg-weakness", "boolean", ()),
    ("red-flags", "rf-fever", "boolean", ()),
    ("red-flags", "rf-weight-loss", "boolean", ()),
    ("red-flags", "rf-cancer-history", "boolean", ()),
    ("red-flags", "rf-night-pain-unrelieved", "boolean", ()),
    ("red-flags", "rf-trauma", "boolean", ()),
    ("red-flags", "rf-immunosuppression", "boolean", ()),
    # SCREENING.md §7: added in version 1.1.0
    ("red-flags", "rf-sciatica-both-legs", "boolean", ()),
    ("red-flags", "rf-sexual-dysfunction", "boolean", ()),
    ("red-flags", "rf-eye-now", "boolean", ()),
    ("red-flags", "rf-thoracic-pain", "boolean", ()),
    ("red-flags", "rf-constant-progressive", "boolean", ()),
    ("red-flags", "rf-fracture-risk", "boolean", ()),
    ("red-flags", "rf-recent-infection", "boolean", ()),
]
GROUPS = ("red-flags", "pain", "history", "clinician")  # 1.1.0 asks the red flags first (SCREENING.md §7)
NIGHT_PAIN_ENABLE_WHEN = [{"question": "night-pain", "operator": "=", "answerBoolean": True}]
ENABLE_WHEN_ITEMS = {"night-pain-eases-on-rising", "night-waking-second-half"}
# Integer items and their UCUM unit (SCREENING.md §1: years / minutes)
INTEGER_UNITS = {"onset-age": "a", "age": "a", "morning-stiffness-minutes": "min"}
SCREENING_CITATIONS = ("Sieper", "Rudwaleit", "Poddubnyy", "NG65", "CKS")
# SCREENING.md §3 / §5: who each result is cited to
RESULT_CITATIONS = {
    "asas-ibp": "Sieper",
    "berlin-ibp": "Rudwaleit",
    "spa-features": "Rudwaleit",
    "red-flags": "NICE",
    "referral-asas-2015": "Poddubnyy",
    "referral-nice-ng65": "NG65",
    "basdai": "Garrett",
}


def load(path: Path) -> dict:
    return orjson.loads(path.read_bytes())


def walk_items(items: list[dict], parent: str | None = None):
    for item in items:
        yield parent, item
        yield from walk_items(item.get("item", []), item["linkId"])


def codes_of(codesystem: dict) -> dict[str, dict]:
    found: dict[str, dict] = {}

    def walk(concepts: list[dict]) -> None:
        for c in concepts:
            found[c["code"]] = c
            walk(c.get("concept", []))

    walk(codesystem.get("concept", []))
    return found


def extension(item: dict, url: str) -> dict | None:
    found = [e for e in item.get("extension", []) if e["url"] == url]
    assert len(found) <= 1, f"{item['linkId']}: {url} appears {len(found)} times"
    return found[0] if found else None


@pytest.fixture(scope="module")
def screening() -> dict:
    return load(QUESTIONNAIRES / "back-pain-screening.json")


@pytest.fixture(scope="module")
def basdai() -> dict:
    return load(QUESTIONNAIRES / "basdai.json")


def code_system(name: str, url: str) -> dict[str, dict]:
    """The codes of a published CodeSystem, after checking it is the one the plugin names."""
    cs = load(QUESTIONNAIRES / name)
    assert cs["url"] == url
    return codes_of(cs)


@pytest.fixture(scope="module")
def item_codes() -> dict[str, dict]:
    return code_system("screening-items.json", systems.ITEMS)


@pytest.fixture(scope="module")
def answer_codes() -> dict[str, dict]:
    return code_system("screening-answers.json", systems.ANSWERS)


@pytest.fixture(scope="module")
def result_codes() -> dict[str, dict]:
    return code_system("screening-results.json", systems.RESULTS)


@pytest.fixture(scope="module")
def rule_files() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(MAPPINGS.glob("*.yaml"))
            if p.name not in data.REFERENCE_FILES}


# -- every definition is valid FHIR R4 ------------------------------------------------


DEFINITION_FILES = sorted(QUESTIONNAIRES.glob("*.json"))


def test_definition_files_exist() -> None:
    names = {p.name for p in DEFINITION_FILES}
    assert {"back-pain-screening.json", "basdai.json", "screening-items.json", "screening-answers.json",
            "screening-results.json"} <= names


@pytest.mark.parametrize("path", DEFINITION_FILES, ids=lambda p: p.name)
def test_definition_validates_as_r4b(path: Path) -> None:
    resource = load(path)
    model = get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    assert model.get_resource_type() == resource["resourceType"]


@pytest.mark.parametrize("path", [p for p in DEFINITION_FILES if load(p)["resourceType"] == "CodeSystem"],
                         ids=lambda p: p.name)
def test_codesystem_is_complete_and_unique(path: Path) -> None:
    cs = load(path)
    codes = [c["code"] for c in cs["concept"]]
    assert len(codes) == len(set(codes)), "duplicate codes"
    assert cs["status"] == "active"
    assert cs["content"] == "complete"
    assert cs.get("count", len(codes)) == len(codes)
    assert cs["url"].startswith(systems.BASE + "/CodeSystem/")
    assert cs.get("version")
    assert all(c.get("display") for c in cs["concept"])


# -- the screening Questionnaire matches SCREENING.md §1 ----------------------------


def test_screening_header(screening: dict) -> None:
    assert screening["resourceType"] == "Questionnaire"
    assert screening["status"] == "active"
    assert screening["url"] == SCREENING_URL
    assert re.fullmatch(r"\d+\.\d+\.\d+", screening["version"]), "version must be semantic (x.y.z)"
    description = screening["description"]
    for author in SCREENING_CITATIONS:
        assert author in description, f"description does not cite {author}"


def test_screening_1_0_0_stays_published_as_it_was(screening: dict) -> None:
    """1.0.0 keeps its items, order and codes; 1.1.0 keeps every one of them (SCREENING.md §7), our own coding
    first (a verified standard coding may follow it: mappings/external-codes.yaml)."""
    old = load(QUESTIONNAIRES / "back-pain-screening-1.0.0.json")
    assert (old["url"], old["version"], screening["version"]) == (SCREENING_URL, "1.0.0", "1.1.0")
    assert [i["linkId"] for i in old["item"]] == ["pain", "history", "clinician", "red-flags"]
    new_items = {item["linkId"]: item for _, item in walk_items(screening["item"])}
    for _, item in walk_items(old["item"]):
        if item["type"] != "group":
            assert new_items[item["linkId"]]["code"][:len(item["code"])] == item["code"], item["linkId"]
    assert len(new_items) - len(list(walk_items(old["item"]))) == 7


def test_screening_groups(screening: dict) -> None:
    top = screening["item"]
    assert [i["linkId"] for i in top] == list(GROUPS)
    assert all(i["type"] == "group" for i in top)


def test_screening_items_match_contract(screening: dict) -> None:
    found = {item["linkId"]: (parent, item) for parent, item in walk_items(screening["item"])}
    answerable = {k for k, (_, item) in found.items() if item["type"] not in ("group", "display")}
    assert answerable == {link for _, link, _, _ in CONTRACT}, "answerable items differ from SCREENING.md §1"
    for group, link_id, kind, codes in CONTRACT:
        parent, item = found[link_id]
        assert parent == group, f"{link_id} is in {parent!r}, the contract says {group!r}"
        assert item["type"] == kind, f"{link_id} is {item['type']}, the contract says {kind}"
        options = [o["valueCoding"]["code"] for o in item.get("answerOption", [])]
        assert options == list(codes), f"{link_id}: answer codes {options} != {list(codes)}"
        if kind == "choice":
            assert "answerValueSet" not in item
            assert all(o["valueCoding"]["system"] == systems.ANSWERS for o in item["answerOption"])
        assert isinstance(item.get("text"), str) and item["text"].strip(), f"{link_id} has no patient text"
        assert not item.get("repeats", False), f"{link_id} must take a single answer"


def test_enable_when_only_where_stated(screening: dict) -> None:
    with_enable_when = {item["linkId"]: item for _, item in walk_items(screening["item"]) if "enableWhen" in item}
    assert set(with_enable_when) == ENABLE_WHEN_ITEMS
    for item in with_enable_when.values():
        assert item["enableWhen"] == NIGHT_PAIN_ENABLE_WHEN
        assert item.get("enableBehavior", "all") in ("all", "any")


def test_every_answerable_item_has_a_published_code(screening: dict, basdai: dict, item_codes: dict) -> None:
    for q in (screening, basdai):
        for _, item in walk_items(q["item"]):
            if item["type"] in ("group", "display"):
                continue
            ours = [c for c in item.get("code", []) if c.get("system") == systems.ITEMS]
            assert len(ours) == 1, f"{item['linkId']}: needs one item.code in {systems.ITEMS}"
            code = ours[0]["code"]
            assert code in item_codes, f"{item['linkId']}: code {code!r} is not in screening-items"
            if "display" in ours[0]:
                assert ours[0]["display"] == item_codes[code]["display"]


def test_integer_items_have_bounds_and_units(screening: dict) -> None:
    integers = {item["linkId"]: item for _, item in walk_items(screening["item"]) if item["type"] == "integer"}
    assert set(integers) == set(INTEGER_UNITS)
    for link_id, unit in INTEGER_UNITS.items():
        item = integers[link_id]
        low, high = extension(item, MIN_VALUE), extension(item, MAX_VALUE)
        assert low is not None and high is not None, f"{link_id}: needs minValue and maxValue"
        assert low["valueInteger"] == 0, f"{link_id}: minimum must be 0"
        assert high["valueInteger"] > low["valueInteger"]
        coding = (extension(item, UNIT) or {}).get("valueCoding")
        assert coding is not None, f"{link_id}: needs a questionnaire-unit"
        assert coding["system"] == UCUM
        assert coding["code"] == unit


def test_basdai_questionnaire(basdai: dict) -> None:
    assert basdai["status"] == "active"
    assert basdai["url"] == BASDAI_URL
    assert re.fullmatch(r"\d+\.\d+\.\d+", basdai["version"])
    assert "Garrett" in basdai["description"]
    answerable = [item for _, item in walk_items(basdai["item"]) if item["type"] not in ("group", "display")]
    assert [i["linkId"] for i in answerable] == [f"basdai-q{n}" for n in range(1, 7)]
    for item in answerable:
        assert item["type"] == "integer"
        assert extension(item, MIN_VALUE)["valueInteger"] == 0
        assert extension(item, MAX_VALUE)["valueInteger"] == 10
        assert item.get("text", "").strip()
    assert not any("enableWhen" in item for _, item in walk_items(basdai["item"]))


# -- codes: Questionnaires and mappings use only published codes -------------------------


def test_answer_codes_exist(screening: dict, basdai: dict, answer_codes: dict) -> None:
    used = 0
    for q in (screening, basdai):
        for _, item in walk_items(q["item"]):
            for option in item.get("answerOption", []):
                coding = option["valueCoding"]
                assert coding["system"] == systems.ANSWERS
                assert coding["code"] in answer_codes, f"{item['linkId']}: {coding['code']!r} not in screening-answers"
                if "display" in coding:
                    assert coding["display"] == answer_codes[coding["code"]]["display"]
                used += 1
    assert used == sum(len(c) for *_, c in CONTRACT)


def _mapping_codes(rules: dict) -> set[str]:
    """Every code a rule file writes in the results CodeSystem, read from the YAML itself."""
    codes: set[str] = set()
    for result in rules.get("results", []):
        codes.add(result["code"])
        codes.update(c["code"] for c in result.get("criteria", []))
        codes.update(a["code"] for a in result.get("also", []))
        for rule in result.get("rules", []):
            if isinstance(rule["then"], str):
                codes.add(rule["then"])
        if isinstance(result.get("otherwise"), str):
            codes.add(result["otherwise"])
    codes.update(rules.get("values", {}))
    for task in rules.get("tasks", []):
        if task["code"]["system"] in ("screening-results", systems.RESULTS):
            codes.add(task["code"]["code"])
    return codes


def test_mapping_codes_exist_in_results_codesystem(rule_files: dict, result_codes: dict) -> None:
    assert set(rule_files) == {"back-pain-screening.yaml", "basdai.yaml"}
    for name, rules in rule_files.items():
        missing = _mapping_codes(rules) - set(result_codes)
        assert not missing, f"{name} uses codes not in screening-results.json: {sorted(missing)}"
    # SCREENING.md §4: every result and outcome code is published
    published = set(result_codes)
    assert {"asas-ibp", "berlin-ibp", "spa-features", "mechanical-pattern", "red-flags", "referral-asas-2015",
            "referral-nice-ng65", "screening-outcome", "basdai"} <= published
    assert {"emergency-assessment", "urgent-assessment", "refer-rheumatology", "test-hla-b27",
            "no-referral-indicated", "not-applicable", "indeterminate"} <= published


def test_mappings_point_at_published_questionnaires(rule_files: dict) -> None:
    assert {r["questionnaire"] for r in rule_files.values()} == {SCREENING_URL, BASDAI_URL}


def test_referral_task_is_snomed_rheumatology(rule_files: dict) -> None:
    tasks = rule_files["back-pain-screening.yaml"]["tasks"]
    snomed = [t for t in tasks if t["code"]["system"] == systems.SNOMED]
    assert [(t["code"]["code"], t["priority"]) for t in snomed] == [("306290009", "routine")]


def test_results_codesystem_is_generated_from_mappings() -> None:
    committed = load(QUESTIONNAIRES / "screening-results.json")
    generated = results_codesystem(Screener().rule_sets.values())
    assert committed == generated, "screening-results.json is stale: run `python -m plugin.screening.codesystem`"


def test_every_result_has_a_citation(rule_files: dict) -> None:
    seen = set()
    for name, rules in rule_files.items():
        for result in rules["results"]:
            citation = result.get("citation")
            assert isinstance(citation, str) and citation.strip(), f"{name}: {result['code']} has no citation"
            seen.add(result["code"])
            if result["code"] in RESULT_CITATIONS:
                assert RESULT_CITATIONS[result["code"]] in citation
        for cname, condition in rules.get("conditions", {}).items():
            assert str(condition.get("citation", "")).strip(), f"{name}: condition {cname} has no citation"
    assert set(RESULT_CITATIONS) <= seen


# -- examples give the outcomes their README documents -----------------------------------


def readme_table() -> list[dict]:
    rows = []
    for line in (EXAMPLES / "README.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.append({"file": cells[0].strip("`"), "status": cells[1], "asas-2015": cells[2], "nice-ng65": cells[3]})
    return rows


EXAMPLE_ROWS = readme_table()
def expectation(cell: str) -> tuple | None:
    if m := re.fullmatch(r"`([a-z0-9-]+)`", cell):
        return ("outcome", m.group(1))
    if cell == "no write-back":
        return ("no write-back",)
    if m := re.fullmatch(r"BASDAI `([0-9.]+)`, (positive|negative)", cell):
        return ("basdai", Decimal(m.group(1)), m.group(2))
    if cell == "(n/a)":
        return None
    raise AssertionError(f"README cell not understood: {cell!r}")


# every (example, strategy) the README gives an outcome for ("(n/a)": BASDAI has no strategy)
CASES = [(row, s) for row in EXAMPLE_ROWS for s in ("asas-2015", "nice-ng65") if row[s] != "(n/a)"]


def test_readme_lists_every_example() -> None:
    listed = {row["file"] for row in EXAMPLE_ROWS}
    on_disk = {p.name for p in EXAMPLES.iterdir() if p.suffix in (".json", ".xml")}
    assert listed == on_disk
    assert len(EXAMPLE_ROWS) == len(listed)


@pytest.fixture(scope="module")
def screeners() -> dict[str, Screener]:
    return {s: Screener(Settings(strategy=s)) for s in ("asas-2015", "nice-ng65")}


@pytest.mark.parametrize(("row", "strategy"), CASES, ids=[f"{r['file']}-{s}" for r, s in CASES])
def test_example_outcome(row: dict, strategy: str, screeners: dict) -> None:
    expected = expectation(row[strategy])
    path = EXAMPLES / row["file"]
    body = path.read_bytes()
    screener = screeners[strategy]
    if path.suffix == ".json":
        qr = orjson.loads(body)
        outcome = screener.process(qr)
    else:
        outcome = screener.process_body(body, "application/fhir+xml")
        qr = None
    if qr is not None:
        assert qr["status"] == row["status"]
    entries = outcome.bundle.get("entry", [])
    assert outcome.bundle["type"] == "transaction"
    observations = {e["resource"]["code"]["coding"][0]["code"]: e["resource"]
                    for e in entries if e["resource"]["resourceType"] == "Observation"}
    if expected[0] == "no write-back":
        assert outcome.label == row["status"]
        assert entries == []
    elif expected[0] == "outcome":
        assert outcome.label == expected[1]
        value = observations["screening-outcome"]["valueCodeableConcept"]["coding"][0]
        assert (value["system"], value["code"]) == (systems.RESULTS, expected[1])
    else:
        _, score, word = expected
        assert outcome.label == word
        basdai = observations["basdai"]
        assert Decimal(str(basdai["valueQuantity"]["value"])) == score
        interpretation = basdai["interpretation"][0]["coding"][0]["code"]
        assert interpretation == {"positive": "POS", "negative": "NEG"}[word]


def test_xml_example_is_the_json_example(screeners: dict) -> None:
    screener = screeners["asas-2015"]
    from_json = screener.process(load(EXAMPLES / "qr-refer-asas.json")).bundle
    from_xml = screener.process_body((EXAMPLES / "qr-refer-asas.xml").read_bytes(), "application/fhir+xml").bundle
    urls = [[e["fullUrl"] for e in b["entry"]] for b in (from_json, from_xml)]
    assert urls[0] == urls[1]


# -- the wheel carries the definitions ------------------------------------------------


def test_wheel_carries_questionnaires_and_mappings(tmp_path: Path) -> None:
    pytest.importorskip("hatchling", reason="building the wheel needs hatchling (pip install hatchling)")
    out = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as z:
        names = set(z.namelist())
        for needed in ("plugin/_data/questionnaires/back-pain-screening.json",
                       "plugin/_data/questionnaires/basdai.json",
                       "plugin/_data/questionnaires/screening-results.json",
                       "plugin/_data/mappings/back-pain-screening.yaml",
                       "plugin/_data/mappings/basdai.yaml"):
            assert needed in names, f"the wheel lacks {needed}"
        site = tmp_path / "site"
        z.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import json, plugin\n"
        "from plugin.screening.data import questionnaires_dir, mappings_dir, definitions, rule_files\n"
        "print(json.dumps({'package': plugin.__file__, 'questionnaires': str(questionnaires_dir()),"
        " 'mappings': str(mappings_dir()), 'n_questionnaires': len(definitions('Questionnaire')),"
        " 'n_rules': len(rule_files())}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=elsewhere, env=env)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    bundled = (site / "plugin" / "_data").resolve()
    assert Path(found["package"]).resolve().is_relative_to(site.resolve())
    assert Path(found["questionnaires"]).resolve() == bundled / "questionnaires"
    assert Path(found["mappings"]).resolve() == bundled / "mappings"
    assert found["n_questionnaires"] == 3  # screening 1.0.0 and 1.1.0, BASDAI
    assert found["n_rules"] == 2
