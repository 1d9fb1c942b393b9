"""The embedded store: FHIR server semantics on SQLite, and the plugin's real write-back and sync flows on it.

No async test plugin is installed, so each test drives its coroutine with asyncio.run.
"""

from __future__ import annotations

import asyncio
import copy
import multiprocessing
import re
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from plugin.fhir.client import FhirError, matches
from plugin.screening import systems
from plugin.screening.pipeline import Screener
from plugin.stores.sqlite import SqliteStore
from plugin.stores.sync import sync
from plugin.stores.writeback import publish, submit

T = TypeVar("T")
EXAMPLES = Path(__file__).resolve().parents[2] / "questionnaires" / "examples"
INSTANT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
TABLES = ("resources", "history", "tokens", "dates")
SID = "http://clinic.example/mrn"
LOINC = "http://loinc.org"
SCREENER = Screener()


# -- helpers --------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


def run(db: Path, scenario: Callable[[SqliteStore], Awaitable[T]]) -> T:
    async def go() -> T:
        async with SqliteStore(db) as store:
            return await scenario(store)
    return asyncio.run(go())


def bundle(*entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def post(resource: dict, full_url: str | None = None, if_none_exist: str | None = None) -> dict:
    request = {"method": "POST", "url": resource["resourceType"]}
    if if_none_exist:
        request["ifNoneExist"] = if_none_exist
    return {"fullUrl": full_url or f"urn:uuid:{uuid.uuid4()}", "resource": resource, "request": request}


def put(url: str, resource: dict, if_match: str | None = None) -> dict:
    request = {"method": "PUT", "url": url} | ({"ifMatch": if_match} if if_match else {})
    return {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": resource, "request": request}


def patient(mrn: str | None = None, **more: Any) -> dict:
    return {"resourceType": "Patient", **({"identifier": [{"system": SID, "value": mrn}]} if mrn else {}), **more}


def observation(subject: str, code: str = "8867-4", status: str = "final", **more: Any) -> dict:
    return {"resourceType": "Observation", "status": status, "code": {"coding": [{"system": LOINC, "code": code}]},
            "subject": {"reference": subject}, **more}


def counts(db: Path) -> dict[str, int]:
    with closing(sqlite3.connect(db)) as conn:
        return {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES}


async def refusal(call: Awaitable[Any]) -> FhirError:
    try:
        await call
    except FhirError as error:
        assert error.outcome and error.outcome["resourceType"] == "OperationOutcome"
        return error
    raise AssertionError("the store accepted it")


async def ids(store: SqliteStore, resource_type: str, **params: str) -> list[str]:
    return [r["id"] async for r in store.search(resource_type, params)]


async def total(store: SqliteStore, resource_type: str, **params: str) -> int:
    return (await store.search_page(resource_type, {**params, "_summary": "count"}))["total"]


# -- schema, ids, versions ------------------------------------------------------------------


def test_closing_after_the_interpreter_shut_the_worker_pool_is_quiet(db: Path):
    """At interpreter exit Python shuts thread pools before a late ASGI lifespan shutdown closes the store:
    the close must not raise (the service logged it as an unexpected error)."""
    async def run() -> None:
        store = await SqliteStore(db).__aenter__()
        await store.create(patient())
        store._worker.shutdown(wait=True)  # what Python's exit does to every pool
        await store.close()

    asyncio.run(run())
    with closing(sqlite3.connect(db)) as conn:  # what was committed is there
        assert conn.execute("select count(*) from resources").fetchone()[0] == 1


def test_a_new_file_gets_its_schema_in_wal_mode_with_full_sync(db: Path):
    async def scenario(store: SqliteStore) -> int:
        return await store._call(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])

    assert run(db, scenario) == 2  # FULL
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert SqliteStore(db).base_url == f"sqlite://{db.resolve()}" and SqliteStore(db).base_url.startswith("sqlite:///")
    assert run(db, lambda store: store.read("Patient/none")) is None  # opening it again keeps it


def test_create_assigns_a_uuid_version_one_and_an_instant(db: Path):
    async def scenario(store: SqliteStore) -> None:
        created = await store.create(patient("123", id="mine"))
        assert created["id"] != "mine" and uuid.UUID(created["id"]).version == 4
        assert created["meta"]["versionId"] == "1" and INSTANT.fullmatch(created["meta"]["lastUpdated"])
        assert await store.read(f"Patient/{created['id']}") == created
        assert await store.read("Patient/missing") is None
        assert await store.read(f"Observation/{created['id']}") is None

    run(db, scenario)


def test_versions_count_up_and_last_updated_only_increases(db: Path):
    async def scenario(store: SqliteStore) -> None:
        seen = []
        for n in range(5):
            done = await store.transaction(bundle(put("Patient/p1", patient(active=n % 2 == 0, gender="other",
                                                                              birthDate=f"19{50 + n}"))))
            response = done["entry"][0]["response"]
            assert response["status"] == ("201 Created" if n == 0 else "200 OK")
            assert response["location"] == f"Patient/p1/_history/{n + 1}" and response["etag"] == f'W/"{n + 1}"'
            seen.append(response["lastModified"])
        assert seen == sorted(seen) and len(set(seen)) == 5
        current = await store.read("Patient/p1")
        assert current["meta"]["versionId"] == "5" and current["birthDate"] == "1954"
        assert (await store.read("Patient/p1/_history/1"))["birthDate"] == "1950"
        assert await store.read("Patient/p1/_history/5") == current
        assert await store.read("Patient/p1/_history/6") is None

    run(db, scenario)
    assert counts(db)["history"] == 4  # the earlier versions


def test_last_updated_moves_on_even_when_the_clock_steps_back(db: Path):
    run(db, lambda store: store.create(patient()))
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE clock SET last = '2999-01-01T00:00:00.000Z'")  # as if the clock had been set back
    later = run(db, lambda store: store.create(patient()))
    assert later["meta"]["lastUpdated"] == "2999-01-01T00:00:00.001Z"


def test_an_update_that_changes_nothing_keeps_its_version(db: Path):
    async def scenario(store: SqliteStore) -> None:
        first = await store.update_where("Patient", {"identifier": f"{SID}|1"}, patient("1", gender="female"))
        again = await store.update_where("Patient", {"identifier": f"{SID}|1"}, patient("1", gender="female"))
        assert again == first  # same version, same lastUpdated
        changed = await store.update_where("Patient", {"identifier": f"{SID}|1"}, patient("1", gender="male"))
        assert changed["meta"]["versionId"] == "2" and changed["id"] == first["id"]

    run(db, scenario)


def test_if_match_on_a_stale_version_is_refused_with_412(db: Path):
    async def scenario(store: SqliteStore) -> None:
        await store.transaction(bundle(put("Patient/p", patient(gender="female"))))
        await store.transaction(bundle(put("Patient/p", patient(gender="male"), 'W/"1"')))
        stale = await refusal(store.transaction(bundle(put("Patient/p", patient(gender="other"), 'W/"1"'))))
        assert stale.status == 412 and (await store.read("Patient/p"))["gender"] == "male"
        absent = await refusal(store.transaction(bundle(put("Patient/q", patient(), 'W/"1"'))))
        assert absent.status == 412 and await store.read("Patient/q") is None
        bad = await refusal(store.transaction(bundle(put("Patient/p", patient(), "yesterday"))))
        assert bad.status == 400

    run(db, scenario)


def test_conditional_create_is_idempotent_and_refuses_several_matches(db: Path):
    async def scenario(store: SqliteStore) -> None:
        entry = post(patient("42"), if_none_exist=f"identifier={SID}|42")
        first = (await store.transaction(bundle(entry)))["entry"][0]["response"]
        second = (await store.transaction(bundle(entry)))["entry"][0]["response"]
        assert first["status"] == "201 Created" and second["status"] == "200 OK"
        assert second["location"] == first["location"] and second["etag"] == 'W/"1"'
        assert await total(store, "Patient", identifier=f"{SID}|42") == 1
        await store.create(patient("42"))  # a second one, made without a condition
        several = await refusal(store.transaction(bundle(entry)))
        assert several.status == 412 and several.outcome["issue"][0]["code"] == "multiple-matches"
        empty = await refusal(store.transaction(bundle(post(patient(), if_none_exist="_count=1"))))
        assert empty.status == 400

    run(db, scenario)


def test_conditional_update_creates_updates_or_refuses(db: Path):
    async def scenario(store: SqliteStore) -> None:
        where = {"identifier": f"{SID}|7"}
        created = await store.update_where("Patient", where, patient("7"))
        updated = await store.update_where("Patient", where, patient("7", gender="female"))
        assert updated["id"] == created["id"] and updated["meta"]["versionId"] == "2"
        in_bundle = await store.transaction(bundle(put(f"Patient?identifier={SID}|7", patient("7", gender="male"))))
        assert in_bundle["entry"][0]["response"]["location"] == f"Patient/{created['id']}/_history/3"
        other_id = await refusal(store.update_where("Patient", where, patient("7", id="someone-else")))
        assert other_id.status == 400
        await store.create(patient("7"))
        assert (await refusal(store.update_where("Patient", where, patient("7")))).status == 412

    run(db, scenario)


def test_put_by_id_creates_with_that_id_then_updates(db: Path):
    async def scenario(store: SqliteStore) -> None:
        first = await store.transaction(bundle(put("Patient/chosen-id.1", patient())))
        assert first["entry"][0]["response"]["status"] == "201 Created"
        second = await store.transaction(bundle(put("Patient/chosen-id.1", patient(gender="female"))))
        assert second["entry"][0]["response"]["status"] == "200 OK"
        assert (await store.read("Patient/chosen-id.1"))["meta"]["versionId"] == "2"
        mismatch = await refusal(store.transaction(bundle(put("Patient/a", patient(id="b")))))
        assert mismatch.status == 400

    run(db, scenario)


# -- transactions -----------------------------------------------------------------------------


def test_a_transaction_resolves_urn_uuids_and_answers_in_entry_order(db: Path):
    async def scenario(store: SqliteStore) -> None:
        who = post(patient("9"), "urn:uuid:11111111-1111-4111-8111-111111111111")
        member = post(observation(who["fullUrl"], "1"))
        panel = post(observation(who["fullUrl"], "2", hasMember=[{"reference": member["fullUrl"]}]))
        sent = bundle(panel, member, who)
        untouched = copy.deepcopy(sent)
        done = await store.transaction(sent)
        assert sent == untouched  # the caller's Bundle is not changed
        assert done["type"] == "transaction-response" and len(done["entry"]) == 3
        where = [e["response"]["location"].split("/_history/")[0] for e in done["entry"]]
        assert [w.split("/")[0] for w in where] == ["Observation", "Observation", "Patient"]
        for entry in done["entry"]:
            assert entry["response"]["status"] == "201 Created" and entry["response"]["etag"] == 'W/"1"'
            assert INSTANT.fullmatch(entry["response"]["lastModified"])
        stored_panel, stored_member = await store.read(where[0]), await store.read(where[1])
        assert stored_panel["subject"] == {"reference": where[2]} == stored_member["subject"]
        assert stored_panel["hasMember"] == [{"reference": where[1]}]

    run(db, scenario)


BROKEN = {  # a last entry that fails, after others that would succeed
    "stale If-Match": lambda: put("Patient/q", patient(gender="other"), 'W/"9"'),
    "a missing device": lambda: post(observation("Patient/p", device={"reference": "Device/not-there"})),
    "an unresolved urn:uuid": lambda: post(observation(f"urn:uuid:{uuid.uuid4()}")),
    "several matches": lambda: post(patient("dup"), if_none_exist=f"identifier={SID}|dup"),
    "an unknown type": lambda: post({"resourceType": "Patent"}),
    "a bad id": lambda: put("Patient/not_valid!", patient()),
    "a DELETE": lambda: {"request": {"method": "DELETE", "url": "Patient/q"}},
    "the same resource twice": lambda: put("Patient/p", patient(gender="male")),
}


@pytest.mark.parametrize("failure", BROKEN)
def test_a_failing_entry_writes_nothing_at_all(db: Path, failure: str):
    async def scenario(store: SqliteStore) -> FhirError:
        existing = (await store.transaction(bundle(put("Patient/p", patient()), put("Patient/q", patient()))))[
            "entry"][0]
        await store.create(patient("dup"))
        await store.create(patient("dup"))
        before = counts(db)
        good = post(patient("new"), "urn:uuid:22222222-2222-4222-8222-222222222222")
        updated = put("Patient/p", patient(gender="female"), existing["response"]["etag"])
        error = await refusal(store.transaction(bundle(good, updated, post(observation(good["fullUrl"])),
                                                       BROKEN[failure]())))
        assert counts(db) == before
        assert (await store.read("Patient/p"))["meta"]["versionId"] == "1"
        return error

    error = run(db, scenario)
    assert error.status == (412 if failure in ("stale If-Match", "several matches") else 400)


def test_references_must_exist_like_hapi_checks_them_except_to_the_clinics_own_records(db: Path):
    async def scenario(store: SqliteStore) -> None:
        elsewhere = await store.create(observation("Patient/kept-in-the-clinics-own-system"))
        assert elsewhere["subject"]["reference"] == "Patient/kept-in-the-clinics-own-system"
        someone = await store.create(patient())
        assert (await store.create(observation(f"Patient/{someone['id']}")))["subject"]["reference"]
        no_device = await refusal(store.create(observation(f"Patient/{someone['id']}",
                                                           device={"reference": "Device/none"})))
        assert "Device/none" in str(no_device)
        external = observation(f"Patient/{someone['id']}", focus=[{"reference": "https://elsewhere.example/Patient/1"}])
        assert await store.create(external)  # absolute references are not ours to check

    run(db, scenario)


@pytest.mark.parametrize("resource", [{"no": "type"}, {"resourceType": "Bogus"}, patient(id="has space"),
                                      patient(meta=["not", "an", "object"])])
def test_a_resource_that_is_not_fhir_is_refused(db: Path, resource: dict):
    error = run(db, lambda store: refusal(store.create(resource)))
    assert error.status == 400
    assert counts(db)["resources"] == 0


def test_no_patient_data_in_error_messages(db: Path):
    async def scenario(store: SqliteStore) -> list[FhirError]:
        secret = patient("MRN-SECRET-77", name=[{"family": "Zebediah"}])
        await store.transaction(bundle(put("Patient/p", secret)))
        return [await refusal(store.transaction(bundle(put("Patient/p", secret, 'W/"5"')))),
                await refusal(store.search_page("Patient", {"identifier": f"{SID}|MRN-SECRET-77", "name": "Zeb"})),
                await refusal(store.search_page("Patient", {"identifier:of-type": "MRN-SECRET-77"})),
                await refusal(store.create(observation("Patient/p", device={"reference": "Device/x"})))]

    for error in run(db, scenario):
        said = str(error) + orjson.dumps(error.outcome).decode()
        assert "SECRET" not in said and "Zebediah" not in said and "Traceback" not in said


# -- searches ------------------------------------------------------------------------------


def _searchable(store: SqliteStore) -> Awaitable[dict]:
    """Two patients with observations, tasks, responses and a questionnaire; their ids by name."""
    async def build() -> dict:
        await store.transaction(bundle(put("Patient/ann", patient("a1"))))
        bob = await store.create(patient("b|2"))  # a value with a separator in it
        made = {"ann": "ann", "bob": bob["id"]}
        specs = [("hr-ann", "ann", "8867-4", "final", "2026-11-20T09:30:00Z"),
                 ("bp-ann", "ann", "85354-9", "amended", "2026-11-21"),
                 ("hr-bob", bob["id"], "8867-4", "preliminary", "2026-11-22T10:00:00+02:00"),
                 ("none-bob", bob["id"], "85354-9", "final", None)]
        for name, who, code, status, when in specs:
            extra = {"effectiveDateTime": when} if when else {}
            obs = observation(f"Patient/{who}", code, status, identifier=[{"system": SID, "value": name}],
                              meta={"tag": [{"system": systems.RULE_SET_TAG, "code": name[:2]}]}, **extra)
            made[name] = (await store.create(obs))["id"]
        task = {"resourceType": "Task", "status": "requested", "intent": "proposal",
                "code": {"coding": [{"system": systems.RESULTS, "code": "refer"}]}, "for": {"reference": "Patient/ann"}}
        made["task"] = (await store.create(task))["id"]
        canonicals = {"qr1": "https://q.example/Questionnaire/a|1.0", "qr2": "https://q.example/Questionnaire/a",
                      "qr3": "https://q.example/Questionnaire/b"}
        for name, canonical in canonicals.items():
            qr = {"resourceType": "QuestionnaireResponse", "questionnaire": canonical, "status": "completed",
                  "subject": {"reference": "Patient/ann"}, "identifier": {"value": name}}
            made[name] = (await store.create(qr))["id"]
        q = {"resourceType": "Questionnaire", "url": "https://q.example/Questionnaire/a", "version": "1.0",
             "status": "active"}
        made["q"] = (await store.create(q))["id"]
        return made
    return build()


SEARCHES = [
    ("Patient", {"identifier": f"{SID}|a1"}, ["ann"]),
    ("Patient", {"identifier": "a1"}, ["ann"]),
    ("Patient", {"identifier": f"{SID}|a1,{SID}|b\\|2"}, ["ann", "bob"]),
    ("Patient", {"identifier": f"{SID}|"}, ["ann", "bob"]),
    ("Patient", {"identifier": "http://other.example|a1"}, []),
    ("Patient", {"_id": "ann"}, ["ann"]),
    ("Observation", {"_tag": f"{systems.RULE_SET_TAG}|hr"}, ["hr-ann", "hr-bob"]),
    ("Observation", {"subject": "Patient/ann"}, ["hr-ann", "bp-ann"]),
    ("Observation", {"subject": "ann"}, ["hr-ann", "bp-ann"]),
    ("Observation", {"patient": "ann"}, ["hr-ann", "bp-ann"]),
    ("Observation", {"patient": "Patient/ann", "code": f"{LOINC}|85354-9"}, ["bp-ann"]),
    ("Observation", {"code": "8867-4"}, ["hr-ann", "hr-bob"]),
    ("Observation", {"code": "http://snomed.info/sct|8867-4"}, []),
    ("Observation", {"status": "final,amended"}, ["hr-ann", "bp-ann", "none-bob"]),
    ("Observation", {"date": "ge2026-11-21"}, ["bp-ann", "hr-bob"]),
    ("Observation", {"date": "gt2026-11-21"}, ["hr-bob"]),  # 08:00 UTC on the 22nd
    ("Observation", {"date": "lt2026-11-21"}, ["hr-ann"]),
    ("Observation", {"date": "le2026-11-21T12:00:00Z"}, ["hr-ann", "bp-ann"]),
    ("Observation", {"date": "eq2026-11-22"}, ["hr-bob"]),
    ("Observation", {"date": "2026-11-22T08:00:00Z"}, ["hr-bob"]),
    ("Observation", {"date": "2026-11"}, ["hr-ann", "bp-ann", "hr-bob"]),
    ("Observation", {"date": "ne2026-11-21"}, ["hr-ann", "hr-bob"]),
    ("Task", {"patient": "Patient/ann", "code": "refer", "status": "requested"}, ["task"]),
    ("Task", {"subject": "Patient/bob"}, []),
    ("QuestionnaireResponse", {"questionnaire": "https://q.example/Questionnaire/a"}, ["qr1", "qr2"]),
    ("QuestionnaireResponse", {"questionnaire": "https://q.example/Questionnaire/a|1.0"}, ["qr1"]),
    ("QuestionnaireResponse", {"identifier": "qr3", "patient": "ann", "status": "completed"}, ["qr3"]),
    ("Questionnaire", {"url": "https://q.example/Questionnaire/a", "version": "1.0"}, ["q"]),
    ("Questionnaire", {"url": "https://q.example/Questionnaire/a", "version": "2.0"}, []),
]


def test_each_search_parameter_finds_exactly_its_matches(db: Path):
    async def scenario(store: SqliteStore) -> None:
        made = await _searchable(store)
        for resource_type, params, expected in SEARCHES:
            found = await ids(store, resource_type, **params)
            assert sorted(found) == sorted(made[name] for name in expected), (resource_type, params)

    run(db, scenario)


def test_a_search_for_hundreds_of_identifiers_at_once(db: Path):
    async def scenario(store: SqliteStore) -> None:
        await store.transaction(bundle(*(post(patient(str(n))) for n in range(600))))
        wanted = ",".join([f"{SID}|{n}" for n in range(0, 600, 2)] + [str(n) for n in range(1, 600, 2)])
        found = await store.search_page("Patient", {"identifier": wanted, "_count": "1000"})
        assert len(found["entry"]) == found["total"] == 600

    run(db, scenario)


def test_last_updated_prefixes_and_sorting(db: Path):
    async def scenario(store: SqliteStore) -> None:
        stamps = []
        for n in range(4):
            stamps.append((await store.create(patient(str(n))))["meta"]["lastUpdated"])
        everyone = await ids(store, "Patient")
        by = dict(zip(stamps, everyone))
        second = stamps[1]
        assert await ids(store, "Patient", _lastUpdated=f"ge{second}") == [by[s] for s in stamps[1:]]
        assert await ids(store, "Patient", _lastUpdated=f"gt{second}") == [by[s] for s in stamps[2:]]
        assert await ids(store, "Patient", _lastUpdated=f"le{second}") == [by[s] for s in stamps[:2]]
        assert await ids(store, "Patient", _lastUpdated=f"lt{second}") == [by[stamps[0]]]
        assert await ids(store, "Patient", _lastUpdated=f"eq{second}") == [by[second]]
        assert await ids(store, "Patient", _lastUpdated=second) == [by[second]]
        assert len(await ids(store, "Patient", _lastUpdated=f"eq{second[:10]}")) >= 1  # the day it was made
        assert await ids(store, "Patient", _lastUpdated="lt2000-01-01") == []
        await store.update_where("Patient", {"_id": everyone[0]}, patient("0", gender="female"))  # now the latest
        assert await ids(store, "Patient", _sort="_lastUpdated") == [*everyone[1:], everyone[0]]
        assert await ids(store, "Patient", _sort="-_lastUpdated") == [everyone[0], *reversed(everyone[1:])]

    run(db, scenario)


def test_sorting_by_date_puts_missing_dates_last(db: Path):
    async def scenario(store: SqliteStore) -> None:
        made = await _searchable(store)
        ascending = await ids(store, "Observation", _sort="date")
        assert ascending == [made[n] for n in ("hr-ann", "bp-ann", "hr-bob", "none-bob")]
        descending = await ids(store, "Observation", _sort="-date")
        assert descending == [made[n] for n in ("hr-bob", "bp-ann", "hr-ann", "none-bob")]

    run(db, scenario)


@pytest.mark.parametrize("params", [{"name": "x"}, {"identifier:exact": "1"}, {"subject.name": "x"},
                                    {"_lastUpdated": "yesterday"}, {"_count": "ten"}, {"_summary": "true"},
                                    {"_sort": "name"}, {"_sort": "_lastUpdated,_id"},
                                    {"_cursor": "not-ours"}, {"patient": "Group/1"}, {"_lastUpdated": "ap2026"}])
def test_an_unknown_or_bad_search_is_a_400_not_ignored(db: Path, params: dict):
    error = run(db, lambda store: refusal(store.search_page("Observation", params)))
    assert error.status == 400 and error.outcome["issue"][0]["severity"] == "error"


def test_unknown_parameter_message_lists_the_valid_ones(db: Path):
    error = run(db, lambda store: refusal(store.search_page("Observation", {"colour": "blue"})))
    assert "colour" in str(error) and "identifier" in str(error) and "_lastUpdated" in str(error)
    assert run(db, lambda store: refusal(store.search_page("Nonsense", {}))).status == 404  # as HAPI answers


def test_count_defaults_to_50_is_capped_at_1000_and_summary_counts(db: Path):
    async def scenario(store: SqliteStore) -> None:
        await store.transaction(bundle(*(post(patient(str(n))) for n in range(1100))))
        first = await store.search_page("Patient", {})
        assert len(first["entry"]) == 50 and "total" not in first  # counting all is asked for, as in HAPI
        assert (await store.search_page("Patient", {"_total": "accurate"}))["total"] == 1100
        assert any(link["relation"] == "next" for link in first["link"])
        capped = await store.search_page("Patient", {"_count": "5000"})
        assert len(capped["entry"]) == 1000
        counted = await store.search_page("Patient", {"_summary": "count"})
        assert counted["total"] == 1100 and "entry" not in counted
        assert (await store.search_page("Patient", {"_count": "0"}))["total"] == 1100

    run(db, scenario)


@pytest.mark.parametrize("sort", [None, "_lastUpdated", "-_lastUpdated", "_id", "-date"])
def test_paging_returns_every_match_exactly_once(db: Path, sort: str | None):
    async def scenario(store: SqliteStore) -> None:
        who = await store.create(patient())
        entries = [post(observation(f"Patient/{who['id']}", effectiveDateTime=f"2026-01-{1 + n % 28:02d}"))
                   for n in range(53)]
        created = await store.transaction(bundle(*entries[:30]))
        await store.transaction(bundle(*entries[30:]))
        params = {"subject": f"Patient/{who['id']}", "_count": "7", "_total": "accurate"}
        params |= {"_sort": sort} if sort else {}
        first = await store.search_page("Observation", params)
        assert first["total"] == 53 and len(first["entry"]) == 7
        following = next(link["url"] for link in first["link"] if link["relation"] == "next")
        assert following.startswith(store.base_url + "/Observation?")
        found, pages = [], 0
        page = first
        while True:
            pages += 1
            found += [r["id"] for r in matches(page)]
            url = next((link["url"] for link in page.get("link", []) if link["relation"] == "next"), None)
            if not url:
                break
            page = (await store.read_many([url]))[0]
        assert pages == 8 and len(found) == 53 and len(set(found)) == 53
        assert [r["id"] async for r in store.search("Observation", params)] == found
        if sort == "-date":
            dates = [(await store.read(f"Observation/{i}"))["effectiveDateTime"] for i in found]
            assert dates == sorted(dates, reverse=True)
        if sort is None:  # creation order
            assert found[:30] == [e["response"]["location"].split("/")[1] for e in created["entry"]]

    run(db, scenario)


def test_read_many_reads_and_searches_from_one_snapshot(db: Path):
    async def scenario(store: SqliteStore) -> None:
        someone = await store.create(patient("rm"))
        found = await store.read_many([f"Patient/{someone['id']}", "Patient/missing",
                                       f"Patient?identifier={SID}|rm&_count=3", "Patient?identifier=none",
                                       "Patient?identifier=&_summary=count",  # a blank value is ignored, as HAPI does
                                       "Nonsense?x=1", "Nonsense/1"])  # 404: None
        assert found[0] == someone and found[1] is None
        assert [r["id"] for r in matches(found[2])] == [someone["id"]] and found[3]["total"] == 0
        assert found[4]["total"] == 1 and found[5:] == [None, None]
        bad = await refusal(store.read_many([f"Patient/{someone['id']}", "Patient?colour=blue"]))
        assert bad.status == 400

    run(db, scenario)


# -- failures of the disk and of other writers ----------------------------------------------------


def test_a_read_only_database_answers_503_and_stays_intact(db: Path):
    async def scenario(store: SqliteStore) -> FhirError:
        await store.create(patient("before"))
        await store._call(lambda conn: conn.execute("PRAGMA query_only = ON"))  # as a read-only file refuses writes
        error = await refusal(store.transaction(bundle(post(patient("a")), post(patient("b")))))
        assert (await store.search_page("Patient", {}))["total"] == 1  # reads still work
        return error

    error = run(db, scenario)
    assert error.status == 503 and "read-only" in str(error) and error.outcome["issue"][0]["code"] == "transient"
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert counts(db)["resources"] == 1


def test_a_full_disk_answers_503_and_writes_nothing(db: Path):
    async def scenario(store: SqliteStore) -> FhirError:
        await store.create(patient("before"))
        await store._call(lambda conn: conn.execute(
            "PRAGMA max_page_count = " + str(conn.execute("PRAGMA page_count").fetchone()[0])))
        big = [post(patient(str(n), text={"status": "generated", "div": "<div>" + "x" * 4000 + "</div>"}))
               for n in range(20)]
        return await refusal(store.transaction(bundle(*big)))

    error = run(db, scenario)
    assert error.status == 503 and "disk is full" in str(error)
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert counts(db)["resources"] == 1


def test_a_writer_that_holds_the_lock_too_long_gives_503_then_it_works(db: Path):
    run(db, lambda store: store.create(patient()))
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")

        async def blocked() -> FhirError:
            async with SqliteStore(db, busy_timeout=0.2) as store:
                return await refusal(store.create(patient()))

        assert asyncio.run(blocked()).status == 503
        other.execute("ROLLBACK")
    assert run(db, lambda store: store.create(patient()))["meta"]["versionId"] == "1"


def test_many_tasks_at_once_make_one_resource_per_condition(db: Path):
    async def scenario(store: SqliteStore) -> list[str]:
        entry = post(patient("same"), if_none_exist=f"identifier={SID}|same")
        done = await asyncio.gather(*(store.transaction(bundle(entry)) for _ in range(20)))
        return sorted(d["entry"][0]["response"]["status"] for d in done)

    assert run(db, scenario) == ["200 OK"] * 19 + ["201 Created"]
    assert counts(db)["resources"] == 1


def _write_conditionally(path: str, start: Any, keys: list[str], results: Any) -> None:
    """In another process: the same conditional creates as every other process, all at once."""
    async def go() -> list[str]:
        async with SqliteStore(path) as store:
            start.wait()
            return [(await store.transaction(bundle(post(patient(k), if_none_exist=f"identifier={SID}|{k}"))))
                    ["entry"][0]["response"]["status"] for k in keys]
    try:
        results.put(asyncio.run(go()))
    except Exception as error:  # reported, so the test fails at once instead of waiting for a result
        results.put(repr(error))


def test_processes_writing_the_same_conditional_create_at_once_make_one(db: Path):
    spawn = multiprocessing.get_context("spawn")
    writers, keys = 4, [f"k{n}" for n in range(15)]
    start, results = spawn.Barrier(writers), spawn.Queue()
    processes = [spawn.Process(target=_write_conditionally, args=(str(db), start, keys, results))
                 for _ in range(writers)]  # a new file: they race to make the schema too
    for process in processes:
        process.start()
    statuses = [results.get(timeout=120) for _ in processes]
    assert all(isinstance(s, list) for s in statuses), statuses
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert sum(s.count("201 Created") for s in statuses) == len(keys)
    assert counts(db)["resources"] == len(keys)
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(DISTINCT value) FROM tokens WHERE param = 'identifier'").fetchone()[0] == 15


def _create_in_child(store: SqliteStore, results: Any) -> None:
    results.put(asyncio.run(store.create(patient("child")))["id"])


def test_a_store_used_across_a_fork_opens_afresh_in_the_child(db: Path):
    store = SqliteStore(db)

    async def before() -> None:
        await store.create(patient("parent"))  # the parent's worker thread and connection exist now

    asyncio.run(before())
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    child = fork.Process(target=_create_in_child, args=(store, results))
    child.start()
    made = results.get(timeout=60)
    child.join(timeout=30)
    assert child.exitcode == 0

    async def after() -> int:
        assert await store.read(f"Patient/{made}")
        await store.create(patient("parent-again"))
        found = await total(store, "Patient")
        await store.close()
        return found

    assert asyncio.run(after()) == 3


# -- the plugin's own flows on the embedded store ------------------------------------------------------


def example(name: str, subject: str) -> dict:
    qr = orjson.loads((EXAMPLES / name).read_bytes())
    return qr | {"id": f"{name.removesuffix('.json')}-{uuid.uuid4()}", "subject": {"reference": subject}}


def amended(qr: dict, status: str, **answers: bool) -> dict:
    changed = copy.deepcopy(qr) | {"status": status}
    for group in changed["item"]:
        for item in group.get("item", []):
            if item["linkId"] in answers:
                item["answer"] = [{"valueBoolean": answers[item["linkId"]]}]
    return changed


async def results(store: SqliteStore, subject: str) -> dict[str, dict]:
    return {o["code"]["coding"][0]["code"]: o async for o in store.search("Observation", {"subject": subject})}


async def tasks(store: SqliteStore, subject: str) -> list[dict]:
    return [t async for t in store.search("Task", {"patient": subject})]


def test_publish_twice_leaves_one_of_each(db: Path):
    async def scenario(store: SqliteStore) -> None:
        first = await publish(store, SCREENER)
        assert await publish(store, SCREENER) == first
        assert await total(store, "Questionnaire", url=f"{systems.BASE}/Questionnaire/back-pain-screening") == 2
        assert await total(store, "Device") == len(SCREENER.builders)

    run(db, scenario)
    assert counts(db)["history"] == 0  # nothing changed the second time


def test_write_back_then_replay_then_amend_then_retract(db: Path):
    async def scenario(store: SqliteStore) -> None:
        who = f"Patient/{(await store.create(patient('wb')))['id']}"
        outcomes = {"qr-refer-asas.json": "refer-rheumatology", "qr-no-referral.json": "no-referral-indicated",
                    "qr-emergency.json": "emergency-assessment", "qr-basdai.json": "positive"}
        responses = {name: example(name, who) for name in outcomes}
        expected = 0
        for name, qr in responses.items():
            outcome, written = await submit(store, SCREENER, qr)
            assert outcome.label == outcomes[name]
            assert {w.status for w in written if w.changed} >= {"201"}
            expected += sum(e["resource"]["resourceType"] == "Observation" for e in outcome.bundle["entry"])
        before = counts(db)
        assert await total(store, "Observation", subject=who) == expected > 3 * 7
        assert len(await tasks(store, who)) == 2  # a referral and an emergency review
        for qr in responses.values():  # a duplicate notification: nothing new, and where each result is
            kept = (await submit(store, SCREENER, qr))[1]
            assert [w for w in kept if w.changed] == [] and kept
            assert all([await store.read(w.location) for w in kept])
        assert counts(db) == before

        emergency = responses["qr-emergency.json"]
        mine = await _observations_of(store, emergency["id"])
        outcome, _ = await submit(store, SCREENER, amended(emergency, "amended", **{"rf-saddle-numbness": False}))
        assert outcome.label == "not-applicable"
        after = {o["code"]["coding"][0]["code"]: o for o in [await store.read(f"Observation/{i}") for i in mine]}
        assert after["screening-outcome"]["status"] == "amended"
        assert after["screening-outcome"]["meta"]["versionId"] == "2"
        assert after["screening-outcome"]["valueCodeableConcept"]["coding"][0]["code"] == "not-applicable"
        assert after["red-flags"]["valueBoolean"] is False
        assert after["asas-ibp"]["meta"]["versionId"] == "1"  # unchanged: not rewritten
        assert await total(store, "Observation", subject=who) == expected  # updated in place
        assert sorted(t["status"] for t in await tasks(store, who)) == ["cancelled", "requested"]
        again = await submit(store, SCREENER, amended(emergency, "amended", **{"rf-saddle-numbness": False}))
        assert [w for w in again[1] if w.changed] == []

        refer = responses["qr-refer-asas.json"]
        await submit(store, SCREENER, amended(refer, "entered-in-error"))
        retracted = [await store.read(f"Observation/{i}") for i in await _observations_of(store, refer["id"])]
        assert len(retracted) == 7 and {o["status"] for o in retracted} == {"entered-in-error"}
        assert {o["meta"]["versionId"] for o in retracted} == {"2"}
        assert [t["status"] for t in await tasks(store, who)] == ["cancelled", "cancelled"]

    run(db, scenario)


async def _observations_of(store: SqliteStore, qr_id: str) -> list[str]:
    return [o["id"] async for o in store.search("Observation", {"_count": "100"})
            if o["derivedFrom"][0]["reference"] == f"QuestionnaireResponse/{qr_id}"]


def test_write_back_for_a_patient_kept_in_the_clinics_own_system(db: Path):
    """A stand-alone clinic keeps its patients elsewhere: the embedded store takes the reference as given."""
    async def scenario(store: SqliteStore) -> None:
        _, written = await submit(store, SCREENER, example("qr-refer-asas.json", "Patient/in-the-clinic-system"))
        assert sum(w.location.startswith("Observation/") for w in written) == 7

    run(db, scenario)
    assert counts(db)["resources"] > 7


def test_sync_scores_responses_written_straight_to_the_store(db: Path, tmp_path: Path):
    state = tmp_path / "sync-state.json"

    async def scenario(store: SqliteStore) -> None:
        who = f"Patient/{(await store.create(patient('sync')))['id']}"
        names = ("qr-refer-asas.json", "qr-emergency.json", "qr-no-referral.json")
        put_by_portal = [put(f"QuestionnaireResponse/{qr['id']}", qr) for qr in (example(n, who) for n in names)]
        unfinished = example("qr-emergency.json", who) | {"status": "in-progress"}
        await store.transaction(bundle(*put_by_portal, put(f"QuestionnaireResponse/{unfinished['id']}", unfinished)))
        first = await sync(store, SCREENER, state)
        assert first["written"] == 4  # the unfinished one reports saddle numbness: its red flags are written
        assert await total(store, "Observation", subject=who) == 3 * 7 + 1 and len(await tasks(store, who)) == 3
        assert "written" not in await sync(store, SCREENER, state)  # from the watermark: nothing new
        everything = await sync(store, SCREENER, state, since="2000-01-01T00:00:00Z")
        assert "written" not in everything and everything["up-to-date"] >= 3
        assert await total(store, "Observation", subject=who) == 3 * 7 + 1
        saved = orjson.loads(state.read_bytes())
        assert list(saved) == [store.base_url] and INSTANT.fullmatch(saved[store.base_url]["watermark"])

    run(db, scenario)
