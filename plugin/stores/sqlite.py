"""The embedded store: FHIR R4 server semantics on one SQLite file, for a clinic with no FHIR server.

It implements `Store` so the rest of the plugin cannot tell it from a FHIR
server: server-assigned ids, versions 1, 2, 3, strictly increasing
`lastUpdated`, If-Match, conditional creates and updates, all-or-nothing
transactions with urn:uuid references resolved, referential integrity, and
400/404/412 answers with an OperationOutcome (`sqlite_writes` makes the writes,
`sqlite_search` the searches).

Here it is the durable record, so: WAL with synchronous=FULL (a commit is on
disk before it is acknowledged; NORMAL could lose the last commits on power
loss), every write in one BEGIN IMMEDIATE transaction (several processes
queue on the write lock within the busy timeout instead of failing), and a
full, read-only or busy disk answers 503 with nothing written. Blocking
calls run on one worker thread per store, which owns the connection, so the
event loop never waits on the disk and a transaction is never interleaved.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import orjson

from plugin.fhir.client import FhirError, matches
from plugin.stores import sqlite_search as search
from plugin.stores import sqlite_writes as writes
from plugin.stores.sqlite_search import ID, refused

T = TypeVar("T")
SCHEMA_VERSION = 1
BUSY_TIMEOUT = 15.0  # seconds a writer waits for another process's transaction before answering 503
SCHEMA = """
CREATE TABLE resources (
    pid INTEGER PRIMARY KEY,  -- insertion order: the default search order, and what the indexes point at
    type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
    last_updated TEXT NOT NULL,  -- FHIR instant, UTC, milliseconds: compares and sorts as text
    json TEXT NOT NULL,
    UNIQUE (type, id));
CREATE INDEX resources_type ON resources (type);  -- (type, pid): a type in creation order, without sorting
CREATE INDEX resources_updated ON resources (type, last_updated);
CREATE TABLE history (  -- earlier versions (the current one is in resources: a create writes its JSON once)
    pid INTEGER NOT NULL, version INTEGER NOT NULL, last_updated TEXT NOT NULL, json TEXT NOT NULL,
    PRIMARY KEY (pid, version));
CREATE TABLE tokens (  -- the table is its own index (no rowid): from a value to its resources
    type TEXT NOT NULL, param TEXT NOT NULL, value TEXT NOT NULL, system TEXT NOT NULL, pid INTEGER NOT NULL,
    PRIMARY KEY (type, param, value, system, pid)) WITHOUT ROWID;
CREATE INDEX tokens_owner ON tokens (pid, param, value, system);  -- does this resource have that value?
CREATE TABLE dates (pid INTEGER NOT NULL, param TEXT NOT NULL, low TEXT NOT NULL, high TEXT NOT NULL,
                    PRIMARY KEY (pid, param, low, high)) WITHOUT ROWID;
CREATE TABLE clock (only INTEGER PRIMARY KEY CHECK (only = 0), last TEXT NOT NULL);  -- the last lastUpdated
"""  # (no semicolons in the comments: the statements are split on them)
# SQLite's primary result codes -> why a write could not be made; all are worth retrying later (503).
UNAVAILABLE = {sqlite3.SQLITE_FULL: "the disk is full", sqlite3.SQLITE_READONLY: "the database file is read-only",
               sqlite3.SQLITE_BUSY: "another process held the write lock too long",
               sqlite3.SQLITE_LOCKED: "the database is locked", sqlite3.SQLITE_CANTOPEN: "the file cannot be opened",
               sqlite3.SQLITE_IOERR: "a disk I/O error", sqlite3.SQLITE_PERM: "access was denied"}


def _identity(path: Path) -> tuple[int, int]:
    found = path.stat()
    return found.st_dev, found.st_ino


class SqliteStore:
    def __init__(self, path: str | Path, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = Path(path).expanduser().resolve()
        self.base_url = f"sqlite://{self.path}"  # sqlite:///abs/path: the sync watermark is kept per file
        self.holds_patients = False  # see EXTERNAL
        self.busy_timeout = busy_timeout
        self._owner = 0  # the process that made the worker and connection (they must not cross a fork)
        self._worker: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file first opened

    async def __aenter__(self) -> SqliteStore:
        await self._call(lambda conn: None)  # opens it, so a bad path fails here
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._worker and self._owner == os.getpid():
            # RuntimeError: the interpreter is exiting and shut the pool first; nothing is left uncommitted
            with contextlib.suppress(RuntimeError):
                await asyncio.get_running_loop().run_in_executor(self._worker, self._disconnect)
            self._worker.shutdown(wait=False)
        self._worker = None

    # -- the Store interface --------------------------------------------------------

    async def read(self, reference: str) -> dict | None:
        return await self._call(lambda conn: self._read(conn, reference))

    async def read_many(self, urls: list[str]) -> list[dict | None]:
        """Each read or search, all from one snapshot (one read transaction)."""
        def run(conn: sqlite3.Connection) -> list[dict | None]:
            with _reading(conn):
                return [self._get(conn, url, missing_type=None) for url in urls]
        return await self._call(run)

    async def search_page(self, resource_type: str, params: dict[str, str]) -> dict:
        writes.known_type(resource_type, 404)
        return await self._call(lambda conn: self._searchset(conn, resource_type, list(params.items())))

    async def search(self, resource_type: str, params: dict[str, str]) -> AsyncIterator[dict]:
        """Every match, following this store's own `next` links (keyset paging: each match once)."""
        page = await self.search_page(resource_type, params)
        while True:
            for resource in matches(page):
                yield resource
            following = next((link["url"] for link in page.get("link", []) if link["relation"] == "next"), None)
            if not following:
                return
            page = await self._call(lambda conn, url=following: self._get(conn, url))

    async def transaction(self, bundle: dict) -> dict:
        requests = writes.requests(bundle)
        responses = await self._call(lambda conn: self._write(conn, requests))
        entries = [{"response": response} for response, _ in responses]
        return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "transaction-response", "entry": entries}

    async def create(self, resource: dict) -> dict:
        kind = writes.type_of(resource, "resource")
        request = writes.Request("POST", kind, writes.body(resource, kind, kind), where=kind)
        return (await self._call(lambda conn: self._write(conn, [request])))[0][1]

    async def update_where(self, resource_type: str, params: dict[str, str], body: dict) -> dict:
        writes.known_type(resource_type)
        request = writes.Request("PUT", resource_type, writes.body(body, resource_type, resource_type),
                           condition=list(params.items()), where=resource_type)
        return (await self._call(lambda conn: self._write(conn, [request])))[0][1]

    # -- the worker thread ------------------------------------------------------------

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._worker is None or self._owner != os.getpid():  # first use, or a forked child: start afresh
            self._owner, self._conn = os.getpid(), None
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="sqlite-store")
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._guarded, work)

    def _guarded(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            if self._identity is not None:  # once opened, only that file: never a new one made in its place
                self._same_file()
            return work(self._conn or self._connect())
        except sqlite3.Error as error:
            raise self._unavailable(error) from None
        except OSError as error:
            raise refused(503, "transient", f"The embedded store cannot use {self.path}: "
                                            f"{error.strerror or type(error).__name__}.") from None

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)  # we BEGIN ourselves
        try:
            conn.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, nor it them
            conn.execute("PRAGMA synchronous = FULL")  # see the module docstring
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self._create_schema(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._identity = self._identity or _identity(self.path)
        return conn

    def _same_file(self) -> None:
        """The file this store opened is still the one at its path. SQLite keeps writing to a file deleted or
        replaced under it (an unlinked inode, lost at close): every answer after that would be a lie."""
        try:
            current = _identity(self.path)
        except FileNotFoundError:
            current = None
        if current != self._identity:
            self._disconnect()
            raise refused(503, "transient", f"The embedded store's file {self.path} was deleted or replaced "
                                            "while in use; restart the service to open it again.")

    async def check_writable(self) -> None:
        """For readiness: the file is the one opened and can be written (a disk remounted read-only cannot)."""
        def check(conn: sqlite3.Connection) -> None:
            if not os.access(self.path, os.W_OK) or not os.access(self.path.parent, os.W_OK):
                raise refused(503, "transient", f"{self.path} is unavailable: the database file is read-only.")
        await self._call(check)

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")  # two processes opening a new file: one creates, the other waits
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise refused(500, "not-supported", f"The embedded store {self.path} was made by a newer "
                                                    f"backpain-screen (schema {version}); upgrade to use it.")
            if version == 0:
                for statement in SCHEMA.split(";"):  # not executescript: it would end this transaction
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _disconnect(self) -> None:
        if self._conn is None:
            return
        with contextlib.suppress(sqlite3.Error):  # a read-only file cannot keep them
            self._conn.execute("PRAGMA optimize")  # keeps the planner's statistics fresh, as SQLite advises
        self._conn.close()
        self._conn = None

    def _unavailable(self, error: sqlite3.Error) -> FhirError:
        """A storage failure as a FHIR server would answer it; the message says what, never what was written."""
        code = getattr(error, "sqlite_errorcode", 0) & 0xFF
        name = getattr(error, "sqlite_errorname", type(error).__name__)
        if code in UNAVAILABLE:
            return refused(503, "transient", f"{self.path} is unavailable: {UNAVAILABLE[code]} ({name}).")
        return refused(500, "exception", f"{self.path} failed ({name}).")

    # -- reading ------------------------------------------------------------------------

    def _get(self, conn: sqlite3.Connection, url: str, missing_type: int | None = 404) -> dict | None:
        """A read (`Type/id`) or a search (`Type?query`, or one of our `next` links).

        An unknown type is a 404 to a FHIR server; in a batch (`read_many`) a 404 is None.
        """
        path, _, query = url.removeprefix(self.base_url).lstrip("/").partition("?")
        if "/" in path:
            return self._read(conn, path)
        if path not in writes.RESOURCE_TYPES and missing_type is None:
            return None
        writes.known_type(path, 404)
        return self._searchset(conn, path, parse_qsl(query, keep_blank_values=True))

    def _read(self, conn: sqlite3.Connection, reference: str) -> dict | None:
        parts = reference.removeprefix(self.base_url).strip("/").split("/")
        if len(parts) not in (2, 4) or (len(parts) == 4 and parts[2] != "_history"):
            raise refused(400, "invalid", "A read needs Type/id or Type/id/_history/version.")
        if parts[0] not in writes.RESOURCE_TYPES or not all(ID.fullmatch(part) for part in parts[1::2]):
            return None  # what a server answers 404 to
        if len(parts) == 2:
            row = conn.execute("SELECT json FROM resources WHERE type = ? AND id = ?", parts[:2]).fetchone()
        else:
            row = conn.execute("SELECT coalesce(h.json, r.json) FROM resources r LEFT JOIN history h ON h.pid = "
                               "r.pid AND h.version = ?3 WHERE r.type = ?1 AND r.id = ?2 AND (h.pid IS NOT NULL "
                               "OR r.version = ?3)", [*parts[:2], _int(parts[3])]).fetchone()
        return orjson.loads(row[0]) if row else None

    def _searchset(self, conn: sqlite3.Connection, resource_type: str, pairs: list[tuple[str, str]]) -> dict:
        query = search.parse_query(resource_type, pairs)
        self_link = {"relation": "self", "url": f"{self.base_url}/{resource_type}?{urlencode(pairs)}"}
        bundle: dict[str, Any] = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "searchset"}
        if query.summary or query.count == 0:
            return {**bundle, "total": search.total(conn, query), "link": [self_link]}
        rows, more = search.page(conn, query)
        if not more and query.cursor is None:
            bundle["total"] = len(rows)  # free; otherwise counting every match is asked for, as in HAPI
        elif query.accurate_total:
            bundle["total"] = search.total(conn, query)
        links = [self_link]
        if more:
            cursor = search.make_cursor(rows[-1][2], rows[-1][0])
            following = urlencode([*query.pairs, ("_cursor", cursor)])
            links.append({"relation": "next", "url": f"{self.base_url}/{resource_type}?{following}"})
        entries = []
        for _, text, _ in rows:
            resource = orjson.loads(text)
            entries.append({"fullUrl": f"{self.base_url}/{resource_type}/{resource['id']}", "resource": resource,
                            "search": {"mode": "match"}})
        return {**bundle, "link": links, "entry": entries}

    # -- writing -------------------------------------------------------------------------

    def _write(self, conn: sqlite3.Connection, requests: list[writes.Request]) -> list[tuple[dict, dict]]:
        """Every request or none, in one transaction: (transaction-response entry, stored resource) each."""
        conn.execute("BEGIN IMMEDIATE")  # the write lock first: what we read cannot change before we write
        try:
            done = writes.Writer(conn).run(requests)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        return done


def _int(text: str) -> int:
    return int(text) if text.isdigit() else -1


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:  # SQLite may have rolled back already (a full disk can do that)
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


@contextlib.contextmanager
def _reading(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN")
    try:
        yield
    finally:
        _rollback(conn)  # nothing to keep: ends the snapshot
