"""Slow clients cannot hold the service: deadlines for a request's headers and body.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) and caps
connections (`limit_concurrency`, then 503), but waits for ever for headers
that trickle in, and the app would wait for ever for a body that does.
`HeaderDeadline` closes a connection whose request line and headers are
not all in within HEADER_SECONDS of it starting; `BodyDeadline` answers
408 when a body stalls BODY_GAP_SECONDS between chunks or takes longer than
BODY_SECONDS in all (a 1 MiB body at a slow 64 kbit/s takes 2 minutes: this
allows 35 kB/s; a screening response is 3 kB).
"""

from __future__ import annotations

import asyncio
import time
from asyncio import TimerHandle

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from plugin.screening.outcome import invalid

HEADER_SECONDS = 10.0
BODY_GAP_SECONDS = 10.0
BODY_SECONDS = 30.0
KEEP_ALIVE_SECONDS = 5  # uvicorn's timeout_keep_alive: an idle connection is closed after this
MAX_CONNECTIONS = 1000  # uvicorn's limit_concurrency: past this many connections or requests, 503


class HeaderDeadline(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline from a request's first byte to its last header."""

    _deadline: TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(HEADER_SECONDS, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()


class BodyDeadline:
    """ASGI middleware: a request body that stalls or crawls is refused with 408 (nothing was read into use)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()

        async def receiving() -> Message:
            left = BODY_SECONDS - (time.monotonic() - started)
            try:  # asyncio.timeout, not wait_for: a timer on this task instead of a new task for every chunk
                async with asyncio.timeout(min(BODY_GAP_SECONDS, max(left, 0.001))):
                    return await receive()
            except TimeoutError:
                raise invalid("timeout", "The request body arrived too slowly; send it again.", status=408) from None

        await self.app(scope, receiving, send)
