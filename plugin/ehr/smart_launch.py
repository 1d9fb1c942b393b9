"""SMART App Launch (EHR launch) of the clinician results view, as CDS Hooks cards link to it.

GET /launch?iss=…&launch=…: the EHR opens the plugin. `iss` must be the FHIR
server the plugin is configured for (FHIR_BASE_URL); its authorization and
token endpoints come from `{iss}/.well-known/smart-configuration`. The
browser is sent to the authorization endpoint (code flow, PKCE S256, `aud`
= iss, the `launch` id); `state` and the PKCE verifier wait in a signed
cookie that lives 10 minutes.

GET /launch/callback?code=…&state=…: the state is checked, the code exchanged
(a public client with PKCE; with private_key_jwt when the launch client is
also the plugin's Backend Services client), and the launch context read from
the token response: `patient`, and `appContext` as a CDS Hooks card sets it
(`{"questionnaireResponse": "QuestionnaireResponse/ID"}`); without one, the
patient's latest response. The clinician gets a signed session cookie (15
minutes, HttpOnly, SameSite=Lax, Secure on https, path /results) that lets
the results view show that one response, and is redirected there. The
access token itself is not kept: the plugin reads results with its own
credentials; the launch only establishes who may see which response.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from plugin.fhir.client import FhirError
from plugin.screening import references
from plugin.screening.outcome import invalid
from plugin.settings import ServiceSettings
from plugin.web.access import SESSION_COOKIE, read_signed, sign
from plugin.web.api import base_url
from plugin.web.service import service

SCOPES = "launch openid fhirUser patient/Observation.rs patient/Task.rs patient/QuestionnaireResponse.rs"
LAUNCH_COOKIE = "backpain_launch"
LAUNCH_SECONDS, SESSION_SECONDS = 600, 900
TIMEOUT = 10.0


def _set_cookie(response: Response, request: Request, name: str, value: str, seconds: int, path: str) -> None:
    # Lax is enough: the EHR opens the app in a window of its own (the plugin's pages refuse framing).
    # Secure by the public URL: behind a TLS proxy the request itself arrives over plain http.
    secure = base_url(request).startswith("https://")
    response.set_cookie(name, value, max_age=seconds, path=path, httponly=True, samesite="lax", secure=secure)


async def launch(request: Request) -> Response:
    settings = service(request).settings
    client_id = settings.smart_launch_client_id
    if not client_id:
        raise invalid("not-supported", "SMART App Launch is not configured (BACKPAIN_SMART_LAUNCH_CLIENT_ID).",
                      status=404)
    iss, launch_id = request.query_params.get("iss", ""), request.query_params.get("launch", "")
    if not launch_id:
        raise invalid("required", "The launch is missing its `launch` parameter.")
    if not settings.fhir_base_url or iss.rstrip("/") != settings.fhir_base_url.rstrip("/"):
        raise invalid("forbidden", "The launch names a FHIR server (iss) that this plugin does not work with.",
                      status=403)
    endpoints = await _endpoints(iss)
    state, verifier = secrets.token_urlsafe(24), secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": f"{base_url(request)}"
             "/launch/callback", "scope": SCOPES, "state": state, "aud": iss, "launch": launch_id,
             "code_challenge": challenge, "code_challenge_method": "S256"}
    response = RedirectResponse(f"{endpoints['authorization_endpoint']}?{urlencode(query)}", status_code=302)
    pending = {"state": state, "verifier": verifier, "token_endpoint": endpoints["token_endpoint"]}
    _set_cookie(response, request, LAUNCH_COOKIE, sign(settings, pending, LAUNCH_SECONDS, "launch"),
                LAUNCH_SECONDS, "/launch")
    return response


async def callback(request: Request) -> Response:
    svc = service(request)
    settings = svc.settings
    if not settings.smart_launch_client_id:
        raise invalid("not-supported", "SMART App Launch is not configured.", status=404)
    params = request.query_params
    if "error" in params:
        raise invalid("forbidden", f"The EHR did not authorise the launch: {params['error'][:100]}.", status=403)
    pending = read_signed(settings, request.cookies.get(LAUNCH_COOKIE), "launch")
    if pending is None:
        raise invalid("expired", "This launch has expired or was not started here: open it again from the EHR.")
    if not params.get("code") or not secrets.compare_digest(params.get("state", ""), pending["state"]):
        raise invalid("forbidden", "The launch's state does not match: open it again from the EHR.", status=403)
    context = await _exchange(request, settings, pending, params["code"])
    patient = context.get("patient")
    if not isinstance(patient, str) or not patient:
        raise invalid("required", "The EHR gave no patient with the launch.", status=403)
    qr_id = await _response_id(svc, patient, context.get("appContext"))
    response = RedirectResponse(f"{base_url(request)}/results/{qr_id}", status_code=303)
    session = sign(settings, {"patient": patient, "questionnaireResponse": qr_id}, SESSION_SECONDS, "session")
    _set_cookie(response, request, SESSION_COOKIE, session, SESSION_SECONDS, "/results")
    response.delete_cookie(LAUNCH_COOKIE, path="/launch")
    return response


async def _endpoints(iss: str) -> dict[str, str]:
    url = f"{iss.rstrip('/')}/.well-known/smart-configuration"
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            answer = await http.get(url, headers={"Accept": "application/json"})
        config = answer.json()
    except (httpx.HTTPError, ValueError):
        raise FhirError(f"SMART discovery at {url} failed.") from None
    if not all(isinstance(config.get(k), str) for k in ("authorization_endpoint", "token_endpoint")):
        raise FhirError(f"SMART discovery at {url} gave no authorization and token endpoints.")
    return config


async def _exchange(request: Request, settings: ServiceSettings, pending: dict, code: str) -> dict[str, Any]:
    form = {"grant_type": "authorization_code", "code": code, "code_verifier": pending["verifier"],
            "redirect_uri": f"{base_url(request)}/launch/callback", "client_id": settings.smart_launch_client_id}
    form.update(_client_assertion(settings, pending["token_endpoint"]))
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            answer = await http.post(pending["token_endpoint"], data=form, headers={"Accept": "application/json"})
        body = answer.json()
    except (httpx.HTTPError, ValueError):
        raise FhirError("The EHR's token endpoint could not be reached.") from None
    if answer.status_code != 200 or not isinstance(body, dict) or "access_token" not in body:
        error = body.get("error") if isinstance(body, dict) else None
        raise invalid("forbidden", f"The EHR refused the launch's code (HTTP {answer.status_code}"
                      f"{f' {error}' if isinstance(error, str) else ''}): open it again from the EHR.", status=403)
    return body


def _client_assertion(settings: ServiceSettings, token_endpoint: str) -> dict[str, str]:
    """private_key_jwt when the launch client is also the Backend Services client (one key); else public."""
    if not (settings.smart_private_key and settings.smart_client_id == settings.smart_launch_client_id):
        return {}
    from plugin.fhir.smart_auth import ASSERTION_TYPE, BackendServicesToken, load_signing_key

    key = load_signing_key(settings.smart_private_key, settings.smart_key_id)
    signer = BackendServicesToken(settings.fhir_base_url or "", settings.smart_client_id, key)
    return {"client_assertion_type": ASSERTION_TYPE, "client_assertion": signer.assertion(token_endpoint)}


async def _response_id(svc: Any, patient: str, app_context: object) -> str:
    """The response the launch is about (appContext), checked to be this patient's; else their latest."""
    base = svc.settings.fhir_base_url
    subject = references.patient_reference(patient if "/" in patient else f"Patient/{patient}", base)
    if subject is None:
        raise invalid("forbidden", "The EHR's launch names no patient in a form this service accepts.", status=403)
    wanted = None
    if isinstance(app_context, str):
        try:
            app_context = orjson.loads(app_context)
        except orjson.JSONDecodeError:
            app_context = None
    if isinstance(app_context, dict) and isinstance(app_context.get("questionnaireResponse"), str):
        wanted = app_context["questionnaireResponse"].removeprefix("QuestionnaireResponse/")
    if wanted is not None:
        if not references.valid_id(wanted):
            raise invalid("forbidden", "The launch's response is not this patient's.", status=403)
        qr = await svc.store.read(f"QuestionnaireResponse/{wanted}")
        if qr is None or qr.get("subject", {}).get("reference") != subject:
            raise invalid("forbidden", "The launch's response is not this patient's.", status=403)
        return wanted
    page = await svc.store.search_page("QuestionnaireResponse", {"subject": subject, "_sort": "-authored",
                                                                 "_count": "1"})
    latest = next((e["resource"]["id"] for e in page.get("entry", []) if "resource" in e), None)
    if latest is None:
        raise invalid("not-found", "This patient has no screening response yet.", status=404)
    return latest
