"""The checker's fast path is only a shortcut: on any response, it finds what the careful path alone finds.

Seeded random mutations of the examples and of plausible responses (keys dropped or added, values
of the wrong shape, items duplicated, moved, reordered) are checked twice: as the service does,
and with the compiled Questionnaire's fast-path table emptied, which sends every item the careful
way. The answers read, or the complete list of issues, must be the same.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from plugin.screening.checking import check_response
from plugin.screening.outcome import InvalidInput
from plugin.screening.pipeline import Screener
from tests.bench_pipeline import make_bodies

EXAMPLES = Path(__file__).resolve().parents[2] / "questionnaires" / "examples"
ODD = [None, True, False, 0, -1, 1.5, 200, "", "x", [], {}, [1], {"a": 1}, [{}], {"valueBoolean": True},
       [{"valueInteger": 3}], {"code": "none"}, [{"url": "http://x", "valueString": "y"}], "a b"]
KEYS = ["linkId", "text", "answer", "item", "extension", "id", "definition", "_text", "foo", "valueBoolean",
        "valueInteger", "valueCoding", "valueString", "code", "system"]


def nodes(value: Any, found: list) -> list:
    if isinstance(value, dict | list):
        found.append(value)
        for child in value.values() if isinstance(value, dict) else value:
            nodes(child, found)
    return found


def mutate(qr: dict, rng: random.Random) -> dict:
    qr = copy.deepcopy(qr)
    for _ in range(rng.choice([1, 1, 2, 3])):
        items = nodes(qr.get("item"), [])
        if not items:
            break
        node = rng.choice(items)
        if isinstance(node, dict):
            roll = rng.random()
            if node and roll < 0.3:
                del node[rng.choice(list(node))]
            elif node and roll < 0.6:
                node[rng.choice(list(node))] = copy.deepcopy(rng.choice(ODD))
            else:
                node[rng.choice(KEYS)] = copy.deepcopy(rng.choice([*ODD, rng.choice(items)]))
        elif node:
            roll = rng.random()
            if roll < 0.3:
                node.pop(rng.randrange(len(node)))
            elif roll < 0.6:
                node.append(copy.deepcopy(rng.choice(node)))
            else:
                rng.shuffle(node)
    return qr


def careful(catalog: dict) -> dict:
    """The catalog with every Questionnaire's fast-path table emptied."""
    return {url: {v: dataclasses.replace(q, quick={}) for v, q in versions.items()}
            for url, versions in catalog.items()}


def checked(qr: dict, catalog: dict) -> tuple[str, Any]:
    try:
        q, facts = check_response(copy.deepcopy(qr), catalog)
    except InvalidInput as error:
        return "refused", [(i.code, i.diagnostics, i.expression) for i in error.issues]
    return q.version, facts


@pytest.fixture(scope="module")
def screener() -> Screener:
    return Screener()


@pytest.fixture(scope="module")
def responses(screener: Screener) -> list[dict]:
    examples = [orjson.loads(p.read_bytes()) for p in sorted(EXAMPLES.glob("qr-*.json"))]
    return examples + [orjson.loads(b) for b in make_bodies(screener, 40, 5)]


@pytest.mark.parametrize("seed", range(4))
def test_fast_path_finds_what_the_careful_path_finds(screener: Screener, responses: list[dict], seed: int) -> None:
    rng = random.Random(seed)
    slow = careful(screener.catalog)
    refused = 0
    for _ in range(300):
        qr = mutate(rng.choice(responses), rng)
        fast_result = checked(qr, screener.catalog)
        assert fast_result == checked(qr, slow), orjson.dumps(qr).decode()
        refused += fast_result[0] == "refused"
    assert 50 < refused < 290  # the mutations make both kinds, so both paths are compared


def test_fast_path_reads_plain_responses_as_the_careful_path(screener: Screener, responses: list[dict]) -> None:
    slow = careful(screener.catalog)
    for qr in responses:
        assert checked(qr, screener.catalog) == checked(qr, slow)
