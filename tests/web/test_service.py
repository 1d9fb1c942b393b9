"""The HTTP service, endpoint by endpoint, through Starlette's TestClient (the lifespan runs, so the store opens).

Every test gets its own embedded store in a temporary directory. Expected
outcomes come from questionnaires/examples/README.md and from the pure
core (`Screener`), never from the service under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest
from lxml import etree
from markupsafe import escape
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from plugin.app import create_app
from plugin.fhir.client import FhirError
from plugin.observability import JsonFormatter
from plugin.screening import data
from plugin.screening.pipeline import Screener
from plugin.settings import SERVICE_SETTINGS, ServiceSettings, service_settings
from plugin.stores.sqlite import SqliteStore
from tests.factory import response
from tests.fhir_helpers import CLI, written_locations

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "questionnaires" / "examples"
FHIR_NS = "http://hl7.org/fhir"
NS = {"f": FHIR_NS}
JSON_BODY = {"Content-Type": "application/fhir+json"}
XML_BODY = {"Content-Type": "application/fhir+xml"}
HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
SCREENING_URL = "https://backpain-screen.org/fhir/Questionnaire/back-pain-screening"


# -- helpers -------------------------------------------------------------------------------------------------


def expected_outcomes() -> dict[str, str]:
    """file -> default-strategy outcome, from the examples' README table (worked out by hand)."""
    found = {}
    for line in (EXAMPLES / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`qr-[\w-]+\.(json|xml)`", cells[0]):
            outcome = re.fullmatch(r"`([a-z0-9-]+)`", cells[2])
            if outcome:
                found[cells[0].strip("`")] = outcome.group(1)
    return found


EXPECTED = expected_outcomes()


def example(name: str, subject: str | None = None) -> dict:
    qr = orjson.loads((EXAMPLES / name).read_bytes())
    if subject:
        qr["subject"] = {"reference": subject}
    return qr


def outcome_code(bundle: dict) -> str:
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Observation" and resource["code"]["coding"][0]["code"] == "screening-outcome":
            return resource["valueCodeableConcept"]["coding"][0]["code"]
    raise AssertionError("no screening-outcome Observation")


def observation_identifiers(bundle: dict) -> set[str]:
    return {i["value"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
            for i in e["resource"].get("identifier", [])}


def count(client: TestClient, resource_type: str) -> int:
    store = client.app.state.service.store
    return client.portal.call(store.search_page, resource_type, {"_summary": "count"})["total"]


def stored(client: TestClient, resource_type: str) -> list[dict]:
    store = client.app.state.service.store

    async def everything() -> list[dict]:
        return [r async for r in store.search(resource_type, {})]

    return client.portal.call(everything)


def new_patient(client: TestClient) -> str:
    store = client.app.state.service.store
    patient = client.portal.call(store.create, {"resourceType": "Patient", "active": True})
    return f"Patient/{patient['id']}"


def put_in_store(client: TestClient, qr: dict) -> None:
    """The response as a FHIR server would hold it (so a notification can refer to it)."""
    store = client.app.state.service.store
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": qr, "request": {"method": "PUT", "url": f"QuestionnaireResponse/{qr['id']}"}}]}
    answer = client.portal.call(store.transaction, bundle)
    assert answer["entry"][0]["response"]["status"].startswith("201")


def post_json(client: TestClient, path: str, resource: dict, headers: dict | None = None, **kwargs: Any):
    return client.post(path, content=orjson.dumps(resource), headers={**JSON_BODY, **(headers or {})}, **kwargs)


def metric(client: TestClient, name: str, **labels: str) -> float:
    """A sample's value from /metrics (0 when the series does not exist yet)."""
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def resolve(resource: dict, expression: str) -> list[Any]:
    """The chain of values a FHIRPath-like `Type.a[0].b` walks through, from the resource down."""
    steps = expression.split(".")
    assert steps[0] == resource["resourceType"], expression
    chain: list[Any] = [resource]
    for step in steps[1:]:
        name, *indexes = re.findall(r"[^\[\]]+", step)
        value = chain[-1][name]
        for index in indexes:
            value = value[int(index)]
        chain.append(value)
    return chain


def issue_of(response) -> list[dict]:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert body["issue"], body
    return body["issue"]


class Page(HTMLParser):
    """What the accessibility and safety checks need from a page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.inputs: list[dict[str, str | None]] = []
        self.label_for: set[str] = set()
        self.label_depth = 0
        self.fieldsets: list[dict] = []
        self.radio_groups: dict[str, bool] = {}  # name -> inside a fieldset with a legend
        self.urls: list[str] = []
        self.scripts: list[dict[str, str | None]] = []
        self.roles: dict[str, list[str]] = {}  # role -> text inside it
        self._role_stack: list[tuple[str, str]] = []
        self._text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for key in ("src", "href", "action", "formaction", "data"):
            if values.get(key):
                self.urls.append(values[key] or "")
        if tag == "label":
            self.label_depth += 1
            if values.get("for"):
                self.label_for.add(values["for"] or "")
        elif tag == "fieldset":
            self.fieldsets.append({"legend": False})
        elif tag == "legend" and self.fieldsets:
            self.fieldsets[-1]["legend"] = True
        elif tag == "script":
            self.scripts.append(values)
        elif tag in ("input", "select", "textarea"):
            kind = (values.get("type") or "text").lower()
            self.inputs.append({"type": kind, "id": values.get("id"), "name": values.get("name"),
                                "wrapped": "yes" if self.label_depth else None})
            if kind == "radio":
                labelled = bool(self.fieldsets) and self.fieldsets[-1]["legend"]
                name = values.get("name") or ""
                self.radio_groups[name] = self.radio_groups.get(name, True) and labelled
        if values.get("role"):
            self._role_stack.append((tag, values["role"] or ""))
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self.label_depth -= 1
        elif tag == "fieldset" and self.fieldsets:
            self.fieldsets.pop()
        if self._role_stack and self._role_stack[-1][0] == tag:
            _, role = self._role_stack.pop()
            self.roles.setdefault(role, []).append(" ".join("".join(self._text).split()))

    def handle_data(self, text: str) -> None:
        self._text.append(text)


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ServiceSettings:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # the catch-up sync keeps its watermark there
    return ServiceSettings(store_path=tmp_path / "store.sqlite3")


@pytest.fixture
def client(settings: ServiceSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def client_with(settings: ServiceSettings, **changes: Any) -> TestClient:
    return TestClient(create_app(dataclasses.replace(settings, **changes)))


@pytest.fixture
def log_records() -> Iterator[list[logging.LogRecord]]:
    """Every record the service logs, at every level, whatever configure_logging did before."""
    logger = logging.getLogger("backpain_screen")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def rendered(records: list[logging.LogRecord]) -> list[str]:
    """Each record as the service writes it (JSON line) and as a plain formatter with tracebacks would."""
    plain = logging.Formatter("%(levelname)s %(name)s %(message)s")
    return [f"{JsonFormatter().format(r)}\n{plain.format(r)}\n{r.__dict__!r}" for r in records]


# -- /metadata -----------------------------------------------------------------------------------------------


def check_capability_json(statement: dict) -> None:
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    assert {"application/fhir+json", "application/fhir+xml"} <= set(statement["format"])
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert {op["name"] for op in resources["QuestionnaireResponse"]["operation"]} >= {"extract"}


def check_capability_xml(body: bytes) -> None:
    root = etree.fromstring(body)
    assert root.tag == f"{{{FHIR_NS}}}CapabilityStatement"
    assert root.find("f:fhirVersion", NS).get("value") == "4.0.1"
    assert {f.get("value") for f in root.findall("f:format", NS)} >= {"application/fhir+json", "application/fhir+xml"}
    operations = root.xpath("f:rest/f:resource[f:type/@value='QuestionnaireResponse']/f:operation/f:name/@value",
                            namespaces=NS)
    assert "extract" in operations


def test_metadata_in_json_by_default_and_by_accept(client):
    for headers in ({}, {"Accept": "application/fhir+json"}):
        answer = client.get("/metadata", headers=headers)
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/fhir+json")
        check_capability_json(answer.json())


@pytest.mark.parametrize(("params", "headers"), [
    ({}, {"Accept": "application/fhir+xml"}),
    ({"_format": "xml"}, {}),
    ({"_format": "application/fhir+xml"}, {"Accept": "application/fhir+json"}),  # _format wins over Accept
])
def test_metadata_in_xml(client, params, headers):
    answer = client.get("/metadata", params=params, headers=headers)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/fhir+xml")
    check_capability_xml(answer.content)


def test_format_parameter_json_wins_over_an_xml_accept(client):
    answer = client.get("/metadata", params={"_format": "json"}, headers={"Accept": "application/fhir+xml"})
    assert answer.headers["content-type"].startswith("application/fhir+json")
    check_capability_json(answer.json())


# -- definitions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resource_type", ["Questionnaire", "CodeSystem"])
def test_search_definitions_by_url_and_version(client, resource_type):
    published = data.definitions(resource_type)
    assert published
    for resource in published:
        found = client.get(f"/{resource_type}", params={"url": resource["url"], "version": resource["version"]})
        assert found.status_code == 200
        bundle = found.json()
        assert bundle["type"] == "searchset" and bundle["total"] == 1
        assert bundle["entry"][0]["resource"]["id"] == resource["id"]
        assert bundle["entry"][0]["resource"]["url"] == resource["url"]
        other_version = client.get(f"/{resource_type}", params={"url": resource["url"], "version": "0.0.0-none"})
        assert other_version.json()["total"] == 0 and "entry" not in other_version.json()
    everything = client.get(f"/{resource_type}").json()
    assert everything["total"] == len(published)


@pytest.mark.parametrize("resource_type", ["Questionnaire", "CodeSystem"])
def test_read_definition_by_id(client, resource_type):
    for resource in data.definitions(resource_type):
        answer = client.get(f"/{resource_type}/{resource['id']}")
        assert answer.status_code == 200
        assert answer.json() == resource
        assert answer.headers.get("etag")


def test_read_definition_in_xml(client):
    answer = client.get("/Questionnaire/back-pain-screening", params={"_format": "xml"})
    assert answer.status_code == 200
    root = etree.fromstring(answer.content)
    assert root.tag == f"{{{FHIR_NS}}}Questionnaire"
    assert root.find("f:url", NS).get("value") == SCREENING_URL


@pytest.mark.parametrize("path", ["/Questionnaire/no-such-thing", "/CodeSystem/no-such-thing"])
def test_unknown_definition_is_404_operation_outcome(client, path):
    answer = client.get(path)
    assert answer.status_code == 404
    assert issue_of(answer)[0]["code"] == "not-found"
    as_xml = client.get(path, params={"_format": "xml"})
    assert as_xml.status_code == 404
    assert etree.fromstring(as_xml.content).tag == f"{{{FHIR_NS}}}OperationOutcome"


@pytest.mark.parametrize("path", ["/Questionnaire", "/CodeSystem"])
def test_unknown_search_parameter_is_400(client, path):
    answer = client.get(path, params={"publisher": "anyone"})
    assert answer.status_code == 400
    issues = issue_of(answer)
    assert "publisher" in issues[0]["diagnostics"]


def test_unknown_route_is_404_operation_outcome(client):
    answer = client.get("/Patient/whatever")
    assert answer.status_code == 404
    assert issue_of(answer)[0]["code"] == "not-found"


def test_wrong_method_is_405_with_allow(client):
    for method, path, allowed in (("DELETE", "/Questionnaire", "GET"), ("PATCH", "/QuestionnaireResponse", "POST"),
                                  ("GET", "/QuestionnaireResponse/$extract", "POST")):
        answer = client.request(method, path)
        assert answer.status_code == 405, (method, path)
        assert allowed in answer.headers["allow"]
        assert issue_of(answer)[0]["code"] == "not-supported"


def test_public_url_names_the_service_in_links(settings):
    with client_with(settings, public_url="https://screen.example.org/fhir/") as public:
        assert public.get("/metadata").json()["implementation"]["url"] == "https://screen.example.org/fhir"
        entry = public.get("/Questionnaire", params={"_id": "back-pain-screening"}).json()["entry"][0]
        assert entry["fullUrl"] == "https://screen.example.org/fhir/Questionnaire/back-pain-screening"
        qr = example("qr-refer-asas.json", new_patient(public))
        answer = post_json(public, "/QuestionnaireResponse", qr)
        assert answer.headers["location"] == f"https://screen.example.org/fhir/QuestionnaireResponse/{qr['id']}/_history/1"


# -- $extract ------------------------------------------------------------------------------------------------


def parameters(qr: dict) -> dict:
    return {"resourceType": "Parameters", "parameter": [{"name": "questionnaire-response", "resource": qr}]}


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.endswith(".json")))
def test_extract_json_gives_the_expected_outcome_and_writes_nothing(client, name):
    qr = example(name)
    answer = post_json(client, "/QuestionnaireResponse/$extract", qr)
    assert answer.status_code == 200, answer.text
    bundle = answer.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    assert outcome_code(bundle) == EXPECTED[name]
    assert observation_identifiers(bundle) == observation_identifiers(Screener().process(qr).bundle)
    for resource_type in ("Observation", "Task", "QuestionnaireResponse", "Provenance"):
        assert count(client, resource_type) == 0


def test_extract_with_a_parameters_wrapper_gives_the_same_bundle(client):
    qr = example("qr-refer-asas.json")
    bare = post_json(client, "/QuestionnaireResponse/$extract", qr).json()
    wrapped = post_json(client, "/QuestionnaireResponse/$extract", parameters(qr))
    assert wrapped.status_code == 200
    assert observation_identifiers(wrapped.json()) == observation_identifiers(bare)
    assert outcome_code(wrapped.json()) == EXPECTED["qr-refer-asas.json"]
    assert count(client, "Observation") == 0


def test_extract_parameters_without_a_response_is_400(client):
    answer = post_json(client, "/QuestionnaireResponse/$extract",
                       {"resourceType": "Parameters", "parameter": [{"name": "something-else", "valueString": "x"}]})
    assert answer.status_code == 400
    assert issue_of(answer)[0]["expression"] == ["Parameters.parameter"]


def xml_outcome(bundle: etree._Element) -> str:
    codes = bundle.xpath("f:entry/f:resource/f:Observation[f:code/f:coding/f:code/@value='screening-outcome']"
                         "/f:valueCodeableConcept/f:coding/f:code/@value", namespaces=NS)
    assert len(codes) == 1
    return codes[0]


def test_extract_xml_in_xml_out(client):
    body = (EXAMPLES / "qr-refer-asas.xml").read_bytes()
    answer = client.post("/QuestionnaireResponse/$extract", content=body,
                         headers={**XML_BODY, "Accept": "application/fhir+xml"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/fhir+xml")
    root = etree.fromstring(answer.content)
    assert root.tag == f"{{{FHIR_NS}}}Bundle"
    assert root.find("f:type", NS).get("value") == "transaction"
    assert xml_outcome(root) == EXPECTED["qr-refer-asas.xml"]
    as_json = client.post("/QuestionnaireResponse/$extract", content=body, headers=XML_BODY)
    assert as_json.status_code == 200
    assert observation_identifiers(as_json.json()) == observation_identifiers(
        Screener().process(example("qr-refer-asas.json")).bundle)
    assert count(client, "Observation") == 0


def test_extract_xml_parameters_wrapper(client):
    qr_xml = etree.fromstring((EXAMPLES / "qr-refer-asas.xml").read_bytes())
    wrapper = etree.Element(f"{{{FHIR_NS}}}Parameters", nsmap={None: FHIR_NS})
    parameter = etree.SubElement(wrapper, f"{{{FHIR_NS}}}parameter")
    etree.SubElement(parameter, f"{{{FHIR_NS}}}name", value="questionnaire-response")
    etree.SubElement(parameter, f"{{{FHIR_NS}}}resource").append(qr_xml)
    answer = client.post("/QuestionnaireResponse/$extract", content=etree.tostring(wrapper),
                         headers={**XML_BODY, "Accept": "application/fhir+xml"})
    assert answer.status_code == 200, answer.text
    assert xml_outcome(etree.fromstring(answer.content)) == EXPECTED["qr-refer-asas.xml"]
    assert count(client, "Observation") == 0


def test_extract_in_progress_gives_an_empty_transaction(client):
    answer = post_json(client, "/QuestionnaireResponse/$extract", example("qr-in-progress.json"))
    assert answer.status_code == 200
    assert not answer.json().get("entry")


# -- POST /QuestionnaireResponse -------------------------------------------------------------------------------


def test_post_writes_then_replay_writes_nothing(client):
    patient = new_patient(client)
    qr = example("qr-refer-asas.json", patient)
    expected = Screener().process(qr).bundle
    told = {"Prefer": "return=OperationOutcome"}  # where each result went, as FHIR's Prefer allows
    first = post_json(client, "/QuestionnaireResponse", qr, told)
    assert first.status_code == 201, first.text
    assert first.headers["location"] == f"http://testserver/QuestionnaireResponse/{qr['id']}/_history/1"
    outcome = first.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["diagnostics"] == "Screening outcome: refer-rheumatology."
    assert all(i["diagnostics"].endswith(": written.") for i in outcome["issue"][1:])
    locations = written_locations(outcome)
    assert f"QuestionnaireResponse/{qr['id']}" in locations
    observations = [e for e in expected["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert sum(loc.startswith("Observation/") for loc in locations) == len(observations)
    counts = {t: count(client, t) for t in ("QuestionnaireResponse", "Observation", "Task", "Provenance", "Device")}
    assert counts["Observation"] == len(observations) and counts["QuestionnaireResponse"] == 1
    assert counts["Task"] == sum(e["resource"]["resourceType"] == "Task" for e in expected["entry"]) > 0
    assert {f"Observation/{o['id']}" for o in stored(client, "Observation")} <= set(locations)

    again = post_json(client, "/QuestionnaireResponse", qr, told)
    assert again.status_code == 200, again.text
    assert again.headers["location"] == first.headers["location"] and again.headers["etag"] == 'W/"1"'
    replayed = written_locations(again.json())
    results = ("QuestionnaireResponse/", "Observation/", "Task/")
    assert sorted(x for x in replayed if x.startswith(results)) == sorted(x for x in locations if x.startswith(results))
    assert set(replayed) <= set(locations)
    assert all(i["diagnostics"].endswith("already there, unchanged.") for i in again.json()["issue"][1:])
    assert {t: count(client, t) for t in counts} == counts


def test_post_in_progress_writes_nothing(client):
    patient = new_patient(client)
    answer = post_json(client, "/QuestionnaireResponse", example("qr-in-progress.json", patient))
    assert 200 <= answer.status_code < 300, answer.text
    assert "location" not in answer.headers
    assert not answer.json().get("entry")
    for resource_type in ("QuestionnaireResponse", "Observation", "Task", "Provenance"):
        assert count(client, resource_type) == 0


def set_answer(qr: dict, link_id: str, answer: dict) -> None:
    def walk(items: list[dict]) -> bool:
        for item in items:
            if item["linkId"] == link_id:
                item["answer"] = [answer]
                return True
            if walk(item.get("item", [])):
                return True
        return False

    assert walk(qr["item"]), link_id


def test_invalid_response_is_400_naming_every_bad_item_and_writes_nothing(client):
    patient = new_patient(client)
    qr = example("qr-refer-asas.json", patient)
    set_answer(qr, "onset-age", {"valueInteger": 200})
    set_answer(qr, "pain-duration", {"valueCoding": {"system": "https://backpain-screen.org/fhir/CodeSystem/"
                                                               "screening-answers", "code": "forever"}})
    answer = post_json(client, "/QuestionnaireResponse", qr)
    assert answer.status_code == 400
    named = set()
    for issue in issue_of(answer):
        assert issue["severity"] == "error"
        (expression,) = issue["expression"]
        items = [v for v in resolve(qr, expression) if isinstance(v, dict) and "linkId" in v]
        named.add(items[-1]["linkId"])
    assert named == {"onset-age", "pain-duration"}
    assert count(client, "QuestionnaireResponse") == count(client, "Observation") == 0


class PatientRecords(SqliteStore):
    """The embedded store standing in for an EHR's FHIR server: one that holds the patients."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.holds_patients = True


def test_post_for_a_patient_the_record_system_lacks_writes_nothing(settings):
    with TestClient(create_app(settings, store=PatientRecords(settings.store_path))) as ehr:
        answer = post_json(ehr, "/QuestionnaireResponse", example("qr-refer-asas.json", "Patient/nobody-here"))
        assert 400 <= answer.status_code < 500
        assert issue_of(answer)[0]["expression"] == ["QuestionnaireResponse.subject"]
        assert count(ehr, "QuestionnaireResponse") == count(ehr, "Observation") == 0
        patient = new_patient(ehr)
        assert post_json(ehr, "/QuestionnaireResponse", example("qr-refer-asas.json", patient)).status_code == 201


def test_embedded_store_takes_patients_it_does_not_hold(client):
    """Stand-alone, the clinic's patients live in its own system: the embedded store keeps none to check."""
    answer = post_json(client, "/QuestionnaireResponse", example("qr-refer-asas.json", "Patient/kept-elsewhere"))
    assert answer.status_code == 201, answer.text
    assert count(client, "QuestionnaireResponse") == 1 and count(client, "Patient") == 0


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "image/png"])
def test_wrong_content_type_is_415(client, content_type):
    body = (EXAMPLES / "qr-refer-asas.json").read_bytes()
    for path in ("/QuestionnaireResponse/$extract", "/QuestionnaireResponse"):
        answer = client.post(path, content=body, headers={"Content-Type": content_type})
        assert answer.status_code == 415, (path, answer.text)
        assert issue_of(answer)[0]["code"] == "not-supported"


@pytest.mark.parametrize("content_type", ["application/json", "application/fhir+json; charset=utf-8", "text/json"])
def test_json_media_types_are_accepted(client, content_type):
    body = (EXAMPLES / "qr-refer-asas.json").read_bytes()
    answer = client.post("/QuestionnaireResponse/$extract", content=body, headers={"Content-Type": content_type})
    assert answer.status_code == 200


def asgi_post(app, path: str, chunk: bytes, chunks: int, headers: list[tuple[bytes, bytes]]):
    """Sends a body in `chunks` messages straight to the ASGI app; (status, chunks the app asked for)."""

    async def run() -> tuple[int, int]:
        delivered = 0
        sent: list[dict] = []

        async def receive() -> dict:
            nonlocal delivered
            if sent or delivered >= chunks:  # answered already: the client has gone
                return {"type": "http.disconnect"}
            delivered += 1
            return {"type": "http.request", "body": chunk, "more_body": delivered < chunks}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": [(b"host", b"testserver"), *headers], "client": ("127.0.0.1", 5000),
                 "server": ("testserver", 80), "state": {}}
        await app(scope, receive, send)
        return next(m["status"] for m in sent if m["type"] == "http.response.start"), delivered

    return run


def test_body_over_the_limit_is_413_without_reading_it_all(settings):
    limit = 4096
    with client_with(settings, max_body_bytes=limit) as small:
        chunk, chunks = b" " * 1024, 1000  # a 1 MB body, sent without a Content-Length
        for path in ("/QuestionnaireResponse/$extract", "/QuestionnaireResponse"):
            status, read = small.portal.call(asgi_post(small.app, path, chunk, chunks,
                                                       [(b"content-type", b"application/fhir+json")]))
            assert status == 413, path
            assert read * len(chunk) <= limit + len(chunk), f"read {read} chunks of {chunks}"
        status, read = small.portal.call(asgi_post(small.app, "/QuestionnaireResponse/$extract", chunk, chunks, [
            (b"content-type", b"application/fhir+json"), (b"content-length", str(len(chunk) * chunks).encode())]))
        assert status == 413 and read == 0  # the declared length alone is enough
        answer = small.post("/QuestionnaireResponse/$extract", content=b"{" + b" " * limit + b"}", headers=JSON_BODY)
        assert answer.status_code == 413
        assert issue_of(answer)[0]["code"] == "too-costly"
        fits = small.post("/QuestionnaireResponse/$extract", content=b" " * (limit - 200) + orjson.dumps(
            {"resourceType": "Patient"}), headers=JSON_BODY)
        assert fits.status_code == 400  # read and parsed: within the limit, just not a response


# -- bearer token ----------------------------------------------------------------------------------------------


def test_bearer_token_guards_ingest_and_results(settings):
    with client_with(settings, ingest_token="the-right-token") as guarded:
        patient = new_patient(guarded)
        qr = example("qr-refer-asas.json", patient)
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic the-right-token"},
                        {"Authorization": "Bearer the-right-token-and-more"}):
            answer = post_json(guarded, "/QuestionnaireResponse", qr, headers)
            assert answer.status_code == 401, headers
            assert answer.headers["www-authenticate"].lower().startswith("bearer")
            assert issue_of(answer)[0]["code"] == "login"
            assert "right" not in answer.text
            refused = guarded.get(f"/results/{qr['id']}", headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"].lower().startswith("bearer")
        assert count(guarded, "QuestionnaireResponse") == 0
        right = {"Authorization": "Bearer the-right-token"}
        answer = post_json(guarded, "/QuestionnaireResponse", qr, right)
        assert answer.status_code == 201, answer.text
        assert guarded.get(f"/results/{qr['id']}", headers=right).status_code == 200
        assert post_json(guarded, "/QuestionnaireResponse/$extract", qr).status_code == 200  # writes nothing: open


# -- notifications ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/QuestionnaireResponse/{id}", "/notify/QuestionnaireResponse/{id}"])
def test_notification_with_the_secret_writes_the_results(settings, path):
    with client_with(settings, notify_secret="notify-secret") as notified:
        qr = example("qr-refer-asas.json", new_patient(notified))
        put_in_store(notified, qr)
        url = path.format(id=qr["id"])
        for headers in ({}, {"X-Notification-Secret": "wrong"}):
            refused = notified.put(url, content=orjson.dumps(qr), headers={**JSON_BODY, **headers})
            assert refused.status_code == 401
            assert issue_of(refused)[0]["code"] == "login"
        assert count(notified, "Observation") == 0
        answer = notified.put(url, content=orjson.dumps(qr), headers={**JSON_BODY, "X-Notification-Secret":
                                                                      "notify-secret"})
        assert 200 <= answer.status_code < 300, answer.text
        expected = Screener().process(qr).bundle
        assert {i["value"] for o in stored(notified, "Observation") for i in o["identifier"]} == \
            observation_identifiers(expected)
        assert count(notified, "QuestionnaireResponse") == 1  # the response itself is not written again
        again = notified.put(url, content=orjson.dumps(qr), headers={**JSON_BODY, "X-Notification-Secret":
                                                                     "notify-secret"})
        assert again.status_code == 200
        assert count(notified, "Observation") == len(observation_identifiers(expected))


def test_notification_is_refused_when_no_secret_is_configured(client):
    qr = example("qr-refer-asas.json")
    answer = client.put(f"/QuestionnaireResponse/{qr['id']}", content=orjson.dumps(qr),
                        headers={**JSON_BODY, "X-Notification-Secret": "anything"})
    assert answer.status_code == 403
    assert issue_of(answer)[0]["code"] == "forbidden"
    assert client.post("/notify", headers={"X-Notification-Secret": "anything"}).status_code == 403
    assert count(client, "Observation") == 0


def test_notification_with_a_mismatched_id_is_400(settings):
    with client_with(settings, notify_secret="notify-secret") as notified:
        qr = example("qr-refer-asas.json")
        answer = notified.put("/QuestionnaireResponse/some-other-id", content=orjson.dumps(qr),
                              headers={**JSON_BODY, "X-Notification-Secret": "notify-secret"})
        assert answer.status_code == 400
        assert issue_of(answer)[0]["expression"] == ["QuestionnaireResponse.id"]
        assert count(notified, "Observation") == 0


@pytest.mark.parametrize("body", [b"[null, null]", b"5", b'"text"', b"null"])
def test_notification_whose_body_is_not_an_object_is_400(settings, body):
    with client_with(settings, notify_secret="notify-secret") as notified:
        answer = notified.put("/QuestionnaireResponse/qr-1", content=body,
                              headers={**JSON_BODY, "X-Notification-Secret": "notify-secret"})
        assert answer.status_code == 400, answer.text
        assert issue_of(answer)[0]["severity"] == "error"


def test_empty_notify_is_202_and_catches_up(settings):
    with client_with(settings, notify_secret="notify-secret") as notified:
        qr = example("qr-refer-asas.json", new_patient(notified))
        put_in_store(notified, qr)  # on the server, but the plugin never heard of it
        assert notified.post("/notify").status_code == 401
        answer = notified.post("/notify", headers={"X-Notification-Secret": "notify-secret"})
        assert answer.status_code == 202
        service = notified.app.state.service
        assert service.catching_up is not None

        async def finished() -> None:
            await asyncio.wait_for(asyncio.shield(service.catching_up), 20)

        notified.portal.call(finished)
        assert service.catching_up.exception() is None
        assert count(notified, "Observation") == len(observation_identifiers(Screener().process(qr).bundle))


# -- results ---------------------------------------------------------------------------------------------------


def ingest(client: TestClient, name: str) -> dict:
    qr = example(name, new_patient(client))
    answer = post_json(client, "/QuestionnaireResponse", qr)
    assert answer.status_code == 201, answer.text
    return qr


# Worked out by hand from the examples: an empty clinician item (or "not-done") is "not tested", never "not met".
# qr-refer-asas: imaging not done. qr-indeterminate: no clinician item answered, so HLA-B27 and CRP (SpA
# features and ASAS 2015) and imaging (ASAS 2015) are not tested.
NOT_TESTED = {"qr-refer-asas.json": {"asas2015-sacroiliitis-imaging"},
              "qr-indeterminate.json": {"spa-hla-b27-positive", "spa-raised-crp", "asas2015-hla-b27-positive",
                                        "asas2015-sacroiliitis-imaging", "asas2015-raised-crp"}}
BANNERS = {"qr-refer-asas.json": "Refer to rheumatology: suspected axial spondyloarthritis",
           "qr-indeterminate.json": "Indeterminate: missing answers could change the decision"}


def expected_states(observations: list[dict], not_tested: set[str]) -> dict[str, int]:
    states = {"met": 0, "not-met": 0, "unknown": 0, "not-tested": 0}
    for observation in observations:
        for component in observation.get("component", []):
            value = component.get("valueBoolean")
            if component["code"]["coding"][0]["code"] in not_tested:
                # what is stored: no value, the test not performed (the rules count it not met; H19)
                assert value is None and component["dataAbsentReason"]["coding"][0]["code"] == "not-performed"
                states["not-tested"] += 1
            else:
                states["met" if value is True else "not-met" if value is False else "unknown"] += 1
    return states


@pytest.mark.parametrize("name", ["qr-refer-asas.json", "qr-indeterminate.json"])
def test_results_page_for_a_clinician(client, name):
    qr = ingest(client, name)
    answer = client.get(f"/results/{qr['id']}", headers=HTML)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    html = answer.text
    observations, tasks = stored(client, "Observation"), stored(client, "Task")
    states = expected_states(observations, NOT_TESTED[name])
    assert states["met"] + states["not-met"] + states["unknown"] > 0
    for state, n in states.items():
        assert html.count(f'<tr class="{state}">') == n, state
    # The outcome in words comes first, its code only as secondary detail.
    assert html.index(BANNERS[name]) < html.index(f"<code>{EXPECTED[name]}</code>") < html.index("<table")
    # Every result, criterion and Task by its human name (criteria are stored as codes; the page names them).
    published = {c["code"]: c["display"] for c in orjson.loads(
        (ROOT / "questionnaires" / "screening-results.json").read_bytes())["concept"]}
    for observation in observations:
        assert observation["code"]["coding"][0]["display"] in html
        for component in observation.get("component", []):
            code = component["code"]["coding"][0]["code"]
            assert str(escape(published[code])) in html, code  # as the template escapes it
            assert f">{code}<" not in html, f"{code} shown as a code"
    for task in tasks:
        assert task["code"]["coding"][0]["display"] in html
    if not tasks:
        assert "No tasks." in html


def test_indeterminate_results_say_which_answers_would_decide(client):
    """qr-indeterminate leaves gradual onset, exercise, night pain and the SpA features unanswered."""
    ingest(client, "qr-indeterminate.json")
    html = client.get("/results/qr-indeterminate", headers=HTML).text
    deciding = html[html.index("Answers that would decide it"):html.index("What to do")]
    for question in ("Did your back pain come on gradually", "Does your back pain get better when you exercise",
                     "Do you have, or have you ever had, psoriasis"):
        assert question in deciding
    assert "Have you been diagnosed with Crohn" not in deciding  # answered (no)
    # SpA features: 0 met of 11, and the unknowns beside the count (never a bare 0).
    assert "0 of 11 met, 8 unknown, 2 not tested" in html


def test_results_as_a_bundle(client):
    qr = ingest(client, "qr-refer-asas.json")
    for params, headers in (({}, {"Accept": "application/fhir+json"}), ({"_format": "json"}, HTML)):
        answer = client.get(f"/results/{qr['id']}", params=params, headers=headers)
        assert answer.status_code == 200
        bundle = answer.json()
        assert bundle["type"] == "searchset"
        found = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]}
        held = {(r["resourceType"], r["id"]) for t in ("Observation", "Task") for r in stored(client, t)}
        assert found == held and bundle["total"] == len(held)


def test_results_of_an_unknown_response_is_404(client):
    answer = client.get("/results/never-seen")
    assert answer.status_code == 404
    assert issue_of(answer)[0]["code"] == "not-found"
    page = client.get("/results/never-seen", headers=HTML)
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")


# -- health, readiness, metrics --------------------------------------------------------------------------------


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


class BrokenStore:
    """A store that opens but cannot answer (a FHIR server that is down)."""

    base_url = "http://broken.invalid/fhir"
    holds_patients = True

    async def __aenter__(self) -> BrokenStore:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None

    async def search_page(self, resource_type: str, params: dict[str, str]) -> dict:
        raise FhirError("The FHIR server answered HTTP 503.", 503)

    async def read_many(self, urls: list[str]) -> list[dict | None]:
        raise FhirError("The FHIR server answered HTTP 503.", 503)

    async def read(self, reference: str) -> dict | None:
        raise FhirError("The FHIR server answered HTTP 503.", 503)


def test_readyz_is_503_when_the_store_is_broken(settings):
    with TestClient(create_app(settings, store=BrokenStore())) as broken:  # type: ignore[arg-type]
        assert broken.get("/healthz").status_code == 200  # alive, just not ready
        answer = broken.get("/readyz")
        assert answer.status_code == 503
        assert answer.json()["status"] == "unavailable"
        assert metric(broken, "backpain_store_errors_total") >= 1
        qr = example("qr-refer-asas.json")
        written = post_json(broken, "/QuestionnaireResponse", qr)
        assert written.status_code == 503
        assert written.headers.get("retry-after")
        assert issue_of(written)[0]["code"] == "transient"
        assert post_json(broken, "/QuestionnaireResponse/$extract", qr).status_code == 200  # needs no store


def test_a_store_that_is_down_costs_the_patient_only_the_saving(settings):
    """The emergency message must reach the patient whatever the store does."""
    with TestClient(create_app(settings, store=BrokenStore())) as broken:  # type: ignore[arg-type]
        page = broken.post("/form", data={"patient": "Patient/p1", "rf-saddle-numbness": "true"}, headers=HTML)
        assert page.status_code == 200, page.text
        assert "Seek urgent care now" in page.text and 'role="alert"' in page.text
        assert "could not be sent to your care team" in page.text


def test_with_an_ingest_token_an_unsigned_form_cannot_name_a_patient(settings):
    """Otherwise the form would be a way round the token: anyone could write results for any patient."""
    with client_with(settings, ingest_token="ingest-secret") as locked:
        assert locked.get("/", params={"patient": "Patient/p1"}).status_code == 403
        assert locked.post("/form", data={"patient": "Patient/p1", "rf-fever": "true"}).status_code == 403
        anonymous = locked.post("/form", data={"rf-fever": "true"}, headers=HTML)
        assert anonymous.status_code == 200 and "Contact a doctor today" in anonymous.text
        assert count(locked, "QuestionnaireResponse") == 0


def test_metrics_count_requests_and_outcomes(client):
    outcome = EXPECTED["qr-refer-asas.json"]
    route = {"method": "POST", "route": "/QuestionnaireResponse/$extract", "status": "200"}
    before = metric(client, "backpain_screening_outcomes_total", outcome=outcome)
    requests_before = metric(client, "backpain_http_requests_total", **route)
    for _ in range(3):
        assert post_json(client, "/QuestionnaireResponse/$extract", example("qr-refer-asas.json")).status_code == 200
    post_json(client, "/QuestionnaireResponse/$extract", {"resourceType": "Patient"})
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert "# TYPE backpain_http_requests_total counter" in answer.text
    assert metric(client, "backpain_screening_outcomes_total", outcome=outcome) == before + 3
    assert metric(client, "backpain_http_requests_total", **route) == requests_before + 3
    assert metric(client, "backpain_http_requests_total", method="POST", route="/QuestionnaireResponse/$extract",
                  status="400") == 1
    assert metric(client, "backpain_refused_inputs_total", status="400") >= 1
    assert "qr-refer-asas" not in answer.text  # routes by template, never by path


# -- browser safety --------------------------------------------------------------------------------------------


def check_page_headers(headers) -> None:
    csp = headers["content-security-policy"]
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    assert directives["default-src"] == ["'none'"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"].upper() == "DENY"


def test_security_headers_on_every_html_page(client):
    ingest(client, "qr-refer-asas.json")
    pages = [client.get("/"), client.post("/form", data={"rf-saddle-numbness": "false"}),
             client.get("/results/qr-refer-asas", headers=HTML), client.get("/results/nothing", headers=HTML)]
    for page in pages:
        assert page.headers["content-type"].startswith("text/html")
        check_page_headers(page.headers)
        assert all(script.get("src") for script in Page(page.text).scripts)  # CSP forbids inline scripts
    assert client.get("/metadata").headers["x-content-type-options"] == "nosniff"


def test_cors_preflight_for_a_configured_origin_only(settings):
    allowed = "https://portal.example.org"
    with client_with(settings, cors_origins=(allowed,)) as api:
        ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,authorization"}
        answer = api.options("/QuestionnaireResponse", headers={"Origin": allowed, **ask})
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == allowed
        assert "POST" in answer.headers["access-control-allow-methods"]
        other = api.options("/QuestionnaireResponse", headers={"Origin": "https://evil.example.net", **ask})
        assert other.status_code >= 400
        assert other.headers.get("access-control-allow-origin") != "https://evil.example.net"
        assert "access-control-allow-origin" not in api.get("/metadata", headers={
            "Origin": "https://evil.example.net"}).headers
        simple = api.get("/metadata", headers={"Origin": allowed})
        assert simple.headers["access-control-allow-origin"] == allowed
    with client_with(settings) as closed:  # none configured: no cross-origin access at all
        answer = closed.options("/QuestionnaireResponse", headers={"Origin": allowed, **ask})
        assert "access-control-allow-origin" not in answer.headers


# -- errors and logs -------------------------------------------------------------------------------------------


def test_unexpected_error_is_500_outcome_without_details(client, log_records, capfd, monkeypatch):
    def explode(qr: object) -> None:
        raise RuntimeError("secret answer text")

    monkeypatch.setattr(client.app.state.service.screener, "process", explode)
    for accept in ("application/fhir+json", "application/fhir+xml"):
        answer = post_json(client, "/QuestionnaireResponse/$extract", example("qr-refer-asas.json"),
                           {"Accept": accept})
        assert answer.status_code == 500
        assert "secret answer text" not in answer.text
        assert "Traceback" not in answer.text and "RuntimeError" not in answer.text
    answer = post_json(client, "/QuestionnaireResponse/$extract", example("qr-refer-asas.json"))
    assert answer.status_code == 500
    assert issue_of(answer)[0]["code"] == "exception"
    assert any(r.levelno >= logging.ERROR for r in log_records)
    for line in rendered(log_records):
        assert "secret answer text" not in line
        assert "Traceback" not in line
    out, err = capfd.readouterr()
    assert "secret answer text" not in out + err
    assert client.get("/healthz").status_code == 200  # still serving


def answer_strings(qr: dict) -> set[str]:
    """What a patient told us, as text: answer codes and displays, free text, item texts."""
    found: set[str] = set()

    def walk(items: list[dict]) -> None:
        for item in items:
            if item.get("text"):
                found.add(item["text"])
            for answer in item.get("answer", []):
                coding = answer.get("valueCoding", {})
                found.update(v for v in (coding.get("code"), coding.get("display"), answer.get("valueString")) if v)
            walk(item.get("item", []))

    walk(qr["item"])
    return found


def test_logs_of_a_scored_request_carry_ids_not_answers(client, log_records):
    patient = new_patient(client)
    qr = example("qr-refer-asas.json", patient)
    assert post_json(client, "/QuestionnaireResponse", qr).status_code == 201
    lines = [orjson.loads(JsonFormatter().format(r)) for r in log_records]
    scored = [line for line in lines if line.get("event") == "scored"]
    assert len(scored) == 1
    assert scored[0]["response"] == f"QuestionnaireResponse/{qr['id']}"
    assert scored[0]["outcome"] == EXPECTED["qr-refer-asas.json"]
    secrets = answer_strings(qr)
    assert "1y-5y" in secrets  # the check below looks for something real
    for line in rendered(log_records):
        for value in secrets:
            assert value not in line, value


# -- the patient form ------------------------------------------------------------------------------------------


def test_form_page_is_accessible_and_self_contained(client):
    answer = client.get("/")
    assert answer.status_code == 200
    page = Page(answer.text)
    visible = [i for i in page.inputs if i["type"] not in ("hidden", "submit", "button")]
    assert len(visible) > 10
    for field in visible:
        assert field["wrapped"] or (field["id"] and field["id"] in page.label_for), field
    assert page.radio_groups, "the screening has yes/no and choice questions"
    assert all(page.radio_groups.values()), [n for n, ok in page.radio_groups.items() if not ok]
    assert page.urls
    for url in page.urls:
        assert not re.match(r"(?i)^\s*(https?:)?//", url), url
    questionnaire = next(q for q in data.definitions("Questionnaire") if q["id"] == "back-pain-screening")  # current
    answerable = set()

    def walk(items: list[dict]) -> None:
        for item in items:
            if item["type"] not in ("group", "display"):
                answerable.add(item["linkId"])
            walk(item.get("item", []))

    walk([group for group in questionnaire["item"] if group["linkId"] != "clinician"])
    assert {i["name"] for i in visible} == answerable  # a patient is not asked for test results...
    clinicians = Page(client.get("/", params={"clinician": "1"}).text)  # ...a clinician is (an open service)
    assert {"hla-b27", "crp-elevated", "sacroiliitis-imaging"} <= {i["name"] for i in clinicians.inputs}
    assert answer.text.index('id="group-red-flags"') < answer.text.index('id="group-pain"')  # red flags first
    assert "Part 1 of 3" in answer.text and "Part 3 of 3" in answer.text


def test_form_with_an_emergency_answer_says_seek_care_now(client):
    answer = client.post("/form", data={"rf-saddle-numbness": "true"})
    assert answer.status_code == 200
    page = Page(answer.text)
    assert any("Seek urgent care now" in text for text in page.roles.get("alert", []))
    calm = Page(client.post("/form", data={"rf-saddle-numbness": "false"}).text)
    assert "alert" not in calm.roles
    assert not any("Seek urgent care now" in text for texts in calm.roles.values() for text in texts)
    assert count(client, "QuestionnaireResponse") == 0  # no patient named: shown, not saved


def test_form_drops_answers_to_items_its_enable_when_hides(client):
    hidden = {"night-pain": "false", "night-pain-eases-on-rising": "true"}
    direct = post_json(client, "/QuestionnaireResponse/$extract", {
        "resourceType": "QuestionnaireResponse", "questionnaire": SCREENING_URL, "status": "completed",
        "subject": {"reference": "Patient/x"},
        "item": [{"linkId": "pain", "item": [{"linkId": "night-pain", "answer": [{"valueBoolean": False}]},
                                            {"linkId": "night-pain-eases-on-rising",
                                             "answer": [{"valueBoolean": True}]}]}]})
    assert direct.status_code == 400  # the API refuses it, so the form must have dropped it
    patient = new_patient(client)
    answer = client.post("/form", data={**hidden, "patient": patient})
    assert answer.status_code == 200, answer.text
    (saved,) = stored(client, "QuestionnaireResponse")
    assert saved["subject"]["reference"] == patient
    link_ids = set()

    def walk(items: list[dict]) -> None:
        for item in items:
            link_ids.add(item["linkId"])
            walk(item.get("item", []))

    walk(saved["item"])
    assert "night-pain" in link_ids and "night-pain-eases-on-rising" not in link_ids


def test_form_naming_a_patient_needs_a_valid_signature(settings):
    with client_with(settings, form_secret="form-secret") as signed:
        patient = new_patient(signed)
        good = hmac.new(b"form-secret", patient.encode(), hashlib.sha256).hexdigest()
        for sig in ("", "0" * 64, good[:-1] + ("0" if good[-1] != "0" else "1")):
            refused = signed.post("/form", data={"patient": patient, "sig": sig, "rf-saddle-numbness": "true"})
            assert refused.status_code == 403
            assert signed.get("/", params={"patient": patient, "sig": sig}).status_code == 403
        assert count(signed, "QuestionnaireResponse") == 0
        form = signed.get("/", params={"patient": patient, "sig": good})
        assert form.status_code == 200 and f'value="{good}"' in form.text
        saved = signed.post("/form", data={"patient": patient, "sig": good, "rf-saddle-numbness": "true"})
        assert saved.status_code == 200
        assert "Seek urgent care now" in saved.text
        assert count(signed, "QuestionnaireResponse") == 1


def test_form_errors_for_a_browser_are_a_page(settings):
    """A patient's browser gets a page (not a 500, not FHIR JSON); an unreadable answer never hides the rest."""
    with client_with(settings, form_secret="form-secret") as browser:
        for typed in ("abc", "200", "-1", "12.5"):
            unreadable = browser.post("/form", data={"onset-age": typed, "rf-saddle-numbness": "true"}, headers=HTML)
            assert unreadable.status_code == 400, unreadable.text  # refused, not silently dropped
            assert unreadable.headers["content-type"].startswith("text/html")
            html = unreadable.text
            assert html.index("Seek urgent care now") < html.index("Please check this answer")  # the emergency first
            message = "Enter a whole number from 0 to 120 years, or leave it empty."
            field = html[html.index('id="q-onset-age"'):html.index('id="q-age"')]
            assert message in field and 'aria-invalid="true"' in field and f'value="{typed}"' in field
            assert 'value="true" checked' in html  # what was answered is kept
            check_page_headers(unreadable.headers)
        forbidden = browser.post("/form", data={"patient": "Patient/x", "sig": "bad"}, headers=HTML)
        assert forbidden.status_code == 403
        assert forbidden.headers["content-type"].startswith("text/html")
        assert "secret" not in forbidden.text.lower()


def form_id() -> str:
    return "6f1c3a52-0b7e-4d5c-9a51-3c2f4e8b7a10"


def test_a_red_flag_saves_the_answers_so_far_as_one_in_progress_response(client):
    """The page's script sends the answers so far (POST /form/progress); the finished form is the same response."""
    patient = new_patient(client)
    so_far = {"patient": patient, "form-id": form_id(), "rf-leg-weakness": "true", "onset-age": "200"}
    answer = client.post("/form/progress", data=so_far)
    assert answer.status_code == 200 and answer.json() == {"saved": True, "outcome": "emergency-assessment"}
    (saved,) = stored(client, "QuestionnaireResponse")
    assert saved["status"] == "in-progress" and saved["subject"]["reference"] == patient
    assert saved["identifier"]["value"] == form_id()
    answers = {i["linkId"]: i["answer"][0] for g in saved["item"] for i in g["item"]}
    assert answers == {"rf-leg-weakness": {"valueBoolean": True}}  # the age of 200 is not taken
    for _ in range(2):  # a double click
        done = client.post("/form", data={**so_far, "onset-age": "30"})
        assert done.status_code == 200 and "Seek urgent care now" in done.text
    (final,) = stored(client, "QuestionnaireResponse")
    assert final["status"] == "completed" and final["id"] == saved["id"]
    assert client.post("/form/progress", data={"patient": patient, "rf-fever": "true"}).status_code == 400  # no id
    unsaved = client.post("/form/progress", data={"form-id": form_id(), "rf-fever": "true"})
    assert unsaved.json() == {"saved": False, "outcome": "urgent-assessment"}  # no patient: advice only


def test_without_script_the_red_flag_button_sends_them_and_gives_the_form_back(client):
    patient = new_patient(client)
    answer = client.post("/form", data={"patient": patient, "form-id": form_id(), "stage": "red-flags",
                                        "rf-fever": "true", "pain-duration": "1y-5y"}, headers=HTML)
    assert answer.status_code == 200
    html = answer.text
    assert html.index("Contact a doctor today") < html.index('id="screening"')  # the advice, then the form
    assert "Your answers so far have been sent to your care team." in html
    assert f'value="{form_id()}"' in html and 'value="1y-5y" checked' in html  # the same form, answers kept
    assert [r["status"] for r in stored(client, "QuestionnaireResponse")] == ["in-progress"]


def test_a_patient_form_cannot_answer_the_clinicians_questions(settings):
    with client_with(settings, form_secret="form-secret") as signed:
        patient = new_patient(signed)
        sig = hmac.new(b"form-secret", patient.encode(), hashlib.sha256).hexdigest()
        clinician = hmac.new(b"form-secret", f"{patient}|clinician".encode(), hashlib.sha256).hexdigest()
        assert signed.get("/", params={"patient": patient, "sig": sig, "clinician": "1"}).status_code == 403
        form = signed.get("/", params={"patient": patient, "sig": clinician, "clinician": "1"})
        assert form.status_code == 200 and 'name="hla-b27"' in form.text
        assert 'name="hla-b27"' not in signed.get("/", params={"patient": patient, "sig": sig}).text
        signed.post("/form", data={"patient": patient, "sig": sig, "hla-b27": "positive", "rf-fever": "false"})
        signed.post("/form", data={"patient": patient, "sig": clinician, "clinician": "1", "hla-b27": "positive"})
        by_role = [{i["linkId"] for g in qr["item"] for i in g["item"]}
                   for qr in stored(signed, "QuestionnaireResponse")]
        assert sorted(by_role, key=len) == [{"rf-fever"}, {"hla-b27"}]
        again = signed.post("/form", data={"patient": patient, "sig": sig, "rf-fever": "false"}, headers=HTML)
        assert f'href="/?patient={patient.replace("/", "%2F")}&amp;sig={sig}"' in again.text  # fill in again


def test_results_index_most_urgent_first_and_every_result_once_across_pages(client):
    for name in ("qr-no-referral.json", "qr-emergency.json", "qr-indeterminate.json"):
        ingest(client, name)  # all of the same moment: paging must neither lose nor repeat one
    html = client.get("/results", headers=HTML).text
    order = [html.index(t) for t in ("Emergency assessment today", "Indeterminate", "No referral indicated")]
    assert order == sorted(order)
    seen = []
    for number in (1, 2, 3):
        page = client.get("/results", params={"count": "1", "page": str(number)}, headers=HTML).text
        seen += re.findall(r'href="/results/(qr-[a-z-]+)"', page[page.index("All results"):])
        assert ("Older results" in page) == (number < 3)
    assert sorted(seen) == ["qr-emergency", "qr-indeterminate", "qr-no-referral"]
    one = stored(client, "QuestionnaireResponse")[0]["subject"]["reference"]
    mine = client.get("/results", params={"patient": one}, headers=HTML).text
    assert len(re.findall(r'href="/results/qr-', mine[mine.index("All results"):])) == 1
    for bad in ({"count": "0"}, {"count": "abc"}, {"page": "0"}, {"count": "101"}):
        assert client.get("/results", params=bad).status_code == 400, bad


def test_results_index_lists_every_open_urgent_task_first_on_every_page(client):
    """An emergency is never on page 2, and a red flag from an unfinished response (no screening outcome, so no
    row of its own) is listed too (safety case H27)."""
    ingest(client, "qr-emergency.json")
    unfinished = response({"rf-fever": True}, status="in-progress", id="unfinished-fever",
                          subject={"reference": new_patient(client)})
    assert post_json(client, "/QuestionnaireResponse", unfinished).status_code == 201
    for name in ("qr-no-referral.json", "qr-refer-asas.json"):
        ingest(client, name)
    for number in ("1", "2", "3"):
        html = client.get("/results", params={"count": "1", "page": number}, headers=HTML).text
        section = html[html.index("Needs action now"):html.index("All results")]
        stat, urgent = section.index("(stat)"), section.index("(urgent)")
        assert stat < urgent and f'href="/results/{unfinished["id"]}"' in section
        assert re.search(r"since \d{1,2} [A-Z][a-z]{2} \d{4}, \d\d:\d\d UTC", section)  # a date people read
    calm = client.get("/results", params={"patient": stored(client, "QuestionnaireResponse")[-1]["subject"][
        "reference"]}, headers=HTML).text
    assert "No open stat or urgent tasks for this patient." in calm


def test_results_index_needs_the_token(settings):
    with client_with(settings, ingest_token="ingest-secret") as locked:
        assert locked.get("/results").status_code == 401
        assert locked.get("/results", headers={"Authorization": "Bearer ingest-secret"}).status_code == 200


def test_results_pages_for_wrong_patient_or_a_bad_link(client):
    qr = ingest(client, "qr-emergency.json")
    other = client.get(f"/results/{qr['id']}", params={"patient": "Patient/someone-else"}, headers=HTML)
    assert other.status_code == 404 and "Result not found" in other.text
    forged = client.get(f"/results/{qr['id']}", params={"access": "forged"}, headers=HTML)
    assert forged.status_code == 403 and "You cannot open this result" in forged.text
    assert "Please check your answers" not in other.text + forged.text  # not the patient form's error page


def test_an_entered_in_error_result_says_so_and_why_its_task_was_cancelled(client):
    qr = ingest(client, "qr-refer-asas.json")
    withdrawn = post_json(client, "/QuestionnaireResponse", {**qr, "status": "entered-in-error"})
    assert withdrawn.status_code in (200, 201), withdrawn.text
    html = client.get(f"/results/{qr['id']}", headers=HTML).text
    (task,) = stored(client, "Task")
    assert task["status"] == "cancelled" and task["statusReason"]["text"]
    assert html.index("Entered in error: this response was withdrawn") < html.index("What to do")
    assert f"Cancelled: {task['statusReason']['text']}" in html


# -- settings --------------------------------------------------------------------------------------------------


def test_service_settings_from_environment_and_flags(tmp_path):
    environ = {
        "FHIR_BASE_URL": "https://ehr.example.org/fhir", "FHIR_BEARER_TOKEN": "outbound-secret",
        "BACKPAIN_STORE": str(tmp_path / "s.sqlite3"), "BACKPAIN_HOST": "0.0.0.0", "BACKPAIN_PORT": "9001",
        "BACKPAIN_WORKERS": "3", "BACKPAIN_STRATEGY": "nice-ng65", "BACKPAIN_MAX_BODY_BYTES": "2048",
        "BACKPAIN_INGEST_TOKEN": "ingest-secret", "BACKPAIN_NOTIFY_SECRET": "notify-secret",
        "BACKPAIN_FORM_SECRET": "form-secret", "BACKPAIN_CORS_ORIGINS": "https://a.example, https://b.example,",
        "BACKPAIN_PUBLIC_URL": "https://screen.example.org", "BACKPAIN_LOG_LEVEL": "warning",
        "BACKPAIN_SMART_LAUNCH_CLIENT_ID": "screening-app",
        "BACKPAIN_SMART_CLIENT_ID": "backpain-plugin", "BACKPAIN_SMART_PRIVATE_KEY": str(tmp_path / "key.pem"),
        "BACKPAIN_SMART_KEY_ID": "key-2026", "BACKPAIN_SMART_SCOPES": "system/Observation.crus",
        "BACKPAIN_SESSION_SECRET": "session-secret",
        "BACKPAIN_CDS_ISSUERS": "https://ehr.example.org|https://ehr.example.org/jwks, https://b.example|https://b.example/k",
        "BACKPAIN_HEADER_SECONDS": "7", "BACKPAIN_BODY_GAP_SECONDS": "8", "BACKPAIN_BODY_SECONDS": "60",
        "BACKPAIN_KEEP_ALIVE_SECONDS": "75",
    }
    assert set(environ) == {variable for variable, _ in SERVICE_SETTINGS.values()}
    settings = service_settings(environ)
    assert settings == ServiceSettings(
        fhir_base_url="https://ehr.example.org/fhir", fhir_bearer_token="outbound-secret",
        store_path=tmp_path / "s.sqlite3", host="0.0.0.0", port=9001, workers=3, strategy="nice-ng65",
        max_body_bytes=2048, ingest_token="ingest-secret", notify_secret="notify-secret", form_secret="form-secret",
        cors_origins=("https://a.example", "https://b.example"), public_url="https://screen.example.org",
        log_level="warning", smart_launch_client_id="screening-app",
        smart_client_id="backpain-plugin", smart_private_key=str(tmp_path / "key.pem"), smart_key_id="key-2026",
        smart_scopes="system/Observation.crus", session_secret="session-secret",
        cds_issuers=("https://ehr.example.org|https://ehr.example.org/jwks", "https://b.example|https://b.example/k"),
        header_seconds=7, body_gap_seconds=8, body_seconds=60, keep_alive_seconds=75)
    assert settings.scoring().max_body_bytes == 2048 and settings.scoring().strategy == "nice-ng65"
    for secret in ("outbound-secret", "ingest-secret", "notify-secret", "form-secret", "session-secret"):
        assert secret not in repr(settings)
    flagged = service_settings(environ, port=9100, workers=None, store_path=str(tmp_path / "flag.sqlite3"))
    assert flagged.port == 9100 and flagged.workers == 3  # a flag wins; a flag not given does not
    assert flagged.store_path == tmp_path / "flag.sqlite3"
    defaults = service_settings({"BACKPAIN_PORT": "", "BACKPAIN_CORS_ORIGINS": ""})
    assert defaults.port == ServiceSettings().port and defaults.cors_origins == ()
    assert defaults.fhir_base_url is None and defaults.ingest_token is None
    assert defaults.smart_client_id is None and "system/Observation.crus" in defaults.smart_scopes
    assert (defaults.header_seconds, defaults.body_gap_seconds, defaults.body_seconds,
            defaults.keep_alive_seconds) == (10, 10, 30, 5)


@pytest.mark.parametrize(("variable", "value"), [
    ("BACKPAIN_HEADER_SECONDS", "0"), ("BACKPAIN_KEEP_ALIVE_SECONDS", "-5"), ("BACKPAIN_BODY_SECONDS", "601"),
    ("BACKPAIN_BODY_GAP_SECONDS", "ten"), ("BACKPAIN_HEADER_SECONDS", "61"), ("BACKPAIN_KEEP_ALIVE_SECONDS", "1201")])
def test_a_client_time_limit_out_of_range_stops_serve_with_one_line(variable, value, tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), variable: value}
    done = subprocess.run([*CLI, "serve", "--store", str(tmp_path / "s.sqlite3"), "--port", "1"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("backpain-screen: a setting is not valid:") and done.stderr.count("\n") == 1
    assert variable in done.stderr


def test_the_client_time_limits_bounds_are_inclusive_and_only_serve_checks_them(tmp_path):
    ServiceSettings(header_seconds=60, body_gap_seconds=60, body_seconds=600, keep_alive_seconds=1200
                    ).check_client_limits()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "BACKPAIN_KEEP_ALIVE_SECONDS": "5000"}
    submitted = subprocess.run([*CLI, "submit", str(EXAMPLES / "qr-urgent.json"), "--store", str(tmp_path / "s.db")],
                               env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert submitted.returncode == 0, submitted.stderr  # a CronJob sharing serve's ConfigMap is not stopped by it
    env["BACKPAIN_PORT"] = "eighty"
    refused = subprocess.run([*CLI, "submit", str(EXAMPLES / "qr-urgent.json"), "--store", str(tmp_path / "s.db")],
                             env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (refused.returncode, refused.stderr) == (
        2, "backpain-screen: a setting is not valid: BACKPAIN_PORT must be a whole number, not 'eighty'.\n")


@pytest.mark.parametrize("document", ["README.md", "deploy/operations.md"])
def test_every_service_setting_is_in_the_settings_tables(document):
    text = (ROOT / document).read_text()
    table = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("|"))
    missing = [variable for variable, _ in SERVICE_SETTINGS.values() if not re.search(rf"\b{variable}\b", table)]
    assert not missing, f"{document}'s settings table lacks {missing}"


def test_answers_carrying_patient_data_are_not_cached_and_html_refusals_keep_their_headers(settings):
    with client_with(settings, ingest_token="ingest-secret") as locked:
        extract = post_json(locked, "/QuestionnaireResponse/$extract", example("qr-refer-asas.json"))
        assert extract.headers["cache-control"] == "no-store"
        assert "no-store" not in locked.get("/static/style.css").headers.get("cache-control", "")
        page = locked.get("/results/anything", headers=HTML)
        assert page.status_code == 401 and page.headers["www-authenticate"] == "Bearer"
        assert page.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize(("accept", "expected"), [
    ("application/fhir+xml;q=0.1, application/fhir+json", "application/fhir+json"),
    ("application/fhir+json;q=0.5, application/fhir+xml;q=0.9", "application/fhir+xml"),
    ("application/fhir+xml;q=0.0", "application/fhir+json"),
    ("text/html;q=0.9, application/xml", "application/fhir+xml"),
])
def test_accept_is_read_by_its_quality_values(client, accept, expected):
    assert client.get("/metadata", headers={"Accept": accept}).headers["content-type"].startswith(expected)


def test_a_response_xml_cannot_carry_is_a_422_in_xml_not_a_crash(client):
    qr = example("qr-refer-asas.json")
    # U+FFFE is a FHIR string character (not whitespace, not a control character) that XML 1.0 cannot hold
    qr["item"][0]["extension"] = [{"url": "http://example.org/x", "valueString": "a\ufffeb"}]
    answer = client.post("/QuestionnaireResponse/$extract", content=orjson.dumps(qr),
                         headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+xml"})
    assert answer.status_code == 422 and answer.text.lstrip().startswith("<?xml")
    assert "OperationOutcome" in answer.text
