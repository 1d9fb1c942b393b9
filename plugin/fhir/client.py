"""A FHIR R4 REST client on httpx: timeouts, retries, clear errors, paging, bounded concurrency.

Retries (exponential backoff with full jitter, honouring Retry-After) are
for 429, 5xx and connection failures only; any other 4xx is the caller's
problem and is raised at once as a `FhirError` carrying the server's
OperationOutcome. Every write the plugin makes is idempotent (conditional
creates on deterministic identifiers, conditional updates), so retrying a
write whose answer was lost is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson

FHIR_JSON = "application/fhir+json"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

# Where an Authorization header comes from: a fixed bearer token, or SMART Backend Services (smart_auth), whose
# source also has `invalidate(token)`: a 401 then gets one retry with a new token.
TokenSource = Callable[[], Awaitable[str]]


class FhirError(Exception):
    """The server refused a request, or could not be reached. `status` is None when it never answered."""

    def __init__(self, message: str, status: int | None = None, outcome: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 5  # tries in all, the first included
    base_delay: float = 0.2  # seconds; doubles each retry
    max_delay: float = 30.0  # longest wait, including a Retry-After

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_delay)
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))  # full jitter


def bearer(token: str) -> TokenSource:
    async def source() -> str:
        return token

    return source


class FhirClient:
    def __init__(
        self,
        base_url: str,
        *,
        token: TokenSource | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy = RetryPolicy(),
        concurrency: int = 8,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.holds_patients = True  # the EHR's server: a response's patient must be on it
        self.token = token
        self.retry = retry
        self.slots = asyncio.Semaphore(concurrency)
        self.http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, transport=transport,
            headers={"Accept": FHIR_JSON, "User-Agent": "backpain-screen"},
        )

    async def __aenter__(self) -> FhirClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.http.aclose()

    # -- the REST verbs the plugin uses ------------------------------------------

    async def read(self, reference: str) -> dict | None:
        """The resource at `Type/id`, or None if the server has no such resource."""
        try:
            return await self.request("GET", reference)
        except FhirError as error:
            if error.status in (404, 410):
                return None
            raise

    async def transaction(self, bundle: dict) -> dict:
        return await self.request("POST", "", body=bundle)

    async def create(self, resource: dict) -> dict:
        return await self.request("POST", resource["resourceType"], body=resource)

    async def update_where(self, resource_type: str, params: dict[str, str], body: dict) -> dict:
        return await self.request("PUT", resource_type, body=body, params=params)

    async def search_page(self, resource_type: str, params: dict[str, str]) -> dict:
        return await self.request("GET", resource_type, params=params)

    async def read_many(self, urls: list[str]) -> list[dict | None]:
        """Several reads or searches in one round trip (a batch Bundle); None where the server has nothing."""
        batch = {"resourceType": "Bundle", "type": "batch",
                 "entry": [{"request": {"method": "GET", "url": url}} for url in urls]}
        answers = (await self.request("POST", "", body=batch)).get("entry", [])
        found: list[dict | None] = []
        for url, answer in zip(urls, answers):
            status = int(answer.get("response", {}).get("status", "500").split()[0])
            if status in (404, 410):
                found.append(None)
            elif status >= 400:
                raise FhirError(f"GET {url.split('?')[0]} in a batch failed with HTTP {status}.", status,
                                answer.get("response", {}).get("outcome"))
            else:
                found.append(answer.get("resource"))
        return found

    async def search(self, resource_type: str, params: dict[str, str]) -> AsyncIterator[dict]:
        """Every matching resource, following the server's `next` links page by page."""
        page = await self.search_page(resource_type, params)
        while True:
            for resource in matches(page):
                yield resource
            following = next((link["url"] for link in page.get("link", []) if link.get("relation") == "next"), None)
            if not following:
                return
            page = await self.request("GET", following)

    # -- one request, with retries ---------------------------------------------------

    async def request(
        self, method: str, path: str, *, body: dict | None = None, params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> dict:
        content = orjson.dumps(body) if body is not None else None
        all_headers = {"Content-Type": FHIR_JSON} if content is not None else {}
        all_headers.update(headers or {})
        if self.token:
            all_headers["Authorization"] = f"Bearer {await self.token()}"
        url = path if path.startswith("http") else f"{self.base_url}/{path}" if path else self.base_url
        async with self.slots:
            response = await self._send(method, url, content, params, all_headers)
        if response.status_code == 401 and (invalidate := getattr(self.token, "invalidate", None)):
            invalidate(all_headers["Authorization"].removeprefix("Bearer "))  # expired or revoked early
            all_headers["Authorization"] = f"Bearer {await self.token()}"  # type: ignore[misc]
            async with self.slots:
                response = await self._send(method, url, content, params, all_headers)
        if response.status_code >= 400:
            raise _error(method, url, response)
        try:
            return orjson.loads(response.content) if response.content else {}
        except orjson.JSONDecodeError:  # e.g. a proxy's HTML page
            raise FhirError(f"{method} {url.split('?')[0]} answered with something that is not FHIR JSON.",
                            502) from None

    async def _send(self, method: str, url: str, content: bytes | None, params: dict[str, str] | None,
                    headers: dict[str, str]) -> httpx.Response:
        return await with_retries(
            self.retry, lambda: self.http.request(method, url, content=content, params=params, headers=headers),
            f"The FHIR server at {self.base_url}")


async def with_retries(retry: RetryPolicy, send: Callable[[], Awaitable[httpx.Response]],
                       server: str) -> httpx.Response:
    """`send()` again after backoff on 429, 5xx and connection failures, honouring Retry-After; the last
    answer is returned whatever it is, a server never reached is a FhirError naming `server`."""
    for attempt in range(retry.attempts):
        last_try = attempt == retry.attempts - 1
        try:
            response = await send()
        except httpx.TransportError as error:
            if last_try:
                raise FhirError(f"{server} could not be reached: {type(error).__name__}.") from None
            await asyncio.sleep(retry.delay(attempt, None))
            continue
        if response.status_code not in RETRY_STATUSES or last_try:
            return response
        await asyncio.sleep(retry.delay(attempt, retry_after(response)))
    raise AssertionError("unreachable")  # the loop always returns or raises on its last try


def matches(searchset: dict | None) -> Iterator[dict]:
    """The resources a searchset Bundle found (not those it merely included)."""
    for entry in (searchset or {}).get("entry", []):
        if entry.get("search", {}).get("mode", "match") == "match":
            yield entry["resource"]


def retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (a number, or an HTTP date), if the server gave one."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def _error(method: str, url: str, response: httpx.Response) -> FhirError:
    outcome: Any = None
    with contextlib.suppress(orjson.JSONDecodeError):
        outcome = orjson.loads(response.content)
    detail = ""
    if isinstance(outcome, dict) and outcome.get("resourceType") == "OperationOutcome":
        texts = [i.get("diagnostics") or i.get("details", {}).get("text", "") for i in outcome.get("issue", [])]
        detail = "; ".join(t for t in texts if t)
    else:
        outcome = None
    target = url.split("?")[0]
    message = f"{method} {target} failed with HTTP {response.status_code}" + (f": {detail}" if detail else "")
    return FhirError(message + ".", response.status_code, outcome)
