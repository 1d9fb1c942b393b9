"""The patient form in a real browser: Debian's Chromium driven by Playwright, at a phone's size.

The service runs as a user runs it (`python -m plugin.jobs.cli serve`, a subprocess on
a free port). The test answers the form by the questions' visible wording, as a
screen reader would find them (`get_by_label`, radios by role within the
question's fieldset), so a missing or wrong label fails here. Every page must
load nothing from another host and log no console error (a Content Security
Policy violation would). Screenshots of each filled form and result page are kept
in tests/screenshots/ (not in git) for a human to look at. axe-core (npm, tests/web/axe/) checks
every page and state against WCAG 2.1 A and AA: no serious or critical violation.

The service, the browser and axe-core are tests/web/browser.py's (fixtures in tests/web/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qsl

import orjson
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.web.browser import PHONE, ROOT, Visit, accessible, shot, stored_responses, top

QUESTIONNAIRE = orjson.loads((ROOT / "questionnaires" / "back-pain-screening.json").read_bytes())
REFER_EXAMPLE = orjson.loads((ROOT / "questionnaires" / "examples" / "qr-refer-asas.json").read_bytes())
# Roles of the AX tree that are form controls: each must have a name a screen reader can say.
CONTROL_ROLES = {"radio", "spinbutton", "textbox", "checkbox", "combobox", "button"}


def _items(items: list[dict]) -> Iterator[dict]:
    for item in items:
        yield item
        yield from _items(item.get("item", []))


ITEMS = {item["linkId"]: item for item in _items(QUESTIONNAIRE["item"])}
# A patient's form leaves out the clinician group (test results), which a clinician's form keeps.
PATIENT_ITEMS = {link_id for group in QUESTIONNAIRE["item"] if group["linkId"] != "clinician"
                 for link_id in [group["linkId"], *(i["linkId"] for i in _items(group.get("item", [])))]}


def text(link_id: str) -> str:
    return ITEMS[link_id]["text"]


def choice_label(link_id: str, code: str) -> str:
    return next(o["valueCoding"]["display"] for o in ITEMS[link_id]["answerOption"] if o["valueCoding"]["code"] == code)


# --- acting like a user -------------------------------------------------------------------------------------------

def open_form(visit: Visit, query: str = "") -> Page:
    page = visit.page
    response = page.goto(f"/{query}")
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
    shot(page, f"{name}-form")
    with page.expect_response(f"{visit.service.url}/form") as sent:
        page.get_by_role("button", name="Send my answers").click()
    page.wait_for_load_state()
    expect(page).to_have_url(f"{visit.service.url}/form")
    if sent.value.status != 200:
        pytest.fail(f"the form was answered with {sent.value.status}: {page.locator('main').inner_text()}\n"
                    f"The service's log:\n{visit.service.said()}")
    shot(page, f"{name}-result")
    accessible(page, f"{name}: result")
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
    answer(page, {k: v for k, v in {**new_flags, **answers_of(REFER_EXAMPLE)}.items() if k in PATIENT_ITEMS})
    accessible(page, "form, answered")
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
    # The heading's name, as a screen reader says it (the icon beside it is aria-hidden).
    expect(alert.get_by_role("heading", level=1, name="Seek urgent care now", exact=True)).to_be_visible()
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
        if link_id not in PATIENT_ITEMS:
            continue
        if item["type"] in ("choice", "boolean"):
            assert item["text"] in groups, f"{link_id}: its radios are not grouped under the question's wording"
        elif item["type"] in ("integer", "decimal", "string"):
            expect(page.get_by_label(item["text"], exact=True)).to_have_attribute("name", link_id)


# --- safety first: red flags, stopping early, typing slips, sending twice ------------------------------------------

RED_FLAGS = [i["linkId"] for g in QUESTIONNAIRE["item"] if g["linkId"] == "red-flags" for i in g["item"]]


def test_e_red_flag_on_a_phone_gets_advice_at_once_then_a_result_sent_once(visit: Visit):
    """Red flags come first; a Yes shows the emergency advice before the rest of the form and saves the answers
    so far; the finished form, double-clicked, is one response; 'fill in again' keeps the patient's link."""
    patient = "Patient/browser-emergency"
    page = open_form(visit, f"?patient={patient}")
    expect(page.locator("fieldset.group").first).to_have_attribute("id", "group-red-flags")
    expect(page.locator("#group-red-flags legend").first).to_contain_text("Part 1 of 3")
    expect(page.get_by_text(text("hla-b27"))).to_have_count(0)  # the clinician's questions are not the patient's
    expect(page.get_by_role("button", name="Send these answers now")).to_have_count(0)  # the script does it
    accessible(page, "form, empty")

    yes_no(page, "rf-bladder-bowel", True)
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Seek urgent care now")
    expect(alert).to_contain_text("emergency department")
    assert top(page, "#flag-advice") < top(page, "#group-pain"), "the advice must come before the rest of the form"
    expect(alert).to_contain_text("Your answers so far have been sent to your care team.")
    shot(page, "red-flag-advice")
    accessible(page, "form, red-flag advice")
    (saved,) = stored_responses(visit.service)
    assert saved["status"] == "in-progress" and saved["subject"]["reference"] == patient
    assert answers_of(saved) == {"rf-bladder-bowel": True}

    answer(page, {**{link_id: False for link_id in RED_FLAGS if link_id != "rf-bladder-bowel"},
                  "pain-duration": "lt-6w"})
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" and r.url.endswith("/form") else None)
    with page.expect_navigation():
        page.get_by_role("button", name="Send my answers").dblclick()
    expect(page.get_by_role("alert").get_by_role("heading", level=1)).to_contain_text("Seek urgent care now")
    expect(page.get_by_role("heading", name="When to get help straight away")).to_be_visible()
    expect(page.get_by_text("Your answers have been sent to your care team.")).to_be_visible()
    shot(page, "red-flag-result")
    accessible(page, "result, emergency")
    assert len(posts) == 1, f"the form was sent {len(posts)} times"
    (final,) = stored_responses(visit.service)  # the same response, now finished: not a second one
    assert final["status"] == "completed" and final["identifier"] == saved["identifier"]
    page.get_by_role("link", name="Fill in the form again").click()
    expect(page).to_have_url(f"{visit.service.url}/?patient={patient.replace('/', '%2F')}")
    expect(page.locator('input[name="patient"]')).to_have_value(patient)


def test_f_a_patient_who_stops_after_the_red_flags_is_still_heard(visit: Visit):
    """An urgent flag, then the page is closed: the answers so far are stored, and the advice was on screen."""
    patient = "Patient/browser-stops"
    page = open_form(visit, f"?patient={patient}")
    answer(page, {**{link_id: False for link_id in RED_FLAGS}, "rf-fever": True})
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Contact a doctor today")
    expect(alert).not_to_contain_text("Seek urgent care now")
    expect(alert).to_contain_text("Your answers so far have been sent to your care team.")
    shot(page, "stopped-after-red-flags")
    with page.expect_response(f"{visit.service.url}/form/progress"):  # a change of mind is sent as well
        yes_no(page, "rf-fever", False)
    mine = [r for r in stored_responses(visit.service) if r["subject"]["reference"] == patient]
    assert answers_of(mine[0])["rf-fever"] is False
    expect(page.locator("#flag-advice")).to_be_hidden()
    with page.expect_response(f"{visit.service.url}/form/progress"):
        yes_no(page, "rf-fever", True)
    page.close()
    mine = [r for r in stored_responses(visit.service) if r["subject"]["reference"] == patient]
    assert len(mine) == 1 and mine[0]["status"] == "in-progress"
    assert answers_of(mine[0]) == {**{link_id: False for link_id in RED_FLAGS}, "rf-fever": True}


def test_g_an_age_of_200_is_refused_beside_the_field_by_browser_and_server(visit: Visit, browser: Browser):
    message = "Enter a whole number from 0 to 120 years, or leave it empty."
    page = open_form(visit)
    answer(page, {"rf-saddle-numbness": False, "pain-duration": "1y-5y"})
    enter(page, "onset-age", 200)
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if r.method == "POST" else None)
    page.get_by_role("button", name="Send my answers").click()
    field = page.locator("#q-onset-age")
    expect(field.get_by_text(message)).to_be_visible()
    expect(page.get_by_label(text("onset-age"), exact=True)).to_be_focused()
    expect(page.get_by_label(text("onset-age"), exact=True)).to_have_attribute("aria-invalid", "true")
    assert not sent, "a form with an age of 200 was sent"
    shot(page, "age-200-browser")
    accessible(page, "form, age error (browser)")

    # The same, with the browser's checks out of the way (no script): the server refuses it in the same words.
    context = browser.new_context(**PHONE, base_url=visit.service.url, java_script_enabled=False)
    try:
        bare = context.new_page()
        bare.goto("/")
        yes_no(bare, "rf-saddle-numbness", True)
        enter(bare, "onset-age", 200)
        with bare.expect_response(f"{visit.service.url}/form") as answered:
            bare.get_by_role("button", name="Send my answers").click()
        assert answered.value.status == 400
        expect(bare.locator("#q-onset-age").get_by_text(message)).to_be_visible()
        expect(bare.get_by_label(text("onset-age"), exact=True)).to_have_value("200")  # kept, to be corrected
        headings = bare.locator("h2").all_inner_texts()
        assert headings.index(next(h for h in headings if "Seek urgent care now" in h)) < headings.index(
            "Please check this answer"), headings  # the emergency before the typing slip
        shot(bare, "age-200-server")
    finally:
        context.close()


def test_h_a_result_never_reassures_about_unanswered_red_flags(visit: Visit):
    page = open_form(visit)
    answer(page, {"rf-saddle-numbness": False, "rf-bladder-bowel": False, "pain-duration": "lt-6w"})
    send(visit, "unanswered-red-flags")
    unanswered = page.get_by_role("region", name="Questions about warning signs you did not answer")
    for link_id in RED_FLAGS[2:]:
        expect(unanswered).to_contain_text(text(link_id))
    expect(unanswered).not_to_contain_text(text("rf-saddle-numbness"))
    expect(page.get_by_text("No signs of inflammatory back pain")).to_have_count(0)
    expect(page.locator("section.result")).to_have_class("result unknown")  # amber, never the all-clear green
    expect(page.get_by_role("heading", name="When to get help straight away")).to_be_visible()


def test_i_keyboard_only_reaches_a_red_flag_and_gets_the_advice(visit: Visit):
    """No mouse: Tab to the first question, arrow keys and Space to answer Yes; the advice appears, and the
    focus is where the patient left it (on the answer), not thrown elsewhere."""
    page = open_form(visit)
    first = question(page, RED_FLAGS[0]).get_by_role("radio", name="Yes", exact=True)
    for _ in range(10):
        page.keyboard.press("Tab")
        if first.evaluate("e => e === document.activeElement"):
            break
    else:
        pytest.fail("Tab never reached the first red-flag question")
    page.keyboard.press("Space")
    expect(first).to_be_checked()
    expect(page.get_by_role("alert")).to_contain_text("Seek urgent care now")
    expect(first).to_be_focused()
    shot(page, "keyboard-red-flag")
