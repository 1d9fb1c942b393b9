"""What the rules (mappings/, as data) say about each criterion, for the pages and the narratives: which
questions it reads, whether it rests on a clinician's test result only, and a red flag's urgency.

The stored Observations say met / not met / unknown; the pages also say
"not tested" (a clinician item left empty, which the rules count as not
met, SCREENING.md §2) and which questions would decide an indeterminate
result. Both need to know which items a criterion reads, so they are read
here from the rule files rather than kept as a second list.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from plugin.screening import data


@dataclass(frozen=True, slots=True)
class RuleFacts:
    items: dict[str, frozenset[str]]  # criterion code -> the linkIds its rule reads (through other results too)
    not_tested: dict[str, str]  # clinician linkId -> the answer an empty item stands for ("not-tested")
    flag_urgency: dict[str, str]  # red-flag linkId -> "emergency" / "urgent"
    concerns: dict[str, str]  # red-flag criterion code -> what it may mean ("Cauda equina syndrome")


@cache
def rule_facts() -> RuleFacts:
    items: dict[str, frozenset[str]] = {}
    not_tested: dict[str, str] = {}
    urgency: dict[str, str] = {}
    concerns: dict[str, str] = {}
    for rules in data.rule_files():
        results = {r["code"]: r for r in rules.get("results", [])}
        not_tested.update(rules.get("unanswered_means") or {})
        for result in results.values():
            for criterion in result.get("criteria", []):
                items[criterion["code"]] = frozenset(_reads(criterion.get("rule"), results, set()))
                if criterion.get("concern"):
                    concerns[criterion["code"]] = criterion["concern"]
                item = (criterion.get("rule") or {}).get("item")
                if result.get("kind") == "flags" and criterion.get("urgency") and (criterion["rule"].get("is") is True):
                    urgency[item] = criterion["urgency"]
    return RuleFacts(items, not_tested, urgency, concerns)


def _reads(rule: Any, results: dict[str, dict], seen: set[str]) -> Iterator[str]:
    """Every item a rule reads; `{result: x}` reads what x's criteria read."""
    if isinstance(rule, list):
        for part in rule:
            yield from _reads(part, results, seen)
    elif isinstance(rule, dict):
        if isinstance(rule.get("item"), str):
            yield rule["item"]
        target = rule.get("result")
        if isinstance(target, str) and target in results and target not in seen:
            seen.add(target)
            for criterion in results[target].get("criteria", []):
                yield from _reads(criterion.get("rule"), results, seen)
        for key, value in rule.items():
            if key not in ("item", "result"):
                yield from _reads(value, results, seen)


def is_clinician_only(code: str) -> bool:
    """A criterion that reads only clinician items (test results): empty means "not tested", not "unknown"."""
    reads = rule_facts().items.get(code)
    return bool(reads) and reads <= rule_facts().not_tested.keys()


@cache
def clinician_reads(code: str) -> tuple[tuple[str, str], ...]:
    """A clinician-only criterion's items, each with the answer an empty one stands for; () for any other."""
    facts = rule_facts()
    return tuple((i, facts.not_tested[i]) for i in sorted(facts.items[code])) if is_clinician_only(code) else ()


def left_untested(reads: tuple[tuple[str, str], ...], answers: Mapping[str, Any]) -> bool:
    """Whether every item of `clinician_reads` is empty or answered "not tested"."""
    return all(answers.get(link_id) in (None, empty) for link_id, empty in reads)


def untested(code: str, answers: Mapping[str, Any]) -> bool:
    """Whether a clinician-only criterion's tests were not done: every item it reads empty or "not tested"."""
    reads = clinician_reads(code)
    return bool(reads) and left_untested(reads, answers)


def answers_of(qr: dict) -> dict[str, Any]:
    """linkId -> the first answer's value (a choice's code). JSON nulls (which the check reads as absent) and
    anything not shaped like an item are passed over: this also reads stored responses."""
    found: dict[str, Any] = {}
    stack = [item for item in qr.get("item") or () if isinstance(item, dict)]
    while stack:
        item = stack.pop()
        stack.extend(child for child in item.get("item") or () if isinstance(child, dict))
        for answer in (item.get("answer") or [])[:1]:
            for key, value in answer.items() if isinstance(answer, dict) else ():
                if key.startswith("value"):
                    found[item.get("linkId")] = value.get("code") if isinstance(value, dict) else value
    return found
