"""The service with the EHR's FHIR server as its store (test_service runs it on the embedded store)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest
from starlette.testclient import TestClient

from plugin.app import create_app
from plugin.settings import ServiceSettings
from tests.fhir_helpers import for_patient, results, tasks, written_locations

JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


@pytest.fixture
def service(fhir_base_url: str, tmp_path) -> Iterator[TestClient]:
    settings = ServiceSettings(fhir_base_url=fhir_base_url, store_path=tmp_path / "unused.sqlite3")
    with TestClient(create_app(settings)) as client:
        yield client


def test_post_writes_to_the_fhir_server_once(service: TestClient, fhir: httpx.Client, patient: str):
    body = for_patient("qr-emergency.json", patient)
    first = service.post("/QuestionnaireResponse", content=body, headers=JSON)
    assert first.status_code == 201, first.text
    qr_id = orjson.loads(body)["id"]
    assert f"/QuestionnaireResponse/{qr_id}/_history/" in first.headers["Location"]
    assert first.headers["ETag"] == f'W/"{first.json()["meta"]["versionId"]}"'
    assert fhir.get(f"/QuestionnaireResponse/{qr_id}").status_code == 200
    assert results(fhir, patient)["screening-outcome"]["valueCodeableConcept"]["coding"][0]["code"] == \
        "emergency-assessment"
    (review,) = tasks(fhir, patient)
    assert review["priority"] == "stat"

    again = service.post("/QuestionnaireResponse", content=body, headers={**JSON, "Prefer": "return=OperationOutcome"})
    assert again.status_code == 200, again.text
    locations = set(written_locations(again.json()))
    assert f"Task/{review['id']}" in locations
    assert len(results(fhir, patient)) == 7 and len(tasks(fhir, patient)) == 1


def test_a_patient_the_fhir_server_does_not_know_is_refused(service: TestClient, fhir: httpx.Client):
    body = for_patient("qr-refer-asas.json", "Patient/not-on-this-server")
    answer = service.post("/QuestionnaireResponse", content=body, headers=JSON)
    assert answer.status_code == 400 and answer.json()["issue"][0]["code"] == "not-found"
    assert fhir.get(f"/QuestionnaireResponse/{orjson.loads(body)['id']}").status_code in (404, 410)


def test_readyz_and_results_view_read_the_fhir_server(service: TestClient, patient: str):
    body = for_patient("qr-refer-asas.json", patient)
    assert service.post("/QuestionnaireResponse", content=body, headers=JSON).status_code == 201
    assert service.get("/readyz").json() == {"status": "ready", "store": "fhir-server"}
    view = service.get(f"/results/{orjson.loads(body)['id']}", headers={"Accept": "text/html"})
    assert view.status_code == 200 and "refer-rheumatology" in view.text and "Referral to rheumatologist" in view.text
