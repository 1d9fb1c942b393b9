"""FHIR formats over HTTP: which one a caller sent and wants, reading bodies within limits, replying.

JSON and XML (`application/fhir+json`, `application/fhir+xml`), chosen by
`_format`, then Accept, as the FHIR REST spec orders them. XML is parsed by
`parsing` (hardened lxml) and written through fhir.resources (R4B): the
rare path, so its cost does not matter.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from plugin.screening.outcome import invalid

JSON = "application/fhir+json"
XML = "application/fhir+xml"
MEDIA_TYPES = {
    "json": JSON, "application/json": JSON, JSON: JSON, "text/json": JSON,
    "xml": XML, "application/xml": XML, XML: XML, "text/xml": XML,
}


def wanted(request: Request) -> str:
    """The format to answer in: `_format`, else the FHIR type Accept rates highest (q), else JSON."""
    asked = request.query_params.get("_format")
    if asked:  # an unencoded "+" arrives as a space
        return MEDIA_TYPES.get(asked.split(";")[0].strip().lower().replace(" ", "+"), JSON)
    best, best_q = JSON, 0.0
    for part in request.headers.get("accept", "").split(","):
        media, *params = part.split(";")
        found = MEDIA_TYPES.get(media.strip().lower())
        if found and (q := _quality(params)) > best_q:
            best, best_q = found, q
    return best


def _quality(params: list[str]) -> float:
    for param in params:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0


def sent(request: Request) -> str | None:
    """The format of the body: from Content-Type; None when none is given (the parser looks)."""
    content_type = request.headers.get("content-type")
    if not content_type:
        return None
    media = content_type.split(";")[0].strip().lower()
    if media not in MEDIA_TYPES:
        raise invalid("not-supported", f"Content-Type {media!r} is not accepted: send {JSON} or {XML}.",
                      status=415)
    return MEDIA_TYPES[media]


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (before it is all read)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> Exception:
    return invalid("too-costly", f"The body is larger than the {limit}-byte limit.", status=413)


def reply(resource: dict, fmt: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = to_xml(resource) if fmt == XML else orjson.dumps(resource)
    return Response(body, status_code=status, headers=headers, media_type=f"{fmt}; charset=utf-8")


def to_xml(resource: dict) -> bytes:
    """FHIR XML by way of the R4B model; what the model refuses (JSON the checker let through but XML
    cannot carry) is the caller's content, so it is a 422, never a crash."""
    from fhir.resources.R4B import get_fhir_model_class  # slow import; XML is the rare path
    from pydantic import ValidationError

    try:
        return get_fhir_model_class(resource["resourceType"]).model_validate(resource).model_dump_xml()
    except (ValidationError, ValueError, TypeError):
        raise invalid("structure", "The response holds content that is not valid FHIR, so the answer cannot be "
                      "given as XML; ask for JSON, or correct the response.", status=422) from None
