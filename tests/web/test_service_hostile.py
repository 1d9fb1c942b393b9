"""Hostile and random input over the HTTP API: XML attacks, deep JSON, and property-based fuzzing.

Nothing a caller sends may reach a file or the network, cost unbounded time
or memory, or make the service answer 5xx: a bad body is a 4xx with an
OperationOutcome. The fuzzing is bounded so the whole file stays well
under a minute.
"""

from __future__ import annotations

import atexit
import contextlib
import http.server
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from lxml import etree
from schemathesis.checks import not_a_server_error
from starlette.testclient import TestClient

from plugin.app import create_app
from plugin.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "questionnaires" / "examples" / "qr-refer-asas.json"
FHIR_NS = "http://hl7.org/fhir"
NOTIFY_SECRET = "hostile-test-secret"
XML_PATHS = ("/QuestionnaireResponse/$extract", "/QuestionnaireResponse", "/QuestionnaireResponse/qr-refer-asas")


# -- a service, and a listener that would notice any outbound fetch -----------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    home = tmp_path_factory.mktemp("hostile")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(home / "state"))
        settings = ServiceSettings(store_path=home / "store.sqlite3", notify_secret=NOTIFY_SECRET)
        with TestClient(create_app(settings)) as client:
            yield client


@pytest.fixture(scope="module")
def patient(service: TestClient) -> str:
    store = service.app.state.service.store
    return f"Patient/{service.portal.call(store.create, {'resourceType': 'Patient'})['id']}"


class Listener(http.server.ThreadingHTTPServer):
    hits: list[str]


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    """An HTTP server on 127.0.0.1 that records every request: an XML parser reaching out would show here."""

    class Record(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.server.hits.append(self.path)  # type: ignore[attr-defined]
            body = b'<!ENTITY leak "network-was-reached">'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = Listener(("127.0.0.1", 0), Record)
    server.hits = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def marker_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "secret.txt"
    path.write_text("MARKER-7f3a9c-the-file-was-read")
    return path


def passwd_lines() -> list[str]:
    with contextlib.suppress(OSError):
        return [line for line in Path("/etc/passwd").read_text().splitlines() if line.strip()][:3]
    return []


def send_xml(client: TestClient, path: str, body: bytes) -> Any:
    headers = {"Content-Type": "application/fhir+xml", "X-Notification-Secret": NOTIFY_SECRET}
    if path == "/QuestionnaireResponse/qr-refer-asas":
        return client.put(path, content=body, headers=headers)
    return client.post(path, content=body, headers=headers)


def assert_refused(answer: Any, leaks: list[str]) -> None:
    assert answer.status_code == 400, answer.text
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"]
    for leak in leaks:
        assert leak not in answer.text


# -- XML attacks -------------------------------------------------------------------------------------------------


QR_OPEN = '<QuestionnaireResponse xmlns="http://hl7.org/fhir">'
# The entity goes where FHIR XML carries free text: the narrative's XHTML div (an attribute value may not
# refer to an external entity at all, so a parser would refuse that before any attack could happen).
QR_BODY = ('<text><status value="generated"/><div xmlns="http://www.w3.org/1999/xhtml">&x;</div></text>'
           '<status value="completed"/></QuestionnaireResponse>')


def attacks(marker: Path, port: int) -> dict[str, bytes]:
    url = f"http://127.0.0.1:{port}"
    laughs = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    return {
        "xxe-passwd": f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                      f"{QR_OPEN}{QR_BODY}".encode(),
        "xxe-marker": f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file://{marker}">]>{QR_OPEN}{QR_BODY}'
                      .encode(),
        "xxe-network": f'<!DOCTYPE r [<!ENTITY x SYSTEM "{url}/entity">]>{QR_OPEN}{QR_BODY}'.encode(),
        "external-dtd-file": f'<!DOCTYPE QuestionnaireResponse SYSTEM "file:///etc/passwd">{QR_OPEN}'
                             f'<status value="completed"/></QuestionnaireResponse>'.encode(),
        "external-dtd-network": f'<!DOCTYPE QuestionnaireResponse SYSTEM "{url}/evil.dtd">{QR_OPEN}'
                                f'<status value="completed"/></QuestionnaireResponse>'.encode(),
        "parameter-entity": f'<!DOCTYPE r [<!ENTITY % p SYSTEM "{url}/param.dtd"> %p;]>{QR_OPEN}'
                            f'<status value="completed"/></QuestionnaireResponse>'.encode(),
        "billion-laughs": f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY l0 "lol">{laughs}<!ENTITY x "&l9;">]>'
                          f"{QR_OPEN}{QR_BODY}".encode(),
        "xxe-utf16": f'<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE r [<!ENTITY x SYSTEM "file://{marker}">]>'
                     f"{QR_OPEN}{QR_BODY}".encode("utf-16"),
        "xinclude": f'{QR_OPEN}<status value="completed"/><xi:include xmlns:xi="http://www.w3.org/2001/XInclude" '
                    f'href="file://{marker}" parse="text"/></QuestionnaireResponse>'.encode(),
    }


@pytest.mark.parametrize("path", XML_PATHS)
@pytest.mark.parametrize("name", ["xxe-passwd", "xxe-marker", "xxe-network", "external-dtd-file",
                                  "external-dtd-network", "parameter-entity", "billion-laughs", "xxe-utf16",
                                  "xinclude"])
def test_xml_attacks_are_refused_without_reading_anything(service, listener, marker_file, path, name):
    body = attacks(marker_file, listener.server_address[1])[name]
    hits = len(listener.hits)
    started = time.perf_counter()
    answer = send_xml(service, path, body)
    assert time.perf_counter() - started < 5
    assert_refused(answer, ["MARKER-7f3a9c", "network-was-reached", "lollollol", *passwd_lines()])
    assert len(listener.hits) == hits, listener.hits[hits:]


def test_the_attacks_are_live_against_an_unsafe_parser(listener, marker_file):
    """A control: a parser that resolves entities does read the file with these bodies, so the test above would
    notice a service that parsed them that way. (The libxml2 under lxml 6 has no HTTP client at all, so the
    network cases cannot be shown live here; the listener guards against a parser that has one.)"""
    unsafe = etree.XMLParser(resolve_entities=True, no_network=False, load_dtd=True)
    for name in ("xxe-marker", "xxe-utf16"):  # UTF-16 hides the DOCTYPE from a byte-level scan
        read = etree.fromstring(attacks(marker_file, listener.server_address[1])[name], parser=unsafe)
        assert "MARKER-7f3a9c" in etree.tostring(read).decode(), name


@pytest.mark.parametrize("path", XML_PATHS)
@pytest.mark.parametrize("body", [
    b'<QuestionnaireResponse xmlns="http://example.org/not-fhir"><status value="completed"/></QuestionnaireResponse>',
    b'<QuestionnaireResponse><status value="completed"/></QuestionnaireResponse>',
    b'<f:QuestionnaireResponse xmlns:f="http://hl7.org/fhir/"><f:status value="completed"/></f:QuestionnaireResponse>',
    b'<html xmlns="http://hl7.org/fhir"><body/></html>',
    b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
    b'<Patient xmlns="http://hl7.org/fhir"><id value="p"/></Patient>',
    b'<QuestionnaireResponse xmlns="http://hl7.org/fhir"><status value="completed"/>',
    b"<" * 5000,
    ("<QuestionnaireResponse xmlns=\"http://hl7.org/fhir\">" + "<item>" * 200 + "</item>" * 200
     + "</QuestionnaireResponse>").encode(),
], ids=["wrong-namespace", "no-namespace", "namespace-with-slash", "non-fhir-root", "svg", "not-a-response",
        "unclosed", "garbage", "too-deep"])
def test_xml_that_is_not_a_fhir_response_is_400(service, path, body):
    assert_refused(send_xml(service, path, body), [])


# -- deep JSON ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b"[" * 10_000 + b"]" * 10_000,
    b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    b'{"resourceType":"QuestionnaireResponse","item":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    b"[" * 10_000,
], ids=["arrays", "objects", "inside-a-response", "unclosed"])
@pytest.mark.parametrize("path", ["/QuestionnaireResponse/$extract", "/QuestionnaireResponse"])
def test_json_nested_10000_deep_is_400(service, path, body):
    answer = service.post(path, content=body, headers={"Content-Type": "application/fhir+json"})
    assert_refused(answer, [])


@pytest.mark.parametrize("levels", [100, 300, 500])
@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_deep_nesting_the_json_parser_accepts_is_still_refused(service, patient, levels, fmt):
    """Deep, but within orjson's limit (1,024): the checker, the writer and the XML reply must not crash on it."""
    qr = orjson.loads(EXAMPLE.read_bytes())
    qr["subject"] = {"reference": patient}
    leaf = b'{"url":"http://example.org/leaf","valueString":"x"}'
    nested = b'{"url":"http://example.org/branch","extension":[' * levels + leaf + b"]}" * levels
    body = orjson.dumps(qr)[:-1] + b',"extension":[' + nested + b"]}"
    assert orjson.loads(body)  # the JSON parser itself takes it
    for path in ("/QuestionnaireResponse/$extract", "/QuestionnaireResponse"):
        answer = service.post(path, content=body, params={"_format": fmt},
                              headers={"Content-Type": "application/fhir+json"})
        assert answer.status_code < 500, answer.text
        if answer.status_code >= 400:
            assert is_outcome(answer.content, fmt)


# -- schemathesis: the app against its own OpenAPI document ------------------------------------------------------


# schemathesis.pytest.from_fixture cannot run under pytest 9 (it sets a node attribute pytest no longer has), so
# the schema is loaded when the module is imported, from an app with its own store in a directory removed at exit.
FUZZ_HOME = Path(tempfile.mkdtemp(prefix="backpain-fuzz-"))
atexit.register(shutil.rmtree, FUZZ_HOME, True)
FUZZ_APP = create_app(ServiceSettings(store_path=FUZZ_HOME / "store.sqlite3", notify_secret=NOTIFY_SECRET))
schema = schemathesis.openapi.from_asgi("/openapi.json", FUZZ_APP)


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_error_anywhere_in_the_openapi_document(case):
    # Notifications with a payload get the right secret so the fuzzing reaches past the check (401s are tested
    # elsewhere); POST /notify does not, so no catch-up sync starts writing a watermark outside FUZZ_HOME.
    headers = {"X-Notification-Secret": NOTIFY_SECRET} if case.method.upper() == "PUT" else None
    case.call_and_validate(headers=headers, checks=[not_a_server_error])


def test_the_openapi_document_lists_every_route():
    paths = set(schema.raw_schema["paths"])
    assert {"/metadata", "/QuestionnaireResponse/$extract", "/QuestionnaireResponse", "/QuestionnaireResponse/{id}",
            "/notify", "/results/{id}", "/healthz", "/readyz", "/metrics", "/Questionnaire/$populate",
            "/cds-services", "/cds-services/backpain-screening", "/launch", "/launch/callback"} <= paths


# -- hypothesis: random JSON-ish bodies --------------------------------------------------------------------------


def is_outcome(body: bytes, fmt: str) -> bool:
    if fmt == "xml":
        root = etree.fromstring(body)
        return root.tag == f"{{{FHIR_NS}}}OperationOutcome" and len(root) > 0
    outcome = orjson.loads(body)
    return outcome.get("resourceType") == "OperationOutcome" and bool(outcome.get("issue"))


json_leaf = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=16)
ELEMENTS = ["id", "meta", "implicitRules", "language", "text", "contained", "extension", "modifierExtension",
            "identifier", "basedOn", "partOf", "questionnaire", "status", "subject", "encounter", "authored",
            "author", "source", "item", "_status", "_authored", "resourceType"]
# The JSON shape R4 gives each optional top-level element: values of the right shape but random content get
# past a shallow check, which is where a deeper bug would hide.
SHAPES = {"meta": dict, "implicitRules": str, "language": str, "text": dict, "contained": list, "extension": list,
          "modifierExtension": list, "identifier": dict, "basedOn": list, "partOf": list, "author": dict,
          "source": dict, "_status": dict, "_authored": dict}
ITEM_FIELDS = ["linkId", "text", "answer", "item", "definition", "extension", "id"]
json_object = st.dictionaries(st.text(max_size=12) | st.sampled_from(["url", "reference", "system", "value", "id",
                                                                      "display", "versionId", "div", "status"]),
                              json_value, max_size=4)
shaped = {dict: json_object, list: st.lists(json_object | json_value, min_size=1, max_size=3),
          str: st.text(max_size=30)}


@st.composite
def mutated_response(draw: st.DrawFn) -> dict:
    """The example response with a few elements (top-level or in an item) replaced by random JSON."""
    qr = orjson.loads(EXAMPLE.read_bytes())
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["shaped", "top", "item"]))
        if where == "shaped":
            name = draw(st.sampled_from(sorted(SHAPES)))
            qr[name] = draw(shaped[SHAPES[name]])
        elif where == "top":
            qr[draw(st.sampled_from(ELEMENTS))] = draw(json_value)
        elif isinstance(qr.get("item"), list) and qr["item"]:
            group = qr["item"][draw(st.integers(0, len(qr["item"]) - 1))]
            items = group.get("item") if isinstance(group, dict) else None
            target = items[draw(st.integers(0, len(items) - 1))] if isinstance(items, list) and items else group
            if isinstance(target, dict):
                target[draw(st.sampled_from(ITEM_FIELDS))] = draw(json_value)
    return qr

def dumps(value: Any) -> bytes:
    """JSON text of any value, integers beyond 64 bits included (orjson refuses those)."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


bodies = st.one_of(
    json_value.map(dumps),
    st.dictionaries(st.sampled_from(ELEMENTS), json_value, max_size=6).map(
        lambda d: dumps({"resourceType": "QuestionnaireResponse", **d})),
    mutated_response().map(dumps),
    mutated_response().map(lambda qr: dumps(
        {"resourceType": "Parameters", "parameter": [{"name": "questionnaire-response", "resource": qr}]})),
    st.binary(max_size=200),
)


def what_changed(body: bytes) -> str:
    """A short account of a body: for a mutated example, only the elements that differ from it."""
    try:
        value = json.loads(body)
    except ValueError:
        return f"body (not JSON) {body[:200]!r}"
    if isinstance(value, dict) and value.get("resourceType") == "Parameters":
        value = (value.get("parameter") or [{}])[0].get("resource", value)
    original = orjson.loads(EXAMPLE.read_bytes())
    if not isinstance(value, dict) or value.get("id") != original["id"]:
        return f"body {body[:400]!r}"
    changed = {k: v for k, v in value.items() if original.get(k) != v}
    return f"the example with {json.dumps(changed)[:1500]}" + (" (and its items)" if "item" in changed else "")


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, fmt=st.sampled_from(["json", "xml"]),
       content_type=st.sampled_from(["application/fhir+json", "application/json", None]),
       path=st.sampled_from(["/QuestionnaireResponse/$extract", "/QuestionnaireResponse"]))
def test_random_bodies_never_cause_a_server_error(service, patient, body, fmt, content_type, path):
    note(f"POST {path}?_format={fmt}, Content-Type {content_type}; {what_changed(body)}")
    body = body.replace(b'"Patient/example"', orjson.dumps(patient))  # so writes can reach the store
    headers = {"Content-Type": content_type} if content_type else {}
    answer = service.post(path, content=body, params={"_format": fmt}, headers=headers)
    assert answer.status_code < 500, (answer.status_code, answer.text[:300])
    if answer.status_code >= 400:
        assert is_outcome(answer.content, fmt), answer.text[:300]
