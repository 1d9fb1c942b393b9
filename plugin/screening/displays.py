"""Names for people of the codes the plugin writes, from its published CodeSystems.

The result Bundle carries a criterion's code without its display (the
CodeSystem has it, and the narrative names it): whatever shows a stored
result to a person names its codes through here. Stored data is read
defensively: a coding's own display wins (results written before the
displays were left out carry one), then the published one, then the code.
"""

from __future__ import annotations

from functools import cache

from plugin.screening import data


@cache
def _published() -> dict[tuple[str, str], str]:
    return {(cs["url"], c["code"]): c["display"]
            for cs in data.definitions("CodeSystem") for c in cs.get("concept", []) if c.get("display")}


def display(coding: object) -> str | None:
    """A coding's name: its own display, else its CodeSystem's, else None (not a coding, or unknown)."""
    own = _words(coding, "display")
    if own or not isinstance(coding, dict):
        return own
    system, code = coding.get("system"), coding.get("code")
    return _published().get((system, code)) if isinstance(system, str) and isinstance(code, str) else None


def concept_text(concept: object) -> str | None:
    """A CodeableConcept's name: its text, else its first coding with a name."""
    text = _words(concept, "text")
    if text or not isinstance(concept, dict):
        return text
    codings = concept.get("coding")
    return next((d for d in map(display, codings) if d), None) if isinstance(codings, list) else None


NOT_PERFORMED = "not-performed"  # the absent reason of a criterion whose clinician test was not done (H19)


def absent_reason(element: object) -> str | None:
    """The code of an element's dataAbsentReason ("unknown", "not-performed", ...), or None."""
    reason = element.get("dataAbsentReason") if isinstance(element, dict) else None
    codings = reason.get("coding") if isinstance(reason, dict) else None
    first = codings[0] if isinstance(codings, list) and codings else None
    return _words(first, "code")


def _words(node: object, key: str) -> str | None:
    """`node[key]` when node is an object and that is a non-empty string (stored data is read defensively)."""
    value = node.get(key) if isinstance(node, dict) else None
    return value if isinstance(value, str) and value else None
