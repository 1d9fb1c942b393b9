"""A response is written back as it came, so what the check accepts must be valid FHIR R4 (HAPI's validator
refuses the whole transaction otherwise): every element the checker does not read itself is judged by the
R4 model, and a malformed one is a clear refusal, never a crash."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from plugin.screening.outcome import InvalidInput
from plugin.screening.pipeline import Screener

EXAMPLE = orjson.loads((Path(__file__).resolve().parents[2] / "questionnaires" / "examples"
                        / "qr-refer-asas.json").read_bytes())
SCREENER = Screener()


def first_answered(qr: dict) -> dict:
    return next(i for g in qr["item"] for i in g.get("item", []) if i.get("answer"))


def change(edit: Callable[[dict], None]) -> dict:
    qr = copy.deepcopy(EXAMPLE)
    edit(qr)
    return qr


def r4_valid(qr: dict) -> bool:
    try:
        get_fhir_model_class("QuestionnaireResponse").model_validate(qr)
    except (ValidationError, ValueError, TypeError, KeyError):
        return False
    return True


INVALID = {
    "a contained resource of no R4 type": lambda q: q.update(contained=[{"resourceType": "Foo"}]),
    "an answer element R4 does not define": lambda q: first_answered(q)["answer"][0].update(bar=1),
    "an answer extension without a url": lambda q: first_answered(q)["answer"][0].update(extension=[{"url": 1}]),
    "an item extension with no R4 value type": lambda q: q["item"][0].update(
        extension=[{"url": "http://example.org/x", "valueFoo": 1}]),
    "a primitive extension of an answer with a number id": lambda q: first_answered(q)["answer"][0].update(
        _valueBoolean={"id": 5}),
    "an item id that is not a string": lambda q: q["item"][0].update(id=5),
}
VALID = {
    "an answer extension": lambda q: first_answered(q)["answer"][0].update(
        extension=[{"url": "http://example.org/x", "valueString": "y"}]),
    "an item extension": lambda q: q["item"][0].update(extension=[{"url": "http://example.org/x", "valueInteger": 1}]),
    "an item id": lambda q: q["item"][0].update(id="group-1"),
}


@pytest.mark.parametrize("name", INVALID)
def test_what_r4_refuses_the_check_refuses_with_an_issue(name: str) -> None:
    qr = change(INVALID[name])
    assert not r4_valid(qr), "the table's case must be invalid R4 to prove anything"
    with pytest.raises(InvalidInput) as refused:
        SCREENER.process(qr)
    assert refused.value.status == 400 and refused.value.issues
    assert all(i.diagnostics for i in refused.value.issues)


@pytest.mark.parametrize("name", VALID)
def test_what_r4_allows_beside_the_answers_is_still_scored(name: str) -> None:
    qr = change(VALID[name])
    assert r4_valid(qr)
    assert SCREENER.process(qr).label == "refer-rheumatology"


@pytest.mark.parametrize("system", ["urn:a b", " http://example.org", "http://example.org/\tx", "", 5])
def test_an_identifier_system_that_is_no_uri_is_refused(system: object) -> None:
    qr = change(lambda q: q.update(identifier={"system": system, "value": "x"}))
    with pytest.raises(InvalidInput) as refused:
        SCREENER.process(qr)
    assert any(i.expression == "QuestionnaireResponse.identifier.system" for i in refused.value.issues)
