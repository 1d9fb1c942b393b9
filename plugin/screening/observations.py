"""The findings of one result Observation: value, interpretation, components and narrative.

An `ObservationBuilder` is made once per rule set: it prepares every part of
each result that does not depend on the response (codes, components,
narrative rows). Responses repeat a limited number of states per result, so
the findings of each state are made once and shared (never mutated).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from plugin.screening import criteria, data, narrative, systems
from plugin.screening.displays import NOT_PERFORMED
from plugin.screening.mappings import INTERPRETATIONS, ResultSpec, RuleSet
from plugin.screening.scoring import TRUTH_WORDS, Result

UNKNOWN = {"coding": [{"system": systems.DATA_ABSENT, "code": "unknown", "display": "Unknown"}]}
NOT_APPLICABLE = {"coding": [{"system": systems.DATA_ABSENT, "code": "not-applicable", "display": "Not Applicable"}]}
NA = "not-applicable"  # a component's state when its result does not apply
# A component's reason carries the code only, like its own code: readers look names up (screening.displays).
COMPONENT_ABSENT = {
    None: {"coding": [{"system": systems.DATA_ABSENT, "code": "unknown"}]},
    NA: {"coding": [{"system": systems.DATA_ABSENT, "code": NA}]},
    narrative.UNTESTED: {"coding": [{"system": systems.DATA_ABSENT, "code": NOT_PERFORMED}]},
}
INTERPRETATION = {
    code: [{"coding": [{"system": systems.INTERPRETATION, "code": code, "display": display}]}]
    for code, display in INTERPRETATIONS.items()
}
TRUTH_INTERPRETATION = {True: INTERPRETATION["POS"], False: INTERPRETATION["NEG"], None: INTERPRETATION["IND"]}
CACHE_LIMIT = 4096
# "Author X et al. Title. Journal 2009;68:784-8. Notes": who, and where it was published.
PAPER = re.compile(r"(?P<who>[^.]+ et al\.) .+?\. (?P<where>[A-Z][A-Za-z ]* \d{4};\d+:\d+-\d+)")


def coded(system: str, code: str, display: str | None = None) -> dict:
    """A CodeableConcept of one Coding; components leave the display out (the published CodeSystem has it)."""
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def short_citation(citation: str) -> str:
    """A paper as author and journal reference (`Sieper J et al. Ann Rheum Dis 2009;68:784-8`), else as cited.

    The full citation, with its notes, stays in mappings/ and in the published CodeSystem's definition
    of the result's code; every Observation repeating it was most of its `method`.
    """
    paper = PAPER.match(citation)
    return f"{paper['who']} {paper['where']}" if paper else citation


@dataclass(frozen=True, slots=True)
class Parts:
    """Everything about one result that is the same for every response."""

    spec: ResultSpec
    code: dict
    method: dict
    components: tuple[dict[Any, dict], ...]  # per criterion: truth -> component
    terms: tuple[dict[Any, dict], ...]  # per score term: its component when unanswered (None) and its code
    names: tuple[dict[Any, str], ...]  # per criterion: truth -> its escaped name in the narrative
    groups: tuple[tuple[Any, str], ...]  # narrative: (truth, label) of the groups named after the summary
    intro: str  # narrative: the title, before the summary
    tail: str  # narrative: what follows the groups (the outcome's safety-netting)
    clinician_only: tuple[tuple[int, tuple[tuple[str, str], ...]], ...]  # (criterion, criteria.clinician_reads)
    cache: dict[tuple, dict]  # result state -> findings (see ObservationBuilder.findings)


class ObservationBuilder:
    def __init__(self, rule_set: RuleSet, item_codes: dict[str, dict], strategy: str) -> None:
        self.item_codes = {k: coded(v["system"], v["code"]) for k, v in item_codes.items()}
        self.values = {
            code: (coded(systems.RESULTS, code, v["display"]), INTERPRETATION.get(v.get("interpretation")))
            for code, v in rule_set.values.items()
        }
        self.parts = [self._parts(spec) for spec in rule_set.emitted(strategy)]
        advice = data.safety_netting("clinician")
        if advice:  # the one-word summary a clinician reads first ends with what to do if symptoms change
            self.parts = [replace(p, tail=p.tail + narrative.paragraph("Safety-netting", narrative.escape(advice)))
                          if p.spec.code == rule_set.outcome_result else p for p in self.parts]

    def _parts(self, spec: ResultSpec) -> Parts:
        code = coded(systems.RESULTS, spec.code, spec.title)
        flags = spec.kind == "flags"
        components = tuple(_components(coded(systems.RESULTS, c.code), c.urgency if flags else None)
                           for c in spec.criteria)
        also = tuple(_components(coded(systems.RESULTS, t.code)) for t in spec.also)
        terms = tuple(_components(self.item_codes[t.item]) for t in spec.terms)
        names = tuple(_names(c.text, c.urgency if flags else None) for c in spec.criteria)
        groups = narrative.FLAG_GROUPS if flags else narrative.CRITERION_GROUPS
        clinician_only = () if flags else tuple((i, reads) for i, c in enumerate(spec.criteria)
                                                if (reads := criteria.clinician_reads(c.code)))
        return Parts(spec, code, {"text": short_citation(spec.citation)}, components + also, terms, names, groups,
                     narrative.intro(spec.title), "", clinician_only, {})

    def findings(self, parts: Parts, result: Result, answers: Mapping[str, Any]) -> dict:
        """Value, interpretation, components and narrative: the same for every response in the same state.

        `answers` (linkId -> value, the facts the rules scored) tells a test left empty from a negative one:
        the narrative names it "Not tested", never "Not met" (H19).

        Responses repeat a limited number of states per result, so they are
        made once and reused (shared, never mutated); the cache stops growing
        at CACHE_LIMIT entries per result.
        """
        untested = _untested(parts, result, answers)
        state = (result.value, result.applies, result.criteria, result.also, result.inputs, untested)
        found = parts.cache.get(state)
        if found is not None:
            return found
        found = {}
        summary = _VALUE_SETTERS[parts.spec.kind](self, found, result)
        # A test not done is not-performed, never "false", though the rules count it not met (H19); a threshold
        # of a result that does not apply (Berlin over 50) is not-applicable, never "false".
        shown = tuple(narrative.UNTESTED if i in untested else t for i, t in enumerate(result.criteria))
        states = shown + (result.also if result.applies is not False else (NA,) * len(result.also))
        components = [parts.components[i][t] for i, t in enumerate(states)] + _score_components(parts, result)
        if components:
            found["component"] = components
        named = (narrative.groups(((t, parts.names[i][t]) for i, t in enumerate(shown)), parts.groups)
                 if parts.names else _score_answers(result))
        found["text"] = narrative.text(narrative.document(
            parts.intro, summary, narrative.PARAGRAPH_END, named, parts.tail))
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
            return "none reported, but some were not answered: red flags <b>cannot be ruled out</b>."
        obs["valueBoolean"] = result.value
        present = [_flag_name(c.text, c.urgency, c.concern) for c, t in zip(result.spec.criteria, result.criteria)
                   if t is True]
        return "<b>PRESENT</b>: " + "; ".join(present) + "." if present else "none present."

    def _decision_value(self, obs: dict, result: Result) -> str:
        value, interpretation = self.values[result.value]
        obs["valueCodeableConcept"] = value
        if interpretation:
            obs["interpretation"] = interpretation
        summary = value["coding"][0]["display"]
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


def _components(code: dict, urgency: str | None = None) -> dict[Any, dict]:
    """A criterion's component in each state; a red flag's carries its urgency."""
    extra = {"extension": [{"url": systems.EXT_URGENCY, "valueCode": urgency}]} if urgency else {}
    return {
        True: {**extra, "code": code, "valueBoolean": True},
        False: {**extra, "code": code, "valueBoolean": False},
        **{state: {**extra, "code": code, "dataAbsentReason": reason} for state, reason in COMPONENT_ABSENT.items()},
    }


def _names(text: str, urgency: str | None) -> dict[Any, str]:
    """A criterion's escaped name in the narrative by state: an unanswered red flag says how urgent it is."""
    name = narrative.escape(text)
    return {True: name, False: name, narrative.UNTESTED: name, None: f"{name} ({urgency})" if urgency else name}


def _untested(parts: Parts, result: Result, answers: Mapping[str, Any]) -> tuple[int, ...]:
    """The clinician-only criteria that are not met because their tests were left empty or not done."""
    return tuple(i for i, reads in parts.clinician_only
                 if result.criteria[i] is False and criteria.left_untested(reads, answers))


def _flag_name(text: str, urgency: str | None, concern: str | None) -> str:
    """A present red flag, bold, with what it may mean and how urgent it is."""
    why = "; ".join(w for w in (urgency, concern and f"possible {concern[0].lower()}{concern[1:]}") if w)
    return f"<b>{narrative.escape(text)}</b>" + (f" ({narrative.escape(why)})" if why else "")


def _score_components(parts: Parts, result: Result) -> list[dict]:
    """One component per score term: its answer, or unknown."""
    return [
        parts.terms[i][None] if value is None else {"code": parts.terms[i][None]["code"], "valueInteger": value}
        for i, value in enumerate(result.inputs)
    ]


def _score_answers(result: Result) -> str:
    """A score's narrative detail: each term's answer, then those left unanswered."""
    given = [f"{narrative.escape(t.text)} {v}" for t, v in zip(result.spec.terms, result.inputs) if v is not None]
    blank = [narrative.escape(t.text) for t, v in zip(result.spec.terms, result.inputs) if v is None]
    return narrative.groups([*(("given", g) for g in given), *((None, b) for b in blank)],
                            (("given", "Answers"), (None, "Not answered")))
