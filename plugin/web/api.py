"""The FHIR REST endpoints: definitions, $extract, ingest, Subscription notifications, results.

Each handler is short: read and check the input, call the pure core or the
write-back, reply in the caller's format. Errors are raised (InvalidInput,
FhirError) and turned into OperationOutcomes in one place (`app.py`).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from plugin.fhir import formats
from plugin.fhir.capability import capability_statement
from plugin.fhir.searchset import searchset
from plugin.screening import data
from plugin.screening.outcome import InvalidInput, Issue, invalid, operation_outcome
from plugin.screening.pipeline import recorded
from plugin.stores.writeback import Written, prepare, raise_refusal, save, submit
from plugin.web.security import require_bearer, require_notify_secret
from plugin.web.service import service

DEFINITION_TYPES = ("Questionnaire", "CodeSystem", "StructureDefinition", "OperationDefinition")
DEFINITION_SEARCH = {"url", "version", "_id", "_format", "_count", "_offset", "_summary"}


async def metadata(request: Request) -> Response:
    return formats.reply(capability_statement(base_url(request)), formats.wanted(request))


async def search_definitions(request: Request) -> Response:
    """`GET /Questionnaire?url=…&version=…` (and CodeSystem): a searchset of what the plugin publishes."""
    resource_type = request.url.path.strip("/")
    unknown = set(request.query_params) - DEFINITION_SEARCH
    if unknown:
        raise invalid("not-supported", f"Unknown search parameter {sorted(unknown)[0]!r} for {resource_type}; "
                      "known: url, version, _id.")
    params = dict(request.query_params)
    found = [r for r in data.definitions(resource_type)
             if all(params.get(k) in (None, r.get(k if k != "_id" else "id")) for k in ("url", "version", "_id"))]
    return formats.reply(searchset(base_url(request), resource_type, found, params), formats.wanted(request))


async def read_definition(request: Request) -> Response:
    resource_type = request.url.path.strip("/").split("/")[0]
    wanted_id = request.path_params["id"]
    found = next((r for r in data.definitions(resource_type) if r.get("id") == wanted_id), None)
    if found is None:
        raise invalid("not-found", f"{resource_type}/{wanted_id} is not published here.", status=404)
    return formats.reply(found, formats.wanted(request), headers={"ETag": f'W/"{found.get("version", "1")}"'})


async def extract(request: Request) -> Response:
    """SDC `$extract`: the result Bundle a response gives; nothing is written."""
    return _extracted(request, await read_response(request))


async def extract_stored(request: Request) -> Response:
    """`QuestionnaireResponse/{id}/$extract`: the same for a response already in the store.

    It reads a stored response, so it needs the ingest token, as the results do.
    """
    svc = service(request)
    require_bearer(request, svc.settings.ingest_token)
    wanted_id = request.path_params["id"]  # a FHIR id: the route's convertor matched it
    qr = await svc.store.read(f"QuestionnaireResponse/{wanted_id}")
    if qr is None:
        raise invalid("not-found", f"QuestionnaireResponse/{wanted_id} is not in the store.", status=404)
    return _extracted(request, qr)


async def read_stored(request: Request) -> Response:
    """`GET /QuestionnaireResponse/{id}[/_history/{vid}]`: a stored response (where `Location` points)."""
    svc = service(request)
    require_bearer(request, svc.settings.ingest_token)
    path = [request.path_params["id"], *(["_history", request.path_params["vid"]] if "vid" in request.path_params
                                         else [])]  # FHIR ids: the route's convertors matched them
    qr = await svc.store.read("/".join(["QuestionnaireResponse", *path]))
    if qr is None:
        raise invalid("not-found", f"QuestionnaireResponse/{'/'.join(path)} is not in the store.", status=404)
    return formats.reply(qr, formats.wanted(request), headers=_version_headers(qr))


def _version_headers(resource: dict) -> dict[str, str]:
    version = (resource.get("meta") or {}).get("versionId")
    return {"ETag": f'W/"{version}"'} if version else {}


def _extracted(request: Request, qr: dict) -> Response:
    """The Bundle; a refused response that reports a red flag gives a Parameters (SDC): `return`, the
    Bundle its red flags call for, and `issues`, why the rest is refused."""
    try:
        outcome = service(request).screener.process(qr)
    except InvalidInput as error:
        if error.rescued is None:
            raise
        service(request).count("invalid")
        parameters = {"resourceType": "Parameters", "parameter": [
            {"name": "return", "resource": error.rescued.bundle},
            {"name": "issues", "resource": recorded(error).to_fhir()}]}
        return formats.reply(parameters, formats.wanted(request))
    service(request).count(outcome.label)
    return formats.reply(outcome.bundle, formats.wanted(request))


async def ingest(request: Request) -> Response:
    """`POST /QuestionnaireResponse`: check, score, write it with its results in one transaction.

    A FHIR create: 201 with the stored response, `Location` (with its version) and `ETag` when it is
    new; the same response again: 200 with the same, and nothing written twice. `Prefer: return=`
    chooses the body (`minimal`: none; `OperationOutcome`: the outcome and where each result is).
    """
    svc = service(request)
    require_bearer(request, svc.settings.ingest_token)
    qr = await read_response(request)
    try:
        outcome, written = await submit(svc.store, svc.screener, qr)
    except InvalidInput as error:
        if error.rescued is not None:
            svc.count("invalid")
        raise
    svc.count(outcome.label)
    svc.log_written(outcome.label, written)
    return await created_reply(request, outcome.label, written)


async def created_reply(request: Request, label: str, written: list[Written]) -> Response:
    """The create's answer: the response as the store now holds it (read back, so its version is the store's)."""
    response_entry = next((w for w in written if w.location.startswith("QuestionnaireResponse/")), None)
    stored = await service(request).store.read(response_entry.location) if response_entry else None
    if stored is None:  # an unfinished response without a red flag: read, not kept (SCREENING.md §4)
        return formats.reply(written_outcome(label, written), formats.wanted(request))
    headers = {"Location": f"{base_url(request)}/{response_entry.location}/_history/{stored['meta']['versionId']}",
               **_version_headers(stored)}
    status = 201 if response_entry.status == "201" and response_entry.changed else 200
    preference = formats.return_preference(request)
    if preference == "minimal":
        return Response(status_code=status, headers=headers)
    body = written_outcome(label, written) if preference == "OperationOutcome" else stored
    return formats.reply(body, formats.wanted(request), status, headers)


def written_outcome(label: str, written: list[Written]) -> dict:
    """An OperationOutcome saying what the screening concluded and where each resource written for it is."""
    if not written:
        return operation_outcome([Issue("informational", "Nothing was written: a response that is not completed "
                                        "is only read for red flags, and it reports none. Send it again when "
                                        "it is completed.", None, "information")])
    issues = [Issue("informational", f"Screening outcome: {label}.", None, "information")]
    issues += [Issue("informational", f"{w.location}: {'written' if w.changed else 'already there, unchanged'}.",
                     None, "information") for w in written]
    return operation_outcome(issues)


async def notified_with_payload(request: Request) -> Response:
    """A rest-hook Subscription with a payload: `PUT …/QuestionnaireResponse/{id}` with the response.

    The response is already on the FHIR server (that is where the notification
    comes from): its results are written, the response itself is not.
    """
    svc = service(request)
    require_notify_secret(request, svc.settings.notify_secret)
    qr = await read_response(request)
    job = prepare(svc.screener, qr)  # checked first: only then is it known to be a response at all
    if qr.get("id") != request.path_params["id"]:
        raise invalid("invalid", "The response's id does not match the id in the URL.", "QuestionnaireResponse.id")
    svc.count("invalid" if job.refused else job.outcome.label)
    written = await save(svc.store, job, stored_response=qr)
    raise_refusal(job)
    return written_reply(request, job.outcome.label, written)


async def notified_without_payload(request: Request) -> Response:
    """A rest-hook Subscription without a payload (an empty POST): something changed; catch up."""
    svc = service(request)
    require_notify_secret(request, svc.settings.notify_secret)
    svc.catch_up()
    return Response(status_code=202)


async def read_response(request: Request) -> dict:
    """A QuestionnaireResponse from the body, or from a Parameters `questionnaire-response` (SDC)."""
    resource = await formats.read_resource(request, service(request).settings.max_body_bytes)
    if isinstance(resource, dict) and resource.get("resourceType") == "Parameters":
        parameter = next((p for p in resource.get("parameter") or [] if isinstance(p, dict)
                          and p.get("name") == "questionnaire-response"), None)
        if parameter is None or not isinstance(parameter.get("resource"), dict):
            raise invalid("required", "The Parameters hold no 'questionnaire-response' resource.",
                          "Parameters.parameter")
        resource = parameter["resource"]
    return resource


def written_reply(request: Request, label: str, written: list[Written]) -> Response:
    """A notification's answer: a transaction-response Bundle saying where each result is."""
    service(request).log_written(label, written)
    base = base_url(request)
    entries = [{"response": {"status": "201 Created" if w.status == "201" else "200 OK",
                             "location": f"{w.location}"}} for w in written]
    bundle = {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
    response_entry = next((w for w in written if w.location.startswith("QuestionnaireResponse/")), None)
    headers = {"Location": f"{base}/{response_entry.location}"} if response_entry else {}
    status = 201 if response_entry and response_entry.status == "201" and response_entry.changed else 200
    return formats.reply(bundle, formats.wanted(request), status, headers)


def base_url(request: Request) -> str:
    public = service(request).settings.public_url
    return (public or str(request.base_url)).rstrip("/")
