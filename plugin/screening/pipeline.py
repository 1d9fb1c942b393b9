"""parse -> check -> score -> build: the same path whichever way a response arrives.

A `Screener` is made once (it compiles the Questionnaires and rule sets);
its methods are pure functions of their inputs and the clock passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from plugin.screening import data
from plugin.screening.building import NOTHING_TO_WRITE, SCORED_STATUSES, BundleBuilder
from plugin.screening.checking import check_response, newest, questionnaire_of
from plugin.screening.mappings import RuleSet, load_rule_set
from plugin.screening.outcome import InvalidInput, Issue, invalid
from plugin.screening.parsing import MAX_BODY_BYTES, parse_body
from plugin.screening.questionnaire import CompiledQuestionnaire, compile_questionnaire
from plugin.screening.references import patient_of, patient_reference
from plugin.screening.rescue import lenient_facts
from plugin.screening.scoring import Scores, score

Clock = Callable[[], datetime]


@dataclass(frozen=True, slots=True)
class Settings:
    """What a scoring run is configured with (the service's settings carry these too)."""

    strategy: str | None = None  # referral strategy option; None = the rule set's default
    max_body_bytes: int = MAX_BODY_BYTES
    fhir_base: str | None = None  # the FHIR server's base: a subject may be an absolute URL on it


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What scoring one response gave: the transaction Bundle and a one-word summary.

    `red_flags_only`: the response could not be scored as a whole (not completed, or refused),
    and the Bundle holds only what its reported red flags call for (SCREENING.md §7).
    """

    bundle: dict
    label: str
    scores: Scores | None
    red_flags_only: bool = False


@dataclass(frozen=True, slots=True)
class Version:
    """One published Questionnaire version with its rules and its Bundle builder."""

    questionnaire: CompiledQuestionnaire
    rules: RuleSet
    builder: BundleBuilder


def _serialized(qr: Any) -> bytes | None:
    """The response as compact JSON; None for what JSON cannot carry (too deep, huge ints)."""
    try:
        return orjson.dumps(qr)
    except (orjson.JSONEncodeError, TypeError):
        return None


def _must_serialize(serialized: bytes | None) -> None:
    """The response is written back as it came: refuse what JSON cannot carry."""
    if serialized is None:
        raise invalid("structure", "The response holds values that cannot be written back as FHIR JSON "
                      "(nested too deeply, or numbers or text out of range).")


class Screener:
    def __init__(self, settings: Settings | None = None, clock: Clock = utc_now) -> None:
        self.settings = settings or Settings()
        self.clock = clock
        # url -> version -> compiled Questionnaire; every published version stays scorable
        self.catalog: dict[str, dict[str, CompiledQuestionnaire]] = {}
        for resource in data.definitions("Questionnaire"):
            self.catalog.setdefault(resource["url"], {})[resource["version"]] = compile_questionnaire(resource)
        rule_files = {raw["questionnaire"]: raw for raw in data.rule_files()}
        self.versions: dict[tuple[str, str], Version] = {}
        for url, versions in self.catalog.items():
            for version, q in versions.items():
                rules = load_rule_set(rule_files[url], q)
                self.versions[url, version] = Version(q, rules, BundleBuilder(q, rules, self.settings.strategy))
        # The newest version of each Questionnaire: what is served as current, and its rules and builder.
        self.questionnaires = {url: newest(versions) for url, versions in self.catalog.items()}
        self.rule_sets = {url: self.versions[url, q.version].rules for url, q in self.questionnaires.items()}
        self.builders = {url: self.versions[url, q.version].builder for url, q in self.questionnaires.items()}

    def check(self, qr: Any, serialized: bytes | None = None) -> tuple[CompiledQuestionnaire, dict[str, Any]]:
        return check_response(qr, self.catalog, self.settings.fhir_base, serialized)

    def process(self, qr: Any) -> Outcome:
        """Check, score and build; raises InvalidInput with every problem found.

        A response that is not completed, or is refused, still has its red flags read: a
        `true` one gives the red-flags Observation and the review Task (`red_flags_only`);
        on a refused response they ride on the InvalidInput (`rescued`) for the caller to write.
        """
        serialized = _serialized(qr)  # once: the modifier-extension scan reads it too
        try:
            q, facts = self.check(qr, serialized)
        except InvalidInput as error:
            error.rescued = self.rescue(qr)
            raise
        _must_serialize(serialized)
        # Filed (and its results keyed) under the one relative form, however the accepted subject was written.
        qr["subject"]["reference"] = patient_reference(qr["subject"]["reference"], self.settings.fhir_base)
        if qr["status"] not in SCORED_STATUSES:  # in-progress or stopped: only a reported red flag is written
            return self._red_flags(qr, self.versions[q.url, q.version], facts) or Outcome(
                NOTHING_TO_WRITE, qr["status"], None)
        version = self.versions[q.url, q.version]
        scores = score(version.rules, facts, self.settings.strategy)
        return Outcome(version.builder.build(qr, scores, self.clock()), scores.outcome_label(), scores)

    def rescue(self, qr: Any) -> Outcome | None:
        """What a refused response's red flags call for, if it names its patient and reports one."""
        patient = patient_of(qr, self.settings.fhir_base)
        if patient is None or qr.get("resourceType") != "QuestionnaireResponse":
            return None
        q = questionnaire_of(qr, self.catalog)
        if q is None:
            return None
        qr["subject"]["reference"] = patient  # filed under the one relative form, as a scored response is
        if _serialized(qr) is None:
            return None  # it cannot be written back at all; the caller keeps it and is told why
        return self._red_flags(qr, self.versions[q.url, q.version], lenient_facts(qr, q))

    def _red_flags(self, qr: dict, version: Version, facts: dict[str, Any]) -> Outcome | None:
        scores = score(version.rules, facts, self.settings.strategy)
        if not any(scores.results[code].value is True for code in version.rules.flag_results):
            return None
        bundle = version.builder.build_red_flags(qr, scores, self.clock())
        return Outcome(bundle, scores.outcome_label(), scores, red_flags_only=True)

    def process_body(self, body: bytes, content_type: str | None = None) -> Outcome:
        return self.process(parse_body(body, content_type, self.settings.max_body_bytes))

    def process_line(self, line: bytes) -> tuple[bytes, str]:
        """For NDJSON: one serialized Bundle or OperationOutcome, and its label."""
        try:
            outcome = self.process_body(line, "application/fhir+json")
        except InvalidInput as error:  # a reported red flag is in the OperationOutcome; `batch` writes nothing
            return orjson.dumps(recorded(error).to_fhir() if error.rescued else error.to_fhir()), "invalid"
        return orjson.dumps(outcome.bundle), outcome.label


def recorded(error: InvalidInput, written: bool = False) -> InvalidInput:
    """The refusal, saying what was done with the red flags the response reported."""
    rescued = error.rescued
    assert rescued is not None and rescued.scores is not None
    flags = [c.text for code in rescued.scores.rule_set.flag_results
             for c, t in zip(rescued.scores.results[code].spec.criteria, rescued.scores.results[code].criteria)
             if t is True]
    done = ("were recorded: the red-flags Observation and a clinical review Task were written"
            if written else "call for a red-flags Observation and a clinical review Task, which this call "
            "does not write")
    note = Issue("informational", f"The response was refused, but the red flags it reports ({'; '.join(flags)}) "
                 f"{done}. Fix the problems above and send it again for the full screening.", None, "information")
    refusal = InvalidInput([*error.issues, note], error.status)
    refusal.rescued = rescued
    return refusal
