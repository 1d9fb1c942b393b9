"""FHIR formats over HTTP: which one a caller sent and wants, reading bodies within limits, replying.

JSON and XML (`application/fhir+json`, `application/fhir+xml`), chosen by
`_format`, then Accept, as the FHIR REST spec orders them. XML is parsed by
`parsing` (hardened lxml) and written through fhir.resources (R4B): the
rare path, so its cost does not matter.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import anyio
import anyio.to_thread
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from plugin.screening.outcome import InvalidInput, Issue, invalid
from plugin.screening.parsing import is_xml, parse_body

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


def return_preference(request: Request) -> str:
    """What a create answers with (FHIR RESTful API, `Prefer: return=`): `minimal`, `OperationOutcome` or
    `representation` (the default, as HAPI FHIR does)."""
    for part in request.headers.get("prefer", "").split(","):
        name, _, value = part.partition("=")
        value = value.strip().strip('"')
        if name.strip().lower() == "return" and value in ("minimal", "OperationOutcome"):
            return value
    return "representation"


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


ON_LOOP_BYTES = 16 * 1024  # smaller JSON parses in well under a millisecond: a hop elsewhere would cost more
PARSING_AT_ONCE = 2  # the machine's cores: more parses at once would only share them
XML_BUDGET_SECONDS = 10.0  # queue and parse; the limits keep a parse near 0.5 s: past this, refused (413)
_xml_pool: ProcessPoolExecutor | None = None  # kept for the process's life (every app in it shares it)
_xml_pool_owner = 0


async def read_resource(request: Request, limit: int) -> Any:
    """The body parsed (JSON or XML), refused with 413 past `limit`.

    XML is parsed and converted in a worker process (fhir.resources holds
    the GIL, so a thread would still stall the event loop), at most two at
    once, within a time budget; `xml_limits` bounds the work before it
    starts. JSON beyond a few kB goes to a thread (orjson is fast; the
    hop keeps large bodies off the loop).
    """
    body = await read_body(request, limit)
    content_type = sent(request)
    if is_xml(body, content_type):
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(_xml_parsers(), parse_in_worker, body, content_type, limit)
        try:
            parsed, issues, status = await asyncio.wait_for(work, XML_BUDGET_SECONDS)
        except TimeoutError:
            raise invalid("too-costly", "The XML took too long to read.", status=413) from None
        except BrokenProcessPool:  # a worker died (killed, out of memory): start afresh for the next request
            global _xml_pool
            _xml_pool = None
            raise invalid("transient", "The XML could not be read just now; send it again.", status=503) from None
        if issues:
            raise InvalidInput(issues, status)
        return parsed
    if len(body) <= ON_LOOP_BYTES:
        return parse_body(body, content_type, limit)
    return await anyio.to_thread.run_sync(parse_body, body, content_type, limit)


def _xml_parsers() -> ProcessPoolExecutor:
    """The worker processes for XML (spawned, as the service runs threads; stopped when the process exits)."""
    global _xml_pool, _xml_pool_owner
    if _xml_pool is None or _xml_pool_owner != os.getpid():  # one per process, never one inherited by a fork
        _xml_pool = ProcessPoolExecutor(PARSING_AT_ONCE, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=warm_up)
        _xml_pool_owner = os.getpid()
    return _xml_pool


def start_xml_workers() -> None:
    """Starts the XML workers ahead of need (at service start-up): a spawned worker takes a second or two to
    import the models, which the first XML request should not wait for."""
    pool = _xml_parsers()
    for _ in range(PARSING_AT_ONCE):
        pool.submit(int)


def parse_in_worker(body: bytes, content_type: str | None, limit: int) -> tuple[Any, list[Issue], int]:
    """`parse_body` in a worker process: its refusal comes back as a value (exceptions do not pickle well)."""
    try:
        return parse_body(body, content_type, limit), [], 200
    except InvalidInput as error:
        return None, error.issues, error.status


def warm_up() -> None:
    """Lowers the worker's CPU priority (the service's own process answers first when cores are
    scarce) and imports the R4B models once, so the first XML request does not pay for it."""
    os.nice(10)
    parent = os.getppid()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="parent-watch").start()
    from plugin.screening import data

    for resource_type in ("Questionnaire", "CodeSystem"):  # imports every model class a big answer uses
        for resource in data.definitions(resource_type):
            to_xml(resource)
    to_xml({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "invalid"}]})


def _exit_with(parent: int) -> None:
    """A worker whose service was killed (SIGKILL, out of memory) ends too, instead of idling on as an orphan."""
    while os.getppid() == parent:
        time.sleep(2)
    os._exit(0)


def too_large(limit: int) -> Exception:
    return invalid("too-costly", f"The body is larger than the {limit}-byte limit.", status=413)


def reply(resource: dict, fmt: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    if fmt == XML:
        return XmlReply(resource, status, headers)
    return Response(orjson.dumps(resource), status_code=status, headers=headers, media_type=f"{JSON}; charset=utf-8")


class XmlReply(Response):
    """A FHIR XML answer, written in an XML worker process when it is sent: fhir.resources takes 0.2 s and
    more for a big resource (the Questionnaires), which the event loop must not wait for."""

    def __init__(self, resource: dict, status: int, headers: dict[str, str] | None) -> None:
        self.resource = resource
        super().__init__(b"", status_code=status, headers=headers, media_type=f"{XML}; charset=utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.get_running_loop().run_in_executor(_xml_parsers(), xml_in_worker, self.resource)
        body, issues, status = await work
        if issues:
            raise InvalidInput(issues, status)
        self.body = body
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.raw_headers.append((b"content-length", str(len(body)).encode()))
        await super().__call__(scope, receive, send)


def xml_in_worker(resource: dict) -> tuple[bytes, list[Issue], int]:
    """`to_xml` in a worker process (its refusal comes back as a value)."""
    try:
        return to_xml(resource), [], 200
    except InvalidInput as error:
        return b"", error.issues, error.status


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
