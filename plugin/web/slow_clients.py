"""Slow clients cannot hold the service: deadlines for a request's headers and body.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) and caps
connections (`limit_concurrency`, then 503), but waits for ever for headers
that trickle in, and the app would wait for ever for a body that does.
`HeaderDeadline` closes a connection whose request line and headers are
not all in within `header_seconds` of it starting; `BodyDeadline` answers
408 when a body stalls `body_gap_seconds` between chunks or takes longer than
`body_seconds` in all (a 1 MiB body at a slow 64 kbit/s takes 2 minutes: the
default 30 s allows 35 kB/s; a screening response is 3 kB). The limits are
settings (plugin/settings.py); `serve` hands them to uvicorn and the app.
"""

from __future__ import annotations

import asyncio
import time
from asyncio import TimerHandle
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from plugin.screening.outcome import invalid

MAX_CONNECTIONS = 1000  # uvicorn's limit_concurrency: past this many connections or requests, 503


class HeaderDeadline(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline from a request's first byte to its last header.

    `serve` gives uvicorn `functools.partial(HeaderDeadline, header_seconds=...)`: a partial of a module-level
    class pickles by name, so each worker process gets the same limit."""

    _deadline: TimerHandle | None = None

    def __init__(self, *args: Any, header_seconds: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_seconds = header_seconds

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
        self._deadline = self.loop.call_later(self.header_seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()


class BodyDeadline:
    """ASGI middleware: a request body that stalls or crawls is refused with 408 (nothing was read into use)."""

    def __init__(self, app: ASGIApp, *, gap_seconds: float, total_seconds: float) -> None:
        self.app, self.gap_seconds, self.total_seconds = app, gap_seconds, total_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()

        async def receiving() -> Message:
            left = self.total_seconds - (time.monotonic() - started)
            try:  # asyncio.timeout, not wait_for: a timer on this task instead of a new task for every chunk
                async with asyncio.timeout(min(self.gap_seconds, max(left, 0.001))):
                    return await receive()
            except TimeoutError:
                raise invalid("timeout", "The request body arrived too slowly; send it again.", status=408) from None

        await self.app(scope, receiving, send)
