"""Modifier extensions: FHIR's rule is that one a system does not understand changes the meaning of the
element that carries it, so the element (here, the whole response) must not be processed as if it were
not there (http://hl7.org/fhir/R4/extensibility.html#modifierExtension). The plugin understands none, so
a response that carries one anywhere (itself, an item, an answer, a contained resource) is refused.
"""

from __future__ import annotations

from typing import Any

import orjson

from plugin.screening.outcome import Issue

UNDERSTOOD: frozenset[str] = frozenset()  # modifier extension urls the plugin knows the meaning of


def modifier_issues(resource: dict, root: str, serialized: bytes | None = None) -> list[Issue]:
    """One issue per element that carries a modifier extension the plugin does not understand.

    `serialized`: the resource as compact JSON, when the caller has it already.
    """
    try:
        if b'"modifierExtension"' not in (serialized or orjson.dumps(resource)):  # the usual case, in microseconds
            return []
    except (orjson.JSONEncodeError, TypeError):
        pass  # what JSON cannot carry is reported by the checks that follow; still look for modifiers
    return [Issue("not-supported", "A modifier extension the service does not understand changes the meaning "
                  f"of this element ({url}): the response cannot be scored.", f"{path}.modifierExtension")
            for path, url in _modifiers(resource, root)]


def _modifiers(node: Any, root: str) -> list[tuple[str, str]]:
    found, stack = [], [(node, root)]
    while stack and len(found) < 100:
        value, path = stack.pop()
        if isinstance(value, dict):
            for url in _unknown(value.get("modifierExtension")):
                found.append((path, url))
            stack.extend((child, f"{path}.{key}") for key, child in value.items() if key != "modifierExtension")
        elif isinstance(value, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(value))
    return sorted(found)


def _unknown(extensions: Any) -> list[str]:
    if extensions in (None, []):
        return []
    if not isinstance(extensions, list):
        return ["?"]
    urls = [e.get("url") if isinstance(e, dict) else None for e in extensions]
    return [url if isinstance(url, str) else "no url" for url in urls if url not in UNDERSTOOD]
