"""Shared fixtures. `fhir_base_url` is a real FHIR R4 server for the integration tests.

It is HAPI FHIR's JPA server (tests/hapi_server/, with its validator on), built with Maven on first use,
started once per session on 127.0.0.1 on a free port and stopped when the session ends. With FHIR_BASE_URL
set, the tests that can run on any server run against that one instead (see `any_server` in tests/README.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fault_processes import FhirServer
from tests.fault_report import fault_report, pytest_terminal_summary  # noqa: F401 (a fixture and a hook)
from tests.fhir_helpers import NODE, OAUTH_DIR, free_port, npm_install
from tests.hapi_helpers import HapiServer, hapi_server

KILLABLE = "killable_hapi"
HAPI_FIXTURES = frozenset({"fhir_base_url", "smart_hapi", KILLABLE})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "any_server: runs on any FHIR R4 server, the one FHIR_BASE_URL names")


_early: dict[str, HapiServer] = {}
_killable_modules: set[object] = set()  # modules with a test that needs the killable HAPI, until it is launched
_issuer_port: dict[str, int] = {}  # the port the SMART HAPI names as its issuer's


def pytest_collection_finish(session: pytest.Session) -> None:
    """Launches the HAPI servers the selected tests need right away: each takes half a minute or more to start,
    which the unit tests that run first then hide. The fixtures below wait for them and stop them."""
    if session.config.option.collectonly:  # nothing will run: nothing to start
        return
    needed = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    _prepare_node_packages({item.nodeid.split("::")[0] for item in session.items}, needed)
    if os.environ.get("FHIR_BASE_URL"):
        return
    if "fhir_base_url" in needed:
        _early["session"] = HapiServer()
        _early["session"].launch()
    if "smart_hapi" in needed:
        _issuer_port["smart"] = free_port()
        _early["smart"] = HapiServer(AUTH_ISSUER=f"http://127.0.0.1:{_issuer_port['smart']}")
        _early["smart"].launch()
    # The fault suite's own HAPI, on an H2 file, is launched later: when the first test of a module that needs
    # it starts (pytest_runtest_setup). Three JVMs starting at once slowed the unit tests that run first.
    _killable_modules.update(item.module for item in session.items
                             if KILLABLE in getattr(item, "fixturenames", ()))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Launches the killable HAPI as its module begins; the tests that use it run last in the session (see
    pytest_collection_modifyitems), so the module's other tests hide most of its start."""
    if item.module in _killable_modules:
        _killable_modules.clear()  # once
        _early["killable"] = FhirServer(Path(tempfile.mkdtemp(prefix="killable-hapi-")))
        _early["killable"].launch()


def _prepare_node_packages(modules: set[str], fixtures: set[str]) -> None:
    """The npm packages (and the Smart Forms bundle) the selected tests will need, installed in a background
    thread while the tests that run first go on: `npm ci` in a clean clone takes half a minute or more per folder.
    The fixtures still call the same installs; they wait for one under way (a lock per folder) and redo one that
    failed here, so a failure is reported by the test that needs it."""
    def prepare() -> None:
        # in the order the tests need them (conftest runs the modules that need no HAPI first)
        with contextlib.suppress(Exception):
            if "tests/test_renderers_browser.py" in modules:
                from tests.test_renderers_browser import RENDERERS, build_smart_forms
                npm_install(RENDERERS)
                build_smart_forms()
            if "axe_script" in fixtures:
                from tests.web.browser import AXE
                npm_install(AXE)
            if "smart_hapi" in fixtures:
                npm_install(OAUTH_DIR, needs=NODE)

    threading.Thread(target=prepare, name="npm-installs", daemon=True).start()


def pytest_sessionfinish() -> None:
    for server in _early.values():
        server.stop()


@contextmanager
def _running(key: str, **env: str) -> Iterator[HapiServer]:
    """The server launched early under `key`, once it answers; else one started now."""
    server = _early.get(key)
    if server is None:
        with hapi_server(**env) as started:
            yield started
        return
    server.wait_ready()
    yield server  # stopped at the end of the session


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules that need no HAPI run first, while the HAPIs launched at collection start (whole modules move,
    in their own order, so module fixtures stay together). With FHIR_BASE_URL set, only the `any_server` suite
    runs (on that server): the others need the local HAPI's own settings (validation, Subscriptions delivered
    here, SMART, a server to kill)."""
    if not os.environ.get("FHIR_BASE_URL"):
        on_hapi = {item.module for item in items if HAPI_FIXTURES & set(getattr(item, "fixturenames", ()))}
        # stable: the order within each group is kept; the tests that kill a HAPI go last, while theirs starts
        items.sort(key=lambda item: (item.module in on_hapi, KILLABLE in getattr(item, "fixturenames", ())))
        return
    kept = [item for item in items if item.get_closest_marker("any_server")]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


@pytest.fixture(scope="session")
def fhir_base_url() -> Iterator[str]:
    if os.environ.get("FHIR_BASE_URL"):
        yield os.environ["FHIR_BASE_URL"].rstrip("/")
        return
    with _running("session") as server:
        yield server.base_url


@dataclass(frozen=True)
class SmartHapi:
    base_url: str
    issuer_port: int  # the test OAuth server must listen here (tests/smart_helpers.py: authorization_server)


@pytest.fixture
def killable_hapi(tmp_path: Path) -> Iterator[FhirServer]:
    """A HAPI of the test's own on an H2 file, to SIGKILL and start again: launched as the module that needs it
    begins (else now), stopped and its files removed after the test."""
    early = _early.pop("killable", None)
    server = early or FhirServer(tmp_path)
    if early is None:
        server.launch()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        if early and early.database:  # its home is the temporary folder made at collection
            shutil.rmtree(early.database.parent.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def smart_hapi() -> Iterator[SmartHapi]:
    """A second HAPI, behind SMART Backend Services: only tokens of the OAuth server on `issuer_port` (which
    each SMART test module starts with its own clients; HAPI reads its keys when it first needs them)."""
    port = _issuer_port.get("smart") or free_port()
    with _running("smart", AUTH_ISSUER=f"http://127.0.0.1:{port}") as server:
        yield SmartHapi(server.base_url, port)


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
