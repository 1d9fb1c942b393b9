"""The patient form: a Questionnaire as fields to render, and submitted fields back as a QuestionnaireResponse.

Pure functions, so the page handlers stay thin. Answers to items that
their enableWhen disables are dropped here (a browser without JavaScript
shows every question), so the checker never refuses a form for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from plugin.screening.checking import is_enabled
from plugin.screening.questionnaire import (
    MAX_VALUE,
    MIN_VALUE,
    SLOW,
    CompiledQuestionnaire,
    ItemSpec,
    bound,
    enable_when,
)

UNIT = "http://hl7.org/fhir/StructureDefinition/questionnaire-unit"
ENTRY_FORMAT = "http://hl7.org/fhir/StructureDefinition/entryFormat"
BOOLEAN_OPTIONS = (("true", "Yes"), ("false", "No"))


@dataclass(frozen=True, slots=True)
class Field:
    """One item as the template draws it."""

    link_id: str
    text: str
    type: str  # group, choice, boolean, integer, decimal, string, display
    options: tuple[tuple[str, str], ...] = ()  # (value, label) for choice and boolean
    minimum: int | float | None = None
    maximum: int | float | None = None
    unit: str | None = None
    hint: str | None = None
    enable_when: str | None = None  # JSON for the page's script: [{question, operator, answer}]
    enable_all: bool = True
    children: tuple[Field, ...] = ()


def fields(questionnaire: dict) -> tuple[Field, ...]:
    return tuple(_field(item) for item in questionnaire.get("item", []))


def _field(item: dict) -> Field:
    extensions = {e["url"]: e for e in item.get("extension", [])}
    kind = item["type"]
    options: tuple[tuple[str, str], ...] = BOOLEAN_OPTIONS if kind == "boolean" else tuple(
        (o["valueCoding"]["code"], o["valueCoding"].get("display", o["valueCoding"]["code"]))
        for o in item.get("answerOption", []))
    conditions = [{"question": w.question, "operator": w.operator, "answer": w.answer}
                  for w in map(enable_when, item.get("enableWhen", []))]
    return Field(
        link_id=item["linkId"], text=item.get("text", ""), type=kind, options=options,
        minimum=bound(extensions.get(MIN_VALUE)), maximum=bound(extensions.get(MAX_VALUE)),
        unit=(extensions.get(UNIT) or {}).get("valueCoding", {}).get("display"),
        hint=(extensions.get(ENTRY_FORMAT) or {}).get("valueString"),
        enable_when=orjson.dumps(conditions).decode() if conditions else None,
        enable_all=item.get("enableBehavior", "all") == "all",
        children=tuple(_field(child) for child in item.get("item", [])),
    )


def response(questionnaire: dict, compiled: CompiledQuestionnaire, submitted: Mapping[str, str],
             subject: str | None, now: datetime) -> tuple[dict, list[str]]:
    """A completed QuestionnaireResponse from the submitted fields (linkId -> raw value), and the
    linkIds of answers that could not be read ("abc" or 300 for an age).

    Those are left out, as if unanswered, rather than refusing the form: the
    other answers are still scored, so an emergency red flag is never hidden
    behind a typing slip (a missing answer can only make a result "unknown").
    """
    facts, unreadable = {}, []
    for link_id, raw in submitted.items():
        spec = compiled.items.get(link_id)
        if spec is None or not spec.answer_key or not raw.strip():
            continue
        value = _value(spec.type, raw)
        if spec.accept and spec.accept(_as_answer(spec, value)) is SLOW:
            unreadable.append(link_id)
        else:
            facts[link_id] = value
    facts = {k: v for k, v in facts.items() if is_enabled(compiled.items[k], facts)}
    qr: dict[str, Any] = {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": f"{questionnaire['url']}|{questionnaire['version']}",
        "status": "completed",
        "authored": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "item": _items(questionnaire.get("item", []), compiled, facts),
    }
    if subject:
        qr["subject"] = {"reference": subject}
    return qr, unreadable


def texts(questionnaire: dict) -> dict[str, str]:
    """Each item's question, by linkId."""
    found: dict[str, str] = {}
    stack = list(questionnaire.get("item", []))
    while stack:
        item = stack.pop()
        found[item["linkId"]] = item.get("text", item["linkId"])
        stack.extend(item.get("item", []))
    return found


def _as_answer(spec: ItemSpec, value: Any) -> Any:
    """The value as the item's answer[x] carries it (a Coding for a choice), for the item's own test."""
    if spec.type == "choice":
        return {"code": value, "system": (spec.codes or {}).get(value, "")} if isinstance(value, str) else value
    return value


def _items(items: list[dict], compiled: CompiledQuestionnaire, facts: dict[str, Any]) -> list[dict]:
    out = []
    for item in items:
        link_id = item["linkId"]
        if item["type"] == "group":
            children = _items(item.get("item", []), compiled, facts)
            if children:
                out.append({"linkId": link_id, "item": children})
        elif link_id in facts:
            spec = compiled.items[link_id]
            out.append({"linkId": link_id, "answer": [{spec.answer_key: _as_answer(spec, facts[link_id])}]})
    return out


def _value(kind: str, raw: str) -> Any:
    raw = raw.strip()
    try:
        if kind == "boolean":
            return {"true": True, "false": False}.get(raw, raw)
        if kind == "integer":
            return int(raw)
        if kind == "decimal":
            return float(raw)
    except ValueError:
        return raw
    return raw
