"""Bounds on an XML body's shape, checked before its costly conversion to FHIR JSON.

lxml parses fast (C, linear), but the conversion through fhir.resources
costs milliseconds per element and more with many attributes or namespace
declarations: a few hundred kB could hold the service for seconds. A
screening response in XML has a few hundred elements, one namespace
declaration (two with a narrative) and at most three attributes per
element, so the limits below leave a wide margin for real responses and
refuse a hostile body in milliseconds: the byte scan before lxml builds a
tree, the tree walk before fhir.resources sees it.
"""

from __future__ import annotations

from lxml import etree

from plugin.screening.outcome import invalid

FHIR_NS = "http://hl7.org/fhir"
XHTML_NS = "http://www.w3.org/1999/xhtml"
MAX_DEPTH = 64
MAX_ELEMENTS = 5000  # ~10x the biggest real response (the 1.1.0 screening fully answered: ~450)
MAX_ATTRIBUTES = 8  # per element; FHIR uses value, id, url
MAX_NAMESPACE_DECLARATIONS = 16  # in the whole body; FHIR needs one, plus XHTML for each narrative
ALLOWED_NAMESPACES = frozenset({FHIR_NS, XHTML_NS})


def check_bytes(body: bytes) -> None:
    """Cheap upper bounds from the raw bytes, before any parsing (counts over-estimate, never under)."""
    if body.count(b"xmlns") > MAX_NAMESPACE_DECLARATIONS:
        raise _too_costly(f"more than {MAX_NAMESPACE_DECLARATIONS} namespace declarations")
    if body.count(b"<") > 2 * MAX_ELEMENTS + 2:  # each element has a start tag and (unless empty) an end tag
        raise _too_costly(f"more than {MAX_ELEMENTS} elements")


def check_tree(root: etree._Element) -> None:
    """Depth, element count, attributes per element and namespaces of every element, in one pass."""
    depth = elements = 0
    for event, element in etree.iterwalk(root, events=("start", "end")):
        if event == "end":
            depth -= 1
            continue
        depth += 1
        elements += 1
        if depth > MAX_DEPTH:
            raise invalid("structure", f"The XML is nested more than {MAX_DEPTH} levels deep.")
        if elements > MAX_ELEMENTS:
            raise _too_costly(f"more than {MAX_ELEMENTS} elements")
        if len(element.attrib) > MAX_ATTRIBUTES:
            raise _too_costly(f"an element with more than {MAX_ATTRIBUTES} attributes")
        if etree.QName(element).namespace not in ALLOWED_NAMESPACES:
            raise invalid("structure", f"Every element must be in the FHIR namespace {FHIR_NS} (or XHTML in a "
                                       "narrative).")


def _too_costly(what: str) -> Exception:
    return invalid("too-costly", f"The XML has {what}: far more than a FHIR resource for this service needs.",
                   status=413)
