"""The OpenAPI 3.1 description of the service (`GET /openapi.json`), for integrators and API fuzzers."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from plugin import __version__

FHIR_TYPES = ("application/fhir+json", "application/fhir+xml")
RESOURCE = {"type": "object", "required": ["resourceType"], "properties": {"resourceType": {"type": "string"}}}
QR = {
    "type": "object", "required": ["resourceType", "status", "questionnaire"],
    "properties": {
        "resourceType": {"const": "QuestionnaireResponse"},
        "id": {"type": "string", "pattern": "^[A-Za-z0-9\\-.]{1,64}$"},
        "status": {"enum": ["in-progress", "completed", "amended", "entered-in-error", "stopped"]},
        "questionnaire": {"type": "string"},
        "subject": {"type": "object", "properties": {"reference": {"type": "string"}}},
        "authored": {"type": "string"},
        "item": {"type": "array", "items": {"type": "object"}},
    },
}
PARAMETERS = {"type": "object", "required": ["resourceType", "parameter"],
              "properties": {"resourceType": {"const": "Parameters"}, "parameter": {"type": "array"}}}
FORMAT = {"name": "_format", "in": "query", "required": False, "schema": {"enum": ["json", "xml"]}}
SECRET = {"name": "X-Notification-Secret", "in": "header", "required": True, "schema": {"type": "string"}}
ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[A-Za-z0-9\\-.]{1,64}$"}}


def _content(schema: dict) -> dict:
    return {media: {"schema": schema} for media in FHIR_TYPES}


def _answers(*statuses: int, html: bool = False) -> dict:
    answers: dict = {}
    for status in statuses:
        content = {"text/html": {"schema": {"type": "string"}}} if html and status == 200 else _content(RESOURCE)
        answers[str(status)] = {"description": "OperationOutcome" if status >= 400 else "OK", "content": content}
    return answers


def _op(summary: str, answers: dict, body: dict | None = None, params: list | None = None,
        security: bool = False) -> dict:
    op: dict = {"summary": summary, "responses": answers, "parameters": params or [FORMAT]}
    if body:
        op["requestBody"] = {"required": True, "content": _content(body)}
    if security:
        op["security"] = [{"bearer": []}, {}]  # the token is needed only when one is configured
    return op


def _query(name: str, required: bool = True) -> dict:
    return {"name": name, "in": "query", "required": required, "schema": {"type": "string"}}


def _definitions(kind: str) -> dict:
    search = [FORMAT, *({"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                        for n in ("url", "version", "_id", "_count", "_offset"))]
    return {
        f"/{kind}": {"get": _op(f"Search the published {kind}s", _answers(200, 400), params=search)},
        f"/{kind}/{{id}}": {"get": _op(f"Read a published {kind}", _answers(200, 404), params=[ID, FORMAT])},
    }


def _cds(summary: str, required: tuple[str, ...], statuses: tuple[int, ...]) -> dict:
    """A CDS Hooks endpoint: plain JSON in and out, OperationOutcome on errors, a JWT bearer required."""
    json_object = {"application/json": {"schema": {"type": "object"}}}
    body = {"type": "object", "required": list(required)}
    return {"summary": summary, "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {str(s): {"description": "OK", "content": json_object} if s == 200 else
                          {"description": "OperationOutcome", "content": _content(RESOURCE)} for s in statuses}}


def document() -> dict:
    qr_or_parameters = {"oneOf": [QR, PARAMETERS]}
    plain = {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "backpain-screen", "version": __version__,
                 "description": "Back-pain screening for axial spondyloarthritis and red flags (FHIR R4)."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/metadata": {"get": _op("The CapabilityStatement", _answers(200))},
            **_definitions("Questionnaire"),
            **_definitions("CodeSystem"),
            **_definitions("StructureDefinition"),
            **_definitions("OperationDefinition"),
            "/Questionnaire/$populate": {"post": _op(
                "SDC $populate: an in-progress response prefilled from the patient's record (age, HLA-B27, CRP)",
                _answers(200, 400, 401, 404, 413, 415, 422, 503), body=PARAMETERS, security=True)},
            "/Questionnaire/{id}/$populate": {"post": _op(
                "SDC $populate on one published Questionnaire",
                _answers(200, 400, 401, 404, 413, 415, 422, 503), body=PARAMETERS, params=[ID, FORMAT],
                security=True)},
            "/QuestionnaireResponse/$extract": {"post": _op(
                "SDC $extract: score a response, return the result Bundle, write nothing",
                _answers(200, 400, 413, 415), body=qr_or_parameters)},
            "/QuestionnaireResponse": {"post": _op(
                "FHIR create: score a response and write it with its results in one transaction; the body is the "
                "stored response (Prefer: return=OperationOutcome lists where each result is; return=minimal: none)",
                _answers(200, 201, 400, 401, 413, 415, 422, 503), body=QR, security=True)},
            "/QuestionnaireResponse/{id}": {"put": _op(
                "Subscription notification with a payload: write the response's results",
                _answers(200, 400, 401, 403, 413, 415, 503), body=QR, params=[ID, SECRET, FORMAT]),
                "get": _op("Read a stored response (where a create's Location points)",
                           _answers(200, 401, 404, 503), params=[ID, FORMAT], security=True)},
            "/QuestionnaireResponse/{id}/_history/{vid}": {"get": _op(
                "Read one version of a stored response", _answers(200, 401, 404, 503),
                params=[ID, {**ID, "name": "vid"}, FORMAT], security=True)},
            "/QuestionnaireResponse/{id}/$extract": {"post": _op(
                "$extract on a stored response: its result Bundle, nothing written",
                _answers(200, 401, 404, 503), params=[ID, FORMAT], security=True)},
            "/notify": {"post": _op("Subscription notification without a payload: catch up",
                                    {"202": {"description": "Accepted"}, **_answers(401, 403)}, params=[SECRET])},
            "/results/{id}": {"get": _op(
                "A response's results: HTML for a clinician, a Bundle for machines",
                _answers(200, 401, 404, html=True), params=[ID, FORMAT], security=True)},
            "/results": {"get": _op(
                "Recent results for a clinician (HTML): one patient's or everyone's, most urgent first on each page",
                _answers(200, 400, 401, html=True),
                params=[_query("patient", required=False), _query("count", required=False),
                        _query("page", required=False)], security=True)},
            "/launch": {"get": _op(
                "SMART App Launch from the EHR: sends the browser to the EHR's authorize endpoint (code, PKCE)",
                {"302": {"description": "To the EHR's authorization endpoint"}, **_answers(400, 403, 404)},
                params=[_query("iss"), _query("launch")])},
            "/launch/callback": {"get": _op(
                "The EHR's answer to the launch: opens the launched response's results (a short session)",
                {"303": {"description": "To /results/{id}"}, **_answers(400, 403, 404)},
                params=[_query("code", required=False), _query("state", required=False),
                        _query("error", required=False)])},
            "/cds-services": {"get": {"summary": "CDS Hooks 2.0 discovery (open: no patient data)",
                                      "responses": plain}},
            "/cds-services/backpain-screening": {"post": _cds(
                "CDS Hooks patient-view call: cards from the patient's latest screening (signed JWT required)",
                ("hook", "hookInstance", "context"), (200, 400, 401, 412, 413))},
            "/cds-services/backpain-screening/feedback": {"post": _cds(
                "CDS Hooks feedback: accepted / overridden cards, recorded on the screening Task (signed JWT)",
                ("feedback",), (200, 400, 401, 404, 413))},
            "/healthz": {"get": {"summary": "Alive", "responses": plain}},
            "/readyz": {"get": {"summary": "Ready: the store answers",
                                "responses": {**plain, "503": {"description": "Store unavailable"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "OK", "content": {"text/plain": {}}}}}},
        },
    }


async def openapi(request: Request) -> Response:
    return JSONResponse(document())
