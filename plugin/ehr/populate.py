"""SDC `$populate`, the pure part: an in-progress QuestionnaireResponse prefilled from what is known.

Inputs are the Questionnaire, the subject reference, the Patient (or None),
the lab Observations and earlier responses the shell found, and the clock.
Only answers that follow from the record are filled in; everything that
could not be filled, and why, is said in `issues` (information or warning).

- `age` (item code `age`): full years from Patient.birthDate as of today. A
  partial birthDate ("1980", "1980-05") gives an age only when every day it
  could stand for gives the same one; otherwise the item stays empty. A
  29 February birthday is reached on 1 March in common years (the same rule
  as the Questionnaire's initialExpression, so renderers and $populate agree).
- `hla-b27`: the latest final/amended/corrected HLA-B27 result (LOINC
  26028-1), by its interpretation (POS/DET, NEG/ND), a SNOMED CT
  Positive/Detected or Negative/Not detected value, or the text "Positive"/"Negative".
- `crp-elevated`: the latest CRP (LOINC 1988-5) and ESR (4537-7, 30341-2)
  results of the last 12 months, by interpretation (H/HH/HU raised, N/L
  normal) or else by the value against its reference range; either raised
  gives `raised`. The item asks for "no other cause", which no lab result
  can say, so a prefilled `raised` comes with a note to confirm it.
- When no lab result settles an item, the latest completed or amended
  screening response of the patient is used: its HLA-B27 answer at any age
  (a genetic marker does not change), its CRP answer only within the same
  12 months. "not-tested" is never carried over: a test may have been done since.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from plugin.screening.outcome import Issue
from plugin.screening.systems import INTERPRETATION, ITEMS, SNOMED

LOINC = "http://loinc.org"
# Codes checked against laboratory catalogues (Mayo Clinic LY27B and ARUP 0095030 report HLA-B27 as 26028-1;
# Mayo CRP/CRPP as 1988-5; ARUP 0040325 ESR Westergren as 4537-7; several catalogues ESR as 30341-2).
HLA_B27_CODES = frozenset({"26028-1"})  # HLA-B27 [Presence] in Blood
CRP_CODES = frozenset({"1988-5"})  # C reactive protein [Mass/volume] in Serum or Plasma
ESR_CODES = frozenset({"4537-7", "30341-2"})  # Erythrocyte sedimentation rate (Westergren; unspecified method)
LAB_CODES = HLA_B27_CODES | CRP_CODES | ESR_CODES
USABLE = frozenset({"final", "amended", "corrected"})  # not preliminary, cancelled or entered-in-error
INFLAMMATION_WINDOW = timedelta(days=365)  # CRP and ESR change: older results say little about today
ANSWERED = frozenset({"completed", "amended"})
POSITIVE = {"POS", "DET"}  # v3-ObservationInterpretation
NEGATIVE = {"NEG", "ND"}
RAISED = {"H", "HH", "HU"}
NOT_RAISED = {"N", "L", "LL", "LU"}
SNOMED_POSITIVE = {"10828004", "260373001"}  # Positive, Detected (qualifier values)
SNOMED_NEGATIVE = {"260385009", "260415000"}  # Negative, Not detected
DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
INSTANT = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2})"
                     r"(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?")


BLOCKED = object()  # results exist but say nothing sure: nothing is prefilled, nor taken from older answers


@dataclass(frozen=True, slots=True)
class Known:
    """What the shell found about the subject (all optional: nothing found means nothing prefilled)."""

    patient: dict | None = None
    observations: list[dict] = field(default_factory=list)
    responses: list[dict] = field(default_factory=list)  # earlier QuestionnaireResponses of the subject
    unsearched: str | None = None  # why the store was not asked (`local` = false, no Patient id), if it was not


@dataclass(frozen=True, slots=True)
class Populated:
    response: dict
    issues: list[Issue]

    def parameters(self) -> dict:
        """The operation's output: `response`, and `issues` when there are any."""
        out: list[dict] = [{"name": "response", "resource": self.response}]
        if self.issues:
            out.append({"name": "issues", "resource": {"resourceType": "OperationOutcome",
                                                       "issue": [i.to_fhir() for i in self.issues]}})
        return {"resourceType": "Parameters", "parameter": out}


@dataclass(frozen=True, slots=True)
class Answer:
    code: str  # an answer code of the item (its answerOption decides the system and display)
    source: str  # a plain sentence: where it came from


def populate(questionnaire: dict, subject: dict, known: Known, now: datetime) -> Populated:
    """The in-progress response for `subject`, with the answers the record supports."""
    issues: list[Issue] = []
    items = {code: item for code, item in _coded_items(questionnaire.get("item", []))}
    answers: dict[str, Any] = {}  # linkId -> answer[x] dict
    if "age" in items:
        age = _age_answer(items["age"], known, now.date(), issues)
        if age is not None:
            answers[items["age"]["linkId"]] = {"valueInteger": age}
    for code, finder in (("hla-b27", _hla_b27), ("crp-elevated", _crp)):
        if code not in items:
            continue
        item = items[code]
        found = finder(item, known, now, issues)
        if found is None:  # no lab result at all (not one that was unclear): an earlier answer may do
            found = _earlier_answer(item, questionnaire, known, now)
        if found is None:
            issues.append(_note(item, _nothing_found(code, known), "information", "not-found"))
        elif found is not BLOCKED and (choice := _choice(item, found, issues)):
            answers[item["linkId"]] = {"valueCoding": choice}
            caution = " Confirm there is no other cause." if found.code == "raised" else ""
            issues.append(_note(item, f"prefilled from {found.source}; please review it.{caution}", "information",
                                "informational"))
    response = {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": f"{questionnaire['url']}|{questionnaire['version']}" if questionnaire.get("version")
        else questionnaire["url"],
        "status": "in-progress",
        "subject": subject,
        "authored": now.isoformat(timespec="seconds"),
        "item": _skeleton(questionnaire.get("item", []), answers),
    }
    return Populated(response, issues)


# -- the response's items -----------------------------------------------------------


def _skeleton(items: list[dict], answers: dict[str, Any]) -> list[dict]:
    """One response item per Questionnaire item, in its groups; an answer only where one was prefilled."""
    out = []
    for item in items:
        node: dict[str, Any] = {"linkId": item["linkId"]}
        if item.get("text"):
            node["text"] = item["text"]
        if item["linkId"] in answers:
            node["answer"] = [answers[item["linkId"]]]
        if item.get("item"):
            node["item"] = _skeleton(item["item"], answers)
        out.append(node)
    return out


def _coded_items(items: list[dict]) -> Iterator[tuple[str, dict]]:
    """(item code, item) for every item coded in the screening's item CodeSystem."""
    for item in items:
        for coding in item.get("code", []):
            if coding.get("system") == ITEMS and isinstance(coding.get("code"), str):
                yield coding["code"], item
        yield from _coded_items(item.get("item", []))


def _choice(item: dict, found: Answer, issues: list[Issue]) -> dict | None:
    """The item's own answerOption Coding for `found.code`, or None (and why) when it offers none."""
    for option in item.get("answerOption", []):
        coding = option.get("valueCoding", {})
        if coding.get("code") == found.code:
            return {k: coding[k] for k in ("system", "code", "display") if k in coding}
    issues.append(_note(item, f"{found.source} gives {found.code!r}, which is not one of its answers.", "warning",
                        "code-invalid"))
    return None


def _note(item: dict, text: str, severity: str, code: str) -> Issue:
    where = f"QuestionnaireResponse.repeat(item).where(linkId='{item['linkId']}')"
    return Issue(code, f"{item['linkId']}: {text}", where, severity)


def _nothing_found(code: str, known: Known) -> str:
    if known.unsearched:
        return f"not prefilled: {known.unsearched}."
    test = "HLA-B27" if code == "hla-b27" else "CRP or ESR (last 12 months)"
    return f"not prefilled: no usable {test} result and no earlier answer was found for this patient."


# -- age -------------------------------------------------------------------------------


def _age_answer(item: dict, known: Known, today: date, issues: list[Issue]) -> int | None:
    patient = known.patient
    if patient is None:
        issues.append(_note(item, "not prefilled: no Patient was available (pass one in a 'patient' context).",
                            "information", "not-found"))
        return None
    birth = patient.get("birthDate")
    if not isinstance(birth, str):
        issues.append(_note(item, "not prefilled: the Patient has no birthDate.", "information", "not-found"))
        return None
    age, why = full_years(birth, today)
    if age is None:
        issues.append(_note(item, f"not prefilled: {why}", "warning", "incomplete"))
        return None
    low, high = _bounds(item)
    if (low is not None and age < low) or (high is not None and age > high):
        issues.append(_note(item, f"not prefilled: an age of {age} is outside the item's range.", "warning",
                            "value"))
        return None
    if len(birth) < 10:
        issues.append(_note(item, f"prefilled from a birthDate known only as {birth!r}, which gives {age} "
                            "whatever the exact day.", "information", "informational"))
    return age


def full_years(birth: str, today: date) -> tuple[int | None, str]:
    """Age in full years on `today`, or None and why. A partial date counts only when it leaves no doubt."""
    span = birth_span(birth)
    if span is None:
        return None, f"the birthDate {birth!r} is not a FHIR date."
    earliest, latest = span
    if earliest > today:
        return None, "the birthDate is after today."
    oldest, youngest = years_on(earliest, today), years_on(min(latest, today), today)
    if oldest != youngest:
        return None, (f"the birthDate is known only as {birth!r}, which could mean {youngest} or {oldest} "
                      "years today.")
    return oldest, ""


def years_on(born: date, today: date) -> int:
    """Full years from `born` to `today`; a 29 February birthday is reached on 1 March in common years."""
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def birth_span(text: str) -> tuple[date, date] | None:
    """The first and last day a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD) can mean; None if it is not one."""
    match = DATE.fullmatch(text)
    if not match:
        return None
    year, month, day = (int(g) if g else None for g in match.groups())
    try:
        if day is not None:
            exact = date(year, month, day)  # type: ignore[arg-type]
            return exact, exact
        if month is not None:
            first = date(year, month, 1)  # type: ignore[arg-type]
            following = date(year + (month == 12), month % 12 + 1, 1)  # type: ignore[operator]
            return first, following - timedelta(days=1)
        return date(year, 1, 1), date(year, 12, 31)  # type: ignore[arg-type]
    except ValueError:
        return None


def _bounds(item: dict) -> tuple[int | None, int | None]:
    found = {e.get("url", "").rsplit("/", 1)[-1]: e.get("valueInteger") for e in item.get("extension", [])}
    return found.get("minValue"), found.get("maxValue")


# -- lab results -------------------------------------------------------------------------


def _hla_b27(item: dict, known: Known, now: datetime, issues: list[Issue]) -> Answer | object | None:
    return _latest(item, known.observations, HLA_B27_CODES, "HLA-B27", _hla_finding, None, now, issues)


def _crp(item: dict, known: Known, now: datetime, issues: list[Issue]) -> Answer | object | None:
    found = [_latest(item, known.observations, codes, name, _inflammation_finding, INFLAMMATION_WINDOW, now, issues)
             for codes, name in ((CRP_CODES, "CRP"), (ESR_CODES, "ESR"))]
    answers = [a for a in found if isinstance(a, Answer)]
    raised = next((a for a in answers if a.code == "raised"), None)  # either raised is enough
    if raised or BLOCKED in found:
        return raised or BLOCKED
    return answers[0] if answers else None


def _latest(item: dict, observations: list[dict], codes: frozenset[str], name: str, finding: Callable,
            window: timedelta | None, now: datetime, issues: list[Issue]) -> Answer | object | None:
    """The finding of the latest usable result with one of `codes`: None when there is no result, BLOCKED
    when the latest cannot be read or results of that moment disagree (then nothing older is used)."""
    timed = [(moment, obs) for obs in observations
             if obs.get("status") in USABLE and _has_code(obs, codes) and (moment := effective(obs))]
    if window is not None:
        recent = [(m, o) for m, o in timed if m >= now - window]
        if timed and not recent:
            issues.append(_note(item, f"the latest {name} result is more than {window.days // 30} months old; "
                                "it was not used.", "information", "not-found"))
        timed = recent
    if not timed:
        return None
    last = max(m for m, _ in timed)
    findings = {finding(o) for m, o in timed if m == last}
    when = last.date().isoformat()
    if findings == {None}:
        issues.append(_note(item, f"the latest {name} result ({when}) has no interpretation and no value its "
                            "reference range can judge; it was not used.", "warning", "incomplete"))
        return BLOCKED
    findings.discard(None)
    if len(findings) > 1:
        issues.append(_note(item, f"{name} results of {when} disagree; none was used.", "warning", "conflict"))
        return BLOCKED
    return Answer(findings.pop(), f"the {name} result of {when}")


def _has_code(obs: dict, codes: frozenset[str]) -> bool:
    return any(c.get("system") == LOINC and c.get("code") in codes
               for c in (obs.get("code") or {}).get("coding", []) if isinstance(c, dict))


def _interpretations(obs: dict) -> set[str]:
    return {c.get("code") for concept in obs.get("interpretation", []) if isinstance(concept, dict)
            for c in concept.get("coding", []) if isinstance(c, dict) and c.get("system") == INTERPRETATION}


def _one_sided(flags: set[str], yes: set[str], no: set[str]) -> bool | None:
    """True or False when the interpretation flags point one way only; None when none or both."""
    if bool(flags & yes) == bool(flags & no):
        return None
    return bool(flags & yes)


def _hla_finding(obs: dict) -> str | None:
    flagged = _one_sided(_interpretations(obs), POSITIVE, NEGATIVE)
    if flagged is not None:
        return "positive" if flagged else "negative"
    codes = {c.get("code") for c in (obs.get("valueCodeableConcept") or {}).get("coding", [])
             if isinstance(c, dict) and c.get("system") == SNOMED}
    text = obs.get("valueString")
    if codes & SNOMED_POSITIVE or (isinstance(text, str) and text.strip().lower() == "positive"):
        return "positive"
    if codes & SNOMED_NEGATIVE or (isinstance(text, str) and text.strip().lower() == "negative"):
        return "negative"
    return None


def _inflammation_finding(obs: dict) -> str | None:
    flagged = _one_sided(_interpretations(obs), RAISED, NOT_RAISED)
    if flagged is not None:
        return "raised" if flagged else "normal"
    value = obs.get("valueQuantity")
    if not isinstance(value, dict) or not isinstance(value.get("value"), int | float):
        return None
    for low_high in obs.get("referenceRange", []):
        high = low_high.get("high") if isinstance(low_high, dict) else None
        if isinstance(high, dict) and isinstance(high.get("value"), int | float) and _same_unit(value, high):
            return "raised" if value["value"] > high["value"] else "normal"
    return None


def _same_unit(a: dict, b: dict) -> bool:
    """Comparable only in the same unit (UCUM code where both have one, else the unit text)."""
    if a.get("code") and b.get("code"):
        return a.get("system") == b.get("system") and a["code"] == b["code"]
    return a.get("unit") == b.get("unit")


def effective(resource: dict) -> datetime | None:
    """When a result holds (or a response was authored), as an aware datetime; None if it says not."""
    period = resource.get("effectivePeriod") if isinstance(resource.get("effectivePeriod"), dict) else {}
    for text in (resource.get("effectiveDateTime"), resource.get("effectiveInstant"), period.get("end"),
                 period.get("start"), resource.get("issued"), resource.get("authored")):
        if isinstance(text, str) and (moment := instant(text)):
            return moment
    return None


def instant(text: str) -> datetime | None:
    """A FHIR date or dateTime as an aware datetime (its start; UTC when it has no zone)."""
    match = INSTANT.fullmatch(text)
    if not match:
        return None
    year, month, day, hour, minute, second, zone = match.groups()
    try:
        moment = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                          int(second or 0))
        if zone and zone != "Z":
            return datetime.fromisoformat(f"{moment.isoformat()}{zone}")
        return moment.replace(tzinfo=UTC)
    except ValueError:
        return None


# -- earlier answers -------------------------------------------------------------------------


def _earlier_answer(item: dict, questionnaire: dict, known: Known, now: datetime) -> Answer | None:
    """The item's answer in the patient's latest completed or amended response to this Questionnaire."""
    window = INFLAMMATION_WINDOW if item["linkId"] == "crp-elevated" else None
    answered = [(moment, qr) for qr in known.responses
                if qr.get("status") in ANSWERED and _same_questionnaire(qr, questionnaire)
                and (moment := effective(qr)) and (window is None or moment >= now - window)]
    for moment, qr in sorted(answered, key=lambda pair: pair[0], reverse=True):
        code = _answer_code(qr.get("item", []), item["linkId"])
        if code is not None and code not in ("not-tested", "not-done"):
            where = f"QuestionnaireResponse/{qr['id']}" if qr.get("id") else "an earlier response"
            return Answer(code, f"the answer in {where} of {moment.date().isoformat()}")
        if code is not None:
            return None  # the latest answer says not tested: carry nothing over
    return None


def _same_questionnaire(qr: dict, questionnaire: dict) -> bool:
    canonical = qr.get("questionnaire")
    return isinstance(canonical, str) and canonical.split("|")[0] == questionnaire.get("url")


def _answer_code(items: Iterable[Any], link_id: str) -> str | None:
    for item in items:
        if not isinstance(item, dict):
            continue
        if item.get("linkId") == link_id:
            answers = item.get("answer") or [{}]
            coding = answers[0].get("valueCoding") if isinstance(answers[0], dict) else None
            return coding.get("code") if isinstance(coding, dict) else None
        found = _answer_code(item.get("item") or [], link_id)
        if found is not None:
            return found
    return None
