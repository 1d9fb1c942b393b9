"""Turns the Bundle the results should be into the writes the server still needs (pure).

The builder says what the results of a response are; the server holds
what was written before. This compares the two, entry by entry:
- a result that is on the server unchanged, from the same rule set
  version, is not written again;
- a result that changed (an amended response, a new version of it, a
  retraction, or a re-score under a new rule set version) is updated in
  place with If-Match on the version read, so a concurrent change is never
  overwritten (the server answers 412);
- a Task still open that no longer applies is cancelled; a Task the care
  team already acted on is left as they left it;
- the Provenance is written only when something else is.
References to entries that are not written are pointed at the stored resources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from plugin.screening import systems
from plugin.screening.identity import uuid5

# Tasks nobody has acted on yet; one the care team accepted or started is theirs to close.
OPEN_TASK = frozenset({"draft", "requested", "received", "ready"})
FINISHED = frozenset({"final", "amended"})  # a result's statuses that are not a retraction
# What a result says; bookkeeping (ids, meta, times, references to this run's entries) is not compared.
COMPARED = ("code", "subject", "effectiveDateTime", "valueInteger", "valueBoolean",
            "valueCodeableConcept", "valueQuantity", "dataAbsentReason", "interpretation", "component")


def stored_key(resource: dict, system: str) -> str | None:
    return next((i["value"] for i in resource.get("identifier", []) if i.get("system") == system), None)


@dataclass(frozen=True, slots=True)
class Plan:
    transaction: dict | None  # None when the server already holds these results
    kept: dict[str, str]  # fullUrl of each entry not written -> the stored resource (Type/id) it stands for


def plan(bundle: dict, observations: dict[str, dict], tasks: dict[str, dict], *, stored_response: dict | None = None,
         include_response: bool = True, retracted: bool = False) -> Plan:
    """The transaction still needed, and where the results not written already are.

    `observations` and `tasks` map identifier values to what the server holds now;
    `stored_response` is the server's copy of the response, if it has one.
    """
    resolved: dict[str, str] = {}
    entries: list[dict] = []
    wanted_tasks: set[str] = set()
    provenance = None
    for entry in bundle.get("entry", []):
        resource = entry["resource"]
        kind = resource["resourceType"]
        if kind == "Provenance":
            provenance = entry
        elif kind == "QuestionnaireResponse" and stored_response:
            resolved[entry["fullUrl"]] = f"QuestionnaireResponse/{stored_response['id']}"
            if include_response and not _same_response(resource, stored_response):  # a new version of it
                entries.append(_update(entry["fullUrl"], {**resource, "id": stored_response["id"]}, stored_response))
        elif kind == "Observation":
            entries += _observation(entry, observations, resolved)
        elif kind == "Task":
            wanted_tasks.add(stored_key(resource, systems.SID_TASK) or "")
            entries += [] if retracted else _task(entry, tasks, resolved)
        else:
            entries.append(entry)
    answered_no = _answered_no(bundle)
    entries += [_cancel(task) for key, task in tasks.items()
                if task.get("status") in OPEN_TASK
                and (retracted or (key not in wanted_tasks and _raised_by(task) <= answered_no))]
    written = {entry["fullUrl"] for entry in entries}
    kept = {full_url: reference for full_url, reference in resolved.items() if full_url not in written}
    if not any(e["resource"]["resourceType"] != "Device" for e in entries):
        return Plan(None, kept)
    if provenance:
        entries.append(provenance)
    return Plan({"resourceType": "Bundle", "type": "transaction", "entry": _repoint_entries(entries, resolved)}, kept)


def _raised_by(task: dict) -> set[str]:
    """The red flags that raised a review Task (its `input`); empty for any other Task."""
    return {coding["code"] for given in task.get("input", []) if given.get("valueBoolean") is True
            for coding in given.get("type", {}).get("coding", []) if coding.get("system") == systems.RESULTS}


def _answered_no(bundle: dict) -> set[str]:
    """The red flags the response answers explicitly "no" (unanswered is not "no", SCREENING.md §7)."""
    return {coding["code"] for entry in bundle.get("entry", []) if entry["resource"]["resourceType"] == "Observation"
            for component in entry["resource"].get("component", []) if component.get("valueBoolean") is False
            and component.get("extension")  # flag components carry their urgency
            for coding in component["code"]["coding"]}


def _observation(entry: dict, observations: dict[str, dict], resolved: dict[str, str]) -> list[dict]:
    resource = entry["resource"]
    stored = observations.get(stored_key(resource, systems.SID_OBSERVATION) or "")
    if stored is None:
        return [entry]
    resolved[entry["fullUrl"]] = f"Observation/{stored['id']}"
    same = _same_finding(resource, stored)
    if same and _same_rules(resource, stored):
        return []
    changed = {**resource, "id": stored["id"]}
    if changed["status"] == "final" and stored.get("status") != "preliminary":
        # A finding that changed after it was final is amended (a new version of the response, or a rule
        # change that altered it); one that a new rule set version merely confirms keeps its status.
        changed["status"] = stored["status"] if same and stored.get("status") in FINISHED else "amended"
    return [_update(entry["fullUrl"], changed, stored)]


def _same_rules(wanted: dict, stored: dict) -> bool:
    """Whether the stored result already names the rule set version that produced the wanted one.

    A re-score under a new rule set version rewrites even an unchanged finding (same status), so every
    result names the version that last confirmed it and `_tag` finds the responses not yet re-scored.
    Checked as "among the stored tags": a server that carries old tags over on update still matches.
    """
    tags = {(t.get("system"), t.get("code")) for t in stored.get("meta", {}).get("tag", [])}
    return all((t["system"], t["code"]) in tags for t in wanted.get("meta", {}).get("tag", [])
               if t["system"] == systems.RULE_SET_TAG)


def _same_response(wanted: dict, stored: dict) -> bool:
    bookkeeping = ("id", "meta", "text")
    return all(wanted.get(k) == stored.get(k) for k in {*wanted, *stored} - set(bookkeeping))


def _same_finding(wanted: dict, stored: dict) -> bool:
    """Unchanged results stay as they are: an amended response does not make every result 'amended'."""
    statuses = {wanted["status"], stored.get("status")}
    same_status = len(statuses) == 1 or statuses <= FINISHED
    return same_status and all(wanted.get(k) == stored.get(k) for k in COMPARED)


def _task(entry: dict, tasks: dict[str, dict], resolved: dict[str, str]) -> list[dict]:
    stored = tasks.get(stored_key(entry["resource"], systems.SID_TASK) or "")
    if stored is None:
        return [entry]
    resolved[entry["fullUrl"]] = f"Task/{stored['id']}"
    return []  # still indicated and already there: whatever the care team did with it stands


def _cancel(task: dict) -> dict:
    cancelled = {**task, "status": "cancelled",
                 "statusReason": {"text": "The screening response changed: this suggestion no longer applies."}}
    return _update(f"urn:uuid:{uuid5('cancel|' + task['id'])}", cancelled, task)


def _update(full_url: str, resource: dict, stored: dict) -> dict:
    request = {"method": "PUT", "url": f"{resource['resourceType']}/{stored['id']}"}
    version = stored.get("meta", {}).get("versionId")
    if version:
        request["ifMatch"] = f'W/"{version}"'
    return {"fullUrl": full_url, "resource": resource, "request": request}


def _repoint_entries(entries: list[dict], resolved: dict[str, str]) -> list[dict]:
    """Entries whose references to unwritten entries now point at the stored resources.

    Only resources that mention one of those entries are walked (found by a
    byte search of their JSON): walking every response and narrative cost
    more than the rest of the plan.
    """
    if not resolved:
        return entries
    needles = [f'"{full_url}"'.encode() for full_url in resolved]
    repointed = []
    for entry in entries:
        raw = orjson.dumps(entry["resource"])
        if any(needle in raw for needle in needles):
            entry = {**entry, "resource": _point_at_stored(entry["resource"], resolved)}
        repointed.append(entry)
    return repointed


def _point_at_stored(node: Any, resolved: dict[str, str]) -> Any:
    """A copy of `node` with references to unwritten entries pointing at the stored resources."""
    if isinstance(node, dict):
        reference = node.get("reference")
        if isinstance(reference, str) and reference in resolved:
            return {**node, "reference": resolved[reference]}
        return {key: _point_at_stored(value, resolved) for key, value in node.items()}
    if isinstance(node, list):
        return [_point_at_stored(value, resolved) for value in node]
    return node
