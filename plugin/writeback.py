"""Writes to a FHIR server: publishing the definitions, and a scored response with its results.

A thin shell over the pure core: the Bundle comes from the Screener; this
module only decides what to send and reports what the server did.
"""

from __future__ import annotations

from dataclasses import dataclass

from plugin import data, systems
from plugin.building import response_key, token, uuid5
from plugin.fhir_client import FhirClient, FhirError
from plugin.outcome import invalid
from plugin.pipeline import Outcome, Screener
from plugin.reconcile import plan, stored_key

CANONICAL_TYPES = ("Questionnaire", "CodeSystem")
CONFLICT_RETRIES = 3


@dataclass(frozen=True, slots=True)
class Written:
    """One entry of a transaction response: what it is and what the server did."""

    location: str  # Type/id as the server names it
    status: str  # "201" created, "200" already there or updated


async def publish(client: FhirClient, screener: Screener) -> list[Written]:
    """Puts the Questionnaires, CodeSystems and the plugin's Device on the server, once each.

    Conditional updates on (url, version), and on the Device's identifier,
    so running it again updates in place instead of adding copies.
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


async def _put(client: FhirClient, resource_type: str, params: dict[str, str], body: dict) -> Written:
    stored = await client.request("PUT", resource_type, body=body, params=params)
    return Written(f"{resource_type}/{stored.get('id')}", "200")


async def submit(client: FhirClient, screener: Screener, qr: dict, *, include_response: bool = True,
                 stored_response: dict | None = None) -> tuple[Outcome, list[Written]]:
    """Scores a response and writes what the server does not hold yet, in one transaction.

    The patient must already be on the server: results about a patient the
    EHR does not know would be orphans, so nothing is written and the
    caller is told (as InvalidInput: it is the response that is wrong).
    A concurrent change to the same results (409/412) is met by reading again
    and planning again, never by overwriting it.
    """
    outcome = screener.process(qr)
    entries = outcome.bundle.get("entry", [])
    if not entries:
        return outcome, []
    subject = qr["subject"]["reference"]
    if subject.startswith("Patient/") and await client.read(subject) is None:
        raise invalid("not-found", f"{subject} is not on the FHIR server: nothing was written.",
                      "QuestionnaireResponse.subject")
    builder = screener.builders[qr["questionnaire"].partition("|")[0]]
    observation_keys = [stored_key(e["resource"], systems.SID_OBSERVATION) or "" for e in entries
                        if e["resource"]["resourceType"] == "Observation"]
    for attempt in range(CONFLICT_RETRIES + 1):
        observations = await _stored(client, "Observation", systems.SID_OBSERVATION, observation_keys)
        tasks = await _stored(client, "Task", systems.SID_TASK, builder.task_identifiers(qr))
        stored = stored_response if stored_response and attempt == 0 else await _stored_response(client, qr)
        todo = plan(outcome.bundle, observations, tasks, stored_response=stored,
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


async def _stored_response(client: FhirClient, qr: dict) -> dict | None:
    """The server's copy of the response: by id, or by the identifier it was written under."""
    if qr.get("id"):
        return await client.read(f"QuestionnaireResponse/{qr['id']}")
    ident = qr.get("identifier") or {}
    if not ident.get("value"):  # the builder gave it one, made from its content
        ident = {"system": systems.SID_QR, "value": uuid5(response_key(qr))}
    search = {"identifier": token(ident.get("system"), ident["value"], in_url=False)}
    return await anext(client.search("QuestionnaireResponse", search), None)


async def _stored(client: FhirClient, resource_type: str, system: str, keys: list[str]) -> dict[str, dict]:
    """What the server holds under these identifiers: identifier value -> resource."""
    wanted = ",".join(f"{system}|{key}" for key in keys)
    found = {}
    async for resource in client.search(resource_type, {"identifier": wanted, "_count": str(len(keys))}):
        key = stored_key(resource, system)
        if key:
            found[key] = resource
    return found


def _location(entry: dict) -> str:
    location = entry["response"].get("location", "")
    return "/".join(location.split("/_history/")[0].split("/")[-2:])
