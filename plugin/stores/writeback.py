"""Writes to a FHIR server: publishing the definitions, and a scored response with its results.

A thin shell over the pure core: the Bundle comes from the Screener; this
module only decides what to send and reports what the server did.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

from plugin.fhir.client import FhirError, matches
from plugin.screening import data, systems
from plugin.screening.identity import given_identifier, own_identifier, token
from plugin.screening.outcome import invalid
from plugin.screening.pipeline import Outcome, Screener
from plugin.screening.reconcile import plan, stored_key
from plugin.stores.keyed_locks import KeyedLocks
from plugin.stores.store import Store

# Published in this order: what the others depend on first (the extension the Observations carry).
CANONICAL_TYPES = ("StructureDefinition", "CodeSystem", "Questionnaire", "OperationDefinition")
CONFLICT_RETRIES = 3
RESPONSE_WRITERS = KeyedLocks()


@dataclass(frozen=True, slots=True)
class Written:
    """One entry of a transaction response: what it is and what the server did."""

    location: str  # Type/id as the server names it
    status: str  # "201" created, "200" already there or updated
    changed: bool = True  # False: already on the server as it should be, not written this time


async def publish(client: Store, screener: Screener) -> list[str]:
    """Puts the definitions (CANONICAL_TYPES) and the plugin's Device on the server, once each.

    Conditional updates on (url, version), and on the Device's identifier,
    so running it again updates in place instead of adding copies. Returns
    where each one is (Type/id).
    """
    written = []
    for resource_type in CANONICAL_TYPES:
        for resource in data.definitions(resource_type):
            body = {k: v for k, v in resource.items() if k != "id"}  # the server keeps its own id
            params = {"url": resource["url"], "version": resource["version"]}
            written.append(await _put(client, resource_type, params, body))
    for builder in screener.builders.values():
        device = builder.device["resource"]
        ident = device["identifier"][0]
        written.append(await _put(client, "Device", {"identifier": f"{ident['system']}|{ident['value']}"}, device))
    return written


async def _put(client: Store, resource_type: str, params: dict[str, str], body: dict) -> str:
    stored = await client.update_where(resource_type, params, body)
    return f"{resource_type}/{stored.get('id')}"


@dataclass(frozen=True, slots=True)
class Job:
    """One scored response and the identifiers its results are (or would be) stored under."""

    qr: dict
    outcome: Outcome
    observation_keys: list[str]
    task_keys: list[str]


@dataclass(frozen=True, slots=True)
class ServerState:
    """What the server holds for one response."""

    observations: dict[str, dict]  # identifier value -> stored resource
    tasks: dict[str, dict]
    response: dict | None


def prepare(screener: Screener, qr: dict) -> Job:
    """Scores a response (InvalidInput if it cannot be scored)."""
    outcome = screener.process(qr)
    entries = outcome.bundle.get("entry", [])
    if not entries:
        return Job(qr, outcome, [], [])
    builder = screener.builders[qr["questionnaire"].partition("|")[0]]
    observation_keys = [stored_key(e["resource"], systems.SID_OBSERVATION) or "" for e in entries
                        if e["resource"]["resourceType"] == "Observation"]
    return Job(qr, outcome, observation_keys, builder.task_identifiers(qr))


async def submit(client: Store, screener: Screener, qr: dict) -> tuple[Outcome, list[Written]]:
    """Scores a response and writes it with what the server does not hold yet, in one transaction.

    What the server already holds is read first, in one round trip; the
    patient must be among it.
    """
    job = prepare(screener, qr)
    return job.outcome, await save(client, job)


async def save(client: Store, job: Job, *, stored_response: dict | None = None) -> list[Written]:
    """Writes a scored response's results, after reading what the store holds for it (one round trip).

    `stored_response` is the response as the store already holds it (a
    notification, a sync): then it is neither read nor written again, and its
    patient is not looked up (the store took the response already).
    """
    if not job.outcome.bundle.get("entry"):
        return []
    if stored_response is not None:
        state = (await read_states(client, [job], with_responses=False))[0]
        return await write(client, job, state, stored_response=stored_response)
    async with RESPONSE_WRITERS.hold(_response_url(job.qr)):  # its patient is checked and written at once
        state = (await read_states(client, [job], with_responses=True, check_patient=True))[0]
        return await write(client, job, state)


async def write(client: Store, job: Job, state: ServerState, *, stored_response: dict | None = None) -> list[Written]:
    """Writes what `state` lacks of the job's results, in one transaction; where each result is.

    With `stored_response` (the response as read from the server) the
    response itself is not written again. A concurrent change to the same
    results (409/412) is met by reading again and planning again, never by overwriting it.
    """
    for attempt in range(CONFLICT_RETRIES + 1):
        if attempt:
            state = (await read_states(client, [job], with_responses=stored_response is None))[0]
        stored = stored_response or state.response
        _same_patient(job.qr, stored)
        todo = plan(job.outcome.bundle, state.observations, state.tasks, stored_response=stored,
                    include_response=stored_response is None, retracted=job.qr["status"] == "entered-in-error")
        kept = [Written(location, "200", changed=False) for location in todo.kept.values()]
        if todo.transaction is None:
            return kept
        try:
            response = await client.transaction(todo.transaction)
        except FhirError as error:
            if error.status in (409, 412) and attempt < CONFLICT_RETRIES:
                continue  # someone changed these results since we read them: read again
            raise
        return kept + [Written(_location(e), e["response"]["status"].split()[0]) for e in response.get("entry", [])]
    raise AssertionError("unreachable")


def _same_patient(qr: dict, stored: dict | None) -> None:
    """A response id or identifier already used for another patient's response: refuse, never overwrite it."""
    if stored and stored.get("subject", {}).get("reference") != qr["subject"]["reference"]:
        raise invalid("conflict", "A response with this id or identifier is already stored for another patient: "
                      "nothing was written.", "QuestionnaireResponse.id", status=409)


async def read_states(client: Store, jobs: list[Job], *, with_responses: bool,
                      check_patient: bool = False) -> list[ServerState]:
    """What the server holds for each job, read in one round trip (a batch of searches and reads).

    With `check_patient` the patients must already be on the server: results
    about a patient the EHR does not know would be orphans, so nothing is
    written and the caller is told (as InvalidInput: it is the response that is wrong).
    """
    observation_keys = [k for job in jobs for k in job.observation_keys]
    task_keys = [k for job in jobs for k in job.task_keys]  # none for BASDAI, which suggests no Tasks
    urls = [_search("Observation", systems.SID_OBSERVATION, observation_keys)]
    urls += [_search("Task", systems.SID_TASK, task_keys)] if task_keys else []
    searched = len(urls)
    if with_responses:
        urls += [_response_url(job.qr) for job in jobs]
    subjects = sorted({ref for job in jobs if (ref := job.qr["subject"]["reference"]).startswith("Patient/")}
                      if check_patient and client.holds_patients else ())
    found = await client.read_many(urls + subjects)
    for subject, patient in zip(subjects, found[len(urls):]):
        if patient is None:
            raise invalid("not-found", f"{subject} was not found in the record system: nothing was written.",
                          "QuestionnaireResponse.subject")
    observations = _by_identifier(found[0], systems.SID_OBSERVATION)
    tasks = _by_identifier(found[1], systems.SID_TASK) if task_keys else {}
    responses = found[searched:len(urls)] if with_responses else [None] * len(jobs)
    return [ServerState({k: observations[k] for k in job.observation_keys if k in observations},
                        {k: tasks[k] for k in job.task_keys if k in tasks}, _first_match(response))
            for job, response in zip(jobs, responses)]


def _first_match(found: dict | None) -> dict | None:
    if found and found.get("resourceType") == "Bundle":
        return next(matches(found), None)
    return found


def _search(resource_type: str, system: str, keys: list[str]) -> str:
    return f"{resource_type}?" + urlencode({"identifier": ",".join(f"{system}|{key}" for key in keys),
                                            "_count": str(len(keys))})


def _response_url(qr: dict) -> str:
    """The server's copy of the response: by id, or by the identifier it was written under."""
    if qr.get("id"):
        return f"QuestionnaireResponse/{qr['id']}"
    ident = given_identifier(qr) or own_identifier(qr)  # as the builder wrote it
    return "QuestionnaireResponse?" + urlencode({"identifier": token(ident.get("system"), ident["value"],
                                                                      in_url=False)})


def _by_identifier(searchset: dict | None, system: str) -> dict[str, dict]:
    return {key: resource for resource in matches(searchset) if (key := stored_key(resource, system))}


def _location(entry: dict) -> str:
    location = entry["response"].get("location", "")
    return "/".join(location.split("/_history/")[0].split("/")[-2:])
