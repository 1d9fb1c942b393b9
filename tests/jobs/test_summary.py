"""The batch summary: invalid responses apart from scored ones, BASDAI apart from the screening (worked by hand)."""

from __future__ import annotations

from collections import Counter

from plugin.jobs.summary import as_json, headline, label_of, table

SCREENING = "https://backpain-screen.org/fhir/Questionnaire/back-pain-screening|1.0.0"
BASDAI = "https://backpain-screen.org/fhir/Questionnaire/basdai|1.0.0"


def test_labels_keep_each_questionnaire_apart():
    assert label_of(SCREENING, "refer-rheumatology") == "refer-rheumatology"
    assert label_of(BASDAI, "positive") == "basdai/positive"
    assert label_of(BASDAI, "in-progress") == "in-progress"  # not finished, whatever the questionnaire
    assert label_of(None, "invalid") == "invalid"


# 3 urgent, 1 emergency, 2 BASDAI positive, 1 BASDAI negative, 4 invalid, 2 in-progress, 1 stopped: 14 read.
COUNTS = Counter({"urgent-assessment": 3, "emergency-assessment": 1, "basdai/positive": 2, "basdai/negative": 1,
                  "invalid": 4, "in-progress": 2, "stopped": 1})


def test_json_counts_invalid_and_unfinished_apart_and_basdai_out_of_the_screening():
    assert as_json(COUNTS) == {
        "responses": 14, "scored": 7, "invalid": 4, "not_finished": {"in-progress": 2, "stopped": 1},
        "outcomes": {"back-pain-screening": {"emergency-assessment": 1, "urgent-assessment": 3},
                     "basdai": {"positive": 2, "negative": 1}}}
    assert list(as_json(COUNTS)["outcomes"]["back-pain-screening"]) == ["emergency-assessment", "urgent-assessment"]


def test_the_table_a_person_reads():
    assert headline(COUNTS) == "14 responses: 7 scored, 4 invalid, 3 not finished (in-progress or stopped)"
    assert table(COUNTS).splitlines() == [
        "  Back-pain screening outcomes: 4 scored",
        "    emergency-assessment        1",
        "    urgent-assessment           3",
        "  BASDAI outcomes: 3 scored",
        "    positive                    2",
        "    negative                    1",
    ]
    assert headline(Counter()) == "0 responses: the input was empty" and table(Counter()) == ""
