"""Every endpoint of the OpenAPI description, driven with generated JSON and XML bodies, headers and dates:
no 5xx and no answer slower than a second (issue #14, "done when").

Hypothesis builds each request from what the service reads: bodies that are
arbitrary JSON, FHIR-shaped JSON with fuzzed dates, references and ids,
arbitrary XML and FHIR-shaped XML; Content-Type, Accept and `_format`
variants; and the path's `{id}`. (tests/web/test_service_hostile.py also
runs schemathesis from the same document; this adds XML, dates and the
time limit.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from plugin.app import create_app
from plugin.settings import ServiceSettings
from tests.factory import response

NOTIFY_SECRET = "fuzz-secret"
STALL = 1.0
FHIR_NS = "http://hl7.org/fhir"


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    home = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(home / "state"))
        settings = ServiceSettings(store_path=home / "store.sqlite3", notify_secret=NOTIFY_SECRET)
        with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
            # the XML workers warm up in the background at start-up; one request waits for them once
            test_client.post("/QuestionnaireResponse/$extract", content=b"<x/>",
                             headers={"Content-Type": "application/fhir+xml"})
            yield test_client




DATES = st.one_of(
    st.sampled_from(["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00", "0000-01-01", "2026-02-30",
                     "2026-11-20T24:00:00Z", "2026-11-20T10:00:00+15:00", "9999", "", "T", "2026-11-20T10:00:60Z"]),
    st.datetimes().map(lambda d: d.isoformat()), st.text(max_size=30), st.integers())
REFERENCES = st.one_of(st.sampled_from(["Patient/p1", "x/Patient/p1", "Patient/..", "Patient/p1/_history/1",
                                        "https://other.example.org/Patient/p1", "urn:uuid:1"]), st.text(max_size=40))
SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON_VALUES = st.recursive(SCALARS, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=12), children, max_size=4), max_leaves=25)


@st.composite
def fhir_json(draw) -> bytes:
    qr = response({"rf-saddle-numbness": draw(st.booleans()), "onset-age": draw(st.integers(-5, 200))})
    qr["authored"] = draw(DATES)
    qr["subject"] = {"reference": draw(REFERENCES)}
    if draw(st.booleans()):
        qr["id"] = draw(st.sampled_from([".", "..", "a" * 65, "ok-1", "a/b"]) | st.text(max_size=10))
    if draw(st.booleans()):
        qr[draw(st.sampled_from(["modifierExtension", "extension", "contained", "meta", "item"]))] = draw(JSON_VALUES)
    if draw(st.booleans()):  # wrapped as $populate / CDS Hooks / feedback would take them
        qr = draw(st.sampled_from([
            {"resourceType": "Parameters", "parameter": [{"name": "subject", "valueReference": qr["subject"]},
                                                         {"name": "questionnaire-response", "resource": qr}]},
            {"hook": "patient-view", "hookInstance": "h", "context": {"patientId": draw(st.text(max_size=10))},
             "prefetch": {"outcome": {"resourceType": "Bundle", "entry": [{"resource": {
                 "resourceType": "Observation", "effectiveDateTime": qr["authored"]}}]}}},
            {"feedback": [{"card": "0f8fad5b-d9cb-469f-a165-70867728950e", "outcome": "overridden",
                           "outcomeTimestamp": qr["authored"]}]},
        ]))
    return json.dumps(qr, default=str).encode()


@st.composite
def fhir_xml(draw) -> bytes:
    names = st.sampled_from(["status", "item", "linkId", "answer", "valueBoolean", "authored", "subject",
                             "reference", "extension", "modifierExtension", "text", "div", "x:y"])
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        name = draw(names)
        value = draw(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=15))
        value = value.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
        parts.append(f'<{name} value="{value}"/>' if draw(st.booleans()) else f"<{name}>{value}</{name}>")
    root = draw(st.sampled_from(["QuestionnaireResponse", "Parameters", "Patient", "Bundle"]))
    namespace = draw(st.sampled_from([FHIR_NS, "urn:other", ""]))
    body = f'<{root} xmlns="{namespace}"><status value="completed"/>{"".join(parts)}</{root}>'
    return body.encode() if draw(st.booleans()) else body.encode()[:draw(st.integers(0, len(body)))]


BODIES = st.one_of(fhir_json(), fhir_xml(), JSON_VALUES.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200))
CONTENT_TYPES = st.sampled_from([None, "application/fhir+json", "application/json", "application/fhir+xml",
                                 "text/xml", "application/x-www-form-urlencoded", "text/plain",
                                 "application/fhir+json; charset=latin-1", "multipart/form-data; boundary=x",
                                 "application/xml; q=0"])
ACCEPTS = st.sampled_from([None, "application/fhir+xml", "application/fhir+json", "text/html", "*/*", "xml;q=abc"])
IDS = st.sampled_from(["back-pain-screening", "qr-1", "..", ".", "a" * 65, "%2E%2E", "a%20b", "x"])
OPERATIONS = [
    ("GET", "/metadata"), ("GET", "/Questionnaire"), ("GET", "/Questionnaire/{id}"), ("GET", "/CodeSystem"),
    ("GET", "/CodeSystem/{id}"), ("POST", "/Questionnaire/$populate"), ("POST", "/Questionnaire/{id}/$populate"),
    ("POST", "/QuestionnaireResponse/$extract"), ("POST", "/QuestionnaireResponse"),
    ("PUT", "/QuestionnaireResponse/{id}"), ("GET", "/results/{id}"), ("GET", "/launch"), ("GET", "/launch/callback"),
    ("GET", "/cds-services"), ("POST", "/cds-services/backpain-screening"),
    ("POST", "/cds-services/backpain-screening/feedback"), ("GET", "/healthz"), ("GET", "/readyz"),
    ("GET", "/StructureDefinition"), ("GET", "/StructureDefinition/{id}"), ("GET", "/OperationDefinition"),
    ("GET", "/OperationDefinition/{id}"), ("GET", "/QuestionnaireResponse/{id}"),
    ("GET", "/QuestionnaireResponse/{id}/_history/{vid}"), ("POST", "/QuestionnaireResponse/{id}/$extract"),
    ("GET", "/results"),
]


def test_every_operation_of_the_openapi_document_is_fuzzed(client):
    listed = {(method.upper(), path) for path, ops in client.get("/openapi.json").json()["paths"].items()
              for method in ops}
    assert listed - {("POST", "/notify"), ("GET", "/metrics")} == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=BODIES, content_type=CONTENT_TYPES, accept=ACCEPTS, an_id=IDS, fmt=st.sampled_from([None, "xml", "json"]),
       when=DATES)
def test_no_5xx_and_no_stall(client, method, path, body, content_type, accept, an_id, fmt, when):
    headers = {"X-Notification-Secret": NOTIFY_SECRET,
               "If-Modified-Since": str(when).encode("ascii", "replace").decode().replace("\n", " ").strip()}
    if content_type:
        headers["Content-Type"] = content_type
    if accept:
        headers["Accept"] = accept
    url = path.replace("{id}", an_id).replace("{vid}", an_id) + (f"?_format={fmt}" if fmt else "")
    note(f"{method} {url} {headers} {body[:300]!r}")
    started = time.perf_counter()
    answer = client.request(method, url, content=body if method != "GET" else None, headers=headers)
    took = time.perf_counter() - started
    assert answer.status_code < 500, answer.text[:500]
    assert took < STALL, took
