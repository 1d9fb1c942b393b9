"""A Questionnaire compiled once into what checking a response needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# FHIR item type -> the answer[x] key it takes and the Python type of its value.
ANSWER_KEYS: dict[str, tuple[str, type]] = {
    "boolean": ("valueBoolean", bool),
    "integer": ("valueInteger", int),
    "decimal": ("valueDecimal", float),
    "string": ("valueString", str),
    "text": ("valueString", str),
    "choice": ("valueCoding", str),
}
MIN_VALUE = "http://hl7.org/fhir/StructureDefinition/minValue"
MAX_VALUE = "http://hl7.org/fhir/StructureDefinition/maxValue"
SLOW = object()  # "this answer needs the careful check", returned by an ItemSpec's `accept`


@dataclass(frozen=True, slots=True)
class EnableWhen:
    question: str
    operator: str
    answer: Any


@dataclass(frozen=True, slots=True)
class ItemSpec:
    link_id: str
    type: str
    parent: str | None
    code: dict | None = None  # the item's first item.code Coding
    repeats: bool = False
    answer_key: str | None = None  # None for groups and display items
    codes: dict[str, str] | None = None  # choice code -> its system
    minimum: int | float | None = None
    maximum: int | float | None = None
    enable_when: tuple[EnableWhen, ...] = ()
    enable_all: bool = True  # enableBehavior: all (default) or any
    accept: Callable[[Any], Any] | None = None  # value[x] -> the fact, or SLOW; for the hot path

    @classmethod
    def make(cls, **fields: Any) -> ItemSpec:
        spec = cls(**fields)
        object.__setattr__(spec, "accept", _acceptor(spec))
        return spec

    @property
    def value_type(self) -> type | None:
        return ANSWER_KEYS[self.type][1] if self.type in ANSWER_KEYS else None


@dataclass(frozen=True, slots=True)
class CompiledQuestionnaire:
    url: str
    version: str
    items: dict[str, ItemSpec]
    conditional: tuple[ItemSpec, ...]  # the items that have an enableWhen
    # linkId -> (parent, answer key or None for a group, accept or None for a boolean): the checker's hot path
    quick: dict[str, tuple]

    def answerable(self) -> dict[str, ItemSpec]:
        return {k: v for k, v in self.items.items() if v.answer_key}


def compile_questionnaire(resource: dict) -> CompiledQuestionnaire:
    items: dict[str, ItemSpec] = {}
    _walk(resource.get("item", []), None, items)
    conditional = tuple(spec for spec in items.values() if spec.enable_when)
    quick = {k: (v.parent, v.answer_key, None if v.type == "boolean" else v.accept)
             for k, v in items.items() if v.accept or v.type == "group"}
    return CompiledQuestionnaire(resource["url"], resource["version"], items, conditional, quick)


def _walk(raw_items: list[dict], parent: str | None, out: dict[str, ItemSpec]) -> None:
    for raw in raw_items:
        link_id, kind = raw["linkId"], raw["type"]
        if link_id in out:
            raise ValueError(f"duplicate linkId {link_id!r} in Questionnaire")
        if kind not in ANSWER_KEYS and kind not in ("group", "display"):
            raise ValueError(f"item {link_id!r}: type {kind!r} is not supported")
        _walk(raw.get("item", []), link_id, out)
        extensions = {e["url"]: e for e in raw.get("extension", [])}
        out[link_id] = ItemSpec.make(
            link_id=link_id,
            type=kind,
            parent=parent,
            code=(raw.get("code") or [None])[0],
            repeats=raw.get("repeats", False),
            answer_key=ANSWER_KEYS[kind][0] if kind in ANSWER_KEYS else None,
            codes=_codes(raw) if kind == "choice" else None,
            minimum=bound(extensions.get(MIN_VALUE)),
            maximum=bound(extensions.get(MAX_VALUE)),
            enable_when=tuple(enable_when(e) for e in raw.get("enableWhen", [])),
            enable_all=raw.get("enableBehavior", "all") == "all",
        )


def _acceptor(spec: ItemSpec) -> Callable[[Any], Any] | None:
    """A quick test that takes only plainly valid values; the checker explains the rest."""
    low = float("-inf") if spec.minimum is None else spec.minimum
    high = float("inf") if spec.maximum is None else spec.maximum
    if spec.type == "boolean":
        return lambda v: v if v is True or v is False else SLOW
    if spec.type == "integer":
        return lambda v: v if type(v) is int and low <= v <= high else SLOW
    if spec.type == "decimal":
        return lambda v: v if type(v) in (int, float) and low <= v <= high else SLOW
    if spec.type in ("string", "text"):
        return lambda v: v if type(v) is str and v else SLOW
    if spec.type == "choice":
        codes = spec.codes or {}

        def choice(v: Any) -> Any:
            code = v.get("code") if type(v) is dict else None
            if type(code) is str and code in codes and v.get("system", codes[code]) == codes[code]:
                return code
            return SLOW

        return choice
    return None


def _codes(raw: dict) -> dict[str, str]:
    return {o["valueCoding"]["code"]: o["valueCoding"].get("system", "") for o in raw.get("answerOption", [])}


def bound(extension: dict | None) -> int | float | None:
    if extension is None:
        return None
    return extension.get("valueInteger", extension.get("valueDecimal"))


def enable_when(raw: dict) -> EnableWhen:
    (key, value), = ((k, v) for k, v in raw.items() if k.startswith("answer"))
    if key == "answerCoding":
        value = value["code"]
    return EnableWhen(raw["question"], raw["operator"], value)
