"""Turns a request body (FHIR JSON or XML) into a plain dict, safely.

JSON goes through orjson (its nesting limit stops deep bodies). XML goes
through lxml with DTDs, entities and network access off; a DOCTYPE is
refused outright (FHIR XML never has one), and the root element and
namespace are checked before fhir.resources (R4B) maps it to JSON form.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from lxml import etree

from plugin.screening import xml_limits
from plugin.screening.outcome import InvalidInput, invalid, model_issue

FHIR_NS = xml_limits.FHIR_NS
MAX_BODY_BYTES = 1024 * 1024  # 1 MiB: a screening response is ~3 kB
MAX_XML_DEPTH = xml_limits.MAX_DEPTH
MAX_JSON_DEPTH = 32  # a response nests ~8 levels; its Bundle adds 3
DECLARATION = re.compile(rb"<!(DOCTYPE|ENTITY)", re.IGNORECASE)
NO_DTD = "XML with a DOCTYPE or entity declarations is not accepted."
UTF8_BOM = b"\xef\xbb\xbf"
# A control character (other than tab, line feed, carriage return) escaped in a JSON string: FHIR forbids them.
# (Raw ones are not JSON at all: the parser refuses those.) Searched only when the body has a \u00 escape.
CONTROL = re.compile(rb"(?<!\\)(?:\\\\)*\\u00(?:0[0-8bcefBCEF]|1[0-9a-fA-F])")


def xml_parser() -> etree.XMLParser:
    """A parser that cannot read files, reach the network or expand entities."""
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
        huge_tree=False, remove_comments=True, remove_pis=True,
    )


def is_xml(body: bytes, content_type: str | None) -> bool:
    if content_type:
        return "xml" in content_type.lower()
    return body.removeprefix(UTF8_BOM).lstrip()[:1] == b"<"


def parse_body(body: bytes, content_type: str | None = None, max_bytes: int = MAX_BODY_BYTES) -> Any:
    if len(body) > max_bytes:
        raise invalid("too-costly", f"The body is larger than the {max_bytes}-byte limit.", status=413)
    if not body.strip():
        raise invalid("structure", "The body is empty.")
    return parse_xml(body) if is_xml(body, content_type) else parse_json(body)


def parse_json(body: bytes) -> Any:
    if b"\\" in body and b"\\u00" in body and CONTROL.search(body):  # one byte is found faster: most bodies have none
        raise invalid("structure", "The body holds control characters, which FHIR strings may not contain.")
    try:
        parsed = orjson.loads(body.removeprefix(UTF8_BOM))  # editors on Windows often add one
    except orjson.JSONDecodeError as error:
        reason = "it is nested too deeply" if "recursion" in str(error) else f"{error.msg} at position {error.pos}"
        raise invalid("structure", f"The body is not valid JSON: {reason}.") from None
    # Items nest only as deep as their Questionnaire (the checker follows nothing else); extensions and
    # contained resources can nest freely, and what is written back and rendered as XML must stay shallow.
    if (b'"extension"' in body or b'"contained"' in body) and too_deep(parsed, MAX_JSON_DEPTH):
        raise invalid("too-costly", f"The body is nested more than {MAX_JSON_DEPTH} levels deep.")
    return parsed


def too_deep(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests more than `limit` levels (iteratively: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_xml(body: bytes) -> dict:
    if DECLARATION.search(body):
        raise invalid("security", NO_DTD)
    xml_limits.check_bytes(body)
    try:
        root = etree.fromstring(body, parser=xml_parser())
    except etree.XMLSyntaxError as error:
        raise invalid("structure", f"The body is not well-formed XML: {error.msg.rstrip('.')}.") from None
    if root.getroottree().docinfo.doctype:  # however it got past the scan (e.g. another encoding)
        raise invalid("security", NO_DTD)
    qname = etree.QName(root)
    if qname.namespace != FHIR_NS:
        raise invalid("structure", f"The root element must be in the FHIR namespace {FHIR_NS}.")
    xml_limits.check_tree(root)
    return _to_json(root, qname.localname)


def _to_json(root: etree._Element, resource_type: str) -> dict:
    from fhir.resources.R4B import get_fhir_model_class  # slow import; XML is the rare path
    from pydantic import ValidationError

    try:
        model_class = get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        raise invalid("not-supported", f"{resource_type!r} is not a FHIR R4 resource type.") from None
    try:
        model = model_class.model_validate_xml(etree.tostring(root), xmlparser=xml_parser())
    except ValidationError as error:
        fields = {f.alias or name for name, f in model_class.model_fields.items()}
        raise InvalidInput([model_issue(resource_type, e, fields) for e in error.errors()[:100]]) from None
    except (ValueError, TypeError, KeyError, AttributeError):
        raise invalid("structure", f"The XML is not a valid FHIR {resource_type}.") from None
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)
