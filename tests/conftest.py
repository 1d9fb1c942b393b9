"""Shared fixtures. `fhir_base_url` is a real FHIR R4 server for the integration tests.

It is HAPI FHIR's JPA server (tests/hapi_server/, with its validator on), built with Maven on first use,
started once per session on 127.0.0.1 on a free port and stopped when the session ends. With FHIR_BASE_URL
set, the tests that can run on any server run against that one instead (see `any_server` in tests/README.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import orjson
import pytest

from tests.fault_report import fault_report, pytest_terminal_summary  # noqa: F401 (a fixture and a hook)
from tests.fhir_helpers import free_port
from tests.hapi_helpers import hapi_server


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "any_server: runs on any FHIR R4 server, the one FHIR_BASE_URL names")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With FHIR_BASE_URL set, only the `any_server` suite runs (on that server): the others need the local
    HAPI's own settings (validation, Subscriptions delivered here, SMART, a server to kill)."""
    if not os.environ.get("FHIR_BASE_URL"):
        return
    kept = [item for item in items if item.get_closest_marker("any_server")]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


@pytest.fixture(scope="session")
def fhir_base_url() -> Iterator[str]:
    if os.environ.get("FHIR_BASE_URL"):
        yield os.environ["FHIR_BASE_URL"].rstrip("/")
        return
    with hapi_server() as server:
        yield server.base_url


@dataclass(frozen=True)
class SmartHapi:
    base_url: str
    issuer_port: int  # the test OAuth server must listen here (tests/smart_helpers.py: authorization_server)


@pytest.fixture(scope="session")
def smart_hapi() -> Iterator[SmartHapi]:
    """A second HAPI, behind SMART Backend Services: only tokens of the OAuth server on `issuer_port` (which
    each SMART test module starts with its own clients; HAPI reads its keys when it first needs them)."""
    issuer_port = free_port()
    with hapi_server(AUTH_ISSUER=f"http://127.0.0.1:{issuer_port}") as server:
        yield SmartHapi(server.base_url, issuer_port)


def fhir_client(base_url: str) -> httpx.Client:
    """A plain HTTP client on a test server, for setting up and looking at what the plugin did."""
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    return httpx.Client(base_url=base_url, headers=headers, timeout=30)


@pytest.fixture
def fhir(fhir_base_url: str) -> Iterator[httpx.Client]:
    with fhir_client(fhir_base_url) as client:
        yield client


@pytest.fixture
def patient(fhir: httpx.Client) -> str:
    """A new Patient on the server (each test its own, so a shared server needs no cleaning); its reference."""
    created = fhir.post("/Patient", content=orjson.dumps({"resourceType": "Patient", "active": True}))
    assert created.status_code == 201, created.text
    return f"Patient/{created.json()['id']}"
