"""Evaluates a compiled rule set over one response's answers.

Pure: (rule set, answers, strategy) -> results and the Tasks they call for.
Every result keeps its per-criterion truth values so the builder can show
which criteria were met, not met or unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from plugin.screening.mappings import ResultSpec, RuleSet, TaskSpec, Then
from plugin.screening.rules import Evaluation, Truth, all_of, any_of, count_at_least

NOTHING: frozenset[str] = frozenset()
TRUTH_WORDS = {True: "positive", False: "negative", None: "indeterminate"}


@dataclass(slots=True)
class Result:
    spec: ResultSpec
    value: Any  # count (int), any flag (bool), decision code (str), score (Decimal); None if unknown
    truth: Truth = None  # positive / negative / unknown, where the result has a threshold
    applies: Truth = True
    criteria: tuple[Truth, ...] = ()
    also: tuple[Truth, ...] = ()
    possible: frozenset[str] = NOTHING  # decisions: every value the missing answers allow
    missing: tuple[str, ...] = ()  # scores: the unanswered items that leave it undefined
    inputs: tuple[Any, ...] = ()  # scores: each term's answer, None where unanswered

    @property
    def met(self) -> tuple[int, int]:
        return self.criteria.count(True), self.criteria.count(None)


@dataclass(slots=True)
class Scores:
    rule_set: RuleSet
    strategy: str  # result code of the chosen strategy, '' if none
    results: dict[str, Result]
    tasks: list[TaskSpec]
    facts: dict[str, Any]  # the answers scored: linkId -> value, an empty clinician item as its `unanswered_means`

    @property
    def outcome(self) -> Result:
        return self.results[self.rule_set.outcome_result]

    def outcome_label(self) -> str:
        """One word for counting responses by outcome."""
        result = self.outcome
        if result.spec.kind == "decision":
            return result.value
        return TRUTH_WORDS[result.truth]


def score(rule_set: RuleSet, facts: dict[str, Any], strategy: str | None = None) -> Scores:
    if rule_set.unanswered_means:
        facts = {**rule_set.unanswered_means, **facts}
    ev = Evaluation(facts=facts, strategy=rule_set.strategy_result(strategy))
    for spec in rule_set.emitted(ev.strategy):
        ev.results[spec.code] = _EVALUATORS[spec.kind](spec, ev)
    tasks = [t for t in rule_set.tasks if t.when(ev) is True]
    return Scores(rule_set, ev.strategy, ev.results, tasks, facts)


def _count(spec: ResultSpec, ev: Evaluation) -> Result:
    criteria = tuple([c.rule(ev) for c in spec.criteria])
    true, unknown = criteria.count(True), criteria.count(None)
    applies = spec.applies(ev) if spec.applies else True
    truth = None
    if spec.positive_at_least is not None:
        truth = all_of([applies, count_at_least(true, unknown, spec.positive_at_least)])
    also = tuple(all_of([applies, count_at_least(true, unknown, t.at_least)]) for t in spec.also)
    return Result(spec, true, truth, applies, criteria, also)


def _flags(spec: ResultSpec, ev: Evaluation) -> Result:
    criteria = tuple([c.rule(ev) for c in spec.criteria])
    value = any_of(criteria)
    return Result(spec, value, value, True, criteria)


def _decision(spec: ResultSpec, ev: Evaluation) -> Result:
    """First matching rule wins; an unknown condition keeps both ways open.

    The set of values reachable by some filling-in of the missing answers is
    collected; a decision is made only when that set has one member. The
    number of criteria met is tried at each value it could take, so rules
    that test it ("exactly 3", "4 or more") are never treated as independent
    of each other (NICE NG65: 3 met + HLA-B27 positive or 4 met both refer).
    """
    criteria = tuple([c.rule(ev) for c in spec.criteria])
    true, unknown = criteria.count(True), criteria.count(None)
    possible: set[str] = set()
    applies = spec.applies(ev) if spec.applies else True
    if applies is not True:
        possible.add("not-applicable")
    if applies is not False:
        for met in range(true, true + unknown + 1):
            ev.met = (met, 0)
            possible.update(_reachable(spec, ev))
    value = next(iter(possible)) if len(possible) == 1 else "indeterminate"
    return Result(spec, value, None, applies, criteria, possible=frozenset(possible))


def _reachable(spec: ResultSpec, ev: Evaluation) -> set[str]:
    """Values the rules can give: every rule that may hold, down to the first that surely holds."""
    found = set()
    for when, then in spec.rules:
        holds = when(ev)
        if holds is not False:
            found.add(_value_of(then, ev))
        if holds is True:
            return found
    found.add(_value_of(spec.otherwise, ev))
    return found


def _value_of(then: Then, ev: Evaluation) -> str:
    if then.code is not None:
        return then.code
    return ev.results[ev.strategy if then.outcome_of == "strategy" else then.outcome_of].value


def _score(spec: ResultSpec, ev: Evaluation) -> Result:
    values = [ev.facts.get(t.item) for t in spec.terms]
    missing = tuple(t.item for t, v in zip(spec.terms, values) if v is None)
    if missing:
        return Result(spec, None, None, missing=missing, inputs=tuple(values))
    total = sum((t.weight * Decimal(v) for t, v in zip(spec.terms, values)), Decimal(0))
    total = total.quantize(Decimal(1).scaleb(-spec.decimals), rounding=ROUND_HALF_UP)
    truth = None if spec.positive_at_least is None else total >= spec.positive_at_least
    return Result(spec, total, truth, inputs=tuple(values))


_EVALUATORS = {"count": _count, "flags": _flags, "decision": _decision, "score": _score}
