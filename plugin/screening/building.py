"""Builds the FHIR R4 transaction Bundle for one scored response (SCREENING.md §4).

A `BundleBuilder` is made once per rule set and strategy: it prepares every
part that does not depend on the response (codes, components, narrative
rows, the Device). `build` is then a pure function of (response, scores,
clock) that fills in a handful of dicts; nothing here is mutated after it
is made, so shared parts can be reused by reference in every Bundle.

Identifiers are deterministic (UUIDv5 of the response's identity and the
result code), so re-processing a response yields the same conditional
creates and the server keeps one copy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import orjson

from plugin import __version__
from plugin.screening import narrative, systems
from plugin.screening.mappings import INTERPRETATIONS, ResultSpec, RuleSet, TaskSpec
from plugin.screening.questionnaire import CompiledQuestionnaire
from plugin.screening.scoring import TRUTH_WORDS, Result, Scores

NAMESPACE = bytes.fromhex("5f1b2a0e8c3d4b6a9e7f10213243a5b6")  # the plugin's UUIDv5 namespace
OBSERVATION_STATUS = {"completed": "final", "amended": "amended", "entered-in-error": "entered-in-error"}
ACTIVITY = {"completed": "CREATE", "amended": "UPDATE", "entered-in-error": "NULLIFY"}
SCORED_STATUSES = frozenset(OBSERVATION_STATUS)
NOTHING_TO_WRITE = {"resourceType": "Bundle", "type": "transaction"}  # an empty transaction (shared, read-only)
CATEGORY = [{"coding": [{"system": systems.OBS_CATEGORY, "code": "survey", "display": "Survey"}]}]
UNKNOWN = {"coding": [{"system": systems.DATA_ABSENT, "code": "unknown", "display": "Unknown"}]}
NOT_APPLICABLE = {"coding": [{"system": systems.DATA_ABSENT, "code": "not-applicable", "display": "Not Applicable"}]}
INTERPRETATION = {
    code: [{"coding": [{"system": systems.INTERPRETATION, "code": code, "display": display}]}]
    for code, display in INTERPRETATIONS.items()
}
TRUTH_INTERPRETATION = {True: INTERPRETATION["POS"], False: INTERPRETATION["NEG"], None: INTERPRETATION["IND"]}
AUTHOR = {"coding": [{"system": systems.PROVENANCE_TYPE, "code": "author", "display": "Author"}]}
SOURCE_ROLE = "source"
CACHE_LIMIT = 4096


def uuid5(name: str) -> str:
    """RFC 4122 version-5 UUID of `name` in the plugin's namespace (same as uuid.uuid5, faster)."""
    h = hashlib.sha1(NAMESPACE + name.encode()).hexdigest()
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"


def instant(now: datetime) -> str:
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def coded(system: str, code: str, display: str) -> dict:
    """A CodeableConcept of one Coding (components: the display says it all, the Bundle stays small)."""
    return {"coding": [{"system": system, "code": code, "display": display}]}


def concept(system: str, code: str, display: str) -> dict:
    return {**coded(system, code, display), "text": display}


def response_key(qr: dict) -> str:
    """What identifies a response across replays and amendments: identifier, else id, else its content.

    The patient is part of it, so a response that reuses another patient's
    id or identifier can never reach that patient's results. A response with
    neither is written with an identifier made from its content
    (`own_identifier`), and its key is the one that identifier gives: so the
    stored copy, read back later (by sync, by the results view), has the same key.
    """
    subject = qr["subject"]["reference"]
    given = given_identifier(qr)
    if given is None and qr.get("id"):
        return f"{subject}|id:{qr['id']}"
    ident = given or own_identifier(qr)
    return f"{subject}|identifier:{ident.get('system', '')}|{ident['value']}"


def given_identifier(qr: dict) -> dict | None:
    """The response's own identifier, if it has a usable one."""
    ident = qr.get("identifier")
    return ident if isinstance(ident, dict) and isinstance(ident.get("value"), str) and ident["value"] else None


def own_identifier(qr: dict) -> dict:
    """The identifier a response without one (and without an id) is written under: made from its content."""
    # An empty list is the element's absence (FHIR JSON allows no empty arrays; the copy written drops them).
    content = {k: v for k, v in qr.items() if k not in ("id", "meta", "text", "status") and v != []}
    digest = hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return {"system": systems.SID_QR, "value": uuid5(f"content:{digest}")}


@dataclass(frozen=True, slots=True)
class _Parts:
    """Everything about one result that is the same for every response."""

    spec: ResultSpec
    code: dict
    method: dict
    components: tuple[dict[Any, dict], ...]  # per criterion: truth -> component
    terms: tuple[dict[Any, dict], ...]  # per score term: its component when unanswered (None) and its code
    rows: tuple[dict[Any, str], ...]  # per criterion: truth -> narrative row
    intro: str  # narrative: the title, before the summary
    head: str  # narrative table head
    tail: str  # citation paragraph
    cache: dict[tuple, dict]  # result state -> findings (see BundleBuilder._findings)


class BundleBuilder:
    def __init__(
        self, questionnaire: CompiledQuestionnaire, rule_set: RuleSet, strategy: str | None = None,
        plugin_version: str = __version__,
    ) -> None:
        self.rule_set = rule_set
        self.item_codes = {k: v.code for k, v in questionnaire.items.items() if v.code}
        self.strategy = rule_set.strategy_result(strategy)
        self.values = {
            code: (concept(systems.RESULTS, code, v["display"]), INTERPRETATION.get(v.get("interpretation")))
            for code, v in rule_set.values.items()
        }
        self.parts = [self._parts(spec) for spec in rule_set.emitted(self.strategy)]
        self.tags = [{"system": systems.RULE_SET_TAG, "code": rule_set.tag}]
        self.device = self._device(plugin_version)
        self.device_ref = {"reference": self.device["fullUrl"], "display": "backpain-screen"}
        self.tasks = {t.id: concept(t.code["system"], t.code["code"], t.code["display"]) for t in rule_set.tasks}

    # -- parts prepared once -------------------------------------------------

    def _parts(self, spec: ResultSpec) -> _Parts:
        code = concept(systems.RESULTS, spec.code, spec.title)
        if spec.kind == "flags":
            components = tuple(_flag_components(c.code, c.text, c.urgency) for c in spec.criteria)
            rows = narrative.flag_rows([(c.text, c.concern or "", c.urgency or "") for c in spec.criteria])
        else:
            components = tuple(_components(coded(systems.RESULTS, c.code, c.text)) for c in spec.criteria)
            rows = narrative.criterion_rows([c.text for c in spec.criteria])
        also = tuple(_components(coded(systems.RESULTS, t.code, t.text)) for t in spec.also)
        terms = tuple(_components({"coding": [self.item_codes[t.item]]}) for t in spec.terms)
        head = ("Criterion", "Result", "Urgency") if spec.kind == "flags" else ("Criterion", "Result")
        return _Parts(spec, code, {"text": spec.citation}, components + also, terms, tuple(rows),
                      narrative.intro(spec.title), narrative.table_head(head), narrative.source(spec.citation), {})

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
        context = _Context(key, qr, qr_ref, OBSERVATION_STATUS[status], when)
        observations = [self._observation(p, scores.results[p.spec.code], context) for p in self.parts]
        if any(p.spec.members for p in self.parts):
            _link_members(observations, [p.spec for p in self.parts])
        outcome_ref = _ref(next(o for o, p in zip(observations, self.parts)
                                if p.spec.code == self.rule_set.outcome_result))
        tasks = [] if status == "entered-in-error" else [
            self._task(t, scores, context, outcome_ref) for t in scores.tasks]
        written = [qr_entry, *observations, *tasks]
        provenance = self._provenance(written, scores, context, status)
        entries = [self.device, *written, provenance]
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}

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

    def _observation(self, parts: _Parts, result: Result, ctx: _Context) -> dict:
        spec = parts.spec
        oid = uuid5(f"{ctx.key}|{spec.code}")
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "meta": {"tag": self.tags},
            "identifier": [{"system": systems.SID_OBSERVATION, "value": oid}],
            "status": ctx.status,
            "category": CATEGORY,
            "code": parts.code,
            "subject": ctx.subject,
        }
        if ctx.encounter:
            obs["encounter"] = ctx.encounter
        if ctx.authored:
            obs["effectiveDateTime"] = ctx.authored
        obs["issued"] = ctx.now
        obs["device"] = self.device_ref
        obs["method"] = parts.method
        obs["derivedFrom"] = [ctx.qr_ref]
        obs.update(self._findings(parts, result))
        return _entry(oid, obs, self._write("Observation", systems.SID_OBSERVATION, oid, ctx.status))

    def _findings(self, parts: _Parts, result: Result) -> dict:
        """Value, interpretation, components and narrative: the same for every response in the same state.

        Responses repeat a limited number of states per result, so they are
        made once and reused (shared, never mutated); the cache stops growing
        at CACHE_LIMIT entries per result.
        """
        state = (result.value, result.applies, result.criteria, result.also, result.inputs)
        found = parts.cache.get(state)
        if found is not None:
            return found
        found = {}
        summary = _VALUE_SETTERS[parts.spec.kind](self, found, result)
        states = result.criteria + result.also
        components = [parts.components[i][t] for i, t in enumerate(states)] + _score_components(parts, result)
        if components:
            found["component"] = components
        rows = [parts.rows[i][t] for i, t in enumerate(result.criteria)] if parts.rows else _score_rows(result)
        found["text"] = narrative.text(narrative.document(
            parts.intro, summary, narrative.PARAGRAPH_END, parts.head, *rows, narrative.TABLE_END, parts.tail))
        if len(parts.cache) < CACHE_LIMIT:
            parts.cache[state] = found
        return found

    @staticmethod
    def _write(resource_type: str, system: str, value: str, status: str) -> dict:
        """First results are conditional creates; an amendment or retraction updates them in place."""
        if status == "final":
            return _create(resource_type, system, value)
        return {"method": "PUT", "url": f"{resource_type}?identifier={system}|{value}"}

    def _count_value(self, obs: dict, result: Result) -> str:
        spec = result.spec
        true, unknown = result.met
        total = len(spec.criteria)
        counted = f"{true} of {total} met" + (f", {unknown} unknown" if unknown else "")
        if result.applies is False:
            obs["dataAbsentReason"] = NOT_APPLICABLE
            return narrative.escape(f"not applicable (applies to: {spec.applies_text}); {counted}.")
        obs["valueInteger"] = true
        if spec.positive_at_least is None:
            return narrative.escape(f"{counted}.")
        obs["interpretation"] = TRUTH_INTERPRETATION[result.truth]
        word = TRUTH_WORDS[result.truth]
        needs = f"{spec.positive_at_least} or more needed"
        if result.applies is None:
            needs += f"; applies to: {spec.applies_text}, which is not known"
        return narrative.escape(f"{counted}: {word} ({needs}).")

    def _flags_value(self, obs: dict, result: Result) -> str:
        obs["interpretation"] = TRUTH_INTERPRETATION[result.value]
        if result.value is None:
            obs["dataAbsentReason"] = UNKNOWN
            return "none reported, but some were not answered: red flags cannot be ruled out."
        obs["valueBoolean"] = result.value
        present = [c.text for c, t in zip(result.spec.criteria, result.criteria) if t is True]
        return narrative.escape("present: " + "; ".join(present) + ".") if present else "none present."

    def _decision_value(self, obs: dict, result: Result) -> str:
        value, interpretation = self.values[result.value]
        obs["valueCodeableConcept"] = value
        if interpretation:
            obs["interpretation"] = interpretation
        summary = value["text"]
        if result.spec.criteria:
            true, unknown = result.met
            summary += f" ({true} of {len(result.spec.criteria)} criteria met" + (
                f", {unknown} unknown)" if unknown else ")")
        if result.applies is False:
            summary += f"; applies to: {result.spec.applies_text}"
        return narrative.escape(summary + ".")

    def _score_value(self, obs: dict, result: Result) -> str:
        spec = result.spec
        if result.value is None:
            obs["dataAbsentReason"] = UNKNOWN
            obs["interpretation"] = INTERPRETATION["IND"]
            missing = ", ".join(result.missing)
            return narrative.escape(f"not calculated: unanswered {missing}.")
        quantity = {"value": float(result.value), "system": systems.UCUM}
        if spec.unit:
            quantity.update(unit=spec.unit["display"], code=spec.unit["code"])
        obs["valueQuantity"] = quantity
        text = f"{result.value}"
        if result.truth is not None:
            obs["interpretation"] = TRUTH_INTERPRETATION[result.truth]
            text += " - " + (spec.positive_text if result.truth else spec.negative_text)
        return narrative.escape(text + ".")

    def _task(self, spec: TaskSpec, scores: Scores, ctx: _Context, outcome_ref: dict) -> dict:
        tid = uuid5(f"{ctx.key}|task|{spec.id}")
        reason = scores.results[scores.strategy if spec.reason == "strategy" else spec.reason]
        met = [c.text for c, t in zip(reason.spec.criteria, reason.criteria) if t is True]
        description = spec.description + (" Criteria met: " + "; ".join(met) + "." if met else "")
        if reason.spec.kind == "flags":  # a reviewer must ask about the flags the patient left blank
            blank = [c.text for c, t in zip(reason.spec.criteria, reason.criteria) if t is None]
            description += " Not answered, ask the patient: " + "; ".join(blank) + "." if blank else ""
        task: dict[str, Any] = {
            "resourceType": "Task",
            "meta": {"tag": self.tags},
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
        task["authoredOn"] = ctx.now
        task["requester"] = self.device_ref
        task["reasonReference"] = outcome_ref
        task["text"] = narrative.text(narrative.document(
            narrative.paragraph(self.tasks[spec.id]["text"], narrative.escape(description))))
        return _entry(tid, task, _create("Task", systems.SID_TASK, tid))

    def _provenance(self, written: list[dict], scores: Scores, ctx: _Context, status: str) -> dict:
        digest = hashlib.sha1(orjson.dumps(scores_facts_digest(scores))).hexdigest()
        pid = uuid5(f"{ctx.key}|provenance|{status}|{self.rule_set.tag}|{self.strategy}|{digest}")
        resource = {
            "resourceType": "Provenance",
            "meta": {"tag": [*self.tags, {"system": systems.SID_PROVENANCE, "code": pid}]},
            "target": [ctx.qr_ref, *(_ref(e) for e in written[1:])],
            "recorded": ctx.now,
            "policy": [f"{systems.RULE_SET_POLICY}/{self.rule_set.id}|{self.rule_set.version}"],
            "activity": {"coding": [{"system": systems.DATA_OPERATION, "code": ACTIVITY[status]}]},
            "agent": [{"type": AUTHOR, "who": self.device_ref}],
            "entity": [{"role": SOURCE_ROLE, "what": ctx.qr_ref}],
        }
        request = {"method": "POST", "url": "Provenance", "ifNoneExist": f"_tag={systems.SID_PROVENANCE}|{pid}"}
        return _entry(pid, resource, request)


# kind -> the method that sets an Observation's value and returns its summary
_VALUE_SETTERS = {
    "count": BundleBuilder._count_value,
    "flags": BundleBuilder._flags_value,
    "decision": BundleBuilder._decision_value,
    "score": BundleBuilder._score_value,
}


def scores_facts_digest(scores: Scores) -> list:
    """What the results were computed from, compactly: each result's value and criteria."""
    return [[code, str(r.value), r.criteria, r.inputs] for code, r in scores.results.items()]


class _Context:
    """The parts of one response that every resource built for it repeats."""

    __slots__ = ("authored", "encounter", "key", "now", "qr_ref", "status", "subject")

    def __init__(self, key: str, qr: dict, qr_ref: dict, status: str, now: str) -> None:
        self.key, self.qr_ref, self.status, self.now = key, qr_ref, status, now
        self.subject = {"reference": qr["subject"]["reference"]}
        encounter = qr.get("encounter")
        self.encounter = {"reference": encounter["reference"]} if encounter else None
        self.authored = qr.get("authored")


def _components(code: dict) -> dict[Any, dict]:
    return {
        True: {"code": code, "valueBoolean": True},
        False: {"code": code, "valueBoolean": False},
        None: {"code": code, "dataAbsentReason": UNKNOWN},
    }


def _flag_components(code: str, text: str, urgency: str | None) -> dict[Any, dict]:
    urgency_ext = [{"url": systems.EXT_URGENCY, "valueCode": urgency}]
    return {t: {"extension": urgency_ext, **c} for t, c in _components(coded(systems.RESULTS, code, text)).items()}


def _score_components(parts: _Parts, result: Result) -> list[dict]:
    """One component per score term: its answer, or unknown."""
    return [
        parts.terms[i][None] if value is None else {"code": parts.terms[i][None]["code"], "valueInteger": value}
        for i, value in enumerate(result.inputs)
    ]


def _score_rows(result: Result) -> list[str]:
    return [narrative.row(t.text, "not answered" if v is None else str(v))
            for t, v in zip(result.spec.terms, result.inputs)]


def _link_members(observations: list[dict], specs: list[ResultSpec]) -> None:
    members = [_ref(o) for o, s in zip(observations, specs) if not s.members]
    for entry, spec in zip(observations, specs):
        if spec.members:
            entry["resource"]["hasMember"] = members


def token(system: str | None, value: str, *, in_url: bool = True) -> str:
    """A token search value from caller data: FHIR-escaped, and URL-encoded when it goes into a URL as it is
    (an HTTP client's `params` encode it themselves). Ours are UUIDs and need neither."""

    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,").replace("$", "\\$")

    joined = f"{escape(system)}|{escape(value)}" if system else escape(value)
    return quote(joined, safe=":/|") if in_url else joined


def _entry(uuid: str, resource: dict, request: dict) -> dict:
    return {"fullUrl": f"urn:uuid:{uuid}", "resource": resource, "request": request}


def _create(resource_type: str, system: str, value: str) -> dict:
    return {"method": "POST", "url": resource_type, "ifNoneExist": f"identifier={system}|{value}"}


def _ref(entry: dict) -> dict:
    return {"reference": entry["fullUrl"]}
