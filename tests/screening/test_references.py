"""The one rule for patient references (issue #14, item 2) and resource ids (item 3), in the core."""

from __future__ import annotations

import pytest

from plugin.screening.outcome import InvalidInput
from plugin.screening.pipeline import Screener, Settings
from plugin.screening.references import patient_id, valid_id
from tests.factory import response

BASE = "https://ehr.example.org/fhir/r4"
# Look-alikes that earlier were normalised to Patient/V (or let through): each must be refused.
LOOK_ALIKES = [
    "x/Patient/V", "Patient/V/_history/1", "Patient/V?foo", "Patient/V#x", "Patient/V/", "/Patient/V",
    "https://other.example.org/fhir/Patient/V", "https://ehr.example.org/fhir/Patient/V",
    f"{BASE}x/Patient/V", f"{BASE}/x/Patient/V", f"{BASE}/Patient/V/_history/1", "http://ehr.example.org/fhir/r4/Patient/V",
    "Patient/.", "Patient/..", "Patient/", "Patient", "patient/V", "Practitioner/V", "urn:uuid:" + "0" * 36,
    "Patient/V W", "Patient/" + "A" * 65, "Patient/V\n", " Patient/V", "Patient//V", "Patient/V%2F..", "",
]


@pytest.mark.parametrize("reference", LOOK_ALIKES)
def test_look_alike_patient_references_name_no_patient(reference):
    assert patient_id(reference, BASE) is None


@pytest.mark.parametrize(("reference", "expected"), [
    ("Patient/V", "V"), ("Patient/a-1.b", "a-1.b"), (f"{BASE}/Patient/V", "V"),
])
def test_accepted_patient_references(reference, expected):
    assert patient_id(reference, BASE) == expected
    assert patient_id(reference, BASE + "/") == expected


def test_an_absolute_url_needs_a_configured_base():
    assert patient_id(f"{BASE}/Patient/V", None) is None


@pytest.mark.parametrize("value", [".", "..", "", "a" * 65, "a/b", "a b", "a_b", "ä", 5, None, "a\n"])
def test_invalid_ids(value):
    assert not valid_id(value)


@pytest.mark.parametrize("value", ["a", "A-1", "a.b", "...", "a" * 64, "1"])
def test_valid_ids(value):
    assert valid_id(value)


@pytest.mark.parametrize("reference", LOOK_ALIKES)
def test_a_response_about_a_look_alike_is_refused_on_its_subject(reference):
    qr = response({})
    qr["subject"] = {"reference": reference}
    with pytest.raises(InvalidInput) as refused:
        Screener(Settings(fhir_base=BASE)).process(qr)
    assert refused.value.status == 400
    assert [i.expression for i in refused.value.issues] == ["QuestionnaireResponse.subject.reference"]


@pytest.mark.parametrize("qr_id", [".", "..", "a/b", "a" * 65, ""])
def test_a_response_id_outside_the_fhir_id_rule_is_refused(qr_id):
    qr = response({}) | {"id": qr_id}
    with pytest.raises(InvalidInput) as refused:
        Screener().process(qr)
    assert [i.expression for i in refused.value.issues] == ["QuestionnaireResponse.id"]


def test_a_subject_on_the_configured_base_is_filed_under_the_relative_reference():
    qr = response({}) | {"subject": {"reference": f"{BASE}/Patient/V"}}
    outcome = Screener(Settings(fhir_base=BASE)).process(qr)
    subjects = {e["resource"].get("subject", {}).get("reference") for e in outcome.bundle["entry"]
                if e["resource"]["resourceType"] == "Observation"}
    assert subjects == {"Patient/V"}
