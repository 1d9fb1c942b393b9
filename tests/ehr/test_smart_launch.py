"""SMART App Launch (EHR launch) of the results view, as a CDS Hooks card's `smart` link starts it.

Everything is real and on 127.0.0.1: the authorization server is npm `oidc-provider` (tests/oauth_server/: code
flow with PKCE, `launch` and `aud` parameters, the launch context `patient` and `appContext` added to the token
response as SMART asks; the EHR user's login and consent are scripted), the FHIR server is the local test
server in auth mode, and the plugin runs as `backpain-screen serve`, writing and reading with SMART Backend
Services. The test's httpx client plays the clinician's browser, following every redirect with its cookies.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest

from plugin.fhir.smart_auth import load_signing_key
from plugin.settings import DEFAULT_SMART_SCOPES
from tests.conftest import SmartHapi
from tests.fhir.test_smart_backend import token_for
from tests.fhir_helpers import CLI, ROOT, for_patient, free_port, stop, wait_until_ready
from tests.smart_helpers import AuthServer, authorization_server, backend_client, rsa_key

LAUNCH_CLIENT = "results-app"
HTML = {"Accept": "text/html"}


@dataclass
class Launching:
    auth: AuthServer
    fhir_url: str
    plugin: str
    admin: httpx.Client

    def response_for(self, example: str = "qr-refer-asas.json") -> tuple[str, str]:
        """A new patient and a response of theirs the plugin has scored and written; (patient id, response id)."""
        created = self.admin.post("/Patient", content=orjson.dumps({"resourceType": "Patient", "active": True}))
        patient = created.json()["id"]
        body = for_patient(example, f"Patient/{patient}")
        posted = httpx.post(f"{self.plugin}/QuestionnaireResponse", content=body, timeout=30,
                            headers={"Content-Type": "application/fhir+json", "Authorization": "Bearer ingest"})
        assert posted.status_code == 201, posted.text
        return patient, orjson.loads(body)["id"]

    def ehr_launch(self, patient: str, app_context: str | None = None) -> str:
        """What the EHR does before opening the app: a launch id bound to its context."""
        launch = str(uuid.uuid4())
        httpx.post(f"{self.auth.issuer}/__admin/launch",
                   json={"launch": launch, "patient": patient, "appContext": app_context})
        return launch

    def browser(self) -> httpx.Client:
        return httpx.Client(follow_redirects=True, headers=HTML, timeout=30)


@pytest.fixture(scope="module")
def launching(tmp_path_factory: pytest.TempPathFactory, smart_hapi: SmartHapi) -> Iterator[Launching]:
    home = tmp_path_factory.mktemp("launch")
    key_file = rsa_key(home, "plugin")
    key = load_signing_key(key_file)
    port = free_port()
    plugin = f"http://127.0.0.1:{port}"
    clients = [
        backend_client("plugin", [key], DEFAULT_SMART_SCOPES),
        backend_client("admin", [key], "system/*.cruds"),
        {"client_id": LAUNCH_CLIENT, "token_endpoint_auth_method": "none", "grant_types": ["authorization_code"],
         "response_types": ["code"], "redirect_uris": [f"{plugin}/launch/callback"],
         "scope": "patient/Observation.rs patient/Task.rs patient/QuestionnaireResponse.rs"},
    ]
    fhir_url = smart_hapi.base_url
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKPAIN_", "FHIR_"))}
    env.update({"XDG_STATE_HOME": str(home / "state"), "FHIR_BASE_URL": fhir_url, "PYTHONUNBUFFERED": "1",
                "BACKPAIN_SMART_CLIENT_ID": "plugin", "BACKPAIN_SMART_PRIVATE_KEY": str(key_file),
                "BACKPAIN_SMART_LAUNCH_CLIENT_ID": LAUNCH_CLIENT, "BACKPAIN_INGEST_TOKEN": "ingest",
                "BACKPAIN_SESSION_SECRET": "launch-test-secret"})
    log = home / "serve.log"
    with authorization_server(fhir_url, clients, port=smart_hapi.issuer_port) as auth:
        with log.open("wb") as sink:
            process = subprocess.Popen([*CLI, "serve", "--port", str(port)], cwd=ROOT, env=env, stdout=sink,
                                       stderr=subprocess.STDOUT)
        try:
            wait_until_ready(f"{plugin}/readyz", process, 60, log.read_text)
            token = token_for(fhir_url, "admin", key_file, "system/*.cruds")
            headers = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=fhir_url, headers=headers, timeout=30) as admin:
                yield Launching(auth, fhir_url, plugin, admin)
        finally:
            stop(process)


def test_a_launch_from_a_cds_card_opens_that_response_and_nothing_else(launching: Launching):
    patient, qr_id = launching.response_for()
    context = orjson.dumps({"questionnaireResponse": f"QuestionnaireResponse/{qr_id}"}).decode()  # as the card has it
    launch = launching.ehr_launch(patient, context)
    with launching.browser() as browser:
        page = browser.get(f"{launching.plugin}/launch", params={"iss": launching.fhir_url, "launch": launch})
        assert page.status_code == 200, page.text
        assert str(page.url) == f"{launching.plugin}/results/{qr_id}"
        assert "refer-rheumatology" in page.text
        authorize = next(urlsplit(str(r.url)) for r in page.history if str(r.url).startswith(launching.auth.issuer))
        asked = parse_qs(authorize.query)
        assert asked["response_type"] == ["code"] and asked["client_id"] == [LAUNCH_CLIENT]
        assert asked["aud"] == [launching.fhir_url] and asked["launch"] == [launch]
        assert asked["code_challenge_method"] == ["S256"] and "patient/Observation.rs" in asked["scope"][0].split()
        callback = next(r for r in page.history if r.url.path == "/launch/callback")
        session = next(c for c in callback.headers.get_list("set-cookie") if c.startswith("backpain_session="))
        assert "HttpOnly" in session and "SameSite=lax" in session and "Path=/results" in session
        _, other = launching.response_for()  # another patient's response: the session does not open it
        assert browser.get(f"{launching.plugin}/results/{other}").status_code == 401
    assert httpx.get(f"{launching.plugin}/results/{qr_id}", headers=HTML).status_code == 401  # no session, no view


def test_a_launch_without_app_context_opens_the_patients_latest_response(launching: Launching):
    patient, _ = launching.response_for("qr-no-referral.json")
    with launching.browser() as browser:
        page = browser.get(f"{launching.plugin}/launch",
                           params={"iss": launching.fhir_url, "launch": launching.ehr_launch(patient)})
        assert page.status_code == 200, page.text
        assert "no-referral-indicated" in page.text


def test_an_app_context_naming_another_patients_response_is_refused(launching: Launching):
    patient, _ = launching.response_for()
    _, others = launching.response_for()
    context = orjson.dumps({"questionnaireResponse": f"QuestionnaireResponse/{others}"}).decode()
    with launching.browser() as browser:
        page = browser.get(f"{launching.plugin}/launch",
                           params={"iss": launching.fhir_url, "launch": launching.ehr_launch(patient, context)})
        assert page.status_code == 403
        assert "not this patient" in page.text


def test_a_launch_from_another_fhir_server_or_with_a_forged_state_is_refused(launching: Launching):
    with launching.browser() as browser:
        elsewhere = browser.get(f"{launching.plugin}/launch", params={"iss": "https://evil.example/fhir",
                                                                       "launch": "x"})
        assert elsewhere.status_code == 403
        no_launch = browser.get(f"{launching.plugin}/callback".replace("/callback", "/launch/callback"),
                                params={"code": "c", "state": "s"})
        assert no_launch.status_code == 400 and "open it again from the EHR" in no_launch.text
        patient, _ = launching.response_for()
        started = browser.get(f"{launching.plugin}/launch", follow_redirects=False,
                              params={"iss": launching.fhir_url, "launch": launching.ehr_launch(patient)})
        assert started.status_code == 302
        forged = browser.get(f"{launching.plugin}/launch/callback", params={"code": "c", "state": "forged"})
        assert forged.status_code == 403 and "state does not match" in forged.text


def test_launch_is_not_found_when_the_plugin_is_not_a_smart_app(tmp_path: Path):
    from starlette.testclient import TestClient

    from plugin.app import create_app
    from plugin.settings import ServiceSettings

    with TestClient(create_app(ServiceSettings(store_path=tmp_path / "s.sqlite3"))) as client:
        assert client.get("/launch", params={"iss": "x", "launch": "y"}).status_code == 404


def test_behind_a_tls_proxy_the_launch_cookie_is_secure(tmp_path: Path):
    """The proxy speaks plain http to the plugin; the public URL says the browser is on https."""
    from starlette.testclient import TestClient

    from plugin.app import create_app
    from plugin.settings import ServiceSettings
    from tests.cds_keys import JwksServer

    config = {"authorization_endpoint": "https://ehr.example.org/authorize",
              "token_endpoint": "https://ehr.example.org/token"}
    with JwksServer({"/fhir/.well-known/smart-configuration": config}).running() as ehr:
        settings = ServiceSettings(store_path=tmp_path / "s.sqlite3", fhir_base_url=f"{ehr.url}/fhir",
                                   smart_launch_client_id=LAUNCH_CLIENT, public_url="https://plugin.example.org")
        with TestClient(create_app(settings), base_url="http://plugin.internal") as client:
            started = client.get("/launch", params={"iss": f"{ehr.url}/fhir", "launch": "l1"},
                                 follow_redirects=False)
    assert started.status_code == 302, started.text
    assert "redirect_uri=https%3A%2F%2Fplugin.example.org%2Flaunch%2Fcallback" in started.headers["location"]
    cookie = started.headers["set-cookie"]
    assert cookie.startswith("backpain_launch=") and "secure" in cookie.lower().split("; ")
