"""The ASGI app: routes, middleware, and one place where every error becomes an OperationOutcome."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from plugin.ehr import cds_hooks, populate_api, smart_launch
from plugin.fhir import formats
from plugin.fhir.client import FhirError
from plugin.observability import CLIENT_GONE, LOG, RequestMetrics, configure_logging, route_of
from plugin.screening.outcome import InvalidInput, Issue, operation_outcome
from plugin.settings import ServiceSettings, service_settings
from plugin.stores.store import Store
from plugin.web import api, pages, results_pages
from plugin.web.openapi import openapi
from plugin.web.security import PageHeaders, checked_id
from plugin.web.service import Service
from plugin.web.service import service as service_of
from plugin.web.slow_clients import BodyDeadline

READY_WITHIN = 3.0  # seconds the store has to answer a readiness probe
ISSUE_CODES = {404: "not-found", 405: "not-supported", 406: "not-supported", 413: "too-costly", 415: "not-supported"}


def create_app(settings: ServiceSettings, store: Store | None = None) -> Starlette:
    service = Service(settings, store)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.store.__aenter__()
        formats.start_xml_workers()
        try:
            yield
        finally:
            await service.close()

    middleware = [Middleware(RequestMetrics, metrics=service.metrics), Middleware(CatchAll), Middleware(PageHeaders),
                  Middleware(BodyDeadline, gap_seconds=settings.body_gap_seconds, total_seconds=settings.body_seconds)]
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST", "PUT"], expose_headers=["Location", "ETag"],
                                     allow_headers=["Authorization", "Content-Type", "Accept"]))
    app = Starlette(routes=routes(), middleware=middleware, lifespan=lifespan, exception_handlers={
        InvalidInput: refused, FhirError: store_failed, HTTPException: http_error})
    app.state.service = service
    return app


def from_environment() -> Starlette:
    """The app as `backpain-screen serve` runs it (uvicorn's factory, once per worker), set by the environment."""
    settings = service_settings()
    configure_logging(settings.log_level)
    return create_app(settings)


class FhirId(Convertor[str]):
    """A path segment that is a FHIR id, so `/QuestionnaireResponse/$extract` is never read as one."""

    regex = r"[A-Za-z0-9\-.]{1,64}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("fhir_id", FhirId())


def routes() -> list:
    return [
        # The busiest first: the router tries each route's pattern in turn (these two paths are literal,
        # so no route after them could have matched them first; for the others the order is unchanged).
        Route("/QuestionnaireResponse/$extract", api.extract, methods=["POST"]),
        Route("/QuestionnaireResponse", api.ingest, methods=["POST"]),
        Route("/", pages.form_page, methods=["GET"]),
        Route("/form", pages.submitted, methods=["POST"]),
        Route("/form/progress", pages.progress, methods=["POST"]),
        Route("/results", results_pages.index, methods=["GET"]),
        Route("/results/{id}", checked_id(results_pages.results), methods=["GET"]),
        Route("/launch", smart_launch.launch, methods=["GET"]),
        Route("/launch/callback", smart_launch.callback, methods=["GET"]),
        Route("/metadata", api.metadata, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/Questionnaire", api.search_definitions, methods=["GET"]),
        Route("/Questionnaire/$populate", populate_api.populate_type, methods=["POST"]),  # before {id}
        Route("/Questionnaire/{id}/$populate", checked_id(populate_api.populate_instance), methods=["POST"]),
        Route("/Questionnaire/{id}", checked_id(api.read_definition), methods=["GET"]),
        Route("/CodeSystem", api.search_definitions, methods=["GET"]),
        Route("/CodeSystem/{id}", checked_id(api.read_definition), methods=["GET"]),
        Route("/StructureDefinition", api.search_definitions, methods=["GET"]),
        Route("/StructureDefinition/{id}", checked_id(api.read_definition), methods=["GET"]),
        Route("/OperationDefinition", api.search_definitions, methods=["GET"]),
        Route("/OperationDefinition/{id}", checked_id(api.read_definition), methods=["GET"]),
        Route("/QuestionnaireResponse/{id:fhir_id}/$extract", checked_id(api.extract_stored), methods=["POST"]),
        Route("/QuestionnaireResponse/{id}", checked_id(api.notified_with_payload), methods=["PUT"]),
        Route("/QuestionnaireResponse/{id:fhir_id}", checked_id(api.read_stored), methods=["GET"]),
        Route("/QuestionnaireResponse/{id:fhir_id}/_history/{vid:fhir_id}", checked_id(api.read_stored),
              methods=["GET"]),
        Route("/notify/QuestionnaireResponse/{id}", checked_id(api.notified_with_payload), methods=["PUT"]),
        Route("/notify", api.notified_without_payload, methods=["POST"]),
        Route("/cds-services", cds_hooks.discovery, methods=["GET"]),
        Route(f"/cds-services/{cds_hooks.SERVICE_ID}", cds_hooks.call, methods=["POST"]),
        Route(f"/cds-services/{cds_hooks.SERVICE_ID}/feedback", cds_hooks.feedback, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Mount("/static", StaticFiles(packages=[("plugin.web", "static")]), name="static"),
    ]


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when the store answers a search."""
    svc = service_of(request)
    try:  # a probe must answer quickly: no waiting out the client's retries
        await asyncio.wait_for(svc.store.search_page("Questionnaire", {"_summary": "count"}), READY_WITHIN)
        writable = getattr(svc.store, "check_writable", None)  # the embedded store: a file that reads may not write
        if writable is not None:
            await asyncio.wait_for(writable(), READY_WITHIN)
    except (FhirError, TimeoutError) as error:
        svc.metrics.store_errors.inc()
        LOG.warning("store not ready", extra={"event": "readyz", "store": svc.store_name,
                                              "status": getattr(error, "status", None)})
        return JSONResponse({"status": "unavailable", "store": svc.store_name}, status_code=503)
    return JSONResponse({"status": "ready", "store": svc.store_name})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(service_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


def outcome_reply(request: Request, issues: list[Issue], status: int, headers: dict | None = None) -> Response:
    if pages.wants_html(request):
        return pages.error_page(request, issues, status, headers)
    return formats.reply(operation_outcome(issues), formats.wanted(request), status, headers)


async def refused(request: Request, error: Exception) -> Response:
    assert isinstance(error, InvalidInput)
    service_of(request).metrics.refused.labels(str(error.status)).inc()
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return outcome_reply(request, error.issues, error.status, headers)


async def store_failed(request: Request, error: Exception) -> Response:
    """The store refused or could not be reached: the caller keeps the response and may retry."""
    assert isinstance(error, FhirError)
    svc = service_of(request)
    svc.metrics.store_errors.inc()
    # The embedded store's own refusal names its cause (full disk, read-only file) and never patient data;
    # a FHIR server's error text may carry search values, so only its status is logged.
    reason = str(error) if svc.store_name == "embedded" and error.status == 503 else None
    LOG.warning("store failed", extra={"event": "store-error", "store": svc.store_name, "status": error.status,
                                       "reason": reason})
    if error.status in (400, 404, 409, 412, 422):  # the store refused what this request asked for
        diagnostics = f"The store refused the write (HTTP {error.status}); nothing was written."
        return outcome_reply(request, [Issue("processing", diagnostics)], 409 if error.status == 412 else 422)
    diagnostics = "The store is unavailable; nothing was written. Try again later."
    return outcome_reply(request, [Issue("transient", diagnostics)], 503, {"Retry-After": "5"})


async def http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    code = ISSUE_CODES.get(error.status_code, "processing")
    issue = Issue(code, f"{error.detail.rstrip('.')}." if error.detail else "Not found.")
    return outcome_reply(request, [issue], error.status_code, dict(error.headers or {}))


class CatchAll:
    """ASGI middleware: a bug is logged by its type only (never the request's content or a traceback,
    which could quote a patient's answers) and answered with a plain OperationOutcome."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except ClientDisconnect:  # the caller hung up mid-request: nothing to answer, and no fault of ours
            scope[CLIENT_GONE] = True
            LOG.info("client disconnected", extra={"event": "client-disconnected", "route": route_of(scope)})
        except Exception as error:
            LOG.error("unexpected error", extra={"event": "crash", "reason": type(error).__name__})
            if scope["type"] != "http":
                raise
            if started:
                return  # the answer is half sent: nothing better to do than stop
            outcome = operation_outcome([Issue("exception", "An internal error occurred.")])
            await formats.reply(outcome, formats.wanted(Request(scope)), 500)(scope, receive, send)
