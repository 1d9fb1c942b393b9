"""CDS Hooks cards from a patient's stored screening results: a pure function, no I/O.

What a clinician opening the chart is shown (`patient-view`):

- one card per screening Task that awaits a decision (status `requested` or
  `received`): the red-flag review (critical for emergency, warning for
  urgent), the rheumatology referral (warning) or the HLA-B27 test (info),
  each with a suggestion that accepts it;
- one info card when the latest screening is `indeterminate` (missing
  answers could change the decision), naming what to ask;
- nothing when the latest screening says no referral / not applicable and
  no Task awaits a decision, or when there is no screening at all.

A Task already accepted (or in progress, on hold) has had its decision, so it
makes no card: the EHR's worklist follows it from there. A Task still
awaiting a decision from an earlier screening keeps its card even when the
latest screening is benign (a decision is still owed), but drops to `info`
then (a red-flag review to `warning`: one nobody took up is a safety gap)
and says what the latest screening found.

A Task's card has the Task's identifier (a UUIDv5) as its `uuid`, so the
feedback endpoint finds the Task from the card alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from plugin.screening import data, systems
from plugin.screening.displays import NOT_PERFORMED, absent_reason, concept_text, display
from plugin.screening.identity import uuid5

SERVICE_ID = "backpain-screening"
SID_SERVICE_REQUEST = f"{systems.BASE}/sid/service-request"
OVERRIDE_REASONS_SYSTEM = f"{systems.BASE}/CodeSystem/cds-override-reasons"
AWAITING = frozenset({"requested", "received"})  # no decision taken on the Task yet
OPEN = ("requested", "received", "accepted", "ready", "in-progress", "on-hold")
FINDINGS = ("red-flags", "referral-")  # the results whose criteria the cards name
BENIGN = frozenset({"no-referral-indicated", "not-applicable"})
REFERRAL = (systems.SNOMED, "306290009")
REVIEW = (systems.RESULTS, "clinical-review")
HLA_B27_TEST = (systems.RESULTS, "hla-b27-test")
TASK_CODES = (REFERRAL, REVIEW, HLA_B27_TEST)
LAB_CATEGORY = {"coding": [{"system": systems.SNOMED, "code": "108252007", "display": "Laboratory procedure"}]}
OWNER_TYPES = ("Practitioner", "PractitionerRole", "Organization", "CareTeam")  # Task.owner / requester targets
REQUESTER_TYPES = ("Practitioner", "PractitionerRole", "Organization")
MAX_SUMMARY = 139  # the spec: "<140-character summary"
OVERRIDE_REASONS = [
    {"system": OVERRIDE_REASONS_SYSTEM, "code": "already-addressed", "display": "Already assessed or referred"},
    {"system": OVERRIDE_REASONS_SYSTEM, "code": "patient-declined", "display": "Patient declined"},
    {"system": OVERRIDE_REASONS_SYSTEM, "code": "not-appropriate", "display": "Not clinically appropriate"},
    {"system": OVERRIDE_REASONS_SYSTEM, "code": "answers-inaccurate",
     "display": "Answers do not reflect the patient's situation"},
]
# What could make a link, an image, HTML, an entity, emphasis, code or a table out of stored text (escaped with
# a backslash, as CommonMark allows); a list or heading marker is escaped where a text starts (`_md`). Bare URLs
# (which GFM renderers link by themselves) get a word joiner after their scheme or "www": shown, never linked.
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>#|!()~&])")
LINE_START = re.compile(r"^([-+=]|\d{1,9}[.)])")  # "- ", "+ ", "= " and "1. ", "1) " where a line starts
AUTOLINK = re.compile(r"(?i)(https?|ftp|mailto|www)")
WORD_JOINER = "\u2060"
DATE = re.compile(r"\d{4}-\d\d-\d\d")


@dataclass(frozen=True, slots=True)
class Kind:
    """What a Task asks for, and how its card says it."""

    name: str
    indicator: str
    summary: str
    accept_label: str
    orders: bool  # accepting it orders something (a ServiceRequest)
    reason_result: str  # the result whose criteria the card lists: "red-flags" or the strategy's "referral-*"


KINDS = {
    "emergency-review": Kind(
        "emergency-review", "critical",
        "Emergency assessment today: back-pain screening reports possible cauda equina red flags",
        "Accept: assess the patient today", False, "red-flags"),
    "urgent-review": Kind(
        "urgent-review", "warning",
        "Urgent assessment: back-pain screening reports red flags (infection, malignancy or fracture)",
        "Accept: assess the patient urgently", False, "red-flags"),
    "referral": Kind(
        "referral", "warning",
        "Consider rheumatology referral: back-pain screening suggests axial spondyloarthritis",
        "Accept: order a referral to rheumatology", True, "referral-"),
    "hla-b27-test": Kind(
        "hla-b27-test", "info",
        "Consider an HLA-B27 test: 3 NICE NG65 criteria met; refer to rheumatology if positive",
        "Accept: order an HLA-B27 test", True, "referral-"),
}
INDETERMINATE_SUMMARY = "Back-pain screening incomplete: missing answers could change the decision"


@dataclass(frozen=True, slots=True)
class Context:
    """The hook call's context, and where the plugin is reached (for links)."""

    patient: str  # Patient/id
    user: str | None  # e.g. Practitioner/id: who would accept a suggestion
    encounter: str | None  # Encounter/id
    base_url: str  # the plugin's public base URL, no trailing slash
    smart_launch: bool  # the EHR knows the plugin as a SMART app: link through /launch
    now: str  # FHIR instant, for authoredOn / lastModified
    results_access: Callable[[str], str] | None = None  # response id -> `access` of a plain results link


def cards(outcome: dict | None, tasks: list[dict], findings: dict[str, dict], ctx: Context) -> list[dict]:
    """The cards for one `patient-view` call.

    `outcome` is the latest screening-outcome Observation (or None), `tasks`
    the patient's open Tasks, `findings` Observations by `Observation/id`
    (the outcome's members, where known).
    """
    latest = outcome_code(outcome) if outcome else None
    outcome_ref = f"Observation/{outcome['id']}" if outcome and outcome.get("id") else None
    members = [findings[m] for m in member_refs(outcome) if m in findings
               and (result_code(findings[m]) or "").startswith(FINDINGS)] if outcome else []
    found = [task_card(t, kind, latest, outcome, outcome_ref, members, ctx)
             for t in tasks if (kind := task_kind(t)) and plugin_task(t, ctx.patient) and t.get("status") in AWAITING]
    found.sort(key=lambda c: ("critical", "warning", "info").index(c["indicator"]))
    if latest == "indeterminate" and outcome:
        found.append(indeterminate_card(outcome, members, ctx))
    return found


# -- reading the stored results ---------------------------------------------------------------


def outcome_code(observation: dict) -> str | None:
    return next((c.get("code") for c in _dicts(_get(observation, "valueCodeableConcept", "coding"))
                 if c.get("system") == systems.RESULTS), None)


def result_code(observation: dict) -> str | None:
    return next((c.get("code") for c in _dicts(_get(observation, "code", "coding"))
                 if c.get("system") == systems.RESULTS), None)


def member_refs(observation: dict) -> list[str]:
    return [ref for m in _dicts(observation.get("hasMember")) if isinstance(ref := m.get("reference"), str)]


def task_identifier(task: dict) -> str | None:
    return next((i["value"] for i in _dicts(task.get("identifier"))
                 if i.get("system") == systems.SID_TASK and isinstance(i.get("value"), str)), None)


def plugin_task(task: dict, patient: str) -> bool:
    """One of the plugin's screening Tasks, about this patient (a prefetch may hold others)."""
    return task_identifier(task) is not None and _get(task, "for", "reference") == patient


def task_kind(task: dict) -> Kind | None:
    codes = {(c.get("system"), c.get("code")) for c in _dicts(_get(task, "code", "coding"))}
    if REFERRAL in codes:
        return KINDS["referral"]
    if HLA_B27_TEST in codes:
        return KINDS["hla-b27-test"]
    if REVIEW in codes:
        return KINDS["emergency-review" if task.get("priority") == "stat" else "urgent-review"]
    return None


def criteria(observation: dict) -> tuple[list[str], list[str]]:
    """(criteria met, criteria not answered) of a result, by their display text."""
    met, unknown = [], []
    for component in _dicts(observation.get("component")):
        name = next((d for d in map(display, _dicts(_get(component, "code", "coding"))) if d), None)
        if not name:
            continue
        if component.get("valueBoolean") is True:
            met.append(name)
        elif "valueBoolean" not in component and absent_reason(component) not in (None, NOT_PERFORMED):
            unknown.append(name)  # a test not done is not an unanswered question
    return met, unknown


def reason_member(members: list[dict], kind: Kind) -> dict | None:
    return next((m for m in members if (result_code(m) or "").startswith(kind.reason_result)), None)


# -- cards -----------------------------------------------------------------------------------


def task_card(task: dict, kind: Kind, latest: str | None, outcome: dict | None, outcome_ref: str | None,
              members: list[dict], ctx: Context) -> dict:
    # no outcome known (not prefetched): the Task is taken as the current one
    from_latest = outcome_ref is None or _get(task, "reasonReference", "reference") == outcome_ref
    indicator = kind.indicator
    if from_latest:
        summary = kind.summary
    else:
        label = " ".join(_text(concept_text(task.get("code"))).split()) or kind.name
        summary = f"Earlier back-pain screening{_on(task.get('authoredOn'))} awaits a decision: {label}"
        if latest in BENIGN:
            # The latest screening found nothing: a referral or test decision is still owed, but not urgently.
            # A red-flag review nobody took up is a safety gap whatever came later: it stays a warning.
            indicator = "warning" if kind.name.endswith("-review") else "info"
    reason = reason_member(members, kind) if from_latest else None
    ident = task_identifier(task) or ""
    card: dict[str, Any] = {
        "uuid": ident,
        "summary": shorten(summary),
        "indicator": indicator,
        "detail": task_detail(task, kind, reason, None if from_latest else outcome,
                              _effective(outcome) if from_latest and outcome else task.get("authoredOn")),
        "source": source(ctx),
        "suggestions": [{"label": kind.accept_label, "uuid": uuid5(f"{ident}|accept"), "isRecommended": True,
                         "actions": accept_actions(task, kind, ctx)}],
        "selectionBehavior": "at-most-one",
        "overrideReasons": OVERRIDE_REASONS,
    }
    link = results_link(_text(_get(task, "focus", "reference")) or None, ctx)
    if link:
        card["links"] = [link]
    return card


def indeterminate_card(outcome: dict, members: list[dict], ctx: Context) -> dict:
    lines = [f"**{_md(_display(outcome) or 'Indeterminate')}**: back-pain screening{_on(_effective(outcome))}.", ""]
    for member in members:
        _, unknown = criteria(member)
        if unknown and _value_code(member) in (None, "indeterminate"):
            lines += [f"Not answered ({_md(_display_code(member))}), ask the patient:", *_bullets(unknown), ""]
    if len(lines) == 2:
        lines += ["Some answers are missing; open the screening results to see which.", ""]
    lines.append(FOOTER)
    card: dict[str, Any] = {
        "uuid": next((i.get("value") for i in _dicts(outcome.get("identifier"))
                      if i.get("system") == systems.SID_OBSERVATION), None) or uuid5(f"outcome|{outcome.get('id')}"),
        "summary": INDETERMINATE_SUMMARY,
        "indicator": "info",
        "detail": "\n".join(lines),
        "source": source(ctx),
    }
    response_ref = next((_text(d.get("reference")) or None for d in _dicts(outcome.get("derivedFrom"))), None)
    link = results_link(response_ref, ctx)
    if link:
        card["links"] = [link]
    return card


FOOTER = (f"{data.safety_netting('clinician')}\n\n"
          "_Suggested by backpain-screen from the patient's own answers; the clinician decides._")


def task_detail(task: dict, kind: Kind, reason: dict | None, latest: dict | None, when: str | None) -> str:
    """Markdown: the Task, the criteria met (and red flags not answered), the rule's source, what came later."""
    code = _text(concept_text(task.get("code"))) or kind.name
    lines = [f"**{_md(code)}** (priority {_md(_text(task.get('priority')) or 'routine')}), "
             f"from back-pain screening{_on(when)}.", ""]
    if reason is not None:
        met, unknown = criteria(reason)
        description = _text(task.get("description")).split(" Criteria met:")[0]
        if description:
            lines += [_md(description), ""]
        if met:
            lines += [f"Criteria met ({_md(_display_code(reason))}):", *_bullets(met), ""]
        if unknown and kind.reason_result == "red-flags":
            lines += ["Not answered, ask the patient:", *_bullets(unknown), ""]
        citation = _text(_get(reason, "method", "text"))
        if citation:
            lines += [f"Source: {_md(citation)}", ""]
    elif _text(task.get("description")):
        lines += [_md(task["description"]), ""]
    if latest is not None:
        lines += [f"The latest screening{_on(_effective(latest))} found: {_md(_display(latest) or 'no outcome')}.", ""]
    lines.append(FOOTER)
    return "\n".join(lines)


def source(ctx: Context) -> dict:
    return {"label": "backpain-screen: back-pain screening (ASAS, NICE NG65, NICE CKS red flags)",
            "url": f"{ctx.base_url}/Questionnaire/back-pain-screening",
            "icon": f"{ctx.base_url}/static/icon.svg",
            "topic": {"system": systems.RESULTS, "code": "screening-outcome", "display": "Back-pain screening outcome"}}


def results_link(response_ref: str | None, ctx: Context) -> dict | None:
    """The clinician results view: through SMART App Launch when the EHR has the plugin as a SMART app."""
    if not response_ref or not response_ref.startswith("QuestionnaireResponse/"):
        return None
    response_id = response_ref.split("/")[1]
    if ctx.smart_launch:
        context = orjson.dumps({"questionnaireResponse": f"QuestionnaireResponse/{response_id}"}).decode()
        return {"label": "Open the screening results", "url": f"{ctx.base_url}/launch", "type": "smart",
                "appContext": context}
    url = f"{ctx.base_url}/results/{response_id}"
    if ctx.results_access:
        url += f"?access={ctx.results_access(response_id)}"
    return {"label": "Open the screening results", "url": url, "type": "absolute"}


# -- the suggestion's actions -----------------------------------------------------------------


def accept_actions(task: dict, kind: Kind, ctx: Context) -> list[dict]:
    """What accepting does in the EHR: order the referral or test (if any) and mark the Task accepted."""
    actions = []
    order = service_request(task, kind, ctx) if kind.orders else None
    if order:
        what = "referral to rheumatology" if kind.name == "referral" else "HLA-B27 test"
        actions.append({"type": "create", "description": f"Order the {what}.", "resource": order})
    actions.append({"type": "update", "description": "Mark the screening task accepted.",
                    "resource": accepted_task(task, ctx, order)})
    return actions


def service_request(task: dict, kind: Kind, ctx: Context) -> dict:
    order: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "identifier": [{"system": SID_SERVICE_REQUEST, "value": uuid5(f"{task_identifier(task)}|service-request")}],
        "status": "active",
        "intent": "order",
    }
    if kind.name == "hla-b27-test":
        order["category"] = [LAB_CATEGORY]
    order["priority"] = task.get("priority", "routine")
    order["code"] = task["code"]
    order["subject"] = task["for"]
    if ctx.encounter:
        order["encounter"] = {"reference": ctx.encounter}
    order["authoredOn"] = ctx.now
    if _is(ctx.user, REQUESTER_TYPES):
        order["requester"] = {"reference": ctx.user}
    if task.get("reasonReference"):
        order["reasonReference"] = [task["reasonReference"]]
    if task.get("focus"):
        order["supportingInfo"] = [task["focus"]]
    if task.get("description"):
        order["note"] = [{"text": task["description"]}]
    return order


def accepted_task(task: dict, ctx: Context, order: dict | None) -> dict:
    """The Task as it is once accepted (an update carries the whole resource)."""
    updated = dict(task)  # its narrative names the task and why, not its status: it stays true
    updated["status"] = "accepted"
    updated["lastModified"] = ctx.now
    if _is(ctx.user, OWNER_TYPES):
        updated["owner"] = {"reference": ctx.user}
    if order:  # the order is not created yet, so it is named by its identifier
        updated["output"] = [{"type": {"text": "Order placed"},
                              "valueReference": {"type": "ServiceRequest", "identifier": order["identifier"][0]}}]
    return updated


# -- small helpers ----------------------------------------------------------------------------


def shorten(text: str) -> str:
    return text if len(text) <= MAX_SUMMARY else text[:MAX_SUMMARY - 1].rstrip() + "…"


def _is(reference: str | None, types: tuple[str, ...]) -> bool:
    return bool(reference) and reference.split("/")[0] in types and reference.count("/") == 1  # type: ignore[union-attr]


def _on(when: str | None) -> str:
    return f" of {when[:10]}" if isinstance(when, str) and DATE.match(when) else ""  # a date, or nothing


def _effective(observation: dict) -> str | None:
    return observation.get("effectiveDateTime") or observation.get("issued")


def _display(observation: dict) -> str | None:
    return _text(concept_text(observation.get("valueCodeableConcept"))) or None


def _value_code(observation: dict) -> str | None:
    return outcome_code(observation) if "valueCodeableConcept" in observation else None


def _display_code(observation: dict) -> str:
    return _text(concept_text(observation.get("code"))) or result_code(observation) or "result"


def _bullets(items: list[str]) -> list[str]:
    return [f"- {_md(item)}" for item in items]


def _md(text: str) -> str:
    """Text from a stored resource, escaped so it cannot become markdown links, images or HTML."""
    plain = AUTOLINK.sub(lambda m: m[1] + WORD_JOINER, " ".join(_text(text).split()))
    return LINE_START.sub(lambda m: m[1][:-1] + "\\" + m[1][-1], MARKDOWN_SPECIAL.sub(r"\\\1", plain))


def _get(resource: dict, element: str, key: str) -> object:
    value = resource.get(element)
    return value.get(key) if isinstance(value, dict) else None


def _dicts(value: object) -> list[dict]:
    """The objects in a list from stored data (anything else in it, or no list, gives none)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _text(value: object) -> str:
    """A string from stored data, or nothing: a prefetched resource is checked, not trusted."""
    return value if isinstance(value, str) else ""
