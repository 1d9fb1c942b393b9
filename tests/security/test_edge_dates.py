"""Dates at the edges of the calendar (issue #14 item 5): a clear 400 or handled, never a 500.

`0001-01-01T00:00:00+14:00` is in year 0 in UTC and `9999-12-31T23:59:59-12:00`
in year 10000: off the timeline Python (and a FHIR server's index) can hold.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from starlette.testclient import TestClient

from plugin.app import create_app
from plugin.ehr.cds_hooks import _feedback_items, latest
from plugin.screening.outcome import InvalidInput
from plugin.screening.timeline import date_range, on_timeline
from plugin.settings import ServiceSettings
from tests.ehr.test_populate import HLA_B27, lab
from tests.ehr.test_populate import run as run_populate
from tests.factory import response

JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
OFF_TIMELINE = ["0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00.000+01:00", "9999-12-31T23:59:59-12:00",
                "9999-12-31T23:59:59.999-00:01", "9999-12-31T12:00:00-14:00"]
ON_TIMELINE = ["0001-01-01", "0001", "0001-01", "0001-01-01T00:00:00Z", "0001-01-01T00:00:00-12:00",
               "9999", "9999-12", "9999-12-31", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59.999+14:00",
               "2024-02-29T12:00:00+05:30"]
EDGES = OFF_TIMELINE + ON_TIMELINE


@pytest.mark.parametrize("text", OFF_TIMELINE)
def test_off_the_timeline(text):
    assert date_range(text) is None and not on_timeline(text)


@pytest.mark.parametrize("text", ON_TIMELINE)
def test_on_the_timeline(text):
    low, high = date_range(text)
    assert "0001-01-01T00:00:00.000Z" <= low <= high <= "9999-12-31T23:59:59.999Z"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(ServiceSettings(store_path=tmp_path / "store.sqlite3"))) as test_client:
        yield test_client


@pytest.mark.parametrize("authored", EDGES)
@pytest.mark.parametrize("path", ["/QuestionnaireResponse", "/QuestionnaireResponse/$extract"])
def test_authored_at_the_edges(client, path, authored):
    qr = response({"rf-saddle-numbness": True}) | {"authored": authored}
    answer = client.post(path, content=orjson.dumps(qr), headers=JSON)
    if authored in OFF_TIMELINE:
        assert answer.status_code == 400, answer.text
        assert [e for i in answer.json()["issue"] for e in i["expression"]] == ["QuestionnaireResponse.authored"]
    else:
        assert answer.status_code in (200, 201), answer.text


@pytest.mark.parametrize("when", EDGES)
def test_feedback_outcome_timestamp_at_the_edges(when):
    item = {"card": "0f8fad5b-d9cb-469f-a165-70867728950e", "outcome": "overridden", "outcomeTimestamp": when}
    if when in OFF_TIMELINE or "T" not in when:
        with pytest.raises(InvalidInput) as refused:
            _feedback_items({"feedback": [item]})
        assert [i.expression for i in refused.value.issues] == ["feedback[0].outcomeTimestamp"]
    else:
        assert _feedback_items({"feedback": [item]})


def test_prefetched_outcomes_dated_at_the_edges_are_ordered_without_error():
    outcomes = [{"resourceType": "Observation", "status": "final", "effectiveDateTime": when} for when in EDGES]
    assert latest(outcomes)["effectiveDateTime"] in ("9999-12-31T23:59:59Z", "9999-12-31T23:59:59.999+14:00",
                                                     "9999", "9999-12", "9999-12-31")


@pytest.mark.parametrize("when", EDGES)
def test_populate_with_lab_results_and_birth_dates_at_the_edges(when):
    answers, issues = run_populate([lab(HLA_B27, when, flag="POS")], birth=when[:10])
    assert isinstance(answers, dict) and isinstance(issues, list)
