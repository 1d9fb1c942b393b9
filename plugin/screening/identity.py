"""Who a response is, and the identifiers of what is written for it (SCREENING.md §4).

Identifiers are deterministic (UUIDv5 of the response's identity and the
result code), so re-processing a response yields the same conditional
creates and the server keeps one copy. The patient is part of the identity.
"""

from __future__ import annotations

import hashlib
from urllib.parse import quote

import orjson

from plugin.screening import systems

NAMESPACE = bytes.fromhex("5f1b2a0e8c3d4b6a9e7f10213243a5b6")  # the plugin's UUIDv5 namespace
_HASHED_NAMESPACE = hashlib.sha1(NAMESPACE)  # copied for each name: the namespace is hashed once
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}  # RFC 4122 variant bits


def uuid5(name: str) -> str:
    """RFC 4122 version-5 UUID of `name` in the plugin's namespace (same as uuid.uuid5, faster)."""
    sha1 = _HASHED_NAMESPACE.copy()
    sha1.update(name.encode())
    h = sha1.hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def response_key(qr: dict) -> str:
    """What identifies a response across replays and amendments: identifier, else id, else its content.

    The patient is part of it, so a response that reuses another patient's
    id or identifier can never reach that patient's results. A response with
    neither is written with an identifier made from its content
    (`own_identifier`), and its key is the one that identifier gives: so the
    stored copy, read back later (by sync, by the results view), has the same key.
    """
    subject = qr["subject"]["reference"]
    given = given_identifier(qr)
    if given is None and qr.get("id"):
        return f"{subject}|id:{qr['id']}"
    ident = given or own_identifier(qr)
    return f"{subject}|identifier:{ident.get('system', '')}|{ident['value']}"


def given_identifier(qr: dict) -> dict | None:
    """The response's own identifier, if it has a usable one."""
    ident = qr.get("identifier")
    return ident if isinstance(ident, dict) and isinstance(ident.get("value"), str) and ident["value"] else None


def own_identifier(qr: dict) -> dict:
    """The identifier a response without one (and without an id) is written under: made from its content."""
    # An empty list is the element's absence (FHIR JSON allows no empty arrays; the copy written drops them).
    content = {k: v for k, v in qr.items() if k not in ("id", "meta", "text", "status") and v != []}
    digest = hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return {"system": systems.SID_QR, "value": uuid5(f"content:{digest}")}


def token(system: str | None, value: str, *, in_url: bool = True) -> str:
    """A token search value from caller data: FHIR-escaped, and URL-encoded when it goes into a URL as it is
    (an HTTP client's `params` encode it themselves). Ours are UUIDs and need neither."""

    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,").replace("$", "\\$")

    joined = f"{escape(system)}|{escape(value)}" if system else escape(value)
    return quote(joined, safe=":/|") if in_url else joined
