"""The plugin's transaction Bundles on a real FHIR R4 server (the session's HAPI, or FHIR_BASE_URL).

Each test works on its own new Patient, so the tests also run against a
shared server such as HAPI without cleaning it between tests.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from plugin.screening.pipeline import Screener
from tests.fhir_helpers import total

pytestmark = pytest.mark.any_server  # also on a server FHIR_BASE_URL names (README: Tests)

EXAMPLES = Path(__file__).resolve().parents[2] / "questionnaires" / "examples"
SCREENER = Screener()


def example_for(patient: str, name: str = "qr-refer-asas.json") -> dict:
    qr = orjson.loads((EXAMPLES / name).read_bytes())
    qr["id"] = f"qr-{uuid.uuid4()}"
    qr["subject"] = {"reference": patient}
    return qr


def post_transaction(fhir: httpx.Client, bundle: dict) -> httpx.Response:
    return fhir.post("/", content=orjson.dumps(bundle))


def test_a_bundle_is_written_once_and_a_replay_changes_nothing(fhir: httpx.Client, patient: str):
    qr = example_for(patient)
    first = post_transaction(fhir, SCREENER.process(qr).bundle)
    assert first.status_code == 200, first.text
    statuses = [e["response"]["status"] for e in first.json()["entry"]]
    assert all(s.startswith("2") for s in statuses), statuses

    replay = post_transaction(fhir, SCREENER.process(qr).bundle)  # built again, later: a new clock
    assert replay.status_code == 200, replay.text

    assert total(fhir, "Observation", subject=patient) == 7
    assert total(fhir, "Task", patient=patient) == 1
    outcome = fhir.get("/Observation", params={"subject": patient, "code": "screening-outcome"}).json()
    (entry,) = outcome["entry"]
    assert entry["resource"]["valueCodeableConcept"]["coding"][0]["code"] == "refer-rheumatology"
    members = {m["reference"] for m in entry["resource"]["hasMember"]}
    assert all(ref.startswith("Observation/") for ref in members) and len(members) == 6  # urn:uuids resolved


def test_references_in_the_bundle_point_at_what_the_server_created(fhir: httpx.Client, patient: str):
    bundle = SCREENER.process(example_for(patient)).bundle
    assert post_transaction(fhir, bundle).status_code == 200
    (task,) = fhir.get("/Task", params={"patient": patient}).json()["entry"]
    requester = fhir.get(f"/{task['resource']['requester']['reference']}")
    assert requester.status_code == 200 and requester.json()["resourceType"] == "Device"
    reason = fhir.get(f"/{task['resource']['reasonReference']['reference']}").json()  # 0..1 in R4
    assert reason["code"]["coding"][0]["code"] == "screening-outcome"


def test_a_transaction_that_fails_midway_leaves_nothing_behind(fhir: httpx.Client, patient: str):
    bundle = SCREENER.process(example_for(patient)).bundle
    broken = orjson.loads(orjson.dumps(bundle))  # a deep copy: built Bundles share read-only parts
    broken["entry"][-2]["resource"]["colour"] = "blue"  # an element FHIR does not define, late in the Bundle
    refused = post_transaction(fhir, broken)
    assert 400 <= refused.status_code < 500, refused.text
    assert refused.json()["resourceType"] == "OperationOutcome"
    assert total(fhir, "Observation", subject=patient) == 0
    assert total(fhir, "Task", patient=patient) == 0
