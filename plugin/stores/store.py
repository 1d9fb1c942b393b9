"""The store the plugin writes to: a FHIR server (`FhirClient`) or the embedded one (`SqliteStore`).

The rest of the plugin sees only this interface, so it cannot tell the two
apart. Both speak FHIR R4 semantics: `Type/id` references, searchset and
transaction-response Bundles, conditional creates (`ifNoneExist`) and
updates, `ifMatch` versions; both raise `FhirError` with an HTTP status and
an OperationOutcome when a request is refused (404, 409, 412, 400, ...).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from plugin.settings import ServiceSettings


class Store(Protocol):
    base_url: str  # names the store (the sync watermark is kept per store)
    holds_patients: bool  # whether a response's Patient must be in the store before results are written

    async def __aenter__(self) -> Store: ...

    async def __aexit__(self, *_: object) -> None: ...

    async def read(self, reference: str) -> dict | None:
        """The resource at `Type/id`, or None when there is none (or it was deleted)."""

    async def read_many(self, urls: list[str]) -> list[dict | None]:
        """Each `Type/id` read or `Type?query` search (a searchset Bundle), in order; None where nothing is."""

    async def search_page(self, resource_type: str, params: dict[str, str]) -> dict:
        """One searchset Bundle (the first page)."""

    def search(self, resource_type: str, params: dict[str, str]) -> AsyncIterator[dict]:
        """Every matching resource, all pages."""

    async def transaction(self, bundle: dict) -> dict:
        """Runs a transaction Bundle all or nothing; the transaction-response Bundle."""

    async def create(self, resource: dict) -> dict:
        """Creates a resource; the stored copy (with id and meta)."""

    async def update_where(self, resource_type: str, params: dict[str, str], body: dict) -> dict:
        """Conditional update (`PUT Type?params`): updates the one match or creates; the stored copy."""


def open_store(settings: ServiceSettings, timeout: float = 30.0, concurrency: int = 8) -> Store:
    """The EHR's FHIR server when one is configured (with SMART Backend Services tokens when a SMART client
    is configured, else the fixed bearer token, if any; at most `concurrency` requests at once), else the
    embedded store."""
    if settings.fhir_base_url:
        from plugin.fhir.client import FhirClient
        from plugin.fhir.smart_auth import token_source

        return FhirClient(settings.fhir_base_url, token=token_source(settings, timeout), timeout=timeout,
                          concurrency=concurrency)
    from plugin.stores.sqlite import SqliteStore

    return SqliteStore(settings.store_path)
