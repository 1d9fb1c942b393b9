"""Loads a rule set from mappings/ and compiles it against its Questionnaire.

The YAML format is documented in mappings/README.md. Loading checks every
reference (items, conditions, earlier results, codes) so that a mistake in
an edited mapping fails at start-up with a message naming where, not while
a patient's response is being scored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from plugin.screening import systems
from plugin.screening.questionnaire import CompiledQuestionnaire
from plugin.screening.rules import MappingError, Predicate, Scope, compile_rule

KINDS = ("count", "flags", "decision", "score")
URGENCIES = ("emergency", "urgent")
PRIORITIES = ("routine", "urgent", "asap", "stat")
INTERPRETATIONS = {"POS": "Positive", "NEG": "Negative", "IND": "Indeterminate"}


@dataclass(frozen=True, slots=True)
class Criterion:
    code: str
    text: str
    rule: Predicate
    urgency: str | None = None
    concern: str | None = None


@dataclass(frozen=True, slots=True)
class Threshold:
    code: str
    text: str
    at_least: int


@dataclass(frozen=True, slots=True)
class Term:
    item: str
    weight: Decimal
    text: str


@dataclass(frozen=True, slots=True)
class Then:
    """A decision rule's outcome: a value code, or the value of another result."""

    code: str | None = None
    outcome_of: str | None = None


@dataclass(frozen=True, slots=True)
class ResultSpec:
    code: str
    kind: str
    title: str
    citation: str
    criteria: tuple[Criterion, ...] = ()
    applies: Predicate | None = None
    applies_text: str = ""
    positive_at_least: Any = None  # int for counts, Decimal for scores
    also: tuple[Threshold, ...] = ()
    rules: tuple[tuple[Predicate, Then], ...] = ()
    otherwise: Then | None = None
    members: bool = False
    terms: tuple[Term, ...] = ()
    decimals: int = 0
    unit: dict | None = None
    positive_text: str = ""
    negative_text: str = ""


@dataclass(frozen=True, slots=True)
class TaskSpec:
    id: str
    when: Predicate
    code: dict
    priority: str
    reason: str
    description: str


@dataclass(frozen=True, slots=True)
class RuleSet:
    questionnaire: str
    id: str
    version: str
    unanswered_means: dict[str, Any]
    results: tuple[ResultSpec, ...]
    strategies: dict[str, str]  # option name -> result code
    default_strategy: str | None
    values: dict[str, dict]
    tasks: tuple[TaskSpec, ...]
    outcome_result: str
    per_strategy: dict[str, tuple[ResultSpec, ...]]  # strategy result code -> the results to evaluate

    @property
    def flag_results(self) -> tuple[str, ...]:
        """The codes of the red-flag results (kind `flags`)."""
        return tuple(r.code for r in self.results if r.kind == "flags")

    @property
    def tag(self) -> str:
        return f"{self.id}-{self.version}"

    def strategy_result(self, strategy: str | None) -> str:
        """The result code of a strategy option; '' when the rule set has none."""
        if not self.strategies:
            return ""
        name = strategy or self.default_strategy
        if name not in self.strategies:
            raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(self.strategies)}")
        return self.strategies[name]

    def emitted(self, strategy_code: str) -> tuple[ResultSpec, ...]:
        """Results evaluated and written for a response: all but the strategies not chosen."""
        return self.per_strategy[strategy_code]


def load_rule_set(data: dict, q: CompiledQuestionnaire) -> RuleSet:
    if data.get("questionnaire") != q.url:
        raise MappingError(f"rule set is for {data.get('questionnaire')!r}, not {q.url!r}")
    items = q.answerable()
    unanswered = data.get("unanswered_means", {})
    for link_id in unanswered:
        _need(link_id in items, f"unanswered_means: no item {link_id!r}")
    asked_in = data.get("asked_in", {})
    for link_id, versions in asked_in.items():
        _need(isinstance(versions, list) and all(isinstance(v, str) for v in versions),
              f"asked_in.{link_id}: a list of Questionnaire versions")
    unasked = {link_id for link_id, versions in asked_in.items() if q.version not in versions}
    scope = Scope(items=items, conditions={}, results={}, flags={})
    for name, cond in data.get("conditions", {}).items():
        _need(bool(cond.get("text")) and bool(cond.get("citation")), f"conditions.{name}: needs text and citation")
        scope.conditions[name] = compile_rule(cond.get("rule"), scope, f"conditions.{name}")
        scope.texts[name] = cond["text"]
    strategies = data.get("strategies", {})
    results = tuple(_result(_asked(raw, unasked), scope, f"results[{i}]") for i, raw in enumerate(data["results"]))
    values = data.get("values", {})
    _check_values(results, values, set(strategies.get("options", {}).values()))
    codes = {r.code for r in results}
    options = strategies.get("options", {})
    for name, code in options.items():
        _need(code in codes, f"strategies.options.{name}: no result {code!r}")
    _need(not options or strategies.get("default") in options, "strategies.default must be one of the options")
    _need(data.get("outcome_result") in codes, "outcome_result must name a result")
    strategy_scope = replace(scope, results={**scope.results, "strategy": "decision"})
    tasks = tuple(_task(raw, strategy_scope, codes, f"tasks[{i}]") for i, raw in enumerate(data.get("tasks", [])))
    for code in options.values():
        _need(code not in scope.referenced, f"result {code!r} is a strategy: refer to it as `strategy`")
    per_strategy = {
        code: tuple(r for r in results if r.code == code or r.code not in options.values())
        for code in [*options.values(), ""]
    }
    rule_set = data.get("rule_set", {})
    return RuleSet(
        questionnaire=q.url,
        id=rule_set["id"],
        version=str(rule_set["version"]),
        unanswered_means=dict(unanswered),
        results=results,
        strategies=dict(options),
        default_strategy=strategies.get("default"),
        values=values,
        tasks=tasks,
        outcome_result=data["outcome_result"],
        per_strategy=per_strategy,
    )


def _asked(raw: dict, unasked: set[str]) -> dict:
    """A result without the criteria about items this Questionnaire version does not ask.

    An item a version never asked is neither present nor unanswered: its criterion is left out,
    so a response to an older version is scored by that version's own item set.
    """
    if not unasked or "criteria" not in raw:
        return raw
    return {**raw, "criteria": [c for c in raw["criteria"] if not items_of(c.get("rule")) & unasked]}


def items_of(rule: Any) -> set[str]:
    """Every item a raw rule reads."""
    if isinstance(rule, dict):
        found = {rule["item"]} if isinstance(rule.get("item"), str) else set()
        return found.union(*(items_of(v) for v in rule.values()))
    if isinstance(rule, list):
        return set().union(*(items_of(v) for v in rule))
    return set()


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise MappingError(message)


def _result(raw: dict, scope: Scope, where: str) -> ResultSpec:
    code, kind = raw.get("code"), raw.get("kind")
    _need(isinstance(code, str) and code not in scope.results, f"{where}: missing or repeated code {code!r}")
    _need(kind in KINDS, f"{where}: kind must be one of {KINDS}")
    _need(bool(raw.get("citation")), f"{where}: every result needs a citation")
    where = f"{where}({code})"
    criteria_scope = replace(scope, has_criteria=True)
    criteria = tuple(_criterion(c, scope, f"{where}.criteria[{i}]") for i, c in enumerate(raw.get("criteria", [])))
    spec = ResultSpec(
        code=code,
        kind=kind,
        title=raw.get("title", code),
        citation=" ".join(raw["citation"].split()),
        criteria=criteria,
        applies=compile_rule(raw["applies_when"], scope, f"{where}.applies_when") if "applies_when" in raw else None,
        applies_text=_applies_text(raw, scope, where),
        positive_at_least=_threshold(raw.get("positive_at_least"), kind),
        also=tuple(Threshold(a["code"], a["text"], int(a["at_least"])) for a in raw.get("also", [])),
        rules=tuple(
            (compile_rule(r["when"], criteria_scope, f"{where}.rules[{i}]"), _then(r["then"], scope, where))
            for i, r in enumerate(raw.get("rules", []))
        ),
        otherwise=_then(raw["otherwise"], scope, where) if "otherwise" in raw else None,
        members=raw.get("members") == "all",
        terms=tuple(_term(t, scope, f"{where}.terms[{i}]") for i, t in enumerate(raw.get("terms", []))),
        decimals=int(raw.get("decimals", 0)),
        unit=raw.get("unit"),
        positive_text=raw.get("positive_text", ""),
        negative_text=raw.get("negative_text", ""),
    )
    _need(kind != "decision" or spec.otherwise is not None, f"{where}: a decision needs `otherwise`")
    _need(kind != "score" or bool(spec.terms), f"{where}: a score needs terms")
    _need(kind != "flags" or all(c.urgency in URGENCIES for c in criteria), f"{where}: flags need an urgency")
    scope.results[code] = kind
    if kind == "flags":
        scope.flags[code] = {u: [i for i, c in enumerate(criteria) if c.urgency == u] for u in URGENCIES}
    return spec


def _applies_text(raw: dict, scope: Scope, where: str) -> str:
    """How a reader is told when a result applies: its own text, or its condition's."""
    if "applies_when" not in raw:
        return ""
    condition = raw["applies_when"].get("condition")
    text = raw.get("applies_text") or scope.texts.get(condition)
    _need(bool(text), f"{where}: applies_when needs applies_text (or a single named condition)")
    return text


def _criterion(raw: dict, scope: Scope, where: str) -> Criterion:
    _need(isinstance(raw.get("code"), str) and isinstance(raw.get("text"), str), f"{where}: needs code and text")
    return Criterion(raw["code"], raw["text"], compile_rule(raw.get("rule"), scope, where),
                     raw.get("urgency"), raw.get("concern"))


def _threshold(value: Any, kind: str) -> Any:
    if value is None:
        return None
    return Decimal(str(value)) if kind == "score" else int(value)


def _term(raw: dict, scope: Scope, where: str) -> Term:
    item = raw.get("item")
    _need(item in scope.items, f"{where}: no item {item!r}")
    return Term(item, Decimal(str(raw["weight"])), raw.get("text", item))


def _then(raw: Any, scope: Scope, where: str) -> Then:
    if isinstance(raw, str):
        return Then(code=raw)
    ref = raw.get("outcome_of") if isinstance(raw, dict) else None
    _need(ref == "strategy" or ref in scope.results, f"{where}: `then` must be a code or {{outcome_of: result}}")
    return Then(outcome_of=ref)


def _check_values(results: tuple[ResultSpec, ...], values: dict, strategy_codes: set[str]) -> None:
    for spec in results:
        thens = [t for _, t in spec.rules] + ([spec.otherwise] if spec.otherwise else [])
        for then in thens:
            _need(then.code is None or then.code in values, f"result {spec.code}: value {then.code!r} not in `values`")
    for code, value in values.items():
        interp = value.get("interpretation")
        _need(interp is None or interp in INTERPRETATIONS, f"values.{code}: interpretation must be POS, NEG or IND")
    for needed in ("not-applicable", "indeterminate"):
        _need(not strategy_codes or needed in values, f"values must define {needed!r}")


def _task(raw: dict, scope: Scope, codes: set[str], where: str) -> TaskSpec:
    _need(raw.get("priority") in PRIORITIES, f"{where}: priority must be one of {PRIORITIES}")
    reason = raw.get("reason")
    _need(reason == "strategy" or reason in codes, f"{where}: reason must name a result")
    code = dict(raw["code"])
    code["system"] = systems.ALIASES.get(code["system"], code["system"])
    code["also"] = tuple(dict(coding) for coding in code.get("also", ()))  # verified standard codings beside ours
    return TaskSpec(raw["id"], compile_rule(raw["when"], scope, f"{where}.when"), code, raw["priority"], reason,
                    " ".join(raw["description"].split()))
