"""The HTML pages: the patient form and its plain-language result, and the clinician's results view.

Rendered on the server with Jinja2 (autoescaping on, so no answer or id can
inject markup); the pages load only the plugin's own script and styles.
A form opened from a portal link names the patient (`?patient=Patient/x`,
signed with `sig` when BACKPAIN_FORM_SECRET is set) and is saved with its
results; without a patient it is scored and shown, not saved.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from urllib.parse import parse_qsl

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from plugin.fhir import formats
from plugin.fhir.client import FhirError
from plugin.observability import event
from plugin.screening import data, references
from plugin.screening.outcome import InvalidInput, Issue, invalid
from plugin.settings import ServiceSettings
from plugin.stores.writeback import prepare, read_states, save
from plugin.web import form
from plugin.web.access import session_allows
from plugin.web.security import refused, require_bearer, same
from plugin.web.service import service

TEMPLATES = Environment(loader=PackageLoader("plugin.web", "templates"), autoescape=select_autoescape(["html"]),
                        trim_blocks=True, lstrip_blocks=True)
SCREENING_ID = "back-pain-screening"
# Scoring needs a subject to point results at; an unsaved form's results go nowhere, so any name does.
UNSAVED_SUBJECT = "Patient/unsaved-form"
RESULT_ORDER = ("screening-outcome", "red-flags", "asas-ibp", "berlin-ibp", "spa-features", "mechanical-pattern")

# What each outcome means for the patient, in plain words: (headline, what to do, tone).
PATIENT_MESSAGES: dict[str, tuple[str, str, str]] = {
    "emergency-assessment": (
        "Seek urgent care now",
        "Some of your answers can be signs of a serious problem with the nerves in your lower back. "
        "Go to an emergency department now, or call your local emergency number. Do not wait for an appointment.",
        "emergency"),
    "urgent-assessment": (
        "Contact a doctor today",
        "Some of your answers need a doctor to check them soon. Please contact your doctor's practice today. "
        "If you feel very unwell, go to an emergency department.", "urgent"),
    "refer-rheumatology": (
        "Your care team may refer you to a specialist",
        "Your answers fit a type of back pain caused by inflammation. Your care team will look at them "
        "and may refer you to a rheumatologist (a joint and spine specialist).", "refer"),
    "test-hla-b27": (
        "A blood test may help",
        "Your answers fit a type of back pain caused by inflammation. Your care team may suggest a blood "
        "test (HLA-B27) to help decide what to do next.", "refer"),
    "no-referral-indicated": (
        "No signs of inflammatory back pain",
        "Your answers do not suggest back pain caused by inflammation, and no warning signs. "
        "If your pain changes or gets worse, talk to your doctor.", "calm"),
    "not-applicable": (
        "This check does not apply to your back pain",
        "This check is for back pain that has lasted 3 months or more and started before age 45. "
        "Your care team will look at your answers. If your pain changes or gets worse, talk to your doctor.",
        "calm"),
    "indeterminate": (
        "We need a few more answers",
        "Some questions were not answered, so we cannot say what your answers mean yet. "
        "Your care team will look at them, or you can fill in the form again.", "calm"),
}


def wants_html(request: Request) -> bool:
    """A browser asking for a page (not an API client asking for FHIR)."""
    if request.query_params.get("_format"):
        return False
    accept = request.headers.get("accept", "")
    return "text/html" in accept and "fhir" not in accept


def page(name: str, status: int = 200, **context: object) -> HTMLResponse:
    return HTMLResponse(TEMPLATES.get_template(name).render(**context), status_code=status)


def error_page(request: Request, issues: list[Issue], status: int, headers: dict | None = None) -> Response:
    answer = page("error.html", status, code=status, issues=issues)
    answer.headers.update(headers or {})
    return answer


def _questionnaire() -> dict:
    return next(q for q in data.definitions("Questionnaire") if q["id"] == SCREENING_ID)


def signature(patient: str, secret: str) -> str:
    """What a portal puts in `sig` for a link naming `patient`."""
    return hmac.new(secret.encode(), patient.encode(), hashlib.sha256).hexdigest()


def _patient(request_values: dict[str, str], settings: ServiceSettings) -> str | None:
    """The patient named by the link, when its signature holds.

    Without a form secret a link is trusted only while the rest of the API is
    open too: with an ingest token set, an unsigned form must not become a
    way round it (anyone could write results for any patient).
    """
    patient = (request_values.get("patient") or "").strip()
    if not patient:
        return None
    secret = settings.form_secret
    if secret is None and settings.ingest_token is not None:
        raise refused(403)
    if secret and not same(request_values.get("sig"), signature(patient, secret)):
        raise refused(403)
    named = references.patient_reference(patient, settings.fhir_base_url)  # the rule every response meets
    if named is None:  # refused when the form is opened, not after the patient filled it in
        raise invalid("value", "The link names no patient this form can be saved for.")
    return named


async def form_page(request: Request) -> Response:
    values = dict(request.query_params)
    patient = _patient(values, service(request).settings)
    questionnaire = _questionnaire()
    return page("form.html", title=questionnaire.get("title", "Back pain questions"),
                fields=form.fields(questionnaire), patient=patient, sig=values.get("sig", ""))


async def submitted(request: Request) -> Response:
    """The form came back: score it, save it when a patient is named, and tell the patient what it means.

    The patient always sees what their answers mean: answers that cannot be
    read are left out (and named on the page), and a store that refuses or is
    down costs only the saving (the page says so), never the message.
    """
    svc = service(request)
    raw = await formats.read_body(request, svc.settings.max_body_bytes)
    values = _form_values(raw)
    patient = _patient(values, svc.settings)
    questionnaire = _questionnaire()
    qr, unreadable = form.response(questionnaire, svc.screener.questionnaires[questionnaire["url"]], values,
                                   patient or UNSAVED_SUBJECT, datetime.now(UTC))
    job = prepare(svc.screener, qr)
    outcome = job.outcome
    svc.count(outcome.label)
    saved = not_sent = False
    if patient:
        try:
            svc.log_written(outcome.label, await save(svc.store, job))
            saved = True
        except (FhirError, InvalidInput) as error:
            not_sent = True
            svc.metrics.store_errors.inc()
            event("form not saved", event="form-not-saved", reason=type(error).__name__,
                  status=getattr(error, "status", None))
    headline, advice, tone = PATIENT_MESSAGES.get(outcome.label, PATIENT_MESSAGES["indeterminate"])
    questions = form.texts(questionnaire)
    return page("patient_result.html", headline=headline, advice=advice, tone=tone, saved=saved,
                not_sent=not_sent, unreadable=[questions.get(link_id, link_id) for link_id in unreadable])


def _form_values(raw: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=500, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise invalid("structure", "The form could not be read.") from None
    return dict(pairs)


async def results(request: Request) -> Response:
    """A response's stored results: HTML for a clinician, a searchset Bundle for machines."""
    svc = service(request)
    qr_id = request.path_params["id"]
    if not session_allows(request, qr_id):  # a clinician launched from the EHR for this response may see it
        require_bearer(request, svc.settings.ingest_token)
    qr = await svc.store.read(f"QuestionnaireResponse/{qr_id}")
    if qr is None:
        raise invalid("not-found", f"QuestionnaireResponse/{qr_id} is not in the store.", status=404)
    try:
        job = prepare(svc.screener, qr)  # for the identifiers its results are stored under
    except InvalidInput:
        raise invalid("not-supported", f"QuestionnaireResponse/{qr_id} is not a response this plugin scores.",
                      status=404) from None
    state = (await read_states(svc.store, [job], with_responses=False))[0] if job.observation_keys else None
    observations = list(state.observations.values()) if state else []
    tasks = list(state.tasks.values()) if state else []
    if not wants_html(request):
        entries = [{"resource": r, "search": {"mode": "match"}} for r in [*observations, *tasks]]
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}
        return formats.reply(bundle, formats.wanted(request))
    by_code = {o["code"]["coding"][0]["code"]: o for o in observations}
    ordered = [by_code[c] for c in RESULT_ORDER if c in by_code] + [
        o for c, o in by_code.items() if c not in RESULT_ORDER]
    stored_outcome = by_code.get("screening-outcome", {}).get("valueCodeableConcept", {}).get("coding", [{}])[0]
    return page("clinician_results.html", qr=qr, observations=[_view(o) for o in ordered], tasks=tasks,
                outcome=stored_outcome.get("code", "not yet scored"))


def _view(observation: dict) -> dict:
    """An Observation as the clinician table shows it: each criterion met, not met or unknown."""
    criteria = []
    for component in observation.get("component", []):
        value = component.get("valueBoolean")
        state = "met" if value is True else "not met" if value is False else "unknown"
        criteria.append({"name": component["code"]["coding"][0].get("display", ""), "state": state})
    value = observation.get("valueCodeableConcept", {}).get("text")
    if value is None:
        value = next((observation[k] for k in ("valueInteger", "valueBoolean", "valueQuantity")
                      if k in observation), None)
        if isinstance(value, dict):
            value = value.get("value")
    interpretation = (observation.get("interpretation") or [{}])[0].get("coding", [{}])[0].get("display")
    return {"title": observation["code"].get("text") or observation["code"]["coding"][0]["code"],
            "value": "unknown" if value is None else value, "interpretation": interpretation,
            "status": observation.get("status"), "criteria": criteria}
