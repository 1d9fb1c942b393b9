"""Loading mappings/: a clinician's edit that breaks a rule must fail at start-up, saying where."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable

import pytest
import yaml

from plugin.screening import data
from plugin.screening.identity import NAMESPACE, uuid5
from plugin.screening.mappings import load_rule_set
from plugin.screening.pipeline import Screener
from plugin.screening.rules import MappingError

SCREENING = Screener()
URL = "https://backpain-screen.org/fhir/Questionnaire/back-pain-screening"
RAW = yaml.safe_load((data.mappings_dir() / "back-pain-screening.yaml").read_text())


def load(edit: Callable[[dict], object]) -> None:
    raw = copy.deepcopy(RAW)
    edit(raw)
    load_rule_set(raw, SCREENING.questionnaires[URL])


def result(raw: dict, code: str) -> dict:
    return next(r for r in raw["results"] if r["code"] == code)


def test_the_shipped_rules_load():
    load(lambda raw: None)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda raw: result(raw, "asas-ibp")["criteria"][0].update(rule={"item": "onset-ag", "lt": 40}),
         "no answerable item with linkId 'onset-ag'"),
        (lambda raw: result(raw, "berlin-ibp")["criteria"][3].update(rule={"item": "buttock-pain", "is": "left"}),
         "'left' is not a possible answer"),
        (lambda raw: result(raw, "asas-ibp")["criteria"][0].update(rule={"item": "onset-age", "lt": "40"}),
         "'40' is not a possible answer"),
        (lambda raw: result(raw, "asas-ibp").update(citation=""), "needs a citation"),
        (lambda raw: result(raw, "spa-features")["criteria"][0].update(rule={"result": "red-flags"}),
         "no result 'red-flags' defined before"),
        (lambda raw: result(raw, "asas-ibp").update(applies_when={"condition": "acute"}), "no condition named 'acute'"),
        (lambda raw: result(raw, "asas-ibp")["criteria"][0].update(rule={"item": "onset-age", "below": 40}),
         "item rule needs one of"),
        (lambda raw: result(raw, "asas-ibp")["criteria"][0].update(rule={"maybe": []}), "unknown rule"),
        (lambda raw: result(raw, "screening-outcome")["rules"][0].update(then="call-ambulance"),
         "'call-ambulance' not in `values`"),
        (lambda raw: raw["tasks"][0].update(priority="whenever"), "priority must be one of"),
        (lambda raw: raw["tasks"][0].update(when={"result": "referral-nice-ng65", "is": "test-hla-b27"}),
         "is a strategy: refer to it as `strategy`"),
        (lambda raw: raw["strategies"].update(default="nice-2099"), "strategies.default"),
        (lambda raw: result(raw, "red-flags")["criteria"][0].pop("urgency"), "flags need an urgency"),
        (lambda raw: raw["tasks"][0].update(when={"result": "screening-outcome"}), "say `is: <value>`"),
    ],
)
def test_broken_rules_are_refused_with_a_message_naming_the_problem(edit, words):
    with pytest.raises(MappingError) as caught:
        load(edit)
    assert words in str(caught.value)


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown strategy"):
        SCREENING.rule_sets[URL].strategy_result("nice-2099")


@pytest.mark.parametrize("name", ["", "qr|id:abc|asas-ibp", "é ü ß", "x" * 500])
def test_fast_uuid5_is_rfc_4122_uuid5(name):
    assert uuid5(name) == str(uuid.uuid5(uuid.UUID(bytes=NAMESPACE), name))
