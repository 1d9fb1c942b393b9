"""FHIR R4 conformance of the service's own REST face: paged searchsets, an honest CapabilityStatement,
published definitions for what the plugin invents (the urgency extension, its `$extract`), readable
locations and the instance-level `$extract`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class
from starlette.testclient import TestClient

from plugin.app import create_app
from plugin.screening import data
from plugin.settings import ServiceSettings
from tests.fhir_helpers import written_locations

EXAMPLES = Path(__file__).resolve().parents[2] / "questionnaires" / "examples"
DEFINITION_TYPES = ["Questionnaire", "CodeSystem", "StructureDefinition", "OperationDefinition"]


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    settings = ServiceSettings(store_path=tmp_path / "store.sqlite3", ingest_token="t0ken")
    with TestClient(create_app(settings), headers={"Authorization": "Bearer t0ken"}) as test_client:
        yield test_client


def pages(client: TestClient, url: str) -> Iterator[dict]:
    while url:
        bundle = client.get(url).json()
        yield bundle
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), "")


@pytest.mark.parametrize("resource_type", DEFINITION_TYPES)
def test_searchsets_are_paged_by_count_with_self_and_next_links(client: TestClient, resource_type: str) -> None:
    published = data.definitions(resource_type)
    assert published, f"nothing of type {resource_type} is published"
    seen = []
    for bundle in pages(client, f"/{resource_type}?_count=1"):
        assert bundle["total"] == len(published)
        assert any(link["relation"] == "self" for link in bundle["link"])
        assert len(bundle.get("entry", [])) <= 1
        for entry in bundle.get("entry", []):
            assert entry["fullUrl"].endswith(f"/{resource_type}/{entry['resource']['id']}")
            seen.append(entry["resource"]["id"])
        get_fhir_model_class("Bundle").model_validate(bundle)  # valid R4 (no empty arrays, known elements)
    assert sorted(seen) == sorted(r["id"] for r in published), "following `next` gives every match once"


@pytest.mark.parametrize("count", ["x", "-1", "1.5"])
def test_a_count_that_is_no_number_is_a_400(client: TestClient, count: str) -> None:
    answer = client.get("/Questionnaire", params={"_count": count})
    assert answer.status_code == 400
    assert answer.json()["resourceType"] == "OperationOutcome"


def test_count_zero_gives_the_total_only(client: TestClient) -> None:
    bundle = client.get("/CodeSystem?_count=0").json()
    assert bundle["total"] == len(data.definitions("CodeSystem")) and "entry" not in bundle


def test_the_capability_statement_declares_no_update_it_does_not_do(client: TestClient) -> None:
    statement = client.get("/metadata").json()
    get_fhir_model_class("CapabilityStatement").model_validate(statement)
    rest = statement["rest"][0]
    response = next(r for r in rest["resource"] if r["type"] == "QuestionnaireResponse")
    assert "update" not in {i["code"] for i in response["interaction"]}
    assert "X-Notification-Secret" in response["documentation"], "the notification endpoint is described"
    assert "Bearer" in rest["security"]["description"]


def test_every_declared_operation_definition_of_ours_is_served(client: TestClient) -> None:
    statement = client.get("/metadata").json()
    ours = [op["definition"] for r in statement["rest"][0]["resource"] for op in r.get("operation", [])
            if op["definition"].startswith("https://backpain-screen.org/")]
    assert ours, "our $extract differs from SDC's, so the statement points at our own definition"
    for url in ours:
        found = client.get("/OperationDefinition", params={"url": url}).json()
        assert found["total"] == 1, url
        definition = found["entry"][0]["resource"]
        assert {p["name"] for p in definition["parameter"] if p["use"] == "out"} == {"return", "issues"}
        assert definition["instance"] is True and definition["type"] is True


def extension_urls(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {e["url"] for e in node.get("extension", []) if isinstance(e, dict)}
        return found.union(*(extension_urls(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(extension_urls(v) for v in node))
    return set()


def test_every_extension_of_ours_in_a_result_has_a_published_structure_definition(client: TestClient) -> None:
    qr = orjson.loads((EXAMPLES / "qr-emergency.json").read_bytes())
    bundle = client.post("/QuestionnaireResponse/$extract", content=orjson.dumps(qr),
                         headers={"Content-Type": "application/fhir+json"}).json()
    ours = {url for url in extension_urls(bundle) if url.startswith("https://backpain-screen.org/")}
    assert ours, "the red-flag components carry the urgency extension"
    for url in ours:
        found = client.get("/StructureDefinition", params={"url": url}).json()
        assert found["total"] == 1, f"{url} is not published"
        definition = found["entry"][0]["resource"]
        assert definition["type"] == "Extension" and definition["fhirVersion"] == "4.0.1"


def test_a_create_answers_with_the_stored_response_its_versioned_location_and_etag(client: TestClient) -> None:
    qr = orjson.loads((EXAMPLES / "qr-refer-asas.json").read_bytes())
    created = client.post("/QuestionnaireResponse", content=orjson.dumps(qr),
                          headers={"Content-Type": "application/fhir+json"})
    assert created.status_code == 201
    body = created.json()
    assert body["resourceType"] == "QuestionnaireResponse" and body["id"] == qr["id"]
    version = body["meta"]["versionId"]
    assert created.headers["etag"] == f'W/"{version}"'
    assert created.headers["location"].endswith(f"/QuestionnaireResponse/{qr['id']}/_history/{version}")
    read = client.get(created.headers["location"])
    assert read.status_code == 200 and read.json() == body
    assert read.headers["etag"] == created.headers["etag"]
    current = client.get(f"/QuestionnaireResponse/{qr['id']}")
    assert current.status_code == 200 and current.json()["meta"]["versionId"] == version


def test_the_same_create_again_answers_200_with_the_same_version(client: TestClient) -> None:
    qr = orjson.loads((EXAMPLES / "qr-emergency.json").read_bytes())
    body, json_type = orjson.dumps(qr), {"Content-Type": "application/fhir+json"}
    first = client.post("/QuestionnaireResponse", content=body, headers=json_type)
    again = client.post("/QuestionnaireResponse", content=body, headers=json_type)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.headers["location"] == first.headers["location"] and again.json() == first.json()


@pytest.mark.parametrize("prefer", ["return=minimal", "return=OperationOutcome", 'handling=strict, return="minimal"'])
def test_prefer_chooses_what_a_create_answers_with(client: TestClient, prefer: str) -> None:
    qr = orjson.loads((EXAMPLES / "qr-refer-asas.json").read_bytes()) | {"id": f"prefer-{len(prefer)}"}
    created = client.post("/QuestionnaireResponse", content=orjson.dumps(qr),
                          headers={"Content-Type": "application/fhir+json", "Prefer": prefer})
    assert created.status_code == 201 and "/_history/" in created.headers["location"] and created.headers["etag"]
    if "minimal" in prefer:
        assert created.content == b""
        return
    issues = created.json()["issue"]
    assert created.json()["resourceType"] == "OperationOutcome" and all(i["severity"] == "information" for i in issues)
    assert issues[0]["diagnostics"] == "Screening outcome: refer-rheumatology."
    written = written_locations(created.json())
    assert f"QuestionnaireResponse/{qr['id']}" in written and any(w.startswith("Observation/") for w in written)
    assert any(w.startswith("Task/") for w in written) and any(w.startswith("Provenance/") for w in written)


@pytest.mark.parametrize("path", ["/QuestionnaireResponse/nope", "/QuestionnaireResponse/nope/_history/1"])
def test_reading_a_response_not_in_the_store_is_a_404(client: TestClient, path: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 404 and answer.json()["resourceType"] == "OperationOutcome"


def test_reading_a_response_needs_the_ingest_token(client: TestClient) -> None:
    answer = client.get("/QuestionnaireResponse/anything", headers={"Authorization": "Bearer wrong"})
    assert answer.status_code == 401


def test_extract_at_the_instance_level_gives_what_the_type_level_gives(client: TestClient) -> None:
    qr = orjson.loads((EXAMPLES / "qr-refer-asas.json").read_bytes())
    body, json_type = orjson.dumps(qr), {"Content-Type": "application/fhir+json"}
    assert client.post("/QuestionnaireResponse", content=body, headers=json_type).status_code == 201
    stored = client.post(f"/QuestionnaireResponse/{qr['id']}/$extract")
    given = client.post("/QuestionnaireResponse/$extract", content=body, headers=json_type)
    assert stored.status_code == given.status_code == 200
    codes = [{e["resource"]["resourceType"] for e in b.json()["entry"]} for b in (stored, given)]
    assert codes[0] == codes[1] and "Observation" in codes[0]
    assert client.post("/QuestionnaireResponse/absent/$extract").status_code == 404
