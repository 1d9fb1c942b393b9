"""Readable XHTML narratives (Resource.text) for what the plugin writes.

Pieces that do not depend on the response (row texts, citations) are
escaped once when a builder is made; a narrative is then a string join.
"""

from __future__ import annotations

from html import escape

OPEN = '<div xmlns="http://www.w3.org/1999/xhtml">'
CLOSE = "</div>"
STATE = {True: "met", False: "not met", None: "unknown (not answered)"}
FLAG_STATE = {True: "PRESENT", False: "absent", None: "not answered"}


def text(div: str) -> dict:
    return {"status": "generated", "div": div}


PARAGRAPH_END = "</p>"


def intro(title: str) -> str:
    """Opens a paragraph with a bold title; an escaped summary and PARAGRAPH_END follow."""
    return f"<p><b>{escape(title)}</b>: "


def paragraph(title: str, summary: str) -> str:
    """`summary` is already escaped (it may hold markup made here)."""
    return intro(title) + summary + PARAGRAPH_END


TABLE_END = "</tbody></table>"


def table_head(head: tuple[str, ...]) -> str:
    """Opens a table; its rows and TABLE_END follow."""
    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>"


def row(*cells: str) -> str:
    return "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>"


def source(citation: str) -> str:
    return f"<p>Source: {escape(citation)}</p>"


def criterion_rows(texts: list[str]) -> list[dict]:
    """For each criterion, its row as met / not met / unknown."""
    return [{truth: row(t, label) for truth, label in STATE.items()} for t in texts]


def flag_rows(flags: list[tuple[str, str, str]]) -> list[dict]:
    """For each (text, concern, urgency), its row as present / absent / not answered."""
    return [{truth: row(t, label, f"{u}: {c}") for truth, label in FLAG_STATE.items()} for t, c, u in flags]


def document(*parts: str) -> str:
    return OPEN + "".join(parts) + CLOSE
