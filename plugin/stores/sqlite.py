"""The embedded store: FHIR R4 server semantics on one SQLite file, for a clinic with no FHIR server.

It implements `Store` so the rest of the plugin cannot tell it from a FHIR
server: server-assigned ids, versions 1, 2, 3, strictly increasing
`lastUpdated`, If-Match, conditional creates and updates, all-or-nothing
transactions with urn:uuid references resolved, referential integrity, and
400/404/412 answers with an OperationOutcome (see `sqlite_search` for search).

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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

import orjson

from plugin.fhir.client import FhirError, matches
from plugin.stores import sqlite_search as search
from plugin.stores.sqlite_search import ID, literal_reference, refused

T = TypeVar("T")
SCHEMA_VERSION = 1
# Records the embedded store does not keep: they live in the clinic's own systems, so references to them
# cannot be checked here (a stand-alone clinic has no Patient resources to load).
EXTERNAL = frozenset({"Patient", "Practitioner", "PractitionerRole", "RelatedPerson", "Encounter", "Organization",
                      "Location", "Group"})
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
RESOURCE_TYPES = frozenset("""
Account ActivityDefinition AdverseEvent AllergyIntolerance Appointment AppointmentResponse AuditEvent Basic Binary
BiologicallyDerivedProduct BodyStructure Bundle CapabilityStatement CarePlan CareTeam CatalogEntry ChargeItem
ChargeItemDefinition Claim ClaimResponse ClinicalImpression CodeSystem Communication CommunicationRequest
CompartmentDefinition Composition ConceptMap Condition Consent Contract Coverage CoverageEligibilityRequest
CoverageEligibilityResponse DetectedIssue Device DeviceDefinition DeviceMetric DeviceRequest DeviceUseStatement
DiagnosticReport DocumentManifest DocumentReference EffectEvidenceSynthesis Encounter Endpoint EnrollmentRequest
EnrollmentResponse EpisodeOfCare EventDefinition Evidence EvidenceVariable ExampleScenario ExplanationOfBenefit
FamilyMemberHistory Flag Goal GraphDefinition Group GuidanceResponse HealthcareService ImagingStudy Immunization
ImmunizationEvaluation ImmunizationRecommendation ImplementationGuide InsurancePlan Invoice Library Linkage List
Location Measure MeasureReport Media Medication MedicationAdministration MedicationDispense MedicationKnowledge
MedicationRequest MedicationStatement MedicinalProduct MedicinalProductAuthorization
MedicinalProductContraindication MedicinalProductIndication MedicinalProductIngredient
MedicinalProductInteraction MedicinalProductManufactured MedicinalProductPackaged MedicinalProductPharmaceutical
MedicinalProductUndesirableEffect MessageDefinition MessageHeader MolecularSequence NamingSystem NutritionOrder
Observation ObservationDefinition OperationDefinition OperationOutcome Organization OrganizationAffiliation
Parameters Patient PaymentNotice PaymentReconciliation Person PlanDefinition Practitioner PractitionerRole
Procedure Provenance Questionnaire QuestionnaireResponse RelatedPerson RequestGroup ResearchDefinition
ResearchElementDefinition ResearchStudy ResearchSubject RiskAssessment RiskEvidenceSynthesis Schedule
SearchParameter ServiceRequest Slot Specimen SpecimenDefinition StructureDefinition StructureMap Subscription
Substance SubstanceNucleicAcid SubstancePolymer SubstanceProtein SubstanceReferenceInformation
SubstanceSourceMaterial SubstanceSpecification SupplyDelivery SupplyRequest Task TerminologyCapabilities
TestReport TestScript ValueSet VerificationResult VisionPrescription
""".split())  # noqa: SIM905 (FHIR R4 4.0.1; a word list reads better than 145 quoted strings)
# SQLite's primary result codes -> why a write could not be made; all are worth retrying later (503).
UNAVAILABLE = {sqlite3.SQLITE_FULL: "the disk is full", sqlite3.SQLITE_READONLY: "the database file is read-only",
               sqlite3.SQLITE_BUSY: "another process held the write lock too long",
               sqlite3.SQLITE_LOCKED: "the database is locked", sqlite3.SQLITE_CANTOPEN: "the file cannot be opened",
               sqlite3.SQLITE_IOERR: "a disk I/O error", sqlite3.SQLITE_PERM: "access was denied"}
STATUS_TEXT = {200: "200 OK", 201: "201 Created"}


@dataclass(slots=True)
class _Request:
    """One write: a transaction entry, or `create` / `update_where`."""

    method: str  # POST or PUT
    resource_type: str
    resource: dict
    id: str | None = None  # PUT Type/id
    condition: list[tuple[str, str]] | None = None  # ifNoneExist, or PUT Type?query
    if_match: int | None = None
    full_url: str | None = None
    where: str = "Bundle.entry[0]"  # for error messages


@dataclass(slots=True)
class _Plan:
    """What a request will do: create, update, or answer with the resource it matched."""

    action: str  # "create", "update" or "match"
    resource_type: str
    id: str
    row: tuple | None = None  # (pid, version, last_updated, json) of the current version


class SqliteStore:
    def __init__(self, path: str | Path, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = Path(path).expanduser().resolve()
        self.base_url = f"sqlite://{self.path}"  # sqlite:///abs/path: the sync watermark is kept per file
        self.holds_patients = False  # see EXTERNAL
        self.busy_timeout = busy_timeout
        self._owner = 0  # the process that made the worker and connection (they must not cross a fork)
        self._worker: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread

    async def __aenter__(self) -> SqliteStore:
        await self._call(lambda conn: None)  # opens it, so a bad path fails here
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._worker and self._owner == os.getpid():
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
        _known_type(resource_type, 404)
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
        requests = _requests(bundle)
        responses = await self._call(lambda conn: self._write(conn, requests))
        entries = [{"response": response} for response, _ in responses]
        return {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "transaction-response", "entry": entries}

    async def create(self, resource: dict) -> dict:
        kind = _resource_type(resource, "resource")
        request = _Request("POST", kind, _body(resource, kind, kind), where=kind)
        return (await self._call(lambda conn: self._write(conn, [request])))[0][1]

    async def update_where(self, resource_type: str, params: dict[str, str], body: dict) -> dict:
        _known_type(resource_type)
        request = _Request("PUT", resource_type, _body(body, resource_type, resource_type),
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
        return conn

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
        if path not in RESOURCE_TYPES and missing_type is None:
            return None
        _known_type(path, 404)
        return self._searchset(conn, path, parse_qsl(query, keep_blank_values=True))

    def _read(self, conn: sqlite3.Connection, reference: str) -> dict | None:
        parts = reference.removeprefix(self.base_url).strip("/").split("/")
        if len(parts) not in (2, 4) or (len(parts) == 4 and parts[2] != "_history"):
            raise refused(400, "invalid", "A read needs Type/id or Type/id/_history/version.")
        if parts[0] not in RESOURCE_TYPES or not all(ID.fullmatch(part) for part in parts[1::2]):
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

    def _write(self, conn: sqlite3.Connection, requests: list[_Request]) -> list[tuple[dict, dict]]:
        """Every request or none, in one transaction: (transaction-response entry, stored resource) each."""
        conn.execute("BEGIN IMMEDIATE")  # the write lock first: what we read cannot change before we write
        try:
            done = _Writer(conn).run(requests)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        return done


class _Writer:
    """One write transaction, under the write lock."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._now: str | None = None

    @property
    def now(self) -> str:
        """This transaction's lastUpdated: later than any before it, even if the clock stepped back."""
        if self._now is None:
            row = self.conn.execute("SELECT last FROM clock").fetchone()
            now = search.instant(datetime.now(UTC))
            if row and now <= row[0]:
                now = search.instant(datetime.fromisoformat(row[0]) + timedelta(milliseconds=1))
            self.conn.execute("INSERT OR REPLACE INTO clock (only, last) VALUES (0, ?)", [now])
            self._now = now
        return self._now

    def run(self, requests: list[_Request]) -> list[tuple[dict, dict]]:
        plans = [self._plan(request) for request in requests]  # matched against the store as it was
        _no_twice(plans, requests)
        resolved = {r.full_url: f"{p.resource_type}/{p.id}" for r, p in zip(requests, plans) if r.full_url}
        done, referenced = [], {}
        for request, plan in zip(requests, plans):
            if plan.row is not None and plan.action == "match":
                done.append(_answer(200, plan.row, plan.resource_type, plan.id))
                continue
            resource = _rewrite(request.resource, resolved, request.resource_type, referenced, request.where)
            done.append(self._store(plan, request, resource))
        self._check_references(referenced)
        return done

    def _plan(self, request: _Request) -> _Plan:
        kind = request.resource_type
        if request.id:
            return _Plan("update", kind, request.id, self._current(kind, request.id))
        if request.condition is None:
            return _Plan("create", kind, str(uuid.uuid4()))
        what = "conditional create" if request.method == "POST" else "conditional update"
        found = search.matching_ids(self.conn, kind, request.condition, what)
        if len(found) > 1:
            raise refused(412, "multiple-matches", f"Failed to process the {what}: several {kind} resources "
                                                   f"match its search parameters.", request.where)
        if not found:
            return _Plan("create", kind, str(uuid.uuid4()))
        if request.method == "POST":
            return _Plan("match", kind, found[0], self._current(kind, found[0]))
        if request.resource.get("id") not in (None, found[0]):
            raise refused(400, "invalid", f"The conditional update matched {kind}/{found[0]}, but the resource "
                                          f"has another id.", request.where)
        return _Plan("update", kind, found[0], self._current(kind, found[0]))

    def _current(self, resource_type: str, resource_id: str) -> tuple | None:
        return self.conn.execute("SELECT pid, version, last_updated, json FROM resources WHERE type = ? AND id = ?",
                                 [resource_type, resource_id]).fetchone()

    def _store(self, plan: _Plan, request: _Request, resource: dict) -> tuple[dict, dict]:
        row, where = plan.row, f"{plan.resource_type}/{plan.id}"
        if request.if_match is not None and (row is None or row[1] != request.if_match):
            raise refused(412, "conflict", f"Trying to update {where} with If-Match version {request.if_match}, "
                                           f"but that is not its current version.", request.where)
        meta, body = _content(resource)
        if row is not None and _content(orjson.loads(row[3])) == (meta, body):
            return _answer(200, row, plan.resource_type, plan.id)  # unchanged: no new version, as HAPI does
        version = row[1] + 1 if row else 1
        stored = {"resourceType": plan.resource_type, "id": plan.id,
                  "meta": {**meta, "versionId": str(version), "lastUpdated": self.now}, **body}
        text = _dumps(stored, request.where)
        if row is None:
            pid = self.conn.execute("INSERT INTO resources (type, id, version, last_updated, json) VALUES "
                                    "(?, ?, 1, ?, ?)", [plan.resource_type, plan.id, self.now, text]).lastrowid
        else:
            pid = row[0]
            self.conn.execute("INSERT INTO history SELECT pid, version, last_updated, json FROM resources "
                              "WHERE pid = ?", [pid])
            self.conn.execute("UPDATE resources SET version = ?, last_updated = ?, json = ? WHERE pid = ?",
                              [version, self.now, text, pid])
        self._index(pid, stored, fresh=row is None)
        return _answer(201 if row is None else 200, (pid, version, self.now, text), plan.resource_type, plan.id,
                       stored)

    def _index(self, pid: int, resource: dict, fresh: bool) -> None:
        if not fresh:
            self.conn.execute("DELETE FROM tokens WHERE pid = ?", [pid])
            self.conn.execute("DELETE FROM dates WHERE pid = ?", [pid])
        tokens, dates = search.index_rows(resource)
        kind = resource["resourceType"]
        # OR IGNORE: a resource may repeat a value (two codings alike); it is indexed once
        self.conn.executemany("INSERT OR IGNORE INTO tokens (type, param, system, value, pid) VALUES (?, ?, ?, ?, ?)",
                              [(kind, *token, pid) for token in tokens])
        self.conn.executemany("INSERT OR IGNORE INTO dates (param, low, high, pid) VALUES (?, ?, ?, ?)",
                              [(*span, pid) for span in dates])

    def _check_references(self, referenced: dict[tuple[str, str], str]) -> None:
        """Referential integrity, as HAPI enforces it: a literal Type/id reference must exist, except to
        the records the clinic keeps elsewhere (EXTERNAL: patients, staff, encounters)."""
        for (kind, target), path in referenced.items():
            if kind in EXTERNAL:
                continue
            if not self.conn.execute("SELECT 1 FROM resources WHERE type = ? AND id = ?", [kind, target]).fetchone():
                raise refused(400, "processing", f"HAPI-1094: Resource {kind}/{target} not found, specified in "
                                                 f"path: {path}.", path)


# -- requests, checked before the store is touched -----------------------------------------


def _requests(bundle: Any) -> list[_Request]:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
        raise refused(400, "invalid", "The embedded store runs transaction Bundles only.", "Bundle.type")
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise refused(400, "structure", "Bundle.entry must be a list.", "Bundle.entry")
    return [_entry_request(entry, f"Bundle.entry[{i}]") for i, entry in enumerate(entries)]


def _entry_request(entry: Any, where: str) -> _Request:
    request = entry.get("request") if isinstance(entry, dict) else None
    if not isinstance(request, dict) or not isinstance(request.get("url"), str):
        raise refused(400, "structure", "Each entry needs a request with a method and a url.", f"{where}.request")
    method, url = request.get("method"), request["url"]
    path, mark, query = url.partition("?")
    parts = path.strip("/").split("/")
    if method == "POST" and len(parts) == 1 and not mark:
        condition = request.get("ifNoneExist")
        pairs = parse_qsl(condition.partition("?")[2] or condition, keep_blank_values=True) if condition else None
        return _Request("POST", parts[0], _body(entry.get("resource"), parts[0], where), condition=pairs,
                        full_url=entry.get("fullUrl"), where=where)
    by_id, conditional = len(parts) == 2 and not mark, len(parts) == 1 and bool(mark)
    if method == "PUT" and (by_id or conditional):
        resource = _body(entry.get("resource"), parts[0], where)
        resource_id = parts[1] if len(parts) == 2 else None
        if resource_id and (not ID.fullmatch(resource_id) or resource.get("id") not in (None, resource_id)):
            raise refused(400, "invalid", "The resource id must be the id in the request url.", f"{where}.request")
        return _Request("PUT", parts[0], resource, id=resource_id, full_url=entry.get("fullUrl"), where=where,
                        condition=parse_qsl(query, keep_blank_values=True) if mark else None,
                        if_match=_version(request.get("ifMatch"), where))
    raise refused(400, "not-supported", "The embedded store takes POST Type and PUT Type/id or Type?query "
                                        "in a transaction.", f"{where}.request")


def _body(resource: Any, resource_type: str, where: str) -> dict:
    """The cheap checks a server makes on every write; the plugin validated what it built."""
    _known_type(resource_type)
    if _resource_type(resource, where) != resource_type:
        raise refused(400, "invalid", f"The resource is not a {resource_type}.", f"{where}.resource")
    if "id" in resource and not (isinstance(resource["id"], str) and ID.fullmatch(resource["id"])):
        raise refused(400, "invalid", "A resource id is 1 to 64 letters, digits, '-' or '.'.", f"{where}.resource.id")
    if not isinstance(resource.get("meta", {}), dict):
        raise refused(400, "structure", "meta must be an object.", f"{where}.resource.meta")
    return resource


def _resource_type(resource: Any, where: str) -> str:
    kind = resource.get("resourceType") if isinstance(resource, dict) else None
    if not isinstance(kind, str):
        raise refused(400, "structure", "A resource needs a resourceType.", where)
    _known_type(kind)
    return kind


def _known_type(resource_type: str, status: int = 400) -> None:
    """HAPI answers 404 to an unknown type in a URL, 400 to one in a body."""
    if resource_type not in RESOURCE_TYPES:
        named = resource_type if resource_type.isalpha() and len(resource_type) <= 64 else "that"
        raise refused(status, "not-supported" if status == 400 else "not-found",
                      f"Unknown resource type {named}: not a FHIR R4 resource.")


def _version(if_match: Any, where: str) -> int | None:
    """The version an If-Match names: W/"3", "3" or 3."""
    if if_match is None:
        return None
    text = str(if_match).removeprefix("W/").strip('"')
    if not text.isdigit():
        raise refused(400, "invalid", 'ifMatch must be a version tag such as W/"3".', f"{where}.request.ifMatch")
    return int(text)


def _int(text: str) -> int:
    return int(text) if text.isdigit() else -1


def _no_twice(plans: list[_Plan], requests: list[_Request]) -> None:
    """A transaction writes each resource at most once (two matches of one resource write nothing)."""
    seen: set[tuple[str, str]] = set()
    for plan, request in zip(plans, requests):
        if plan.action == "match":
            continue
        if (plan.resource_type, plan.id) in seen:
            raise refused(400, "invalid", f"The transaction writes {plan.resource_type}/{plan.id} more than once.",
                          request.where)
        seen.add((plan.resource_type, plan.id))


def _rewrite(node: dict, resolved: dict[str, str], path: str, referenced: dict[tuple[str, str], str],
             where: str) -> dict:
    """A copy of `node` with the transaction's urn:uuid references resolved; notes every literal reference.

    A copy, never in place: the plugin's Bundles share read-only parts. (FHIR JSON never nests an array
    directly in an array, so list items are objects or plain values.)
    """
    copy = {}
    for key, value in node.items():
        kind = type(value)
        if kind is dict:
            value = _rewrite(value, resolved, f"{path}.{key}", referenced, where)
        elif kind is list:
            inner = f"{path}.{key}"
            value = [_rewrite(item, resolved, inner, referenced, where) if type(item) is dict else item
                     for item in value]
        elif key == "reference" and kind is str:
            value = resolved.get(value, value)
            if value.startswith(("urn:uuid:", "urn:oid:")):
                raise refused(400, "processing", f"Unable to satisfy placeholder reference in {path}: no entry "
                                                 f"has that fullUrl.", where)
            target = literal_reference(value)
            if target and target[0] in RESOURCE_TYPES:
                referenced.setdefault(target, path)
        copy[key] = value
    return copy


def _content(resource: dict) -> tuple[dict, dict]:
    """What an update compares: meta without version and time, and the rest without id."""
    meta = {k: v for k, v in resource.get("meta", {}).items() if k not in ("versionId", "lastUpdated")}
    return meta, {k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta")}


def _answer(status: int, row: tuple, resource_type: str, resource_id: str,
            stored: dict | None = None) -> tuple[dict, dict]:
    """A transaction-response entry for a row (pid, version, last_updated, json), and the resource."""
    _, version, last_updated, text = row
    response = {"status": STATUS_TEXT[status], "location": f"{resource_type}/{resource_id}/_history/{version}",
                "etag": f'W/"{version}"', "lastModified": last_updated}
    return response, stored if stored is not None else orjson.loads(text)


def _dumps(resource: dict, where: str) -> str:
    try:
        return orjson.dumps(resource).decode()
    except orjson.JSONEncodeError:
        raise refused(400, "structure", "The resource holds values JSON cannot carry.", where) from None


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
