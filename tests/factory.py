"""Builds QuestionnaireResponses from flat answers, nested as the Questionnaire nests them."""

from __future__ import annotations

from functools import cache
from typing import Any

from plugin.screening import data, systems

SCREENING = "https://backpain-screen.org/fhir/Questionnaire/back-pain-screening"
BASDAI = "https://backpain-screen.org/fhir/Questionnaire/basdai"


# The version a response names unless a test says otherwise. The hand-worked cases and most tests
# were written for screening 1.0.0 (nine red flags), which stays published and scorable; 1.1.0
# cases name their version.
V1_0, V1_1 = "1.0.0", "1.1.0"
DEFAULT_VERSION = V1_0


@cache
def questionnaire(url: str, version: str | None = None) -> dict:
    wanted = version or (DEFAULT_VERSION if url == SCREENING else None)
    return next(q for q in data.definitions("Questionnaire") if q["url"] == url and wanted in (None, q["version"]))


def item_types(url: str = SCREENING, version: str | None = None) -> dict[str, str]:
    """linkId -> item type, for answerable items."""
    found: dict[str, str] = {}

    def walk(items: list[dict]) -> None:
        for item in items:
            if item["type"] != "group":
                found[item["linkId"]] = item["type"]
            walk(item.get("item", []))

    walk(questionnaire(url, version)["item"])
    return found


def answer(item_type: str, value: Any) -> dict:
    if item_type == "choice":
        return {"valueCoding": {"system": systems.ANSWERS, "code": value}}
    key = {"boolean": "valueBoolean", "integer": "valueInteger", "decimal": "valueDecimal"}[item_type]
    return {key: value}


def response(answers: dict[str, Any], url: str = SCREENING, status: str = "completed", version: str | None = None,
             **extra: Any) -> dict:
    """A QR answering `answers` (linkId -> value; None or absent = unanswered), naming its version."""

    def walk(items: list[dict]) -> list[dict]:
        out = []
        for item in items:
            if item["type"] == "group":
                children = walk(item.get("item", []))
                if children:
                    out.append({"linkId": item["linkId"], "item": children})
            elif answers.get(item["linkId"]) is not None:
                out.append({"linkId": item["linkId"], "answer": [answer(item["type"], answers[item["linkId"]])]})
        return out

    qr = {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": f"{url}|{questionnaire(url, version)['version']}",
        "status": status,
        "subject": {"reference": "Patient/example"},
        "authored": "2026-11-20T09:30:00Z",
        "item": walk(questionnaire(url, version)["item"]),
    }
    qr.update(extra)
    return qr


def drop_disabled(answers: dict[str, Any], items: dict) -> dict[str, Any]:
    """Leaves out answers whose enableWhen the other answers switch off (as renderers do)."""
    from plugin.screening.checking import is_enabled

    while disabled := [k for k in answers if items[k].enable_when and not is_enabled(items[k], answers)]:
        for link_id in disabled:
            del answers[link_id]
    return answers
