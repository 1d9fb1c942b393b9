"""SMART Backend Services against a real OAuth 2.0 authorization server and a FHIR server that takes only its tokens.

The authorization server is npm `oidc-provider` (tests/oauth_server/): client_credentials with private_key_jwt
client assertions, resource indicators so that access tokens are JWTs for the FHIR server's audience. The FHIR
server is HAPI behind SMART Backend Services (conftest's `smart_hapi`, tests/README.md): it serves
`.well-known/smart-configuration`, refuses a request without a valid token of that issuer (401) and one whose
scopes do not cover it (403).
The server validating the plugin's client assertion is the main proof that its claims are right.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import orjson
import pytest

from plugin.fhir.client import FhirClient, FhirError
from plugin.fhir.smart_auth import BackendServicesToken, load_signing_key, public_jwks
from plugin.screening.pipeline import Screener, Settings
from plugin.settings import DEFAULT_SMART_SCOPES
from plugin.stores.writeback import submit
from tests.conftest import SmartHapi
from tests.fhir_helpers import CLI, ROOT, for_patient, free_port, results, stop, tasks, total
from tests.fhir_helpers import wait_until_ready as wait_ready
from tests.smart_helpers import AuthServer, authorization_server, backend_client, ec_jwk, rsa_key

SHORT_TTL = 3  # seconds: the token of `plugin-short` expires within the test
SERVER_CLOCK_SKEW = 1  # seconds the test HAPI still accepts an expired token (setMaxClockSkew)


@dataclass
class Setup:
    auth: AuthServer
    fhir_url: str
    keys: dict[str, Path]
    admin: httpx.Client
    home: Path

    def patient(self) -> str:
        created = self.admin.post("/Patient", content=orjson.dumps({"resourceType": "Patient", "active": True}))
        assert created.status_code == 201, created.text
        return f"Patient/{created.json()['id']}"

    def env(self, client_id: str | None, key: str | None = None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKPAIN_", "FHIR_"))}
        env.update({"XDG_STATE_HOME": str(self.home / "state"), "FHIR_BASE_URL": self.fhir_url, **extra})
        if client_id and key:
            env.update({"BACKPAIN_SMART_CLIENT_ID": client_id, "BACKPAIN_SMART_PRIVATE_KEY": str(self.keys[key])})
        return env

    def cli(self, *args: str, env: dict[str, str], stdin: bytes | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run([*CLI, *args], input=stdin, capture_output=True, cwd=ROOT, env=env, timeout=120,
                              check=False)
        done.stderr = done.stderr.decode(errors="replace")  # what the user reads
        return done


def token_for(fhir_url: str, client_id: str, key: Path, scopes: str) -> str:
    return asyncio.run(BackendServicesToken(fhir_url, client_id, load_signing_key(key), scopes)())


@pytest.fixture(scope="module")
def smart(tmp_path_factory: pytest.TempPathFactory, smart_hapi: SmartHapi) -> Iterator[Setup]:
    home = tmp_path_factory.mktemp("smart")
    keys = {"rs": rsa_key(home, "rs"), "rs-next": rsa_key(home, "rs-next"), "wrong": rsa_key(home, "wrong"),
            "es": ec_jwk(home, "es", kid="es-2026")}
    signing = {name: load_signing_key(path) for name, path in keys.items()}
    clients = [
        backend_client("plugin-rs", [signing["rs"], signing["rs-next"]], DEFAULT_SMART_SCOPES),  # two keys: rotation
        backend_client("plugin-es", [signing["es"]], DEFAULT_SMART_SCOPES),
        backend_client("plugin-short", [signing["rs"]], DEFAULT_SMART_SCOPES, ttl=SHORT_TTL),
        backend_client("reader", [signing["rs"]], "system/*.rs"),
        backend_client("admin", [signing["rs"]], "system/*.cruds"),
    ]
    fhir_url = smart_hapi.base_url
    with authorization_server(fhir_url, clients, port=smart_hapi.issuer_port) as auth:
        token = token_for(fhir_url, "admin", keys["rs"], "system/*.cruds")
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json",
                   "Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=fhir_url, headers=headers, timeout=30) as admin:
            yield Setup(auth, fhir_url, keys, admin, home)


def test_the_fhir_server_refuses_a_request_without_a_token_and_says_where_to_get_one(smart: Setup):
    config = httpx.get(f"{smart.fhir_url}/.well-known/smart-configuration").json()
    assert config["token_endpoint"] == f"{smart.auth.issuer}/token"
    assert "private_key_jwt" in config["token_endpoint_auth_methods_supported"]
    plain = httpx.get(f"{smart.fhir_url}/Patient", headers={"Accept": "application/fhir+json"})
    assert plain.status_code == 401
    assert plain.headers["WWW-Authenticate"].startswith("Bearer")
    assert plain.json()["resourceType"] == "OperationOutcome"
    forged = httpx.get(f"{smart.fhir_url}/Patient", headers={"Authorization": "Bearer not.a.token"})
    assert forged.status_code == 401 and 'error="invalid_token"' in forged.headers["WWW-Authenticate"]


def test_publish_submit_and_sync_with_rs384(smart: Setup):
    env = smart.env("plugin-rs", "rs")
    before = smart.auth.tokens("plugin-rs")
    published = smart.cli("publish", env=env)
    assert published.returncode == 0, published.stderr
    assert total(smart.admin, "Questionnaire", url="https://backpain-screen.org/fhir/Questionnaire/basdai") == 1
    patient = smart.patient()
    submitted = smart.cli("submit", "-", env=env, stdin=for_patient("qr-refer-asas.json", patient))
    assert submitted.returncode == 0, submitted.stderr
    assert results(smart.admin, patient)["screening-outcome"]["valueCodeableConcept"]["coding"][0]["code"] \
        == "refer-rheumatology"
    assert len(tasks(smart.admin, patient)) == 1
    # a response written straight to the EHR (not through the plugin): sync finds it and writes its results
    later = smart.patient()
    put = smart.admin.post("/QuestionnaireResponse", content=for_patient("qr-emergency.json", later))
    assert put.status_code == 201, put.text
    synced = smart.cli("sync", "--since", "2000-01-01T00:00:00Z", env=env)
    assert synced.returncode == 0, synced.stderr
    assert results(smart.admin, later)["screening-outcome"]["valueCodeableConcept"]["coding"][0]["code"] \
        == "emergency-assessment"
    assert smart.auth.tokens("plugin-rs") - before == 3  # one token per command, however many requests


def test_es384_with_a_jwk_key_file(smart: Setup):
    patient = smart.patient()
    done = smart.cli("submit", "-", env=smart.env("plugin-es", "es"), stdin=for_patient("qr-urgent.json", patient))
    assert done.returncode == 0, done.stderr
    assert "screening-outcome" in results(smart.admin, patient)


def test_key_rotation_either_registered_key_works(smart: Setup):
    patient = smart.patient()  # the client's JWKS holds rs and rs-next; the plugin now signs with rs-next
    done = smart.cli("submit", "-", env=smart.env("plugin-rs", "rs-next"),
                     stdin=for_patient("qr-no-referral.json", patient))
    assert done.returncode == 0, done.stderr
    assert "screening-outcome" in results(smart.admin, patient)


def test_an_unregistered_key_is_refused_clearly_and_nothing_is_written(smart: Setup):
    patient = smart.patient()
    refused_before = smart.auth.stats()["refused"]
    done = smart.cli("submit", "-", env=smart.env("plugin-rs", "wrong"),
                     stdin=for_patient("qr-refer-asas.json", patient))
    assert done.returncode == 1
    assert "refused the plugin's token request" in done.stderr and "invalid_client" in done.stderr
    assert "Traceback" not in done.stderr
    assert smart.auth.stats()["refused"] > refused_before
    assert results(smart.admin, patient) == {} and tasks(smart.admin, patient) == []


def test_a_token_of_another_authorization_server_is_refused(smart: Setup):
    patient = smart.patient()
    impostor_key = load_signing_key(smart.keys["rs"])
    with authorization_server(smart.fhir_url, [backend_client("plugin-rs", [impostor_key], DEFAULT_SMART_SCOPES)]) \
            as impostor:
        token_endpoint = f"{impostor.issuer}/token"
        source = BackendServicesToken(smart.fhir_url, "plugin-rs", impostor_key)
        source.token_endpoint = token_endpoint  # skip discovery, which names the real issuer
        token = asyncio.run(source())
    done = smart.cli("submit", "-", env=smart.env(None, FHIR_BEARER_TOKEN=token),
                     stdin=for_patient("qr-refer-asas.json", patient))
    assert done.returncode == 1
    assert "HTTP 401" in done.stderr and "not signed by a key of the trusted issuer" in done.stderr
    assert results(smart.admin, patient) == {}


def test_scopes_that_do_not_cover_the_writes_are_refused_and_nothing_is_written(smart: Setup):
    patient = smart.patient()
    env = smart.env("reader", "rs", BACKPAIN_SMART_SCOPES="system/*.rs")  # may read everything, write nothing
    done = smart.cli("submit", "-", env=env, stdin=for_patient("qr-emergency.json", patient))
    assert done.returncode == 1
    assert "HTTP 403" in done.stderr and ".c is needed" in done.stderr
    assert results(smart.admin, patient) == {} and tasks(smart.admin, patient) == []


def test_the_assertion_carries_the_smart_claims(smart: Setup):
    key = load_signing_key(smart.keys["es"])
    source = BackendServicesToken(smart.fhir_url, "plugin-es", key)
    endpoint = f"{smart.auth.issuer}/token"
    first, second = source.assertion(endpoint), source.assertion(endpoint)
    header = jwt.get_unverified_header(first)
    assert header == {"alg": "ES384", "kid": "es-2026", "typ": "JWT"}
    public = jwt.PyJWK(public_jwks([key])["keys"][0]).key
    claims = jwt.decode(first, public, algorithms=["ES384"], audience=endpoint)
    assert claims["iss"] == claims["sub"] == "plugin-es"
    assert 0 < claims["exp"] - time.time() <= 300
    assert claims["jti"] != jwt.decode(second, options={"verify_signature": False})["jti"]


def test_twenty_submissions_share_one_token_and_an_expired_token_is_renewed(smart: Setup):
    screener = Screener(Settings())
    patient = smart.patient()
    qrs = [orjson.loads(for_patient("qr-no-referral.json", patient)) for _ in range(20)]

    async def run() -> None:
        short = BackendServicesToken(smart.fhir_url, "plugin-short", load_signing_key(smart.keys["rs"]))
        rs = BackendServicesToken(smart.fhir_url, "plugin-rs", load_signing_key(smart.keys["rs"]))
        async with FhirClient(smart.fhir_url, token=rs) as client:
            await asyncio.gather(*(submit(client, screener, qr) for qr in qrs))  # concurrently: single flight
        async with FhirClient(smart.fhir_url, token=short) as client:
            await submit(client, screener, qrs[0])
            await asyncio.sleep(SHORT_TTL + 0.5)  # the token has expired; the source knows and renews it
            await submit(client, screener, qrs[1])
            # past the server's 1 s clock skew too (SmartAuthInterceptor): a quick submit above left the token
            # inside it, the server took it, and no 401 came
            await asyncio.sleep(SHORT_TTL + SERVER_CLOCK_SKEW + 0.5)
            short.renew_at = time.monotonic() + 3600  # as if the clocks disagreed: the server refuses it (401),
            await submit(client, screener, qrs[2])  # the client forgets it and asks again once

    rs_before, short_before = smart.auth.tokens("plugin-rs"), smart.auth.tokens("plugin-short")
    asyncio.run(run())
    assert smart.auth.tokens("plugin-rs") - rs_before == 1
    assert smart.auth.tokens("plugin-short") - short_before == 3
    assert total(smart.admin, "QuestionnaireResponse", subject=patient) == 20


def test_a_revoked_key_fails_once_with_a_clear_error(smart: Setup):
    source = BackendServicesToken(smart.fhir_url, "plugin-rs", load_signing_key(smart.keys["wrong"]))

    async def run() -> None:
        async with FhirClient(smart.fhir_url, token=source) as client:
            await client.read("Patient/x")

    with pytest.raises(FhirError, match="invalid_client"):
        asyncio.run(run())


def test_serve_writes_an_ingested_response_to_the_fhir_server_with_smart(smart: Setup):
    port = free_port()
    env = smart.env("plugin-es", "es", BACKPAIN_INGEST_TOKEN="ingest", PYTHONUNBUFFERED="1")
    log = smart.home / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([*CLI, "serve", "--port", str(port)], cwd=ROOT, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(f"{base}/readyz", process, 60, log.read_text)  # readiness searches the FHIR server: a token
        patient = smart.patient()
        posted = httpx.post(f"{base}/QuestionnaireResponse", content=for_patient("qr-refer-asas.json", patient),
                            headers={"Content-Type": "application/fhir+json", "Authorization": "Bearer ingest"},
                            timeout=30)
        assert posted.status_code == 201, posted.text
        assert results(smart.admin, patient)["screening-outcome"]["valueCodeableConcept"]["coding"][0]["code"] \
            == "refer-rheumatology"
    finally:
        stop(process)



def test_serve_answers_503_not_422_when_no_token_can_be_had(fhir_base_url: str, smart: Setup, tmp_path: Path):
    """A server without SMART discovery (404) or a refused token is the plugin's own trouble, not the
    response's: the portal must keep the response and send it again, so 503, never 422."""
    from starlette.testclient import TestClient

    from plugin.app import create_app
    from plugin.settings import ServiceSettings

    for base, key in ((fhir_base_url, "rs"), (smart.fhir_url, "wrong")):
        settings = ServiceSettings(store_path=tmp_path / "unused.sqlite3", fhir_base_url=base,
                                   smart_client_id="plugin-rs", smart_private_key=str(smart.keys[key]))
        with TestClient(create_app(settings)) as client:
            posted = client.post("/QuestionnaireResponse", content=for_patient("qr-refer-asas.json", "Patient/p1"),
                                 headers={"Content-Type": "application/fhir+json"})
        assert posted.status_code == 503, posted.text
        assert posted.headers["Retry-After"] and posted.json()["issue"][0]["code"] == "transient"


@pytest.mark.parametrize("expires_in, kept", [("3600", True), ("soon", False), (-5, False), (None, False)])
def test_an_odd_expires_in_is_read_or_taken_as_300_seconds(expires_in: object, kept: bool, tmp_path: Path):
    """Some token endpoints send expires_in as a string; a value that is not a lifetime must not crash serve."""
    asked = []

    def ehr(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if request.url.path.endswith("smart-configuration"):
            return httpx.Response(200, json={"token_endpoint": "https://ehr.example.org/token"})
        return httpx.Response(200, json={"access_token": f"t{len(asked)}", "token_type": "bearer",
                                         "expires_in": expires_in})

    key = load_signing_key(ec_jwk(tmp_path, "k", kid="k1"))
    source = BackendServicesToken("https://ehr.example.org/fhir", "c", key, transport=httpx.MockTransport(ehr))

    async def twice() -> tuple[str, str, float]:
        first = await source()
        return first, await source(), source.renew_at - time.monotonic()

    first, second, left = asyncio.run(twice())
    assert first == second and asked.count("/token") == 1  # cached, not fetched on every call
    assert (3000 < left <= 3600) if kept else (200 < left <= 300)
