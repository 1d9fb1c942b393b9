"""Writes to a FHIR server: publishing the definitions, and a scored response with its results.

A thin shell over the pure core: the Bundle comes from the Screener; this
module only decides what to send and reports what the server did.
"""

from __future__ import annotations

from dataclasses import dataclass

from plugin import data
from plugin.fhir_client import FhirClient
from plugin.outcome import invalid
from plugin.pipeline import Outcome, Screener

CANONICAL_TYPES = ("Questionnaire", "CodeSystem")


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


async def submit(client: FhirClient, outcome: Outcome) -> list[Written]:
    """Writes a scored response and its results in one transaction; nothing when there is nothing to write.

    The patient must already be on the server: results about a patient the
    EHR does not know would be orphans, so nothing is written and the
    caller is told (as InvalidInput: it is the response that is wrong).
    """
    entries = outcome.bundle.get("entry", [])
    if not entries:
        return []
    subject = next(e["resource"]["subject"]["reference"] for e in entries
                   if e["resource"]["resourceType"] == "QuestionnaireResponse")
    if subject.startswith("Patient/") and await client.read(subject) is None:
        raise invalid("not-found", f"{subject} is not on the FHIR server: nothing was written.",
                      "QuestionnaireResponse.subject")
    response = await client.transaction(outcome.bundle)
    return [Written(_location(e), e["response"]["status"].split()[0]) for e in response.get("entry", [])]


def _location(entry: dict) -> str:
    location = entry["response"].get("location", "")
    return "/".join(location.split("/_history/")[0].split("/")[-2:])
