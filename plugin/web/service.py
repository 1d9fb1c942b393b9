"""What the running service holds: settings, the Screener, the store, metrics, the catch-up loop."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.requests import Request

from plugin.fhir.client import FhirError
from plugin.observability import Metrics, event
from plugin.screening.pipeline import Screener
from plugin.settings import ServiceSettings
from plugin.stores.store import Store, open_store
from plugin.stores.sync import SyncBusy, default_state_file, sync
from plugin.stores.writeback import Written

BUSY_RETRIES = 10  # a catch-up that finds another sync running tries again this many times...
BUSY_WAIT = 2.0  # ...this many seconds apart


def service(request: Request) -> Service:
    """The running service, from a request to it."""
    return request.app.state.service


class Service:
    def __init__(self, settings: ServiceSettings, store: Store | None = None) -> None:
        self.settings = settings
        self.screener = Screener(settings.scoring())
        self.store = store or open_store(settings)
        self.metrics = Metrics()
        self.catching_up: asyncio.Task | None = None
        self.again = False  # a notification came while a catch-up ran: run once more after it

    @property
    def store_name(self) -> str:
        return "fhir-server" if self.settings.fhir_base_url else "embedded"

    async def close(self) -> None:
        if self.catching_up:
            self.catching_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.catching_up
        await self.store.__aexit__(None, None, None)

    def count(self, label: str) -> None:
        self.metrics.outcomes.labels(label).inc()

    def log_written(self, label: str, written: list[Written]) -> None:
        response = next((w.location for w in written if w.location.startswith("QuestionnaireResponse/")), None)
        event("scored", event="scored", response=response, outcome=label, written=sum(w.changed for w in written))

    def catch_up(self) -> None:
        """Starts a catch-up sync in the background; notifications arriving meanwhile make it run once more."""
        if self.catching_up and not self.catching_up.done():
            self.again = True
            return
        self.catching_up = asyncio.get_running_loop().create_task(self._catch_up())

    async def _catch_up(self) -> None:
        busy = 0
        while True:
            self.again = False
            try:
                counts = await sync(self.store, self.screener, default_state_file())
                event("catch-up done", event="sync", written=counts.get("written", 0))
                busy = 0
            except SyncBusy:  # another worker or a cron sync: it may be past this change already, so wait and retry
                busy += 1
                event("catch-up waits: another sync is running", event="sync", reason="busy")
                if busy <= BUSY_RETRIES:
                    self.again = True
                    await asyncio.sleep(BUSY_WAIT)
            except FhirError as error:
                self.metrics.store_errors.inc()
                event("catch-up failed", event="sync", reason=f"HTTP {error.status}" if error.status else "unreachable")
            except Exception as error:  # a background task must not die silently; its type only (no data)
                self.metrics.store_errors.inc()
                event("catch-up failed", event="sync", reason=type(error).__name__)
            if not self.again:
                return
