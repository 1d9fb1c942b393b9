"""The results CodeSystem, derived from mappings/ so codes and texts have one source.

questionnaires/screening-results.json is this function's output, committed
so it can be published and reviewed; a test keeps the two equal. Rewrite
it after a mapping change with `python -m plugin.screening.codesystem`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import orjson

from plugin.screening import data, systems
from plugin.screening.mappings import URGENCIES, RuleSet

EXTRA = {
    "criteria-met": ("Number of criteria met", "How many of a decision's criteria are known to be met."),
    "emergency": ("Emergency", "Needs emergency assessment (same day, emergency department)."),
    "urgent": ("Urgent", "Needs urgent assessment."),
}
assert set(URGENCIES) <= set(EXTRA)


def results_codesystem(rule_sets: Iterable[RuleSet], version: str = "1.1.0") -> dict:
    concepts: dict[str, dict] = {}

    def add(code: str, display: str, definition: str) -> None:
        concepts.setdefault(code, {"code": code, "display": display, "definition": definition})

    for rules in rule_sets:
        for spec in rules.results:
            add(spec.code, spec.title, f"{spec.title}. Source: {spec.citation}")
            for c in spec.criteria:
                add(c.code, c.text, f"{spec.title} criterion: {c.text}.")
            for t in spec.also:
                add(t.code, t.text, f"{spec.title}: {t.text}.")
        for code, value in rules.values.items():
            add(code, value["display"], f"Screening decision: {value['display']}.")
        for task in rules.tasks:
            if task.code["system"] == systems.RESULTS:
                add(task.code["code"], task.code["display"], f"Suggested task: {task.code['display']}.")
    for code, (display, definition) in EXTRA.items():
        add(code, display, definition)
    return {
        "resourceType": "CodeSystem",
        "id": "screening-results",
        "url": systems.RESULTS,
        "version": version,
        "name": "ScreeningResults",
        "title": "Back-pain screening result codes",
        "status": "active",
        "publisher": "backpain-screen",
        "description": "Codes of the results the back-pain screening plugin writes: instruments, criteria, "
        "decisions, red-flag urgencies and suggested tasks. Generated from the plugin's mappings/.",
        "caseSensitive": True,
        "content": "complete",
        "count": len(concepts),
        "concept": list(concepts.values()),
    }


def main() -> None:
    from plugin.screening.pipeline import Screener

    resource = results_codesystem(Screener().rule_sets.values())
    path = data.questionnaires_dir() / "screening-results.json"
    path.write_bytes(orjson.dumps(resource, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {len(resource['concept'])} concepts", file=sys.stderr)


if __name__ == "__main__":
    main()
