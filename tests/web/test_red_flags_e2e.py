"""A reported red flag is never lost (SCREENING.md §7), end to end, on both stores.

Each path that used to drop a red flag (a response not completed, a response
refused for an unrelated error, through POST, $extract, a rest-hook
notification and the catch-up sync, an amendment that leaves the flag
unanswered) is driven through the running service, and what the store then
holds is read back: the `red-flags` Observation and the review Task.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from starlette.testclient import TestClient

from plugin.app import create_app
from plugin.screening import systems
from plugin.settings import ServiceSettings
from plugin.stores.sync import RECORDED, sync
from plugin.stores.writeback import publish
from tests.factory import response

JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
NO_FLAGS = dict.fromkeys(("rf-saddle-numbness", "rf-bladder-bowel", "rf-leg-weakness", "rf-fever", "rf-weight-loss",
                          "rf-cancer-history", "rf-night-pain-unrelieved", "rf-trauma", "rf-immunosuppression"), False)
MECHANICAL = {"pain-duration": "1y-5y", "onset-age": 38, "age": 44, "onset-gradual": False}


@pytest.fixture(params=["embedded", "fhir-server"])
def service(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    base = request.getfixturevalue("fhir_base_url") if request.param == "fhir-server" else None
    settings = ServiceSettings(fhir_base_url=base, store_path=tmp_path / "store.sqlite3", notify_secret="s3cret")
    with TestClient(create_app(settings)) as client:
        if base:  # as a clinic's server holds them: HAPI then validates every response against its Questionnaire
            client.portal.call(publish, client.app.state.service.store, client.app.state.service.screener)
        yield client


@pytest.fixture
def patient(service: TestClient) -> str:
    """A Patient in the store the service writes to (a FHIR server checks that it exists)."""
    store = service.app.state.service.store
    created = service.portal.call(store.create, {"resourceType": "Patient", "active": True})
    return f"Patient/{created['id']}"


def qr_for(patient: str, answers: dict, status: str = "completed", version: str | None = None) -> dict:
    return response(answers, status=status, version=version, id=f"rf-{uuid.uuid4()}",
                    subject={"reference": patient})


def found(service: TestClient, resource_type: str, patient: str) -> list[dict]:
    store = service.app.state.service.store

    async def search() -> list[dict]:
        return [r async for r in store.search(resource_type, {"patient": patient})]

    return service.portal.call(search)


def red_flags(service: TestClient, patient: str) -> dict:
    (obs,) = [o for o in found(service, "Observation", patient) if o["code"]["coding"][0]["code"] == "red-flags"]
    return obs


def reviews(service: TestClient, patient: str) -> list[dict]:
    return [t for t in found(service, "Task", patient) if t["code"]["coding"][0]["code"] == "clinical-review"]


def assert_recorded(service: TestClient, patient: str, *, priority: str, status: str) -> None:
    obs = red_flags(service, patient)
    assert obs["valueBoolean"] is True and obs["status"] == status
    (task,) = reviews(service, patient)
    assert task["priority"] == priority and task["status"] == "requested"
    assert "Criteria met:" in task["description"]


def refusal_says_recorded(answer) -> None:
    assert answer.status_code == 400, answer.text
    issues = answer.json()["issue"]
    assert issues[0]["severity"] == "error"
    assert issues[-1]["severity"] == "information" and "were recorded" in issues[-1]["diagnostics"]


@pytest.mark.parametrize(("status", "flag", "priority"), [("in-progress", "rf-saddle-numbness", "stat"),
                                                          ("stopped", "rf-fever", "urgent")])
def test_post_an_unfinished_response_with_a_red_flag(service: TestClient, patient: str, status: str, flag: str,
                                                     priority: str):
    qr = qr_for(patient, {flag: True}, status=status)
    answer = service.post("/QuestionnaireResponse", content=orjson.dumps(qr), headers=JSON)
    assert answer.status_code == 201, answer.text
    assert_recorded(service, patient, priority=priority, status="preliminary")
    assert [o["code"]["coding"][0]["code"] for o in found(service, "Observation", patient)] == ["red-flags"]


def test_post_an_unfinished_response_without_a_red_flag_writes_nothing(service: TestClient, patient: str):
    qr = qr_for(patient, {**NO_FLAGS, "rf-saddle-numbness": None}, status="in-progress")
    answer = service.post("/QuestionnaireResponse", content=orjson.dumps(qr), headers=JSON)
    assert answer.status_code == 200 and "Nothing was written" in answer.json()["issue"][0]["diagnostics"]
    assert found(service, "Observation", patient) == [] and found(service, "Task", patient) == []


def negated(qr: dict) -> dict:
    """A modifier extension the plugin does not know on a non-flag answer: the plugin refuses the response, a
    FHIR server that allows any extension (HAPI's default) stores it."""
    (answer,) = [c["answer"][0] for g in qr["item"] for c in g.get("item", []) if c["linkId"] == "pain-duration"]
    answer["modifierExtension"] = [{"url": "https://example.org/negated", "valueBoolean": True}]
    return qr


def out_of_range(qr: dict, link_id: str, value: object) -> dict:
    """The bad answer goes in as it would arrive, past the factory's own typing."""
    for item in qr["item"]:
        for child in item.get("item", []):
            if child["linkId"] == link_id:
                child["answer"] = [{"valueInteger": value} if link_id == "age" else {"valueCoding": {"code": value}}]
    return qr


def validating(service: TestClient) -> bool:
    """HAPI validates what it is sent against the published Questionnaire; the embedded store does not. (HAPI
    caches a Questionnaire it could not find for a while: a response sent before the publish, by an earlier
    test, can leave it unvalidated, and the response then stored.)"""
    return service.app.state.service.settings.fhir_base_url is not None


@pytest.mark.parametrize("bad", [("age", 200), ("pain-duration", "forever"), ("modifier", None)])
def test_post_a_refused_response_with_a_red_flag(service: TestClient, patient: str, bad: tuple):
    qr = qr_for(patient, {**MECHANICAL, **NO_FLAGS, "rf-bladder-bowel": True})
    qr = negated(qr) if bad[0] == "modifier" else out_of_range(qr, *bad)
    answer = service.post("/QuestionnaireResponse", content=orjson.dumps(qr), headers=JSON)
    refusal_says_recorded(answer)
    assert_recorded(service, patient, priority="stat", status="final")
    stored = found(service, "QuestionnaireResponse", patient)
    if stored:  # the response as it came, so the results can point at it
        assert [r["id"] for r in stored] == [qr["id"]]
        assert red_flags(service, patient)["derivedFrom"] == [{"reference": f"QuestionnaireResponse/{qr['id']}"}]
    else:  # HAPI refused the invalid response itself: the results name it by its identifier instead
        assert validating(service) and bad[0] != "modifier"  # only a validating server, only an invalid answer
        (source,) = red_flags(service, patient)["derivedFrom"]
        assert source["identifier"]["value"] and source["display"].startswith("response refused: HTTP 4")


def test_extract_of_a_refused_response_returns_the_red_flags_and_the_issues(service: TestClient, patient: str):
    qr = qr_for(patient, {**NO_FLAGS, "rf-leg-weakness": True, "age": 200})
    answer = service.post("/QuestionnaireResponse/$extract", content=orjson.dumps(qr), headers=JSON)
    assert answer.status_code == 200, answer.text
    parameters = {p["name"]: p["resource"] for p in answer.json()["parameter"]}
    bundle, issues = parameters["return"], parameters["issues"]
    task = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Task")
    assert task["priority"] == "stat"
    assert issues["issue"][0]["expression"] and issues["issue"][-1]["severity"] == "information"
    assert found(service, "Observation", patient) == [] and found(service, "Task", patient) == []  # writes nothing


def test_a_rest_hook_notification_of_a_refused_response(service: TestClient, patient: str):
    qr = negated(qr_for(patient, {**MECHANICAL, **NO_FLAGS, "rf-saddle-numbness": True}))  # one the EHR's server holds
    put_as_the_ehr_would(service, qr)
    answer = service.put(f"/QuestionnaireResponse/{qr['id']}", content=orjson.dumps(qr),
                         headers={**JSON, "X-Notification-Secret": "s3cret"})
    refusal_says_recorded(answer)
    assert_recorded(service, patient, priority="stat", status="final")


def test_the_catch_up_sync_records_red_flags_it_cannot_score(service: TestClient, patient: str, tmp_path: Path):
    unfinished = qr_for(patient, {"rf-fever": True}, status="in-progress")
    refused = negated(qr_for(patient, {**MECHANICAL, **NO_FLAGS, "rf-saddle-numbness": True}))
    for qr in (unfinished, refused):
        put_as_the_ehr_would(service, qr)
    svc = service.app.state.service
    since = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")  # a shared server holds more
    counts = service.portal.call(sync, svc.store, svc.screener, tmp_path / "sync-state.json", since)
    assert counts[RECORDED] >= 1 and counts["written"] >= 1
    priorities = sorted(t["priority"] for t in reviews(service, patient))
    assert priorities == ["stat", "urgent"]
    assert {o["status"] for o in found(service, "Observation", patient)} == {"preliminary", "final"}


def test_an_amendment_leaving_the_flag_unanswered_keeps_the_review(service: TestClient, patient: str):
    qr = qr_for(patient, {**MECHANICAL, **NO_FLAGS, "rf-saddle-numbness": True})
    assert service.post("/QuestionnaireResponse", content=orjson.dumps(qr), headers=JSON).status_code == 201
    (task,) = reviews(service, patient)
    unanswered = {**qr_for(patient, {**MECHANICAL, **NO_FLAGS, "rf-saddle-numbness": None}, status="amended"),
                  "id": qr["id"]}
    assert service.post("/QuestionnaireResponse", content=orjson.dumps(unanswered), headers=JSON).status_code == 200
    (kept,) = reviews(service, patient)
    assert (kept["id"], kept["status"]) == (task["id"], "requested")  # unanswered is not "no"
    answered_no = {**qr_for(patient, {**MECHANICAL, **NO_FLAGS}, status="amended"), "id": qr["id"]}
    assert service.post("/QuestionnaireResponse", content=orjson.dumps(answered_no), headers=JSON).status_code == 200
    (cancelled,) = reviews(service, patient)
    assert cancelled["status"] == "cancelled"


def test_the_ask_red_flags_task_until_they_are_answered_no(service: TestClient, patient: str):
    qr = qr_for(patient, {**MECHANICAL, **NO_FLAGS, "rf-bladder-bowel": None, "rf-trauma": None})
    assert service.post("/QuestionnaireResponse", content=orjson.dumps(qr), headers=JSON).status_code == 201
    (ask,) = found(service, "Task", patient)
    assert ask["code"]["coding"][0] == {"system": systems.RESULTS, "code": "ask-red-flags",
                                        "display": "Ask the unanswered red-flag questions"}
    assert ask["priority"] == "urgent"  # bladder or bowel is of the emergency class
    assert "New bladder or bowel dysfunction" in ask["description"] and "Started after a fall" in ask["description"]
    answered = {**qr_for(patient, {**MECHANICAL, **NO_FLAGS}, status="amended"), "id": qr["id"]}
    assert service.post("/QuestionnaireResponse", content=orjson.dumps(answered), headers=JSON).status_code == 200
    (cancelled,) = found(service, "Task", patient)
    assert cancelled["status"] == "cancelled"


def test_a_response_to_1_1_0_with_a_new_flag(service: TestClient, patient: str):
    qr = qr_for(patient, {"rf-sciatica-both-legs": True}, status="in-progress", version="1.1.0")
    assert service.post("/QuestionnaireResponse", content=orjson.dumps(qr), headers=JSON).status_code == 201
    assert_recorded(service, patient, priority="stat", status="preliminary")


def put_as_the_ehr_would(service: TestClient, qr: dict) -> None:
    """The response stored as the EHR's server holds it, before the plugin hears of it."""
    store = service.app.state.service.store
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"fullUrl": f"{store.base_url}/QuestionnaireResponse/{qr['id']}", "resource": qr,
                         "request": {"method": "PUT", "url": f"QuestionnaireResponse/{qr['id']}"}}]}
    answer = service.portal.call(store.transaction, bundle)
    assert answer["entry"][0]["response"]["status"][:3] in ("200", "201")


@pytest.mark.parametrize("answers", [{"rf-saddle-numbness": "true"}, {"rf-saddle-numbness": "false"}, {}])
def test_every_result_a_patient_reads_ends_with_safety_netting(tmp_path: Path, answers: dict):
    with TestClient(create_app(ServiceSettings(store_path=tmp_path / "store.sqlite3"))) as client:
        page = client.post("/form", data=answers)
    assert page.status_code == 200
    assert "numbness around your bottom or genitals" in page.text and "get emergency care now" in page.text
    assert "caused by inflammation" not in page.text  # never overstates what the criteria show


def test_every_cds_card_and_outcome_narrative_ends_with_safety_netting():
    from plugin.ehr.cds_cards import FOOTER
    from plugin.screening import data
    from plugin.screening.pipeline import Screener

    advice = data.safety_netting("clinician")
    assert "saddle numbness" in advice and "NG65 rec. 1.1.7" in advice
    assert FOOTER.startswith(advice)
    bundle = Screener().process(response({"rf-saddle-numbness": False})).bundle
    outcome = next(e["resource"] for e in bundle["entry"] if e["resource"].get("code", {}).get("coding", [{}])[0]
                   .get("code") == "screening-outcome")
    assert outcome["text"]["div"].endswith(f"<b>Safety-netting</b>: {advice}</p></div>")
