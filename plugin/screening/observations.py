"""The findings of one result Observation: value, interpretation, components and narrative.

An `ObservationBuilder` is made once per rule set: it prepares every part of
each result that does not depend on the response (codes, components,
narrative rows). Responses repeat a limited number of states per result, so
the findings of each state are made once and shared (never mutated).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from plugin.screening import data, narrative, systems
from plugin.screening.mappings import INTERPRETATIONS, ResultSpec, RuleSet
from plugin.screening.scoring import TRUTH_WORDS, Result

UNKNOWN = {"coding": [{"system": systems.DATA_ABSENT, "code": "unknown", "display": "Unknown"}]}
NOT_APPLICABLE = {"coding": [{"system": systems.DATA_ABSENT, "code": "not-applicable", "display": "Not Applicable"}]}
INTERPRETATION = {
    code: [{"coding": [{"system": systems.INTERPRETATION, "code": code, "display": display}]}]
    for code, display in INTERPRETATIONS.items()
}
TRUTH_INTERPRETATION = {True: INTERPRETATION["POS"], False: INTERPRETATION["NEG"], None: INTERPRETATION["IND"]}
CACHE_LIMIT = 4096
NA = "not-applicable"  # a component's state when its result does not apply


def coded(system: str, code: str, display: str) -> dict:
    """A CodeableConcept of one Coding (components: the display says it all, the Bundle stays small)."""
    return {"coding": [{"system": system, "code": code, "display": display}]}


def concept(system: str, code: str, display: str) -> dict:
    return {**coded(system, code, display), "text": display}


@dataclass(frozen=True, slots=True)
class Parts:
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
    cache: dict[tuple, dict]  # result state -> findings (see ObservationBuilder.findings)


class ObservationBuilder:
    def __init__(self, rule_set: RuleSet, item_codes: dict[str, dict], strategy: str) -> None:
        self.item_codes = item_codes
        self.values = {
            code: (concept(systems.RESULTS, code, v["display"]), INTERPRETATION.get(v.get("interpretation")))
            for code, v in rule_set.values.items()
        }
        self.parts = [self._parts(spec) for spec in rule_set.emitted(strategy)]
        advice = data.safety_netting("clinician")
        if advice:  # the one-word summary a clinician reads first ends with what to do if symptoms change
            self.parts = [replace(p, tail=p.tail + narrative.paragraph("Safety-netting", narrative.escape(advice)))
                          if p.spec.code == rule_set.outcome_result else p for p in self.parts]

    def _parts(self, spec: ResultSpec) -> Parts:
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
        return Parts(spec, code, {"text": spec.citation}, components + also, terms, tuple(rows),
                      narrative.intro(spec.title), narrative.table_head(head), narrative.source(spec.citation), {})

    def findings(self, parts: Parts, result: Result) -> dict:
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
        # A threshold of a result that does not apply (Berlin over 50) is not-applicable, never "false".
        states = result.criteria + (result.also if result.applies is not False else (NA,) * len(result.also))
        components = [parts.components[i][t] for i, t in enumerate(states)] + _score_components(parts, result)
        if components:
            found["component"] = components
        rows = [parts.rows[i][t] for i, t in enumerate(result.criteria)] if parts.rows else _score_rows(result)
        found["text"] = narrative.text(narrative.document(
            parts.intro, summary, narrative.PARAGRAPH_END, parts.head, *rows, narrative.TABLE_END, parts.tail))
        if len(parts.cache) < CACHE_LIMIT:
            parts.cache[state] = found
        return found

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


# kind -> the method that sets an Observation's value and returns its summary
_VALUE_SETTERS = {
    "count": ObservationBuilder._count_value,
    "flags": ObservationBuilder._flags_value,
    "decision": ObservationBuilder._decision_value,
    "score": ObservationBuilder._score_value,
}


def _components(code: dict) -> dict[Any, dict]:
    return {
        True: {"code": code, "valueBoolean": True},
        False: {"code": code, "valueBoolean": False},
        None: {"code": code, "dataAbsentReason": UNKNOWN},
        NA: {"code": code, "dataAbsentReason": NOT_APPLICABLE},
    }


def _flag_components(code: str, text: str, urgency: str | None) -> dict[Any, dict]:
    urgency_ext = [{"url": systems.EXT_URGENCY, "valueCode": urgency}]
    return {t: {"extension": urgency_ext, **c} for t, c in _components(coded(systems.RESULTS, code, text)).items()}


def _score_components(parts: Parts, result: Result) -> list[dict]:
    """One component per score term: its answer, or unknown."""
    return [
        parts.terms[i][None] if value is None else {"code": parts.terms[i][None]["code"], "valueInteger": value}
        for i, value in enumerate(result.inputs)
    ]


def _score_rows(result: Result) -> list[str]:
    return [narrative.row(t.text, "not answered" if v is None else str(v))
            for t, v in zip(result.spec.terms, result.inputs)]
