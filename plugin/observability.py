"""Structured logs and Prometheus metrics for the service.

Logs are JSON lines with what an operator needs to follow a request (route,
status, time, response id, outcome code) and never what a patient answered
or who they are: a log line is built from named fields only, never from a
resource. Metrics live in a registry per app, so tests can start many.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOG = logging.getLogger("backpain_screen")
SAFE_FIELDS = ("event", "method", "route", "status", "ms", "response", "outcome", "written", "reason", "store")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
                "message": record.getMessage()}
        line.update({k: v for k in SAFE_FIELDS if (v := getattr(record, k, None)) is not None})
        return orjson.dumps(line).decode()


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    LOG.handlers[:] = [handler]
    LOG.setLevel(level.upper())
    LOG.propagate = False


def event(message: str, **fields: object) -> None:
    """One log line; only the SAFE_FIELDS are kept."""
    LOG.info(message, extra={k: v for k, v in fields.items() if k in SAFE_FIELDS})


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("backpain_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("backpain_http_request_seconds", "HTTP request time by route", ["route"],
                                 registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.outcomes = Counter("backpain_screening_outcomes", "Scored responses by outcome code", ["outcome"],
                                registry=self.registry)
        self.refused = Counter("backpain_refused_inputs", "Requests refused as bad input, by status", ["status"],
                               registry=self.registry)
        self.store_errors = Counter("backpain_store_errors", "Store or FHIR server failures", registry=self.registry)
        self.in_flight = Gauge("backpain_http_in_flight", "Requests being handled", registry=self.registry)
        self._children: dict[tuple[str, str, int], tuple] = {}  # labels() costs more than the count itself

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(method, route, str(status)), self.latency.labels(route))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


CLIENT_GONE = "backpain.client_gone"  # set in the scope when the caller disconnected before its answer
CLIENT_CLOSED = 499  # counted as nginx logs it ("client closed request"), not as a 500


class RequestMetrics:
    """ASGI middleware: counts and times each request by its route template (never its path: ids stay out)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_flight.dec()
            route = route_of(scope)
            status = CLIENT_CLOSED if scope.get(CLIENT_GONE) else status
            elapsed = time.perf_counter() - start
            self.metrics.observe(scope["method"], route, status, elapsed)
            if route != "/metrics" and LOG.isEnabledFor(logging.DEBUG):
                LOG.debug("request", extra={"event": "request", "method": scope["method"], "route": route,
                                            "status": status, "ms": round(elapsed * 1000, 2)})


def route_of(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
