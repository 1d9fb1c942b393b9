"""What a batch did, for a person (a table on standard error) and for a script (`--json`).

Responses that could not be read are counted apart from scored ones, and
each questionnaire's outcomes apart from the others: a BASDAI "positive"
is not a screening outcome. Counts only: no answers, no names.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

SCREENING = "back-pain-screening"
INVALID = "invalid"
NOT_FINISHED = ("in-progress", "stopped")  # read, but nothing to score (see SCREENING.md §4, lifecycle)
TITLES = {SCREENING: "Back-pain screening outcomes", "basdai": "BASDAI outcomes"}
SEPARATOR = "/"
# The screening's outcomes in their precedence (SCREENING.md §4): the urgent ones at the top of the table.
PRECEDENCE = ("emergency-assessment", "urgent-assessment", "refer-rheumatology", "test-hla-b27", "indeterminate",
              "no-referral-indicated", "not-applicable")


def label_of(questionnaire: str | None, label: str) -> str:
    """The label a summary counts: a screening outcome as it is, another questionnaire's as `basdai/positive`."""
    name = (questionnaire or "").partition("|")[0].rstrip("/").rsplit("/", 1)[-1]
    return f"{name}{SEPARATOR}{label}" if name and name != SCREENING and label not in NOT_FINISHED else label


def response_questionnaire(bundle: dict) -> str | None:
    """The canonical of the response a result Bundle carries (None when it carries none)."""
    for entry in bundle.get("entry", []):
        resource = entry.get("resource", {})
        if resource.get("resourceType") == "QuestionnaireResponse":
            return resource.get("questionnaire")
    return None


def as_json(counts: Counter, writes: Counter | None = None) -> dict[str, Any]:
    """The summary as data: responses read, scored, invalid, not finished, and outcomes per questionnaire."""
    outcomes: dict[str, dict[str, int]] = {}
    for label, n in counts.items():
        if label == INVALID or label in NOT_FINISHED:
            continue
        name, _, outcome = label.rpartition(SEPARATOR)
        outcomes.setdefault(name or SCREENING, {})[outcome] = n
    found: dict[str, Any] = {
        "responses": sum(counts.values()),
        "scored": sum(sum(o.values()) for o in outcomes.values()),
        "invalid": counts[INVALID],
        "not_finished": {status: counts[status] for status in NOT_FINISHED if counts[status]},
        "outcomes": {name: dict(sorted(o.items(), key=_order)) for name, o in outcomes.items()},
    }
    if writes is not None:
        found["writes"] = dict(writes)
    return found


def _order(item: tuple[str, int]) -> tuple[int, int, str]:
    label, n = item
    return (PRECEDENCE.index(label) if label in PRECEDENCE else len(PRECEDENCE), -n, label)


def headline(counts: Counter) -> str:
    """One line: 'N responses: S scored, I invalid, F not finished'."""
    data = as_json(counts)
    if not data["responses"]:
        return "0 responses: the input was empty"
    finished = sum(data["not_finished"].values())
    return (f"{data['responses']} responses: {data['scored']} scored, {data['invalid']} invalid"
            f"{f', {finished} not finished (in-progress or stopped)' if finished else ''}")


def table(counts: Counter) -> str:
    """Each questionnaire's outcomes as an aligned table, most frequent first."""
    data = as_json(counts)
    rows = [(TITLES.get(name, f"{name} outcomes"), outcomes) for name, outcomes in data["outcomes"].items()]
    rows.sort(key=lambda row: row[0] != TITLES[SCREENING])  # the screening first
    width = max((len(label) for _, o in rows for label in o), default=0)
    lines = []
    for title, outcomes in rows:
        lines.append(f"  {title}: {sum(outcomes.values())} scored")
        lines += [f"    {label:<{width}}  {n:>7}" for label, n in outcomes.items()]
    return "\n".join(lines)
