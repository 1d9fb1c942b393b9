"""Differential test: our rule engine and a FHIRPath translation of the same rules agree.

Seeded-random partial answer sets (unanswered items included, enableWhen
respected, integers drawn near every threshold the rules use) are scored by
the engine and by fhirpathpy on the FHIRPath from tests/fhirpath_rules.py.
Every criterion and every `applies_when` must come out the same: True,
False or unknown (FHIRPath's empty collection). Criteria that refer to an
earlier result (inflammatory back pain) carry that result's count inlined.

fhirpathpy is slow (about 1 ms per item lookup), so most responses use the
exact-path form of the translation and a smaller share the `repeat(item)`
form that the benchmark times.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from plugin.screening import data
from plugin.screening.pipeline import Screener
from plugin.screening.questionnaire import ItemSpec
from tests import factory
from tests.fhirpath_rules import RuleTranslator, truth

fhirpathpy = pytest.importorskip("fhirpathpy")
from fhirpathpy.models import models  # noqa: E402  (after the skip)

SEED = 20261121
EXACT_PATH_CASES = 300
REPEAT_CASES = 40
Compiled = dict[str, Callable[..., list]]


@pytest.fixture(scope="module")
def screener() -> Screener:
    return Screener()


@pytest.fixture(scope="module")
def rules() -> dict:
    return next(r for r in data.rule_files() if r["questionnaire"] == factory.SCREENING)


def compile_all(rules: dict, exact_paths: bool) -> tuple[RuleTranslator, Compiled]:
    """Criteria and applies_when as compiled FHIRPath, each distinct expression compiled once."""
    translator = RuleTranslator(rules, exact_paths=exact_paths)
    expressions = {**translator.criteria, **{f"applies:{k}": v for k, v in translator.applies.items()}}
    return translator, {e: fhirpathpy.compile(e, models["r4"]) for e in set(expressions.values())}


def thresholds(node: Any) -> Iterator[int]:
    """Every integer a rule tree compares with."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("lt", "le", "gt", "ge", "is") and type(value) is int:
                yield value
            else:
                yield from thresholds(value)
    elif isinstance(node, list):
        for value in node:
            yield from thresholds(value)


def integer(rng: random.Random, spec: ItemSpec, near: list[int]) -> int:
    """Mostly a value at or next to a threshold, sometimes anywhere in the item's range."""
    low, high = int(spec.minimum or 0), int(spec.maximum or 120)
    if rng.random() < 0.7:
        return min(high, max(low, rng.choice(near) + rng.choice((-1, 0, 1))))
    return rng.randint(low, high)


def random_answers(rng: random.Random, items: dict[str, ItemSpec], near: list[int]) -> dict[str, Any]:
    """A partial answer set: each item left out with a per-response probability; disabled items dropped."""
    skip = rng.choice((0.0, 0.1, 0.3, 0.6, 0.9))
    answers: dict[str, Any] = {}
    for link_id, spec in items.items():
        if spec.answer_key is None or rng.random() < skip:
            continue
        if spec.type == "boolean":
            answers[link_id] = rng.random() < 0.5
        elif spec.type == "integer":
            answers[link_id] = integer(rng, spec, near)
        elif spec.type == "choice":
            answers[link_id] = rng.choice(sorted(spec.codes or {}))
    return factory.drop_disabled(answers, items)


def answer_sets(screener: Screener, rules: dict, count: int, seed: int) -> list[dict[str, Any]]:
    items = screener.questionnaires[factory.SCREENING].items
    near = sorted(set(thresholds(rules)))
    rng = random.Random(seed)
    return [{}, *(random_answers(rng, items, near) for _ in range(count - 1))]


def disagreements(screener: Screener, translator: RuleTranslator, compiled: Compiled,
                  answers: dict[str, Any]) -> list[str]:
    """Where the engine and FHIRPath differ on one response, as readable lines."""
    qr = factory.response(answers)
    scores = screener.process(qr).scores
    assert scores is not None
    values = {expression: truth(run(qr)) for expression, run in compiled.items()}  # each distinct one once
    found = []
    for code, result in scores.results.items():
        pairs = [(c.code, translator.criteria[c.code], t) for c, t in zip(result.spec.criteria, result.criteria)]
        if code in translator.applies:
            pairs.append((f"applies:{code}", translator.applies[code], result.applies))
        for name, expression, ours in pairs:
            theirs = values[expression]
            if theirs is not ours:
                found.append(f"{name}: engine {ours}, FHIRPath {theirs}; answers {answers}")
    return found


def test_thresholds_are_sampled(rules: dict) -> None:
    assert {30, 35, 40, 45, 50} <= set(thresholds(rules))


def test_every_criterion_is_translated(rules: dict, screener: Screener) -> None:
    translator = RuleTranslator(rules)
    rule_set = screener.versions[factory.SCREENING, factory.DEFAULT_VERSION].rules  # the version translated
    codes = {c.code for spec in rule_set.results for c in spec.criteria}
    assert codes == set(translator.criteria)


@pytest.mark.parametrize(
    ("exact_paths", "count", "seed"),
    [(True, EXACT_PATH_CASES, SEED), (False, REPEAT_CASES, SEED + 1)],
    ids=["exact-paths", "repeat-item"],
)
def test_engine_and_fhirpath_agree(screener: Screener, rules: dict, exact_paths: bool, count: int, seed: int) -> None:
    translator, compiled = compile_all(rules, exact_paths)
    problems: list[str] = []
    for answers in answer_sets(screener, rules, count, seed):
        problems += disagreements(screener, translator, compiled, answers)
    assert not problems, f"{len(problems)} disagreements, e.g.:\n" + "\n".join(problems[:10])
