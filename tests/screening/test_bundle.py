"""The result Bundle (SCREENING.md §4): valid FHIR R4, well linked, deterministic.

Every check is derived from SCREENING.md §4 and DESIGN.md ("FHIR rules"),
not from the builder's output; the same checks run over the examples and
over generated responses.
"""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from lxml import etree

from plugin.screening import systems
from plugin.screening.pipeline import Outcome, Screener, Settings
from tests import factory

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "questionnaires" / "examples"
CLOCK = datetime(2026, 11, 21, 8, 0, 0, tzinfo=UTC)
LATER = datetime(2027, 3, 2, 17, 45, 12, 345000, tzinfo=UTC)
STRATEGIES = ("asas-2015", "nice-ng65")
SCORED = ("completed", "amended", "entered-in-error")
OBS_STATUS = {"completed": "final", "amended": "amended", "entered-in-error": "entered-in-error"}
XHTML = "http://www.w3.org/1999/xhtml"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
R4B_ONLY = ("valueCodeableReference", "valueRatioRange", "valueInteger64")
CLOCK_KEYS = {"issued", "authoredOn", "recorded"}
NARRATIVE_ELEMENTS = {"div", "p", "b", "i", "em", "strong", "br", "span", "table", "thead", "tbody", "tfoot", "tr",
                      "th", "td", "caption", "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6", "a"}
CONDITIONAL = ("Observation", "Task", "Device")
RHEUMATOLOGY_REFERRAL = (systems.SNOMED, "306290009")

# SCREENING.md §3.E: which red flags need emergency assessment; all others urgent.
EMERGENCY_FLAGS = ("rf-saddle-numbness", "rf-bladder-bowel", "rf-leg-weakness")
URGENT_FLAGS = ("rf-fever", "rf-immunosuppression", "rf-weight-loss", "rf-cancer-history",
                "rf-night-pain-unrelieved", "rf-trauma")
RED_FLAG_ITEMS = EMERGENCY_FLAGS + URGENT_FLAGS
# SCREENING.md §3: criteria per count
CRITERIA_COUNT = {"asas-ibp": 5, "berlin-ibp": 4, "spa-features": 11, "mechanical-pattern": 5, "red-flags": 10}
COUNT_RANGE = {"asas-ibp": 5, "berlin-ibp": 4, "spa-features": 11, "mechanical-pattern": 5}
SCREENING_RESULTS = {"asas-ibp", "berlin-ibp", "spa-features", "mechanical-pattern", "red-flags", "screening-outcome"}
REFERRAL = {"asas-2015": "referral-asas-2015", "nice-ng65": "referral-nice-ng65"}
OUTCOMES = {"emergency-assessment", "urgent-assessment", "refer-rheumatology", "test-hla-b27",
            "no-referral-indicated", "not-applicable", "indeterminate"}

CHOICES = {
    "pain-duration": ("lt-6w", "6w-3m", "3m-1y", "1y-5y", "gt-5y"),
    "buttock-pain": ("none", "one-side", "alternating", "both-sides"),
    "nsaid-response": ("not-tried", "much-better", "a-little", "no-effect"),
    "hla-b27": ("positive", "negative", "not-tested"),
    "crp-elevated": ("raised", "normal", "not-tested"),
    "sacroiliitis-imaging": ("present", "absent", "not-done"),
}
BOOLEANS = (
    "onset-gradual", "better-with-exercise", "better-with-rest", "night-pain", "night-pain-eases-on-rising",
    "night-waking-second-half", "worse-with-activity", "leg-pain-below-knee", "uveitis", "psoriasis", "ibd",
    "enthesitis", "dactylitis", "peripheral-arthritis", "family-history-first-degree-spa", "family-history-related",
    *RED_FLAG_ITEMS,
)
NO_FLAGS = dict.fromkeys(RED_FLAG_ITEMS, False)
TYPICAL_IBP = {
    "pain-duration": "1y-5y", "onset-age": 27, "age": 33, "onset-gradual": True, "better-with-exercise": True,
    "better-with-rest": False, "night-pain": True, "night-pain-eases-on-rising": True,
    "night-waking-second-half": True, "morning-stiffness-minutes": 60, "buttock-pain": "alternating",
    "worse-with-activity": False, "leg-pain-below-knee": False, "nsaid-response": "much-better",
    "uveitis": False, "psoriasis": False, "ibd": False, "enthesitis": True, "dactylitis": False,
    "peripheral-arthritis": False, "family-history-first-degree-spa": True, "family-history-related": True,
    "hla-b27": "positive", "crp-elevated": "raised", "sacroiliitis-imaging": "not-done",
}
MECHANICAL = {
    "pain-duration": "3m-1y", "onset-age": 41, "age": 44, "onset-gradual": False, "better-with-exercise": False,
    "better-with-rest": True, "night-pain": False, "morning-stiffness-minutes": 5, "buttock-pain": "none",
    "worse-with-activity": True, "leg-pain-below-knee": True, "nsaid-response": "a-little",
    "uveitis": False, "psoriasis": False, "ibd": False, "enthesitis": False, "dactylitis": False,
    "peripheral-arthritis": False, "family-history-first-degree-spa": False, "family-history-related": False,
    "hla-b27": "negative", "crp-elevated": "normal", "sacroiliitis-imaging": "absent",
}
NICE_THREE = {  # exactly 3 NICE NG65 criteria, HLA-B27 not tested
    **MECHANICAL, "onset-age": 40, "better-with-exercise": True, "psoriasis": True, "enthesitis": True,
    "hla-b27": "not-tested",
}

SCREENING_CASES: dict[str, dict] = {
    "ibp-no-flags": {**TYPICAL_IBP, **NO_FLAGS},
    "ibp-all-flags": {**TYPICAL_IBP, **dict.fromkeys(RED_FLAG_ITEMS, True), "onset-age": 52},
    "ibp-all-item-flags": {**TYPICAL_IBP, **dict.fromkeys(RED_FLAG_ITEMS, True)},
    "mechanical-no-flags": {**MECHANICAL, **NO_FLAGS},
    "nice-three": {**NICE_THREE, **NO_FLAGS},
    "urgent-only": {**MECHANICAL, **NO_FLAGS, "rf-weight-loss": True},
    "emergency-only": {**MECHANICAL, **NO_FLAGS, "rf-bladder-bowel": True},
    "flags-unanswered": {**TYPICAL_IBP},
    "some-flags-unanswered": {**MECHANICAL, "rf-fever": False, "rf-trauma": False},
    "old-onset": {**MECHANICAL, **NO_FLAGS, "onset-age": 63, "age": 64},
    "acute": {**TYPICAL_IBP, **NO_FLAGS, "pain-duration": "lt-6w"},
    "none-answered": {},
    "clinician-only": {"hla-b27": "positive", "crp-elevated": "raised", "sacroiliitis-imaging": "present"},
}
BASDAI_CASES: dict[str, dict] = {
    "basdai-complete": {"basdai-q1": 5, "basdai-q2": 6, "basdai-q3": 3, "basdai-q4": 4, "basdai-q5": 7,
                        "basdai-q6": 6},
    "basdai-low": {f"basdai-q{n}": 1 for n in range(1, 7)},
    "basdai-max": {f"basdai-q{n}": 10 for n in range(1, 7)},
    "basdai-incomplete": {"basdai-q1": 5, "basdai-q2": 6, "basdai-q4": 4, "basdai-q5": 7, "basdai-q6": 6},
    "basdai-none": {},
}
IDENTITIES: dict[str, dict] = {
    "id": {"id": "qr-generated-1"},
    "identifier": {"identifier": {"system": "urn:example:portal", "value": "response-0001"}},
    "anonymous": {},
    "encounter": {"id": "qr-generated-2", "encounter": {"reference": "Encounter/enc-7"}},
}


# -- helpers ------------------------------------------------------------------------


@cache
def screener(strategy: str = "asas-2015", clock: datetime = CLOCK) -> Screener:
    return Screener(Settings(strategy=strategy), clock=lambda: clock)


@cache
def result_concepts() -> dict[str, dict]:
    cs = orjson.loads((ROOT / "questionnaires" / "screening-results.json").read_bytes())
    return {c["code"]: c for c in cs["concept"]}


@cache
def item_concepts() -> dict[str, dict]:
    cs = orjson.loads((ROOT / "questionnaires" / "screening-items.json").read_bytes())
    return {c["code"]: c for c in cs["concept"]}


def make_qr(answers: dict, url: str = factory.SCREENING, status: str = "completed", **extra: Any) -> dict:
    qr = factory.response(answers, url=url, status=status, **extra)
    if not qr["item"]:  # FHIR forbids empty arrays; a response with no answers has no items
        del qr["item"]
    return qr


def entries_of(bundle: dict) -> list[dict]:
    return bundle.get("entry", [])


def resources(bundle: dict, resource_type: str) -> list[dict]:
    return [e for e in entries_of(bundle) if e["resource"]["resourceType"] == resource_type]


def observations(bundle: dict) -> dict[str, dict]:
    """result code -> entry"""
    found = {}
    for e in resources(bundle, "Observation"):
        coding = [c for c in e["resource"]["code"]["coding"] if c["system"] == systems.RESULTS]
        assert len(coding) == 1
        assert coding[0]["code"] not in found, f"two Observations for {coding[0]['code']}"
        found[coding[0]["code"]] = e
    return found


def walk(node: Any, path: tuple = ()):
    """Yields (path, key, value) for every key of every object."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, (*path, i))


def differences(a: Any, b: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [(*path, k) for k in set(a) ^ set(b)]
        return [d for k in a for d in differences(a[k], b[k], (*path, k))]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [path]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, (*path, i))]
    return [] if a == b else [path]


def identifiers(bundle: dict) -> set[str]:
    """Identifier values and fullUrls of what was written for this response (not the shared Device)."""
    found = set()
    for e in entries_of(bundle):
        r = e["resource"]
        if r["resourceType"] == "Device":
            continue
        found.add(e["fullUrl"])
        ident = r.get("identifier")
        for i in ident if isinstance(ident, list) else [ident] if ident else []:
            found.add(f"{i.get('system')}|{i['value']}")
    return found


def coding(concept: dict, system: str) -> dict | None:
    found = [c for c in concept.get("coding", []) if c.get("system") == system]
    return found[0] if found else None


def red_flags_expected(answers: dict) -> bool | None:
    """SCREENING.md §3.E and §4: true if any flag present, false only when every flag is known absent."""
    onset = answers.get("onset-age")
    flags = [answers.get(k) for k in RED_FLAG_ITEMS] + [None if onset is None else onset >= 50]
    if True in flags:
        return True
    return None if None in flags else False


def basdai_expected(answers: dict) -> Decimal | None:
    """SCREENING.md §5: (Q1 + Q2 + Q3 + Q4 + (Q5 + Q6) / 2) / 5, one decimal; any missing -> none."""
    q = [answers.get(f"basdai-q{n}") for n in range(1, 7)]
    if None in q:
        return None
    total = (Decimal(q[0] + q[1] + q[2] + q[3]) + Decimal(q[4] + q[5]) / 2) / 5
    return total.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


# -- the checks every Bundle must pass --------------------------------------------------


def check_valid_r4(bundle: dict) -> None:
    for e in entries_of(bundle):
        resource = e["resource"]
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    get_fhir_model_class("Bundle").model_validate(bundle)
    for _, key, _ in walk(bundle):
        assert key not in R4B_ONLY, f"R4B-only element {key} in the Bundle"
    text = orjson.dumps(bundle).decode()
    for key in R4B_ONLY:
        assert f'"{key}"' not in text


def check_structure(qr: dict, bundle: dict) -> None:
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "transaction"
    entries = entries_of(bundle)
    full_urls = [e["fullUrl"] for e in entries]
    assert len(set(full_urls)) == len(full_urls), "fullUrls repeat"
    for e in entries:
        assert e["fullUrl"].startswith("urn:uuid:")
        assert str(uuid.UUID(e["fullUrl"][9:])) == e["fullUrl"][9:], "fullUrl is not urn:uuid:<lowercase uuid>"
        resource, request = e["resource"], e["request"]
        kind = resource["resourceType"]
        assert request["method"] in ("POST", "PUT")
        if kind in CONDITIONAL:
            ident = resource["identifier"][0]
            assert ident["system"] and ident["value"]
            if kind == "Observation" and qr["status"] != "completed" and request["method"] == "PUT":
                # an amendment or withdrawal may overwrite the stored result (test_lifecycle_updates_results)
                assert request == {"method": "PUT", "url": f"Observation?identifier={ident['system']}|{ident['value']}"}
                continue
            assert request["method"] == "POST"
            assert request["url"] == kind
            assert request["ifNoneExist"] == f"identifier={ident['system']}|{ident['value']}"
        elif kind == "QuestionnaireResponse":
            if qr.get("id"):
                assert request == {"method": "PUT", "url": f"QuestionnaireResponse/{qr['id']}"}
                assert resource["id"] == qr["id"]
            else:
                assert request["method"] == "POST"
                assert request["url"] == "QuestionnaireResponse"
                ident = resource["identifier"]
                assert isinstance(ident, dict), "QuestionnaireResponse.identifier is a single Identifier in R4"
                assert ident["system"] and ident["value"]
                assert request["ifNoneExist"] == f"identifier={ident['system']}|{ident['value']}"
        elif kind == "Provenance":
            assert request["method"] == "POST" and request["url"] == "Provenance"
            assert request.get("ifNoneExist"), "replays must not add a second Provenance"
        else:
            raise AssertionError(f"unexpected {kind} in the Bundle")
    known = set(full_urls)
    for path, key, value in walk(bundle):
        if key == "reference" and isinstance(value, str) and value.startswith("urn:uuid:"):
            assert value in known, f"{'.'.join(map(str, path))} -> {value} resolves to no entry"


def check_written(qr: dict, bundle: dict, strategy: str | None) -> None:
    """Everything SCREENING.md §4 says about a scored response's resources."""
    status = qr["status"]
    devices = resources(bundle, "Device")
    responses = resources(bundle, "QuestionnaireResponse")
    provenances = resources(bundle, "Provenance")
    assert len(devices) == 1 and len(responses) == 1 and len(provenances) == 1
    device_url, qr_entry = devices[0]["fullUrl"], responses[0]
    qr_refs = {qr_entry["fullUrl"]} | ({f"QuestionnaireResponse/{qr['id']}"} if qr.get("id") else set())
    # the response written back is the response received (plus an identifier when it had none)
    written_qr = dict(qr_entry["resource"])
    if not qr.get("id") and not qr.get("identifier"):
        written_qr.pop("identifier")
    assert written_qr == qr

    obs = observations(bundle)
    tasks = [e["resource"] for e in resources(bundle, "Task")]
    is_screening = qr["questionnaire"].partition("|")[0] == factory.SCREENING
    if is_screening:
        assert SCREENING_RESULTS | {REFERRAL[strategy]} <= set(obs)
        assert REFERRAL[{"asas-2015": "nice-ng65", "nice-ng65": "asas-2015"}[strategy]] not in obs, \
            "only the selected strategy's decision is written"
    else:
        assert set(obs) == {"basdai"}
    concepts = result_concepts()
    for code, entry in obs.items():
        o = entry["resource"]
        assert o["status"] == OBS_STATUS[status]
        assert [coding(c, "http://terminology.hl7.org/CodeSystem/observation-category")["code"]
                for c in o["category"]] == ["survey"]
        assert o["subject"]["reference"] == qr["subject"]["reference"]
        if qr.get("encounter"):
            assert o["encounter"]["reference"] == qr["encounter"]["reference"]
        else:
            assert "encounter" not in o
        assert o["effectiveDateTime"] == qr["authored"]
        assert [d["reference"] for d in o["derivedFrom"]] and {d["reference"] for d in o["derivedFrom"]} <= qr_refs
        ident = o["identifier"][0]
        assert ident["system"] == systems.SID_OBSERVATION
        for i in o.get("interpretation", []):
            assert [c["system"] for c in i["coding"]] == [INTERPRETATION]
            assert i["coding"][0]["code"] in ("POS", "NEG", "IND")
        has_value = [k for k in o if k.startswith("value")]
        assert len(has_value) + ("dataAbsentReason" in o) == 1, f"{code}: value xor dataAbsentReason"
        for component in o.get("component", []):
            values = [k for k in component if k.startswith("value")]
            assert len(values) + ("dataAbsentReason" in component) == 1, \
                f"{code}: a component needs a value or a dataAbsentReason, never both"
            assert len(values) <= 1
        # codes are published (their displays: test_codings_use_published_displays)
        for c in codings(o):
            table = {systems.RESULTS: concepts, systems.ITEMS: item_concepts()}.get(c["system"])
            if table is not None:
                assert c["code"] in table, f"{c['code']} not in {c['system']}"
        # readable narrative naming the result
        div = check_narrative(o)
        assert concepts[code]["display"] in "".join(div.itertext())
        if code in ("asas-ibp", "berlin-ibp") and "valueInteger" in o:
            assert o.get("interpretation"), f"{code}: a count with a threshold needs its interpretation"
        if code in COUNT_RANGE:
            assert len(o["component"]) >= CRITERIA_COUNT[code]
            if "valueInteger" in o:
                criteria = o["component"][: CRITERIA_COUNT[code]]
                assert 0 <= o["valueInteger"] <= COUNT_RANGE[code]
                assert o["valueInteger"] == sum(c.get("valueBoolean") is True for c in criteria)

    if is_screening:
        check_red_flags(obs["red-flags"]["resource"])
        outcome = obs["screening-outcome"]
        members = {m["reference"] for m in outcome["resource"]["hasMember"]}
        assert members == {e["fullUrl"] for c, e in obs.items() if c != "screening-outcome"}
        assert not any("hasMember" in e["resource"] for c, e in obs.items() if c != "screening-outcome")
        check_outcome(obs, strategy)
        check_tasks(qr, tasks, obs, device_url, strategy)
    else:
        assert tasks == []

    provenance = provenances[0]["resource"]
    targets = {t["reference"] for t in provenance["target"]}
    assert targets & qr_refs, "Provenance.target misses the QuestionnaireResponse"
    assert {e["fullUrl"] for e in obs.values()} <= targets
    assert {e["fullUrl"] for e in resources(bundle, "Task")} <= targets
    assert [a["who"]["reference"] for a in provenance["agent"]] == [device_url]
    sources = [e for e in provenance["entity"] if e["role"] == "source"]
    assert len(sources) == 1 and sources[0]["what"]["reference"] in qr_refs


def codings(node: Any) -> list[dict]:
    return [c for _, key, value in walk(node) if key == "coding" for c in value]


def check_narrative(resource: dict) -> etree._Element:
    """A readable XHTML narrative, with only the basic elements FHIR allows (txt-1, txt-2)."""
    assert resource["text"]["status"] in ("generated", "extensions", "additional")
    div = etree.fromstring(resource["text"]["div"].encode(), parser=etree.XMLParser(resolve_entities=False,
                                                                                   no_network=True))
    assert div.tag == f"{{{XHTML}}}div"
    for element in div.iter():
        assert isinstance(element.tag, str), "comments or processing instructions in a narrative"
        assert etree.QName(element).namespace == XHTML
        assert etree.QName(element).localname in NARRATIVE_ELEMENTS, element.tag
    assert "".join(div.itertext()).strip()
    return div


def check_red_flags(o: dict) -> None:
    components = {coding(c["code"], systems.RESULTS)["code"]: c for c in o["component"]}
    assert len(components) == CRITERIA_COUNT["red-flags"]
    for code, component in components.items():
        urgency = [e for e in component.get("extension", []) if e["url"] == systems.EXT_URGENCY]
        assert len(urgency) == 1, f"red-flag component {code} has no urgency"
        assert urgency[0]["valueCode"] == ("emergency" if code in EMERGENCY_FLAGS else "urgent")
    present = [c.get("valueBoolean") for c in components.values()]
    unknown = ["dataAbsentReason" in c for c in components.values()]
    interpretation = o["interpretation"][0]["coding"][0]["code"]
    if True in present:
        assert o["valueBoolean"] is True and interpretation == "POS"
    elif any(unknown):
        assert "valueBoolean" not in o and "dataAbsentReason" in o and interpretation == "IND"
    else:
        assert o["valueBoolean"] is False and interpretation == "NEG"


def decision(entry: dict) -> str:
    return coding(entry["resource"]["valueCodeableConcept"], systems.RESULTS)["code"]


def check_outcome(obs: dict, strategy: str) -> None:
    """SCREENING.md §4: precedence of the outcome codes."""
    flags = obs["red-flags"]["resource"]
    components = {coding(c["code"], systems.RESULTS)["code"]: c for c in flags["component"]}
    outcome, referral = decision(obs["screening-outcome"]), decision(obs[REFERRAL[strategy]])
    assert outcome in OUTCOMES
    if any(components[f].get("valueBoolean") is True for f in EMERGENCY_FLAGS):
        assert outcome == "emergency-assessment"
    elif flags.get("valueBoolean") is True:
        assert outcome == "urgent-assessment"
    elif "valueBoolean" not in flags:
        assert outcome == "indeterminate"
    else:
        assert outcome == referral
    if strategy == "asas-2015":
        assert referral != "test-hla-b27"


def task_kind(task: dict) -> str:
    c = task["code"]["coding"][0]
    if (c["system"], c["code"]) == RHEUMATOLOGY_REFERRAL:
        return "referral"
    if c["system"] == systems.RESULTS and c["code"] == "hla-b27-test":
        return "hla-b27-test"
    if c["system"] == systems.RESULTS and c["code"] == "clinical-review":
        return "review-" + task["priority"]
    if c["system"] == systems.RESULTS and c["code"] == "ask-red-flags":
        return "ask-" + task["priority"]
    raise AssertionError(f"unexpected Task code {c}")


def check_tasks(qr: dict, tasks: list[dict], obs: dict, device_url: str, strategy: str) -> None:
    outcome_url = obs["screening-outcome"]["fullUrl"]
    for t in tasks:
        assert t["status"] == "requested"
        assert t["intent"] == "proposal"
        assert t["for"]["reference"] == qr["subject"]["reference"]
        assert t["reasonReference"]["reference"] == outcome_url
        assert t["requester"]["reference"] == device_url
        assert isinstance(t.get("description"), str) and t["description"].strip()
        assert t["identifier"][0]["system"] == systems.SID_TASK
        check_narrative(t)
    kinds = sorted(task_kind(t) for t in tasks)
    for t in tasks:
        if task_kind(t) == "referral":
            assert t["priority"] == "routine"
            assert t["code"]["coding"][0]["code"] == "306290009"
    if qr["status"] == "entered-in-error":
        assert kinds == []
        return
    expected = []
    outcome, referral = decision(obs["screening-outcome"]), decision(obs[REFERRAL[strategy]])
    if outcome == "emergency-assessment":
        expected.append("review-stat")
    if outcome == "urgent-assessment":
        expected.append("review-urgent")
    if referral == "refer-rheumatology":
        expected.append("referral")
    if referral == "test-hla-b27":
        expected.append("hla-b27-test")
    flags = obs["red-flags"]["resource"]
    if "valueBoolean" not in flags:  # none present, some unanswered: ask them, urgently if an emergency one
        emergency_unknown = any("dataAbsentReason" in c and c["extension"][0]["valueCode"] == "emergency"
                                for c in flags["component"])
        expected.append("ask-urgent" if emergency_unknown else "ask-routine")
    assert kinds == sorted(expected)


def check_all(qr: dict, outcome: Outcome, strategy: str | None) -> None:
    bundle = outcome.bundle
    check_valid_r4(bundle)
    check_structure(qr, bundle)
    if qr["status"] in SCORED:
        assert entries_of(bundle), "a scored response writes results"
        check_written(qr, bundle, strategy)
    else:
        assert entries_of(bundle) == []


# -- examples ------------------------------------------------------------------------

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.json"))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_bundles(path: Path, strategy: str) -> None:
    qr = orjson.loads(path.read_bytes())
    check_all(qr, screener(strategy).process(copy.deepcopy(qr)), strategy)


def test_xml_example_bundle() -> None:
    outcome = screener().process_body((EXAMPLES / "qr-refer-asas.xml").read_bytes(), "application/fhir+xml")
    qr = orjson.loads((EXAMPLES / "qr-refer-asas.json").read_bytes())
    check_valid_r4(outcome.bundle)
    check_structure(qr, outcome.bundle)


# -- generated responses -----------------------------------------------------------------

GENERATED = [
    (name, identity, status, strategy)
    for name in SCREENING_CASES
    for identity in IDENTITIES
    for status in SCORED
    for strategy in STRATEGIES
    if identity == "id" or status == "completed"
]


@pytest.mark.parametrize(("name", "identity", "status", "strategy"), GENERATED,
                         ids=["-".join(c) for c in GENERATED])
def test_generated_screening_bundles(name: str, identity: str, status: str, strategy: str) -> None:
    answers = SCREENING_CASES[name]
    qr = make_qr(answers, status=status, **copy.deepcopy(IDENTITIES[identity]))
    check_all(qr, screener(strategy).process(copy.deepcopy(qr)), strategy)
    flags = observations(screener(strategy).process(copy.deepcopy(qr)).bundle)["red-flags"]["resource"]
    assert flags.get("valueBoolean") == red_flags_expected(answers)


@pytest.mark.parametrize("status", SCORED)
@pytest.mark.parametrize("name", BASDAI_CASES)
def test_generated_basdai_bundles(name: str, status: str) -> None:
    answers = BASDAI_CASES[name]
    qr = make_qr(answers, url=factory.BASDAI, status=status, id=f"qr-{name}")
    outcome = screener().process(copy.deepcopy(qr))
    check_all(qr, outcome, None)
    o = observations(outcome.bundle)["basdai"]["resource"]
    expected = basdai_expected(answers)
    interpretation = o["interpretation"][0]["coding"][0]["code"]
    if expected is None:
        assert "valueQuantity" not in o and "dataAbsentReason" in o
        assert interpretation == "IND"
    else:
        value = Decimal(str(o["valueQuantity"]["value"]))
        assert value == expected and 0 <= value <= 10
        assert value == value.quantize(Decimal("0.1"))
        assert interpretation == ("POS" if expected >= 4 else "NEG")


@pytest.mark.parametrize("status", ["in-progress", "stopped"])
@pytest.mark.parametrize("url", [factory.SCREENING, factory.BASDAI])
def test_unfinished_responses_write_nothing(status: str, url: str) -> None:
    """Without a red flag reported, an unfinished response writes nothing (SCREENING.md §4 lifecycle)."""
    answers = SCREENING_CASES["ibp-no-flags"] if url == factory.SCREENING else BASDAI_CASES["basdai-complete"]
    qr = make_qr(answers, url=url, status=status, id="qr-unfinished")
    outcome = screener().process(qr)
    assert outcome.bundle["type"] == "transaction"
    assert entries_of(outcome.bundle) == []
    get_fhir_model_class("Bundle").model_validate(outcome.bundle)


def test_entered_in_error_has_no_tasks() -> None:
    for name in ("ibp-all-flags", "ibp-no-flags", "nice-three", "emergency-only"):
        for strategy in STRATEGIES:
            qr = make_qr(SCREENING_CASES[name], status="entered-in-error", id="qr-eie")
            bundle = screener(strategy).process(qr).bundle
            assert resources(bundle, "Task") == []
            assert {e["resource"]["status"] for e in resources(bundle, "Observation")} == {"entered-in-error"}


def test_tasks_for_each_kind_of_outcome() -> None:
    """The generated cases reach every Task kind of SCREENING.md §4, so check_tasks is not vacuous."""
    seen = set()
    for answers in SCREENING_CASES.values():
        for strategy in STRATEGIES:
            bundle = screener(strategy).process(make_qr(answers, id="qr-kinds")).bundle
            seen |= {task_kind(e["resource"]) for e in resources(bundle, "Task")}
    assert seen == {"review-stat", "review-urgent", "referral", "hla-b27-test", "ask-urgent"}
    # red flags do not hide the axSpA decision (SCREENING.md §4)
    bundle = screener().process(make_qr(SCREENING_CASES["ibp-all-item-flags"], id="qr-kinds")).bundle
    assert sorted(task_kind(e["resource"]) for e in resources(bundle, "Task")) == ["referral", "review-stat"]


# -- property: any valid response gives a valid, consistent Bundle ------------------------


@st.composite
def screening_answers(draw: st.DrawFn) -> dict:
    answers: dict[str, Any] = {}
    for link_id, codes in CHOICES.items():
        answers[link_id] = draw(st.none() | st.sampled_from(codes))
    for link_id in BOOLEANS:
        answers[link_id] = draw(st.none() | st.booleans())
    answers["onset-age"] = draw(st.none() | st.integers(10, 70) | st.integers(0, 120))
    answers["age"] = draw(st.none() | st.integers(16, 80) | st.integers(0, 120))
    answers["morning-stiffness-minutes"] = draw(st.none() | st.integers(0, 90) | st.integers(0, 1440))
    if answers["night-pain"] is not True:  # disabled by enableWhen: not sent
        answers["night-pain-eases-on-rising"] = answers["night-waking-second-half"] = None
    return answers


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    answers=screening_answers(),
    status=st.sampled_from(SCORED),
    strategy=st.sampled_from(STRATEGIES),
    identity=st.sampled_from(sorted(IDENTITIES)),
)
def test_property_screening(answers: dict, status: str, strategy: str, identity: str) -> None:
    qr = make_qr(answers, status=status, **copy.deepcopy(IDENTITIES[identity]))
    outcome = screener(strategy).process(copy.deepcopy(qr))
    check_all(qr, outcome, strategy)
    flags = observations(outcome.bundle)["red-flags"]["resource"]
    assert flags.get("valueBoolean") == red_flags_expected(answers)
    again = screener(strategy).process(copy.deepcopy(qr))
    assert orjson.dumps(again.bundle) == orjson.dumps(outcome.bundle)


@hsettings(max_examples=25, deadline=None)
@given(answers=st.fixed_dictionaries({f"basdai-q{n}": st.none() | st.integers(0, 10) for n in range(1, 7)}),
       status=st.sampled_from(SCORED))
def test_property_basdai(answers: dict, status: str) -> None:
    qr = make_qr(answers, url=factory.BASDAI, status=status)
    outcome = screener().process(copy.deepcopy(qr))
    check_all(qr, outcome, None)
    o = observations(outcome.bundle)["basdai"]["resource"]
    expected = basdai_expected(answers)
    if expected is None:
        assert "valueQuantity" not in o
    else:
        assert Decimal(str(o["valueQuantity"]["value"])) == expected


# -- codes and displays --------------------------------------------------------------------


@pytest.mark.parametrize("url", [factory.SCREENING, factory.BASDAI])
def test_codings_use_published_displays(url: str) -> None:
    """A Coding's display is the one its CodeSystem defines (the readable label goes in CodeableConcept.text)."""
    answers = SCREENING_CASES["ibp-all-flags"] if url == factory.SCREENING else BASDAI_CASES["basdai-complete"]
    bundle = screener().process(make_qr(answers, url=url, id="qr-displays")).bundle
    tables = {systems.RESULTS: result_concepts(), systems.ITEMS: item_concepts()}
    wrong = []
    for e in entries_of(bundle):
        if e["resource"]["resourceType"] == "QuestionnaireResponse":
            continue
        for c in codings(e["resource"]):
            table = tables.get(c["system"])
            if table is not None and "display" in c and c["display"] != table[c["code"]]["display"]:
                wrong.append(f"{c['code']}: {c['display']!r} != {table[c['code']]['display']!r}")
    assert not wrong, "displays differ from the CodeSystem: " + "; ".join(wrong)


# -- lifecycle statuses ------------------------------------------------------------------


@pytest.mark.parametrize("status", ["amended", "entered-in-error"])
def test_lifecycle_updates_results(status: str) -> None:
    """SCREENING.md §4: an amended QR *updates* the same Observations (status amended); an
    entered-in-error QR *marks* them entered-in-error. Those Observations already exist on the server
    (written when the QR was completed), so a conditional create (POST + ifNoneExist) would leave them
    unchanged: the entries must overwrite them, i.e. a conditional update on the same identifier."""
    bundle = screener().process(make_qr(SCREENING_CASES["ibp-no-flags"], status=status, id="qr-life")).bundle
    for e in resources(bundle, "Observation"):
        ident = e["resource"]["identifier"][0]
        assert e["request"] == {"method": "PUT", "url": f"Observation?identifier={ident['system']}|{ident['value']}"}


@pytest.mark.parametrize("status", SCORED)
def test_observation_status_follows_response_status(status: str) -> None:
    qr = make_qr(SCREENING_CASES["ibp-no-flags"], status=status, id="qr-status")
    bundle = screener().process(qr).bundle
    assert {e["resource"]["status"] for e in resources(bundle, "Observation")} == {OBS_STATUS[status]}


def test_amended_response_updates_the_same_results() -> None:
    """SCREENING.md §4: an amended QR (a new version of the same QR) updates the same Observations."""
    first = screener().process(make_qr(SCREENING_CASES["ibp-no-flags"], id="qr-life")).bundle
    changed = {**SCREENING_CASES["ibp-no-flags"], "enthesitis": False, "onset-age": 30}
    amended = screener().process(make_qr(changed, status="amended", id="qr-life")).bundle
    withdrawn = screener().process(make_qr(changed, status="entered-in-error", id="qr-life")).bundle

    def obs_ids(bundle: dict) -> dict[str, str]:
        return {code: e["resource"]["identifier"][0]["value"] for code, e in observations(bundle).items()}

    assert obs_ids(first) == obs_ids(amended) == obs_ids(withdrawn)
    assert {e["fullUrl"] for e in resources(first, "Observation")} == \
        {e["fullUrl"] for e in resources(amended, "Observation")}
    # the amendment itself is recorded: its Provenance is not taken for the first one's
    conditions = [resources(b, "Provenance")[0]["request"]["ifNoneExist"] for b in (first, amended, withdrawn)]
    assert len(set(conditions)) == 3


# -- determinism -----------------------------------------------------------------------


@pytest.mark.parametrize("identity", sorted(IDENTITIES))
def test_same_clock_same_bundle(identity: str) -> None:
    qr = make_qr(SCREENING_CASES["ibp-all-flags"], **copy.deepcopy(IDENTITIES[identity]))
    a = Screener(clock=lambda: CLOCK).process(copy.deepcopy(qr)).bundle
    b = Screener(clock=lambda: CLOCK).process(copy.deepcopy(qr)).bundle
    assert orjson.dumps(a) == orjson.dumps(b)


@pytest.mark.parametrize("later", [LATER, datetime(2026, 11, 21, 10, 0, tzinfo=timezone(timedelta(hours=2)))],
                         ids=["later", "other-zone"])
@pytest.mark.parametrize("identity", sorted(IDENTITIES))
def test_other_clock_changes_only_timestamps(identity: str, later: datetime) -> None:
    qr = make_qr(SCREENING_CASES["ibp-all-flags"], **copy.deepcopy(IDENTITIES[identity]))
    a = screener("asas-2015", CLOCK).process(copy.deepcopy(qr)).bundle
    b = screener("asas-2015", later).process(copy.deepcopy(qr)).bundle
    check_valid_r4(b)
    diff = differences(a, b)
    if later != CLOCK:
        assert diff, "the clock is not used at all"
    keys = {path[-1] for path in diff}
    assert keys <= CLOCK_KEYS, f"the clock changed {sorted(map(str, keys - CLOCK_KEYS))}"
    issued = {e["resource"]["issued"] for e in resources(b, "Observation")}
    assert len(issued) == 1
    assert datetime.fromisoformat(issued.pop()) == later


@pytest.mark.parametrize("identity", ["anonymous", "identifier", "id"])
def test_formatting_does_not_change_identifiers(identity: str) -> None:
    qr = make_qr(SCREENING_CASES["nice-three"], **copy.deepcopy(IDENTITIES[identity]))
    compact = orjson.dumps(qr)
    pretty = json.dumps(qr, indent=4).replace("\n", "\r\n   ").encode()
    reordered = json.dumps(dict(reversed(list(qr.items()))), indent=1, sort_keys=True).encode()
    bundles = [screener("nice-ng65").process_body(body, "application/fhir+json").bundle
               for body in (compact, pretty, reordered)]
    assert identifiers(bundles[0]) == identifiers(bundles[1]) == identifiers(bundles[2])
    assert bundles[0] == bundles[1] == bundles[2]


@pytest.mark.parametrize("kind", ["id", "identifier", "anonymous-answers", "anonymous-authored"])
def test_different_responses_different_identifiers(kind: str) -> None:
    answers = SCREENING_CASES["ibp-all-flags"]
    if kind == "id":
        a, b = make_qr(answers, id="qr-one"), make_qr(answers, id="qr-two")
    elif kind == "identifier":
        a = make_qr(answers, identifier={"system": "urn:example:portal", "value": "1"})
        b = make_qr(answers, identifier={"system": "urn:example:portal", "value": "2"})
    elif kind == "anonymous-answers":
        a, b = make_qr(answers), make_qr({**answers, "age": 60})
    else:
        a, b = make_qr(answers), make_qr(answers, authored="2026-11-22T09:30:00Z")
    ids_a, ids_b = (identifiers(screener().process(q).bundle) for q in (a, b))
    assert ids_a and ids_b
    assert not ids_a & ids_b, f"shared identifiers: {sorted(ids_a & ids_b)}"


def test_anonymous_response_gets_a_stable_identifier() -> None:
    qr = make_qr(SCREENING_CASES["mechanical-no-flags"])
    assert "id" not in qr and "identifier" not in qr
    before = copy.deepcopy(qr)
    found = []
    for clock in (CLOCK, LATER):
        for strategy in STRATEGIES:
            bundle = screener(strategy, clock).process(qr).bundle
            entry = resources(bundle, "QuestionnaireResponse")[0]
            ident = entry["resource"]["identifier"]
            assert ident["system"] and ident["value"]
            assert entry["request"]["ifNoneExist"] == f"identifier={ident['system']}|{ident['value']}"
            found.append((entry["fullUrl"], ident["system"], ident["value"]))
    assert len(set(found)) == 1
    assert qr == before, "processing must not change the caller's response"


def test_existing_identifier_is_kept() -> None:
    ident = {"system": "urn:example:portal", "value": "resp-42"}
    qr = make_qr(SCREENING_CASES["ibp-no-flags"], identifier=dict(ident))
    entry = resources(screener().process(qr).bundle, "QuestionnaireResponse")[0]
    assert entry["resource"]["identifier"] == ident
    assert entry["request"]["ifNoneExist"] == "identifier=urn:example:portal|resp-42"


# ------------------------------------------------------------------ identity, references, safety


def test_another_patient_reusing_a_response_id_never_reaches_the_first_patients_results() -> None:
    answers = {"pain-duration": "1y-5y", "onset-age": 30, "better-with-exercise": True}
    first = screener().process(make_qr(answers, id="shared-id")).bundle
    other = screener().process(make_qr(answers, id="shared-id", subject={"reference": "Patient/other"})).bundle
    assert not (identifiers(first) - {"urn:uuid:"}) & identifiers(other)


def test_provenance_targets_the_response_as_the_results_reference_it() -> None:
    bundle = screener().process(make_qr({"pain-duration": "lt-6w"}, id="qr-1")).bundle
    (provenance,) = resources(bundle, "Provenance")
    targets = [t["reference"] for t in provenance["resource"]["target"]]
    assert targets[0] == "QuestionnaireResponse/qr-1"
    for entry in observations(bundle).values():
        assert entry["resource"]["derivedFrom"] == [{"reference": "QuestionnaireResponse/qr-1"}]
        assert entry["fullUrl"] in targets


def test_the_callers_narrative_is_not_written_back() -> None:
    text = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml"><script>x()</script></div>'}
    bundle = screener().process(make_qr({"pain-duration": "lt-6w"}, text=text)).bundle
    (qr_entry,) = resources(bundle, "QuestionnaireResponse")
    assert "text" not in qr_entry["resource"]


def test_a_callers_identifier_is_escaped_in_the_conditional_create() -> None:
    ident = {"system": "http://portal.example/ids", "value": "a&b,c|d"}
    bundle = screener().process(make_qr({"pain-duration": "lt-6w"}, identifier=ident)).bundle
    (qr_entry,) = resources(bundle, "QuestionnaireResponse")
    assert qr_entry["resource"]["identifier"] == ident  # kept as the caller sent it
    assert qr_entry["request"]["ifNoneExist"] == "identifier=http://portal.example/ids|a%26b%5C%2Cc%5C|d"


def test_red_flag_review_names_the_flags_left_unanswered() -> None:
    answers = {flag: False for flag in RED_FLAG_ITEMS} | {"rf-fever": True, "rf-saddle-numbness": None}
    bundle = screener().process(make_qr(answers | {"onset-age": 30})).bundle
    (task,) = resources(bundle, "Task")
    description = task["resource"]["description"]
    assert task["resource"]["priority"] == "urgent"
    assert "Fever, chills or night sweats" in description.split("Not answered")[0]
    assert "Not answered, ask the patient: Saddle numbness or tingling." in description


@pytest.mark.parametrize("answers", [{"pain-duration": "lt-6w", "age": 30}, {"pain-duration": "1y-5y", "age": 60}])
def test_berlin_strong_positive_is_not_applicable_when_berlin_does_not_apply(answers: dict) -> None:
    """Not chronic, or over 50: Berlin does not apply, and its strong-positive component says so, not "false"."""
    full = {**SCREENING_CASES["ibp-no-flags"], **answers}
    obs = observations(screener().process(make_qr(full)).bundle)["berlin-ibp"]["resource"]
    (strong,) = [c for c in obs["component"] if c["code"]["coding"][0]["code"] == "berlin-ibp-strong-positive"]
    assert "valueBoolean" not in strong
    assert strong["dataAbsentReason"]["coding"][0]["code"] == "not-applicable"
    assert obs["dataAbsentReason"]["coding"][0]["code"] == "not-applicable"


def test_a_1_0_0_response_has_no_component_for_a_flag_its_version_never_asked() -> None:
    """SCREENING.md §7: an item its version does not ask is neither present nor unanswered."""
    old = observations(screener().process(make_qr(SCREENING_CASES["ibp-no-flags"])).bundle)["red-flags"]["resource"]
    codes = {c["code"]["coding"][0]["code"] for c in old["component"]}
    assert "rf-saddle-numbness" in codes and "rf-sciatica-both-legs" not in codes
    assert old["valueBoolean"] is False
