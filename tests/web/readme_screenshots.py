"""The README's pictures of each page: `python -m tests.web.readme_screenshots` (writes docs/screenshots/*.png).

Small on purpose (CSS pixels, the top of each page): they show what a patient
and a clinician see first. The service runs as in the browser tests, on its
own embedded store, with the example responses sent in through the API.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

from tests.web.browser import ROOT, running_service

OUT = ROOT / "docs" / "screenshots"
PHONE = {"width": 390, "height": 760}
DESK = {"width": 1100, "height": 760}


def send(url: str, name: str) -> None:
    body = (ROOT / "questionnaires" / "examples" / name).read_bytes()
    answer = httpx.post(f"{url}/QuestionnaireResponse", content=body,
                        headers={"Content-Type": "application/fhir+json"}, timeout=30)
    answer.raise_for_status()


def picture(page: Page, name: str) -> None:
    page.screenshot(path=OUT / f"{name}.png", scale="css")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as where, running_service(Path(where)) as service, sync_playwright() as p:
        for name in ("qr-emergency.json", "qr-indeterminate.json", "qr-refer-asas.json"):
            send(service.url, name)
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        phone = browser.new_page(viewport=PHONE, base_url=service.url)
        phone.goto("/?patient=Patient/example")
        picture(phone, "patient-form")
        phone.locator("#q-rf-saddle-numbness").get_by_role("radio", name="Yes").check()
        phone.locator("#flag-advice [data-progress-status]:visible").filter(has_text="sent").wait_for()
        phone.locator("#flag-advice").scroll_into_view_if_needed()
        picture(phone, "patient-red-flag-advice")
        phone.get_by_role("button", name="Send my answers").click()
        phone.wait_for_url("**/form")
        picture(phone, "patient-result")
        desk = browser.new_page(viewport=DESK, base_url=service.url)
        for path, name in (("/results/qr-emergency", "clinician-emergency"),
                           ("/results/qr-indeterminate", "clinician-indeterminate"), ("/results", "clinician-index")):
            desk.goto(path)
            picture(desk, name)
        browser.close()


if __name__ == "__main__":
    main()
