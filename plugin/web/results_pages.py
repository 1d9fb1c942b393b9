"""The clinician's pages: one response's results (`/results/{id}`) and the index of recent ones (`/results`).

Both need what the results need: the ingest bearer token, or for one
response a SMART launch session or a signed results link naming it. For
machines `/results/{id}` is a searchset Bundle of its Observations and Tasks.
"""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from plugin.fhir import formats
from plugin.screening import systems
from plugin.screening.displays import concept_text
from plugin.screening.outcome import InvalidInput, invalid
from plugin.stores.store import Store
from plugin.stores.writeback import prepare, read_states
from plugin.web import form, results_view
from plugin.web.access import session_allows
from plugin.web.pages import page, screening_questionnaire, wants_html
from plugin.web.security import require_bearer
from plugin.web.service import service

PAGE_SIZE = 25
MAX_PAGE_SIZE = 100
MAX_PAGES = 200  # each page reads the ones before it: older results are found by patient
URGENT = ("stat", "asap", "urgent")
URGENCY_RANK = {"emergency-assessment": 0, "urgent-assessment": 1, "indeterminate": 2, "test-hla-b27": 3,
                "refer-rheumatology": 3, "no-referral-indicated": 4, "not-applicable": 4}


async def results(request: Request) -> Response:
    """A response's stored results: HTML for a clinician, a searchset Bundle for machines."""
    svc = service(request)
    qr_id = request.path_params["id"]
    if not session_allows(request, qr_id):  # a clinician launched from the EHR for this response may see it
        if request.query_params.get("access"):
            raise invalid("forbidden", "This results link has expired or is not for this response. Open the "
                          "result again from the patient's record.", status=403)
        require_bearer(request, svc.settings.ingest_token)
    qr = await svc.store.read(f"QuestionnaireResponse/{qr_id}")
    patient = request.query_params.get("patient")
    if qr is None or (patient and (qr.get("subject") or {}).get("reference") != patient):
        raise invalid("not-found", f"QuestionnaireResponse/{qr_id} is not in the store"
                      f"{' for this patient' if patient else ''}.", status=404)
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
    shown = results_view.view(qr, observations, tasks, form.texts(screening_questionnaire()))
    return page("clinician_results.html", qr=qr, view=shown)


async def index(request: Request) -> Response:
    """Recent responses, for one patient (`?patient=Patient/x`) or everyone, a page at a time.

    Every open stat or urgent Task comes first, on every page, whatever the
    age of its response: an emergency is never on page 2, and a red flag
    written without a full screening (an unfinished or refused response)
    is listed too. Then the results, newest first across pages (`?page=n`,
    by the store's own paging, so results of the same moment are neither
    lost nor shown twice), the most urgent first within a page.
    """
    svc = service(request)
    require_bearer(request, svc.settings.ingest_token)
    patient = (request.query_params.get("patient") or "").strip()
    count = _whole(request.query_params.get("count"), "count", PAGE_SIZE, MAX_PAGE_SIZE)
    number = _whole(request.query_params.get("page"), "page", 1, MAX_PAGES)
    params = {"code": f"{systems.RESULTS}|screening-outcome", "_sort": "-date", "_count": str(count)}
    if patient:
        params["patient"] = patient
    outcomes, more = await _page(svc.store, params, number, count)
    responses = [_response_of(o) for o in outcomes]
    tasks = await _open_tasks(svc.store, responses)
    statuses = await _statuses(svc.store, responses)
    rows = sorted((_row(o, tasks, statuses) for o in outcomes), key=lambda r: r["date"], reverse=True)
    rows.sort(key=lambda r: r["rank"])  # stable: the newest first within each urgency
    link = {"patient": patient, "count": str(count) if count != PAGE_SIZE else ""}
    older = "/results?" + urlencode({k: v for k, v in {**link, "page": str(number + 1)}.items() if v}) if more else None
    urgent = await _needing_action(svc.store, patient)
    return page("results_index.html", rows=rows, urgent=urgent, patient=patient, next_link=older, number=number)


async def _needing_action(store: Store, patient: str) -> list[dict]:
    """Open Tasks of priority stat, asap or urgent, the most urgent then the oldest first (one search)."""
    params = {"status": ",".join(results_view.OPEN_TASK), "_count": str(MAX_PAGE_SIZE * 4)}
    if patient:
        params["patient"] = patient
    found = await store.search_page("Task", params)
    tasks = [e["resource"] for e in found.get("entry", []) if e.get("resource", {}).get("priority") in URGENT]
    tasks.sort(key=lambda t: (results_view.task_rank(t), t.get("authoredOn", "")))
    return [_urgent_row(t) for t in tasks]


def _urgent_row(task: dict) -> dict:
    response = (task.get("focus") or {}).get("reference", "")
    tone = "emergency" if task["priority"] == "stat" else "urgent"
    first, _, rest = task.get("description", "").partition(". ")  # the rest (criteria, questions) folds away
    return {"tone": tone, "icon": results_view.ICONS[tone], "priority": task["priority"],
            "what": concept_text(task.get("code")) or "Task", "summary": first.rstrip(".") + ".",
            "details": rest, "date": task.get("authoredOn", ""),
            "patient": (task.get("for") or {}).get("reference", ""), "link": _results_link(response)}


def _results_link(response: str) -> str | None:
    """The results page of `QuestionnaireResponse/{id}` (none for a response named only by identifier)."""
    return f"/results/{response.removeprefix('QuestionnaireResponse/')}" \
        if response.startswith("QuestionnaireResponse/") else None


async def _page(store: Store, params: dict[str, str], number: int, count: int) -> tuple[list[dict], bool]:
    """Page `number` of the search, and whether there is another after it."""
    skip, found = (number - 1) * count, []
    async for resource in store.search("Observation", params):
        if skip:
            skip -= 1
            continue
        if len(found) == count:
            return found, True
        found.append(resource)
    return found, False


def _whole(raw: str | None, name: str, default: int, most: int) -> int:
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise invalid("value", f"{name} must be a whole number from 1 to {most}.", name)
    return int(raw)


def _response_of(observation: dict) -> str:
    return next((r.get("reference", "") for r in observation.get("derivedFrom", [])
                 if r.get("reference", "").startswith("QuestionnaireResponse/")), "")


async def _open_tasks(store: Store, responses: list[str]) -> dict[str, list[dict]]:
    """Open Tasks by the response they are about, in one search."""
    wanted = [r for r in responses if r]
    if not wanted:
        return {}
    found = await store.search_page("Task", {"focus": ",".join(wanted), "status": ",".join(results_view.OPEN_TASK),
                                             "_count": str(MAX_PAGE_SIZE * 4)})
    by_response: dict[str, list[dict]] = {}
    for entry in found.get("entry", []):
        task = entry.get("resource", {})
        by_response.setdefault((task.get("focus") or {}).get("reference", ""), []).append(task)
    return by_response


async def _statuses(store: Store, responses: list[str]) -> dict[str, str]:
    """Each response's status (amended, entered-in-error), read in one round trip."""
    wanted = [r for r in responses if r]
    found = await store.read_many(wanted) if wanted else []
    return {ref: qr.get("status", "") for ref, qr in zip(wanted, found) if qr}


def _row(outcome: dict, tasks: dict[str, list[dict]], statuses: dict[str, str]) -> dict:
    code = results_view.outcome_code(outcome)
    response = _response_of(outcome)
    open_tasks = sorted(tasks.get(response, []), key=results_view.task_rank)
    tone, headline, _ = results_view.OUTCOMES.get(code, results_view.NOT_SCORED)
    return {"rank": URGENCY_RANK.get(code, 5), "tone": tone, "icon": results_view.ICONS[tone], "headline": headline,
            "code": code, "date": outcome.get("effectiveDateTime", ""), "status": statuses.get(response, ""),
            "patient": (outcome.get("subject") or {}).get("reference", ""), "tasks": open_tasks,
            "link": _results_link(response)}

