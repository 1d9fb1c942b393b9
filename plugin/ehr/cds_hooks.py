"""The CDS Hooks 2.0 service: discovery, the `patient-view` call, and the feedback endpoint.

    GET  /cds-services                                 discovery (open: it holds no patient data)
    POST /cds-services/backpain-screening              the hook call (signed JWT required)
    POST /cds-services/backpain-screening/feedback     accepted / overridden cards (signed JWT required)

The call reads the patient's latest screening-outcome Observation, its
member results and the patient's open screening Tasks: from `prefetch`
where the CDS Client gave them, else from `fhirServer` with the
`fhirAuthorization` bearer token, else, when the call brings neither
prefetch nor fhirServer, from the plugin's own store. A prefetch key
that is present with the value null means the client found nothing (as
the spec says), so nothing is fetched for it. A key the client left out
with no `fhirServer` to fetch it from is a 412, as the spec asks.
Cards come from `cds_cards` (pure); feedback is written on the Task.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from plugin.ehr import cds_auth, cds_cards
from plugin.ehr.cds_cards import SERVICE_ID
from plugin.fhir import formats
from plugin.fhir.client import FhirClient, FhirError, RetryPolicy, bearer, matches
from plugin.observability import LOG, event
from plugin.screening import references, systems
from plugin.screening.building import instant
from plugin.screening.outcome import InvalidInput, Issue, invalid
from plugin.screening.parsing import parse_json
from plugin.screening.references import valid_id
from plugin.screening.timeline import date_range
from plugin.settings import ServiceSettings
from plugin.stores.store import Store
from plugin.web import access
from plugin.web.api import base_url
from plugin.web.service import service

HOOK = "patient-view"
OUTCOME_STATUSES = "final,amended,corrected"
FINDINGS = ("red-flags", "referral-asas-2015", "referral-nice-ng65")
PATIENT = "{{context.patientId}}"
# key -> (resource type, search parameters); the prefetch templates are these with the patient token.
QUERIES: dict[str, tuple[str, dict[str, str]]] = {
    "outcome": ("Observation", {"patient": PATIENT, "code": f"{systems.RESULTS}|screening-outcome",
                                "status": OUTCOME_STATUSES, "_sort": "-date", "_count": "1"}),
    "findings": ("Observation", {"patient": PATIENT, "code": ",".join(f"{systems.RESULTS}|{c}" for c in FINDINGS),
                                 "status": OUTCOME_STATUSES, "_sort": "-date", "_count": "6"}),
    "tasks": ("Task", {"patient": PATIENT, "code": ",".join(f"{s}|{c}" for s, c in cds_cards.TASK_CODES),
                       "status": ",".join(cds_cards.OPEN), "_count": "50"}),
}
FHIR_TIMEOUT = 10.0  # a hook call should answer in about half a second; a stuck FHIR server must not hold it
FHIR_RETRY = RetryPolicy(attempts=2, base_delay=0.1, max_delay=1.0)
USER_TYPES = ("Practitioner", "PractitionerRole", "Patient", "RelatedPerson")
UUID = re.compile(r"(?:urn:uuid:)?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})")
ZONED = re.compile(r"T\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d)$")  # a time with its zone, as Task.note.time needs
WRITE_RETRIES = 3
MAX_COMMENT = 2000


def template(resource_type: str, params: dict[str, str]) -> str:
    return f"{resource_type}?" + "&".join(f"{k}={v}" for k, v in params.items())


PREFETCH = {key: template(*query) for key, query in QUERIES.items()}


# -- discovery ---------------------------------------------------------------------------------


async def discovery(request: Request) -> Response:
    return JSONResponse({"services": [{
        "hook": HOOK,
        "id": SERVICE_ID,
        "title": "Back-pain screening: axial spondyloarthritis and red flags",
        "description": "Shows what the patient's latest back-pain screening asks of the clinician: an emergency or "
                       "urgent review for red flags, a rheumatology referral or an HLA-B27 test for suspected axial "
                       "spondyloarthritis (ASAS 2015 or NICE NG65), or the answers still missing. Each card can "
                       "accept its suggestion (orders the referral or test and accepts the screening Task).",
        "prefetch": PREFETCH,
        "usageRequirements": "Send a JWT signed with RS384 or ES384 by an allow-listed issuer. Prefetch, or give "
                             "fhirServer and fhirAuthorization with read access to Observation and Task.",
    }]})


# -- the hook call -----------------------------------------------------------------------------


async def call(request: Request) -> Response:
    svc = service(request)
    await authenticate(request, f"/cds-services/{SERVICE_ID}")
    body = await _json_body(request, svc.settings.max_body_bytes)
    hook = _hook_request(body)
    patient = f"Patient/{hook['context']['patientId']}"
    outcome, findings, tasks = await gather(hook, svc.store)
    context = cds_cards.Context(
        patient=patient, user=hook["context"].get("userId"),
        encounter=f"Encounter/{hook['context']['encounterId']}" if hook["context"].get("encounterId") else None,
        base_url=base_url(request), smart_launch=bool(svc.settings.smart_launch_client_id),
        now=instant(datetime.now(UTC)), results_access=_link_access(svc.settings))
    found = cds_cards.cards(outcome, tasks, findings, context)
    event("cds hook answered", event="cds-hook", outcome=cds_cards.outcome_code(outcome) if outcome else None,
          written=len(found))
    return JSONResponse({"cards": found})


def _link_access(settings: ServiceSettings) -> Callable[[str], str] | None:
    """Plain results links need a signed `access` only when the results view needs a token."""
    if not settings.ingest_token:
        return None
    return lambda qr_id: access.results_access(settings, qr_id)


async def authenticate(request: Request, path: str) -> dict:
    """The JWT's claims; its `aud` must be this endpoint's URL as configured, never as the request's Host
    header says (anyone can send any Host, so a token minted for another service would pass)."""
    audience = audience_base(service(request).settings) + path
    return await cds_auth.check(verifier(request), request.headers.get("authorization"), audience)


def audience_base(settings: ServiceSettings) -> str:
    """`BACKPAIN_PUBLIC_URL`, else the URL the service listens on (`http://{host}:{port}`)."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}"


def verifier(request: Request) -> cds_auth.Verifier:
    """The app's verifier (made on first use: it holds the JWK Set and jti caches of this process)."""
    state = request.app.state
    found = getattr(state, "cds_verifier", None)
    if found is None:
        try:
            issuers = cds_auth.Issuers.parse(service(request).settings.cds_issuers)
        except ValueError as error:  # the setting's text names no secret: say what is wrong with it
            LOG.error(f"{error} Every CDS Hooks call is refused.", extra={"event": "cds-auth",
                                                                          "reason": "issuers-setting"})
            issuers = cds_auth.Issuers({})
        found = state.cds_verifier = cds_auth.Verifier(issuers)
    return found


async def _json_body(request: Request, limit: int) -> Any:
    body = await formats.read_body(request, limit)
    if not body.strip():
        raise invalid("structure", "The body is empty.")
    return parse_json(body)


def _hook_request(body: Any) -> dict:
    """The parts of the request the service uses, checked; every problem in one 400."""
    if not isinstance(body, dict):
        raise invalid("structure", "The body must be a JSON object (a CDS Hooks request).")
    issues = []
    if body.get("hook") != HOOK:
        issues.append(Issue("value", f"This service answers the {HOOK} hook.", "hook"))
    if not isinstance(body.get("hookInstance"), str) or not body["hookInstance"]:
        issues.append(Issue("required", "hookInstance is required.", "hookInstance"))
    context = body.get("context")
    if not isinstance(context, dict):
        issues.append(Issue("required", "context is required.", "context"))
        context = {}
    if not valid_id(context.get("patientId")):
        issues.append(Issue("value", "context.patientId must be a FHIR id.", "context.patientId"))
    if "userId" in context and not _user_reference(context["userId"]):
        issues.append(Issue("value", "context.userId must be a reference such as Practitioner/id.", "context.userId"))
    if "encounterId" in context and not valid_id(context["encounterId"]):
        issues.append(Issue("value", "context.encounterId must be a FHIR id.", "context.encounterId"))
    issues += _server_issues(body)
    prefetch = body.get("prefetch", {})
    if not isinstance(prefetch, dict):
        issues.append(Issue("structure", "prefetch must be an object.", "prefetch"))
    else:
        issues += [Issue("structure", f"prefetch.{key} must be a searchset Bundle or null.", f"prefetch.{key}")
                   for key in QUERIES if key in prefetch and not _bundle_or_null(prefetch[key])]
    if issues:
        raise InvalidInput(issues)
    return body


def _user_reference(value: Any) -> bool:
    kind, _, user_id = value.partition("/") if isinstance(value, str) else ("", "", "")
    return kind in USER_TYPES and valid_id(user_id)


def _server_issues(body: dict) -> list[Issue]:
    issues = []
    server, authorization = body.get("fhirServer"), body.get("fhirAuthorization")
    if server is not None and not (isinstance(server, str) and server.startswith(("https://", "http://"))):
        issues.append(Issue("value", "fhirServer must be an http(s) URL.", "fhirServer"))
    if authorization is not None:
        if server is None:
            issues.append(Issue("required", "fhirServer is required with fhirAuthorization.", "fhirServer"))
        if not isinstance(authorization, dict) or not isinstance(authorization.get("access_token"), str) \
                or str(authorization.get("token_type", "")).lower() != "bearer":
            issues.append(Issue("value", "fhirAuthorization needs an access_token of token_type Bearer.",
                                "fhirAuthorization"))
    return issues


def _bundle_or_null(value: Any) -> bool:
    """Null, or a Bundle whose entries each hold a resource object (what reading its matches relies on)."""
    if value is None:
        return True
    if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
        return False
    entries = value.get("entry", [])
    return isinstance(entries, list) and all(
        isinstance(e, dict) and isinstance(e.get("resource"), dict) and isinstance(e.get("search", {}), dict)
        for e in entries)


# -- where the data comes from --------------------------------------------------------------------


async def gather(hook: dict, own_store: Store) -> tuple[dict | None, dict[str, dict], list[dict]]:
    """(latest outcome, findings by Observation/id, open Tasks) from prefetch, fhirServer or the own store."""
    patient_id = hook["context"]["patientId"]
    given = hook.get("prefetch") or {}
    prefetched = {key: given[key] for key in QUERIES if key in given}
    server = hook.get("fhirServer")
    if server:
        token = (hook.get("fhirAuthorization") or {}).get("access_token")  # null: no token, as if left out
        async with FhirClient(server, token=bearer(token) if token else None, timeout=FHIR_TIMEOUT,
                              retry=FHIR_RETRY) as client:
            try:
                return await _read(client, patient_id, prefetched)
            except FhirError as error:
                LOG.warning("fhirServer could not be read", extra={"event": "cds-hook", "status": error.status})
                raise invalid("processing", "The CDS Client's FHIR server could not be read for this call.",
                              status=412) from None
    if not given:
        return await _read(own_store, patient_id, {})
    missing = [key for key in QUERIES if key not in prefetched]
    if missing:
        raise invalid("processing", f"Prefetch lacks {', '.join(missing)} and no fhirServer was given to fetch "
                                    f"{'it' if len(missing) == 1 else 'them'} from.", "prefetch", status=412)
    return await _read(None, patient_id, prefetched)


async def _read(source: Store | FhirClient | None, patient_id: str,
                prefetched: dict[str, Any]) -> tuple[dict | None, dict[str, dict], list[dict]]:
    """Fills in what was not prefetched from `source`, then the outcome's members it still lacks."""
    missing = [key for key in QUERIES if key not in prefetched]
    if missing:
        assert source is not None
        pages = await asyncio.gather(*(_search(source, key, patient_id) for key in missing))
        prefetched = {**prefetched, **dict(zip(missing, pages))}
    base = getattr(source, "base_url", None)  # prefetch may name the patient by absolute URL on its server
    patient = (patient_id, base)
    outcome = latest([o for o in matches(prefetched["outcome"]) if _about(o, "subject", patient, "Observation")])
    findings = {f"Observation/{o['id']}": o for o in matches(prefetched["findings"])
                if _about(o, "subject", patient, "Observation") and o.get("id")}
    refs = cds_cards.member_refs(outcome or {})
    if source is not None and refs and not _complete([findings[r] for r in refs if r in findings]):
        # the findings page missed this outcome's (e.g. more results at the same time): read its members
        ids = [ref.split("/", 1)[1] for ref in refs if ref.startswith("Observation/")]
        page = await source.search_page("Observation", {"_id": ",".join(ids), "_count": str(len(ids))})
        findings.update({f"Observation/{o['id']}": o for o in matches(page)
                         if _about(o, "subject", patient, "Observation") and o.get("id")})
    tasks = [t for t in matches(prefetched["tasks"]) if _about(t, "for", patient, "Task")]
    return outcome, findings, tasks


def _complete(members: list[dict]) -> bool:
    """The outcome's red-flags result and its referral strategy's result are both at hand."""
    codes = [cds_cards.result_code(m) or "" for m in members]
    return "red-flags" in codes and any(c.startswith("referral-") for c in codes)


async def _search(source: Store | FhirClient, key: str, patient_id: str) -> dict:
    resource_type, params = QUERIES[key]
    return await source.search_page(resource_type, {k: v.replace(PATIENT, patient_id) for k, v in params.items()})


def _about(resource: Any, field: str, patient: tuple[str, str | None], resource_type: str) -> bool:
    """A resource of the expected type about the patient in context (a prefetch is checked, not trusted).

    `patient` is (its id, the FHIR base the resource came from); the reference must be in an accepted form.
    """
    patient_id, base = patient
    return (isinstance(resource, dict) and resource.get("resourceType") == resource_type
            and isinstance(resource.get(field), dict)
            and references.patient_id(resource[field].get("reference"), base) == patient_id)


def latest(outcomes: list[dict]) -> dict | None:
    """The most recent screening outcome (a client may not have sorted its prefetch)."""
    usable = [o for o in outcomes if o.get("status") in OUTCOME_STATUSES.split(",")]
    return max(usable, key=lambda o: (_when(o.get("effectiveDateTime")), _when(o.get("issued"))), default=None)


def _when(value: Any) -> str:
    span = date_range(value) if isinstance(value, str) else None
    return span[0] if span else ""


# -- feedback ------------------------------------------------------------------------------------


async def feedback(request: Request) -> Response:
    svc = service(request)
    claims = await authenticate(request, f"/cds-services/{SERVICE_ID}/feedback")
    items = _feedback_items(await _json_body(request, svc.settings.max_body_bytes))
    targets = await asyncio.gather(*(_card_target(svc.store, item["card"]) for item in items))
    unknown = [i for i, target in enumerate(targets) if target is None]
    if unknown:
        raise InvalidInput([Issue("not-found", "No card with this uuid was given by this service.",
                                  f"feedback[{i}].card") for i in unknown], 404)
    author = f"CDS Client {claims['iss']}"
    recorded = 0
    for item, target in zip(items, targets):
        if target and target.get("resourceType") == "Task":
            recorded += await _record(svc.store, item, author)
    event("cds feedback", event="cds-feedback", written=recorded)
    return JSONResponse({})


def _feedback_items(body: Any) -> list[dict]:
    if not isinstance(body, dict) or not isinstance(body.get("feedback"), list) or not body["feedback"]:
        raise invalid("structure", "The body must be an object with a non-empty feedback array.", "feedback")
    issues: list[Issue] = []
    items = []
    for i, item in enumerate(body["feedback"]):
        where = f"feedback[{i}]"
        if not isinstance(item, dict):
            issues.append(Issue("structure", "Each feedback entry must be an object.", where))
            continue
        found = _feedback_issues(item, where)
        issues += found
        if not found:
            items.append({**item, "card": UUID.fullmatch(item["card"])[1].lower()})  # type: ignore[index]
    if issues:
        raise InvalidInput(issues)
    return items


def _feedback_issues(item: dict, where: str) -> list[Issue]:
    issues = []
    if not isinstance(item.get("card"), str) or not UUID.fullmatch(item["card"]):
        issues.append(Issue("value", "card must be the uuid of a card.", f"{where}.card"))
    if item.get("outcome") not in ("accepted", "overridden"):
        issues.append(Issue("value", "outcome must be accepted or overridden.", f"{where}.outcome"))
    when = item.get("outcomeTimestamp")
    if not isinstance(when, str) or not ZONED.search(when) or date_range(when) is None:
        issues.append(Issue("value", "outcomeTimestamp must be an ISO date and time.", f"{where}.outcomeTimestamp"))
    accepted = item.get("acceptedSuggestions")
    if item.get("outcome") == "accepted" and not (
            isinstance(accepted, list) and accepted
            and all(isinstance(a, dict) and isinstance(a.get("id"), str) and a["id"] for a in accepted)):
        issues.append(Issue("required", "An accepted outcome needs acceptedSuggestions, each with an id.",
                            f"{where}.acceptedSuggestions"))
    reason = item.get("overrideReason")
    if reason is not None and not _override_reason_ok(reason):
        issues.append(Issue("value", "overrideReason holds a reason Coding (with a code) and/or a userComment.",
                            f"{where}.overrideReason"))
    return issues


def _override_reason_ok(reason: Any) -> bool:
    if not isinstance(reason, dict) or not reason:
        return False
    coding, comment = reason.get("reason"), reason.get("userComment")
    coding_ok = coding is None or (isinstance(coding, dict) and isinstance(coding.get("code"), str)
                                   and all(isinstance(coding.get(k, ""), str) for k in ("system", "display")))
    comment_ok = comment is None or (isinstance(comment, str) and len(comment) <= MAX_COMMENT)
    return coding_ok and comment_ok and (coding is not None or comment is not None)


async def _card_target(store: Store, card: str) -> dict | None:
    """What a card was about: the Task whose identifier it carries, or the outcome Observation (info card)."""
    for resource_type, system in (("Task", systems.SID_TASK), ("Observation", systems.SID_OBSERVATION)):
        found = next(matches(await store.search_page(resource_type, {"identifier": f"{system}|{card}"})), None)
        if found:
            return found
    return None


async def _record(store: Store, item: dict, author: str) -> int:
    """Writes one feedback on its Task (If-Match, re-read on a conflict); 1 if the Task changed."""
    for _ in range(WRITE_RETRIES + 1):
        task = next(matches(await store.search_page("Task", {"identifier": f"{systems.SID_TASK}|{item['card']}"})),
                    None)
        if task is None:
            return 0
        updated = with_feedback(task, item, author, instant(datetime.now(UTC)))
        if updated is None:
            return 0  # this feedback is already on the Task
        # HAPI's validator refuses a transaction entry without a fullUrl (its references have no base otherwise).
        entry = {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": updated,
                 "request": {"method": "PUT", "url": f"Task/{task['id']}"}}
        version = task.get("meta", {}).get("versionId")
        if version:
            entry["request"]["ifMatch"] = f'W/"{version}"'
        try:
            await store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [entry]})
            return 1
        except FhirError as error:
            if error.status not in (409, 412):
                raise
    raise invalid("conflict", "The Task kept changing while the feedback was written; send it again.", status=409)


def with_feedback(task: dict, item: dict, author: str, now: str) -> dict | None:
    """The Task with this feedback recorded (a note, and the status it implies); None if already recorded.

    accepted: a Task awaiting a decision becomes `accepted`. overridden: a
    Task awaiting a decision becomes `rejected`, with the override reason as
    its statusReason; one already accepted keeps its status (a card
    dismissed later does not undo work under way), and gets the note only.
    """
    note = {"authorString": author, "time": item["outcomeTimestamp"], "text": _note_text(item)}
    if any(n.get("time") == note["time"] and n.get("text") == note["text"] for n in task.get("note", [])):
        return None
    updated = dict(task)
    updated["note"] = [*task.get("note", []), note]
    updated["lastModified"] = now
    if task.get("status") in cds_cards.AWAITING:
        if item["outcome"] == "accepted":
            updated["status"] = "accepted"
        else:
            updated["status"] = "rejected"
            updated["statusReason"] = _status_reason(item.get("overrideReason") or {})
    return updated


def _note_text(item: dict) -> str:
    if item["outcome"] == "accepted":
        ids = ", ".join(a["id"] for a in item["acceptedSuggestions"])
        return f"CDS Hooks card accepted (suggestion {ids})."
    reason = item.get("overrideReason") or {}
    coding = reason.get("reason") or {}
    text = "CDS Hooks card overridden"
    if coding:
        text += f"; reason: {coding.get('display') or coding['code']}"
    if reason.get("userComment"):
        text += f"; comment: {reason['userComment']}"
    return text + "."


def _status_reason(reason: dict) -> dict:
    coding = reason.get("reason")
    concept: dict[str, Any] = {}
    if coding:
        concept["coding"] = [{k: coding[k] for k in ("system", "code", "display") if coding.get(k)}]
    concept["text"] = (coding or {}).get("display") or reason.get("userComment") or "Overridden in the EHR"
    return concept
