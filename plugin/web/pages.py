"""The patient's pages: the form and its plain-language result (the clinician's pages are in results_pages).

Rendered on the server with Jinja2 (autoescaping on, so no answer or id can
inject markup); the pages load only the plugin's own script and styles.
A form opened from a portal link names the patient (`?patient=Patient/x`,
signed with `sig` when BACKPAIN_FORM_SECRET is set) and is saved with its
results; without a patient it is scored and shown, not saved. A clinician's
link (`&clinician=1`, its `sig` over `Patient/x|clinician`) also shows the
clinician group, which a patient's form leaves out.

Safety: a red flag answered Yes is acted on before the rest of the form.
The page's script shows the advice at once and sends the answers so far
(`POST /form/progress`, an `in-progress` response); without the script,
the red-flag part has its own "send these answers now" button. A form
with an answer that cannot be taken (an age of 200) comes back with the
message beside the field, its answers kept, the red-flag advice on top,
and (for a named patient) the valid answers saved as `in-progress`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from plugin.fhir import formats
from plugin.fhir.client import FhirError
from plugin.observability import event
from plugin.screening import data, references
from plugin.screening.criteria import rule_facts
from plugin.screening.displays import concept_text
from plugin.screening.identity import token
from plugin.screening.outcome import InvalidInput, Issue, invalid
from plugin.settings import ServiceSettings
from plugin.stores.writeback import prepare, save
from plugin.web import form
from plugin.web.security import refused, same
from plugin.web.service import Service, service

TEMPLATES = Environment(loader=PackageLoader("plugin.web", "templates"), autoescape=select_autoescape(["html"]),
                        trim_blocks=True, lstrip_blocks=True)


def readable_date(value: object) -> str:
    """A FHIR date or dateTime as people read it: "3 Dec 2026, 07:43 UTC", "3 Dec 2026"; anything else (a
    year alone, a value off the calendar) as it is."""
    text = str(value or "")
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is not None:
            moment = moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return text
    if "T" not in text:
        return f"{moment.day} {moment:%b %Y}"
    return f"{moment.day} {moment:%b %Y}, {moment:%H:%M}" + (" UTC" if moment.tzinfo is not None else "")


TEMPLATES.filters["when"] = readable_date
TEMPLATES.filters["name"] = concept_text  # a code's text, else its (published) display
SCREENING_ID = "back-pain-screening"
# Scoring needs a subject to point results at; an unsaved form's results go nowhere, so any name does.
UNSAVED_SUBJECT = "Patient/unsaved-form"
FORM_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
RED_FLAG_STAGE = "red-flags"  # the no-script "send these answers now" button

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
        "Some of your answers are features of inflammatory back pain or of a related condition. Your care team "
        "will look at them and may refer you to a rheumatologist (a joint and spine specialist).", "refer"),
    "test-hla-b27": (
        "A blood test may help",
        "Some of your answers are features of inflammatory back pain. Your care team may suggest a blood "
        "test (HLA-B27) to help decide what to do next.", "refer"),
    "no-referral-indicated": (
        "No signs of inflammatory back pain",
        "Your answers do not meet the criteria for inflammatory back pain, and you reported no warning signs. "
        "This does not rule out every cause of back pain.", "calm"),
    "not-applicable": (
        "This check does not apply to your back pain",
        "This check is for back pain that has lasted 3 months or more and started before age 45. "
        "Your care team will look at your answers. If your pain changes or gets worse, talk to your doctor.",
        "calm"),
    "indeterminate": (
        "We need a few more answers",
        "Some questions were not answered, so we cannot say what your answers mean yet. "
        "Your care team will look at them, or you can fill in the form again.", "unknown"),  # amber: not all clear
}
URGENT_OUTCOMES = ("emergency-assessment", "urgent-assessment")


def wants_html(request: Request) -> bool:
    """A browser asking for a page (not an API client asking for FHIR)."""
    if request.query_params.get("_format"):
        return False
    accept = request.headers.get("accept", "")
    return "text/html" in accept and "fhir" not in accept


def page(name: str, status: int = 200, **context: object) -> HTMLResponse:
    return HTMLResponse(TEMPLATES.get_template(name).render(**context), status_code=status)


def error_page(request: Request, issues: list[Issue], status: int, headers: dict | None = None) -> Response:
    """An error as a page: the clinician's results have their own (a patient's form is not where they came from)."""
    name = "results_error.html" if request.url.path.startswith("/results") else "error.html"
    answer = page(name, status, code=status, issues=issues)
    answer.headers.update(headers or {})
    return answer


def screening_questionnaire() -> dict:
    return next(q for q in data.definitions("Questionnaire") if q["id"] == SCREENING_ID)


def signature(patient: str, secret: str, *, clinician: bool = False) -> str:
    """What a portal puts in `sig` for a link naming `patient` (an EHR, for a clinician's link)."""
    message = f"{patient}|clinician" if clinician else patient
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who the form is for, from its link: the patient (if named and signed) and whether a clinician fills it."""

    patient: str | None
    clinician: bool
    sig: str

    def link(self) -> str:
        """The form's own link, to fill it in again for the same patient."""
        params = {"patient": self.patient, "clinician": "1" if self.clinician else None, "sig": self.sig or None}
        query = urlencode({k: v for k, v in params.items() if v})
        return f"/?{query}" if query else "/"


def _viewer(values: dict[str, str], settings: ServiceSettings) -> Viewer:
    """The link's patient and role, when its signature holds.

    Without a form secret a link is trusted only while the rest of the API is
    open too: with an ingest token set, an unsigned form must not become a
    way round it (anyone could write results for any patient).
    """
    patient = (values.get("patient") or "").strip() or None
    clinician = values.get("clinician") == "1"
    secret = settings.form_secret
    if (patient or clinician) and secret is None and settings.ingest_token is not None:
        raise refused(403)
    signed = bool(patient) and same(values.get("sig"), signature(patient or "", secret or "", clinician=clinician))
    if secret and (patient or clinician) and not signed:
        raise refused(403)
    # The rule every response meets, in its relative form (what the link is signed over and saved under),
    # refused when the form is opened rather than after the patient filled it in.
    if patient and references.patient_reference(patient) != patient:
        raise invalid("value", "The link names no patient this form can be saved for (it needs Patient/{id}).")
    return Viewer(patient, clinician, values.get("sig", "") if patient else "")


def _fields(viewer: Viewer) -> tuple[form.Field, ...]:
    return form.fields(screening_questionnaire(), clinician=viewer.clinician, urgency=rule_facts().flag_urgency)


def _form(viewer: Viewer, status: int = 200, **context: object) -> HTMLResponse:
    questionnaire = screening_questionnaire()
    context = {"values": {}, "errors": {}, "form_id": str(uuid.uuid4()), "advice": None, **context}
    return page("form.html", status, title=questionnaire.get("title", "Back pain questions"), viewer=viewer,
                fields=_fields(viewer), messages=PATIENT_MESSAGES, **context)


async def form_page(request: Request) -> Response:
    return _form(_viewer(dict(request.query_params), service(request).settings))


async def _read_form(request: Request) -> tuple[Service, dict[str, str], Viewer]:
    svc = service(request)
    values = _form_values(await formats.read_body(request, svc.settings.max_body_bytes))
    return svc, values, _viewer(values, svc.settings)


def _form_id(values: dict[str, str]) -> str | None:
    """The opened form's id (a UUID the page carries), or None for a hand-made post."""
    given = values.get("form-id", "")
    return given if FORM_ID.match(given) else None


async def submitted(request: Request) -> Response:
    """The form came back: score it, save it when a patient is named, and tell the patient what it means.

    An answer that cannot be taken sends the form back (400) with the
    message beside it; "send these answers now" (red flags, no script)
    sends it back (200) with the advice on top. Both keep what was typed,
    and save the valid answers as `in-progress` for a named patient.
    """
    svc, values, viewer = await _read_form(request)
    questionnaire, shown = screening_questionnaire(), _fields(viewer)
    compiled = svc.screener.questionnaires[questionnaire["url"]]
    errors = form.problems(shown, compiled, values)
    form_id = _form_id(values) or str(uuid.uuid4())
    if errors or values.get("stage") == RED_FLAG_STAGE:
        saved, label = await _save_progress(svc, viewer, values, form_id)
        return _form(viewer, 400 if errors else 200, values=values, errors=errors, form_id=form_id,
                     advice=PATIENT_MESSAGES[label] if label in URGENT_OUTCOMES else None, progress_saved=saved)
    qr = form.response(questionnaire, compiled, shown, values, viewer.patient or UNSAVED_SUBJECT,
                       datetime.now(UTC), form_id=form_id if viewer.patient else None)
    job = prepare(svc.screener, qr)
    svc.count(job.outcome.label)
    saved = not_sent = False
    if viewer.patient:
        try:
            svc.log_written(job.outcome.label, await save(svc.store, job))
            saved = True
        except (FhirError, InvalidInput) as error:
            not_sent = True
            _not_saved(svc, error)
    headline, advice, tone = PATIENT_MESSAGES.get(job.outcome.label, PATIENT_MESSAGES["indeterminate"])
    return page("patient_result.html", headline=headline, advice=advice, tone=tone, saved=saved,
                not_sent=not_sent, again=viewer.link(), unanswered_flags=_unanswered_flags(shown, values),
                safety_net=data.safety_netting("patient"))  # the rules' wording: one text for every result


async def progress(request: Request) -> Response:
    """The page's script sends the answers so far when a red flag is answered Yes: saved as `in-progress`."""
    svc, values, viewer = await _read_form(request)
    form_id = _form_id(values)
    if form_id is None:
        raise invalid("value", "The form's id is missing: reload the form.", "form-id")
    saved, label = await _save_progress(svc, viewer, values, form_id)
    return JSONResponse({"saved": saved, "outcome": label})


async def _save_progress(svc: Service, viewer: Viewer, values: dict[str, str], form_id: str) -> tuple[bool, str]:
    """Saves the valid answers so far as an `in-progress` response for a named patient (one response per
    opened form); whether it was saved, and what the answers so far would mean (their red flags)."""
    questionnaire = screening_questionnaire()
    compiled = svc.screener.questionnaires[questionnaire["url"]]
    qr = form.response(questionnaire, compiled, _fields(viewer), values, viewer.patient or UNSAVED_SUBJECT,
                       datetime.now(UTC), status="in-progress", form_id=form_id)
    label = prepare(svc.screener, {**qr, "status": "completed"}).outcome.label  # what it says so far
    if not viewer.patient:
        return False, label
    try:
        job = prepare(svc.screener, qr)
        if job.outcome.bundle.get("entry"):  # the rules act on an in-progress response (its red flags)
            await save(svc.store, job)
        else:
            await svc.store.update_where("QuestionnaireResponse",
                                         {"identifier": token(form.FORM_SYSTEM, form_id, in_url=False)}, qr)
        event("form progress saved", event="form-progress", outcome=label)
        return True, label
    except (FhirError, InvalidInput) as error:
        _not_saved(svc, error)
        return False, label


def _not_saved(svc: Service, error: Exception) -> None:
    svc.metrics.store_errors.inc()
    event("form not saved", event="form-not-saved", reason=type(error).__name__, status=getattr(error, "status", None))


def _unanswered_flags(shown: tuple[form.Field, ...], values: dict[str, str]) -> list[str]:
    """The red-flag questions left empty: the result names them, so it never reassures about them."""
    return [f.text for f in form.walk(shown) if f.urgency and not values.get(f.link_id, "").strip()]


def _form_values(raw: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=500, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise invalid("structure", "The form could not be read.") from None
    return dict(pairs)
