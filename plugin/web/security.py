"""Who may call what, and the headers that keep the HTML pages safe in a browser.

Tokens and secrets are compared in constant time (`hmac.compare_digest`),
so response timing says nothing about how much of a guess was right. A
refusal says only that access was refused: never which part was wrong.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from plugin.screening.outcome import InvalidInput, Issue
from plugin.screening.references import valid_id

Endpoint = Callable[[Request], Awaitable[Response]]

NOTIFY_HEADER = "x-notification-secret"
# The pages load nothing from elsewhere: their script and styles are served by the plugin itself.
PAGE_HEADERS = {
    # connect-src: the form's script sends the answers so far to the plugin itself (a red flag answered Yes).
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    "Cache-Control": "no-store",  # answers and results must not linger in shared caches
}


# FHIR answers carry patient data too: no shared cache may keep them.
API_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
STATIC_HEADERS = {"X-Content-Type-Options": "nosniff"}


LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


def loopback(host: str) -> bool:
    """This machine: the only place plain http may carry a secret or a key without crossing a network."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def refused(status: int = 401) -> InvalidInput:
    return InvalidInput([Issue("login" if status == 401 else "forbidden", "Access refused.")], status)


def require_bearer(request: Request, token: str | None) -> None:
    """When a token is configured, the request must carry `Authorization: Bearer <token>`."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not same(given.strip(), token):
        raise refused(401)


def require_notify_secret(request: Request, secret: str | None) -> None:
    """Notifications need the shared secret; with none configured they are refused outright."""
    if secret is None or not same(request.headers.get(NOTIFY_HEADER), secret):
        raise refused(403 if secret is None else 401)


class PageHeaders:
    """ASGI middleware: security headers on every HTML answer; nosniff and no-store on the others."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                is_html = any(k == b"content-type" and v.startswith(b"text/html") for k, v in headers)
                static = scope["path"].startswith("/static/")
                extra = PAGE_HEADERS if is_html else STATIC_HEADERS if static else API_HEADERS
                present = {k.lower() for k, _ in headers}
                headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()
                            if k.lower().encode() not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)


def checked_id(endpoint: Endpoint) -> Endpoint:
    """An endpoint whose `{id}` path parameter is a FHIR id (never `.` or `..`, which would climb the store's
    URL), refused with 400 before the endpoint sees it."""

    @functools.wraps(endpoint)
    async def guarded(request: Request) -> Response:
        if not valid_id(request.path_params.get("id")):
            raise InvalidInput([Issue("value", "The id in the URL is not a valid FHIR id ([A-Za-z0-9-.]{1,64}, "
                                               "not . or ..).")])
        return await endpoint(request)

    return guarded
