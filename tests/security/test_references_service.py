"""Issue #14 items 2 and 3 through the HTTP service: one patient-reference rule and one id rule, everywhere.

Each look-alike reference is refused with 400 and an issue on the element
that carries it; nothing is written. Ids `.` and `..` and ids outside the
FHIR id rule are refused in every path that takes an id.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from starlette.testclient import TestClient

from plugin.app import create_app
from plugin.ehr.cds_hooks import _hook_request
from plugin.screening.outcome import InvalidInput
from plugin.settings import ServiceSettings
from tests.factory import response
from tests.screening.test_references import LOOK_ALIKES

JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
# Raw "." and ".." are resolved away by any HTTP client; percent-encoded they reach the router as "." and "..".
BAD_IDS = ["%2E%2E", "%2e", "a_b", "a" * 65, "a%20b", "%C3%A4"]


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    settings = ServiceSettings(store_path=tmp_path / "store.sqlite3", notify_secret="s3cret")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def expressions(answer) -> list[str]:
    return [e for issue in answer.json()["issue"] for e in issue.get("expression", [])]


def stored_responses(client: TestClient) -> int:
    store = client.app.state.service.store
    return client.portal.call(store.search_page, "QuestionnaireResponse", {"_summary": "count"})["total"]


@pytest.mark.parametrize("reference", LOOK_ALIKES)
def test_ingest_refuses_a_look_alike_subject(client, reference):
    qr = response({"rf-saddle-numbness": False}) | {"subject": {"reference": reference}}
    answer = client.post("/QuestionnaireResponse", content=orjson.dumps(qr), headers=JSON)
    assert answer.status_code == 400, answer.text
    assert expressions(answer) == ["QuestionnaireResponse.subject.reference"]
    assert stored_responses(client) == 0


@pytest.mark.parametrize("reference", LOOK_ALIKES)
def test_a_notification_about_a_look_alike_subject_is_refused(client, reference):
    qr = response({}) | {"id": "n1", "subject": {"reference": reference}}
    answer = client.put("/QuestionnaireResponse/n1", content=orjson.dumps(qr),
                        headers={**JSON, "X-Notification-Secret": "s3cret"})
    assert answer.status_code == 400
    assert "QuestionnaireResponse.subject.reference" in expressions(answer)


@pytest.mark.parametrize("reference", LOOK_ALIKES)
def test_populate_refuses_a_look_alike_subject(client, reference):
    subject = {"name": "subject", "valueReference": {"reference": reference}}
    params = {"resourceType": "Parameters", "parameter": [subject]}
    answer = client.post("/Questionnaire/back-pain-screening/$populate", content=orjson.dumps(params), headers=JSON)
    assert answer.status_code == 400, answer.text
    assert expressions(answer) == ["Parameters.parameter.where(name='subject')"]


@pytest.mark.parametrize("patient_id", [".", "..", "", "a/b", "Patient/V", "a" * 65, 7, None])
def test_cds_context_patient_id_must_be_a_fhir_id(patient_id):
    hook = {"hook": "patient-view", "hookInstance": "i", "context": {"patientId": patient_id}}
    with pytest.raises(InvalidInput) as refused:
        _hook_request(hook)
    assert [i.expression for i in refused.value.issues] == ["context.patientId"]


@pytest.mark.parametrize("user", ["Practitioner/..", "x/Practitioner/1", "Practitioner/1/_history/2", "Device/1"])
def test_cds_context_user_must_be_a_plain_reference(user):
    hook = {"hook": "patient-view", "hookInstance": "i", "context": {"patientId": "p1", "userId": user}}
    with pytest.raises(InvalidInput) as refused:
        _hook_request(hook)
    assert [i.expression for i in refused.value.issues] == ["context.userId"]


@pytest.mark.parametrize("bad_id", BAD_IDS)
@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/results/{}"), ("GET", "/Questionnaire/{}"), ("GET", "/CodeSystem/{}"),
    ("POST", "/Questionnaire/{}/$populate"), ("PUT", "/QuestionnaireResponse/{}"),
    ("PUT", "/notify/QuestionnaireResponse/{}"),
])
def test_every_path_id_outside_the_fhir_id_rule_is_refused(client, method, path, bad_id):
    answer = client.request(method, path.format(bad_id), content=b"{}",
                            headers={**JSON, "X-Notification-Secret": "s3cret"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("qr_id", [".", "..", "a_b", "a" * 65])
def test_ingest_refuses_a_response_id_outside_the_fhir_id_rule(client, qr_id):
    qr = response({}) | {"id": qr_id}
    answer = client.post("/QuestionnaireResponse", content=orjson.dumps(qr), headers=JSON)
    assert answer.status_code == 400
    assert expressions(answer) == ["QuestionnaireResponse.id"]
    assert stored_responses(client) == 0


def test_a_subject_on_the_configured_fhir_base_is_accepted_and_filed_relative(tmp_path, monkeypatch):
    """The FHIR base names the server the plugin writes to: an absolute URL on it is the same patient."""
    from plugin.screening.pipeline import Screener, Settings

    base = "https://ehr.example.org/fhir"
    outcome = Screener(Settings(fhir_base=base)).process(response({}) | {"subject": {"reference": f"{base}/Patient/V"}})
    response_entry = outcome.bundle["entry"][1]["resource"]
    assert response_entry["subject"]["reference"] == "Patient/V"


@pytest.mark.parametrize("reference", [r for r in LOOK_ALIKES if r.strip() == r and r])  # a link is trimmed
def test_a_form_link_naming_a_look_alike_is_refused_before_the_patient_fills_it_in(client, reference):
    """Refused when the form opens, so a patient never fills in a form whose answers could not be saved."""
    answer = client.get("/", params={"patient": reference}, headers={"Accept": "text/html"})
    assert answer.status_code == 400
