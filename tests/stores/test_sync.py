"""`backpain-screen sync`: responses that reached the FHIR server without the plugin hearing of them."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fhir_helpers import CLI, ROOT, for_patient, results, tasks, total

pytestmark = pytest.mark.any_server  # also on a server FHIR_BASE_URL names (README: Tests)

NAMES = ("qr-refer-asas.json", "qr-emergency.json", "qr-no-referral.json")


def run_sync(base_url: str, state: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "sync", "--fhir-base-url", base_url, "--state", str(state), *extra],
                          capture_output=True, cwd=ROOT, timeout=300, check=False)


def put_responses(fhir: httpx.Client, patient: str) -> list[str]:
    """As a portal writes them: straight to the server, no notification to the plugin."""
    ids = []
    for name in NAMES:
        qr = orjson.loads(for_patient(name, patient))
        stored = fhir.put(f"/QuestionnaireResponse/{qr['id']}", content=orjson.dumps(qr))
        assert stored.status_code in (200, 201), stored.text
        ids.append(qr["id"])
    return ids


def test_sync_writes_what_is_missing_and_then_nothing(fhir: httpx.Client, fhir_base_url: str,
                                                      patient: str, tmp_path: Path):
    put_responses(fhir, patient)
    state = tmp_path / "state.json"
    first = run_sync(fhir_base_url, state)
    assert first.returncode == 0, first.stderr
    assert orjson.loads(first.stdout).get("written", 0) >= len(NAMES)
    found = fhir.get("/Observation", params={"subject": patient, "code": "screening-outcome"}).json()["entry"]
    outcomes = {e["resource"]["valueCodeableConcept"]["coding"][0]["code"] for e in found}
    assert outcomes == {"refer-rheumatology", "emergency-assessment", "no-referral-indicated"}
    assert len(tasks(fhir, patient)) == 2
    watermark = orjson.loads(state.read_bytes())[fhir_base_url]["watermark"]

    again = run_sync(fhir_base_url, state)  # from the saved watermark: nothing new
    assert again.returncode == 0, again.stderr
    assert "written" not in orjson.loads(again.stdout)
    everything = run_sync(fhir_base_url, state, "--since", "2000-01-01T00:00:00Z")  # all of it: all up to date
    assert "written" not in orjson.loads(everything.stdout) and orjson.loads(everything.stdout)["up-to-date"] >= 3
    assert total(fhir, "Observation", subject=patient) == 3 * 7 and len(tasks(fhir, patient)) == 2
    assert orjson.loads(state.read_bytes())[fhir_base_url]["watermark"] >= watermark


def test_two_syncs_at_once_write_each_result_once(fhir: httpx.Client, fhir_base_url: str,
                                                  patient: str, tmp_path: Path):
    put_responses(fhir, patient)
    state = tmp_path / "state.json"
    runs = [subprocess.Popen([*CLI, "sync", "--fhir-base-url", fhir_base_url, "--state", str(state)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for run in runs:
        run.wait(timeout=300)
        assert run.returncode == 0
    assert total(fhir, "Observation", subject=patient) == 3 * 7
    assert len(tasks(fhir, patient)) == 2


@pytest.mark.parametrize("status", ["in-progress", "stopped"])
def test_unfinished_responses_get_only_their_red_flags_recorded(fhir: httpx.Client, fhir_base_url: str,
                                                                patient: str, tmp_path: Path, status: str):
    """Not scored as a whole, but the saddle numbness it reports reaches a clinician (SCREENING.md §7)."""
    qr = orjson.loads(for_patient("qr-emergency.json", patient)) | {"status": status, "id": f"s-{uuid.uuid4()}"}
    assert fhir.put(f"/QuestionnaireResponse/{qr['id']}", content=orjson.dumps(qr)).status_code in (200, 201)
    assert run_sync(fhir_base_url, tmp_path / "state.json").returncode == 0
    found = results(fhir, patient)
    assert list(found) == ["red-flags"] and found["red-flags"]["status"] == "preliminary"
    assert [t["priority"] for t in tasks(fhir, patient)] == ["stat"]
