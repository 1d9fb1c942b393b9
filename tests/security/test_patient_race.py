"""No response filed on the wrong patient, even under a race (issue #14 item 1).

Twenty pairs of `POST /QuestionnaireResponse`, each pair the same `id` (or
the same `identifier`) for two different patients, sent at the same moment
to a real `serve` process: exactly one of each pair is written (201), the
other is refused (409), and the stored response and every result belong to
the one that was written. On the embedded store with two worker processes
(the store's own check under its write lock decides), and on a FHIR server.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from plugin.stores.sqlite import SqliteStore
from tests.factory import response
from tests.fault_processes import serving

PAIRS = 20
JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
RED_FLAG = {"rf-saddle-numbness": True}  # the earlier response's emergency: it must not be overwritten


def pair(kind: str, first: str, second: str) -> tuple[dict, dict]:
    shared = ({"id": f"race-{uuid.uuid4()}"} if kind == "id"
              else {"identifier": {"system": "urn:example:portal", "value": str(uuid.uuid4())}})
    return (response(RED_FLAG) | shared | {"subject": {"reference": first}},
            response({"rf-saddle-numbness": False}) | shared | {"subject": {"reference": second}})


def race(base_url: str, qrs: tuple[dict, dict]) -> list[tuple[int, str]]:
    """Both posted at once (a barrier releases them together); (status, patient) of each."""
    start = threading.Barrier(2)

    def post(qr: dict) -> tuple[int, str]:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            client.get("/healthz")  # connected before the barrier: the two requests leave together
            start.wait()
            answer = client.post("/QuestionnaireResponse", content=orjson.dumps(qr), headers=JSON)
            return answer.status_code, qr["subject"]["reference"]

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(post, qrs))


def check_pairs(base_url: str, patients: Callable[[int], tuple[str, str]], kind: str,
                stored_subject: Callable[[dict], str | None], results_of: Callable[[str], int]) -> None:
    for i in range(PAIRS):
        qrs = pair(kind, *patients(i))
        outcomes = race(base_url, qrs)
        assert sorted(status for status, _ in outcomes) == [201, 409], outcomes
        winner = next(patient for status, patient in outcomes if status == 201)
        loser = next(patient for status, patient in outcomes if status == 409)
        assert stored_subject(qrs[0]) == winner
        assert results_of(loser) == 0, f"pair {i}: results were written for {loser}, whose response was refused"
        assert results_of(winner) == 7  # the 7 Observations of the screening


# -- the embedded store, two worker processes -------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    home = tmp_path_factory.mktemp("race-embedded")
    store = home / "store.sqlite3"
    with serving(home, "--store", str(store), "--workers", "2") as running:
        yield running.base_url, store


def _embedded_reader(store_path: Path) -> tuple[Callable[[dict], str | None], Callable[[str], int]]:
    def run(coroutine_of: Callable[[SqliteStore], object]):
        async def go():
            async with SqliteStore(store_path) as store:
                return await coroutine_of(store)
        return asyncio.run(go())

    def subject(qr: dict) -> str | None:
        if "id" in qr:
            found = run(lambda s: s.read(f"QuestionnaireResponse/{qr['id']}"))
        else:
            page = run(lambda s: s.search_page("QuestionnaireResponse", {
                "identifier": f"{qr['identifier']['system']}|{qr['identifier']['value']}"}))
            found = page["entry"][0]["resource"] if page.get("entry") else None
        return found["subject"]["reference"] if found else None

    def results(patient: str) -> int:
        return run(lambda s: s.search_page("Observation", {"subject": patient, "_summary": "count"}))["total"]

    return subject, results


@pytest.mark.parametrize("kind", ["id", "identifier"])
def test_racing_pairs_on_the_embedded_store(embedded, kind):
    base_url, store = embedded
    subject, results = _embedded_reader(store)
    check_pairs(base_url, lambda i: (f"Patient/a-{kind}-{i}", f"Patient/b-{kind}-{i}"), kind, subject, results)


# -- a FHIR server ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def on_fhir(tmp_path_factory, fhir_base_url: str) -> Iterator[str]:
    home = tmp_path_factory.mktemp("race-fhir")
    with serving(home, "--fhir-base-url", fhir_base_url) as running:
        yield running.base_url


@pytest.mark.parametrize("kind", ["id", "identifier"])
def test_racing_pairs_on_a_fhir_server(on_fhir, fhir, kind):
    def new_patient() -> str:
        created = fhir.post("/Patient", content=orjson.dumps({"resourceType": "Patient", "active": True}))
        return f"Patient/{created.json()['id']}"

    def subject(qr: dict) -> str | None:
        if "id" in qr:
            found = fhir.get(f"/QuestionnaireResponse/{qr['id']}").json()
        else:
            page = fhir.get("/QuestionnaireResponse", params={
                "identifier": f"{qr['identifier']['system']}|{qr['identifier']['value']}"}).json()
            assert page.get("total", len(page.get("entry", []))) == 1, page
            found = page["entry"][0]["resource"]
        return found.get("subject", {}).get("reference")

    def results(patient: str) -> int:
        return fhir.get("/Observation", params={"subject": patient, "_summary": "count"}).json()["total"]

    check_pairs(on_fhir, lambda i: (new_patient(), new_patient()), kind, subject, results)
