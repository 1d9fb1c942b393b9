"""The same command-line write-back flows as test_writeback and test_sync, on the embedded store.

Without a FHIR server configured, `publish`, `submit` and `sync` write to the
embedded SQLite store; what they wrote is read back through the store itself.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import orjson
import pytest

from plugin.stores.sqlite import SqliteStore
from tests.fhir_helpers import CLI, ROOT, for_patient
from tests.stores.test_writeback import OUTCOMES, TASKS, amend

T = TypeVar("T")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.sqlite3"


def cli(db: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env_free = {"PATH": os.environ["PATH"], "HOME": str(db.parent)}  # no FHIR_BASE_URL: the embedded store
    return subprocess.run([*CLI, *args, "--store", str(db)], input=stdin, capture_output=True, cwd=ROOT,
                          timeout=120, check=False, env=env_free)


def submitted(db: Path, body: bytes) -> dict:
    done = cli(db, "submit", "-", stdin=body)
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout)


def on_store(db: Path, work: Callable[[SqliteStore], Awaitable[T]]) -> T:
    async def run() -> T:
        async with SqliteStore(db) as store:
            return await work(store)

    return asyncio.run(run())


def found(db: Path, resource_type: str, **params: str) -> list[dict]:
    async def search(store: SqliteStore) -> list[dict]:
        return [r async for r in store.search(resource_type, params)]

    return on_store(db, search)


def by_code(db: Path, patient: str) -> dict[str, dict]:
    return {o["code"]["coding"][0]["code"]: o for o in found(db, "Observation", subject=patient)}


def test_publish_twice_leaves_one_of_each(db: Path):
    for _ in range(2):
        done = cli(db, "publish")
        assert done.returncode == 0, done.stderr
    screening = "https://backpain-screen.org/fhir/Questionnaire/back-pain-screening"
    assert len(found(db, "Questionnaire", url=screening)) == 2  # 1.0.0 and 1.1.0, each once
    assert len(found(db, "Device")) == 2  # one per rule set


def test_submit_every_outcome_then_replay_changes_nothing(db: Path):
    patient = f"Patient/{uuid.uuid4()}"
    bodies = {name: for_patient(name, patient) for name in OUTCOMES}
    for name, body in bodies.items():
        assert submitted(db, body)["outcome"] == OUTCOMES[name], name
    counts = (len(found(db, "Observation", subject=patient)), len(found(db, "Task", patient=patient)))
    assert counts == (7 * len(OUTCOMES), sum(TASKS.get(o, 0) for o in OUTCOMES.values()))
    for body in bodies.values():
        assert submitted(db, body)["written"] == []
    assert (len(found(db, "Observation", subject=patient)), len(found(db, "Task", patient=patient))) == counts


def test_amended_then_entered_in_error(db: Path):
    patient = f"Patient/{uuid.uuid4()}"
    body = for_patient("qr-emergency.json", patient)
    submitted(db, body)
    before = by_code(db, patient)
    assert submitted(db, amend(body, "amended", **{"rf-saddle-numbness": False}))["outcome"] == "not-applicable"
    after = by_code(db, patient)
    assert {k: v["id"] for k, v in after.items()} == {k: v["id"] for k, v in before.items()}
    assert after["screening-outcome"]["status"] == "amended" and after["screening-outcome"]["meta"]["versionId"] == "2"
    assert [t["status"] for t in found(db, "Task", patient=patient)] == ["cancelled"]
    submitted(db, amend(body, "entered-in-error"))
    assert {o["status"] for o in by_code(db, patient).values()} == {"entered-in-error"}


def test_sync_scores_responses_put_straight_in_the_store(db: Path, tmp_path: Path):
    patient = f"Patient/{uuid.uuid4()}"
    qrs = [orjson.loads(for_patient(name, patient)) for name in ("qr-refer-asas.json", "qr-urgent.json")]

    async def put_them(store: SqliteStore) -> None:
        for qr in qrs:
            await store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": qr, "request": {"method": "PUT", "url": f"QuestionnaireResponse/{qr['id']}"}}]})

    on_store(db, put_them)
    state = tmp_path / "sync-state.json"
    first = cli(db, "sync", "--state", str(state))
    assert first.returncode == 0, first.stderr
    assert orjson.loads(first.stdout)["written"] == 2
    assert len(found(db, "Observation", subject=patient)) == 14
    again = cli(db, "sync", "--state", str(state))
    assert "written" not in orjson.loads(again.stdout)


def test_a_response_id_used_for_another_patient_is_refused_not_overwritten(db: Path):
    body = for_patient("qr-emergency.json", f"Patient/{uuid.uuid4()}")
    submitted(db, body)
    other = orjson.loads(body)
    other["subject"] = {"reference": f"Patient/{uuid.uuid4()}"}
    refused = cli(db, "submit", "-", stdin=orjson.dumps(other))
    assert refused.returncode == 2 and "another patient" in refused.stderr.decode()
    stored = on_store(db, lambda store: store.read(f"QuestionnaireResponse/{other['id']}"))
    assert stored["subject"] == orjson.loads(body)["subject"] and stored["meta"]["versionId"] == "1"


def test_an_amended_response_known_by_its_identifier_is_stored_in_its_new_version(db: Path):
    patient = f"Patient/{uuid.uuid4()}"
    qr = orjson.loads(for_patient("qr-emergency.json", patient))
    del qr["id"]
    qr["identifier"] = {"system": "https://portal.example/responses", "value": str(uuid.uuid4())}
    submitted(db, orjson.dumps(qr))
    report = submitted(db, amend(orjson.dumps(qr), "amended", **{"rf-saddle-numbness": False}))
    assert report["outcome"] == "not-applicable"
    ident = qr["identifier"]
    (stored,) = found(db, "QuestionnaireResponse", identifier=f"{ident['system']}|{ident['value']}")
    assert stored["status"] == "amended" and stored["meta"]["versionId"] == "2"


def test_sync_follows_the_pages_and_survives_a_damaged_state_file(db: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    from plugin.screening.pipeline import Screener
    from plugin.stores import sync as sync_module

    monkeypatch.setattr(sync_module, "PAGE", 2)  # 5 responses: three pages
    patient = f"Patient/{uuid.uuid4()}"
    qrs = [orjson.loads(for_patient("qr-refer-asas.json", patient)) for _ in range(5)]

    async def put_them(store: SqliteStore) -> None:
        await store.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": qr, "request": {"method": "PUT", "url": f"QuestionnaireResponse/{qr['id']}"}} for qr in qrs]})

    on_store(db, put_them)
    state = tmp_path / "sync-state.json"
    state.write_text('{"truncated": ')  # as a crash mid-write once left it
    counts = on_store(db, lambda store: sync_module.sync(store, Screener(), state))
    assert counts["written"] == 5
    assert len(found(db, "Observation", subject=patient)) == 35
    assert orjson.loads(state.read_bytes())  # whole again
    assert on_store(db, lambda store: sync_module.sync(store, Screener(), state))["written"] == 0


def test_a_response_without_id_or_identifier_is_recognised_when_read_back(db: Path, tmp_path: Path):
    """Written under an identifier made from its content; sync reading it back must find its results, not add more."""
    patient = f"Patient/{uuid.uuid4()}"
    qr = orjson.loads(for_patient("qr-urgent.json", patient))
    del qr["id"]
    submitted(db, orjson.dumps(qr))
    done = cli(db, "sync", "--state", str(tmp_path / "state.json"), "--since", "2000-01-01T00:00:00Z")
    assert done.returncode == 0, done.stderr
    counts = orjson.loads(done.stdout)
    assert counts.get("up-to-date") == 1 and "written" not in counts
    assert len(found(db, "Observation", subject=patient)) == 7 and len(found(db, "Task", patient=patient)) == 1
