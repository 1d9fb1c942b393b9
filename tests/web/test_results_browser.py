"""The clinician's results pages in a real browser (Playwright + Debian Chromium), as a GP would use them.

The service runs in its own process with its own embedded store (tests/web/browser.py);
responses go in through the API as an EHR would send them.
Each test asserts what is on screen and in which order (urgency first, then
the action, then the instruments), runs axe-core on it, and keeps a
screenshot in tests/screenshots/.
"""

from __future__ import annotations

import copy
import re

import httpx
import orjson
import pytest
from playwright.sync_api import Page, expect

from tests.web.browser import ROOT, Visit, accessible, shot, top

EXAMPLES = ROOT / "questionnaires" / "examples"
DESK = {"width": 1280, "height": 900}


def example(name: str, **changes: object) -> dict:
    return {**orjson.loads((EXAMPLES / name).read_bytes()), **changes}


def send(base: str, qr: dict) -> None:
    answer = httpx.post(f"{base}/QuestionnaireResponse", content=orjson.dumps(qr),
                        headers={"Content-Type": "application/fhir+json"}, timeout=30)
    assert answer.status_code in (200, 201), answer.text


@pytest.fixture(scope="module", autouse=True)
def responses(served) -> None:
    """An emergency and an indeterminate response for one patient, and one amended after it was sent."""
    for name in ("qr-emergency.json", "qr-indeterminate.json"):
        send(served.url, example(name, subject={"reference": "Patient/gp-list"}))
    first = example("qr-refer-asas.json", id="qr-amended", subject={"reference": "Patient/amended"},
                    authored="2026-11-21T10:00:00Z")
    send(served.url, first)
    amended = copy.deepcopy(first)
    amended["status"] = "amended"
    for group in amended["item"]:
        for item in group.get("item", []):
            if item["linkId"] == "psoriasis":
                item["answer"] = [{"valueBoolean": True}]
    send(served.url, amended)


def open_results(visit: Visit, path: str) -> Page:
    page = visit.page
    page.set_viewport_size(DESK)
    answer = page.goto(path)
    assert answer is not None and answer.ok, answer and answer.status
    return page


def test_a_clinician_opens_an_emergency(visit: Visit):
    page = open_results(visit, "/results/qr-emergency")
    banner = page.get_by_role("alert")
    expect(banner.get_by_role("heading", level=1)).to_have_text(
        "! Emergency assessment today: possible cauda equina syndrome (saddle numbness or tingling)")
    expect(banner).to_contain_text("Assess the patient today")
    expect(page.locator(".task").first).to_contain_text("Emergency (stat)")
    # Urgency, then the action, then the instruments; the outcome's code only after its words.
    assert top(page, ".banner") < top(page, ".tasks") < top(page, ".instrument")
    assert page.locator("main").inner_text().index("Emergency assessment today") < page.locator(
        "main").inner_text().index("emergency-assessment")
    flags = page.locator(".instrument", has=page.get_by_role("heading", name="Red flags for serious spinal pathology"))
    expect(flags.get_by_role("row", name="Saddle numbness or tingling present")).to_be_visible()
    shot(page, "clinician-emergency")
    accessible(page, "results, emergency")
    one_a4_page(page, "clinician-emergency")


def one_a4_page(page: Page, name: str) -> None:
    """The print view: one A4 page to file or hand over (Chromium's own PDF, its pages counted)."""
    page.emulate_media(media="print")
    pdf = page.pdf(format="A4", print_background=True)
    (ROOT / "tests" / "screenshots" / f"{name}-print.pdf").write_bytes(pdf)
    pages = len(re.findall(rb"/Type\s*/Page(?!s)", pdf))
    assert pages == 1, f"{name}: the print view takes {pages} A4 pages"
    page.emulate_media(media="screen")


def test_b_an_indeterminate_result_says_what_would_decide_it(visit: Visit):
    page = open_results(visit, "/results/qr-indeterminate")
    expect(page.get_by_role("heading", level=1)).to_contain_text(
        "Indeterminate: missing answers could change the decision")
    deciding = page.get_by_role("region", name="Answers that would decide it")
    expect(deciding).to_contain_text("Did your back pain come on gradually")
    spa = page.locator(".instrument", has=page.get_by_role("heading", name="Spondyloarthritis (SpA) features"))
    expect(spa).to_contain_text("0 of 11 met, 8 unknown, 2 not tested")
    expect(spa.get_by_role("row", name="HLA-B27 positive not tested")).to_be_visible()
    expect(spa.get_by_role("row", name="Psoriasis unknown")).to_be_visible()
    assert top(page, ".banner") < top(page, ".deciding") < top(page, ".instrument")
    shot(page, "clinician-indeterminate")
    accessible(page, "results, indeterminate")
    one_a4_page(page, "clinician-indeterminate")


def test_c_an_amended_result_says_so_at_the_top(visit: Visit):
    page = open_results(visit, "/results/qr-amended")
    note = page.get_by_role("note")
    expect(note).to_contain_text("Amended: the patient's answers were changed")
    assert top(page, ".note") < top(page, ".tasks")
    shot(page, "clinician-amended")
    accessible(page, "results, amended")


def test_d_the_index_puts_the_emergency_first_and_opens_it(visit: Visit):
    page = open_results(visit, "/results")
    rows = page.locator("table.index tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.first).to_contain_text("Emergency assessment today")
    expect(rows.first).to_contain_text("Clinical review of red flags (stat)")
    expect(rows.nth(1)).to_contain_text("Indeterminate")
    needs = page.get_by_role("region", name="Needs action now")  # open stat/urgent Tasks, above every page
    expect(needs).to_contain_text("Clinical review of red flags (stat)")
    assert top(page, ".needs-action") < top(page, "table.index")
    shot(page, "clinician-index")
    accessible(page, "results index")
    mine = open_results(visit, "/results?patient=Patient/amended")
    expect(mine.locator("table.index tbody tr")).to_have_count(1)
    expect(mine.locator("table.index tbody tr")).to_contain_text("(amended)")
    page = open_results(visit, "/results?count=1")
    expect(page.locator("table.index tbody tr")).to_have_count(1)
    page.get_by_role("link", name="Older results").click()
    expect(page.locator("table.index tbody tr")).to_have_count(1)
    page = open_results(visit, "/results")
    page.get_by_role("link", name="Emergency assessment today").click()
    expect(page).to_have_url(f"{visit.service.url}/results/qr-emergency")


def test_e_an_unknown_result_is_the_results_404_not_the_forms(visit: Visit):
    page = visit.page
    page.set_viewport_size(DESK)
    answer = page.goto("/results/never-sent")
    assert answer is not None and answer.status == 404
    expect(page.get_by_role("heading", level=1)).to_have_text("Result not found")
    expect(page.get_by_text("Please check your answers")).to_have_count(0)
    answer = page.goto("/results/qr-emergency?access=expired-or-forged")
    assert answer is not None and answer.status == 403
    expect(page.get_by_role("heading", level=1)).to_have_text("You cannot open this result")
    shot(page, "clinician-403")
    accessible(page, "results, 403")
    # Chromium logs a failed status as a console error: these two were the point of the test.
    expected = ("status of 404 (Not Found) (", "status of 403 (Forbidden) (")
    visit.errors[:] = [e for e in visit.errors if not any(x in e for x in expected)]
