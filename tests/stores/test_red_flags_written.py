"""Property: a response with one red flag `true` always has its review Task written (SCREENING.md §7).

Hypothesis generates responses of any status, with any mix of valid and
invalid answers (wrong types, out-of-range numbers, unknown codes, unknown
items, duplicated items), plus one red flag answered `true`; each is
submitted to the embedded store exactly as `POST /QuestionnaireResponse`
does, and the store must then hold the red-flags Observation and a review
Task of the flag's urgency, whether the response was accepted or refused.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugin.screening.outcome import InvalidInput
from plugin.screening.pipeline import Screener
from plugin.stores.sqlite import SqliteStore
from plugin.stores.writeback import submit
from tests.factory import V1_0, V1_1, item_types, response

SCREENER = Screener()
STATUSES = ("in-progress", "completed", "amended", "stopped", "entered-in-error")
EMERGENCY = ("rf-saddle-numbness", "rf-bladder-bowel", "rf-leg-weakness", "rf-sciatica-both-legs",
             "rf-sexual-dysfunction")
URGENT = ("rf-fever", "rf-weight-loss", "rf-cancer-history", "rf-night-pain-unrelieved", "rf-trauma",
          "rf-immunosuppression", "rf-eye-now", "rf-thoracic-pain", "rf-constant-progressive", "rf-fracture-risk",
          "rf-recent-infection")
NEW_IN_1_1 = {"rf-sciatica-both-legs", "rf-sexual-dysfunction", "rf-eye-now", "rf-thoracic-pain",
              "rf-constant-progressive", "rf-fracture-risk", "rf-recent-infection"}
# Answers that are wrong for any item: the checker refuses each, the red-flag reader ignores each.
BAD_ANSWERS = ({"valueInteger": 200}, {"valueString": "yes"}, {"valueCoding": {"code": "no-such-code"}},
               {"valueBoolean": "true"}, {})


@st.composite
def responses(draw: st.DrawFn) -> tuple[dict, str]:
    version = draw(st.sampled_from((V1_0, V1_1)))
    flag = draw(st.sampled_from([f for f in EMERGENCY + URGENT if version == V1_1 or f not in NEW_IN_1_1]))
    types = item_types(version=version)
    answers: dict[str, Any] = {}
    for link_id, kind in types.items():
        if kind == "boolean":
            answers[link_id] = draw(st.none() | st.booleans())
    answers[flag] = True
    qr = response(answers, status=draw(st.sampled_from(STATUSES)), version=version, id=f"p-{uuid.uuid4()}",
                  subject={"reference": "Patient/p"})
    for group in qr["item"]:  # spoil some answers, and maybe add items no version has
        for item in group.get("item", []):
            if item["linkId"] != flag and draw(st.integers(0, 4)) == 0:
                item["answer"] = [draw(st.sampled_from(BAD_ANSWERS))]
        if draw(st.booleans()):
            group.setdefault("item", []).append({"linkId": "not-an-item", "answer": [{"valueBoolean": True}]})
    if draw(st.booleans()):  # the flag given twice, the copy answered "no": a "yes" is never outweighed
        group = next(g for g in qr["item"] if any(i["linkId"] == flag for i in g.get("item", [])))
        group["item"].append({"linkId": flag, "answer": [{"valueBoolean": False}]})
    return qr, ("stat" if flag in EMERGENCY else "urgent")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=responses())
def test_a_true_red_flag_always_writes_its_review_task(case: tuple[dict, str], tmp_path: Path):
    qr, priority = case
    if qr["status"] == "entered-in-error":  # a retraction writes no Task (SCREENING.md §4): a yes is re-sent
        qr["status"] = "completed"

    async def go() -> list[dict]:
        async with SqliteStore(tmp_path / f"{qr['id']}.sqlite3") as store:
            try:
                await submit(store, SCREENER, qr)
            except InvalidInput as error:
                assert error.issues[-1].severity == "information", "a refusal says the red flag was recorded"
            return [t async for t in store.search("Task", {"patient": "Patient/p"})]

    tasks = asyncio.run(go())
    reviews = [t for t in tasks if t["code"]["coding"][0]["code"] == "clinical-review"]
    assert [t["priority"] for t in reviews] in (["stat"], ["urgent"])
    if priority == "stat":
        assert reviews[0]["priority"] == "stat"


def test_a_store_that_refuses_the_response_still_gets_its_red_flags(tmp_path: Path):
    """SCREENING.md §7: the store refuses the response itself (here: an id no store takes); the Observation and
    the Task are written without it, referring to it by identifier, and the refusal says the flags were recorded."""
    qr = response({"rf-saddle-numbness": True}, id="not a valid id", subject={"reference": "Patient/p"})

    async def go() -> tuple[InvalidInput, list[dict], list[dict], list[dict]]:
        async with SqliteStore(tmp_path / "store.sqlite3") as store:
            try:
                await submit(store, SCREENER, qr)
            except InvalidInput as error:
                refusal = error
            found = [[r async for r in store.search(kind, {})] for kind in ("Task", "Observation", "Provenance")]
            return refusal, *found

    refusal, tasks, observations, provenances = asyncio.run(go())
    assert refusal.issues[0].expression == "QuestionnaireResponse.id"
    assert "were recorded" in refusal.issues[-1].diagnostics
    ((task,), (obs,), (provenance,)) = tasks, observations, provenances
    assert task["priority"] == "stat" and "Saddle numbness or tingling" in task["description"]
    by_identifier = obs["derivedFrom"][0]
    assert by_identifier["type"] == "QuestionnaireResponse" and by_identifier["identifier"]["value"]
    assert by_identifier["display"].startswith("response refused:")
    assert task["focus"] == by_identifier and provenance["entity"][0]["what"] == by_identifier
