"""Writes to a FHIR server: publishing the definitions, and a scored response with its results.

A thin shell over the pure core: the Bundle comes from the Screener; this
module only decides what to send and reports what the server did.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlencode

from plugin import data, systems
from plugin.building import response_key, token, uuid5
from plugin.fhir_client import FhirError, matches
from plugin.outcome import invalid
from plugin.pipeline import Outcome, Screener
from plugin.reconcile import plan, stored_key
from plugin.store import Store

CANONICAL_TYPES = ("Questionnaire", "CodeSystem")
CONFLICT_RETRIES = 3


@dataclass(frozen=True, slots=True)
class Written:
    """One entry of a transaction response: what it is and what the server did."""

    location: str  # Type/id as the server names it
    status: str  # "201" created, "200" already there or updated


async def publish(client: Store, screener: Screener) -> list[str]:
    """Puts the Questionnaires, CodeSystems and the plugin's Device on the server, once each.

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


async def submit(client: Store, screener: Screener, qr: dict, *, include_response: bool = True,
                 stored_response: dict | None = None) -> tuple[Outcome, list[Written]]:
    """Scores a response and writes what the server does not hold yet, in one transaction.

    What the server already holds is read first, in one round trip; the
    patient must be among it. A concurrent change to the same results (409/412) is met by reading again
    and planning again, never by overwriting it.
    """
    outcome = screener.process(qr)
    entries = outcome.bundle.get("entry", [])
    if not entries:
        return outcome, []
    builder = screener.builders[qr["questionnaire"].partition("|")[0]]
    observation_keys = [stored_key(e["resource"], systems.SID_OBSERVATION) or "" for e in entries
                        if e["resource"]["resourceType"] == "Observation"]
    for attempt in range(CONFLICT_RETRIES + 1):
        state = await _server_state(client, qr, observation_keys, builder.task_identifiers(qr), attempt == 0)
        todo = plan(outcome.bundle, state.observations, state.tasks,
                    stored_response=stored_response if stored_response and attempt == 0 else state.response,
                    include_response=include_response, retracted=qr["status"] == "entered-in-error")
        if todo is None:
            return outcome, []
        try:
            response = await client.transaction(todo)
        except FhirError as error:
            if error.status in (409, 412) and attempt < CONFLICT_RETRIES:
                continue  # someone changed these results since we read them: read again
            raise
        return outcome, [Written(_location(e), e["response"]["status"].split()[0]) for e in response.get("entry", [])]
    raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class _ServerState:
    observations: dict[str, dict]  # identifier value -> stored resource
    tasks: dict[str, dict]
    response: dict | None


async def _server_state(client: Store, qr: dict, observation_keys: list[str], task_keys: list[str],
                        check_patient: bool) -> _ServerState:
    """What the server holds for this response, read in one round trip (a batch of reads).

    The patient must already be on the server: results about a patient the EHR
    does not know would be orphans, so nothing is written and the caller is
    told (as InvalidInput: it is the response that is wrong).
    """
    subject = qr["subject"]["reference"]
    urls = [_search("Observation", systems.SID_OBSERVATION, observation_keys),
            _search("Task", systems.SID_TASK, task_keys), _response_url(qr)]
    check_patient = check_patient and subject.startswith("Patient/")
    found = await client.read_many([*urls, subject] if check_patient else urls)
    if check_patient and found[3] is None:
        raise invalid("not-found", f"{subject} is not on the FHIR server: nothing was written.",
                      "QuestionnaireResponse.subject")
    observations, tasks, response = found[:3]
    if response and response.get("resourceType") == "Bundle":
        response = next(matches(response), None)
    return _ServerState(_by_identifier(observations, systems.SID_OBSERVATION),
                        _by_identifier(tasks, systems.SID_TASK), response)


def _search(resource_type: str, system: str, keys: list[str]) -> str:
    return f"{resource_type}?" + urlencode({"identifier": ",".join(f"{system}|{key}" for key in keys),
                                            "_count": str(len(keys))})


def _response_url(qr: dict) -> str:
    """The server's copy of the response: by id, or by the identifier it was written under."""
    if qr.get("id"):
        return f"QuestionnaireResponse/{qr['id']}"
    ident = qr.get("identifier") or {}
    if not ident.get("value"):  # the builder gave it one, made from its content
        ident = {"system": systems.SID_QR, "value": uuid5(response_key(qr))}
    return "QuestionnaireResponse?" + urlencode({"identifier": token(ident.get("system"), ident["value"],
                                                                      in_url=False)})


def _by_identifier(searchset: dict | None, system: str) -> dict[str, dict]:
    return {key: resource for resource in matches(searchset) if (key := stored_key(resource, system))}


def _location(entry: dict) -> str:
    location = entry["response"].get("location", "")
    return "/".join(location.split("/_history/")[0].split("/")[-2:])
