"""Builds the FHIR R4 transaction Bundle for one scored response (SCREENING.md §4).

A `BundleBuilder` is made once per rule set and strategy: it prepares every
part that does not depend on the response (the Device, Task codes, and the
Observations' parts in `observations`). `build` is then a pure function of
(response, scores, clock) that fills in a handful of dicts; nothing here is
mutated after it is made, so shared parts can be reused by reference in
every Bundle. Identifiers come from `identity`.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

import orjson

from plugin import __version__
from plugin.screening import narrative, systems
from plugin.screening.checking import DATETIME
from plugin.screening.identity import given_identifier, own_identifier, response_key, token, uuid5
from plugin.screening.mappings import RuleSet, TaskSpec
from plugin.screening.observations import CACHE_LIMIT, ObservationBuilder, Parts, coded
from plugin.screening.questionnaire import CompiledQuestionnaire
from plugin.screening.scoring import Result, Scores
from plugin.screening.timeline import on_timeline

OBSERVATION_STATUS = {"completed": "final", "amended": "amended", "entered-in-error": "entered-in-error"}
ACTIVITY = {"completed": "CREATE", "amended": "UPDATE", "entered-in-error": "NULLIFY"}
PRELIMINARY = "preliminary"  # red flags of a response that is not completed, or was refused
SCORED_STATUSES = frozenset(OBSERVATION_STATUS)
NOTHING_TO_WRITE = {"resourceType": "Bundle", "type": "transaction"}  # an empty transaction (shared, read-only)
# The category is a routing code for software; a person reads the title and narrative instead.
CATEGORY = [{"coding": [{"system": systems.OBS_CATEGORY, "code": "survey"}]}]
AUTHOR = {"coding": [{"system": systems.PROVENANCE_TYPE, "code": "author", "display": "Author"}]}
SOURCE_ROLE = "source"
OBSERVATION_SEARCH = f"identifier={systems.SID_OBSERVATION}|"  # + the identifier's value: the conditional create


def instant(now: datetime) -> str:
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class BundleBuilder:
    def __init__(
        self, questionnaire: CompiledQuestionnaire, rule_set: RuleSet, strategy: str | None = None,
        plugin_version: str = __version__,
    ) -> None:
        self.rule_set = rule_set
        self.strategy = rule_set.strategy_result(strategy)
        item_codes = {k: v.code for k, v in questionnaire.items.items() if v.code}
        self.observations = ObservationBuilder(rule_set, item_codes, self.strategy)
        self.tags = [{"system": systems.RULE_SET_TAG, "code": rule_set.tag}]
        self.meta = {"tag": self.tags}
        parts = self.observations.parts
        # Which results the outcome lists as members (hasMember), and where the outcome is: the same every build.
        self.members = [i for i, p in enumerate(parts) if not p.spec.members]
        self.groupers = [i for i, p in enumerate(parts) if p.spec.members]
        self.outcome_index = next(i for i, p in enumerate(parts) if p.spec.code == rule_set.outcome_result)
        self.device = self._device(plugin_version)
        self.device_ref = {"reference": self.device["fullUrl"]}  # the Device is in the same Bundle
        self.tasks = {t.id: _task_code(t.code) for t in rule_set.tasks}
        self.task_words: dict[tuple, tuple[str, dict, list | None]] = {}  # see _task_words

    def _device(self, plugin_version: str) -> dict:
        value = f"backpain-screen-{plugin_version}-{self.rule_set.tag}"
        resource = {
            "resourceType": "Device",
            "identifier": [{"system": systems.SID_DEVICE, "value": value}],
            "status": "active",
            "manufacturer": "backpain-screen",
            "deviceName": [{"name": "backpain-screen", "type": "manufacturer-name"}],
            "type": {"text": "Clinical decision support software"},
            "version": [
                {"type": {"text": "software"}, "value": plugin_version},
                {"type": {"text": "rule set"}, "value": f"{self.rule_set.id} {self.rule_set.version}"},
            ],
            "text": narrative.text(narrative.document(
                f"<p>backpain-screen {plugin_version}, rule set {self.rule_set.id} {self.rule_set.version}</p>")),
        }
        return _entry(uuid5(f"device|{value}"), resource, _create("Device", systems.SID_DEVICE, value))

    # -- per response ----------------------------------------------------------

    def build(self, qr: dict, scores: Scores, now: datetime) -> dict:
        """The transaction Bundle for one response.

        It shares prepared, read-only parts with other Bundles: serialize it,
        or deep-copy it before changing anything nested.
        """
        status = qr["status"]
        if status not in SCORED_STATUSES:  # in-progress or stopped: nothing is written
            return NOTHING_TO_WRITE
        key = response_key(qr)
        when = instant(now)
        qr_entry, qr_ref = self._response_entry(qr, key)
        context = _Context(key, qr, qr_ref, OBSERVATION_STATUS[status], when, scores.facts)
        results = scores.results
        observations = [self._observation(p, results[p.spec.code], context) for p in self.observations.parts]
        if self.groupers:
            members = [_ref(observations[i]) for i in self.members]
            for i in self.groupers:
                observations[i]["resource"]["hasMember"] = members
        outcome_ref = _ref(observations[self.outcome_index])
        tasks = [] if status == "entered-in-error" else [
            self._task(t, scores, context, outcome_ref) for t in scores.tasks]
        written = [qr_entry, *observations, *tasks]
        provenance = self._provenance(written[1:], scores, context, status)
        entries = [self.device, *written, provenance]
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}

    def build_red_flags(self, qr: dict, scores: Scores, now: datetime) -> dict:
        """The red-flags Observation and review Task of a response that cannot be scored as a whole.

        For a response that is not completed, or refused for other errors (SCREENING.md §7): the
        response as it came, the red-flag results (`preliminary` unless the response is completed),
        the review Tasks they call for, and a Provenance (`without_response` if the store refuses it).
        """
        key = response_key(qr)
        status = "final" if qr.get("status") == "completed" else PRELIMINARY
        qr_entry, qr_ref = self._response_entry(qr, key)
        context = _Context.lenient(key, qr, qr_ref, status, instant(now), scores.facts)
        flags = [p for p in self.observations.parts if p.spec.kind == "flags"]
        observations = [self._observation(p, scores.results[p.spec.code], context) for p in flags]
        reasons = {p.spec.code: _ref(o) for p, o in zip(flags, observations)}
        tasks = [self._task(t, scores, context, reasons[t.reason]) for t in scores.tasks if t.reason in reasons]
        activity = status if (status := qr.get("status")) in ("amended", "entered-in-error") else "completed"
        provenance = self._provenance([*observations, *tasks], scores, context, activity)
        return {"resourceType": "Bundle", "type": "transaction",
                "entry": [self.device, qr_entry, *observations, *tasks, provenance]}

    def task_identifiers(self, qr: dict) -> list[str]:
        """Identifier values of every Task any version of this response could have been given."""
        key = response_key(qr)
        return [uuid5(f"{key}|task|{t.id}") for t in self.rule_set.tasks]

    def _response_entry(self, qr: dict, key: str) -> tuple[dict, dict]:
        # The caller's narrative is not ours to vouch for (the server regenerates it); an empty list (`"item": []`
        # of an empty response) is written as the element's absence, which HAPI's validator insists on.
        resource = {k: v for k, v in qr.items() if k != "text" and v != []}
        if qr.get("id"):
            url = f"QuestionnaireResponse/{qr['id']}"
            entry = _entry(uuid5(f"qr|{key}"), resource, {"method": "PUT", "url": url})
            return entry, {"reference": url}
        ident = given_identifier(qr)
        if ident is None:
            ident = resource["identifier"] = own_identifier(qr)
        search = token(ident.get("system"), ident["value"])
        request = {"method": "POST", "url": "QuestionnaireResponse", "ifNoneExist": f"identifier={search}"}
        entry = _entry(uuid5(f"qr|{key}"), resource, request)
        return entry, {"reference": entry["fullUrl"]}

    def _observation(self, parts: Parts, result: Result, ctx: _Context) -> dict:
        spec = parts.spec
        oid = uuid5(f"{ctx.key}|{spec.code}")
        obs = {  # one literal: this runs for every result of every response
            "resourceType": "Observation",
            "meta": self.meta,
            "identifier": [{"system": systems.SID_OBSERVATION, "value": oid}],
            "status": ctx.status,
            "category": CATEGORY,
            "code": parts.code,
            **ctx.about,
            "issued": ctx.now,
            "device": self.device_ref,
            "method": parts.method,
            "derivedFrom": ctx.derived,
            **self.observations.findings(parts, result, ctx.facts),
        }
        if ctx.status == "final":
            request = {"method": "POST", "url": "Observation", "ifNoneExist": OBSERVATION_SEARCH + oid}
        else:
            request = self._write("Observation", systems.SID_OBSERVATION, oid, ctx.status)
        return {"fullUrl": f"urn:uuid:{oid}", "resource": obs, "request": request}

    @staticmethod
    def _write(resource_type: str, system: str, value: str, status: str) -> dict:
        """First results are conditional creates; an amendment or retraction updates them in place."""
        if status == "final":
            return _create(resource_type, system, value)
        return {"method": "PUT", "url": f"{resource_type}?identifier={system}|{value}"}

    def _task(self, spec: TaskSpec, scores: Scores, ctx: _Context, outcome_ref: dict) -> dict:
        tid = uuid5(f"{ctx.key}|task|{spec.id}")
        reason = scores.results[scores.strategy if spec.reason == "strategy" else spec.reason]
        description, text, inputs = self._task_words(spec, reason)
        task: dict[str, Any] = {
            "resourceType": "Task",
            "meta": self.meta,
            "identifier": [{"system": systems.SID_TASK, "value": tid}],
            "status": "requested",
            "intent": "proposal",
            "priority": spec.priority,
            "code": self.tasks[spec.id],
            "description": description,
            "focus": ctx.qr_ref,
            "for": ctx.subject,
        }
        if ctx.encounter:
            task["encounter"] = ctx.encounter
        if inputs:
            task["input"] = inputs
        task["authoredOn"] = ctx.now
        task["requester"] = self.device_ref
        task["reasonReference"] = outcome_ref
        task["text"] = text
        return _entry(tid, task, _create("Task", systems.SID_TASK, tid))

    def _task_words(self, spec: TaskSpec, reason: Result) -> tuple[str, dict, list | None]:
        """A Task's description, narrative and inputs: the same for every response whose reason is in the same
        state, so made once per state (shared, never mutated; at most CACHE_LIMIT states)."""
        state = (spec.id, reason.criteria)
        found = self.task_words.get(state)
        if found is not None:
            return found
        criteria = reason.spec.criteria
        met = [c.text for c, t in zip(criteria, reason.criteria) if t is True]
        description = spec.description + (" Criteria met: " + "; ".join(met) + "." if met else "")
        inputs = None
        if reason.spec.kind == "flags":  # a reviewer must ask about the flags the patient left blank
            blank = [c.text for c, t in zip(criteria, reason.criteria) if t is None]
            description += " Not answered, ask the patient: " + "; ".join(blank) + "." if blank else ""
            # what raised it: it is cancelled only when each is answered "no"
            inputs = [{"type": coded(systems.RESULTS, c.code), "valueBoolean": True}
                      for c, t in zip(criteria, reason.criteria) if t is True] or None
        text = narrative.text(narrative.document(
            narrative.paragraph(self.tasks[spec.id]["coding"][0]["display"], narrative.escape(description))))
        found = description, text, inputs
        if len(self.task_words) < CACHE_LIMIT:
            self.task_words[state] = found
        return found

    def _provenance(self, results: list[dict], scores: Scores, ctx: _Context, status: str) -> dict:
        digest = hashlib.sha1(orjson.dumps(scores_facts_digest(scores))).hexdigest()
        pid = uuid5(f"{ctx.key}|provenance|{status}|{self.rule_set.tag}|{self.strategy}|{digest}")
        resource = {
            "resourceType": "Provenance",
            "meta": {"tag": [*self.tags, {"system": systems.SID_PROVENANCE, "code": pid}]},
            "target": [ctx.qr_ref, *(_ref(e) for e in results)],
            "recorded": ctx.now,
            "policy": [f"{systems.RULE_SET_POLICY}/{self.rule_set.id}|{self.rule_set.version}"],
            "activity": {"coding": [{"system": systems.DATA_OPERATION, "code": ACTIVITY[status]}]},
            "agent": [{"type": AUTHOR, "who": self.device_ref}],
            "entity": [{"role": SOURCE_ROLE, "what": ctx.qr_ref}],
        }
        request = {"method": "POST", "url": "Provenance", "ifNoneExist": f"_tag={systems.SID_PROVENANCE}|{pid}"}
        return _entry(pid, resource, request)


def scores_facts_digest(scores: Scores) -> list:
    """What the results were computed from, compactly: each result's value and criteria."""
    return [[code, str(r.value), r.criteria, r.inputs] for code, r in scores.results.items()]


class _Context:
    """The parts of one response that every resource built for it repeats."""

    __slots__ = ("about", "authored", "derived", "encounter", "facts", "key", "now", "qr_ref", "status", "subject")

    def __init__(self, key: str, qr: dict, qr_ref: dict, status: str, now: str, facts: dict) -> None:
        self.key, self.qr_ref, self.status, self.now = key, qr_ref, status, now
        self.facts = facts  # the answers as scored: the narratives tell a test left empty from a negative one
        self.derived = [qr_ref]  # every Observation's derivedFrom (shared, read-only)
        self.subject = {"reference": qr["subject"]["reference"]}
        encounter = qr.get("encounter")
        self.encounter = {"reference": encounter["reference"]} if encounter else None
        self.authored = qr.get("authored")
        self.about = self._about()

    def _about(self) -> dict:
        """Subject, encounter and effective time, as every Observation has them (the absent ones left out)."""
        about: dict[str, Any] = {"subject": self.subject}
        if self.encounter:
            about["encounter"] = self.encounter
        if self.authored:
            about["effectiveDateTime"] = self.authored
        return about

    @classmethod
    def lenient(cls, key: str, qr: dict, qr_ref: dict, status: str, now: str, facts: dict) -> _Context:
        """For a response that was not checked whole: a malformed encounter or authored is left out."""
        ctx = cls(key, {"subject": qr["subject"]}, qr_ref, status, now, facts)
        encounter, authored = qr.get("encounter"), qr.get("authored")
        if isinstance(encounter, dict) and isinstance(encounter.get("reference"), str):
            ctx.encounter = {"reference": encounter["reference"]}
        if isinstance(authored, str) and DATETIME.fullmatch(authored) and on_timeline(authored):
            ctx.authored = authored  # (a zone that takes it off the calendar would refuse the whole write)
        ctx.about = ctx._about()
        return ctx


def _entry(uuid: str, resource: dict, request: dict) -> dict:
    return {"fullUrl": f"urn:uuid:{uuid}", "resource": resource, "request": request}


def _create(resource_type: str, system: str, value: str) -> dict:
    return {"method": "POST", "url": resource_type, "ifNoneExist": f"identifier={system}|{value}"}


def _ref(entry: dict) -> dict:
    return {"reference": entry["fullUrl"]}


def without_response(bundle: dict, reason: str) -> dict:
    """The same Bundle without the response, which the store refused: it is referred to by its identifier.

    SCREENING.md §7: the red flags are still written, and nothing depends on the refused resource
    (the Task's description quotes the flags that raised it).
    """
    entry = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "QuestionnaireResponse")
    qr = entry["resource"]
    ident = given_identifier(qr) or own_identifier(qr)
    by_identifier = {"type": "QuestionnaireResponse", "identifier": ident, "display": f"response refused: {reason}"}
    names = {entry["fullUrl"], entry["request"]["url"]}

    def repoint(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("reference") in names:
                return by_identifier
            return {key: repoint(value) for key, value in node.items()}
        if isinstance(node, list):
            return [repoint(value) for value in node]
        return node

    return {**bundle, "entry": [repoint(e) for e in bundle["entry"] if e is not entry]}


def _task_code(code: dict) -> dict:
    """The Task's CodeableConcept: our coding first (readers match on it), then the verified standard ones."""
    task_code = coded(code["system"], code["code"], code["display"])
    task_code["coding"] += code["also"]
    return task_code
