"""Every resource type and interaction the plugin uses, each shown accepted by HAPI with its validator on.

| resource type | interactions (who) |
|---|---|
| Questionnaire, CodeSystem | conditional update on url + version; search by url (`publish`) |
| Device | conditional update on identifier (`publish`); conditional create in a transaction |
| QuestionnaireResponse | create / update by id in a transaction; batch read; search by questionnaire, status, |
|   | _lastUpdated (`sync`) |
| Observation, Task | conditional create in a transaction; update with If-Match in a transaction (amended, |
|   | entered-in-error, CDS feedback); search by identifier, subject / patient, code, status, _id, _sort, |
|   | _count (CDS prefetch) |
| Provenance | conditional create in a transaction; search by target |
| Patient | read (a response's patient must exist; `$populate`) |
| Subscription | create, update with If-Match, search by _tag (`subscribe`) |
| ServiceRequest | create, and the Task update with If-Match, that a CDS card's suggestion asks the EHR to make |
|   | (on HAPI in tests/ehr/test_cds_hooks.py: test_fhir_server_fallback_reads_the_ehr_and_suggestions_apply_there) |
| Bundle | transaction, batch |

The result Bundles are those of every hand-worked clinical case (tests/screening/clinical_cases.yaml) and of
every example response. A write HAPI's validator refuses fails here with HAPI's own OperationOutcome.
"""

from __future__ import annotations

import asyncio
import copy
import subprocess
import uuid
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from plugin.ehr.subscribe import subscription
from plugin.fhir.client import FhirClient
from plugin.screening.pipeline import Screener, Settings
from plugin.stores.writeback import submit
from tests.factory import BASDAI, SCREENING, response
from tests.fhir_helpers import CLI, EXAMPLES, ROOT, for_patient, total
from tests.stores.test_writeback import amend

DEFINITIONS = sorted(Path(ROOT / "questionnaires").glob("*.json"))
CASES = yaml.safe_load((ROOT / "tests" / "screening" / "clinical_cases.yaml").read_text(encoding="utf-8"))
SCREENERS = {name: Screener(Settings(strategy=name)) for name in ("asas-2015", "nice-ng65")}


def cli(*args: str, fhir_base_url: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args, "--fhir-base-url", fhir_base_url], input=stdin, capture_output=True,
                          cwd=ROOT, timeout=120, check=False)


def transaction(fhir: httpx.Client, bundle: dict) -> list[str]:
    """Posts a transaction; the status of each entry (all 2xx, or the test fails with HAPI's reasons)."""
    answer = fhir.post("/", content=orjson.dumps(bundle))
    assert answer.status_code == 200, answer.text
    return [entry["response"]["status"] for entry in answer.json()["entry"]]


def test_publish_puts_every_definition_on_hapi_once(fhir: httpx.Client, fhir_base_url: str):
    for _ in range(2):  # the second run finds them by url + version and leaves one of each
        done = cli("publish", fhir_base_url=fhir_base_url)
        assert done.returncode == 0, done.stderr
    for path in DEFINITIONS:
        definition = orjson.loads(path.read_bytes())
        kind, url, version = definition["resourceType"], definition["url"], definition["version"]
        assert total(fhir, kind, url=url, version=version) == 1, path.name
    assert {p.name for p in DEFINITIONS} >= {"back-pain-screening.json", "basdai.json", "screening-results.json"}


def test_the_validator_knows_the_sdc_extensions_and_refuses_a_broken_one(fhir: httpx.Client):
    """The control that shows validation is on: the Questionnaire as published is taken, and the same with its
    launchContext lacking the required `type` is refused."""
    questionnaire = orjson.loads((ROOT / "questionnaires" / "back-pain-screening.json").read_bytes())
    questionnaire.pop("id", None)
    questionnaire["url"] = f"https://backpain-screen.org/fhir/Questionnaire/acceptance-{uuid.uuid4()}"
    assert fhir.post("/Questionnaire", content=orjson.dumps(questionnaire)).status_code == 201
    broken = copy.deepcopy(questionnaire)
    (context,) = broken["extension"]
    context["extension"] = [part for part in context["extension"] if part["url"] != "type"]
    refused = fhir.post("/Questionnaire", content=orjson.dumps(broken))
    assert refused.status_code in (400, 422), refused.text
    assert refused.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_the_result_bundle_of_each_clinical_case_is_accepted(fhir: httpx.Client, patient: str, case: dict):
    url = BASDAI if case.get("questionnaire") == "basdai" else SCREENING
    qr = response(dict(case["answers"]), url=url)
    qr["id"], qr["subject"] = f"case-{uuid.uuid4()}", {"reference": patient}
    bundle = SCREENERS[case.get("strategy") or "asas-2015"].process(qr).bundle
    statuses = transaction(fhir, bundle)
    assert all(status.startswith("2") for status in statuses), statuses
    assert total(fhir, "Observation", subject=patient) >= 1


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("qr-*.json")))
def test_each_example_is_submitted_replayed_amended_and_retracted(fhir_base_url: str, patient: str, name: str):
    """The write-back `submit`, `serve` and `sync` share, on each example, its replay, an amended version and
    entered-in-error: conditional creates, updates with If-Match and Task cancellations, each a transaction
    HAPI validates."""
    body = for_patient(name, patient)
    versions = [body, body, amend(body, "amended"), amend(body, "entered-in-error")]

    async def run() -> None:
        async with FhirClient(fhir_base_url) as client:
            for version in versions:  # a refusal raises FhirError with HAPI's OperationOutcome
                await submit(client, SCREENERS["asas-2015"], orjson.loads(version))

    asyncio.run(run())


def test_the_reads_and_searches_the_plugin_makes(fhir: httpx.Client, fhir_base_url: str, patient: str):
    body = for_patient("qr-refer-asas.json", patient)
    done = cli("submit", "-", fhir_base_url=fhir_base_url, stdin=body)
    assert done.returncode == 0, done.stderr
    qr_id = orjson.loads(body)["id"]
    assert fhir.get(f"/QuestionnaireResponse/{qr_id}").status_code == 200
    assert total(fhir, "Provenance", target=f"QuestionnaireResponse/{qr_id}") == 1
    patient_id = patient.split("/")[1]
    searches = [
        ("QuestionnaireResponse", {"questionnaire": SCREENING, "status": "completed,amended,entered-in-error",
                                   "_lastUpdated": "gt2000-01-01T00:00:00Z", "_sort": "_lastUpdated", "_count": "100"}),
        ("Observation", {"subject": patient, "code": "screening-outcome", "status": "final,amended,corrected",
                         "_sort": "-date", "_count": "1"}),
        ("Observation", {"patient": patient_id, "_count": "6"}),
        ("Task", {"patient": patient_id, "status": "requested,received,accepted,ready,in-progress,on-hold"}),
        ("Provenance", {"target": f"QuestionnaireResponse/{qr_id}"}),
        ("Subscription", {"_tag": "https://backpain-screen.org/fhir/subscription|back-pain-screening"}),
    ]
    for resource_type, params in searches:
        found = fhir.get(f"/{resource_type}", params=params)
        assert found.status_code == 200, (resource_type, found.text)
    assert fhir.get(f"/{patient}").status_code == 200
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"{patient}"}},
        {"request": {"method": "GET", "url": f"Observation?subject={patient}&_count=10"}}]}
    answer = fhir.post("/", content=orjson.dumps(batch))
    assert answer.status_code == 200 and [e["response"]["status"][:3] for e in answer.json()["entry"]] == ["200"] * 2


def test_the_subscription_is_accepted_updated_and_found_by_its_tag(fhir: httpx.Client):
    questionnaire = {"url": f"{SCREENING}-acceptance-{uuid.uuid4()}", "title": "acceptance"}
    wanted = subscription(questionnaire, "http://127.0.0.1:9/notify", "acceptance-secret")
    created = fhir.post("/Subscription", content=orjson.dumps(wanted))
    assert created.status_code == 201, created.text
    stored = created.json()
    try:
        rotated = {**stored, "channel": {**stored["channel"], "header": ["X-Notification-Secret: rotated"]}}
        updated = fhir.put(f"/Subscription/{stored['id']}", content=orjson.dumps(rotated),
                           headers={"If-Match": f'W/"{stored["meta"]["versionId"]}"'})
        assert updated.status_code == 200, updated.text
        tag = wanted["meta"]["tag"][0]
        found = fhir.get("/Subscription", params={"_tag": f"{tag['system']}|{tag['code']}"}).json()
        assert stored["id"] in {e["resource"]["id"] for e in found.get("entry", [])}
    finally:
        fhir.delete(f"/Subscription/{stored['id']}")
