"""A searchset Bundle over matches already in hand, paged as FHIR asks: `_count`, `self` and `next` links.

The plugin's own searches (the definitions it publishes) are small lists in
memory, so a page is an offset into them: `_offset` in the links, as Medplum
and HAPI's `_getpagesoffset` do. A `self` link names the page as asked, so a
client can tell pages apart; every entry has its `fullUrl`.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlencode

from plugin.screening.outcome import invalid

DEFAULT_COUNT = 20  # as the HAPI JPA starter
MAX_COUNT = 200


def page_size(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_COUNT
    if not raw.isdigit():
        raise invalid("invalid", "_count must be a whole number.", "_count")
    return min(int(raw), MAX_COUNT)


def searchset(base: str, resource_type: str, found: Sequence[dict], params: dict[str, str]) -> dict:
    """One page of `found` (`_count`, `_offset` from `params`) with total, links and full URLs."""
    count, offset = page_size(params.get("_count")), _offset(params.get("_offset"))
    asked = {k: v for k, v in params.items() if k not in ("_offset", "_format")}
    links = [_link("self", base, resource_type, asked, offset)]
    if count and offset + count < len(found):
        links.append(_link("next", base, resource_type, asked, offset + count))
    if count and offset:
        links.append(_link("previous", base, resource_type, asked, max(offset - count, 0)))
    bundle: dict = {"resourceType": "Bundle", "type": "searchset", "total": len(found), "link": links}
    page = found[offset:offset + count] if params.get("_summary") != "count" else []
    if page:  # FHIR JSON has no empty arrays
        bundle["entry"] = [{"fullUrl": f"{base}/{resource_type}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                           for r in page]
    return bundle


def _offset(raw: str | None) -> int:
    if raw is None:
        return 0
    if not raw.isdigit():
        raise invalid("invalid", "_offset must be a whole number.", "_offset")
    return int(raw)


def _link(relation: str, base: str, resource_type: str, params: dict[str, str], offset: int) -> dict:
    query = urlencode({**params, "_offset": str(offset)} if offset else params)
    return {"relation": relation, "url": f"{base}/{resource_type}" + (f"?{query}" if query else "")}
