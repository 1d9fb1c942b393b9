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
from plugin.screening.checking import check_response
from plugin.screening.mappings import RuleSet, load_rule_set
from plugin.screening.outcome import InvalidInput, invalid
from plugin.screening.parsing import MAX_BODY_BYTES, parse_body
from plugin.screening.questionnaire import CompiledQuestionnaire, compile_questionnaire
from plugin.screening.references import patient_reference
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
    """What scoring one response gave: the transaction Bundle and a one-word summary."""

    bundle: dict
    label: str
    scores: Scores | None


def _must_serialize(qr: dict) -> None:
    """The response is written back as it came: refuse what JSON cannot carry (too deep, huge ints)."""
    try:
        orjson.dumps(qr)
    except orjson.JSONEncodeError:
        raise invalid("structure", "The response holds values that cannot be written back as FHIR JSON "
                      "(nested too deeply, or numbers or text out of range).") from None


class Screener:
    def __init__(self, settings: Settings | None = None, clock: Clock = utc_now) -> None:
        self.settings = settings or Settings()
        self.clock = clock
        self.questionnaires: dict[str, CompiledQuestionnaire] = {
            q["url"]: compile_questionnaire(q) for q in data.definitions("Questionnaire")
        }
        self.rule_sets: dict[str, RuleSet] = {}
        for raw in data.rule_files():
            q = self.questionnaires[raw["questionnaire"]]
            self.rule_sets[q.url] = load_rule_set(raw, q)
        self.builders = {
            url: BundleBuilder(self.questionnaires[url], rules, self.settings.strategy)
            for url, rules in self.rule_sets.items()
        }

    def check(self, qr: Any) -> tuple[CompiledQuestionnaire, dict[str, Any]]:
        return check_response(qr, self.questionnaires, self.settings.fhir_base)

    def process(self, qr: Any) -> Outcome:
        """Check, score and build; raises InvalidInput with every problem found."""
        q, facts = self.check(qr)
        _must_serialize(qr)
        # Filed (and its results keyed) under the one relative form, however the accepted subject was written.
        qr["subject"]["reference"] = patient_reference(qr["subject"]["reference"], self.settings.fhir_base)
        if qr["status"] not in SCORED_STATUSES:  # in-progress or stopped: nothing to score or write
            return Outcome(NOTHING_TO_WRITE, qr["status"], None)
        scores = score(self.rule_sets[q.url], facts, self.settings.strategy)
        return Outcome(self.builders[q.url].build(qr, scores, self.clock()), scores.outcome_label(), scores)

    def process_body(self, body: bytes, content_type: str | None = None) -> Outcome:
        return self.process(parse_body(body, content_type, self.settings.max_body_bytes))

    def process_line(self, line: bytes) -> tuple[bytes, str]:
        """For NDJSON: one serialized Bundle or OperationOutcome, and its label."""
        try:
            outcome = self.process_body(line, "application/fhir+json")
        except InvalidInput as error:
            return orjson.dumps(error.to_fhir()), "invalid"
        return orjson.dumps(outcome.bundle), outcome.label
