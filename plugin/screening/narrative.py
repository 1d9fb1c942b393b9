"""Readable XHTML narratives (Resource.text) for what the plugin writes.

One template per kind of result: a bold title and summary, then the criteria
named in groups by state ("Met: A; B. Not met: C. Not tested: E. Not answered: D."), never
a table row per criterion, and no citation (it is the Observation's
`method.text`). Names are escaped once when a builder is made; a narrative is
then a string join, made once per result state (observations.findings).
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape

OPEN = '<div xmlns="http://www.w3.org/1999/xhtml">'
CLOSE = "</div>"
# Group labels in the order they are read. A missing answer is never "not met" (SCREENING.md §2, H4, H19).
UNTESTED = "untested"  # a clinician's test left empty: the rules count it not met, a reader must see why
CRITERION_GROUPS = ((True, "Met"), (False, "Not met"), (UNTESTED, "Not tested"), (None, "Not answered"))
FLAG_GROUPS = ((None, "Not answered, ask the patient"), (False, "Absent"))  # present flags lead the summary
PARAGRAPH_END = "</p>"


def text(div: str) -> dict:
    return {"status": "generated", "div": div}


def intro(title: str) -> str:
    """Opens a paragraph with a bold title; an escaped summary and PARAGRAPH_END follow."""
    return f"<p><b>{escape(title)}</b>: "


def paragraph(title: str, summary: str) -> str:
    """`summary` is already escaped (it may hold markup made here)."""
    return intro(title) + summary + PARAGRAPH_END


def groups(named: Iterable[tuple[object, str]], labels: tuple[tuple[object, str], ...]) -> str:
    """One paragraph naming each (state, escaped name) under its state's label, in label order; empty groups
    are left out."""
    by_state: dict[object, list[str]] = {}
    for state, name in named:
        by_state.setdefault(state, []).append(name)
    found = [f"{label}: {'; '.join(by_state[state])}." for state, label in labels if state in by_state]
    return f"<p>{' '.join(found)}</p>" if found else ""


def document(*parts: str) -> str:
    return OPEN + "".join(parts) + CLOSE
