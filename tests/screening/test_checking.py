"""Checking a QuestionnaireResponse against its Questionnaire (SCREENING.md §1).

Everything goes through the public entry points `Screener().process(qr)` and
`Screener().process_body(bytes, content_type)`. A problem must come back as
`plugin.screening.outcome.InvalidInput`: every issue at once, each with a FHIR
IssueType code and a FHIRPath `expression` pointing at the offending item,
never a traceback, never an answer value in the text.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources.R4B.operationoutcome import OperationOutcome

from plugin.screening.outcome import InvalidInput
from plugin.screening.pipeline import Outcome, Screener, Settings
from plugin.screening.systems import ANSWERS
from tests.factory import SCREENING, response

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "questionnaires" / "examples"
QR = "QuestionnaireResponse"
SECRET = "SECRET-VALUE-123"
JSON = "application/fhir+json"
XML = "application/fhir+xml"

# http://hl7.org/fhir/R4/valueset-issue-type.html
ISSUE_TYPES = frozenset({
    "invalid", "structure", "required", "value", "invariant", "security", "login", "unknown", "expired",
    "forbidden", "suppressed", "processing", "not-supported", "duplicate", "multiple-matches", "not-found",
    "deleted", "too-long", "code-invalid", "extension", "too-costly", "business-rule", "conflict", "transient",
    "lock-error", "no-store", "exception", "timeout", "incomplete", "throttled", "informational",
})
SEVERITIES = frozenset({"fatal", "error", "warning", "information"})

SCREENER = Screener()
NICE = Screener(Settings(strategy="nice-ng65"))

# Every screening item answered, valid, no red flag, night-pain true (so its two sub-items are enabled).
FULL: dict[str, Any] = {
    "pain-duration": "1y-5y",
    "onset-age": 28,
    "age": 31,
    "onset-gradual": True,
    "better-with-exercise": True,
    "better-with-rest": False,
    "night-pain": True,
    "night-pain-eases-on-rising": True,
    "night-waking-second-half": True,
    "morning-stiffness-minutes": 60,
    "buttock-pain": "alternating",
    "worse-with-activity": False,
    "leg-pain-below-knee": False,
    "nsaid-response": "much-better",
    "uveitis": False,
    "psoriasis": False,
    "ibd": False,
    "enthesitis": True,
    "dactylitis": False,
    "peripheral-arthritis": False,
    "family-history-first-degree-spa": True,
    "family-history-related": True,
    "hla-b27": "positive",
    "crp-elevated": "raised",
    "sacroiliitis-imaging": "not-done",
    "rf-saddle-numbness": False,
    "rf-bladder-bowel": False,
    "rf-leg-weakness": False,
    "rf-fever": False,
    "rf-weight-loss": False,
    "rf-cancer-history": False,
    "rf-night-pain-unrelieved": False,
    "rf-trauma": False,
    "rf-immunosuppression": False,
}


# --------------------------------------------------------------------------- helpers


def full(**changes: Any) -> dict:
    """A valid completed QR answering FULL, with some answers changed (None = unanswered)."""
    answers = {**FULL, **{k.replace("_", "-"): v for k, v in changes.items()}}
    return response(answers)


def locate(qr: dict, link_id: str) -> tuple[dict, str]:
    """The item with `link_id` (depth first) and its FHIRPath expression."""

    def walk(items: list, path: str) -> tuple[dict, str] | None:
        for i, item in enumerate(items):
            where = f"{path}.item[{i}]"
            if item.get("linkId") == link_id:
                return item, where
            found = walk(item.get("item", []), where)
            if found:
                return found
        return None

    found = walk(qr["item"], QR)
    assert found, f"{link_id} not in the test QR"
    return found


def points_at(expression: str | None, where: str) -> bool:
    """True if `expression` is `where` or something inside it."""
    return expression is not None and (
        expression == where or expression.startswith(where + ".") or expression.startswith(where + "[")
    )


def validate_outcome(error: InvalidInput) -> dict:
    """The OperationOutcome is valid R4B, every issue well-formed, the summary one sentence."""
    assert error.issues, "an InvalidInput must carry at least one issue"
    assert isinstance(error.status, int) and 400 <= error.status < 500
    oo = error.to_fhir()
    OperationOutcome.model_validate(oo)
    assert oo["resourceType"] == "OperationOutcome"
    assert len(oo["issue"]) == len(error.issues)
    for issue in error.issues:
        assert issue.code in ISSUE_TYPES, issue
        assert issue.severity in SEVERITIES, issue
        assert isinstance(issue.diagnostics, str) and issue.diagnostics.strip(), issue
    summary = error.summary()
    assert isinstance(summary, str) and summary.strip()
    assert "\n" not in summary
    assert summary.endswith(".")
    assert "Traceback" not in summary
    return oo


def reject(qr: Any = None, body: bytes | None = None, content_type: str | None = None,
           screener: Screener = SCREENER) -> InvalidInput:
    """Processes a dict (qr) or a body and returns the InvalidInput it must raise, checked."""
    with pytest.raises(InvalidInput) as info:
        if body is not None:
            screener.process_body(body, content_type)
        else:
            screener.process(qr)
    validate_outcome(info.value)
    return info.value


def accept(qr: dict) -> Outcome:
    outcome = SCREENER.process(qr)
    assert outcome.bundle["resourceType"] == "Bundle"
    return outcome


def single(error: InvalidInput) -> Any:
    assert len(error.issues) == 1, error.issues
    return error.issues[0]


def everything_said(error: InvalidInput) -> str:
    return orjson.dumps(error.to_fhir()).decode() + "\n" + error.summary() + "\n" + str(error)


# --------------------------------------------------------------------------- accepted

# Expected outcomes were worked out by hand in questionnaires/examples/README.md.
EXAMPLE_OUTCOMES = {
    "qr-refer-asas.json": ("refer-rheumatology", "refer-rheumatology"),
    "qr-refer-asas.xml": ("refer-rheumatology", "refer-rheumatology"),
    "qr-no-referral.json": ("no-referral-indicated", "no-referral-indicated"),
    "qr-not-applicable.json": ("not-applicable", "not-applicable"),
    "qr-emergency.json": ("emergency-assessment", "emergency-assessment"),
    "qr-urgent.json": ("urgent-assessment", "urgent-assessment"),
    "qr-indeterminate.json": ("indeterminate", "indeterminate"),
    "qr-nice-test-hla-b27.json": ("refer-rheumatology", "test-hla-b27"),
    "qr-lhc-forms.json": ("refer-rheumatology", "test-hla-b27"),
    "qr-basdai.json": ("positive", "positive"),
}


def test_the_documented_examples_exist():
    files = {p.name for p in EXAMPLES.glob("qr-*")}
    assert set(EXAMPLE_OUTCOMES) | {"qr-in-progress.json"} <= files


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("qr-*")), ids=lambda p: p.name)
def test_every_example_is_accepted(path):
    content_type = XML if path.suffix == ".xml" else JSON
    for screener in (SCREENER, NICE):
        outcome = screener.process_body(path.read_bytes(), content_type)
        assert outcome.bundle["resourceType"] == "Bundle"


@pytest.mark.parametrize("name", sorted(EXAMPLE_OUTCOMES))
def test_examples_are_accepted_with_their_documented_outcome(name):
    body = (EXAMPLES / name).read_bytes()
    content_type = XML if name.endswith(".xml") else JSON
    default, nice = EXAMPLE_OUTCOMES[name]
    assert SCREENER.process_body(body, content_type).label == default
    assert NICE.process_body(body, content_type).label == nice
    # and without a content type (sniffed)
    assert SCREENER.process_body(body).label == default


def test_in_progress_example_is_accepted_but_not_scored():
    outcome = SCREENER.process_body((EXAMPLES / "qr-in-progress.json").read_bytes(), JSON)
    assert outcome.scores is None


def test_example_json_dicts_are_accepted_by_process():
    for path in sorted(EXAMPLES.glob("qr-*.json")):
        SCREENER.process(json.loads(path.read_text(encoding="utf-8")))


def lhc_forms_qr() -> tuple[dict, dict]:
    """Shaped like NLM LHC-Forms output, and the answers it carries."""
    qr = {
        "resourceType": QR,
        "meta": {"profile": ["http://hl7.org/fhir/4.0/StructureDefinition/QuestionnaireResponse"],
                 "tag": [{"code": "lformsVersion: 36.3.2"}]},
        "questionnaire": SCREENING,
        "status": "completed",
        "authored": "2026-11-20T09:30:00.123Z",
        "subject": {"reference": "Patient/example", "display": "Example Patient"},
        "item": [
            {
                "linkId": "pain", "text": "About your back pain",
                "item": [
                    {"linkId": "pain-duration", "text": "How long have you had this back pain?",
                     "answer": [{"valueCoding": {"code": "gt-5y", "display": "More than 5 years"}}]},
                    {"linkId": "onset-age", "text": "How old were you?", "answer": [{"valueInteger": 22}]},
                    # age unanswered: omitted
                    {"linkId": "night-pain", "text": "Night pain?", "answer": [{"valueBoolean": False}]},
                    # night-pain-eases-on-rising and night-waking-second-half disabled: omitted
                    {"linkId": "buttock-pain", "text": "Buttock pain?",
                     "answer": [{"valueCoding": {"system": ANSWERS, "code": "alternating",
                                                 "display": "Alternating"}}]},
                ],
            },
            # the history group carries only its children; clinician group hidden: omitted
            {"linkId": "history", "item": [{"linkId": "uveitis", "answer": [{"valueBoolean": True}]}]},
            {
                "linkId": "red-flags", "text": "Other symptoms",
                "item": [{"linkId": "rf-fever", "text": "Fever?", "answer": [{"valueBoolean": False}]}],
            },
        ],
    }
    facts = {"pain-duration": "gt-5y", "onset-age": 22, "night-pain": False, "buttock-pain": "alternating",
             "uveitis": True, "rf-fever": False}
    return qr, facts


def test_lhc_forms_shape_is_accepted_and_read_correctly():
    qr, facts = lhc_forms_qr()
    _, found = SCREENER.check(qr)
    assert found == facts
    accept(qr)


def test_lhc_forms_shape_is_accepted_as_a_body():
    qr, _ = lhc_forms_qr()
    outcome = SCREENER.process_body(orjson.dumps(qr), "application/json")
    assert outcome.scores is not None


@pytest.mark.parametrize("canonical", [SCREENING, SCREENING + "|1.0.0"])
def test_questionnaire_canonical_with_or_without_version(canonical):
    qr = full()
    qr["questionnaire"] = canonical
    assert accept(qr).label == "refer-rheumatology"


@pytest.mark.parametrize("item", [{"linkId": "age"}, {"linkId": "age", "answer": []},
                                  {"linkId": "age", "text": "How old are you now?"}])
def test_item_present_without_an_answer_is_unanswered(item):
    qr = full(age=None)
    pain, _ = locate(qr, "pain")
    pain["item"].insert(2, item)
    _, facts = SCREENER.check(qr)
    assert "age" not in facts
    accept(qr)


@pytest.mark.parametrize(("link_id", "value"), [
    ("onset-age", 0), ("onset-age", 120), ("age", 0), ("age", 120),
    ("morning-stiffness-minutes", 0), ("morning-stiffness-minutes", 1440),
])
def test_in_range_boundaries_are_accepted(link_id, value):
    qr = full(**{link_id: value})
    _, facts = SCREENER.check(qr)
    assert facts[link_id] == value
    accept(qr)


def test_night_sub_items_accepted_when_night_pain_is_true():
    _, facts = SCREENER.check(full())
    assert facts["night-pain-eases-on-rising"] is True
    assert facts["night-waking-second-half"] is True


@pytest.mark.parametrize("status", ["in-progress", "completed", "amended", "entered-in-error", "stopped"])
def test_every_qr_status_is_accepted(status):
    qr = full()
    qr["status"] = status
    accept(qr)


@pytest.mark.parametrize("reference", ["Patient/example", "Patient/p-1.a", "Patient/" + "A" * 64])
def test_patient_subject_references_are_accepted(reference):
    accept(full() | {"subject": {"reference": reference}})


# --------------------------------------------------------------------------- rejected: the envelope


@pytest.mark.parametrize("body", [b"not json", b"{", b'{"resourceType": "QuestionnaireResponse",}', b"nul"])
def test_not_json(body):
    error = reject(body=body, content_type=JSON)
    assert error.status == 400
    assert single(error).code == "structure"


@pytest.mark.parametrize("body", [b"[]", b"[1, 2]", b'"QuestionnaireResponse"', b"42", b"null", b"true"])
def test_json_but_not_an_object(body):
    error = reject(body=body, content_type=JSON)
    assert error.status == 400
    assert single(error).code in {"structure", "invalid"}


@pytest.mark.parametrize("value", [[], "x", 3, None])
def test_not_an_object_as_a_python_value(value):
    assert single(reject(value)).code in {"structure", "invalid"}


def test_another_resource_type():
    body = orjson.dumps({"resourceType": "Patient", "id": "example", "birthDate": "1990-01-01"})
    issue = single(reject(body=body, content_type=JSON))
    assert issue.code in {"invalid", "not-supported", "structure"}
    assert "QuestionnaireResponse" in issue.diagnostics


def test_no_resource_type():
    qr = full()
    del qr["resourceType"]
    assert single(reject(qr)).code in {"invalid", "required", "structure"}


@pytest.mark.parametrize("element", ["questionnaire", "status", "subject"])
def test_missing_required_element(element):
    qr = full()
    del qr[element]
    issue = single(reject(qr))
    assert issue.code == "required"
    assert points_at(issue.expression, f"{QR}.{element}")


@pytest.mark.parametrize("canonical", [
    "https://backpain-screen.org/fhir/Questionnaire/unknown",
    "http://example.org/Questionnaire/phq-9",
    SCREENING + "/",
])
def test_unknown_questionnaire(canonical):
    issue = single(reject(full() | {"questionnaire": canonical}))
    assert issue.code in {"not-supported", "not-found"}
    assert points_at(issue.expression, f"{QR}.questionnaire")


@pytest.mark.parametrize("version", ["9.9", "0.9.0", "1.0"])
def test_unpublished_questionnaire_version(version):
    issue = single(reject(full() | {"questionnaire": f"{SCREENING}|{version}"}))
    assert issue.code in {"not-supported", "not-found"}
    assert points_at(issue.expression, f"{QR}.questionnaire")


def test_questionnaire_not_a_string():
    issue = single(reject(full() | {"questionnaire": {"reference": SCREENING}}))
    assert points_at(issue.expression, f"{QR}.questionnaire")




@pytest.mark.parametrize("status", [
    "done", "final", "COMPLETED", "", 1, True,
    [], ["completed"],
    {"value": "completed"},
])
def test_unknown_status(status):
    issue = single(reject(full() | {"status": status}))
    assert issue.code in {"code-invalid", "value"}
    assert issue.expression == f"{QR}.status"


def test_unknown_status_as_a_json_array():
    body = orjson.dumps(full() | {"status": ["completed"]})
    issue = single(reject(body=body, content_type=JSON))
    assert issue.expression == f"{QR}.status"


@pytest.mark.parametrize("subject", [
    {"reference": "Practitioner/123"},
    {"reference": "Group/1"},
    {"reference": "https://fhir.example.org/Practitioner/123"},
    {"display": "Jane Doe"},
    {"reference": 5},
    "Patient/123",
])
def test_subject_that_is_not_a_patient_reference(subject):
    issue = single(reject(full() | {"subject": subject}))
    assert issue.code in {"invalid", "value", "business-rule", "structure", "required"}
    assert points_at(issue.expression, f"{QR}.subject")


@pytest.mark.parametrize("authored", ["yesterday", "2026-13-01", "2026-11-20T09:30:00", "20/11/2026", 2026])
def test_bad_authored(authored):
    issue = single(reject(full() | {"authored": authored}))
    assert issue.code in {"value", "invalid", "structure"}
    assert issue.expression == f"{QR}.authored"


@pytest.mark.parametrize("id_", ["bad id", "a/b", "x" * 65, "", 7])
def test_bad_id(id_):
    issue = single(reject(full() | {"id": id_}))
    assert issue.code in {"value", "invalid", "structure"}
    assert issue.expression == f"{QR}.id"


# --------------------------------------------------------------------------- rejected: the items


def test_unknown_link_id():
    qr = full()
    history, where = locate(qr, "history")
    history["item"].append({"linkId": "smoker", "answer": [{"valueBoolean": True}]})
    issue = single(reject(qr))
    assert issue.code in {"invalid", "not-found", "structure"}
    assert points_at(issue.expression, f"{where}.item[{len(history['item']) - 1}]")


def test_unknown_link_id_at_the_top_level():
    qr = full()
    qr["item"].append({"linkId": "smoker"})
    issue = single(reject(qr))
    assert points_at(issue.expression, f"{QR}.item[{len(qr['item']) - 1}]")


def test_item_in_the_wrong_group():
    qr = full(uveitis=None)
    pain, where = locate(qr, "pain")
    pain["item"].append({"linkId": "uveitis", "answer": [{"valueBoolean": True}]})
    issue = single(reject(qr))
    assert issue.code in {"structure", "invalid"}
    assert points_at(issue.expression, f"{where}.item[{len(pain['item']) - 1}]")


def test_answerable_item_at_the_top_level():
    qr = full(rf_fever=None)
    qr["item"].append({"linkId": "rf-fever", "answer": [{"valueBoolean": False}]})
    issue = single(reject(qr))
    assert issue.code in {"structure", "invalid"}
    assert points_at(issue.expression, f"{QR}.item[{len(qr['item']) - 1}]")


def test_group_carrying_an_answer():
    qr = full()
    _, where = locate(qr, "history")
    locate(qr, "history")[0]["answer"] = [{"valueBoolean": True}]
    issue = single(reject(qr))
    assert issue.code in {"structure", "invalid"}
    assert points_at(issue.expression, where)


def test_duplicate_item():
    qr = full()
    pain, where = locate(qr, "pain")
    pain["item"].append(copy.deepcopy(pain["item"][1]))
    issue = single(reject(qr))
    assert issue.code in {"duplicate", "structure"}
    assert points_at(issue.expression, f"{where}.item[{len(pain['item']) - 1}]")


def test_duplicate_with_a_different_answer():
    qr = full()
    flags, where = locate(qr, "red-flags")
    flags["item"].append({"linkId": "rf-saddle-numbness", "answer": [{"valueBoolean": True}]})
    issue = single(reject(qr))
    assert issue.code in {"duplicate", "structure"}
    assert points_at(issue.expression, f"{where}.item[{len(flags['item']) - 1}]")


def test_duplicate_group():
    qr = full()
    qr["item"].append({"linkId": "history", "item": []})
    issue = single(reject(qr))
    assert issue.code in {"duplicate", "structure"}
    assert points_at(issue.expression, f"{QR}.item[{len(qr['item']) - 1}]")


def test_two_answers_to_a_non_repeating_item():
    qr = full()
    item, where = locate(qr, "onset-age")
    item["answer"].append({"valueInteger": 31})
    issue = single(reject(qr))
    assert issue.code in {"structure", "value", "invalid"}
    assert points_at(issue.expression, f"{where}.answer")




@pytest.mark.parametrize("answers", [
    {"valueBoolean": True}, "yes", 1, [[]], [None], [True],
    False, 0,
    "", {},
])
def test_answer_that_is_not_a_list_of_objects(answers):
    qr = full()
    item, where = locate(qr, "rf-fever")
    item["answer"] = answers
    issue = single(reject(qr))
    assert issue.code in {"structure", "value"}
    assert points_at(issue.expression, f"{where}.answer")


def _set_answer(qr: dict, link_id: str, answer: Any) -> str:
    item, where = locate(qr, link_id)
    item["answer"] = [answer]
    return where


@pytest.mark.parametrize(("link_id", "answer", "right_key"), [
    ("onset-gradual", {"valueString": "yes"}, "valueBoolean"),
    ("onset-gradual", {"valueInteger": 1}, "valueBoolean"),
    ("onset-gradual", {"valueCoding": {"system": ANSWERS, "code": "yes"}}, "valueBoolean"),
    ("onset-age", {"valueBoolean": True}, "valueInteger"),
    ("onset-age", {"valueString": "28"}, "valueInteger"),
    ("onset-age", {"valueDecimal": 28.0}, "valueInteger"),
    ("onset-age", {"valueInteger": True}, "valueInteger"),
    ("onset-age", {"valueInteger": False}, "valueInteger"),
    ("onset-age", {"valueInteger": 3.5}, "valueInteger"),
    ("onset-age", {"valueInteger": "28"}, "valueInteger"),
    ("onset-age", {"valueInteger": None}, "valueInteger"),
    ("night-pain", {"valueBoolean": "true"}, "valueBoolean"),
    ("night-pain", {"valueBoolean": 1}, "valueBoolean"),
    ("pain-duration", {"valueString": "1y-5y"}, "valueCoding"),
    ("pain-duration", {"valueCoding": "1y-5y"}, "valueCoding"),
    ("hla-b27", {"valueBoolean": True}, "valueCoding"),
    ("rf-fever", {}, "valueBoolean"),
    ("rf-fever", {"valueBoolean": False, "valueString": "no"}, "valueBoolean"),
])
def test_wrong_answer_type(link_id, answer, right_key):
    qr = full()
    where = _set_answer(qr, link_id, answer)
    issue = single(reject(qr))
    assert issue.code in {"value", "structure", "code-invalid"}
    assert points_at(issue.expression, f"{where}.answer[0]")
    assert link_id in issue.diagnostics


def test_wrong_type_expression_names_the_value_element():
    qr = full()
    _set_answer(qr, "onset-age", {"valueInteger": True})
    issue = single(reject(qr))
    assert issue.expression == f"{QR}.item[0].item[1].answer[0].valueInteger"


@pytest.mark.parametrize(("link_id", "code"), [
    ("pain-duration", "forever"), ("pain-duration", "3M-1Y"), ("buttock-pain", "positive"),
    ("nsaid-response", ""), ("hla-b27", "present"), ("crp-elevated", None),
])
def test_unknown_choice_code(link_id, code):
    qr = full()
    coding = {"system": ANSWERS, "code": code} if code is not None else {"system": ANSWERS}
    where = _set_answer(qr, link_id, {"valueCoding": coding})
    issue = single(reject(qr))
    assert issue.code in ({"code-invalid"} if code is not None else {"code-invalid", "required"})
    assert points_at(issue.expression, f"{where}.answer[0].valueCoding")


@pytest.mark.parametrize("system", ["http://snomed.info/sct", "http://loinc.org", ANSWERS + "/", ""])
def test_wrong_coding_system(system):
    qr = full()
    where = _set_answer(qr, "pain-duration", {"valueCoding": {"system": system, "code": "1y-5y"}})
    issue = single(reject(qr))
    assert issue.code == "code-invalid"
    assert points_at(issue.expression, f"{where}.answer[0].valueCoding")


@pytest.mark.parametrize(("link_id", "value"), [
    ("onset-age", 121), ("onset-age", -1), ("onset-age", 10**6), ("age", 121), ("age", -5),
    ("morning-stiffness-minutes", 1441), ("morning-stiffness-minutes", -1),
])
def test_out_of_range_integer(link_id, value):
    qr = full()
    where = _set_answer(qr, link_id, {"valueInteger": value})
    issue = single(reject(qr))
    assert issue.code == "value"
    assert issue.expression == f"{where}.answer[0].valueInteger"


def test_out_of_range_expression_is_exact():
    issue = single(reject(full(onset_age=121)))
    assert issue.expression == f"{QR}.item[0].item[1].answer[0].valueInteger"


@pytest.mark.parametrize("sub_item", ["night-pain-eases-on-rising", "night-waking-second-half"])
@pytest.mark.parametrize("night_pain", [False, None])
def test_disabled_item_answered(sub_item, night_pain):
    qr = response({**FULL, "night-pain": night_pain, "night-pain-eases-on-rising": None,
                   "night-waking-second-half": None})
    pain, where = locate(qr, "pain")
    pain["item"].append({"linkId": sub_item, "answer": [{"valueBoolean": True}]})
    issue = single(reject(qr))
    assert issue.code in {"business-rule", "invariant", "conflict"}
    assert points_at(issue.expression, f"{where}.item[{len(pain['item']) - 1}]")


def test_disabled_item_answered_false_is_also_rejected():
    qr = response({**FULL, "night-pain": False, "night-pain-eases-on-rising": None, "night-waking-second-half": None})
    pain, _ = locate(qr, "pain")
    pain["item"].append({"linkId": "night-waking-second-half", "answer": [{"valueBoolean": False}]})
    assert single(reject(qr)).code in {"business-rule", "invariant", "conflict"}


def test_item_list_that_is_not_a_list():
    qr = full()
    qr["item"] = {"linkId": "pain"}
    issue = single(reject(qr))
    assert issue.code == "structure"
    assert points_at(issue.expression, f"{QR}.item")


@pytest.mark.parametrize("item", [[], "pain", 3, None])
def test_item_that_is_not_an_object(item):
    qr = full()
    qr["item"].append(item)
    issue = single(reject(qr))
    assert issue.code == "structure"
    assert points_at(issue.expression, f"{QR}.item[{len(qr['item']) - 1}]")


def test_item_without_link_id():
    qr = full()
    qr["item"].append({"text": "what?"})
    issue = single(reject(qr))
    assert issue.code in {"required", "structure"}
    assert points_at(issue.expression, f"{QR}.item[{len(qr['item']) - 1}]")


# --------------------------------------------------------------------------- several problems at once


def test_every_problem_is_reported_in_one_outcome():
    qr = full(onset_age=121)
    qr["status"] = "done"
    qr["authored"] = "yesterday"
    del qr["subject"]
    expected = {
        f"{QR}.status": {"code-invalid", "value"},
        f"{QR}.authored": {"value", "invalid", "structure"},
        f"{QR}.subject": {"required"},
    }
    _, onset = locate(qr, "onset-age")
    expected[f"{onset}.answer[0].valueInteger"] = {"value"}
    expected[f"{_set_answer(qr, 'buttock-pain', {'valueCoding': {'system': ANSWERS, 'code': 'left'}})}"
             ".answer[0].valueCoding"] = {"code-invalid"}
    expected[f"{_set_answer(qr, 'rf-fever', {'valueString': 'no'})}.answer[0]"] = {"value", "structure"}
    history, where = locate(qr, "history")
    history["item"].append({"linkId": "smoker", "answer": [{"valueBoolean": True}]})
    expected[f"{where}.item[{len(history['item']) - 1}]"] = {"invalid", "not-found", "structure"}

    error = reject(qr)
    oo = error.to_fhir()
    assert len(error.issues) == len(expected) == 7
    assert len(oo["issue"]) == 7
    for where, codes in expected.items():
        matching = [i for i in error.issues if points_at(i.expression, where)]
        assert len(matching) == 1, (where, error.issues)
        assert matching[0].code in codes, matching[0]
    # every issue also appears, with its expression, in the OperationOutcome
    expressions = sorted(e for i in oo["issue"] for e in i.get("expression", []))
    assert expressions == sorted(i.expression for i in error.issues)
    summary = error.summary()  # one sentence that says there is more than the first problem
    assert re.search(r"\b[67]\b", summary), summary
    assert "\n" not in summary


def test_several_item_problems_in_different_groups():
    qr = full()
    wheres = [
        _set_answer(qr, "onset-age", {"valueInteger": -1}),
        _set_answer(qr, "morning-stiffness-minutes", {"valueInteger": 1441}),
        _set_answer(qr, "psoriasis", {"valueString": "maybe"}),
        _set_answer(qr, "hla-b27", {"valueCoding": {"system": "http://loinc.org", "code": "positive"}}),
        _set_answer(qr, "rf-trauma", {"valueInteger": 0}),
    ]
    error = reject(qr)
    assert len(error.issues) == 5
    for where, issue in zip(wheres, error.issues):
        assert points_at(issue.expression, f"{where}.answer[0]")


# --------------------------------------------------------------------------- hostile input


DEPTH = 10_000


@pytest.mark.parametrize("body", [
    b"[" * DEPTH + b"]" * DEPTH,
    b'{"a":' * DEPTH + b"1" + b"}" * DEPTH,
    b'{"resourceType":"QuestionnaireResponse","item":' + b"[" * DEPTH + b"]" * DEPTH + b"}",
], ids=["arrays", "objects", "in-a-qr"])
def test_deeply_nested_json(body):
    error = reject(body=body, content_type=JSON)
    assert error.status == 400
    assert single(error).code in {"structure", "too-costly"}


def _deep_item_body(link_id: str) -> bytes:
    head = orjson.dumps({k: v for k, v in full().items() if k != "item"})[:-1]
    opening = b'[{"linkId":"' + link_id.encode() + b'","item":'
    return head + b',"item":' + opening * DEPTH + b"[]" + b"}]" * DEPTH + b"}"


@pytest.mark.parametrize("link_id", ["pain", "nope"])
def test_deeply_nested_items_as_a_body(link_id):
    error = reject(body=_deep_item_body(link_id), content_type=JSON)
    assert error.status == 400
    assert 1 <= len(error.issues) <= 100


def _deep_items(link_ids: list[str]) -> list:
    top: list = []
    level = top
    for i in range(DEPTH):
        child: list = []
        level.append({"linkId": link_ids[i % len(link_ids)], "item": child})
        level = child
    return top


@pytest.mark.parametrize("link_ids", [["pain"], ["nope"], ["pain", "onset-age"], ["red-flags", "rf-fever"]])
def test_deeply_nested_items_as_a_python_value(link_ids):
    qr = full() | {"item": _deep_items(link_ids)}
    error = reject(qr)
    assert 1 <= len(error.issues) <= 100


def test_deeply_nested_answer_items():
    qr = full()
    item, _ = locate(qr, "onset-gradual")
    item["answer"][0]["item"] = _deep_items(["onset-gradual"])
    error = reject(qr)
    assert 1 <= len(error.issues) <= 100


def _nested(depth: int) -> list:
    top: list = []
    level = top
    for _ in range(depth):
        child: list = []
        level.append(child)
        level = child
    return top


def test_deeply_nested_python_value_in_an_unchecked_element():
    qr = full() | {"extension": [{"url": "http://example.org/x", "valueString": "x", "extension": _nested(DEPTH)}]}
    try:
        outcome = SCREENER.process(qr)
    except InvalidInput as error:
        validate_outcome(error)
    else:  # if accepted, what was built must be writable
        orjson.dumps(outcome.bundle)


@pytest.mark.parametrize("depth", [300, 1000])
def test_moderately_deep_json_body_in_an_unchecked_element(depth):
    head = orjson.dumps(full())[:-1]
    body = head + b',"extension":' + b"[" * depth + b"]" * depth + b"}"
    try:
        outcome = SCREENER.process_body(body, JSON)
    except InvalidInput as error:
        validate_outcome(error)
    else:  # if accepted, what was built must be writable
        orjson.dumps(outcome.bundle)


def test_fifty_megabyte_body_is_too_costly():
    body = b'{"resourceType":"QuestionnaireResponse","text":"' + b"x" * (50 * 1024 * 1024) + b'"}'
    error = reject(body=body, content_type=JSON)
    assert error.status == 413
    assert single(error).code == "too-costly"


def test_fifty_megabyte_xml_body_is_too_costly():
    body = b'<QuestionnaireResponse xmlns="http://hl7.org/fhir"><!--' + b"x" * (50 * 1024 * 1024) + b"-->"
    error = reject(body=body, content_type=XML)
    assert error.status == 413
    assert single(error).code == "too-costly"


def test_fifty_megabytes_of_nothing_is_too_costly():
    error = reject(body=b" " * (50 * 1024 * 1024), content_type=JSON)
    assert error.status == 413


def _many_items(shape: str, n: int = 100_000) -> dict:
    qr = full()
    if shape == "unknown":
        qr["item"] = [{"linkId": f"x{i}"} for i in range(n)]
    elif shape == "duplicate-groups":
        qr["item"] = [{"linkId": "history"} for _ in range(n)]
    elif shape == "duplicate-answers":
        flags, _ = locate(qr, "red-flags")
        flags["item"] = [{"linkId": "rf-fever", "answer": [{"valueBoolean": False}]} for _ in range(n)]
    return qr


def test_hundred_thousand_items_in_a_body_under_the_default_limit_is_too_costly():
    body = orjson.dumps(_many_items("duplicate-groups"))
    error = reject(body=body, content_type=JSON)
    assert "too-costly" in {i.code for i in error.issues}
    assert len(error.issues) <= 100


@pytest.mark.parametrize("shape", ["unknown", "duplicate-groups", "duplicate-answers"])
def test_hundred_thousand_items_bounded_issues(shape):
    error = reject(_many_items(shape))
    assert 1 <= len(error.issues) <= 100
    assert len(error.to_fhir()["issue"]) <= 100


@pytest.mark.parametrize("shape", ["unknown", "duplicate-groups", "duplicate-answers"])
def test_hundred_thousand_items_are_too_costly(shape):
    error = reject(_many_items(shape))
    assert "too-costly" in {i.code for i in error.issues}
    assert len(error.issues) <= 100


def test_hundred_thousand_items_are_too_costly_with_a_large_body_limit():
    screener = Screener(Settings(max_body_bytes=200 * 1024 * 1024))
    body = orjson.dumps(_many_items("duplicate-answers"))
    error = reject(body=body, content_type=JSON, screener=screener)
    assert "too-costly" in {i.code for i in error.issues}


@pytest.mark.parametrize("body", [
    b'{"resourceType":"QuestionnaireResponse","id":"\xff\xfe"}',
    b"\xff\xfe\x00\x00garbage",
    b'{"resourceType":"Questionnaire\xc3\x28Response"}',
    "{\"resourceType\":\"QuestionnaireResponse\"}".encode("utf-16"),
])
def test_non_utf8_json(body):
    error = reject(body=body, content_type=JSON)
    assert error.status == 400


def test_non_utf8_xml():
    body = b'<QuestionnaireResponse xmlns="http://hl7.org/fhir"><id value="\xff\xfe"/></QuestionnaireResponse>'
    assert reject(body=body, content_type=XML).status == 400


@pytest.mark.parametrize("body", [b"", b"   ", b"\n\t\r\n"])
@pytest.mark.parametrize("content_type", [JSON, XML, None])
def test_empty_body(body, content_type):
    error = reject(body=body, content_type=content_type)
    assert error.status == 400
    assert single(error).code in {"structure", "required", "invalid"}


# --------------------------------------------------------------------------- XML

XML_EXAMPLE = (EXAMPLES / "qr-refer-asas.xml").read_bytes()
XML_BODY = XML_EXAMPLE.split(b"?>", 1)[1]  # without the XML declaration


def test_xml_example_gives_the_same_outcome_as_the_json():
    json_body = (EXAMPLES / "qr-refer-asas.json").read_bytes()
    for screener in (SCREENER, NICE):
        from_xml = screener.process_body(XML_EXAMPLE, XML)
        from_json = screener.process_body(json_body, JSON)
        assert from_xml.label == from_json.label == "refer-rheumatology"
        assert from_xml.scores is not None and from_json.scores is not None
        assert {k: r.value for k, r in from_xml.scores.results.items()} == \
            {k: r.value for k, r in from_json.scores.results.items()}


@pytest.mark.parametrize("content_type", ["application/fhir+xml", "application/xml", "text/xml; charset=utf-8"])
def test_xml_content_types(content_type):
    assert SCREENER.process_body(XML_EXAMPLE, content_type).label == "refer-rheumatology"


PASSWD = Path("/etc/passwd")


def _passwd_lines() -> list[str]:
    try:
        return [line for line in PASSWD.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return []


def _assert_no_file_content(error: InvalidInput) -> None:
    said = everything_said(error)
    assert "root:" not in said
    assert "/bin/" not in said
    for line in _passwd_lines()[:5]:
        assert line not in said


HOSTILE_XML = {
    "xxe-in-qr": b'<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                 + XML_BODY.replace(b'<id value="qr-refer-asas"/>', b'<id value="&e;"/>'),
    "xxe-in-text": b'<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                   + XML_BODY.replace(b'<status value="completed"/>', b'<status value="&e;"/>'),
    "xxe-minimal": b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                   b'<QuestionnaireResponse xmlns="http://hl7.org/fhir"><id value="&e;"/></QuestionnaireResponse>',
    "xxe-parameter-entity": b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>'
                            + XML_BODY,
    "external-dtd": b'<?xml version="1.0"?>\n<!DOCTYPE x SYSTEM "http://127.0.0.1:9/x.dtd">' + XML_BODY,
    "external-dtd-file": b'<?xml version="1.0"?>\n<!DOCTYPE x SYSTEM "file:///etc/passwd">' + XML_BODY,
    "external-dtd-public": b'<!DOCTYPE x PUBLIC "-//X//Y//EN" "http://127.0.0.1:9/x.dtd">' + XML_BODY,
    "billion-laughs": b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                      + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
                                 for i in range(1, 10))
                      + b']><QuestionnaireResponse xmlns="http://hl7.org/fhir"><id value="&lol9;"/>'
                        b"</QuestionnaireResponse>",
    "quadratic-blowup": b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "' + b"a" * 50_000 + b'">]>'
                        b'<QuestionnaireResponse xmlns="http://hl7.org/fhir"><id value="'
                        + b"&a;" * 10_000 + b'"/></QuestionnaireResponse>',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_XML))
@pytest.mark.parametrize("content_type", [XML, "application/xml", None])
def test_hostile_xml_is_rejected_without_leaking_files(name, content_type):
    error = reject(body=HOSTILE_XML[name], content_type=content_type)
    assert error.status in (400, 413)
    if name != "quadratic-blowup":  # 500 kB fits the 1 MiB limit: must be refused as XML, not by size
        assert error.status == 400
    assert error.issues
    _assert_no_file_content(error)


@pytest.mark.parametrize("doctype", [
    b'<!DOCTYPE QuestionnaireResponse SYSTEM "http://127.0.0.1:9/x.dtd">',
    b'<!DOCTYPE QuestionnaireResponse SYSTEM "file:///etc/passwd">',
])
def test_doctype_after_a_long_comment_is_rejected(doctype):
    body = b'<?xml version="1.0"?><!--' + b"x" * 5000 + b"-->" + doctype + XML_BODY
    error = reject(body=body, content_type=XML)
    assert error.status == 400
    _assert_no_file_content(error)


@pytest.mark.parametrize("body", [
    XML_BODY.replace(b' xmlns="http://hl7.org/fhir"', b""),
    XML_BODY.replace(b'xmlns="http://hl7.org/fhir"', b'xmlns="http://example.org/fhir"'),
    XML_BODY.replace(b'xmlns="http://hl7.org/fhir"', b'xmlns="http://hl7.org/fhir/"'),
    b'<x:QuestionnaireResponse xmlns:x="urn:other"><x:status value="completed"/></x:QuestionnaireResponse>',
], ids=["no-namespace", "other-namespace", "trailing-slash", "prefixed-other"])
def test_xml_root_outside_the_fhir_namespace(body):
    error = reject(body=body, content_type=XML)
    assert error.status == 400
    assert single(error).code in {"structure", "invalid", "not-supported"}


@pytest.mark.parametrize("body", [
    XML_BODY[:600],
    b"<QuestionnaireResponse xmlns='http://hl7.org/fhir'><status value='completed'></QuestionnaireResponse>",
    b"<QuestionnaireResponse xmlns='http://hl7.org/fhir'",
    b"<",
    b"<?xml version='1.0'?>",
    XML_BODY + b"<trailing/>",
])
def test_malformed_xml(body):
    error = reject(body=body, content_type=XML)
    assert error.status == 400
    assert single(error).code in {"structure", "invalid"}


def test_patient_in_xml_is_not_a_questionnaire_response():
    body = (b'<Patient xmlns="http://hl7.org/fhir"><id value="p1"/>'
            b'<birthDate value="1990-01-01"/></Patient>')
    issue = single(reject(body=body, content_type=XML))
    assert issue.code in {"invalid", "not-supported", "structure"}
    assert "QuestionnaireResponse" in issue.diagnostics


@pytest.mark.parametrize("name", [b"Foo", b"questionnaireResponse", b"Bundlex"])
def test_unknown_fhir_resource_in_xml(name):
    body = b"<" + name + b' xmlns="http://hl7.org/fhir"><id value="p1"/></' + name + b">"
    error = reject(body=body, content_type=XML)
    assert error.status == 400


def test_deeply_nested_xml():
    body = (b'<QuestionnaireResponse xmlns="http://hl7.org/fhir"><status value="completed"/>'
            + b"<item>" * DEPTH + b"</item>" * DEPTH + b"</QuestionnaireResponse>")
    error = reject(body=body, content_type=XML)
    assert error.status in (400, 413)  # 413: more elements than the limit, found before the depth


def test_moderately_nested_xml():
    body = (b'<QuestionnaireResponse xmlns="http://hl7.org/fhir"><status value="completed"/>'
            + b'<item><linkId value="pain"/>' * 200 + b"</item>" * 200 + b"</QuestionnaireResponse>")
    assert reject(body=body, content_type=XML).status == 400


def test_xml_item_problems_point_at_the_item():
    body = XML_BODY.replace(b'<valueInteger value="28"/>', b'<valueInteger value="121"/>')
    issue = single(reject(body=body, content_type=XML))
    assert issue.code == "value"
    assert issue.expression == f"{QR}.item[0].item[1].answer[0].valueInteger"


def test_xml_value_error_expression_is_not_misleading():
    body = XML_BODY.replace(b'<valueInteger value="28"/>', b'<valueInteger value="twenty"/>')
    issue = single(reject(body=body, content_type=XML))
    assert issue.expression is None or points_at(issue.expression, f"{QR}.item[0].item[1]")


# --------------------------------------------------------------------------- no answer values in errors


@pytest.mark.parametrize(("link_id", "answer"), [
    ("onset-gradual", {"valueString": SECRET}),
    ("onset-age", {"valueString": SECRET}),
    ("onset-age", {"valueInteger": SECRET}),
    ("night-pain", {"valueBoolean": SECRET}),
    ("pain-duration", {"valueString": SECRET}),
    ("pain-duration", {"valueCoding": SECRET}),
    ("hla-b27", {"valueCoding": {"system": SECRET, "code": "positive"}}),
    ("hla-b27", {"valueCoding": {"system": ANSWERS, "code": "positive", "display": SECRET}, "valueString": "x"}),
])
def test_errors_do_not_leak_answer_values(link_id, answer):
    qr = full()
    _set_answer(qr, link_id, answer)
    error = reject(qr)
    assert SECRET not in everything_said(error)


def test_errors_do_not_leak_answer_values_in_a_multi_problem_outcome():
    qr = full()
    _set_answer(qr, "onset-gradual", {"valueString": SECRET + "-1"})
    _set_answer(qr, "onset-age", {"valueInteger": SECRET + "-2"})
    _set_answer(qr, "uveitis", {"valueDecimal": SECRET + "-3"})
    error = reject(qr)
    assert len(error.issues) == 3
    assert SECRET not in everything_said(error)


@pytest.mark.parametrize("replacement", [
    b'<valueInteger value="SECRET-VALUE-123"/>',
    b'<valueString value="SECRET-VALUE-123"/>',
    b'<valueBoolean value="SECRET-VALUE-123"/>',
])
def test_xml_errors_do_not_leak_answer_values(replacement):
    body = XML_BODY.replace(b'<valueInteger value="28"/>', replacement)
    error = reject(body=body, content_type=XML)
    assert SECRET not in everything_said(error)


def test_unknown_choice_code_is_not_quoted_back():
    qr = full()
    _set_answer(qr, "hla-b27", {"valueCoding": {"system": ANSWERS, "code": SECRET}})
    assert SECRET not in everything_said(reject(qr))


def test_out_of_range_value_is_not_quoted_back():
    qr = full()
    _set_answer(qr, "onset-age", {"valueInteger": 987654})
    assert "987654" not in everything_said(reject(qr))


def test_summary_is_one_sentence():
    error = reject(full(onset_age=121) | {"status": "done"})
    summary = error.summary()
    assert summary.count(". ") == 0
    assert re.fullmatch(r"[^\n]+\.", summary)


# ------------------------------------------------------------- the response is written back as it came


@pytest.mark.parametrize(
    ("element", "value"),
    [("identifier", [{"value": "x"}]), ("identifier", "x"), ("meta", "v1"), ("text", "<div/>"),
     ("extension", {"url": "x"}), ("basedOn", {"reference": "ServiceRequest/1"})],
)
def test_top_level_element_of_the_wrong_shape(element, value):
    issue = single(reject(full() | {element: value}))
    assert issue.code == "structure" and issue.expression == f"{QR}.{element}"


def test_element_that_r4_does_not_define():
    issue = single(reject(full() | {"colour": "blue"}))
    assert "'colour' is not an element" in issue.diagnostics
    assert accept(full() | {"_authored": {"extension": []}, "language": "en-GB"})


def test_enable_when_conflict_is_reported_with_the_other_problems():
    qr = full(night_pain=False, night_pain_eases_on_rising=True, night_waking_second_half=None)
    onset, _ = locate(qr, "onset-age")
    onset["answer"] = [{"valueInteger": 500}]
    codes = sorted(i.code for i in reject(qr).issues)
    assert codes == ["business-rule", "value"]


def test_a_wrong_controlling_answer_does_not_cascade_into_its_dependants():
    qr = full(night_pain=True, night_pain_eases_on_rising=True, night_waking_second_half=True)
    night, where = locate(qr, "night-pain")
    night["answer"] = [{"valueString": "yes"}]
    assert [i.expression for i in reject(qr).issues] == [f"{where}.answer[0]"]


def test_json_with_a_byte_order_mark_is_read():
    body = b"\xef\xbb\xbf" + orjson.dumps(full())
    assert SCREENER.process_body(body).bundle["type"] == "transaction"
    assert SCREENER.process_body(body, "application/fhir+json").bundle["type"] == "transaction"


def test_item_element_that_r4_does_not_define():
    qr = full()
    onset, where = locate(qr, "onset-age")
    onset["colour"] = "blue"
    issue = single(reject(qr))
    assert issue.code == "structure" and issue.expression == where and "'colour'" in issue.diagnostics
    onset.pop("colour")
    onset["definition"] = "http://example.org/onset"  # a defined element is fine
    accept(qr)
