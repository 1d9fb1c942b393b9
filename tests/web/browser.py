"""The browser tests' common ground: the real service in its own process, Debian's Chromium through Playwright,
a phone-sized page that records every request and console error, axe-core, and screenshots.

Chromium comes from the distribution (`apt-get install -y chromium`), never a Playwright download; without it
the tests fail rather than skip, so CI cannot pass while silently not checking the pages. axe-core comes from
npm (tests/web/axe/, `npm ci` on first use) and is added to each page through DevTools, so the page's own
Content Security Policy still holds for everything else.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, Request, sync_playwright

from plugin.stores.sqlite import SqliteStore
from tests.fhir_helpers import free_port, npm_install, stop, wait_until_ready
from tests.prerequisites import program

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "tests" / "screenshots"
AXE = Path(__file__).resolve().parent / "axe"
WCAG = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True,
         "device_scale_factor": 2}


@dataclass(frozen=True)
class Service:
    url: str
    log: Path
    store: Path

    def said(self) -> str:
        """The end of the service's log, for a failure message (it logs no answers)."""
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("form-browser")) as running:
        yield running


@contextmanager
def running_service(where: Path) -> Iterator[Service]:
    """The real service on a free port with its own embedded store in `where`; always stopped."""
    port = free_port()
    # The embedded store, whatever the environment says (FHIR_BASE_URL may point the other tests at a server).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKPAIN_", "FHIR_"))}
    log = (where / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "plugin.jobs.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--store", str(where / "store.sqlite3")],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    running = Service(f"http://127.0.0.1:{port}", where / "serve.log", where / "store.sqlite3")
    try:
        wait_until_ready(f"{running.url}/readyz", server, 30, running.said)
        yield running
    finally:
        stop(server)
        log.close()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    executable = program("chromium", "chromium")  # Debian's, installed on first use
    # Chromium's sandbox cannot start as root (CI containers); the pages opened are the service's own.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    browser = playwright.chromium.launch(executable_path=executable, headless=True, args=args)
    yield browser
    browser.close()


@dataclass
class Visit:
    """A phone-sized page and what it did: every request, console error and uncaught script error."""

    page: Page
    service: Service
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def on_request(self, request: Request) -> None:
        self.requests.append(request.url)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":  # a missing icon, a CSP violation, a script error: all count
            self.errors.append(f"{message.text} ({message.location.get('url')})")


@pytest.fixture(scope="module")
def axe_script() -> Path:
    npm_install(AXE)
    return AXE / "node_modules" / "axe-core" / "axe.min.js"


@pytest.fixture
def visit(browser: Browser, served: Service, axe_script: Path) -> Iterator[Visit]:
    context = browser.new_context(**PHONE, base_url=served.url)
    # Added through DevTools, so the page's Content Security Policy (rightly) does not stop it.
    context.add_init_script(path=axe_script)
    page = context.new_page()
    page.set_default_timeout(10_000)
    seen = Visit(page, served)
    page.on("request", seen.on_request)
    page.on("console", seen.on_console)
    page.on("pageerror", lambda error: seen.errors.append(f"uncaught: {error}"))
    try:
        yield seen
        # (e) for every page every test opened: only the service was asked for anything, and nothing went wrong.
        elsewhere = [u for u in seen.requests if not (u == served.url or u.startswith(f"{served.url}/"))]
        assert not elsewhere, f"the pages asked other hosts: {elsewhere}"
        assert not seen.errors, f"console errors: {seen.errors}"
    finally:
        context.close()


# --- what the tests look at -----------------------------------------------------------------------------------

def accessible(page: Page, state: str) -> None:
    """axe-core on the page as it is now: no serious or critical WCAG 2.1 AA violation."""
    found = page.evaluate("(tags) => axe.run(document, {runOnly: {type: 'tag', values: tags}})", WCAG)
    bad = [f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
           for v in found["violations"] if v["impact"] in ("serious", "critical")]
    assert not bad, f"{state}: {bad}"
    assert found["passes"], f"{state}: axe checked nothing"


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def stored_responses(service: Service) -> list[dict]:
    """The QuestionnaireResponses in the running service's own store, read from its file."""
    async def read() -> list[dict]:
        async with SqliteStore(service.store) as store:
            return [r async for r in store.search("QuestionnaireResponse", {})]
    with ThreadPoolExecutor(1) as other:  # Playwright's own event loop runs in this thread
        return other.submit(asyncio.run, read()).result()


def top(page: Page, selector: str) -> float:
    box = page.locator(selector).first.bounding_box()
    assert box is not None, f"{selector} is not on screen"
    return box["y"]
