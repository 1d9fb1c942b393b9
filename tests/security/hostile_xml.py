"""Hostile FHIR XML bodies of a few hundred kB each (issue #14 item 4), and heavy ones just inside the limits."""

from __future__ import annotations

ROOT = '<QuestionnaireResponse xmlns="http://hl7.org/fhir"><status value="completed"/>'
END = "</QuestionnaireResponse>"


def deep(levels: int = 200) -> bytes:
    return (ROOT + '<item><linkId value="x"/>' * levels + "</item>" * levels + END).encode()


def namespace_declarations_on_the_root(count: int = 8000) -> bytes:
    declarations = " ".join(f'xmlns:n{i}="urn:x:{i}"' for i in range(count))
    return ROOT.replace('fhir"', f'fhir" {declarations}').encode() + END.encode()


def namespace_declarations_below_the_root(count: int = 3000) -> bytes:
    inner = "".join(f'<item xmlns:n{i}="urn:x:{i}"><linkId value="a"/></item>' for i in range(count))
    return (ROOT + inner + END).encode()


def one_foreign_namespace_below_the_root() -> bytes:
    return (ROOT + '<item xmlns="urn:other"><linkId value="a"/></item>' + END).encode()


def attributes(count: int = 20000) -> bytes:
    names = " ".join(f'a{i}="1"' for i in range(count))
    return (ROOT.replace('<status value="completed"/>', f'<status value="completed" {names}/>') + END).encode()


def elements(items: int = 12000) -> bytes:
    return (ROOT + '<item><linkId value="a"/><text value="b"/></item>' * items + END).encode()


def long_text(size: int = 900_000) -> bytes:
    narrative = f'<text><status value="generated"/><div xmlns="http://www.w3.org/1999/xhtml">{"a" * size}</div></text>'
    return (ROOT + narrative + END).encode()


HOSTILE = {
    "deep": deep(), "namespaces-on-root": namespace_declarations_on_the_root(),
    "namespaces-below-root": namespace_declarations_below_the_root(),
    "foreign-namespace-below-root": one_foreign_namespace_below_the_root(),
    "attributes": attributes(), "elements": elements(),
}


def heavy_inside_the_limits() -> bytes:
    """2,400 items with 8 attributes each: accepted by the limits, about 0.5 s of conversion."""
    items = "".join(f'<item id="i{i}" a="1" b="2" c="3" d="4" e="5" f="6" g="7"><linkId value="a"/></item>'
                    for i in range(2400))
    return (ROOT + items + END).encode()
