"""The CDS Hooks 2.0 service: discovery, signed-JWT checks, cards per outcome, prefetch and fhirServer,
suggestions applied to a real FHIR server, and feedback recorded on the Task."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir.resources.R4B.task import Task
from starlette.testclient import TestClient

from plugin.app import create_app
from plugin.ehr import cds_auth, cds_cards
from plugin.ehr.cds_hooks import PREFETCH, QUERIES
from plugin.screening import systems
from plugin.settings import ServiceSettings
from plugin.stores.sqlite import SqliteStore
from tests.cds_keys import ISSUER, JwksServer, Keys, reply_json, token
from tests.fhir_helpers import EXAMPLES, tasks

SERVICE = "/cds-services/backpain-screening"
FEEDBACK = f"{SERVICE}/feedback"
AUD = f"http://127.0.0.1:8000{SERVICE}"  # the listen URL (host and port settings): no public URL set
FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
REFUSED = {"resourceType": "OperationOutcome",
           "issue": [{"severity": "error", "code": "login", "diagnostics": "Access refused."}]}


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def jwks(keys: Keys) -> Iterator[JwksServer]:
    with JwksServer({"/jwks.json": keys.jwks(), "/other.json": keys.jwks()}).running() as server:
        yield server


@pytest.fixture
def make_client(tmp_path: Path, jwks: JwksServer) -> Callable[..., Any]:
    @contextmanager
    def make(**settings: Any) -> Iterator[TestClient]:
        values: dict[str, Any] = {"store_path": tmp_path / "store.sqlite3",
                                  "cds_issuers": (f"{ISSUER}|{jwks.url}/jwks.json",), **settings}
        with TestClient(create_app(ServiceSettings(**values))) as client:
            yield client

    return make


@pytest.fixture
def client(make_client: Callable[..., Any]) -> Iterator[TestClient]:
    with make_client() as made:
        yield made


def hook(patient_id: str = "p1", **extra: Any) -> dict:
    return {"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
            "context": {"patientId": patient_id, "userId": "Practitioner/dr-1"}, **extra}


def call(client: TestClient, keys: Keys, body: dict, *, aud: str = AUD, **signing: Any) -> httpx.Response:
    bearer = token(keys, aud, **signing)
    return client.post(SERVICE, content=orjson.dumps(body),
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {bearer}"})


def cards_of(client: TestClient, keys: Keys, body: dict) -> list[dict]:
    answer = call(client, keys, body)
    assert answer.status_code == 200, answer.text
    return answer.json()["cards"]


def example(name: str, patient: str, **changes: Any) -> dict:
    qr = orjson.loads((EXAMPLES / name).read_bytes())
    qr.update(id=f"{name.removesuffix('.json')}-{uuid.uuid4()}", subject={"reference": patient}, **changes)
    return qr


def ingest(client: TestClient, qr: dict) -> None:
    answer = client.post("/QuestionnaireResponse", content=orjson.dumps(qr), headers=FHIR_JSON)
    assert answer.status_code in (200, 201), answer.text


def check_card(card: dict) -> None:
    """What every card must be, by the CDS Hooks 2.0 card attributes."""
    assert len(card["summary"]) < 140
    assert card["indicator"] in ("info", "warning", "critical")
    assert card["source"]["label"] and card["source"]["url"].startswith("http")
    uuid.UUID(card["uuid"])
    assert all(v not in (None, "", [], {}) for v in card.values())
    for suggestion in card.get("suggestions", []):
        assert card["selectionBehavior"] == "at-most-one" and suggestion["label"]
        for action in suggestion["actions"]:
            assert action["type"] in ("create", "update") and action["description"]
            model = {"ServiceRequest": ServiceRequest, "Task": Task}[action["resource"]["resourceType"]]
            model.model_validate(action["resource"])
    for reason in card.get("overrideReasons", []):
        assert reason["display"] and reason["code"]


# -- discovery ------------------------------------------------------------------------------------


def test_discovery_lists_the_patient_view_service_without_a_token(client: TestClient):
    answer = client.get("/cds-services")
    assert answer.status_code == 200
    (svc,) = answer.json()["services"]
    assert svc["id"] == "backpain-screening" and svc["hook"] == "patient-view"
    assert svc["title"] and svc["description"]
    assert set(svc["prefetch"]) == {"outcome", "findings", "tasks"}
    assert all("{{context.patientId}}" in t for t in svc["prefetch"].values())


def test_the_prefetch_templates_run_on_the_embedded_store(tmp_path: Path):
    async def run() -> None:
        async with SqliteStore(tmp_path / "s.sqlite3") as store:
            for template in PREFETCH.values():
                resource_type, _, query = template.replace("{{context.patientId}}", "p1").partition("?")
                page = await store.search_page(resource_type, dict(p.split("=", 1) for p in query.split("&")))
                assert page["resourceType"] == "Bundle"

    asyncio.run(run())


def run_template(fhir: httpx.Client, template: str, patient_id: str) -> httpx.Response:
    """A template run as a CDS Client runs it: its values percent-encoded (HAPI's Tomcat answers a bare `|` in a
    query with a 400 HTML page)."""
    path, _, query = template.replace("{{context.patientId}}", patient_id).partition("?")
    return fhir.get("/" + path, params=[tuple(p.split("=", 1)) for p in query.split("&")])


def test_the_prefetch_templates_run_on_the_fhir_server(fhir: httpx.Client, patient: str):
    for template in PREFETCH.values():
        answer = run_template(fhir, template, patient.split("/")[1])
        assert answer.status_code == 200, answer.text


# -- the JWT --------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_a_token_signed_with_rs384_or_es384_by_an_allowed_issuer_is_let_in(client, keys, jwks, alg):
    assert call(client, keys, hook(), alg=alg).status_code == 200
    assert call(client, keys, hook(), alg=alg, jku=f"{jwks.url}/jwks.json").status_code == 200


def _forged(keys: Keys, jwks: JwksServer) -> dict[str, str]:
    unsigned = jwt.encode({"iss": ISSUER, "aud": AUD, "exp": 9999999999, "iat": 1, "jti": "x"}, None,
                          algorithm="none", headers={"kid": "ec-1"})
    good = token(keys, AUD)
    head, body, signature = good.split(".")
    tampered_body = jwt.utils.base64url_encode(orjson.dumps({**jwt.decode(good, options={"verify_signature": False}),
                                                             "tenant": "other"})).decode()
    return {
        "RS256 (not allowed)": token(keys, AUD, alg="RS256"),
        "alg none": unsigned,
        "HS384 (symmetric)": jwt.encode({"iss": ISSUER, "aud": AUD, "exp": 9999999999, "iat": 1, "jti": "y"},
                                        "a-shared-secret-of-enough-length-for-hs384-keys-xxxxxxxxxxxxxxxx",
                                        algorithm="HS384", headers={"kid": "ec-1"}),
        "jku not allowed": token(keys, AUD, jku=f"{jwks.url}/other.json"),
        "unknown issuer": token(keys, AUD, iss="https://evil.example.org"),
        "wrong aud": token(keys, "http://testserver/cds-services/other-service"),
        "expired": token(keys, AUD, exp=1_600_000_000, iat=1_599_999_000),
        "missing jti": token(keys, AUD, drop=("jti",)),
        "missing exp": token(keys, AUD, drop=("exp",)),
        "missing iat": token(keys, AUD, drop=("iat",)),
        "valid for days": token(keys, AUD, exp=int(time.time()) + 5 * 86400),
        "unknown kid": token(keys, AUD, kid="nobody"),
        "tampered claims": f"{head}.{tampered_body}.{signature}",
        "tampered signature": f"{head}.{body}.{signature[:-4]}AAAA",
        "RSA key named for ES384": token(keys, AUD, alg="ES384", kid="rsa-1"),
    }


def test_anything_but_a_valid_signed_jwt_is_a_bare_401(client, keys, jwks):
    for name, bad in _forged(keys, jwks).items():
        answer = client.post(SERVICE, content=orjson.dumps(hook()), headers={"Authorization": f"Bearer {bad}"})
        assert answer.status_code == 401, name
        assert answer.json() == REFUSED, name  # nothing says what was wrong
        assert answer.headers["www-authenticate"] == "Bearer"
    for header in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}, {"Authorization": "Bearer x.y"}):
        answer = client.post(SERVICE, content=orjson.dumps(hook()), headers=header)
        assert answer.status_code == 401 and answer.json() == REFUSED


def test_a_replayed_token_is_refused(client, keys):
    bearer = token(keys, AUD)
    headers = {"Authorization": f"Bearer {bearer}"}
    assert client.post(SERVICE, content=orjson.dumps(hook()), headers=headers).status_code == 200
    again = client.post(SERVICE, content=orjson.dumps(hook()), headers=headers)
    assert again.status_code == 401 and again.json() == REFUSED


def test_the_jwk_set_is_fetched_once_and_kept(make_client, keys, jwks):
    before = jwks.hits["/jwks.json"]
    with make_client() as fresh:
        for alg in ("ES384", "RS384", "ES384"):
            assert call(fresh, keys, hook(), alg=alg).status_code == 200
    assert jwks.hits["/jwks.json"] == before + 1


def test_a_rotated_key_is_fetched_and_a_jwks_outage_keeps_the_cached_set(keys):
    """Key rotation without a restart; an unknown kid refetches at most every REFETCH_AFTER seconds."""
    new_key = Keys()
    rotated = {"keys": [{**k, "kid": "ec-2"} for k in new_key.jwks()["keys"] if k["kty"] == "EC"]}
    server = JwksServer({"/jwks.json": keys.jwks()})
    now = [time.time()]
    verifier = cds_auth.Verifier(cds_auth.Issuers.parse([f"{ISSUER}|{server.url}/jwks.json"]), clock=lambda: now[0])

    async def verify(bearer: str) -> str:
        try:
            await verifier.verify(f"Bearer {bearer}", AUD)
            return "ok"
        except cds_auth.Refused as refused:
            return refused.reason

    async def run() -> None:
        with server.running():
            assert await verify(token(keys, AUD)) == "ok"
            server.sets["/jwks.json"] = {"keys": keys.jwks()["keys"] + rotated["keys"]}
            assert await verify(token(new_key, AUD, kid="ec-2")) == "unknown-key"  # fetched just now: not again
            assert server.hits["/jwks.json"] == 1
            now[0] += cds_auth.REFETCH_AFTER + 1
            assert await verify(token(new_key, AUD, kid="ec-2")) == "ok"
            assert server.hits["/jwks.json"] == 2
        now[0] += cds_auth.JWKS_TTL + 1  # the set is stale and its server is gone: the cached keys still serve
        assert await verify(token(keys, AUD)) == "ok"
        assert await verify(token(keys, AUD, kid="gone")) == "unknown-key"

    asyncio.run(run())


def test_with_no_issuer_configured_every_call_is_refused(make_client, keys):
    with make_client(cds_issuers=()) as closed:
        assert call(closed, keys, hook()).status_code == 401


def test_a_jwk_set_is_trusted_over_https_or_on_this_machine_only(make_client, keys):
    """Over plain http across a network, whoever is on the path could serve their own keys."""
    assert cds_auth.Issuers.parse([f"{ISSUER}|https://ehr.example.org/jwks", f"{ISSUER}|http://localhost:8/k",
                                   f"{ISSUER}|http://[::1]:8/k"]).jwks[ISSUER][0] == "https://ehr.example.org/jwks"
    for url in ("http://ehr.example.org/jwks", "http://10.0.0.5/jwks"):
        with pytest.raises(ValueError, match="must be https"):
            cds_auth.Issuers.parse([f"{ISSUER}|{url}"])
    with make_client(cds_issuers=(f"{ISSUER}|http://ehr.example.org/jwks",)) as plain:
        assert call(plain, keys, hook()).status_code == 401


def test_aud_is_the_public_url_when_one_is_set(make_client, keys):
    with make_client(public_url="https://screen.example.org/") as behind_proxy:
        assert call(behind_proxy, keys, hook(), aud=f"https://screen.example.org{SERVICE}").status_code == 200
        assert call(behind_proxy, keys, hook()).status_code == 401  # the internal URL is not the audience


def test_the_feedback_endpoint_needs_its_own_audience(client, keys):
    body = orjson.dumps({"feedback": [{"card": str(uuid.uuid4()), "outcome": "overridden",
                                       "outcomeTimestamp": "2026-11-21T10:00:00Z"}]})
    for aud in (AUD, None):
        headers = {"Authorization": f"Bearer {token(keys, aud or AUD + '/feedback')}"} if aud else {}
        assert client.post(FEEDBACK, content=body, headers=headers).status_code == 401
    unknown = client.post(FEEDBACK, content=body, headers={"Authorization": f"Bearer {token(keys, AUD + '/feedback')}"})
    assert unknown.status_code == 404 and unknown.json()["issue"][0]["code"] == "not-found"


# -- bad requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("body, where", [
    ({"hook": "order-sign", "hookInstance": "i", "context": {"patientId": "p1"}}, "hook"),
    ({"hook": "patient-view", "hookInstance": "i", "context": {}}, "context.patientId"),
    ({"hook": "patient-view", "hookInstance": "i", "context": {"patientId": "p1"}, "prefetch": {"outcome": []}},
     "prefetch.outcome"),
    ({"hook": "patient-view", "hookInstance": "i", "context": {"patientId": "p1"},
      "fhirAuthorization": {"access_token": "t", "token_type": "Bearer"}}, "fhirServer"),
    ({"hook": "patient-view", "hookInstance": "i", "context": {"patientId": "p1", "userId": "Device/x"}},
     "context.userId"),
    ({"hook": "patient-view", "hookInstance": "i", "context": {"patientId": "p1"},
      "prefetch": {"outcome": {"resourceType": "Bundle", "entry": [{"fullUrl": "urn:uuid:x"}]}}}, "prefetch.outcome"),
    ({"hook": "patient-view", "hookInstance": "i", "context": {"patientId": "p1"},
      "prefetch": {"tasks": {"resourceType": "Bundle", "entry": "none"}}}, "prefetch.tasks"),
])
def test_a_malformed_hook_request_is_a_400_naming_the_field(client, keys, body, where):
    answer = call(client, keys, body)
    assert answer.status_code == 400
    assert where in [e for i in answer.json()["issue"] for e in i.get("expression", [])]


def test_a_body_that_is_not_json_is_a_400(client, keys):
    answer = client.post(SERVICE, content=b"{not json", headers={"Authorization": f"Bearer {token(keys, AUD)}"})
    assert answer.status_code == 400 and answer.json()["resourceType"] == "OperationOutcome"


# -- cards from the plugin's own store ----------------------------------------------------------------


CASES = [  # example, strategy, [(indicator, words in the summary, task code)]
    ("qr-emergency.json", None, [("critical", "Emergency", "clinical-review")]),
    ("qr-urgent.json", None, [("warning", "Urgent", "clinical-review")]),
    ("qr-refer-asas.json", None, [("warning", "rheumatology referral", "306290009")]),
    ("qr-nice-test-hla-b27.json", "nice-ng65", [("info", "HLA-B27", "hla-b27-test")]),
]


@pytest.mark.parametrize("name, strategy, expected", CASES)
def test_a_card_per_task_awaiting_a_decision(make_client, keys, name, strategy, expected):
    with make_client(strategy=strategy) as client:
        qr = example(name, "Patient/p1")
        ingest(client, qr)
        found = cards_of(client, keys, hook())
        assert [(c["indicator"], c["suggestions"][0]["actions"][-1]["resource"]["code"]["coding"][0]["code"])
                for c in found] == [(i, code) for i, _, code in expected]
        for card, (_, words, _) in zip(found, expected):
            check_card(card)
            assert words in card["summary"]
            assert card["links"] == [{"label": "Open the screening results", "type": "absolute",
                                      "url": f"http://testserver/results/{qr['id']}"}]
            task = card["suggestions"][0]["actions"][-1]["resource"]
            assert task["status"] == "accepted" and task["owner"] == {"reference": "Practitioner/dr-1"}
            assert card["uuid"] == next(i["value"] for i in task["identifier"] if i["system"] == systems.SID_TASK)
            assert "Criteria met" in card["detail"] and "Patient/" not in card["detail"]


def test_the_details_name_the_criteria_met(make_client, keys):
    with make_client() as client:
        ingest(client, example("qr-emergency.json", "Patient/p1"))
        ingest(client, example("qr-refer-asas.json", "Patient/p2"))
        (review,) = cards_of(client, keys, hook("p1"))
        assert "- Saddle numbness or tingling" in review["detail"] and "NICE" in review["detail"]
        assert "screening of 2026-11-20" in review["detail"]  # when the patient answered, not when it was scored
        assert [a["type"] for a in review["suggestions"][0]["actions"]] == ["update"]  # a review orders nothing
        (referral,) = cards_of(client, keys, hook("p2"))
        assert "- HLA-B27 positive\n- Peripheral arthritis, enthesitis or dactylitis" in referral["detail"]
        assert "Source: Poddubnyy D et al." in referral["detail"]
        create, update = referral["suggestions"][0]["actions"]
        order = create["resource"]
        assert order["code"]["coding"][0] == {"system": systems.SNOMED, "code": "306290009",
                                              "display": "Referral to rheumatologist"}
        assert (order["status"], order["intent"], order["subject"]) == ("active", "order", {"reference": "Patient/p2"})
        assert order["reasonReference"][0]["reference"].startswith("Observation/")
        assert order["requester"] == {"reference": "Practitioner/dr-1"}
        assert update["resource"]["output"][0]["valueReference"]["identifier"] == order["identifier"][0]


def test_the_hla_b27_order_is_a_lab_order_coded_loinc_26028_1(make_client, keys):
    """A lab system routes the order by its LOINC code (mappings/external-codes.yaml); ours stays first."""
    with make_client(strategy="nice-ng65") as client:
        ingest(client, example("qr-nice-test-hla-b27.json", "Patient/p1"))
        (card,) = cards_of(client, keys, hook())
        order = card["suggestions"][0]["actions"][0]["resource"]
        assert order["resourceType"] == "ServiceRequest"
        assert [(c["system"], c["code"]) for c in order["code"]["coding"]] == [
            (systems.RESULTS, "hla-b27-test"), ("http://loinc.org", "26028-1")]
        assert order["category"][0]["coding"][0]["code"] == "108252007"


@pytest.mark.parametrize("name", ["qr-no-referral.json", "qr-not-applicable.json", None])
def test_no_card_when_there_is_nothing_to_say(client, keys, name):
    if name:
        ingest(client, example(name, "Patient/p1"))
    assert cards_of(client, keys, hook()) == []


def test_an_indeterminate_screening_is_an_info_card_naming_what_to_ask(client, keys):
    qr = example("qr-indeterminate.json", "Patient/p1")
    ingest(client, qr)
    (card,) = cards_of(client, keys, hook())
    check_card(card)
    assert card["indicator"] == "info" and "incomplete" in card["summary"] and "suggestions" not in card
    assert "Not answered" in card["detail"] and card["links"][0]["url"].endswith(f"/results/{qr['id']}")
    # the clinician's tests left empty are not done, not questions to ask the patient (H19)
    assert "HLA-B27" not in card["detail"] and "CRP" not in card["detail"], card["detail"]


def test_an_earlier_task_still_awaiting_a_decision_after_a_benign_screening_is_info(client, keys):
    ingest(client, example("qr-refer-asas.json", "Patient/p1", authored="2026-10-01T09:00:00Z"))
    ingest(client, example("qr-no-referral.json", "Patient/p1", authored="2026-11-20T09:00:00Z"))
    (card,) = cards_of(client, keys, hook())
    check_card(card)
    assert card["indicator"] == "info" and card["summary"].startswith("Earlier back-pain screening")
    assert "No referral indicated" in card["detail"]


def test_an_earlier_red_flag_review_nobody_took_up_stays_a_warning_after_a_benign_screening(client, keys):
    ingest(client, example("qr-emergency.json", "Patient/p1", authored="2026-10-01T09:00:00Z"))
    ingest(client, example("qr-no-referral.json", "Patient/p1", authored="2026-11-20T09:00:00Z"))
    (card,) = cards_of(client, keys, hook())
    check_card(card)
    assert card["indicator"] == "warning" and card["summary"].startswith("Earlier back-pain screening")


def test_a_task_already_accepted_makes_no_card(client, keys):
    ingest(client, example("qr-refer-asas.json", "Patient/p1"))
    (card,) = cards_of(client, keys, hook())
    feedback = {"feedback": [{"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-11-21T10:00:00Z",
                              "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}]}]}
    answer = client.post(FEEDBACK, content=orjson.dumps(feedback),
                         headers={"Authorization": f"Bearer {token(keys, AUD + '/feedback')}"})
    assert answer.status_code == 200, answer.text
    assert cards_of(client, keys, hook()) == []


def test_the_smart_link_when_the_ehr_has_the_plugin_as_a_smart_app(make_client, keys):
    with make_client(smart_launch_client_id="screening-app", public_url="https://screen.example.org") as client:
        qr = example("qr-urgent.json", "Patient/p1")
        ingest(client, qr)
        bearer = token(keys, f"https://screen.example.org{SERVICE}")
        answer = client.post(SERVICE, content=orjson.dumps(hook()), headers={"Authorization": f"Bearer {bearer}"})
        (link,) = answer.json()["cards"][0]["links"]
        assert link["type"] == "smart" and link["url"] == "https://screen.example.org/launch"
        assert orjson.loads(link["appContext"]) == {"questionnaireResponse": f"QuestionnaireResponse/{qr['id']}"}


def test_with_an_ingest_token_the_plain_link_opens_only_its_own_results(make_client, keys):
    """A browser cannot send the bearer token the results view needs: the card's link carries a signed access."""
    with make_client(ingest_token="ingest-secret", session_secret="s" * 32) as client:
        authorised = {**FHIR_JSON, "Authorization": "Bearer ingest-secret"}
        qr, other = example("qr-urgent.json", "Patient/p1"), example("qr-refer-asas.json", "Patient/p2")
        for response in (qr, other):
            assert client.post("/QuestionnaireResponse", content=orjson.dumps(response),
                               headers=authorised).status_code == 201
        (link,) = cards_of(client, keys, hook())[0]["links"]
        path, access = link["url"].removeprefix("http://testserver").split("?access=")
        assert link["type"] == "absolute" and path == f"/results/{qr['id']}"
        html = {"Accept": "text/html"}
        opened = client.get(link["url"], headers=html)
        assert opened.status_code == 200 and "urgent-assessment" in opened.text
        assert client.get(path, headers=html).status_code == 401  # without it: the token is still needed
        # A link for another response, or tampered with: the results' own 403 page (an expired link likewise).
        assert client.get(f"/results/{other['id']}?access={access}", headers=html).status_code == 403
        assert client.get(f"{path}?access={access[:-2]}xx", headers=html).status_code == 403


# -- prefetch ---------------------------------------------------------------------------------------


def prefetched(store_path: Path, patient_id: str) -> dict:
    """What a CDS Client would prefetch with the service's templates, run against a real store."""
    async def run() -> dict:
        async with SqliteStore(store_path) as store:
            found = {}
            for key, (resource_type, params) in QUERIES.items():
                params = {k: v.replace("{{context.patientId}}", patient_id) for k, v in params.items()}
                page = await store.search_page(resource_type, params)
                found[key] = page if page.get("entry") else None
            return found

    return asyncio.run(run())


@pytest.mark.parametrize("name, strategy, indicators", [
    *((name, strategy, [i for i, _, _ in expected]) for name, strategy, expected in CASES),
    ("qr-indeterminate.json", None, ["info"]), ("qr-no-referral.json", None, []),
    ("qr-not-applicable.json", "nice-ng65", [])])
def test_prefetch_gives_the_same_cards_as_the_store(make_client, keys, tmp_path, name, strategy, indicators):
    with make_client(strategy=strategy) as client:
        ingest(client, example(name, "Patient/p1"))
        from_store = cards_of(client, keys, hook())
        prefetch = prefetched(tmp_path / "store.sqlite3", "p1")
        assert prefetch["outcome"] and prefetch["findings"] and bool(prefetch["tasks"]) == (name in dict(
            (n, e) for n, _, e in CASES))
        from_prefetch = cards_of(client, keys, hook(prefetch=prefetch))
        assert timeless(from_prefetch) == timeless(from_store)
        assert [c["indicator"] for c in from_prefetch] == indicators


def timeless(cards: list[dict]) -> list[dict]:
    """Cards without the moment they were made (an accepted Task's lastModified, an order's authoredOn)."""
    for card in cards:
        for suggestion in card.get("suggestions", []):
            for action in suggestion["actions"]:
                action["resource"].pop("lastModified", None)
                if action["resource"]["resourceType"] == "ServiceRequest":
                    action["resource"].pop("authoredOn")
    return cards


def test_prefetch_is_used_instead_of_the_store(client, keys):
    ingest(client, example("qr-emergency.json", "Patient/p1"))
    nothing = {"outcome": None, "findings": None, "tasks": None}  # null: the client found nothing
    assert cards_of(client, keys, hook(prefetch=nothing)) == []


def test_prefetch_about_another_patient_is_ignored(client, keys, tmp_path):
    ingest(client, example("qr-emergency.json", "Patient/p1"))
    other = prefetched(tmp_path / "store.sqlite3", "p1")
    assert cards_of(client, keys, hook("p2", prefetch=other)) == []


def test_a_prefetch_key_left_out_with_no_fhir_server_is_a_412(client, keys):
    answer = call(client, keys, hook(prefetch={"outcome": None}))
    assert answer.status_code == 412 and "findings" in answer.json()["issue"][0]["diagnostics"]


# -- the EHR's FHIR server ---------------------------------------------------------------------------


@pytest.fixture
def on_fhir_server(fhir_base_url: str, make_client: Callable[..., Any]) -> Iterator[TestClient]:
    with make_client(fhir_base_url=fhir_base_url) as client:
        yield client


def test_fhir_server_fallback_reads_the_ehr_and_suggestions_apply_there(
        client, keys, fhir: httpx.Client, fhir_base_url: str, patient: str, make_client):
    with make_client(fhir_base_url=fhir_base_url) as writer:  # the results are on the EHR's server only
        ingest(writer, example("qr-refer-asas.json", patient))
    practitioner = fhir.post("/Practitioner", content=orjson.dumps({"resourceType": "Practitioner"})).json()["id"]
    body = hook(patient.split("/")[1], fhirServer=fhir_base_url,
                fhirAuthorization={"access_token": "opaque", "token_type": "Bearer", "expires_in": 300,
                                   "scope": "patient/Observation.read patient/Task.read", "subject": "backpain"})
    body["context"]["userId"] = f"Practitioner/{practitioner}"
    assert cards_of(client, keys, hook(patient.split("/")[1])) == []  # the plugin's own store knows nothing
    (card,) = cards_of(client, keys, body)
    check_card(card)
    create, update = card["suggestions"][0]["actions"]
    made = fhir.post("/ServiceRequest", content=orjson.dumps(create["resource"]))
    assert made.status_code == 201, made.text
    ServiceRequest.model_validate(made.json())
    task = update["resource"]
    put = fhir.put(f"/Task/{task['id']}", content=orjson.dumps(task),
                   headers={"If-Match": f'W/"{task["meta"]["versionId"]}"'})
    assert put.status_code == 200, put.text
    (stored,) = tasks(fhir, patient)
    assert stored["status"] == "accepted" and stored["owner"]["reference"] == f"Practitioner/{practitioner}"
    Task.model_validate(stored)
    assert cards_of(client, keys, body) == []  # accepted: nothing more to say


class RecordingFhir(ThreadingHTTPServer):
    """A FHIR server that holds nothing and keeps the Authorization header of each search it is sent."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.seen.append((self.path, self.headers.get("Authorization")))
                reply_json(self, 200, {"resourceType": "Bundle", "type": "searchset", "total": 0},
                           "application/fhir+json")

            def log_message(self, *_: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_only_what_was_not_prefetched_is_fetched_with_the_clients_token(client, keys):
    server = RecordingFhir()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/fhir"
        body = hook(fhirServer=base, prefetch={"outcome": None},
                    fhirAuthorization={"access_token": "ehr-token-1", "token_type": "Bearer", "expires_in": 300,
                                       "scope": "patient/Observation.rs patient/Task.rs", "subject": "backpain"})
        assert cards_of(client, keys, body) == []
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(path.split("?")[0] for path, _ in server.seen) == ["/fhir/Observation", "/fhir/Task"]
    assert {auth for _, auth in server.seen} == {"Bearer ehr-token-1"}
    assert any("patient=p1" in path and "red-flags" in path for path, _ in server.seen)


def test_members_the_findings_lacked_are_read_from_the_fhir_server(
        client, keys, fhir: httpx.Client, fhir_base_url: str, patient: str, make_client):
    with make_client(fhir_base_url=fhir_base_url) as writer:
        ingest(writer, example("qr-refer-asas.json", patient))
    patient_id = patient.split("/")[1]
    prefetch = {key: run_template(fhir, PREFETCH[key], patient_id).json()
                for key in ("outcome", "tasks")}
    assert prefetch["outcome"]["entry"] and prefetch["tasks"]["entry"]
    without = cards_of(client, keys, hook(patient_id, prefetch={**prefetch, "findings": None}))
    with_server = cards_of(client, keys, hook(patient_id, prefetch={**prefetch, "findings": None},
                                              fhirServer=fhir_base_url))
    assert "Criteria met: " in without[0]["detail"] and "Criteria met (" not in without[0]["detail"]  # the Task's
    detail = with_server[0]["detail"]
    assert "Criteria met (ASAS-endorsed" in detail and "- HLA-B27 positive" in detail


def test_a_null_fhir_authorization_is_no_token(client, keys):
    server = RecordingFhir()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/fhir"
        assert cards_of(client, keys, hook(fhirServer=base, fhirAuthorization=None)) == []
    finally:
        server.shutdown()
        server.server_close()
    assert len(server.seen) == 3 and {auth for _, auth in server.seen} == {None}


def test_an_unreachable_fhir_server_is_a_412(client, keys):
    answer = call(client, keys, hook(fhirServer="http://127.0.0.1:9/fhir"))
    assert answer.status_code == 412


def test_feedback_is_recorded_on_the_task_once(on_fhir_server, keys, fhir: httpx.Client, patient: str):
    client = on_fhir_server
    ingest(client, example("qr-refer-asas.json", patient))
    (card,) = cards_of(client, keys, hook(patient.split("/")[1]))
    accepted = {"feedback": [{"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-11-21T10:00:00Z",
                              "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}]}]}
    for _ in range(2):
        answer = client.post(FEEDBACK, content=orjson.dumps(accepted),
                             headers={"Authorization": f"Bearer {token(keys, AUD + '/feedback')}"})
        assert answer.status_code == 200, answer.text
    (task,) = tasks(fhir, patient)
    Task.model_validate(task)
    assert task["status"] == "accepted" and task["meta"]["versionId"] == "2"  # the repeat changed nothing
    (note,) = task["note"]
    assert note["time"] == "2026-11-21T10:00:00Z" and "accepted" in note["text"] and note["authorString"]


def test_overridden_feedback_rejects_the_task_with_its_reason(on_fhir_server, keys, fhir: httpx.Client, patient: str):
    client = on_fhir_server
    ingest(client, example("qr-emergency.json", patient))
    (card,) = cards_of(client, keys, hook(patient.split("/")[1]))
    reason = card["overrideReasons"][0]
    overridden = {"feedback": [{"card": f"urn:uuid:{card['uuid']}", "outcome": "overridden",
                                "outcomeTimestamp": "2026-11-21T10:05:00+01:00",
                                "overrideReason": {"reason": reason, "userComment": "Seen in A&E this morning."}}]}
    answer = client.post(FEEDBACK, content=orjson.dumps(overridden),
                         headers={"Authorization": f"Bearer {token(keys, AUD + '/feedback')}"})
    assert answer.status_code == 200, answer.text
    (task,) = tasks(fhir, patient)
    Task.model_validate(task)
    assert task["status"] == "rejected"
    assert task["statusReason"] == {"coding": [reason], "text": reason["display"]}
    assert "Seen in A&E this morning." in task["note"][0]["text"]
    assert cards_of(client, keys, hook(patient.split("/")[1])) == []


@pytest.mark.parametrize("body", [
    {}, {"feedback": []}, {"feedback": [{"card": "not-a-uuid", "outcome": "accepted"}]},
    {"feedback": [{"card": str(uuid.uuid4()), "outcome": "maybe", "outcomeTimestamp": "2026-11-21T10:00:00Z"}]},
    {"feedback": [{"card": str(uuid.uuid4()), "outcome": "accepted", "outcomeTimestamp": "2026-11-21T10:00:00Z"}]},
    {"feedback": [{"card": str(uuid.uuid4()), "outcome": "overridden", "outcomeTimestamp": "2026-11-21"}]},
    {"feedback": [{"card": str(uuid.uuid4()), "outcome": "overridden", "outcomeTimestamp": "2026-11-21T10:00:00Z",
                   "overrideReason": {"reason": {"display": "no code"}}}]},
])
def test_bad_feedback_is_a_400(client, keys, body):
    answer = client.post(FEEDBACK, content=orjson.dumps(body),
                         headers={"Authorization": f"Bearer {token(keys, AUD + '/feedback')}"})
    assert answer.status_code == 400 and answer.json()["resourceType"] == "OperationOutcome"


# -- the pure card builder ------------------------------------------------------------------------------


def test_every_summary_is_under_140_characters_and_markdown_is_escaped():
    assert all(len(k.summary) < 140 for k in cds_cards.KINDS.values())
    assert len(cds_cards.INDETERMINATE_SUMMARY) < 140
    assert len(cds_cards.shorten("x" * 300)) < 140
    assert cds_cards._md("[click](https://evil) <img> *bold*") == \
        "\\[click\\]\\(https\u2060://evil\\) \\<img\\> \\*bold\\*"
