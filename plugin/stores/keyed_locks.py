"""One writer at a time per response, within this process.

Two responses with the same id or identifier for two different patients,
posted at once, both read "nothing stored" and both write: the later one
would be filed over the earlier one. The embedded store refuses that
itself, atomically (`sqlite_writes`: a response never changes patient);
against a FHIR server, whose transactions cannot say "create only if
absent" for a PUT, the read-check-write of one response is serialised
here, keyed by its id or identifier (not its patient). Replicas of the
service do not share these locks: see the safety case (H20) for that residual risk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class KeyedLocks:
    """asyncio locks made on demand per key and dropped when nobody holds or waits for them."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
