"""The patient form: a Questionnaire as fields to render, and submitted fields back as a QuestionnaireResponse.

Pure functions, so the page handlers stay thin. The form follows the
served Questionnaire (its groups, items, bounds and enableWhen) with two
rules of its own: the red-flag group comes first (screening 1.1.0 puts it
there; an older version is reordered, so the urgent questions are never
last), and the clinician group is left out of a patient's form (a
clinician's form keeps it). Answers to items that their enableWhen
disables are dropped here (a browser without JavaScript shows every
question), so the checker never refuses a form for them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
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
RED_FLAG_GROUP = "red-flags"  # the groups' linkIds are public contract (SCREENING.md §1)
CLINICIAN_GROUP = "clinician"
FORM_SYSTEM = "https://backpain-screen.org/fhir/sid/form-submission"  # one identifier per opened form


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
    urgency: str | None = None  # a red flag's: "emergency" or "urgent" when answered Yes
    part: int = 0  # a group's place among the form's parts ("Part 2 of 4")
    parts: int = 0
    intro: str | None = None  # a group's text after its first sentence: its heading stays short

    @property
    def invalid_message(self) -> str:
        """What the page says beside the field when its answer cannot be taken (browser and server alike)."""
        if self.type in ("integer", "decimal"):
            kind = "a whole number" if self.type == "integer" else "a number"
            unit = f" {self.unit}" if self.unit else ""
            if self.minimum is not None and self.maximum is not None:
                return f"Enter {kind} from {self.minimum} to {self.maximum}{unit}, or leave it empty."
            return f"Enter {kind}{unit}, or leave it empty."
        return "Choose one of the answers shown, or leave it empty."


def fields(questionnaire: dict, *, clinician: bool = False, urgency: Mapping[str, str] | None = None
           ) -> tuple[Field, ...]:
    """The form's fields: red flags first, the clinician group only for a clinician, each group numbered."""
    items = [i for i in questionnaire.get("item", []) if clinician or i["linkId"] != CLINICIAN_GROUP]
    items.sort(key=lambda item: item["linkId"] != RED_FLAG_GROUP)  # stable: the rest keep their order
    built = [_field(item, urgency or {}) for item in items]
    parts = len([f for f in built if f.type == "group"])
    numbered, part = [], 0
    for f in built:
        if f.type == "group":
            part += 1
            f = replace(f, part=part, parts=parts)
        numbered.append(f)
    return tuple(numbered)


def walk(found: tuple[Field, ...]) -> Iterator[Field]:
    for f in found:
        yield f
        yield from walk(f.children)


def _field(item: dict, urgency: Mapping[str, str]) -> Field:
    extensions = {e["url"]: e for e in item.get("extension", [])}
    kind = item["type"]
    options: tuple[tuple[str, str], ...] = BOOLEAN_OPTIONS if kind == "boolean" else tuple(
        (o["valueCoding"]["code"], o["valueCoding"].get("display", o["valueCoding"]["code"]))
        for o in item.get("answerOption", []))
    conditions = [{"question": w.question, "operator": w.operator, "answer": w.answer}
                  for w in map(enable_when, item.get("enableWhen", []))]
    text, intro = item.get("text", ""), None
    if kind == "group" and ". " in text:
        heading, _, intro = text.partition(". ")
        text = heading + "."
    return Field(
        link_id=item["linkId"], text=text, intro=intro, type=kind, options=options,
        minimum=bound(extensions.get(MIN_VALUE)), maximum=bound(extensions.get(MAX_VALUE)),
        unit=(extensions.get(UNIT) or {}).get("valueCoding", {}).get("display"),
        hint=(extensions.get(ENTRY_FORMAT) or {}).get("valueString"),
        enable_when=orjson.dumps(conditions).decode() if conditions else None,
        enable_all=item.get("enableBehavior", "all") == "all",
        children=tuple(_field(child, urgency) for child in item.get("item", [])),
        urgency=urgency.get(item["linkId"]),
    )


def problems(shown: tuple[Field, ...], compiled: CompiledQuestionnaire, submitted: Mapping[str, str]
             ) -> dict[str, str]:
    """The answers that cannot be taken ("abc" or 200 for an age), by linkId, with what to put right.

    Nothing is silently dropped: the form is shown again with these messages
    beside their fields (the same words the browser shows before sending).
    """
    by_id = {f.link_id: f for f in walk(shown)}
    found = {}
    for link_id, raw in submitted.items():
        spec = compiled.items.get(link_id)
        if link_id not in by_id or spec is None or not spec.answer_key or not raw.strip():
            continue
        if spec.accept and spec.accept(_as_answer(spec, _value(spec.type, raw))) is SLOW:
            found[link_id] = by_id[link_id].invalid_message
    return found


def response(questionnaire: dict, compiled: CompiledQuestionnaire, shown: tuple[Field, ...],
             submitted: Mapping[str, str], subject: str | None, now: datetime, *,
             status: str = "completed", form_id: str | None = None) -> dict:
    """A QuestionnaireResponse from the submitted fields (linkId -> raw value).

    Only fields the form showed count (a patient's form cannot answer the
    clinician's questions), and only answers `problems` takes. `form_id`
    (the opened form's own id) becomes the response's identifier, so a form
    sent twice, or first in part and then in full, is one response.
    """
    showable = {f.link_id for f in walk(shown)}
    facts = {}
    for link_id, raw in submitted.items():
        spec = compiled.items.get(link_id)
        if link_id not in showable or spec is None or not spec.answer_key or not raw.strip():
            continue
        value = _value(spec.type, raw)
        if not spec.accept or spec.accept(_as_answer(spec, value)) is not SLOW:
            facts[link_id] = value
    facts = {k: v for k, v in facts.items() if is_enabled(compiled.items[k], facts)}
    qr: dict[str, Any] = {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": f"{questionnaire['url']}|{questionnaire['version']}",
        "status": status,
        "authored": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    items = _items(questionnaire.get("item", []), compiled, facts)
    if items:  # FHIR has no empty arrays
        qr["item"] = items
    if form_id:
        qr["identifier"] = {"system": FORM_SYSTEM, "value": form_id}
    if subject:
        qr["subject"] = {"reference": subject}
    return qr


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
