"""SDC `$populate` over HTTP: `POST /Questionnaire/$populate` and `POST /Questionnaire/{id}/$populate`.

Reads the Parameters (SDC 3.0.0: identifier | canonical | questionnaire |
questionnaireRef, subject, context (name, content), local), fetches the
Patient, the lab results and the patient's earlier responses from the store
in one round trip, and hands them to the pure `populate`. Errors:
400 for unusable Parameters (no subject, two ways of naming the Questionnaire),
404 for a Questionnaire that is not published here, 422 for a Patient that
cannot be had (not on the FHIR server; or the embedded store, which keeps no
Patients, and no `patient` context part).

The embedded store holds no Patients (they live in the clinic's systems), so
there the caller passes the Patient as `context` (name `patient`), as SDC
launch contexts do. `local` defaults to true (this server is the record's
companion); `local` = false uses only what the Parameters carry.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from plugin.ehr.populate import LAB_CODES, LOINC, Known, populate
from plugin.fhir import formats
from plugin.fhir.client import matches
from plugin.screening import data, references
from plugin.screening.outcome import InvalidInput, Issue, invalid, model_issue
from plugin.stores.store import Store
from plugin.web.security import require_bearer
from plugin.web.service import service

QUESTIONNAIRE_REF = re.compile(r"(?:.*/)?Questionnaire/([A-Za-z0-9\-.]{1,64})")
CHOOSERS = ("identifier", "canonical", "questionnaire", "questionnaireRef")
KNOWN = frozenset({*CHOOSERS, "subject", "context", "local", "launchContext"})
SEARCH_COUNT = "100"  # results and responses of one patient: the latest are on the first page (sorted)


async def populate_type(request: Request) -> Response:
    """`POST /Questionnaire/$populate`: the Questionnaire named in the Parameters."""
    params = await _parameters(request)
    return await _populate(request, params, _chosen(params))


async def populate_instance(request: Request) -> Response:
    """`POST /Questionnaire/{id}/$populate`: that Questionnaire; naming one in the Parameters is ignored (SDC)."""
    params = await _parameters(request)
    wanted = request.path_params["id"]
    found = next((q for q in data.definitions("Questionnaire") if q.get("id") == wanted), None)
    if found is None:
        raise invalid("not-found", f"Questionnaire/{wanted} is not published here.", status=404)
    return await _populate(request, params, found)


async def _populate(request: Request, params: list[dict], questionnaire: dict) -> Response:
    svc = service(request)
    subject, patient_id = _subject(params, svc.settings.fhir_base_url)
    context_patient = _context_patient(params, patient_id, svc.settings.fhir_base_url)
    local = _local(params)
    known = await _known(svc.store, patient_id, context_patient, local)
    now = svc.screener.clock().astimezone()  # the server's own zone: an age changes at local midnight
    populated = populate(questionnaire, subject, known, now)
    return formats.reply(populated.parameters(), formats.wanted(request))


# -- reading the Parameters ----------------------------------------------------------


async def _parameters(request: Request) -> list[dict]:
    svc = service(request)
    require_bearer(request, svc.settings.ingest_token)  # the answer carries the patient's record
    limit = svc.settings.max_body_bytes
    body = await formats.read_resource(request, limit)
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise invalid("invalid", "$populate takes a Parameters resource.", "resourceType")
    params = body.get("parameter", [])
    if not isinstance(params, list) or not all(isinstance(p, dict) and isinstance(p.get("name"), str)
                                               for p in params):
        raise invalid("structure", "Each parameter must be an object with a name.", "Parameters.parameter")
    unknown = sorted({p["name"] for p in params} - KNOWN)
    if unknown:
        raise invalid("not-supported", f"Unknown $populate parameter {unknown[0]!r}.", "Parameters.parameter")
    return params


def _named(params: list[dict], name: str) -> list[dict]:
    return [p for p in params if p["name"] == name]


def _one(params: list[dict], name: str) -> dict | None:
    found = _named(params, name)
    if len(found) > 1:
        raise invalid("structure", f"Parameter {name!r} appears more than once.", "Parameters.parameter")
    return found[0] if found else None


def _chosen(params: list[dict]) -> dict:
    """The published Questionnaire the type-level call names: exactly one of identifier, canonical,
    questionnaire or questionnaireRef (SDC)."""
    given = [name for name in CHOOSERS if _named(params, name)]
    if len(given) != 1:
        raise invalid("required", "Name the Questionnaire with exactly one of identifier, canonical, questionnaire "
                      "or questionnaireRef (or call Questionnaire/{id}/$populate).", "Parameters.parameter")
    name = given[0]
    param = _one(params, name) or {}
    published = data.definitions("Questionnaire")
    if name == "canonical":
        value = param.get("valueUri", param.get("valueCanonical"))
        if not isinstance(value, str):
            raise invalid("invalid", "Parameter 'canonical' must be a valueUri (or valueCanonical).",
                          "Parameters.parameter.where(name='canonical')")
        found = _by_canonical(value, published)
        label = f"{value!r}"
    elif name == "identifier":
        value = param.get("valueIdentifier")
        found = next((q for q in published if isinstance(value, dict) and any(
            i.get("system") == value.get("system") and i.get("value") == value.get("value")
            for i in q.get("identifier", []))), None)
        label = "with that identifier"
    elif name == "questionnaireRef":
        value = param.get("valueReference")
        reference = value.get("reference") if isinstance(value, dict) else None
        match = QUESTIONNAIRE_REF.fullmatch(reference) if isinstance(reference, str) else None
        found = next((q for q in published if match and q.get("id") == match[1]), None)
        label = f"{reference!r}"
    else:
        found = _inline(param.get("resource"), published)
        label = "given inline"
    if found is None:
        raise invalid("not-found", f"No Questionnaire {label} is published here; see GET /Questionnaire.",
                      f"Parameters.parameter.where(name='{name}')", status=404)
    return found


def _by_canonical(canonical: str, published: list[dict]) -> dict | None:
    url, _, version = canonical.partition("|")
    return next((q for q in published if q.get("url") == url and version in ("", q.get("version"))), None)


def _inline(resource: Any, published: list[dict]) -> dict | None:
    """An inline Questionnaire is accepted as the published one it names (by url and version): the
    prefill rules are this plugin's, so an unknown form has nothing they apply to."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Questionnaire":
        raise invalid("invalid", "Parameter 'questionnaire' must hold a Questionnaire resource.",
                      "Parameters.parameter.where(name='questionnaire')")
    url = resource.get("url")
    canonical = f"{url}|{resource['version']}" if isinstance(resource.get("version"), str) else url
    return _by_canonical(canonical, published) if isinstance(canonical, str) else None


def _subject(params: list[dict], fhir_base: str | None) -> tuple[dict, str | None]:
    """The subject Reference as given, and the Patient id it names (None for a logical reference)."""
    param = _one(params, "subject")
    where = "Parameters.parameter.where(name='subject')"
    if param is None:
        raise invalid("required", "Parameter 'subject' (a Reference to the Patient) is required.", where)
    reference = param.get("valueReference")
    if not isinstance(reference, dict) or not (reference.get("reference") or reference.get("identifier")):
        raise invalid("required", "Parameter 'subject' must be a valueReference to a Patient.", where)
    text = reference.get("reference")
    if text is None:
        return reference, None
    found = references.patient_id(text, fhir_base)
    if found is None:
        raise invalid("invalid", f"The subject must reference a Patient as {references.ACCEPTED_FORMS}: "
                      "the Questionnaire is about patients.", where)
    return {**reference, "reference": f"Patient/{found}"}, found


def _context_patient(params: list[dict], subject_id: str | None, fhir_base: str | None) -> dict | None:
    """The Patient passed as context `patient` (SDC launch context), checked as FHIR R4."""
    patients = []
    for i, param in enumerate(_named(params, "context")):
        parts = {p.get("name"): p for p in param.get("part", []) if isinstance(p, dict)}
        name = (parts.get("name") or {}).get("valueString")
        if name != "patient":
            said = f"Context {name!r} is" if isinstance(name, str) else "A context without a name part is"
            raise invalid("not-supported", f"{said} not a launch context of this Questionnaire (it declares "
                          "'patient').", f"Parameters.parameter[{i}]")
        content = parts.get("content") or {}
        if isinstance(content.get("valueReference"), dict):  # a reference: the store is asked as without one
            reference = content["valueReference"].get("reference")
            named = references.patient_id(reference, fhir_base)
            if named is None or named != subject_id:
                raise invalid("invalid", "A 'patient' context given by reference must name the subject.",
                              f"Parameters.parameter[{i}]", status=422)
            continue
        patients.append(content.get("resource"))
    if not patients:
        return None
    if len(patients) > 1:
        raise invalid("structure", "Only one 'patient' context may be given.", "Parameters.parameter")
    patient = patients[0]
    if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
        raise invalid("invalid", "The 'patient' context must hold a Patient resource in its content part.",
                      "Parameters.parameter.where(name='context')")
    _check_patient(patient)
    if subject_id and patient.get("id") not in (None, subject_id):
        raise invalid("invalid", "The 'patient' context is a different Patient from the subject.",
                      "Parameters.parameter.where(name='context')", status=422)
    return patient


def _check_patient(patient: dict) -> None:
    from fhir.resources.R4B.patient import Patient
    from pydantic import ValidationError

    try:
        Patient.model_validate(patient)
    except ValidationError as error:
        raise InvalidInput([model_issue("Patient", e, set(patient)) for e in error.errors()[:20]]) from None
    except (ValueError, TypeError):
        raise InvalidInput([Issue("structure", "The 'patient' context is not a valid FHIR Patient.")]) from None


def _local(params: list[dict]) -> bool:
    param = _one(params, "local")
    if param is None:
        return True
    value = param.get("valueBoolean")
    if not isinstance(value, bool):
        raise invalid("invalid", "Parameter 'local' must be a valueBoolean.", "Parameters.parameter")
    return value


# -- what the store knows ------------------------------------------------------------


async def _known(store: Store, patient_id: str | None, patient: dict | None, local: bool) -> Known:
    if not local:
        return Known(patient, unsearched="no server data was asked for (local = false)")
    patient_id = patient_id or (patient or {}).get("id")
    if patient_id is None:  # a logical subject (identifier only) and no Patient with an id to go by
        return Known(patient, unsearched="the subject names no Patient id to look up")
    reference = f"Patient/{patient_id}"
    codes = ",".join(f"{LOINC}|{code}" for code in sorted(LAB_CODES))
    urls = [f"Observation?{urlencode({'patient': reference, 'code': codes, '_sort': '-date', '_count': SEARCH_COUNT})}",
            f"QuestionnaireResponse?{urlencode({'patient': reference, '_sort': '-authored', '_count': SEARCH_COUNT})}"]
    if patient is None:
        if not store.holds_patients:
            raise invalid("not-found", "The embedded store keeps no Patients: pass the Patient as a 'context' "
                          "parameter named 'patient'.", "Parameters.parameter.where(name='subject')", status=422)
        urls.append(reference)
    found = await store.read_many(urls)
    if patient is None:
        patient = found[2]
        if patient is None:
            raise invalid("not-found", f"{reference} is not on the FHIR server.",
                          "Parameters.parameter.where(name='subject')", status=422)
    return Known(patient, list(matches(found[0])), list(matches(found[1])))
