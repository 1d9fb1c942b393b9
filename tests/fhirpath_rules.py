"""Translates the rule trees of mappings/ into FHIRPath on the QuestionnaireResponse.

Used by the benchmark (how slow the same rules are with fhirpathpy) and by
a differential test (our engine and FHIRPath must agree on every criterion).
FHIRPath's empty collection plays the part of our unknown: comparisons with
an empty operand are empty, `and`/`or` follow Kleene's logic and `.not()` of
empty is empty, so a translated criterion gives [True], [False] or [].

Only what criteria, conditions and `applies_when` use is translated:
item tests, all/any/not, known/unknown, named conditions (inlined) and the
truth of an earlier count or flags result (its expression inlined). The
decision-only nodes (`criteria_met`, `flags`, `result ... is`) raise
NotImplementedError.
"""

from __future__ import annotations

from typing import Any

from plugin.screening.mappings import items_of
from tests import factory

ROOT = "QuestionnaireResponse"
COMPARE = {"is": "=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


def literal(value: Any) -> str:
    """A Python scalar as a FHIRPath literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise TypeError(f"no FHIRPath literal for {value!r}")


def answer_path(link_id: str, groups: tuple[str, ...] | None = None) -> str:
    """The answer value of an item: found at any depth, or (given its groups) along its exact path.

    `repeat(item)` is the general form; the exact path reads the same answer
    from a valid response (the checker rejects items outside their group)
    about three times faster with fhirpathpy.
    """
    if groups is None:
        return f"{ROOT}.repeat(item).where(linkId={literal(link_id)}).answer.value"
    steps = "".join(f".item.where(linkId={literal(g)})" for g in (*groups, link_id))
    return f"{ROOT}{steps}.answer.value"


def questionnaire_items(questionnaire: dict) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Answerable linkId -> (item type, linkIds of the groups it sits in, outermost first)."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}

    def walk(items: list[dict], groups: tuple[str, ...]) -> None:
        for item in items:
            if item["type"] not in ("group", "display"):
                found[item["linkId"]] = (item["type"], groups)
            walk(item.get("item", []), (*groups, item["linkId"]))

    walk(questionnaire.get("item", []), ())
    return found


class RuleTranslator:
    """Translates one rule set (the loaded YAML) against its Questionnaire.

    `exact_paths` picks how an item is found: False (default) `repeat(item)`,
    True the path through its groups.
    """

    def __init__(self, rules: dict, questionnaire: dict | None = None, exact_paths: bool = False) -> None:
        self.rules = rules
        self.items = questionnaire_items(questionnaire or factory.questionnaire(rules["questionnaire"]))
        self.exact_paths = exact_paths
        self.defaults: dict[str, Any] = dict(rules.get("unanswered_means", {}))
        self.conditions: dict[str, str] = {}
        for name, cond in rules.get("conditions", {}).items():
            self.conditions[name] = self.rule(cond["rule"])
        self.results: dict[str, dict] = {}
        self.truths: dict[str, str] = {}  # result code -> expression of its truth, where it has one
        self.applies: dict[str, str] = {}  # result code -> its applies_when
        self.criteria: dict[str, str] = {}  # criterion code -> expression
        for raw in rules["results"]:
            self._result(raw)

    # -- rule trees ------------------------------------------------------------

    def value(self, link_id: str) -> str:
        """An item's answer as compared by rules: the code of a coding; the default if unanswered."""
        if link_id not in self.items:
            raise KeyError(f"no answerable item {link_id!r}")
        kind, groups = self.items[link_id]
        path = answer_path(link_id, groups if self.exact_paths else None)
        if kind == "choice":
            path += ".code"
        if link_id in self.defaults:
            path = f"iif({path}.exists(), {path}, {literal(self.defaults[link_id])})"
        return path

    def rule(self, node: dict) -> str:
        """One rule tree as a parenthesised FHIRPath boolean expression."""
        if "item" in node:
            return self._item(node)
        if "all" in node or "any" in node:
            kind = "all" if "all" in node else "any"
            joiner = " and " if kind == "all" else " or "
            return "(" + joiner.join(self.rule(p) for p in node[kind]) + ")"
        if "not" in node:
            return f"{self.rule(node['not'])}.not()"
        if "known" in node:
            return f"iif({self.rule(node['known'])}, true, false)"
        if "unknown" in node:
            return f"{self.rule(node['unknown'])}.empty()"
        if "condition" in node:
            return self.conditions[node["condition"]]
        if "result" in node and "is" not in node:
            code = node["result"]
            if code not in self.truths:
                raise NotImplementedError(f"the truth of result {code!r} is not translated")
            return self.truths[code]
        raise NotImplementedError(f"rule {sorted(node)} is only used by decisions; not translated")

    def _item(self, node: dict) -> str:
        link_id = node["item"]
        (test, ref), = ((k, v) for k, v in node.items() if k != "item")
        value = self.value(link_id)
        if test in COMPARE:
            return f"({value} {COMPARE[test]} {literal(ref)})"
        options = "(" + " | ".join(literal(r) for r in ref) + ")"
        if test == "in":
            return f"({value} in {options})"
        if test == "not_in":
            return f"({value} in {options}).not()"
        raise NotImplementedError(f"item test {test!r}")

    # -- results ---------------------------------------------------------------

    def _result(self, raw: dict) -> None:
        code, kind = raw["code"], raw["kind"]
        criteria: list[str] = []
        for criterion in raw.get("criteria", []):
            if not items_of(criterion["rule"]) <= set(self.items):
                continue  # about an item this Questionnaire version does not ask (mappings `asked_in`)
            expression = self.rule(criterion["rule"])
            self.criteria[criterion["code"]] = expression
            criteria.append(expression)
        applies = self.rule(raw["applies_when"]) if "applies_when" in raw else None
        if applies is not None:
            self.applies[code] = applies
        if kind == "count" and raw.get("positive_at_least") is not None:
            count = at_least(criteria, int(raw["positive_at_least"]))
            self.truths[code] = count if applies is None else f"({applies} and {count})"
        elif kind == "flags":
            self.truths[code] = "(" + " or ".join(criteria) + ")"

    def everything(self) -> dict[str, str]:
        """Every translated expression: criteria by code, then conditions, applies_when and truths, prefixed."""
        out = dict(self.criteria)
        out.update({f"condition:{k}": v for k, v in self.conditions.items()})
        out.update({f"applies:{k}": v for k, v in self.applies.items()})
        out.update({f"truth:{k}": v for k, v in self.truths.items()})
        return out


def at_least(criteria: list[str], k: int) -> str:
    """Three-valued k-of-n: true at k known-true, false when true-or-unknown cannot reach k, else empty."""
    true = " + ".join(f"iif({c}, 1, 0)" for c in criteria)
    possible = " + ".join(f"iif({c}.not(), 0, 1)" for c in criteria)  # true or unknown
    return f"iif(({true}) >= {k}, true, iif(({possible}) < {k}, false, {{}}))"


def translate(rules: dict, exact_paths: bool = False) -> dict[str, str]:
    """{criterion code: FHIRPath expression} for every criterion of a rule set (the loaded YAML)."""
    return RuleTranslator(rules, exact_paths=exact_paths).criteria


def truth(result: list) -> bool | None:
    """A fhirpathpy result as our three-valued truth: [] is unknown."""
    if not result:
        return None
    if len(result) != 1 or not isinstance(result[0], bool):
        raise ValueError(f"not a single boolean: {result!r}")
    return result[0]
