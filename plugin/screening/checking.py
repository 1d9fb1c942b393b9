"""Checks a QuestionnaireResponse against its compiled Questionnaire.

One pass over the items both checks them and collects the answers
(`facts`: linkId -> value). Every problem is reported at once, each with a
FHIRPath `expression` pointing at the item. What real renderers send is
accepted: unanswered and disabled items left out (NLM LHC-Forms), the
question `text` repeated, groups that carry only their children.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from plugin.screening.modifiers import modifier_issues
from plugin.screening.outcome import InvalidInput, Issue, model_issue
from plugin.screening.questionnaire import SLOW, CompiledQuestionnaire, EnableWhen, ItemSpec
from plugin.screening.references import ACCEPTED_FORMS, patient_of, valid_id
from plugin.screening.timeline import on_timeline

STATUSES = frozenset({"in-progress", "completed", "amended", "entered-in-error", "stopped"})
MAX_ITEMS = 1000  # the screening has ~40 items; far more is a wrong or hostile body
MAX_ISSUES = 100
DATETIME = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?"
)
ROOT = "QuestionnaireResponse"
URI = re.compile(r"\S+")  # FHIR's uri: no whitespace (a space would break every search on the identifier)
Catalog = Mapping[str, Mapping[str, CompiledQuestionnaire]]  # url -> version -> Questionnaire
# The top-level elements of an R4 QuestionnaireResponse and their JSON shape: the response
# is written back as it came, so a wrong shape here would fail the whole transaction later.
# (object = checked more closely on its own below).
ELEMENTS: dict[str, type] = {
    "meta": dict, "implicitRules": str, "language": str, "text": dict, "contained": list, "extension": list,
    "modifierExtension": list, "identifier": dict, "basedOn": list, "partOf": list, "author": dict,
    "source": dict, **dict.fromkeys(
        ("resourceType", "id", "questionnaire", "status", "subject", "encounter", "authored", "item"), object),
}
KIND_NAMES = {str: "string", dict: "object", list: "array"}
ITEM_KEYS = frozenset({"id", "extension", "modifierExtension", "linkId", "definition", "text", "answer", "item",
                       "_linkId", "_definition", "_text"})
FAST_ITEM_KEYS = frozenset({"linkId", "text", "answer"})  # anything else goes the careful way
GROUP_KEYS = frozenset({"linkId", "text", "item"})  # the same for a group
NO_ITEMS: list = []  # a group sent without children (read only)
MODEL_ITEM_KEYS = frozenset({"id", "extension", "_linkId", "_definition", "_text"})  # judged by the R4 model
ANSWER_KEYS = frozenset({"id", "extension", "modifierExtension", "item"})  # beside value[x] and _value[x]
# The JSON shape of the item elements the checker does not read itself (they are written back as they came).
ITEM_SHAPES: dict[str, type] = {"id": str, "definition": str, "text": str, "extension": list,
                                "modifierExtension": list, "_linkId": dict, "_definition": dict, "_text": dict}
# Top-level elements whose contents only a full FHIR model can judge; checked with fhir.resources when present.
MODELLED = frozenset({"meta", "implicitRules", "language", "text", "contained", "extension", "modifierExtension",
                      "identifier", "basedOn", "partOf", "author", "source"})


class _Walk:
    """State of one check: the Questionnaire, what was found, what is wrong."""

    __slots__ = ("bad", "count", "facts", "issues", "q", "seen")

    def __init__(self, q: CompiledQuestionnaire) -> None:
        self.q = q
        self.facts: dict[str, Any] = {}
        self.issues: list[Issue] = []
        self.seen: set[str] = set()
        self.bad: set[str] = set()  # items whose answer was wrong: their enableWhen dependants are not judged
        self.count = 0

    def problem(self, code: str, text: str, where: str) -> None:
        self.issues.append(Issue(code, text, where))


def check_response(
    qr: Any, catalog: Catalog, fhir_base: str | None = None, serialized: bytes | None = None
) -> tuple[CompiledQuestionnaire, dict[str, Any]]:
    """Returns (the Questionnaire, the answers by linkId) or raises InvalidInput with every issue.

    `serialized`: the response as compact JSON, when the caller has it (spares serializing it again).
    """
    if not isinstance(qr, dict):
        raise InvalidInput([Issue("structure", "The body is not a FHIR resource (expected a JSON object).")])
    if qr.get("resourceType") != ROOT:
        got = qr.get("resourceType")
        raise InvalidInput([Issue("invalid", f"Expected a QuestionnaireResponse, got {_name(got)}.", "resourceType")])
    issues = _check_header(qr, fhir_base) + modifier_issues(qr, ROOT, serialized)
    q = _find_questionnaire(qr.get("questionnaire"), catalog, issues)
    if q is None:
        raise InvalidInput(issues)
    walk = _Walk(q)
    items = qr.get("item", [])
    if isinstance(items, list):
        _check_items(walk, items, None, ROOT)
    else:
        walk.problem("structure", "item must be a list.", f"{ROOT}.item")
    if len(walk.issues) < MAX_ISSUES:
        _check_enabled(walk, qr)  # on the answers that passed, so every problem shows at once
    elif count_items(items, MAX_ITEMS + 1) > MAX_ITEMS:
        walk.issues.insert(0, Issue("too-costly", f"More than {MAX_ITEMS} items: not a response to this form.",
                                    f"{ROOT}.item"))
    issues += walk.issues
    if issues:
        raise InvalidInput(issues[:MAX_ISSUES])
    return q, walk.facts


def count_items(items: Any, limit: int) -> int:
    """How many items there are, counting no further than `limit` (only asked once things look wrong)."""
    seen, stack = 0, [items]
    while stack and seen < limit:
        level = stack.pop()
        if isinstance(level, list):
            for item in level:
                seen += 1
                if isinstance(item, dict):
                    stack.append(item.get("item"))
    return seen


def _name(value: Any) -> str:
    return repr(value) if isinstance(value, str) and len(value) < 60 else "something else"


def _check_header(qr: dict, fhir_base: str | None) -> list[Issue]:
    issues = [issue for key, value in qr.items() if (issue := _element_shape(key, value))]
    modelled = {k: v for k, v in qr.items() if k in MODELLED or k.startswith("_")}
    if modelled and not issues:
        issues += _model_issues(modelled)
    status = qr.get("status")
    if status is None:
        issues.append(Issue("required", "status is missing.", f"{ROOT}.status"))
    elif not isinstance(status, str) or status not in STATUSES:
        issues.append(Issue("code-invalid", f"status {_name(status)} is not a QuestionnaireResponse status "
                            f"({', '.join(sorted(STATUSES))}).", f"{ROOT}.status"))
    if qr.get("subject") is None:
        issues.append(Issue("required", "subject is missing: results need the patient they are about.",
                            f"{ROOT}.subject"))
    elif patient_of(qr, fhir_base) is None:
        issues.append(Issue("invalid", f"subject.reference must reference a Patient as {ACCEPTED_FORMS}.",
                            f"{ROOT}.subject.reference"))
    system = _get(qr.get("identifier"), "system")
    if system is not None and not (isinstance(system, str) and URI.fullmatch(system)):
        issues.append(Issue("value", "identifier.system must be a URI, with no spaces.", f"{ROOT}.identifier.system"))
    encounter = qr.get("encounter")
    if encounter is not None and not isinstance(_get(encounter, "reference"), str):
        issues.append(Issue("invalid", "encounter.reference must be a string.", f"{ROOT}.encounter"))
    if "id" in qr and not valid_id(qr["id"]):
        issues.append(Issue("value", "id is not a valid FHIR id.", f"{ROOT}.id"))
    authored = qr.get("authored")
    if authored is not None and not (isinstance(authored, str) and DATETIME.fullmatch(authored)):
        issues.append(Issue("value", "authored is not a valid FHIR dateTime.", f"{ROOT}.authored"))
    elif authored is not None and not on_timeline(authored):
        issues.append(Issue("value", "authored with its time zone falls outside the years 0001-9999 in UTC.",
                            f"{ROOT}.authored"))
    return issues


def _model_issues(elements: dict) -> list[Issue]:
    """What fhir.resources (R4B) finds wrong in the elements the checker does not read itself.

    The rare path (most responses carry none of them), so the model's cost does not matter.
    """
    from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse
    from pydantic import ValidationError

    try:
        QuestionnaireResponse.model_validate({"resourceType": ROOT, "status": "completed", **elements})
    except ValidationError as error:
        return [model_issue(ROOT, e, set(elements)) for e in error.errors()[:MAX_ISSUES]]
    except (ValueError, TypeError, KeyError):  # KeyError: a contained resource of a type R4 does not have
        return [Issue("structure", "Some elements are not valid FHIR R4.", ROOT)]
    return []


def _element_issues(model: str, element: dict) -> list[str]:
    """What fhir.resources (R4B) finds wrong in an item's or answer's elements the checker does not read
    (extensions, ids, primitive extensions): the response is written back as it came, so they must be valid R4.
    The rare path: a plain item or answer has none of them."""
    from fhir.resources.R4B import questionnaireresponse
    from pydantic import ValidationError

    try:
        getattr(questionnaireresponse, model).model_validate(element)
    except ValidationError as error:
        return [f"{'.'.join(str(p) for p in e['loc']) or 'element'}: {str(e['msg']).rstrip('.')}."
                for e in error.errors()[:5]]
    except (ValueError, TypeError, KeyError):
        return ["not valid FHIR R4."]
    return []


def _element_shape(key: str, value: Any) -> Issue | None:
    """A top-level element that R4 does not define, or of the wrong JSON shape."""
    primitive_extension = key.startswith("_") and key[1:] in ELEMENTS
    kind = dict if primitive_extension else ELEMENTS.get(key)
    if kind is None:
        return Issue("structure", f"{_name(key)} is not an element of a QuestionnaireResponse.", ROOT)
    if not isinstance(value, kind):
        return Issue("structure", f"{key} must be a JSON {KIND_NAMES[kind]}.", f"{ROOT}.{key}")
    return None


def _get(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, dict) else None


def _find_questionnaire(
    canonical: Any, catalog: Catalog, issues: list[Issue]
) -> CompiledQuestionnaire | None:
    where = f"{ROOT}.questionnaire"
    if canonical is None:
        issues.append(Issue("required", "questionnaire is missing: say which Questionnaire was answered.", where))
        return None
    if not isinstance(canonical, str):
        issues.append(Issue("structure", "questionnaire must be a canonical URL string.", where))
        return None
    url, _, version = canonical.partition("|")
    versions = catalog.get(url)
    if versions is None:
        known = ", ".join(sorted(catalog))
        issues.append(Issue("not-supported", f"Questionnaire {_name(url)} is not one this plugin scores "
                            f"(it scores {known}).", where))
        return None
    if version and version not in versions:
        issues.append(Issue("not-supported", f"Questionnaire version {_name(version)} is not published; "
                            f"the published versions are {', '.join(versions)}.", where))
        return None
    return versions[version] if version else newest(versions)


def newest(versions: Mapping[str, CompiledQuestionnaire]) -> CompiledQuestionnaire:
    """An unversioned canonical means the newest published version (semantic versions, compared numerically)."""
    return versions[max(versions, key=lambda v: tuple(int(p) if p.isdigit() else 0 for p in v.split(".")))]


def questionnaire_of(qr: dict, catalog: Catalog) -> CompiledQuestionnaire | None:
    """The Questionnaire a response answers, leniently: an unknown version reads as the newest one.

    For reading the red flags of a response refused for other reasons, where a wrong version
    must not hide a reported red flag.
    """
    canonical = qr.get("questionnaire")
    url, _, version = canonical.partition("|") if isinstance(canonical, str) else ("", "", "")
    versions = catalog.get(url)
    if not versions:
        return None
    return versions.get(version) or newest(versions)


def _check_items(walk: _Walk, items: list, parent: str | None, path: str) -> None:
    quick, seen, facts = walk.q.quick, walk.seen, walk.facts
    for i, item in enumerate(items):
        walk.count += 1
        # Fast path: a known item in its place, with its plain elements only: a group goes straight to its
        # children, an answerable item takes its one plainly valid answer (or none). Anything unusual falls
        # through to the slow path below, which says exactly what is wrong.
        if (item.__class__ is dict and (link_id := item.get("linkId")).__class__ is str
                and (fast := quick.get(link_id)) is not None and fast[0] == parent and link_id not in seen):
            _, key, accept = fast
            if key is None:  # a group, checked as the slow path would before it walks the children
                if (GROUP_KEYS.issuperset(item) and _plain_text(item)
                        and (children := item.get("item", NO_ITEMS)).__class__ is list
                        and walk.count <= MAX_ITEMS and len(walk.issues) < MAX_ISSUES):
                    seen.add(link_id)
                    _check_items(walk, children, link_id, f"{path}.item[{i}]")
                    continue
            elif (((answers := item.get("answer")) is not None and len(item) == 2)  # linkId and answer: the usual
                  or (FAST_ITEM_KEYS.issuperset(item) and _plain_text(item))):
                if answers is None:
                    seen.add(link_id)
                    continue
                if (answers.__class__ is list and len(answers) == 1 and (answer := answers[0]).__class__ is dict
                        and len(answer) == 1 and (raw := answer.get(key)) is not None):
                    value = (raw if raw is True or raw is False else SLOW) if accept is None else accept(raw)
                    if value is not SLOW:
                        seen.add(link_id)
                        facts[link_id] = value
                        continue
        if _check_item(walk, item, parent, f"{path}.item[{i}]"):
            return


def _plain_text(item: dict) -> bool:
    """No text, or a non-empty string (the question as asked)."""
    text = item.get("text", "-")
    return text.__class__ is str and text != ""


def _check_item(walk: _Walk, item: Any, parent: str | None, where: str) -> bool:
    """The slow path: one item checked element by element, every problem said. True: stop this list."""
    if walk.count > MAX_ITEMS or len(walk.issues) >= MAX_ISSUES:
        if walk.count == MAX_ITEMS + 1:  # said once; the outer loops only count on
            walk.problem("too-costly", f"More than {MAX_ITEMS} items: not a response to this form.", where)
        return True
    if not isinstance(item, dict):
        walk.problem("structure", "Each item must be an object.", where)
        return False
    spec = _item_spec(walk, item, parent, where)
    if spec is None:
        return False
    if spec.answer_key is None:
        _check_group(walk, spec, item, where)
    else:
        before = len(walk.issues)
        _check_answers(walk, spec, item, where)
        if len(walk.issues) > before:
            walk.bad.add(spec.link_id)
    return False


def _item_spec(walk: _Walk, item: dict, parent: str | None, where: str) -> ItemSpec | None:
    link_id = item.get("linkId")
    if not isinstance(link_id, str):
        walk.problem("required", "Item has no linkId.", where)
        return None
    spec = walk.q.items.get(link_id)
    if spec is None:
        walk.problem("invalid", f"linkId {_name(link_id)} is not an item of Questionnaire {walk.q.url}.", where)
        return None
    if spec.parent != parent:
        home = f"group {spec.parent!r}" if spec.parent else "the top level"
        walk.problem("structure", f"Item {link_id!r} belongs in {home}.", where)
        return None
    if link_id in walk.seen and not spec.repeats:
        walk.problem("duplicate", f"Item {link_id!r} appears more than once.", where)
        return None
    walk.seen.add(link_id)
    unknown = [key for key in item if key not in ITEM_KEYS]
    if unknown:
        names = ", ".join(_name(key) for key in unknown[:5])
        walk.problem("structure", f"Item {link_id!r} has elements a QuestionnaireResponse item does not define: "
                     f"{names}.", where)
    for key, kind in ITEM_SHAPES.items():
        if key in item and not (isinstance(item[key], kind) and item[key] != ""):  # FHIR has no empty strings
            walk.problem("structure", f"{key} must be a non-empty JSON {KIND_NAMES[kind]}.", f"{where}.{key}")
    extensions = item.get("extension")
    for i, extension in enumerate(extensions if isinstance(extensions, list) else []):
        if not (isinstance(extension, dict) and isinstance(extension.get("url"), str)):
            walk.problem("structure", "An extension must be an object with a url.", f"{where}.extension[{i}]")
    extras = {k: v for k, v in item.items() if k in MODEL_ITEM_KEYS}
    if extras and not unknown:
        for problem in _element_issues("QuestionnaireResponseItem", {"linkId": link_id, **extras}):
            walk.problem("structure", f"Item {link_id!r}: {problem}", where)
    return spec


def _check_group(walk: _Walk, spec: ItemSpec, item: dict, where: str) -> None:
    if item.get("answer"):
        walk.problem("structure", f"Item {spec.link_id!r} is a {spec.type} and takes no answer.", f"{where}.answer")
    children = item.get("item", [])
    if isinstance(children, list):
        _check_items(walk, children, spec.link_id, where)
    else:
        walk.problem("structure", "item must be a list.", f"{where}.item")


def _check_answers(walk: _Walk, spec: ItemSpec, item: dict, where: str) -> None:
    if item.get("item"):
        walk.problem("structure", f"Item {spec.link_id!r} has no child items.", f"{where}.item")
    answers = item.get("answer")
    if answers is None or answers == []:  # an item sent without an answer is an unanswered item
        return
    if not isinstance(answers, list):
        walk.problem("structure", "answer must be a list.", f"{where}.answer")
        return
    if len(answers) > 1 and not spec.repeats:
        walk.problem("structure", f"Item {spec.link_id!r} takes one answer, got {len(answers)}.", f"{where}.answer")
        return
    for j, answer in enumerate(answers):
        value = _answer_value(walk, spec, answer, f"{where}.answer[{j}]")
        if value is not None and j == 0:
            walk.facts[spec.link_id] = value


def _answer_value(walk: _Walk, spec: ItemSpec, answer: Any, where: str) -> Any:
    if not isinstance(answer, dict):
        walk.problem("structure", "Each answer must be an object.", where)
        return None
    if answer.get("item"):
        walk.problem("structure", f"Answers to {spec.link_id!r} take no nested items.", f"{where}.item")
    unknown = [k for k in answer if not (k.startswith(("value", "_value")) or k in ANSWER_KEYS)]
    if unknown:
        walk.problem("structure", f"An answer to {spec.link_id!r} has elements an answer does not define: "
                     f"{', '.join(_name(k) for k in unknown[:5])}.", where)
        return None
    extras = {k: v for k, v in answer.items() if k in ("id", "extension") or k.startswith("_value")}
    for problem in _element_issues("QuestionnaireResponseItemAnswer", extras) if extras else ():
        walk.problem("structure", f"An answer to {spec.link_id!r}: {problem}", where)
    keys = [k for k in answer if k.startswith("value")]
    key = spec.answer_key
    if keys != [key]:
        got = ", ".join(keys) or "no value"
        walk.problem("value", f"Item {spec.link_id!r} is of type {spec.type}: its answer must be {key}, got {got}.",
                     where)
        return None
    where = f"{where}.{key}"
    raw = answer[key]
    if spec.type == "choice":
        return _choice(walk, spec, raw, where)
    if not _is_type(raw, spec.value_type):
        walk.problem("value", f"Item {spec.link_id!r} needs a {spec.type} value.", where)
        return None
    if (spec.minimum is not None and raw < spec.minimum) or (spec.maximum is not None and raw > spec.maximum):
        walk.problem("value", f"Item {spec.link_id!r} must be between {spec.minimum} and {spec.maximum}.", where)
        return None
    return raw


def _is_type(value: Any, kind: type | None) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return type(value) is kind  # bool is an int in Python; FHIR keeps them apart


def _choice(walk: _Walk, spec: ItemSpec, coding: Any, where: str) -> str | None:
    code = coding.get("code") if isinstance(coding, dict) else None
    codes = spec.codes or {}
    if not isinstance(code, str) or code not in codes:
        allowed = ", ".join(codes)
        walk.problem("code-invalid", f"Item {spec.link_id!r} has an answer code that is not one of its options "
                     f"(allowed: {allowed}).", where)
        return None
    system = coding.get("system")
    if system is not None and system != codes[code]:
        walk.problem("code-invalid", f"Item {spec.link_id!r}: code {code!r} belongs to {codes[code]}.",
                     f"{where}.system")
        return None
    return code


def _check_enabled(walk: _Walk, qr: dict) -> None:
    """An answer to an item that its enableWhen disables contradicts another answer."""
    for spec in walk.q.conditional:
        if any(c.question in walk.bad for c in spec.enable_when):
            continue  # its controlling answer is already reported as wrong
        if spec.link_id in walk.facts and not is_enabled(spec, walk.facts):
            walk.problem("business-rule", f"Item {spec.link_id!r} is answered, but its enableWhen disables it "
                         "given the other answers.", find_item(qr.get("item", []), spec.link_id, ROOT))


def find_item(items: list, link_id: str, path: str) -> str:
    """Where an item is (FHIRPath), found again only when there is a problem to report."""
    for i, item in enumerate(items):
        if isinstance(item, dict):
            where = f"{path}.item[{i}]"
            if item.get("linkId") == link_id:
                return where
            found = find_item(item.get("item") or [], link_id, where)
            if found:
                return found
    return ""


def is_enabled(spec: ItemSpec, facts: Mapping[str, Any]) -> bool:
    results = [_condition_holds(c, facts) for c in spec.enable_when]
    return all(results) if spec.enable_all else any(results)


def _condition_holds(c: EnableWhen, facts: Mapping[str, Any]) -> bool:
    value = facts.get(c.question)
    if c.operator == "exists":
        return (value is not None) == c.answer
    if value is None:
        return False
    return {
        "=": lambda: value == c.answer,
        "!=": lambda: value != c.answer,
        ">": lambda: value > c.answer,
        "<": lambda: value < c.answer,
        ">=": lambda: value >= c.answer,
        "<=": lambda: value <= c.answer,
    }[c.operator]()
