"""SDC $populate: ages by hand, lab results and earlier answers, the HTTP operation on both stores,
and the Questionnaire's own initialExpression (fhirpathpy) agreeing with the server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import httpx
import orjson
import pytest
from fhir.resources.R4B.parameters import Parameters
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse
from fhirpathpy import evaluate
from starlette.testclient import TestClient

from plugin.app import create_app
from plugin.ehr.populate import INFLAMMATION_WINDOW, Known, full_years, populate
from plugin.screening import systems
from plugin.settings import ServiceSettings
from tests.factory import SCREENING, questionnaire, response

NOW = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
INTERPRETATION = systems.INTERPRETATION
HLA_B27, CRP, ESR = "26028-1", "1988-5", "4537-7"
LAUNCH_CONTEXT = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-launchContext"
INITIAL = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-initialExpression"


# -- helpers -------------------------------------------------------------------------------------


def lab(code: str, when: str, *, flag: str | None = None, status: str = "final", value: float | None = None,
        high: float | None = None, unit: str = "mg/L", **extra: object) -> dict:
    obs: dict = {"resourceType": "Observation", "id": uuid.uuid4().hex[:16], "status": status,
                 "category": [{"coding": [{"system": systems.OBS_CATEGORY, "code": "laboratory"}]}],
                 "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                 "effectiveDateTime": when, **extra}
    if flag:
        obs["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": flag}]}]
    if value is not None:
        obs["valueQuantity"] = {"value": value, "unit": unit, "system": systems.UCUM, "code": unit}
    if high is not None:
        obs["referenceRange"] = [{"high": {"value": high, "unit": "mg/L", "system": systems.UCUM, "code": "mg/L"}}]
    return obs


def run(observations: list[dict] = (), responses: list[dict] = (), birth: str | None = "1985-11-21",
        now: datetime = NOW) -> tuple[dict[str, object], list[dict]]:
    """(linkId -> answer, issues) of a populate on the screening."""
    patient = {"resourceType": "Patient", "id": "p1", **({"birthDate": birth} if birth else {})}
    done = populate(questionnaire(SCREENING), {"reference": "Patient/p1"}, Known(patient, list(observations),
                    list(responses)), now)
    return answers_of(done.response), [i.to_fhir() for i in done.issues]


def answers_of(qr: dict) -> dict[str, object]:
    found: dict[str, object] = {}

    def walk(items: list[dict]) -> None:
        for item in items:
            if item.get("answer"):
                value = item["answer"][0]
                found[item["linkId"]] = value.get("valueCoding", {}).get("code", value.get("valueInteger"))
            walk(item.get("item", []))

    walk(qr.get("item", []))
    return found


def about(issues: list[dict], link_id: str) -> list[dict]:
    return [i for i in issues if i.get("expression") == [f"QuestionnaireResponse.repeat(item).where(linkId="
                                                         f"'{link_id}')"]]


def earlier(answers: dict, authored: str, status: str = "completed", qr_id: str = "old") -> dict:
    return response(answers, status=status, id=qr_id, authored=authored)


# -- age ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("birth", "today", "age"), [
    ("1985-11-21", date(2026, 11, 21), 41),  # the birthday itself
    ("1985-11-22", date(2026, 11, 21), 40),  # tomorrow
    ("1985-11-20", date(2026, 11, 21), 41),
    ("1985-12-31", date(2026, 1, 1), 40),
    ("2000-02-29", date(2026, 2, 28), 25),  # not yet: reached on 1 March in a common year
    ("2000-02-29", date(2026, 3, 1), 26),
    ("2000-02-29", date(2028, 2, 29), 28),
    ("2000-02-29", date(2028, 2, 28), 27),
    ("2026-11-21", date(2026, 11, 21), 0),
    ("1980-05", date(2026, 11, 21), 46),  # month known and past: sure
    ("1980-12", date(2026, 11, 21), 45),  # month still to come: sure
    ("1980-11", date(2026, 11, 30), 46),  # the last day of the birth month: every day gives 46
    ("1980", date(2026, 12, 31), 46),  # New Year's Eve: every day of 1980 gives 46
])
def test_full_years_by_hand(birth, today, age):
    assert full_years(birth, today) == (age, "")


@pytest.mark.parametrize(("birth", "today", "why"), [
    ("1980", date(2026, 11, 21), "could mean 45 or 46"),
    ("1980-11", date(2026, 11, 21), "could mean 45 or 46"),
    ("2026-11-22", date(2026, 11, 21), "after today"),
    ("1980-02-30", date(2026, 11, 21), "not a FHIR date"),
    ("1980-13", date(2026, 11, 21), "not a FHIR date"),
    ("21/11/1985", date(2026, 11, 21), "not a FHIR date"),
])
def test_an_unsure_age_is_not_given(birth, today, why):
    age, reason = full_years(birth, today)
    assert age is None and why in reason


def test_age_prefilled_and_its_issues():
    assert run(birth="1985-11-22")[0]["age"] == 40
    answers, issues = run(birth="1980")
    assert "age" not in answers
    (issue,) = about(issues, "age")
    assert issue["severity"] == "warning" and issue["code"] == "incomplete" and "45 or 46" in issue["diagnostics"]
    answers, issues = run(birth="1980-05")
    assert answers["age"] == 46 and "known only as '1980-05'" in about(issues, "age")[0]["diagnostics"]
    answers, issues = run(birth=None)
    assert "age" not in answers and "no birthDate" in about(issues, "age")[0]["diagnostics"]
    answers, issues = run(birth="1890-01-01")  # 136: outside the item's 0-120
    assert "age" not in answers and about(issues, "age")[0]["code"] == "value"


def test_no_patient_no_age():
    unasked = Known(None, unsearched="no server data was asked for (local = false)")
    done = populate(questionnaire(SCREENING), {"reference": "Patient/p1"}, unasked, NOW)
    assert "age" not in answers_of(done.response)
    assert any("no Patient" in i.diagnostics for i in done.issues)
    assert any("local = false" in i.diagnostics for i in done.issues)


# -- HLA-B27 and CRP from lab results ------------------------------------------------------------------


def test_results_prefill_the_clinician_items():
    answers, issues = run([lab(HLA_B27, "2019-03-02", flag="POS"), lab(CRP, "2026-10-01", flag="H")])
    assert answers["hla-b27"] == "positive" and answers["crp-elevated"] == "raised"
    (hla,) = about(issues, "hla-b27")
    assert hla["severity"] == "information" and "HLA-B27 result of 2019-03-02" in hla["diagnostics"]
    assert "no other cause" in about(issues, "crp-elevated")[0]["diagnostics"]


def test_no_results_no_answers_and_said_so():
    answers, issues = run()
    assert "hla-b27" not in answers and "crp-elevated" not in answers
    assert about(issues, "hla-b27")[0]["code"] == "not-found"
    assert about(issues, "crp-elevated")[0]["code"] == "not-found"


def test_the_newer_result_wins():
    answers, _ = run([lab(HLA_B27, "2020-01-01", flag="POS"), lab(HLA_B27, "2024-06-01", flag="NEG"),
                      lab(CRP, "2026-06-01", flag="H"), lab(CRP, "2026-11-01", flag="N")])
    assert answers["hla-b27"] == "negative" and answers["crp-elevated"] == "normal"
    answers, _ = run([lab(HLA_B27, "2024-06-01T10:00:00+02:00", flag="NEG"),
                      lab(HLA_B27, "2024-06-01T09:30:00Z", flag="POS")])  # 08:00Z before 09:30Z
    assert answers["hla-b27"] == "positive"


def test_entered_in_error_and_preliminary_results_are_ignored():
    answers, _ = run([lab(HLA_B27, "2020-01-01", flag="NEG"),
                      lab(HLA_B27, "2025-01-01", flag="POS", status="entered-in-error"),
                      lab(HLA_B27, "2025-02-01", flag="POS", status="preliminary"),
                      lab(CRP, "2026-10-01", flag="N", status="amended"),
                      lab(CRP, "2026-11-01", flag="H", status="cancelled")])
    assert answers["hla-b27"] == "negative" and answers["crp-elevated"] == "normal"


def test_conflicting_results_prefill_nothing_not_even_an_earlier_answer():
    old = earlier({"hla-b27": "positive"}, "2025-01-01T10:00:00Z")
    answers, issues = run([lab(HLA_B27, "2024-06-01", flag="POS"), lab(HLA_B27, "2024-06-01", flag="NEG")], [old])
    assert "hla-b27" not in answers
    (issue,) = about(issues, "hla-b27")
    assert issue["severity"] == "warning" and issue["code"] == "conflict"


def test_hla_b27_by_coded_or_text_value():
    snomed = {"coding": [{"system": systems.SNOMED, "code": "10828004", "display": "Positive"}]}
    assert run([lab(HLA_B27, "2024-01-01", valueCodeableConcept=snomed)])[0]["hla-b27"] == "positive"
    assert run([lab(HLA_B27, "2024-01-01", valueString=" Negative ")])[0]["hla-b27"] == "negative"
    answers, issues = run([lab(HLA_B27, "2024-01-01", valueString="indeterminate")])
    assert "hla-b27" not in answers and about(issues, "hla-b27")[0]["code"] == "incomplete"


def test_crp_against_its_reference_range():
    assert run([lab(CRP, "2026-10-01", value=12, high=5)])[0]["crp-elevated"] == "raised"
    assert run([lab(CRP, "2026-10-01", value=5, high=5)])[0]["crp-elevated"] == "normal"  # at the limit: normal
    answers, issues = run([lab(CRP, "2026-10-01", value=1.2, unit="mg/dL", high=5)])  # units differ: no judging
    assert "crp-elevated" not in answers and about(issues, "crp-elevated")[0]["severity"] == "warning"


def test_either_crp_or_esr_raised_is_raised():
    answers, _ = run([lab(CRP, "2026-10-01", flag="N"), lab(ESR, "2026-09-01", flag="H")])
    assert answers["crp-elevated"] == "raised"
    answers, _ = run([lab("30341-2", "2026-09-01", flag="N")])
    assert answers["crp-elevated"] == "normal"


def test_old_inflammation_results_are_not_used():
    old = (NOW - INFLAMMATION_WINDOW - timedelta(days=1)).date().isoformat()
    answers, issues = run([lab(CRP, old, flag="H")])
    assert "crp-elevated" not in answers
    assert any("more than 12 months old" in i["diagnostics"] for i in about(issues, "crp-elevated"))
    assert run([lab(HLA_B27, "1999-01-01", flag="POS")])[0]["hla-b27"] == "positive"  # a gene does not change


def test_other_codes_are_not_read():
    answers, _ = run([lab("30522-7", "2026-10-01", flag="H"),  # hs-CRP: a cardiovascular risk test
                      {**lab(HLA_B27, "2024-01-01", flag="POS"), "code": {"coding": [
                          {"system": "http://example.org/local", "code": HLA_B27}]}}])
    assert answers == {"age": 41}


# -- earlier answers ---------------------------------------------------------------------------------


def test_an_earlier_answer_fills_in_when_no_result_exists():
    old = earlier({"hla-b27": "positive", "crp-elevated": "raised"}, "2026-08-01T10:00:00Z", qr_id="qr-7")
    answers, issues = run(responses=[old])
    assert answers["hla-b27"] == "positive" and answers["crp-elevated"] == "raised"
    assert "QuestionnaireResponse/qr-7 of 2026-08-01" in about(issues, "hla-b27")[0]["diagnostics"]


def test_a_lab_result_beats_an_earlier_answer():
    old = earlier({"hla-b27": "positive"}, "2026-08-01T10:00:00Z")
    assert run([lab(HLA_B27, "2010-01-01", flag="NEG")], [old])[0]["hla-b27"] == "negative"


def test_which_earlier_answers_count():
    not_tested = earlier({"hla-b27": "not-tested"}, "2026-09-01T10:00:00Z", qr_id="new")
    positive = earlier({"hla-b27": "positive"}, "2020-01-01T10:00:00Z")
    assert "hla-b27" not in run(responses=[positive, not_tested])[0]  # the latest says not tested
    wrong = earlier({"hla-b27": "positive"}, "2026-09-01T10:00:00Z", status="entered-in-error")
    draft = earlier({"hla-b27": "positive"}, "2026-09-01T10:00:00Z", status="in-progress")
    assert "hla-b27" not in run(responses=[wrong, draft])[0]
    stale = earlier({"crp-elevated": "raised"}, "2025-01-01T10:00:00Z")
    assert "crp-elevated" not in run(responses=[stale])[0]  # CRP changes: only the last 12 months
    other_form = {**positive, "questionnaire": "https://example.org/Questionnaire/other"}
    assert "hla-b27" not in run(responses=[other_form])[0]


# -- the response ---------------------------------------------------------------------------------------


def test_the_response_follows_the_questionnaire_and_is_valid_fhir():
    done = populate(questionnaire(SCREENING), {"reference": "Patient/p1"},
                    Known({"resourceType": "Patient", "birthDate": "1985-11-21"}), NOW)
    qr = done.response
    assert qr["status"] == "in-progress" and qr["questionnaire"] == f"{SCREENING}|1.0.0"
    assert qr["subject"] == {"reference": "Patient/p1"} and qr["authored"] == "2026-11-21T09:00:00+00:00"
    assert [g["linkId"] for g in qr["item"]] == [g["linkId"] for g in questionnaire(SCREENING)["item"]]
    assert [i["linkId"] for i in qr["item"][2]["item"]] == ["hla-b27", "crp-elevated", "sacroiliitis-imaging"]
    assert answers_of(qr) == {"age": 41}  # nothing invented
    QuestionnaireResponse.model_validate(qr)
    Parameters.model_validate(done.parameters())


def test_the_initial_expression_is_declared_without_changing_the_contract():
    q = questionnaire(SCREENING)
    assert q["version"] == "1.0.0"
    (context,) = [e for e in q["extension"] if e["url"] == LAUNCH_CONTEXT]
    parts = {e["url"]: e for e in context["extension"]}
    assert parts["name"]["valueCoding"] == {"system": "http://hl7.org/fhir/uv/sdc/CodeSystem/launchContext",
                                            "code": "patient", "display": "Patient"}
    assert parts["type"]["valueCode"] == "Patient"
    assert initial_expression()["language"] == "text/fhirpath"


def initial_expression() -> dict:
    age = next(i for g in questionnaire(SCREENING)["item"] for i in g["item"] if i["linkId"] == "age")
    return next(e for e in age["extension"] if e["url"] == INITIAL)["valueExpression"]


def shifted(today: date, years: int, days: int) -> str:
    """The day `years` years before `today`, moved by `days` (29 February becomes 28 February)."""
    try:
        anchor = today.replace(year=today.year - years)
    except ValueError:
        anchor = today.replace(year=today.year - years, day=28)
    return (anchor + timedelta(days=days)).isoformat()


def fhirpath_age(birth: str | None) -> list:
    patient = {"resourceType": "Patient", **({"birthDate": birth} if birth else {})}
    return evaluate({}, initial_expression()["expression"], {"patient": patient})


def test_the_initial_expression_agrees_with_populate():
    """fhirpathpy's today() is the real one, so the birthdays are placed around the real today."""
    today = date.today()
    births = [shifted(today, years, days) for years in (0, 1, 30, 41) for days in (-1, 0, 1) if (years, days) != (
        0, 1)]
    births += ["2000-02-29", "1996-02-29", "1990-03-01", "1990-02-28"]
    births += [shifted(today, 40, days)[:7] for days in (-40, 0, 40)]  # year and month only
    assert date.today() == today
    for birth in births:
        expected, _ = full_years(birth, today)
        got = fhirpath_age(birth)
        if len(birth) == 10 or got:
            assert got == ([expected] if expected is not None else []), birth
        else:
            assert got == [], birth  # the expression is the more careful: nothing rather than a guess
    assert fhirpath_age(shifted(today, 41, 0)) == [41] and fhirpath_age(shifted(today, 41, 1)) == [40]
    assert fhirpath_age(None) == []  # no birthDate: no age, not a wrong one
    assert fhirpath_age(str(today.year - 50)) == []  # a year alone: no age


# -- over HTTP, embedded store ------------------------------------------------------------------------------


@pytest.fixture
def client(tmp_path) -> Iterator[TestClient]:
    with TestClient(create_app(ServiceSettings(store_path=tmp_path / "store.sqlite3"))) as test_client:
        yield test_client


def parameters(*extra: dict, subject: str | None = "Patient/p1", patient: dict | None = None) -> dict:
    params: list[dict] = [*extra]
    if subject:
        params.append({"name": "subject", "valueReference": {"reference": subject}})
    if patient:
        params.append({"name": "context", "part": [{"name": "name", "valueString": "patient"},
                                                   {"name": "content", "resource": patient}]})
    return {"resourceType": "Parameters", "parameter": params}


def today_age(birth: str) -> int | None:
    return full_years(birth, datetime.now().astimezone().date())[0]


def unpack(answer: httpx.Response) -> tuple[dict, list[dict]]:
    assert answer.status_code == 200, answer.text
    Parameters.model_validate(answer.json())
    parts = {p["name"]: p["resource"] for p in answer.json()["parameter"]}
    return parts["response"], parts.get("issues", {}).get("issue", [])


PATIENT = {"resourceType": "Patient", "id": "p1", "birthDate": "1985-11-21"}


def test_populate_on_the_embedded_store_with_the_patient_in_context(client):
    by_ref = {"name": "questionnaireRef", "valueReference": {"reference": "Questionnaire/back-pain-screening"}}
    inline = {"name": "questionnaire", "resource": questionnaire(SCREENING)}
    for url, extra in (("/Questionnaire/back-pain-screening/$populate", ()),
                       ("/Questionnaire/$populate", ({"name": "canonical", "valueUri": f"{SCREENING}|1.0.0"},)),
                       ("/Questionnaire/$populate", (by_ref,)),
                       ("/Questionnaire/$populate", (inline,))):
        qr, issues = unpack(client.post(url, content=orjson.dumps(parameters(*extra, patient=PATIENT)), headers=JSON))
        assert answers_of(qr) == {"age": today_age("1985-11-21")}, url
        assert qr["subject"] == {"reference": "Patient/p1"}
        assert {i["expression"][0].split("'")[1] for i in issues} == {"hla-b27", "crp-elevated"}


def test_the_populated_response_scores_once_completed(client):
    qr, _ = unpack(client.post("/Questionnaire/back-pain-screening/$populate",
                               content=orjson.dumps(parameters(patient=PATIENT)), headers=JSON))
    qr["status"] = "completed"
    extracted = client.post("/QuestionnaireResponse/$extract", content=orjson.dumps(qr), headers=JSON)
    assert extracted.status_code == 200, extracted.text
    assert any(e["resource"]["resourceType"] == "Observation" for e in extracted.json()["entry"])


def test_an_earlier_response_in_the_embedded_store_is_used(client):
    old = response({"pain-duration": "1y-5y", "hla-b27": "positive"}, id="earlier-1",
                   subject={"reference": "Patient/p1"}, authored="2026-01-10T10:00:00Z")
    assert client.post("/QuestionnaireResponse", content=orjson.dumps(old), headers=JSON).status_code == 201
    qr, issues = unpack(client.post("/Questionnaire/back-pain-screening/$populate",
                                    content=orjson.dumps(parameters(patient=PATIENT)), headers=JSON))
    assert answers_of(qr)["hla-b27"] == "positive"
    assert "QuestionnaireResponse/earlier-1" in about(issues, "hla-b27")[0]["diagnostics"]
    qr, issues = unpack(client.post("/Questionnaire/back-pain-screening/$populate", content=orjson.dumps(
        parameters({"name": "local", "valueBoolean": False}, patient=PATIENT)), headers=JSON))
    assert "hla-b27" not in answers_of(qr) and "local = false" in about(issues, "hla-b27")[0]["diagnostics"]


def test_populate_answers_in_xml(client):
    answer = client.post("/Questionnaire/back-pain-screening/$populate", content=orjson.dumps(parameters(
        patient=PATIENT)), headers={**JSON, "Accept": "application/fhir+xml"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/fhir+xml")
    assert b"<QuestionnaireResponse>" in answer.content and b'<valueInteger value="' in answer.content


@pytest.mark.parametrize(("url", "body", "status", "code"), [
    ("/Questionnaire/back-pain-screening/$populate", parameters(subject=None, patient=PATIENT), 400, "required"),
    ("/Questionnaire/back-pain-screening/$populate", parameters(subject="Practitioner/1", patient=PATIENT), 400,
     "invalid"),
    ("/Questionnaire/back-pain-screening/$populate", {"resourceType": "Patient"}, 400, "invalid"),
    ("/Questionnaire/back-pain-screening/$populate", parameters({"name": "bogus", "valueString": "x"}), 400,
     "not-supported"),
    ("/Questionnaire/$populate", parameters(patient=PATIENT), 400, "required"),
    ("/Questionnaire/$populate", parameters({"name": "canonical", "valueUri": SCREENING},
                                            {"name": "questionnaireRef", "valueReference": {
                                                "reference": "Questionnaire/back-pain-screening"}}), 400, "required"),
    ("/Questionnaire/$populate", parameters({"name": "canonical", "valueUri": "https://example.org/Q/x"}), 404,
     "not-found"),
    ("/Questionnaire/$populate", parameters({"name": "canonical", "valueUri": f"{SCREENING}|9.9.9"}), 404,
     "not-found"),
    ("/Questionnaire/no-such-form/$populate", parameters(patient=PATIENT), 404, "not-found"),
    ("/Questionnaire/back-pain-screening/$populate", parameters(), 422, "not-found"),  # embedded: no Patients
    ("/Questionnaire/back-pain-screening/$populate", parameters(subject="Patient/p2", patient=PATIENT), 422,
     "invalid"),
    ("/Questionnaire/back-pain-screening/$populate", parameters(patient={**PATIENT, "birthDate": "21.11.1985"}), 400,
     "structure"),
    ("/Questionnaire/$populate", parameters({"name": "canonical", "valueUri": 5}), 400, "invalid"),
    ("/Questionnaire/$populate", parameters({"name": "questionnaireRef", "valueReference": "x"}), 404, "not-found"),
    ("/Questionnaire/$populate", parameters({"name": "questionnaire", "resource": "x"}), 400, "invalid"),
    ("/Questionnaire/back-pain-screening/$populate", parameters({"name": "context", "part": "patient"}), 400,
     "not-supported"),
    ("/Questionnaire/back-pain-screening/$populate", parameters({"name": "local", "valueBoolean": "yes"}), 400,
     "invalid"),
    ("/Questionnaire/back-pain-screening/$populate", {"resourceType": "Parameters", "parameter": [1]}, 400,
     "structure"),
])
def test_bad_calls_get_an_operation_outcome(client, url, body, status, code):
    answer = client.post(url, content=orjson.dumps(body), headers=JSON)
    assert answer.status_code == status, answer.text
    assert answer.json()["resourceType"] == "OperationOutcome" and answer.json()["issue"][0]["code"] == code


def test_a_form_without_prefillable_items_gets_its_empty_structure(client):
    qr, issues = unpack(client.post("/Questionnaire/basdai/$populate", content=orjson.dumps(parameters(
        patient=PATIENT)), headers=JSON))
    assert qr["questionnaire"].startswith("https://backpain-screen.org/fhir/Questionnaire/basdai|")
    assert answers_of(qr) == {} and issues == [] and qr["item"]


def test_a_logical_subject_with_a_patient_in_context(client):
    body = parameters(subject=None, patient={k: v for k, v in PATIENT.items() if k != "id"})
    body["parameter"].append({"name": "subject", "valueReference": {"identifier": {"system": "urn:mrn", "value": "7"}}})
    qr, issues = unpack(client.post("/Questionnaire/back-pain-screening/$populate", content=orjson.dumps(body),
                                    headers=JSON))
    assert answers_of(qr) == {"age": today_age("1985-11-21")} and qr["subject"]["identifier"]["value"] == "7"
    assert "names no Patient id" in about(issues, "hla-b27")[0]["diagnostics"]


def test_populate_needs_the_token_when_one_is_set(tmp_path):
    settings = ServiceSettings(store_path=tmp_path / "store.sqlite3", ingest_token="s3cret")
    with TestClient(create_app(settings)) as locked:
        body = orjson.dumps(parameters(patient=PATIENT))
        assert locked.post("/Questionnaire/back-pain-screening/$populate", content=body,
                           headers=JSON).status_code == 401
        assert locked.post("/Questionnaire/back-pain-screening/$populate", content=body,
                           headers={**JSON, "Authorization": "Bearer s3cret"}).status_code == 200


def test_the_capability_statement_declares_populate(client):
    questionnaire_rest = client.get("/metadata").json()["rest"][0]["resource"][0]
    assert questionnaire_rest["operation"] == [{"name": "populate", "definition": (
        "http://hl7.org/fhir/uv/sdc/OperationDefinition/Questionnaire-populate")}]
    assert client.get("/Questionnaire/back-pain-screening").json()["version"] == "1.1.0"  # reads still work


# -- over HTTP, on the EHR's FHIR server -------------------------------------------------------------------------


@pytest.fixture
def on_server(fhir_base_url: str, tmp_path) -> Iterator[TestClient]:
    settings = ServiceSettings(fhir_base_url=fhir_base_url, store_path=tmp_path / "unused.sqlite3")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def stored_lab(fhir: httpx.Client, patient: str, **fields: object) -> None:
    obs = lab(**fields)  # type: ignore[arg-type]
    del obs["id"]
    obs["subject"] = {"reference": patient}
    created = fhir.post("/Observation", content=orjson.dumps(obs))
    assert created.status_code == 201, created.text


def test_populate_reads_the_patient_and_results_from_the_fhir_server(on_server: TestClient, fhir: httpx.Client):
    birth = shifted(datetime.now().astimezone().date(), 38, 1)  # the birthday is tomorrow
    created = fhir.post("/Patient", content=orjson.dumps({"resourceType": "Patient", "birthDate": birth}))
    patient = f"Patient/{created.json()['id']}"
    recent = (datetime.now(UTC) - timedelta(days=20)).date().isoformat()
    stored_lab(fhir, patient, code=HLA_B27, when="2021-05-01", flag="NEG")
    stored_lab(fhir, patient, code=HLA_B27, when="2023-05-01", flag="POS")
    stored_lab(fhir, patient, code=HLA_B27, when="2025-05-01", flag="NEG", status="entered-in-error")
    stored_lab(fhir, patient, code=CRP, when=recent, value=14, high=5)
    qr, issues = unpack(on_server.post("/Questionnaire/back-pain-screening/$populate",
                                       content=orjson.dumps(parameters(subject=patient)), headers=JSON))
    assert answers_of(qr) == {"age": 37, "hla-b27": "positive", "crp-elevated": "raised"}
    assert "2023-05-01" in about(issues, "hla-b27")[0]["diagnostics"]
    assert fhirpath_age(birth) == [37]  # a renderer given the same Patient says the same


def test_a_patient_the_fhir_server_does_not_have_is_422(on_server: TestClient, patient: str):
    answer = on_server.post("/Questionnaire/back-pain-screening/$populate",
                            content=orjson.dumps(parameters(subject="Patient/not-there")), headers=JSON)
    assert answer.status_code == 422 and answer.json()["issue"][0]["code"] == "not-found"
    qr, issues = unpack(on_server.post("/Questionnaire/back-pain-screening/$populate",
                                       content=orjson.dumps(parameters(subject=patient)), headers=JSON))
    assert answers_of(qr) == {} and "no birthDate" in about(issues, "age")[0]["diagnostics"]
