"""Result Bundles stay small (issue #17) without losing a part: sizes are deterministic, so they are tested.

Over every clinical test case (tests/bench_size.py scores them as the clinical tests do): the median
compact-JSON Bundle stays under the ceiling, and every Bundle still has every part a reader needs.
"""

from __future__ import annotations

import statistics
from functools import cache
from html import escape

import pytest

from plugin.screening import systems
from plugin.screening.pipeline import Outcome, Screener
from plugin.screening.scoring import Result
from tests import factory
from tests.bench_size import BASELINE, CEILING_MEDIAN, outcomes, size


@cache
def written() -> tuple[tuple[str, Outcome], ...]:
    return tuple(outcomes())


def test_there_are_cases_enough_for_a_median() -> None:
    assert len(written()) > 100


def test_the_median_bundle_is_a_fifth_smaller_than_before() -> None:
    median = statistics.median(size(o.bundle) for _, o in written())
    assert median <= CEILING_MEDIAN < BASELINE["median"] * 0.82, f"median {median:,} B"


@pytest.mark.parametrize("name", [name for name, _ in written()])
def test_every_part_is_still_written(name: str) -> None:
    outcome = dict(written())[name]
    scores = outcome.scores
    assert scores is not None
    entries = [e["resource"] for e in outcome.bundle["entry"]]
    kinds = [r["resourceType"] for r in entries]
    assert kinds.count("Device") == 1 and kinds.count("QuestionnaireResponse") == 1
    assert kinds.count("Provenance") == 1 and kinds.count("Task") == len(scores.tasks)
    observations = {r["code"]["coding"][0]["code"]: r for r in entries if r["resourceType"] == "Observation"}
    assert set(observations) == set(scores.results)
    for code, obs in observations.items():
        _check_observation(obs, scores.results[code])
    for task in (r for r in entries if r["resourceType"] == "Task"):
        assert task["code"]["coding"][0]["display"] and task["description"] and task["text"]["div"]
    provenance = next(r for r in entries if r["resourceType"] == "Provenance")
    assert len(provenance["target"]) == len(entries) - 2  # all but the Device and the Provenance itself


def _check_observation(obs: dict, result: Result) -> None:
    spec = result.spec
    assert obs["meta"]["tag"][0]["system"] == systems.RULE_SET_TAG
    assert obs["identifier"][0]["system"] == systems.SID_OBSERVATION and obs["identifier"][0]["value"]
    assert obs["category"][0]["coding"][0]["code"] == "survey"
    assert obs["code"]["coding"][0]["display"] == spec.title
    assert obs["method"]["text"]
    div = obs["text"]["div"]
    assert escape(spec.title) in div
    components = obs.get("component", [])
    assert len(components) == len(spec.criteria) + len(spec.also) + len(spec.terms)
    for component in components:
        assert component["code"]["coding"][0]["system"] and component["code"]["coding"][0]["code"]
        assert ("dataAbsentReason" in component) != any(k.startswith("value") for k in component)
    if spec.kind == "flags" or (spec.positive_at_least is not None and result.applies is not False):
        assert obs["interpretation"][0]["coding"][0]["display"], spec.code
    # Each criterion is named in the narrative (under its state: test_the_narrative_names_each_criterion_...).
    for criterion in spec.criteria:
        assert escape(criterion.text) in div, criterion.code
    if None in result.criteria:
        assert "Not answered" in div or "not answered" in div
    if spec.kind == "flags" and result.value is True:
        assert "<b>PRESENT</b>" in div


def test_the_narrative_names_each_criterion_under_its_state() -> None:
    """qr-indeterminate: ASAS-IBP 1 met, 1 not met, 3 unanswered; and the emergency's flag leads its narrative."""
    divs = {name: {r["code"]["coding"][0]["code"]: r["text"]["div"] for r in _observations(o)}
            for name, o in written() if name in ("qr-indeterminate", "qr-emergency")}
    assert ("<p>Met: Back pain began before age 40. Not met: No improvement with rest. Not answered: Insidious "
            "(gradual) onset; Improves with exercise; Pain at night, improving on getting up.</p>"
            ) in divs["qr-indeterminate"]["asas-ibp"]
    assert ("<b>Red flags for serious spinal pathology</b>: <b>PRESENT</b>: <b>Saddle numbness or tingling</b> "
            "(emergency; possible cauda equina syndrome).</p><p>Absent: New bladder or bowel dysfunction;"
            ) in divs["qr-emergency"]["red-flags"]
    assert "Source:" not in divs["qr-emergency"]["asas-ibp"]  # the citation is the method's, said once


@pytest.mark.parametrize("hla_b27, crp, hla_group, crp_group", [
    (None, "normal", "Not tested", "Not met"),  # left empty: the rules count it not met; it was not tested
    ("not-tested", "not-tested", "Not tested", "Not tested"),
    ("negative", None, "Not met", "Not tested"),
])
def test_a_test_left_empty_is_named_not_tested_never_not_met(hla_b27, crp, hla_group, crp_group) -> None:
    """H19 in what an EHR shows: the SpA-features narrative tells a negative test from one never done."""
    answers = {"pain-duration": "3m-1y", "onset-age": 30, "age": 34, "uveitis": False,
               "hla-b27": hla_b27, "crp-elevated": crp}
    outcome = Screener().process(factory.response(answers))
    (div,) = [r["text"]["div"] for r in _observations(outcome) if r["code"]["coding"][0]["code"] == "spa-features"]
    groups = dict(part.split(": ", 1) for part in div.split("</p><p>")[1].removesuffix("</p></div>").split(". ")
                  if ": " in part)
    assert "HLA-B27 positive" in groups[hla_group] and "Elevated CRP" in groups[crp_group], div
    assert "Uveitis" in groups["Not met"], div  # a patient's "no" stays not met


@pytest.mark.parametrize("hla_b27, crp, hla_state, crp_state", [
    (None, "normal", "not-performed", False),
    ("not-tested", "not-tested", "not-performed", "not-performed"),
    ("negative", None, False, "not-performed"),
    ("positive", "raised", True, True),
])
def test_a_test_not_done_is_a_not_performed_component_never_false(hla_b27, crp, hla_state, crp_state) -> None:
    """H19 for a system that reads only the components: a test not done has no value (dataAbsentReason
    not-performed), though the count still treats it as not met; a negative test is `false`."""
    answers = {"pain-duration": "3m-1y", "onset-age": 30, "age": 34, "uveitis": False,
               "hla-b27": hla_b27, "crp-elevated": crp}
    outcome = Screener().process(factory.response(answers))
    observations = {r["code"]["coding"][0]["code"]: r for r in _observations(outcome)}
    features = observations["spa-features"]
    states = {c["code"]["coding"][0]["code"]: c.get("valueBoolean", c.get("dataAbsentReason", {}).get("coding",
              [{}])[0].get("code")) for c in features["component"]}
    assert states["spa-hla-b27-positive"] == hla_state and states["spa-raised-crp"] == crp_state, states
    assert states["spa-uveitis"] is False  # a patient's "no" stays false
    assert features["valueInteger"] == (hla_state is True) + (crp_state is True)  # not done counts as not met
    asas = {c["code"]["coding"][0]["code"]: c for c in observations["referral-asas-2015"]["component"]}
    assert ("valueBoolean" in asas["asas2015-hla-b27-positive"]) == (hla_state != "not-performed")


def test_a_null_answer_is_read_as_no_answer_when_the_narrative_asks() -> None:
    """JSON null where an answer list goes: the check reads it as absent, and so must the narrative's reading of
    the answers (the fuzz test found a 500 here)."""
    qr = factory.response({"pain-duration": "3m-1y", "onset-age": 30, "hla-b27": "negative"})
    for group in qr["item"]:
        for item in group.get("item", []):
            if item["linkId"] == "hla-b27":
                item["answer"] = None
    outcome = Screener().process(qr)
    (div,) = [r["text"]["div"] for r in _observations(outcome) if r["code"]["coding"][0]["code"] == "spa-features"]
    assert "Not tested: HLA-B27 positive" in div


def _observations(outcome: Outcome) -> list[dict]:
    return [e["resource"] for e in outcome.bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
