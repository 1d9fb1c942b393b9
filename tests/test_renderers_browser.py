"""The screening Questionnaire in third-party FHIR form renderers, in a real browser, scored by the real plugin.

What a patient portal would do: a page (tests/renderers/portal.js) fetches the Questionnaire from a running
`backpain-screen serve` (so it is the Questionnaire as published now, with whatever extensions it carries),
hands it to the renderer, and on "Send" POSTs the QuestionnaireResponse the renderer made straight to the
plugin with fetch (cross-origin, allowed by BACKPAIN_CORS_ORIGINS). Headless Chromium fills the form like a
user, clicking and typing into the rendered controls; the test then reads the stored results from the plugin.

Renderers, from npm (tests/renderers/, installed with `npm ci` on first use):
- NLM LHC-Forms 40.x: its prebuilt web component and R4 library, loaded as its README says; the QR is
  `LForms.Util.getFormFHIRData("QuestionnaireResponse", "R4")`.
- CSIRO Smart Forms (@aehrc/smart-forms-renderer): a tiny React app (tests/renderers/smart-forms/app.jsx)
  bundled by esbuild at test time; the QR is `getResponse()` less empty and hidden answers.

Quirks checked: a `completed` response with items unanswered (even required ones) is scored (indeterminate
where the gaps could change the decision, a decision where they could not), answers hidden by enableWhen are
left out, and a non-integer typed into an integer field never reaches the plugin as that integer. The age is
prefilled by each renderer from the Questionnaire's SDC launchContext + initialExpression.

Every page may ask only the page's own server and the plugin for anything, and must log no console error.
Screenshots go to tests/artifacts/. Chromium is Debian's (/usr/bin/chromium); nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import re
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, Route, expect, sync_playwright

from plugin.stores.sqlite import SqliteStore
from tests.fhir_helpers import ROOT, free_port, npm_install, stop, wait_until_ready
from tests.prerequisites import program

RENDERERS = Path(__file__).resolve().parent / "renderers"
SMART_FORMS = RENDERERS / "smart-forms"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
QUESTIONNAIRE_ID = "back-pain-screening"
FHIR_JSON = "application/fhir+json"
RED_FLAGS = ("rf-saddle-numbness", "rf-bladder-bowel", "rf-leg-weakness", "rf-fever", "rf-weight-loss",
             "rf-cancer-history", "rf-night-pain-unrelieved", "rf-trauma", "rf-immunosuppression",
             # screening 1.1.0, the version the renderers are given (SCREENING.md §7)
             "rf-sciatica-both-legs", "rf-sexual-dysfunction", "rf-eye-now", "rf-thoracic-pain",
             "rf-constant-progressive", "rf-fracture-risk", "rf-recent-infection")
FOLLOW_UPS = ("night-pain-eases-on-rising", "night-waking-second-half")


# --- the renderers: how a user answers in each -----------------------------------------------------------------

class Renderer:
    """One renderer's page and its controls, found the way its markup names them."""

    name: str
    page: str

    def yes_no(self, page: Page, link_id: str, value: bool) -> None:
        raise NotImplementedError

    def choose(self, page: Page, link_id: str, display: str) -> None:
        raise NotImplementedError

    def number_field(self, page: Page, link_id: str) -> Locator:
        raise NotImplementedError

    def question(self, page: Page, link_id: str) -> Locator:
        """The question's label: there while the item is enabled."""
        raise NotImplementedError

    def settle(self, page: Page) -> None:
        """Whatever the renderer does after a keystroke before its response has it."""


class LhcForms(Renderer):
    """LHC-Forms ids carry the item's path: `onset-age/1/1`, a radio `night-pain/1/1|true` (so [id="…"])."""

    name, page = "lhc-forms", "lforms.html"

    def yes_no(self, page: Page, link_id: str, value: bool) -> None:
        radio = page.locator(f'[id="{link_id}/1/1|{str(value).lower()}"]')
        radio.click()
        expect(radio).to_have_class(re.compile(r"\bant-radio-wrapper-checked\b"))

    def choose(self, page: Page, link_id: str, display: str) -> None:
        page.locator(f'[id="{link_id}/1/1"]').click()  # its autocompleter lists the options: "1:  Less than …"
        page.locator("#completionOptions li", has_text=re.compile(rf"\s{re.escape(display)}$")).click()
        expect(page.locator(f'[id="{link_id}/1/1"]')).to_have_value(display)

    def number_field(self, page: Page, link_id: str) -> Locator:
        return page.locator(f'[id="{link_id}/1/1"]')

    def question(self, page: Page, link_id: str) -> Locator:
        return page.locator(f'[id="label-{link_id}/1/1"]')


class SmartForms(Renderer):
    """Smart Forms (MUI): `#boolean-<linkId>` radio groups, `#choice-<linkId>` autocompletes, `#integer-<linkId>`."""

    name, page = "smart-forms", "smart-forms.html"

    def yes_no(self, page: Page, link_id: str, value: bool) -> None:
        radio = page.locator(f"#boolean-{link_id}").get_by_role("radio", name="Yes" if value else "No", exact=True)
        radio.check()
        expect(radio).to_be_checked()

    def choose(self, page: Page, link_id: str, display: str) -> None:
        page.locator(f"#choice-{link_id}").click()
        page.get_by_role("option", name=display, exact=True).click()
        chosen = page.locator(".MuiAutocomplete-root", has=page.locator(f"#choice-{link_id}"))
        expect(chosen.locator(".MuiAutocomplete-tag")).to_have_text(display)  # shown as a tag, not typed

    def number_field(self, page: Page, link_id: str) -> Locator:
        return page.locator(f"#integer-{link_id}")

    def question(self, page: Page, link_id: str) -> Locator:
        return page.locator(f"#label-{link_id}")

    def settle(self, page: Page) -> None:
        # Its text fields reach its store after a 300 ms debounce, and the re-render then can undo a click made
        # meanwhile (seen: a radio that does not stay checked). A person takes longer than that to move on.
        page.wait_for_timeout(400)


# --- the servers and the browser --------------------------------------------------------------------------------

class _Files(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def pages() -> Iterator[str]:
    """tests/renderers/ (the portal pages and the renderers' files) over HTTP on 127.0.0.1; its origin."""
    npm_install(RENDERERS)
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), functools.partial(_Files, directory=str(RENDERERS)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


_building = threading.Lock()


def build_smart_forms() -> None:
    """The Smart Forms app, bundled by esbuild into smart-forms/build/ (kept out of git), unless it is up to date
    (conftest starts this in the background at collection; the fixture then waits for it)."""
    with _building:
        _build_smart_forms()


def _build_smart_forms() -> None:
    npm_install(SMART_FORMS)
    built = SMART_FORMS / "build" / "app.js"
    sources = [SMART_FORMS / "app.jsx", RENDERERS / "portal.js", SMART_FORMS / "node_modules" / ".package-lock.json"]
    if built.exists() and built.stat().st_mtime > max(source.stat().st_mtime for source in sources):
        return
    subprocess.run(
        [str(SMART_FORMS / "node_modules" / ".bin" / "esbuild"), "app.jsx", "--bundle", "--minify", "--format=iife",
         "--outdir=build", "--asset-names=assets/[name]-[hash]", "--define:process.env.NODE_ENV=\"production\"",
         "--loader:.woff2=file", "--loader:.woff=file", "--log-level=warning"],
        cwd=SMART_FORMS, check=True, timeout=120)


@dataclass(frozen=True)
class Plugin:
    url: str
    store: Path
    log: Path

    def said(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def in_store(self, work: Callable[[SqliteStore], Awaitable[Any]]) -> Any:
        """`work` done on the embedded store, in a thread of its own (Playwright's sync API keeps an event loop
        running in this one)."""
        async def run() -> Any:
            async with SqliteStore(self.store) as store:
                return await work(store)

        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            return thread.submit(asyncio.run, run()).result()

    def new_patient(self) -> str:
        """A Patient in the embedded store (results are written only for a patient the record system has)."""
        return f"Patient/{self.in_store(lambda store: store.create({'resourceType': 'Patient', 'active': True}))['id']}"

    def written_for(self, patient: str) -> list[str]:
        """The types of the responses and results stored about the patient."""
        async def search(store: SqliteStore) -> list[str]:
            return [r["resourceType"] for kind in ("QuestionnaireResponse", "Observation")
                    async for r in store.search(kind, {"subject": patient})]

        return self.in_store(search)

    def results(self, location: str) -> dict[str, dict]:
        """The stored results of the response at `location`: Observations by code, Tasks under "tasks"."""
        qr_id = location.split("/QuestionnaireResponse/")[1].split("/")[0]
        found = httpx.get(f"{self.url}/results/{qr_id}", headers={"Accept": FHIR_JSON}, timeout=10)
        assert found.status_code == 200, found.text
        resources = [e["resource"] for e in found.json()["entry"]]
        by_code: dict[str, Any] = {r["code"]["coding"][0]["code"]: r for r in resources
                                   if r["resourceType"] == "Observation"}
        by_code["tasks"] = [r for r in resources if r["resourceType"] == "Task"]
        return by_code


@pytest.fixture(scope="module")
def plugin(pages: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plugin]:
    """The real service on the embedded store, taking cross-origin POSTs from the portal pages; always stopped."""
    where = tmp_path_factory.mktemp("renderers")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKPAIN_", "FHIR_"))}
    env.update({"BACKPAIN_CORS_ORIGINS": pages, "XDG_STATE_HOME": str(where / "state")})
    running = Plugin(f"http://127.0.0.1:{port}", where / "store.sqlite3", where / "serve.log")
    with running.log.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "plugin.jobs.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--store", str(running.store)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(f"{running.url}/readyz", server, 30, running.said)
        yield running
    finally:
        stop(server)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = program("chromium", "chromium")  # Debian's, installed on first use
    with sync_playwright() as driver:
        # Chromium's sandbox cannot start as root (CI containers); the pages are the test's own.
        browser = driver.chromium.launch(executable_path=executable, headless=True,
                                         args=["--no-sandbox"] if os.geteuid() == 0 else [])
        yield browser
        browser.close()


@pytest.fixture(scope="module", params=[LhcForms(), SmartForms()], ids=lambda r: r.name)
def renderer(request: pytest.FixtureRequest) -> Renderer:
    if isinstance(request.param, SmartForms):
        build_smart_forms()
    return request.param


@dataclass
class Visit:
    """A portal page in one renderer, for one new patient, and everything the page did."""

    page: Page
    renderer: Renderer
    pages: str
    plugin: Plugin
    patient: str
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    expected_errors: list[str] = field(default_factory=list)  # a test that expects a refusal says so

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and message.text not in self.expected_errors:
            self.errors.append(f"{message.text} ({message.location.get('url')})")

    def open(self, change: Callable[[dict], None] | None = None, birth_date: str = "") -> None:
        """The portal page, the plugin's Questionnaire shown in the renderer; `change` alters the Questionnaire on
        its way to the page (the plugin's own stays as it is); `birth_date` is the Patient's, for prefill."""
        if change is not None:
            def altered(route: Route) -> None:
                answer = route.fetch()
                questionnaire = answer.json()
                change(questionnaire)
                route.fulfill(response=answer, json=questionnaire)

            self.page.route(f"{self.plugin.url}/Questionnaire/*", altered)
        self.page.goto(f"{self.pages}/{self.renderer.page}?plugin={self.plugin.url}"
                       f"&questionnaire={QUESTIONNAIRE_ID}&patient={self.patient}&birthDate={birth_date}")
        expect(self.page.locator("#state")).to_have_text("ready", timeout=30_000)

    def answer(self, answers: dict[str, object]) -> None:
        """By linkId, like a user: a bool clicks Yes/No, a str picks the option with that display, else typed."""
        for link_id, value in answers.items():
            if isinstance(value, bool):
                self.renderer.yes_no(self.page, link_id, value)
            elif isinstance(value, str):
                self.renderer.choose(self.page, link_id, value)
            else:
                self.renderer.number_field(self.page, link_id).fill(str(value))
                self.renderer.settle(self.page)

    def send(self, name: str) -> dict:
        """Clicks Send; what the page sent and what the plugin answered ({status, location, qr, reply})."""
        said = self.click_send(name)
        assert said == "sent", f"{said}\nThe plugin's log:\n{self.plugin.said()}"
        return self.page.evaluate("window.sent")

    def click_send(self, name: str) -> str:
        """Keeps a picture of the filled form, clicks Send; what the page then says ("sent" or "failed: …")."""
        self.renderer.settle(self.page)
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=ARTIFACTS / f"{self.renderer.name}-{name}.png", full_page=True)
        self.page.get_by_role("button", name="Send to the plugin").click()
        state = self.page.locator("#state")
        expect(state).not_to_have_text(re.compile("^(ready|sending)$"))
        return state.inner_text()


@pytest.fixture
def visit(browser: Browser, pages: str, plugin: Plugin, renderer: Renderer) -> Iterator[Visit]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    seen = Visit(page, renderer, pages, plugin, plugin.new_patient())
    page.on("request", lambda request: seen.requests.append(request.url))
    page.on("console", seen.on_console)
    page.on("pageerror", lambda error: seen.errors.append(f"uncaught: {error}"))
    try:
        yield seen
        elsewhere = [u for u in seen.requests
                     if not (u.startswith((f"{pages}/", f"{plugin.url}/")) or u.startswith("data:"))]
        assert not elsewhere, f"the page asked other hosts: {elsewhere}"
        assert not seen.errors, f"console errors: {seen.errors}"
    finally:
        context.close()


# --- reading the outcome ------------------------------------------------------------------------------------------

def _items(items: list[dict]) -> Iterator[dict]:
    for item in items:
        yield item
        yield from _items(item.get("item", []))


def answers_of(qr: dict) -> dict[str, object]:
    """The response's answers by linkId: a code for a choice, else the value."""
    out: dict[str, object] = {}
    for item in _items(qr.get("item", [])):
        for value in item.get("answer", [])[:1]:
            (key, raw), = ((k, v) for k, v in value.items() if k.startswith("value"))
            out[item["linkId"]] = raw["code"] if key == "valueCoding" else raw
    return out


def outcome(results: dict[str, Any]) -> str:
    return results["screening-outcome"]["valueCodeableConcept"]["coding"][0]["code"]


def written(sent: dict) -> dict:
    """The plugin's answer to the POST, checked to be a write; the QR's location."""
    assert sent["status"] == 201, orjson.dumps(sent["reply"]).decode()
    assert sent["qr"]["status"] == "completed"
    assert re.search(r"/QuestionnaireResponse/[^/]+/_history/[^/]+$", sent["location"] or ""), sent["location"]
    assert sent["reply"]["resourceType"] == "QuestionnaireResponse"  # a FHIR create answers with what it stored
    return sent


# --- the cases ------------------------------------------------------------------------------------------------------

def test_cauda_equina_flag_is_an_emergency_with_everything_else_unanswered(visit: Visit):
    """One cauda-equina flag decides: emergency, though the renderer marks the response `completed` with nearly
    every item unanswered (a missing answer cannot make a flag that is present go away)."""
    visit.open()
    visit.answer({"pain-duration": "Less than 6 weeks", "rf-saddle-numbness": True})
    sent = written(visit.send("emergency"))
    assert answers_of(sent["qr"]) == {"pain-duration": "lt-6w", "rf-saddle-numbness": True}
    results = visit.plugin.results(sent["location"])
    assert outcome(results) == "emergency-assessment"
    assert [t["priority"] for t in results["tasks"]] == ["stat"]
    assert "QuestionnaireResponse" in visit.plugin.written_for(visit.patient)


REFER = {
    "pain-duration": "1 to 5 years", "onset-age": 28, "onset-gradual": True, "better-with-exercise": True,
    "better-with-rest": False, "night-pain": True, "night-pain-eases-on-rising": True,
    "night-waking-second-half": True, "hla-b27": "Positive", **dict.fromkeys(RED_FLAGS, False),
}


def test_inflammatory_back_pain_is_a_referral(visit: Visit):
    """Chronic pain since 28, ASAS-IBP 5 of 5, HLA-B27 positive, every red flag answered no: ASAS 2015 says refer
    (one criterion is enough, so the history items left blank cannot change it)."""
    visit.open()
    visit.answer(REFER)
    sent = written(visit.send("refer"))
    assert answers_of(sent["qr"]) == {**REFER, "pain-duration": "1y-5y", "hla-b27": "positive"}
    results = visit.plugin.results(sent["location"])
    assert results["asas-ibp"]["valueInteger"] == 5
    assert outcome(results) == "refer-rheumatology"
    assert [t["code"]["coding"][0]["code"] for t in results["tasks"]] == ["306290009"]


# Every referral criterion known and none met (the clinician's tests left blank: not done). ASAS-IBP stands at 3 of 5
# (onset before 40, gradual onset, better with exercise): a "yes" to night pain easing on rising, answered and then
# hidden, would make it 4 and a referral.
NO_REFERRAL = {
    "pain-duration": "3 months to less than 1 year", "onset-age": 28, "onset-gradual": True,
    "better-with-exercise": True, "better-with-rest": True, "nsaid-response": "I have not tried this",
    **dict.fromkeys(("uveitis", "psoriasis", "ibd", "enthesitis", "dactylitis", "peripheral-arthritis",
                     "family-history-first-degree-spa", "family-history-related"), False),
    **dict.fromkeys(RED_FLAGS, False),
}


def test_answers_hidden_by_enable_when_are_left_out_and_no_referral_is_indicated(visit: Visit):
    """Night pain yes, both follow-ups yes, then night pain no: the follow-ups disappear and their answers are
    not sent (had they been, the plugin would refuse the contradiction with a 400, or the count would be 4)."""
    visit.open()
    page = visit.page
    visit.answer({"night-pain": True, **dict.fromkeys(FOLLOW_UPS, True)})
    visit.answer({"night-pain": False})
    for link_id in FOLLOW_UPS:
        expect(visit.renderer.question(page, link_id)).to_have_count(0)
    visit.answer(NO_REFERRAL)
    sent = written(visit.send("no-referral"))
    sent_answers = answers_of(sent["qr"])
    assert not [link_id for link_id in FOLLOW_UPS if link_id in sent_answers], sent_answers
    assert sent_answers["night-pain"] is False
    results = visit.plugin.results(sent["location"])
    assert results["asas-ibp"]["valueInteger"] == 3
    assert outcome(results) == "no-referral-indicated"
    assert results["tasks"] == []
    if isinstance(visit.renderer, SmartForms):
        hidden_answer_is_refused(visit, sent["qr"])


def hidden_answer_is_refused(visit: Visit, sent: dict) -> None:
    """Smart Forms' own getResponse() keeps the hidden answers (the portal sends it through
    removeEmptyAnswersFromResponse, as the Smart Forms app does). Sent as it is, the plugin refuses the
    contradiction with a 400 naming the item rather than guess which answer the patient meant."""
    raw = visit.page.evaluate("window.rawResponse()")
    assert [answers_of(raw)[link_id] for link_id in FOLLOW_UPS] == [True, True]
    raw.update(status="completed", subject=sent["subject"])
    refused = httpx.post(f"{visit.plugin.url}/QuestionnaireResponse", content=orjson.dumps(raw),
                         headers={"Content-Type": FHIR_JSON}, timeout=10)
    assert refused.status_code == 400, refused.text
    issues = refused.json()["issue"]
    assert [(i["code"], re.search(r"'(.+?)'", i["diagnostics"])[1]) for i in issues] == [  # type: ignore[index]
        ("business-rule", link_id) for link_id in FOLLOW_UPS]
    assert all(re.fullmatch(r"QuestionnaireResponse\.item\[\d\]\.item\[\d+\]", i["expression"][0]) for i in issues)


def every_item_required(questionnaire: dict) -> None:
    for item in _items(questionnaire["item"]):
        if item["type"] != "group":
            item["required"] = True


def test_completed_with_required_items_unanswered_is_indeterminate(visit: Visit):
    """Every question marked required (in the page's copy), then chronic pain since 30 and no red flags, the rest
    left blank: the renderer still makes a `completed` response (LHC-Forms by itself, Smart Forms on the portal's
    "Send"). The plugin does not refuse it (it never reads `required`: a blank is an unknown, and refusing would
    lose the red-flag answers); it writes it and says indeterminate, as the blanks could still meet a referral
    criterion, never "no referral"."""
    visit.open(every_item_required)
    expect(visit.renderer.question(visit.page, "ibd")).to_contain_text("*")  # the renderer marks it required
    visit.answer({"pain-duration": "More than 5 years", "onset-age": 30, **dict.fromkeys(RED_FLAGS, False)})
    sent = written(visit.send("indeterminate"))
    assert answers_of(sent["qr"]) == {"pain-duration": "gt-5y", "onset-age": 30, **dict.fromkeys(RED_FLAGS, False)}
    results = visit.plugin.results(sent["location"])
    assert outcome(results) == "indeterminate"
    assert results["tasks"] == []


def test_a_decimal_typed_into_an_integer_field_never_reaches_the_plugin_as_that_integer(visit: Visit):
    """"28.5" typed, key by key, as the age the pain began. LHC-Forms flags the field and makes no response at all
    (getFormFHIRData gives null), so the portal has nothing to send. Smart Forms drops the "." as it is typed:
    the field says 285, and the plugin refuses that age (0-120) with a 400 naming the item, writing nothing."""
    visit.open()
    page, renderer = visit.page, visit.renderer
    field = renderer.number_field(page, "onset-age")
    field.press_sequentially("28.5")
    field.press("Tab")  # on to the next question
    renderer.settle(page)
    if isinstance(renderer, LhcForms):
        expect(page.locator(".lhc-error-msg", has_text="must be an integer number")).to_be_visible()
        assert visit.click_send("decimal-age") == "failed: LHC-Forms made no QuestionnaireResponse of these answers"
        assert not [u for u in visit.requests if u.endswith("/QuestionnaireResponse")]
        return
    # Smart Forms: what the patient meant is lost in the field itself; a plausible number would go through
    # (7.5 minutes of stiffness becomes 75, over Berlin's 30): a hazard of the renderer the plugin cannot see.
    expect(field).to_have_value("285")
    stiffness = renderer.number_field(page, "morning-stiffness-minutes")
    stiffness.press_sequentially("7.5")
    expect(stiffness).to_have_value("75")
    stiffness.fill("")
    visit.expected_errors.append("Failed to load resource: the server responded with a status of 400 (Bad Request)")
    sent = visit.click_send("decimal-age")
    assert sent == "sent"
    refused = visit.page.evaluate("window.sent")
    assert refused["status"] == 400, refused
    assert answers_of(refused["qr"]) == {"onset-age": 285}
    issue, = refused["reply"]["issue"]
    assert issue["code"] == "value" and "between 0 and 120" in issue["diagnostics"]
    assert issue["expression"] == ["QuestionnaireResponse.item[0].item[0].answer[0].valueInteger"]
    assert visit.plugin.written_for(visit.patient) == []


def test_age_is_prefilled_from_the_patients_birth_date(visit: Visit):
    """The Questionnaire's SDC launchContext and initialExpression, run by the renderer itself (LHC-Forms with
    the Patient as launch context, Smart Forms through its sdc-populate): the age field shows the patient's full
    years, and the response carries them."""
    born = date(1986, 6, 15)
    today = date.today()
    age = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
    visit.open(birth_date=born.isoformat())
    expect(visit.renderer.number_field(visit.page, "age")).to_have_value(str(age))
    sent = written(visit.send("prefilled-age"))
    assert answers_of(sent["qr"]) == {"age": age}


@pytest.mark.parametrize("renderer", [LhcForms()], indirect=True, ids=lambda r: r.name)
def test_a_generic_sdc_engine_extracts_only_the_reported_age_as_an_observation(visit: Visit):
    """SDC observation-based extraction, run by LHC-Forms itself (`extract: true`): the Questionnaire marks only
    `age`, coded beside ours with LOINC 21612-7 (mappings/external-codes.yaml), so the engine makes one
    Observation, of the age the patient gave, and none of the yes/no answers (whose codes are ours alone)."""
    born = date(1979, 2, 3)
    today = date.today()
    age = today.year - born.year - ((today.month, today.day) < (born.month, born.day))
    visit.open(birth_date=born.isoformat())
    visit.answer({"rf-fever": False, "uveitis": True})
    expect(visit.renderer.number_field(visit.page, "age")).to_have_value(str(age))
    qr, bundle = visit.page.evaluate(
        "window.LForms.Util.getFormFHIRData('QuestionnaireResponse', 'R4', undefined, {extract: true})")
    assert answers_of(qr) == {"rf-fever": False, "uveitis": True, "age": age}
    (observation,) = [entry["resource"] for entry in bundle["entry"]]
    assert observation["resourceType"] == "Observation"
    assert [(c["system"], c["code"]) for c in observation["code"]["coding"]] == [
        ("https://backpain-screen.org/fhir/CodeSystem/screening-items", "age"), ("http://loinc.org", "21612-7")]
    value = observation.get("valueQuantity", {}).get("value", observation.get("valueInteger"))
    assert value == age, observation
