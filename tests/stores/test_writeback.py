"""`backpain-screen publish` and `submit` against a real FHIR server, run as a user runs them."""

from __future__ import annotations

import subprocess
import uuid

import httpx
import orjson
import pytest

from tests.fhir_helpers import CLI, ROOT, for_patient, free_port, results, tasks, total

pytestmark = pytest.mark.any_server  # also on a server FHIR_BASE_URL names (README: Tests)

# every example that writes results, with the outcome it must write (questionnaires/examples/README.md)
OUTCOMES = {
    "qr-refer-asas.json": "refer-rheumatology",
    "qr-no-referral.json": "no-referral-indicated",
    "qr-not-applicable.json": "not-applicable",
    "qr-emergency.json": "emergency-assessment",
    "qr-urgent.json": "urgent-assessment",
    "qr-indeterminate.json": "indeterminate",
    "qr-nice-test-hla-b27.json": "refer-rheumatology",
    "qr-lhc-forms.json": "refer-rheumatology",
}
TASKS = {"refer-rheumatology": 1, "emergency-assessment": 1, "urgent-assessment": 1}


def cli(*args: str, stdin: bytes | None = None, base_url: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args, "--fhir-base-url", base_url], input=stdin, capture_output=True, cwd=ROOT,
                          timeout=120, check=False)


def test_publish_twice_leaves_one_of_each(fhir: httpx.Client, fhir_base_url: str):
    for _ in range(2):
        done = cli("publish", base_url=fhir_base_url)
        assert done.returncode == 0, done.stderr
    for url, versions in (("https://backpain-screen.org/fhir/Questionnaire/back-pain-screening", 2),  # 1.0.0, 1.1.0
                          ("https://backpain-screen.org/fhir/Questionnaire/basdai", 1)):
        assert total(fhir, "Questionnaire", url=url) == versions
    assert total(fhir, "CodeSystem", url="https://backpain-screen.org/fhir/CodeSystem/screening-results") == 1
    assert total(fhir, "Device", identifier="https://backpain-screen.org/fhir/sid/device|"
                 "backpain-screen-0.1.0-back-pain-screening-rules-1.1.0") == 1


def test_submit_every_outcome_then_replay_changes_nothing(fhir: httpx.Client, fhir_base_url: str, patient: str):
    bodies = {name: for_patient(name, patient) for name in OUTCOMES}
    for name, body in bodies.items():
        done = cli("submit", "-", stdin=body, base_url=fhir_base_url)
        assert done.returncode == 0, done.stderr
        report = orjson.loads(done.stdout)
        assert report["outcome"] == OUTCOMES[name]
        assert any(w["resource"].startswith("Observation/") and w["status"] == "201" for w in report["written"])
    expected_tasks = sum(TASKS.get(outcome, 0) for outcome in OUTCOMES.values())
    counts = (total(fhir, "Observation", subject=patient), total(fhir, "Task", patient=patient))
    assert counts == (7 * len(OUTCOMES), expected_tasks)
    outcomes = fhir.get("/Observation", params={"subject": patient, "code": "screening-outcome", "_count": "50"})
    written = sorted(e["resource"]["valueCodeableConcept"]["coding"][0]["code"] for e in outcomes.json()["entry"])
    assert written == sorted(OUTCOMES.values())

    for body in bodies.values():  # a replay: a Subscription delivered twice, a retried POST
        done = cli("submit", "-", stdin=body, base_url=fhir_base_url)
        assert done.returncode == 0, done.stderr
        report = orjson.loads(done.stdout)
        assert report["written"] == []
        assert sum(r.startswith("Observation/") for r in report["unchanged"]) == 7  # says where they are
        assert sum(r.startswith("QuestionnaireResponse/") for r in report["unchanged"]) == 1
    assert (total(fhir, "Observation", subject=patient), total(fhir, "Task", patient=patient)) == counts


def test_the_other_strategy_and_the_other_questionnaire(fhir: httpx.Client, fhir_base_url: str, patient: str):
    """With the 8 above, 10 responses: every outcome, both strategies, BASDAI."""
    nice = cli("submit", "-", "--strategy", "nice-ng65", stdin=for_patient("qr-nice-test-hla-b27.json", patient),
               base_url=fhir_base_url)
    assert nice.returncode == 0, nice.stderr
    assert orjson.loads(nice.stdout)["outcome"] == "test-hla-b27"
    (task,) = tasks(fhir, patient)
    assert task["code"]["coding"][0]["code"] == "hla-b27-test"
    basdai = submitted(for_patient("qr-basdai.json", patient), fhir_base_url)
    assert basdai["outcome"] == "positive"
    score = fhir.get("/Observation", params={"subject": patient, "code": "basdai"}).json()["entry"][0]["resource"]
    assert score["valueQuantity"]["value"] == 4.9


def test_submit_for_a_patient_the_server_does_not_know_writes_nothing(fhir: httpx.Client, fhir_base_url: str):
    missing = f"Patient/{uuid.uuid4()}"
    done = cli("submit", "-", stdin=for_patient("qr-refer-asas.json", missing), base_url=fhir_base_url)
    assert done.returncode == 2
    assert orjson.loads(done.stdout)["issue"][0]["code"] == "not-found"
    assert "nothing was written" in done.stderr.decode()
    assert total(fhir, "Observation", subject=missing) == 0


def test_submit_in_progress_writes_nothing(fhir: httpx.Client, fhir_base_url: str, patient: str):
    done = cli("submit", "-", stdin=for_patient("qr-in-progress.json", patient), base_url=fhir_base_url)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["written"] == []
    assert total(fhir, "QuestionnaireResponse", subject=patient) == 0


def test_server_down_is_a_clear_error_and_a_non_zero_exit(patient: str):
    done = cli("submit", "-", stdin=for_patient("qr-refer-asas.json", patient),
               base_url=f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    err = done.stderr.decode()
    assert "could not be reached" in err and "Nothing was written" in err and "Traceback" not in err


def test_bad_input_is_refused_before_the_server_is_asked(fhir_base_url: str):
    done = cli("submit", "-", stdin=b'{"resourceType": "Patient"}', base_url=fhir_base_url)
    assert done.returncode == 2
    assert orjson.loads(done.stdout)["resourceType"] == "OperationOutcome"


@pytest.fixture
def faulty_url(fhir_base_url: str):
    """The test server behind a fault-injecting proxy process (tests/fault_proxy.py)."""
    script = "500,pass,429,lose,reset,pass,lose"
    proxy = subprocess.Popen([*CLI[:1], "-m", "tests.fault_proxy", fhir_base_url, "--script", script], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        yield proxy.stdout.readline().split()[-1]
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)


def test_transient_faults_are_retried_without_duplicates(fhir: httpx.Client, faulty_url: str, patient: str):
    names = ["qr-refer-asas.json", "qr-emergency.json", "qr-no-referral.json"]
    for name in names:
        done = cli("submit", "-", stdin=for_patient(name, patient), base_url=faulty_url)
        assert done.returncode == 0, done.stderr
    served = httpx.get(f"{faulty_url}/__faults").json()
    assert served["500"] and served["429"] and served["lose"] and served["reset"], served
    assert total(fhir, "Observation", subject=patient) == 7 * len(names)
    assert total(fhir, "Task", patient=patient) == 2  # a referral and an emergency review
    assert total(fhir, "QuestionnaireResponse", subject=patient) == len(names)


def submitted(body: bytes, base_url: str) -> dict:
    done = cli("submit", "-", stdin=body, base_url=base_url)
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout)


def amend(body: bytes, status: str, **answers: bool) -> bytes:
    """The same response (same id), with a new status and some answers changed."""
    qr = orjson.loads(body)
    qr["status"] = status
    for group in qr["item"]:
        for item in group.get("item", []):
            if item["linkId"] in answers:
                item["answer"] = [{"valueBoolean": answers[item["linkId"]]}]
    return orjson.dumps(qr)


def test_an_amended_response_updates_its_results_and_cancels_what_no_longer_applies(
        fhir: httpx.Client, fhir_base_url: str, patient: str):
    body = for_patient("qr-emergency.json", patient)
    assert submitted(body, fhir_base_url)["outcome"] == "emergency-assessment"
    before = results(fhir, patient)
    (review,) = tasks(fhir, patient)

    report = submitted(amend(body, "amended", **{"rf-saddle-numbness": False}), fhir_base_url)
    assert report["outcome"] == "not-applicable"  # pain under 6 weeks: no red flags left, no axSpA pathway
    after = results(fhir, patient)
    assert {k: v["id"] for k, v in after.items()} == {k: v["id"] for k, v in before.items()}  # updated in place
    assert after["screening-outcome"]["status"] == "amended"
    assert after["screening-outcome"]["valueCodeableConcept"]["coding"][0]["code"] == "not-applicable"
    assert after["red-flags"]["valueBoolean"] is False
    assert after["asas-ibp"]["meta"]["versionId"] == before["asas-ibp"]["meta"]["versionId"]  # unchanged: not rewritten
    (cancelled,) = tasks(fhir, patient)
    assert cancelled["id"] == review["id"] and cancelled["status"] == "cancelled"

    assert submitted(amend(body, "amended", **{"rf-saddle-numbness": False}), fhir_base_url)["written"] == []


def test_entered_in_error_retracts_the_results_and_cancels_open_tasks(
        fhir: httpx.Client, fhir_base_url: str, patient: str):
    body = for_patient("qr-refer-asas.json", patient)
    submitted(body, fhir_base_url)
    submitted(amend(body, "entered-in-error"), fhir_base_url)
    assert {o["status"] for o in results(fhir, patient).values()} == {"entered-in-error"}
    assert [t["status"] for t in tasks(fhir, patient)] == ["cancelled"]


def test_a_task_the_care_team_accepted_is_left_to_them(fhir: httpx.Client, fhir_base_url: str, patient: str):
    body = for_patient("qr-emergency.json", patient)
    submitted(body, fhir_base_url)
    (review,) = tasks(fhir, patient)
    accepted = fhir.put(f"/Task/{review['id']}", content=orjson.dumps({**review, "status": "accepted"}))
    assert accepted.status_code == 200, accepted.text
    submitted(amend(body, "amended", **{"rf-saddle-numbness": False}), fhir_base_url)
    assert [t["status"] for t in tasks(fhir, patient)] == ["accepted"]


def test_an_update_made_from_a_stale_read_is_refused(fhir: httpx.Client, fhir_base_url: str, patient: str):
    """If-Match is what keeps a concurrent change from being overwritten: the server must honour it."""
    submitted(for_patient("qr-emergency.json", patient), fhir_base_url)
    outcome = results(fhir, patient)["screening-outcome"]
    fhir.put(f"/Observation/{outcome['id']}", content=orjson.dumps({**outcome, "status": "amended"}))
    stale = {"resourceType": "Bundle", "type": "transaction", "entry": [{
        "fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": outcome,
        "request": {"method": "PUT", "url": f"Observation/{outcome['id']}",
                    "ifMatch": f'W/"{outcome["meta"]["versionId"]}"'}}]}
    refused = fhir.post("/", content=orjson.dumps(stale))
    assert refused.status_code in (409, 412), refused.text


def test_a_response_without_an_id_is_found_again_by_its_identifier(
        fhir: httpx.Client, fhir_base_url: str, patient: str):
    for identifier in ({"system": "http://portal.example/ids", "value": f"portal-{uuid.uuid4()}"}, None):
        qr = orjson.loads(for_patient("qr-refer-asas.json", patient))
        del qr["id"]
        qr["authored"] = f"2026-11-20T09:{30 if identifier else 31}:00Z"  # two different responses
        if identifier:
            qr["identifier"] = identifier
        body = orjson.dumps(qr)
        assert any(w["status"] == "201" for w in submitted(body, fhir_base_url)["written"])
        assert submitted(body, fhir_base_url)["written"] == []  # found again: nothing to write
    assert total(fhir, "QuestionnaireResponse", subject=patient) == 2
    assert total(fhir, "Observation", subject=patient) == 14
