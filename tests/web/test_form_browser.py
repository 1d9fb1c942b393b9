"""The patient form in a real browser: Debian's Chromium driven by Playwright, at a phone's size.

The service runs as a user runs it (`python -m plugin.jobs.cli serve`, a subprocess on
a free port). The test answers the form by the questions' visible wording, as a
screen reader would find them (`get_by_label`, radios by role within the
question's fieldset), so a missing or wrong label fails here. Every page must
load nothing from another host and log no console error (a Content Security
Policy violation would). Screenshots of each filled form and result page are kept
in tests/artifacts/ for a human to look at.

Chromium comes from the distribution (`apt-get install -y chromium`), never a
Playwright download; without it the test fails rather than skips, so CI cannot
pass while silently not checking the page.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import orjson
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, Request, expect, sync_playwright

from tests.fhir_helpers import free_port, stop, wait_until_ready

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
QUESTIONNAIRE = orjson.loads((ROOT / "questionnaires" / "back-pain-screening.json").read_bytes())
REFER_EXAMPLE = orjson.loads((ROOT / "questionnaires" / "examples" / "qr-refer-asas.json").read_bytes())
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True,
         "device_scale_factor": 2}
# Roles of the AX tree that are form controls: each must have a name a screen reader can say.
CONTROL_ROLES = {"radio", "spinbutton", "textbox", "checkbox", "combobox", "button"}


def _items(items: list[dict]) -> Iterator[dict]:
    for item in items:
        yield item
        yield from _items(item.get("item", []))


ITEMS = {item["linkId"]: item for item in _items(QUESTIONNAIRE["item"])}


def text(link_id: str) -> str:
    return ITEMS[link_id]["text"]


def choice_label(link_id: str, code: str) -> str:
    return next(o["valueCoding"]["display"] for o in ITEMS[link_id]["answerOption"] if o["valueCoding"]["code"] == code)


# --- the service and the browser ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Service:
    url: str
    log: Path

    def said(self) -> str:
        """The end of the service's log, for a failure message (it logs no answers)."""
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The real service on a free port with its own embedded store; always stopped."""
    where = tmp_path_factory.mktemp("form-browser")
    port = free_port()
    # The embedded store, whatever the environment says (FHIR_BASE_URL may point the other tests at a server).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKPAIN_", "FHIR_"))}
    log = (where / "serve.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "plugin.jobs.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--store", str(where / "store.sqlite3")],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    running = Service(f"http://127.0.0.1:{port}", where / "serve.log")
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
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("Chromium is not installed, so the form page cannot be checked in a browser. "
                    "Install the distribution's package: apt-get install -y chromium")
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


@pytest.fixture
def visit(browser: Browser, service: Service) -> Iterator[Visit]:
    context = browser.new_context(**PHONE, base_url=service.url)
    page = context.new_page()
    page.set_default_timeout(10_000)
    seen = Visit(page, service)
    page.on("request", seen.on_request)
    page.on("console", seen.on_console)
    page.on("pageerror", lambda error: seen.errors.append(f"uncaught: {error}"))
    try:
        yield seen
        # (e) for every page every test opened: only the service was asked for anything, and nothing went wrong.
        elsewhere = [u for u in seen.requests if not (u == service.url or u.startswith(f"{service.url}/"))]
        assert not elsewhere, f"the pages asked other hosts: {elsewhere}"
        assert not seen.errors, f"console errors: {seen.errors}"
    finally:
        context.close()


# --- acting like a user -------------------------------------------------------------------------------------------

def open_form(visit: Visit) -> Page:
    page = visit.page
    response = page.goto("/")
    assert response is not None and response.ok
    # The policy is what would block an inline script or an outside asset: it must be there for (e) to mean much.
    assert "script-src 'self'" in (response.headers.get("content-security-policy") or "")
    expect(page.get_by_role("heading", level=1)).to_have_text(QUESTIONNAIRE["title"])
    return page


def question(page: Page, link_id: str):
    """A choice or yes/no question: the fieldset named by its legend."""
    return page.get_by_role("group", name=text(link_id), exact=True)


def choose(page: Page, link_id: str, label: str) -> None:
    radio = question(page, link_id).get_by_role("radio", name=label, exact=True)
    radio.check()
    expect(radio).to_be_checked()


def yes_no(page: Page, link_id: str, value: bool) -> None:
    choose(page, link_id, "Yes" if value else "No")


def enter(page: Page, link_id: str, value: int | float) -> None:
    page.get_by_label(text(link_id), exact=True).fill(str(value))


def answer(page: Page, answers: dict[str, object]) -> None:
    """Answers by linkId: a bool for yes/no, a str for a choice's code, a number for a number field."""
    for link_id, value in answers.items():
        if isinstance(value, bool):
            yes_no(page, link_id, value)
        elif isinstance(value, str):
            choose(page, link_id, choice_label(link_id, value))
        else:
            enter(page, link_id, value)


def send(visit: Visit, name: str) -> dict[str, str]:
    """Keeps the filled form's picture, sends it, keeps the result's picture; the fields as the browser sent them."""
    page = visit.page
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}-form.png", full_page=True)
    with page.expect_response(f"{visit.service.url}/form") as sent:
        page.get_by_role("button", name="Send my answers").click()
    page.wait_for_load_state()
    expect(page).to_have_url(f"{visit.service.url}/form")
    if sent.value.status != 200:
        pytest.fail(f"the form was answered with {sent.value.status}: {page.locator('main').inner_text()}\n"
                    f"The service's log:\n{visit.service.said()}")
    page.screenshot(path=ARTIFACTS / f"{name}-result.png", full_page=True)
    return dict(parse_qsl(sent.value.request.post_data or "", keep_blank_values=True))


def answers_of(qr: dict) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in _items(qr["item"]):
        for value in item.get("answer", [])[:1]:
            (key, raw), = value.items()
            out[item["linkId"]] = raw["code"] if key == "valueCoding" else raw
    return out


def fits_the_width(page: Page) -> None:
    """Nothing wider than the phone. A phone browser widens its window (and zooms out) to fit a page that is too
    wide, so window.innerWidth alone cannot tell: it is compared with the phone's own width too."""
    phone = (page.viewport_size or PHONE["viewport"])["width"]
    width, window = page.evaluate("[document.scrollingElement.scrollWidth, window.innerWidth]")
    assert width <= window == phone, f"the page is {width} px wide, its window {window} px, on a {phone} px phone"


# --- the cases ----------------------------------------------------------------------------------------------------

def test_a_refer_rheumatology(visit: Visit):
    """The answers of the referral example, typed and clicked in, give the referral headline."""
    page = open_form(visit)
    # the example answers screening 1.0.0; the form asks 1.1.0, whose seven new red flags are answered "no" too
    new_flags = {link_id: False for link_id in ITEMS if link_id.startswith("rf-")}
    answer(page, {**new_flags, **answers_of(REFER_EXAMPLE)})
    send(visit, "refer-rheumatology")
    expect(page.get_by_role("status")).to_contain_text("Your care team may refer you to a specialist")
    expect(page.get_by_role("heading", level=1)).to_have_text("Your care team may refer you to a specialist")
    expect(page.get_by_text("Your answers have not been saved.")).to_be_visible()
    fits_the_width(page)


def test_b_saddle_numbness_is_an_emergency(visit: Visit):
    """One cauda-equina flag is enough: the result is an alert telling the patient to seek care now."""
    page = open_form(visit)
    answer(page, {"pain-duration": "lt-6w", "rf-saddle-numbness": True})
    send(visit, "emergency")
    alert = page.get_by_role("alert")
    expect(alert).to_be_visible()
    expect(alert.get_by_role("heading", level=1)).to_have_text("Seek urgent care now")
    expect(alert).to_contain_text("emergency department")
    fits_the_width(page)


# Every answer known and none pointing to inflammation, except the ASAS-IBP count stands at 3 of 5 (onset age,
# gradual onset, better with exercise): night pain that eases on rising would make it 4, and so a referral.
NO_NIGHT_PAIN = {
    "pain-duration": "1y-5y", "onset-age": 28, "age": 31, "onset-gradual": True, "better-with-exercise": True,
    "better-with-rest": True, "night-pain": False, "morning-stiffness-minutes": 10, "buttock-pain": "none",
    "worse-with-activity": False, "leg-pain-below-knee": False, "nsaid-response": "not-tried",
    **dict.fromkeys(("uveitis", "psoriasis", "ibd", "enthesitis", "dactylitis", "peripheral-arthritis",
                     "family-history-first-degree-spa", "family-history-related"), False),
    **{link_id: False for link_id in ITEMS if link_id.startswith("rf-")},
}
FOLLOW_UPS = ("night-pain-eases-on-rising", "night-waking-second-half")


def test_c_night_pain_follow_ups_show_only_after_yes(visit: Visit):
    """enableWhen: the follow-ups show only while night pain is Yes, and an answer left behind is not sent."""
    page = open_form(visit)
    follow_ups = [question(page, link_id) for link_id in FOLLOW_UPS]
    # Hidden questions leave the accessibility tree, so they are found by id to check they are there but hidden.
    hidden = [page.locator(f"#q-{link_id}") for link_id in FOLLOW_UPS]
    for element in hidden:
        expect(element).to_be_attached()
        expect(element).to_be_hidden()

    yes_no(page, "night-pain", True)
    for group in follow_ups:
        expect(group).to_be_visible()
    answer(page, dict.fromkeys(FOLLOW_UPS, True))

    yes_no(page, "night-pain", False)
    for element in hidden:
        expect(element).to_be_hidden()
        earlier = element.get_by_role("radio", include_hidden=True, name="Yes", exact=True)
        expect(earlier).to_be_checked()  # still ticked, but disabled, so not sent
        expect(earlier).to_be_disabled()

    answer(page, {k: v for k, v in NO_NIGHT_PAIN.items() if k != "night-pain"})
    sent = send(visit, "night-pain-no")
    assert sent["night-pain"] == "false"
    assert not [link_id for link_id in FOLLOW_UPS if link_id in sent], f"hidden answers were sent: {sent}"
    # With the follow-ups not counted every criterion is known and none is met: no referral. Had "eases on rising"
    # counted, ASAS-IBP would be positive and the result a referral.
    expect(page.get_by_role("heading", level=1)).to_have_text("No signs of inflammatory back pain")

    # The same answers with night pain that eases on rising: the follow-ups are sent, and the result is a referral.
    open_form(visit)
    answer(page, {**NO_NIGHT_PAIN, "night-pain": True, **dict.fromkeys(FOLLOW_UPS, True)})
    sent = send(visit, "night-pain-yes")
    assert [sent.get(link_id) for link_id in FOLLOW_UPS] == ["true", "true"], sent
    expect(page.get_by_role("heading", level=1)).to_have_text("Your care team may refer you to a specialist")


def test_d_fits_a_phone_and_every_control_has_a_name(visit: Visit):
    """No sideways scrolling on a phone (nor at 320 px), and every control has a name assistive technology says."""
    page = open_form(visit)
    fits_the_width(page)
    yes_no(page, "night-pain", True)  # every question shown
    fits_the_width(page)
    page.set_viewport_size({"width": 320, "height": 640})  # the narrowest width WCAG asks a page to reflow to
    fits_the_width(page)

    inputs = page.locator("input:not([type=hidden]), select, textarea, button")
    shown = [i for i in range(inputs.count()) if inputs.nth(i).is_visible()]
    assert len(shown) == inputs.count(), "with night pain answered Yes, every question should show"
    # The names the browser itself computed for assistive technology.
    tree = page.context.new_cdp_session(page).send("Accessibility.getFullAXTree")["nodes"]
    controls = [n for n in tree if not n.get("ignored") and n.get("role", {}).get("value") in CONTROL_ROLES]
    unnamed = [n.get("role", {}).get("value") for n in controls if not (n.get("name", {}).get("value") or "").strip()]
    assert not unnamed, f"controls without an accessible name: {unnamed}"
    assert len(controls) == inputs.count(), f"{inputs.count()} controls on the page, {len(controls)} in the AX tree"
    groups = {n.get("name", {}).get("value") for n in tree if n.get("role", {}).get("value") == "group"}
    for link_id, item in ITEMS.items():
        if item["type"] in ("choice", "boolean"):
            assert item["text"] in groups, f"{link_id}: its radios are not grouped under the question's wording"
        elif item["type"] in ("integer", "decimal", "string"):
            expect(page.get_by_label(item["text"], exact=True)).to_have_attribute("name", link_id)
