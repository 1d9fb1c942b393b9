"""Compiles the rule trees of mappings/ into three-valued predicates.

A predicate returns True, False or None (unknown), combined with Kleene's
logic, so an unanswered item can never turn a rule into a false "no"
(SCREENING.md §2). Rule trees are compiled once into closures: evaluating
one is a few dictionary look-ups, which keeps scoring on the hot path cheap.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Truth = bool | None


class MappingError(ValueError):
    """A rule in mappings/ is malformed; the message names where."""


@dataclass(slots=True)
class Evaluation:
    """What a predicate may look at while one response is scored."""

    facts: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)
    strategy: str = ""
    met: tuple[int, int] = (0, 0)  # known-true and unknown criteria of the current result
    conditions: dict[str, Truth] = field(default_factory=dict)  # named conditions worked out so far


Predicate = Callable[[Evaluation], Truth]


def all_of(values: Sequence[Truth]) -> Truth:
    """Kleene AND: false wins, then unknown."""
    if False in values:
        return False
    return None if None in values else True


def any_of(values: Sequence[Truth]) -> Truth:
    """Kleene OR: true wins, then unknown."""
    if True in values:
        return True
    return None if None in values else False


def count_at_least(true: int, unknown: int, k: int) -> Truth:
    """k-of-n: positive at k known-true, negative only when the unknowns cannot reach k."""
    if true >= k:
        return True
    return False if true + unknown < k else None


def count_exactly(true: int, unknown: int, k: int) -> Truth:
    if true == k and unknown == 0:
        return True
    return False if k < true or k > true + unknown else None


def count_at_most(true: int, unknown: int, k: int) -> Truth:
    if true + unknown <= k:
        return True
    return False if true > k else None


COUNT_TESTS = {"at_least": count_at_least, "exactly": count_exactly, "at_most": count_at_most}
COMPARISONS = {
    "is": operator.eq,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "in": lambda value, options: value in options,
    "not_in": lambda value, options: value not in options,
}


@dataclass(frozen=True)
class Scope:
    """Names a rule may refer to while it is compiled."""

    items: dict[str, Any]  # answerable linkId -> questionnaire.ItemSpec
    conditions: dict[str, Predicate]
    results: dict[str, str]  # result code -> kind, for results defined earlier
    flags: dict[str, dict[str, list[int]]]  # flags result -> urgency -> criterion indexes
    texts: dict[str, str] = field(default_factory=dict)  # condition name -> its plain text
    referenced: set[str] = field(default_factory=set)  # results named by a rule
    has_criteria: bool = False


def compile_rule(node: Any, scope: Scope, where: str) -> Predicate:
    """Turns one rule tree (parsed YAML) into a predicate; errors name `where`."""
    if not isinstance(node, dict) or not node:
        raise MappingError(f"{where}: a rule must be a mapping, got {node!r}")
    keys = set(node)
    for key, build in _BUILDERS.items():
        if key in keys:
            return build(node, scope, where)
    raise MappingError(f"{where}: unknown rule {sorted(keys)}")


def _item(node: dict, scope: Scope, where: str) -> Predicate:
    item = node["item"]
    spec = scope.items.get(item)
    if spec is None:
        raise MappingError(f"{where}: no answerable item with linkId {item!r} in the Questionnaire")
    tests = [k for k in node if k != "item"]
    if len(tests) != 1 or tests[0] not in COMPARISONS:
        raise MappingError(f"{where}: item rule needs one of {sorted(COMPARISONS)}, got {tests}")
    test, ref = tests[0], node[tests[0]]
    for value in ref if test in ("in", "not_in") else [ref]:
        _check_value(spec, value, where)
    if test == "is" and type(ref) is bool:  # the commonest rule: the answer is the truth value
        if ref:
            return lambda ev: ev.facts.get(item)
        return lambda ev: None if (value := ev.facts.get(item)) is None else not value
    compare = COMPARISONS[test]
    if test in ("in", "not_in"):
        ref = frozenset(ref)

    def predicate(ev: Evaluation) -> Truth:
        value = ev.facts.get(item)
        return None if value is None else compare(value, ref)

    return predicate


def _check_value(spec: Any, value: Any, where: str) -> None:
    """A rule must compare an item with a value of its own type (and a real code)."""
    expected = spec.value_type
    ok = type(value) is expected or (expected is float and type(value) is int)
    if not ok or (spec.codes is not None and value not in spec.codes):
        raise MappingError(f"{where}: {value!r} is not a possible answer of {spec.type} item {spec.link_id!r}")


def _combine(node: dict, scope: Scope, where: str) -> Predicate:
    kind = "all" if "all" in node else "any"
    parts = [compile_rule(p, scope, f"{where}.{kind}[{i}]") for i, p in enumerate(node[kind])]
    if len(parts) == 2:  # most rules pair two answers; spare the list
        first, second = parts
        if kind == "all":
            return lambda ev: False if (a := first(ev)) is False else all_of((a, second(ev)))
        return lambda ev: True if (a := first(ev)) is True else any_of((a, second(ev)))
    join = all_of if kind == "all" else any_of
    return lambda ev: join([p(ev) for p in parts])


def _not(node: dict, scope: Scope, where: str) -> Predicate:
    inner = compile_rule(node["not"], scope, f"{where}.not")

    def predicate(ev: Evaluation) -> Truth:
        value = inner(ev)
        return None if value is None else not value

    return predicate


def _known(node: dict, scope: Scope, where: str) -> Predicate:
    inner = compile_rule(node["known"], scope, f"{where}.known")
    return lambda ev: inner(ev) is True


def _unknown(node: dict, scope: Scope, where: str) -> Predicate:
    inner = compile_rule(node["unknown"], scope, f"{where}.unknown")
    return lambda ev: inner(ev) is None


def _condition(node: dict, scope: Scope, where: str) -> Predicate:
    name = node["condition"]
    if name not in scope.conditions:
        raise MappingError(f"{where}: no condition named {name!r} (define it above its use)")
    rule = scope.conditions[name]

    def remembered(ev: Evaluation) -> Truth:  # a condition is used by several results: work it out once
        known = ev.conditions
        if name not in known:
            known[name] = rule(ev)
        return known[name]

    return remembered


def _result(node: dict, scope: Scope, where: str) -> Predicate:
    code = node["result"]
    if code != "strategy" and code not in scope.results:
        raise MappingError(f"{where}: no result {code!r} defined before this rule")
    scope.referenced.add(code)
    if "is" not in node:
        if scope.results.get(code) == "decision":
            raise MappingError(f"{where}: a decision has a value, not a truth: say `is: <value>`")

        def truth(ev: Evaluation) -> Truth:
            return ev.results[ev.strategy if code == "strategy" else code].truth

        return truth
    wanted = node["is"]

    def decided(ev: Evaluation) -> Truth:
        result = ev.results[ev.strategy if code == "strategy" else code]
        if result.value == wanted:
            return True
        return None if wanted in result.possible else False

    return decided


def _flags(node: dict, scope: Scope, where: str) -> Predicate:
    code, urgency = node["flags"], node.get("urgency")
    if code not in scope.flags or urgency not in scope.flags[code]:
        raise MappingError(f"{where}: no flags result {code!r} with urgency {urgency!r}")
    indexes = scope.flags[code][urgency]
    return lambda ev: any_of([ev.results[code].criteria[i] for i in indexes])


def _criteria_met(node: dict, scope: Scope, where: str) -> Predicate:
    if not scope.has_criteria:
        raise MappingError(f"{where}: criteria_met is only allowed in a result with criteria")
    spec = node["criteria_met"]
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in COUNT_TESTS:
        raise MappingError(f"{where}: criteria_met needs one of {sorted(COUNT_TESTS)}")
    (name, k), = spec.items()
    test = COUNT_TESTS[name]
    return lambda ev: test(ev.met[0], ev.met[1], k)


_BUILDERS: dict[str, Callable[[dict, Scope, str], Predicate]] = {
    "item": _item,
    "all": _combine,
    "any": _combine,
    "not": _not,
    "known": _known,
    "unknown": _unknown,
    "condition": _condition,
    "result": _result,
    "flags": _flags,
    "criteria_met": _criteria_met,
}
