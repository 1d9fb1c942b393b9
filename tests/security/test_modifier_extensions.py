"""A modifier extension the plugin does not understand, anywhere in a response, is refused (issue #14 item 7)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import orjson
import pytest
from starlette.testclient import TestClient

from plugin.app import create_app
from plugin.screening.outcome import InvalidInput
from plugin.screening.pipeline import Screener
from plugin.settings import ServiceSettings
from tests.factory import response

MODIFIER = [{"url": "https://example.org/fhir/StructureDefinition/answer-negated", "valueBoolean": True}]


def base() -> dict:
    return response({"rf-saddle-numbness": True, "pain-duration": "gt-5y", "onset-age": 30})


def _first_item(qr: dict) -> dict:
    return qr["item"][0]


def _first_answer(qr: dict) -> dict:
    group = next(i for i in qr["item"] if i.get("item"))
    return group["item"][0]["answer"][0]


def _contained(qr: dict) -> dict:
    qr["contained"] = [{"resourceType": "Basic", "id": "b1", "code": {"text": "x"}}]
    return qr["contained"][0]


PLACES: dict[str, tuple[Callable[[dict], dict], str]] = {
    "the response": (lambda qr: qr, "QuestionnaireResponse.modifierExtension"),
    "a group": (_first_item, "QuestionnaireResponse.item[0].modifierExtension"),
    "an answered item": (lambda qr: next(i for i in qr["item"] if i.get("item"))["item"][0], None),
    "an answer": (_first_answer, None),
    "a contained resource": (_contained, "QuestionnaireResponse.contained[0].modifierExtension"),
}


@pytest.mark.parametrize("place", sorted(PLACES))
@pytest.mark.parametrize("status", ["completed", "amended", "in-progress"])
def test_an_unknown_modifier_extension_is_refused_wherever_it_is(place, status):
    qr = base() | {"status": status}
    where, expression = PLACES[place]
    where(qr)["modifierExtension"] = copy.deepcopy(MODIFIER)
    with pytest.raises(InvalidInput) as refused:
        Screener().process(qr)
    modifier_issues = [i for i in refused.value.issues if i.expression.endswith(".modifierExtension")]
    assert len(modifier_issues) == 1, refused.value.issues
    assert modifier_issues[0].code == "not-supported"
    if expression:
        assert modifier_issues[0].expression == expression


@pytest.mark.parametrize("value", [[], None])
def test_an_empty_modifier_extension_changes_nothing(value):
    qr = base()
    if value is not None:
        qr["modifierExtension"] = value
    assert Screener().process(qr).bundle["entry"]


def test_ordinary_extensions_are_accepted():
    qr = base() | {"extension": [{"url": "https://example.org/fhir/StructureDefinition/portal", "valueString": "x"}]}
    assert Screener().process(qr).bundle["entry"]


def _ingest(tmp_path, qr: dict) -> tuple[dict, dict[str, list[dict]]]:
    """POSTs `qr` to a service on an embedded store; the OperationOutcome and what the store then holds."""
    with TestClient(create_app(ServiceSettings(store_path=tmp_path / "store.sqlite3"))) as client:
        answer = client.post("/QuestionnaireResponse", content=orjson.dumps(qr),
                             headers={"Content-Type": "application/fhir+json"})
        assert answer.status_code == 400
        store = client.app.state.service.store
        held = {kind: [e["resource"] for e in client.portal.call(store.search_page, kind, {}).get("entry", [])]
                for kind in ("Observation", "Task")}
        return answer.json(), held


def test_ingest_answers_400_and_writes_nothing_without_a_red_flag(tmp_path):
    qr = response({"rf-saddle-numbness": False, "pain-duration": "gt-5y", "onset-age": 30})
    _first_answer(qr)["modifierExtension"] = copy.deepcopy(MODIFIER)
    outcome, held = _ingest(tmp_path, qr)
    assert any(e.endswith("modifierExtension") for i in outcome["issue"] for e in i["expression"])
    assert held == {"Observation": [], "Task": []}


def test_a_red_flag_beside_an_unknown_modifier_still_reaches_a_clinician(tmp_path):
    """The modifier sits on another answer: the response is refused, the saddle numbness is not lost (H1)."""
    qr = base()
    _first_answer(qr)["modifierExtension"] = copy.deepcopy(MODIFIER)
    outcome, held = _ingest(tmp_path, qr)
    assert any(e.endswith("modifierExtension") for i in outcome["issue"] for e in i["expression"])
    assert any("red flags" in i["diagnostics"] for i in outcome["issue"] if i["severity"] == "information")
    assert [o["code"]["coding"][0]["code"] for o in held["Observation"]] == ["red-flags"]
    assert [t["priority"] for t in held["Task"]] == ["stat"]
