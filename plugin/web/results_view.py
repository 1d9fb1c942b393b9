"""A response's stored results as a clinician reads them: urgency first, then the action, then the instruments.

Pure functions from the stored resources (the QuestionnaireResponse, its
Observations and Tasks) to what the templates draw. Codes stay secondary:
every headline is in words, and each criterion is one of five distinct
states, so "not tested" is never shown as "not met" nor "unanswered" as "no".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from plugin.screening import criteria
from plugin.screening.criteria import answers_of
from plugin.screening.displays import NOT_PERFORMED, absent_reason, concept_text, display

RESULT_ORDER = ("red-flags", "referral-asas-2015", "referral-nice-ng65", "asas-ibp", "berlin-ibp", "spa-features",
                "mechanical-pattern", "basdai")
PRIORITY_RANK = {"stat": 0, "asap": 1, "urgent": 2, "routine": 3}
OPEN_TASK = ("draft", "requested", "received", "accepted", "ready", "in-progress", "on-hold")
# Outcome code -> (tone, headline in words, what it asks of the clinician). Tone drives colour and icon.
OUTCOMES: dict[str, tuple[str, str, str]] = {
    "emergency-assessment": ("emergency", "Emergency assessment today",
                             "Assess the patient today, in person (emergency department if need be)."),
    "urgent-assessment": ("urgent", "Urgent assessment",
                          "Review the patient urgently, the same day if you can."),
    "refer-rheumatology": ("refer", "Refer to rheumatology: suspected axial spondyloarthritis",
                           "Consider a referral to rheumatology."),
    "test-hla-b27": ("refer", "HLA-B27 test before deciding on referral",
                     "Consider an HLA-B27 test; the referral decision depends on it."),
    "no-referral-indicated": ("calm", "No referral indicated",
                              "No red flag reported and the referral criteria are not met."),
    "not-applicable": ("calm", "Axial SpA pathway not applicable",
                       "Back pain under 3 months, or it began at 45 or over. No red flag reported."),
    "indeterminate": ("unknown", "Indeterminate: missing answers could change the decision",
                      "Ask the patient the questions listed below before deciding."),
}
NOT_SCORED = ("unknown", "Not scored yet", "No results are stored for this response yet.")
ICONS = {"emergency": "!", "urgent": "!", "refer": "→", "calm": "✓", "unknown": "?"}
STATES = ("met", "not met", "unknown", "not tested", "not applicable")
FLAG_WORDS = {"met": "present", "not met": "absent", "unknown": "unanswered"}
RESPONSE_NOTES = {
    "amended": "Amended: the patient's answers were changed after they were first sent. These results are "
               "for the latest answers; suggestions that no longer apply were cancelled.",
    "entered-in-error": "Entered in error: this response was withdrawn. Do not act on these results; "
                        "its suggestions were cancelled.",
    "in-progress": "Not finished: the patient has not completed the form. Only red flags are acted on.",
    "stopped": "Stopped: the patient did not finish the form. Only red flags are acted on.",
}


@dataclass(frozen=True, slots=True)
class Criterion:
    name: str
    state: str  # one of STATES
    label: str  # the state in this instrument's words (a red flag is "present", not "met")


@dataclass(frozen=True, slots=True)
class Instrument:
    code: str
    title: str
    value: Any
    interpretation: str | None
    status: str
    criteria: tuple[Criterion, ...]
    counts: str  # "2 of 5 met, 3 unknown"
    deciding: tuple[str, ...] = ()  # for an indeterminate result: the questions that would decide it


@dataclass(frozen=True, slots=True)
class Banner:
    tone: str
    icon: str
    headline: str
    action: str
    code: str


@dataclass(frozen=True, slots=True)
class ResultsView:
    banner: Banner
    note: str | None
    tasks: tuple[dict, ...]  # open first, most urgent first
    instruments: tuple[Instrument, ...]
    deciding: tuple[str, ...] = field(default=())


def code_of(resource: dict) -> str:
    return ((resource.get("code") or {}).get("coding") or [{}])[0].get("code", "")


def view(qr: dict, observations: list[dict], tasks: list[dict], questions: dict[str, str]) -> ResultsView:
    answers = answers_of(qr)
    by_code = {code_of(o): o for o in observations}
    ordered = sorted((o for c, o in by_code.items() if c != "screening-outcome"),
                     key=lambda o: RESULT_ORDER.index(code_of(o)) if code_of(o) in RESULT_ORDER else 99)
    instruments = tuple(instrument(o, answers, questions) for o in ordered)
    outcome = outcome_code(by_code.get("screening-outcome"))
    deciding = _deciding(instruments) if outcome == "indeterminate" else ()
    return ResultsView(banner(outcome, by_code.get("red-flags")), RESPONSE_NOTES.get(qr.get("status", "")),
                       tuple(sorted(tasks, key=task_rank)), instruments, deciding)


def outcome_code(observation: dict | None) -> str:
    if not observation:
        return ""
    return ((observation.get("valueCodeableConcept") or {}).get("coding") or [{}])[0].get("code", "")


def banner(outcome: str, red_flags: dict | None) -> Banner:
    tone, headline, action = OUTCOMES.get(outcome, NOT_SCORED)
    if tone in ("emergency", "urgent") and red_flags:
        why = _flag_reasons(red_flags, tone)
        headline = f"{headline}: {why}" if why else headline
    return Banner(tone, ICONS[tone], headline, action, outcome)


def _flag_reasons(red_flags: dict, urgency: str) -> str:
    """'possible cauda equina syndrome (saddle numbness or tingling)', from the flags present of that urgency."""
    concerns: dict[str, list[str]] = {}
    for component in red_flags.get("component", []):
        urgencies = {e.get("valueCode") for e in component.get("extension", [])}
        if component.get("valueBoolean") is True and urgency in urgencies:
            coding = component["code"]["coding"][0]
            concern = criteria.rule_facts().concerns.get(coding["code"], "a serious cause")
            concerns.setdefault(concern, []).append((display(coding) or coding["code"]).lower())
    return "; ".join(f"possible {c[0].lower() + c[1:]} ({', '.join(flags)})" for c, flags in concerns.items())


def task_rank(task: dict) -> tuple[int, int]:
    return (0 if task.get("status") in OPEN_TASK else 1, PRIORITY_RANK.get(task.get("priority", "routine"), 3))


def instrument(observation: dict, answers: dict[str, Any], questions: dict[str, str]) -> Instrument:
    code = code_of(observation)
    words = FLAG_WORDS if code == "red-flags" else {}
    found = []
    for component in observation.get("component", []):
        coding = component["code"]["coding"][0]
        state = criterion_state(component, coding["code"], answers)
        found.append(Criterion(display(coding) or coding["code"], state, words.get(state, state)))
    interpretation = ((observation.get("interpretation") or [{}])[0].get("coding") or [{}])[0]
    deciding = ()
    if interpretation.get("code") == "IND":
        deciding = _unanswered(observation, answers, questions)
    return Instrument(code, concept_text(observation["code"]) or code, _value(observation),
                      interpretation.get("display"), observation.get("status", ""), tuple(found),
                      counts(found, words), deciding)


def criterion_state(component: dict, code: str, answers: dict[str, Any]) -> str:
    """met / not met / unknown (unanswered) / not tested (a clinician's test left empty) / not applicable."""
    value = component.get("valueBoolean")
    if value is True:
        return "met"
    if value is False:
        return "not tested" if criteria.untested(code, answers) else "not met"
    absent = absent_reason(component)
    if absent == "not-applicable":
        return "not applicable"
    if absent in (NOT_PERFORMED, "not-asked"):
        return "not tested"
    return "unknown"


def counts(found: list[Criterion], words: dict[str, str]) -> str:
    """'2 of 5 met, 3 unknown': the met count is never shown without what is missing beside it."""
    tally = {state: sum(c.state == state for c in found) for state in STATES}
    parts = [f"{tally['met']} of {len(found)} {words.get('met', 'met')}"]
    parts += [f"{n} {words.get(state, state)}" for state, n in tally.items() if n and state not in ("met", "not met")]
    return ", ".join(parts) if found else ""


def _unanswered(observation: dict, answers: dict[str, Any], questions: dict[str, str]) -> tuple[str, ...]:
    """The questions, left unanswered, that the instrument's unknown criteria read."""
    link_ids: list[str] = []
    for component in observation.get("component", []):
        if "valueBoolean" in component or absent_reason(component) == NOT_PERFORMED:
            continue  # answered, or a test not done (which the rules count as not met: it decides nothing)
        for link_id in sorted(criteria.rule_facts().items.get(component["code"]["coding"][0]["code"], ())):
            if link_id not in answers and link_id not in link_ids and link_id in questions:
                link_ids.append(link_id)
    return tuple(questions[link_id] for link_id in link_ids)


def _deciding(instruments: tuple[Instrument, ...]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for found in instruments:
        if found.code == "red-flags" or found.code.startswith("referral-"):
            seen.update(dict.fromkeys(found.deciding))
    return tuple(seen)


def _value(observation: dict) -> Any:
    absent = ((observation.get("dataAbsentReason") or {}).get("coding") or [{}])[0]
    if absent:  # "not applicable" (the instrument does not apply), never a bare "unknown"
        return absent.get("display", absent.get("code", "")).lower()
    if "valueCodeableConcept" in observation:
        value = observation["valueCodeableConcept"]
        return concept_text(value) or code_of({"code": value})
    for key in ("valueInteger", "valueBoolean", "valueQuantity"):
        if key in observation:
            value = observation[key]
            value = value.get("value") if isinstance(value, dict) else value
            return {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value
    return "unknown"

