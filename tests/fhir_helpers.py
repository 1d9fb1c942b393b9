"""Helpers for the tests that look at what the plugin wrote on a real FHIR server."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "questionnaires" / "examples"
CLI = [sys.executable, "-m", "plugin.cli"]


def total(fhir: httpx.Client, resource_type: str, **params: str) -> int:
    found = fhir.get(f"/{resource_type}", params={**params, "_summary": "count"})
    assert found.status_code == 200, found.text
    return found.json()["total"]


def for_patient(name: str, patient: str) -> bytes:
    """An example response, made new: its own id, about `patient`."""
    qr = orjson.loads((EXAMPLES / name).read_bytes())
    qr["id"] = f"{name.removesuffix('.json')}-{uuid.uuid4()}"
    qr["subject"] = {"reference": patient}
    return orjson.dumps(qr)


def results(fhir: httpx.Client, patient: str) -> dict[str, dict]:
    """The patient's Observations, by result code (the last one written per code)."""
    found = fhir.get("/Observation", params={"subject": patient, "_count": "100"}).json().get("entry", [])
    return {e["resource"]["code"]["coding"][0]["code"]: e["resource"] for e in found}


def tasks(fhir: httpx.Client, patient: str) -> list[dict]:
    return [e["resource"] for e in fhir.get("/Task", params={"patient": patient}).json().get("entry", [])]
