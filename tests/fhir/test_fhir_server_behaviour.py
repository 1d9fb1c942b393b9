"""The test FHIR server behaves like a HAPI FHIR JPA server where the plugin could tell the difference.

Versions and ETags, If-Match, paging, unknown search parameters, codes in required
bindings, referential integrity, XML and rest-hook Subscriptions (tests/fhir_server/README.md).
Each test makes its own resources; the ones about the local server's own admin endpoint
are skipped against another server (FHIR_BASE_URL).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import orjson
import pytest

FHIR_NS = "{http://hl7.org/fhir}"
XML = "application/fhir+xml"
local_only = pytest.mark.skipif(bool(os.environ.get("FHIR_BASE_URL")), reason="the local test server's admin endpoint")


def post(fhir: httpx.Client, path: str, resource: dict, **headers: str) -> httpx.Response:
    return fhir.post(path, content=orjson.dumps(resource), headers=headers)


def put(fhir: httpx.Client, resource: dict, **headers: str) -> httpx.Response:
    return fhir.put(f"/{resource['resourceType']}/{resource['id']}", content=orjson.dumps(resource), headers=headers)


def transaction(*entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def entry(resource: dict | None, method: str, url: str, **request: str) -> dict:
    return {**({"resource": resource} if resource else {}), "request": {"method": method, "url": url, **request}}


def observation(patient: str, text: str = "test", **more: object) -> dict:
    return {"resourceType": "Observation", "status": "final", "code": {"text": text},
            "subject": {"reference": patient}, **more}


def created(response: httpx.Response) -> dict:
    assert response.status_code == 201, response.text
    return response.json()


def issue_text(response: httpx.Response) -> str:
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    return " ".join(i.get("details", {}).get("text", "") + i.get("diagnostics", "") for i in outcome["issue"])


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- 1. versions, ETag, Location, If-Match, 201 on PUT, 410 --------------------------------------------


def test_versions_count_from_one_with_matching_etag_and_location(fhir: httpx.Client, patient: str):
    first = post(fhir, "/Observation", observation(patient))
    obs = created(first)
    assert obs["meta"]["versionId"] == "1" and first.headers["ETag"] == 'W/"1"'
    assert first.headers["Location"].endswith(f"Observation/{obs['id']}/_history/1")

    second = put(fhir, {**obs, "status": "amended"})
    assert second.status_code == 200, second.text
    assert second.json()["meta"]["versionId"] == "2" and second.headers["ETag"] == 'W/"2"'
    third = put(fhir, {**second.json(), "status": "corrected"})
    assert third.json()["meta"]["versionId"] == "3"

    unchanged = put(fhir, {**third.json(), "meta": {}})  # the same content: HAPI makes no new version
    assert unchanged.status_code == 200 and unchanged.json()["meta"]["versionId"] == "3"
    assert fhir.get(f"/Observation/{obs['id']}/_history").json()["total"] == 3


def test_a_put_to_a_new_id_creates_it(fhir: httpx.Client, patient: str):
    new = {**observation(patient), "id": f"put-{uuid.uuid4()}"}
    answer = put(fhir, new)
    assert created(answer)["meta"]["versionId"] == "1"
    assert answer.headers["Location"].endswith(f"Observation/{new['id']}/_history/1")
    assert put(fhir, {**new, "status": "amended"}).status_code == 200


def test_a_stale_if_match_is_refused_in_a_put_and_in_a_transaction(fhir: httpx.Client, patient: str):
    obs = created(post(fhir, "/Observation", observation(patient)))
    newer = put(fhir, {**obs, "status": "amended"}, **{"If-Match": 'W/"1"'})
    assert newer.status_code == 200, newer.text
    stale = put(fhir, {**obs, "status": "corrected"}, **{"If-Match": 'W/"1"'})
    assert stale.status_code == 412, stale.text

    cancel = {**obs, "status": "cancelled"}
    refused = post(fhir, "/", transaction(entry(cancel, "PUT", f"Observation/{obs['id']}", ifMatch='W/"1"')))
    assert refused.status_code == 412, refused.text
    assert fhir.get(f"/Observation/{obs['id']}").json()["status"] == "amended"
    accepted = post(fhir, "/", transaction(entry(cancel, "PUT", f"Observation/{obs['id']}", ifMatch='W/"2"')))
    assert accepted.status_code == 200, accepted.text
    (answer,) = [e["response"] for e in accepted.json()["entry"]]
    assert answer["status"].startswith("200") and answer["location"].endswith("/_history/3")


def test_a_deleted_resource_is_gone_but_its_versions_stay(fhir: httpx.Client, patient: str):
    obs = created(post(fhir, "/Observation", observation(patient)))
    assert fhir.delete(f"/Observation/{obs['id']}").status_code in (200, 204)
    assert fhir.get(f"/Observation/{obs['id']}").status_code == 410
    assert fhir.get(f"/Observation/{obs['id']}/_history/1").json()["status"] == "final"
    history = fhir.get(f"/Observation/{obs['id']}/_history").json()
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]


# -- 2. history ------------------------------------------------------------------------------------------


def test_history_is_newest_first_and_paged_by_count(fhir: httpx.Client, patient: str):
    obs = created(post(fhir, "/Observation", observation(patient)))
    for status in ("amended", "corrected", "cancelled"):
        obs = put(fhir, {**obs, "status": status}).json()
    page = fhir.get(f"/Observation/{obs['id']}/_history", params={"_count": "3"}).json()
    assert [e["resource"]["meta"]["versionId"] for e in page["entry"]] == ["4", "3", "2"]
    following = next(link["url"] for link in page["link"] if link["relation"] == "next")
    rest = fhir.get(following).json()
    assert [e["resource"]["meta"]["versionId"] for e in rest["entry"]] == ["1"]


# -- 3. paging -------------------------------------------------------------------------------------------


def every_page(fhir: httpx.Client, first: dict) -> Iterator[dict]:
    page = first
    while True:
        yield page
        following = [link["url"] for link in page.get("link", []) if link["relation"] == "next"]
        if not following:
            return
        page = fhir.get(following[0]).json()


def test_following_next_gives_every_match_once(fhir: httpx.Client, fhir_base_url: str, patient: str):
    text = f"paged-{uuid.uuid4()}"
    ids = {created(post(fhir, "/Observation", observation(patient, text)))["id"] for _ in range(45)}
    first = fhir.get("/Observation", params={"code:text": text, "subject": patient, "_count": "20"}).json()
    assert first["total"] == 45
    created(post(fhir, "/Observation", observation(patient, text)))  # written between pages: not in this search
    pages = list(every_page(fhir, first))
    assert [len(p["entry"]) for p in pages] == [20, 20, 5]
    seen = [e["resource"]["id"] for p in pages for e in p["entry"]]
    assert len(seen) == len(set(seen)) and set(seen) == ids
    links = [link["url"] for p in pages for link in p["link"]]
    assert all(url.startswith(fhir_base_url) for url in links)

    default = fhir.get("/Observation", params={"code:text": text, "subject": patient}).json()
    assert len(default["entry"]) == 20 and default["total"] == 46  # HAPI's default page size
    counted = fhir.get("/Observation", params={"code:text": text, "subject": patient, "_summary": "count"}).json()
    assert counted["total"] == 46 and "entry" not in counted


def test_sorted_pages_keep_their_order(fhir: httpx.Client, patient: str):
    text = f"sorted-{uuid.uuid4()}"
    for _ in range(7):
        created(post(fhir, "/Observation", observation(patient, text)))
    first = fhir.get("/Observation", params={"code:text": text, "_sort": "-_lastUpdated", "_count": "3"}).json()
    stamps = [e["resource"]["meta"]["lastUpdated"] for p in every_page(fhir, first) for e in p["entry"]]
    assert len(stamps) == 7 and stamps == sorted(stamps, reverse=True)


# -- 4. unknown search parameters ------------------------------------------------------------------------


@pytest.mark.parametrize("params", [{"bogus": "1"}, {"subjekt": "Patient/1"}, {"_sort": "bogus"},
                                    {"subject.bogus": "x"}])
def test_an_unknown_search_parameter_is_refused(fhir: httpx.Client, params: dict):
    refused = fhir.get("/Observation", params=params)
    assert refused.status_code == 400, refused.text
    assert "Unknown" in issue_text(refused)


def test_an_unknown_parameter_in_a_conditional_create_is_refused(fhir: httpx.Client, patient: str):
    refused = post(fhir, "/Observation", observation(patient), **{"If-None-Exist": "bogus=1"})
    assert refused.status_code == 400, refused.text


@pytest.mark.parametrize("params", [
    {"_count": "5"}, {"_sort": "-_lastUpdated"}, {"_summary": "true"}, {"_elements": "status"},
    {"_include": "Observation:subject"}, {"_revinclude": "Provenance:target"}, {"_total": "accurate"},
    {"_format": "json"}, {"_lastUpdated": "ge2020-01-01"}, {"_id": "x"}, {"_tag": "http://a|b"},
    {"_profile": "http://a"}, {"_security": "http://a|b"}, {"_offset": "0"}, {"status": "final,amended"},
    {"code:text": "x"}, {"subject:Patient": "Patient/x"}, {"subject.name": "x"}, {"patient": "Patient/x"},
    {"value-quantity": "gt5"}, {"identifier": "http://a|b"}, {"date": "ge2020-01-01"}, {"status:not": "final"},
])
def test_known_parameters_and_modifiers_are_accepted(fhir: httpx.Client, params: dict):
    found = fhir.get("/Observation", params=params)
    assert found.status_code == 200, found.text
    assert found.json()["resourceType"] == "Bundle"


# -- 5. codes in required bindings -----------------------------------------------------------------------


BOGUS_CODES = [  # (resource type, element, a good code), each written with "bogus" in that element
    ("Observation", "status", "final"), ("Task", "status", "requested"), ("Task", "intent", "order"),
    ("QuestionnaireResponse", "status", "completed"), ("Patient", "gender", "female"), ("Device", "status", "active"),
]


def with_code(resource_type: str, element: str, code: str, patient: str) -> dict:
    minimal = {
        "Observation": observation(patient),
        "Task": {"resourceType": "Task", "status": "requested", "intent": "order", "for": {"reference": patient}},
        "QuestionnaireResponse": {"resourceType": "QuestionnaireResponse", "status": "completed"},
        "Patient": {"resourceType": "Patient"},
        "Device": {"resourceType": "Device"},
    }[resource_type]
    return {**minimal, element: code}


@pytest.mark.parametrize(("resource_type", "element", "good"), BOGUS_CODES)
def test_a_code_outside_its_required_value_set_is_refused(fhir: httpx.Client, patient: str, resource_type: str,
                                                          element: str, good: str):
    refused = post(fhir, f"/{resource_type}", with_code(resource_type, element, "bogus", patient))
    assert refused.status_code == 400, refused.text
    assert "bogus" in issue_text(refused) and f"{resource_type}.{element}" in issue_text(refused)
    created(post(fhir, f"/{resource_type}", with_code(resource_type, element, good, patient)))


def test_a_nested_required_code_is_checked_too(fhir: httpx.Client, patient: str):
    who = {"reference": patient}
    provenance = {"resourceType": "Provenance", "target": [who], "recorded": "2026-01-01T00:00:00Z",
                  "agent": [{"who": who}], "entity": [{"role": "bogus", "what": who}]}
    refused = post(fhir, "/Provenance", provenance)
    assert refused.status_code == 400 and "Provenance.entity" in issue_text(refused), refused.text
    created(post(fhir, "/Provenance", {**provenance, "entity": [{"role": "source", "what": who}]}))


# -- 6. referential integrity ----------------------------------------------------------------------------


def test_a_reference_to_a_missing_resource_is_refused(fhir: httpx.Client, fhir_base_url: str, patient: str):
    refused = post(fhir, "/Observation", observation(f"Patient/missing-{uuid.uuid4()}"))
    assert refused.status_code == 400, refused.text
    assert "Observation.subject" in issue_text(refused) and "not found" in issue_text(refused)
    own_base = [{"reference": f"{fhir_base_url}/Observation/no"}]
    absolute = post(fhir, "/Observation", observation(patient, hasMember=own_base))
    assert absolute.status_code == 400, absolute.text
    update = created(post(fhir, "/Observation", observation(patient)))
    assert put(fhir, {**update, "focus": [{"reference": "Observation/missing"}]}).status_code == 400


def test_references_that_are_not_checked(fhir: httpx.Client, patient: str):
    contained = observation(patient, contained=[{"resourceType": "Device", "id": "d1"}], device={"reference": "#d1"})
    created(post(fhir, "/Observation", contained))
    external = [{"reference": "http://elsewhere.example/fhir/Patient/1"}]
    created(post(fhir, "/Observation", observation(patient, focus=external)))
    logical = [{"identifier": {"system": "http://a", "value": "b"}}]
    created(post(fhir, "/Observation", observation(patient, focus=logical)))


def test_a_transaction_with_a_dangling_reference_writes_nothing(fhir: httpx.Client, patient: str):
    marker = f"tx-{uuid.uuid4()}"
    placeholder = f"urn:uuid:{uuid.uuid4()}"
    later = {"fullUrl": placeholder, **entry({"resourceType": "Device"}, "POST", "Device")}
    refers_forward = entry(observation(patient, marker, device={"reference": placeholder}), "POST", "Observation")
    good = post(fhir, "/", transaction(refers_forward, later))
    assert good.status_code == 200, good.text  # a urn:uuid resolved within the transaction is fine

    dangling = entry(observation(f"Patient/missing-{uuid.uuid4()}", marker), "POST", "Observation")
    refused = post(fhir, "/", transaction(refers_forward, later, dangling))
    assert refused.status_code == 400, refused.text
    assert "not found" in issue_text(refused)
    found = fhir.get("/Observation", params={"code:text": marker, "_summary": "count"}).json()
    assert found["total"] == 1  # only the first transaction's


def test_deleting_a_resource_others_refer_to_conflicts(fhir: httpx.Client, patient: str):
    obs = created(post(fhir, "/Observation", observation(patient)))
    refused = fhir.delete(f"/{patient}")
    assert refused.status_code == 409, refused.text
    assert f"Observation/{obs['id']}" in issue_text(refused)
    assert fhir.get(f"/{patient}").status_code == 200
    assert fhir.delete(f"/Observation/{obs['id']}").status_code in (200, 204)
    assert fhir.delete(f"/{patient}").status_code in (200, 204)


# -- 7. XML ----------------------------------------------------------------------------------------------


def test_xml_in_and_out(fhir: httpx.Client, patient: str):
    body = ('<Patient xmlns="http://hl7.org/fhir"><active value="true"/>'
            '<name><family value="Xml"/></name><gender value="female"/></Patient>')
    answer = fhir.post("/Patient", content=body, headers={"Content-Type": XML, "Accept": XML})
    assert answer.status_code == 201, answer.text
    assert answer.headers["Content-Type"].startswith(XML)
    root = ET.fromstring(answer.content)
    assert root.tag == f"{FHIR_NS}Patient"
    new_id = root.find(f"{FHIR_NS}id").get("value")
    assert fhir.get(f"/Patient/{new_id}").json()["name"][0]["family"] == "Xml"  # JSON stays the default

    by_format = fhir.get(f"/{patient}", params={"_format": "xml"})
    assert by_format.headers["Content-Type"].startswith(XML)
    assert ET.fromstring(by_format.content).tag == f"{FHIR_NS}Patient"
    searched = fhir.get("/Patient", params={"_id": new_id}, headers={"Accept": XML})
    bundle = ET.fromstring(searched.content)
    assert bundle.tag == f"{FHIR_NS}Bundle" and bundle.find(f"{FHIR_NS}total").get("value") == "1"

    error = fhir.get("/Patient", params={"bogus": "1"}, headers={"Accept": XML})
    assert error.status_code == 400 and ET.fromstring(error.content).tag == f"{FHIR_NS}OperationOutcome"
    broken = fhir.post("/Patient", content="<Patient", headers={"Content-Type": XML, "Accept": XML})
    assert broken.status_code == 400 and ET.fromstring(broken.content).tag == f"{FHIR_NS}OperationOutcome"


# -- 8. rest-hook Subscriptions --------------------------------------------------------------------------


@dataclass
class Receiver:
    """A tiny HTTP endpoint on 127.0.0.1 that records what it is sent and answers `status`."""

    url: str = ""
    status: int = 200
    delay: float = 0.0
    got: list[dict] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    record = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            time.sleep(record.delay)
            record.got.append({"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body})
            self.send_response(record.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_PUT = do_POST = _any

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    record.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield record
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def subscribe(fhir: httpx.Client) -> Iterator[Callable[..., dict]]:
    """Makes Subscriptions for one test (on criteria of its own), and deletes them after."""
    made: list[str] = []

    def make(criteria: str, endpoint: str, payload: str | None = "application/fhir+json", **more: object) -> dict:
        channel = {"type": "rest-hook", "endpoint": endpoint, **({"payload": payload} if payload else {}), **more}
        sub = created(post(fhir, "/Subscription", {"resourceType": "Subscription", "status": "requested",
                                                   "reason": "test", "criteria": criteria, "channel": channel}))
        made.append(sub["id"])
        return sub

    yield make
    for sub_id in made:
        fhir.delete(f"/Subscription/{sub_id}")


def response(questionnaire: str, status: str = "completed") -> dict:
    return {"resourceType": "QuestionnaireResponse", "status": status, "questionnaire": questionnaire}


def test_a_subscription_is_activated_and_delivers_matching_resources(fhir: httpx.Client, receiver: Receiver,
                                                                    subscribe: Callable[..., dict]):
    questionnaire = f"http://example.org/Questionnaire/{uuid.uuid4()}"
    sub = subscribe(f"QuestionnaireResponse?status=completed,amended&questionnaire={questionnaire}", receiver.url,
                    header=["Authorization: Bearer s3cret", "X-Test: yes"])
    assert fhir.get(f"/Subscription/{sub['id']}").json()["status"] == "active"

    created(post(fhir, "/QuestionnaireResponse", response(questionnaire, "in-progress")))  # not matching
    created(post(fhir, "/QuestionnaireResponse", response(f"{questionnaire}-other")))  # not matching
    matching = created(post(fhir, "/QuestionnaireResponse", response(questionnaire)))
    wait_for(lambda: receiver.got)
    (got,) = receiver.got
    assert (got["method"], got["path"]) == ("PUT", f"/hook/QuestionnaireResponse/{matching['id']}")
    assert got["headers"]["Authorization"] == "Bearer s3cret" and got["headers"]["X-Test"] == "yes"
    assert orjson.loads(got["body"])["id"] == matching["id"]

    in_transaction = transaction(entry(response(questionnaire, "amended"), "POST", "QuestionnaireResponse"))
    assert post(fhir, "/", in_transaction).status_code == 200
    wait_for(lambda: len(receiver.got) == 2)
    assert orjson.loads(receiver.got[1]["body"])["status"] == "amended"


def test_without_a_payload_the_notification_is_an_empty_post(fhir: httpx.Client, receiver: Receiver,
                                                            subscribe: Callable[..., dict]):
    questionnaire = f"http://example.org/Questionnaire/{uuid.uuid4()}"
    subscribe(f"QuestionnaireResponse?questionnaire={questionnaire}", receiver.url, payload=None)
    created(post(fhir, "/QuestionnaireResponse", response(questionnaire)))
    wait_for(lambda: receiver.got)
    assert [(g["method"], g["path"], g["body"]) for g in receiver.got] == [("POST", "/hook", b"")]


def test_a_slow_endpoint_does_not_slow_the_write(fhir: httpx.Client, receiver: Receiver,
                                                 subscribe: Callable[..., dict]):
    questionnaire = f"http://example.org/Questionnaire/{uuid.uuid4()}"
    subscribe(f"QuestionnaireResponse?questionnaire={questionnaire}", receiver.url)
    receiver.delay = 2.0
    start = time.monotonic()
    created(post(fhir, "/QuestionnaireResponse", response(questionnaire)))
    assert time.monotonic() - start < 1.5
    wait_for(lambda: receiver.got)


def test_failed_deliveries_are_retried_then_the_subscription_is_in_error(fhir: httpx.Client, receiver: Receiver,
                                                                         subscribe: Callable[..., dict]):
    questionnaire = f"http://example.org/Questionnaire/{uuid.uuid4()}"
    sub = subscribe(f"QuestionnaireResponse?questionnaire={questionnaire}", receiver.url)
    receiver.status = 500
    created(post(fhir, "/QuestionnaireResponse", response(questionnaire)))
    wait_for(lambda: fhir.get(f"/Subscription/{sub['id']}").json()["status"] == "error")
    assert len(receiver.got) > 1  # retried
    assert "500" in fhir.get(f"/Subscription/{sub['id']}").json()["error"]


def test_invalid_criteria_are_refused(fhir: httpx.Client, receiver: Receiver):
    for criteria in ("Nonsense?status=completed", "QuestionnaireResponse?bogus=1"):
        channel = {"type": "rest-hook", "endpoint": receiver.url}
        refused = post(fhir, "/Subscription", {"resourceType": "Subscription", "status": "requested", "reason": "test",
                                               "criteria": criteria, "channel": channel})
        assert 400 <= refused.status_code < 500 and refused.status_code != 404, refused.text


@local_only
def test_notifications_can_be_dropped_on_purpose(fhir: httpx.Client, receiver: Receiver,
                                                 subscribe: Callable[..., dict]):
    questionnaire = f"http://example.org/Questionnaire/{uuid.uuid4()}"
    subscribe(f"QuestionnaireResponse?questionnaire={questionnaire}", receiver.url)
    assert fhir.post("/__admin/subscriptions", params={"drop": "true"}).json()["drop"] is True
    try:
        dropped = fhir.get("/__admin/subscriptions").json()["dropped"]
        created(post(fhir, "/QuestionnaireResponse", response(questionnaire)))
        assert fhir.get("/__admin/subscriptions").json()["dropped"] == dropped + 1
    finally:
        assert fhir.post("/__admin/subscriptions", params={"drop": "false"}).json()["drop"] is False
    created(post(fhir, "/QuestionnaireResponse", response(questionnaire)))
    wait_for(lambda: receiver.got)
    time.sleep(0.3)
    assert len(receiver.got) == 1  # the dropped one never came
