"""One write transaction on the embedded store, as a FHIR server makes it.

The requests a transaction Bundle (or a single create or conditional update)
makes are read and checked before the store is touched (`requests`); a
`Writer` then plans each against the store as it was, resolves urn:uuid
references, writes new versions and their search index rows, and checks
referential integrity, all inside the caller's transaction under the write lock.
"""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

import orjson

from plugin.screening.timeline import instant
from plugin.stores import sqlite_search as search
from plugin.stores.sqlite_search import ID, literal_reference, refused

# Records the embedded store does not keep: they live in the clinic's own systems, so references to them
# cannot be checked here (a stand-alone clinic has no Patient resources to load).
EXTERNAL = frozenset({"Patient", "Practitioner", "PractitionerRole", "RelatedPerson", "Encounter", "Organization",
                      "Location", "Group"})
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
STATUS_TEXT = {200: "200 OK", 201: "201 Created"}


@dataclass(slots=True)
class Request:
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
class Plan:
    """What a request will do: create, update, or answer with the resource it matched."""

    action: str  # "create", "update" or "match"
    resource_type: str
    id: str
    row: tuple | None = None  # (pid, version, last_updated, json) of the current version


class Writer:
    """One write transaction, under the write lock."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._now: str | None = None

    @property
    def now(self) -> str:
        """This transaction's lastUpdated: later than any before it, even if the clock stepped back."""
        if self._now is None:
            row = self.conn.execute("SELECT last FROM clock").fetchone()
            now = instant(datetime.now(UTC))
            if row and now <= row[0]:
                now = instant(datetime.fromisoformat(row[0]) + timedelta(milliseconds=1))
            self.conn.execute("INSERT OR REPLACE INTO clock (only, last) VALUES (0, ?)", [now])
            self._now = now
        return self._now

    def run(self, requests: list[Request]) -> list[tuple[dict, dict]]:
        plans = [self._plan(request) for request in requests]  # matched against the store as it was
        _no_twice(plans, requests)
        _same_patient(plans, requests)
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

    def _plan(self, request: Request) -> Plan:
        kind = request.resource_type
        if request.id:
            return Plan("update", kind, request.id, self._current(kind, request.id))
        if request.condition is None:
            return Plan("create", kind, str(uuid.uuid4()))
        what = "conditional create" if request.method == "POST" else "conditional update"
        found = search.matching_ids(self.conn, kind, request.condition, what)
        if len(found) > 1:
            raise refused(412, "multiple-matches", f"Failed to process the {what}: several {kind} resources "
                                                   f"match its search parameters.", request.where)
        if not found:
            return Plan("create", kind, str(uuid.uuid4()))
        if request.method == "POST":
            return Plan("match", kind, found[0], self._current(kind, found[0]))
        if request.resource.get("id") not in (None, found[0]):
            raise refused(400, "invalid", f"The conditional update matched {kind}/{found[0]}, but the resource "
                                          f"has another id.", request.where)
        return Plan("update", kind, found[0], self._current(kind, found[0]))

    def _current(self, resource_type: str, resource_id: str) -> tuple | None:
        return self.conn.execute("SELECT pid, version, last_updated, json FROM resources WHERE type = ? AND id = ?",
                                 [resource_type, resource_id]).fetchone()

    def _store(self, plan: Plan, request: Request, resource: dict) -> tuple[dict, dict]:
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


def _same_patient(plans: list[Plan], requests: list[Request]) -> None:
    """A stored response never changes patient: a write (or a conditional create's match) that would file
    one patient's response over another's is refused. Checked under the write lock, so two racing writers
    cannot both pass it (the plugin's own check reads before it writes)."""
    for plan, request in zip(plans, requests):
        if plan.resource_type != "QuestionnaireResponse" or plan.row is None:
            continue
        stored = orjson.loads(plan.row[3]).get("subject", {}).get("reference")
        if stored != (request.resource.get("subject") or {}).get("reference"):
            raise refused(409, "conflict", f"QuestionnaireResponse/{plan.id} is another patient's response: "
                                           "nothing was written.", request.where)


# -- requests, checked before the store is touched -----------------------------------------


def requests(bundle: Any) -> list[Request]:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
        raise refused(400, "invalid", "The embedded store runs transaction Bundles only.", "Bundle.type")
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise refused(400, "structure", "Bundle.entry must be a list.", "Bundle.entry")
    return [_entry_request(entry, f"Bundle.entry[{i}]") for i, entry in enumerate(entries)]


def _entry_request(entry: Any, where: str) -> Request:
    request = entry.get("request") if isinstance(entry, dict) else None
    if not isinstance(request, dict) or not isinstance(request.get("url"), str):
        raise refused(400, "structure", "Each entry needs a request with a method and a url.", f"{where}.request")
    method, url = request.get("method"), request["url"]
    path, mark, query = url.partition("?")
    parts = path.strip("/").split("/")
    if method == "POST" and len(parts) == 1 and not mark:
        condition = request.get("ifNoneExist")
        pairs = parse_qsl(condition.partition("?")[2] or condition, keep_blank_values=True) if condition else None
        return Request("POST", parts[0], body(entry.get("resource"), parts[0], where), condition=pairs,
                        full_url=entry.get("fullUrl"), where=where)
    by_id, conditional = len(parts) == 2 and not mark, len(parts) == 1 and bool(mark)
    if method == "PUT" and (by_id or conditional):
        resource = body(entry.get("resource"), parts[0], where)
        resource_id = parts[1] if len(parts) == 2 else None
        if resource_id and (not ID.fullmatch(resource_id) or resource.get("id") not in (None, resource_id)):
            raise refused(400, "invalid", "The resource id must be the id in the request url.", f"{where}.request")
        return Request("PUT", parts[0], resource, id=resource_id, full_url=entry.get("fullUrl"), where=where,
                        condition=parse_qsl(query, keep_blank_values=True) if mark else None,
                        if_match=_version(request.get("ifMatch"), where))
    raise refused(400, "not-supported", "The embedded store takes POST Type and PUT Type/id or Type?query "
                                        "in a transaction.", f"{where}.request")


def body(resource: Any, resource_type: str, where: str) -> dict:
    """The cheap checks a server makes on every write; the plugin validated what it built."""
    known_type(resource_type)
    if type_of(resource, where) != resource_type:
        raise refused(400, "invalid", f"The resource is not a {resource_type}.", f"{where}.resource")
    if "id" in resource and not (isinstance(resource["id"], str) and ID.fullmatch(resource["id"])):
        raise refused(400, "invalid", "A resource id is 1 to 64 letters, digits, '-' or '.'.", f"{where}.resource.id")
    if not isinstance(resource.get("meta", {}), dict):
        raise refused(400, "structure", "meta must be an object.", f"{where}.resource.meta")
    return resource


def type_of(resource: Any, where: str) -> str:
    kind = resource.get("resourceType") if isinstance(resource, dict) else None
    if not isinstance(kind, str):
        raise refused(400, "structure", "A resource needs a resourceType.", where)
    known_type(kind)
    return kind


def known_type(resource_type: str, status: int = 400) -> None:
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


def _no_twice(plans: list[Plan], requests: list[Request]) -> None:
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
