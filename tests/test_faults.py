"""Fault injection with real processes: the FHIR server killed, `sync` killed, a faulty network, a stampede.

Every server here is started by the test on 127.0.0.1 (tests/fault_processes.py)
and every count is read back from the store itself (tests/result_sets.py):
for each response, exactly one result set (7 Observations, one Provenance, at
most one Task), none lost, none duplicated. Each test records its figures
(`fault_report`): tests/artifacts/fault-report.json and the end of the run.
Already covered elsewhere, so not repeated here: `submit` through 500/429/
lost answers/resets (test_writeback.py), two syncs at once (test_sync.py),
the store's own full/read-only/busy cases (test_sqlite_store.py).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import orjson

from tests.conftest import fhir_client
from tests.fault_processes import (
    fault_proxy,
    faults,
    kill_group,
    run_cli,
    serve_env,
    serving,
    wait_for,
)
from tests.fhir_helpers import CLI, ROOT, for_patient, total, written_locations
from tests.result_sets import in_store, on_server

EXAMPLES = ["qr-refer-asas.json", "qr-no-referral.json", "qr-not-applicable.json", "qr-emergency.json",
            "qr-urgent.json", "qr-indeterminate.json", "qr-nice-test-hla-b27.json"]
JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
# Seconds a caller keeps retrying one response: a fault that never clears fails, never hangs, the run. HAPI takes
# up to two minutes to come back from SIGKILL on this machine when it is busy, so a portal waits longer than that.
GIVE_UP = 400


def new_patients(fhir: httpx.Client, n: int) -> list[str]:
    made = []
    for _ in range(n):
        created = fhir.post("/Patient", content=b'{"resourceType": "Patient", "active": true}')
        assert created.status_code == 201, created.text
        made.append(f"Patient/{created.json()['id']}")
    return made


def responses(patients: list[str], n: int) -> dict[str, bytes]:
    """n distinct completed responses (every outcome in turn), by id."""
    names, who = itertools.cycle(EXAMPLES), itertools.cycle(patients)
    bodies = [for_patient(next(names), next(who)) for _ in range(n)]
    return {orjson.loads(body)["id"]: body for body in bodies}


def put_all(base_url: str, bodies: dict[str, bytes], per_bundle: int = 100) -> None:
    """As a portal writes them, straight to the server (a batch of PUTs at a time)."""
    items = list(bodies.items())
    with fhir_client(base_url) as fhir:
        for start in range(0, len(items), per_bundle):
            # each entry with its fullUrl: HAPI's validator refuses a Bundle entry without one
            entries = [{"fullUrl": f"{base_url}/QuestionnaireResponse/{qr_id}", "resource": orjson.loads(body),
                        "request": {"method": "PUT", "url": f"QuestionnaireResponse/{qr_id}"}}
                       for qr_id, body in items[start:start + per_bundle]]
            done = fhir.post("/", content=orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": entries}))
            assert done.status_code == 200, done.text
            assert all(e["response"]["status"].startswith("20") for e in done.json()["entry"])


@dataclass(frozen=True)
class Session:
    """The session's HAPI, for the scenarios that do not kill it (one HAPI start saved per scenario)."""
    base_url: str


def server_now(base_url: str) -> str:
    """The server's clock (from its answer's Date), a second back: where a sync of only what follows starts."""
    said = httpx.get(f"{base_url}/metadata", timeout=30).headers["Date"]
    return (parsedate_to_datetime(said) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


def sync(base_url: str, home: Path, since: str | None = None, *flags: str) -> subprocess.CompletedProcess:
    """A sync with its state in `home`; `since` for its first run on a server other tests wrote to."""
    state = home / "sync-state.json"
    start = ["--since", since] if since and not state.exists() else []
    return run_cli("sync", "--fhir-base-url", base_url, "--state", str(state), *start, *flags, home=home)


# -- 1. the FHIR server killed while responses are being submitted and notified ---------------------------


class Portal:
    """Submits responses to the FHIR server from several threads, each PUT retried until the server takes it
    (as a portal does: a response the patient finished is not dropped because the server was down)."""

    def __init__(self, base_url: str, bodies: dict[str, bytes], threads: int = 8) -> None:
        self.base_url, self.bodies, self.threads = base_url, bodies, threads
        self.accepted = 0
        self.retries = 0
        self.lock = threading.Lock()

    def put(self, fhir: httpx.Client, qr_id: str) -> None:
        deadline = time.monotonic() + GIVE_UP
        while time.monotonic() < deadline:  # a server that never takes it fails the test instead of hanging it
            try:
                answer = fhir.put(f"/QuestionnaireResponse/{qr_id}", content=self.bodies[qr_id])
                if answer.status_code in (200, 201):
                    with self.lock:
                        self.accepted += 1
                    return
                # 5xx: down; 409: HAPI's answer to two creates of one id at once (a retry after a timeout while
                # the first try still runs). Anything else is a refusal: retrying will not help.
                assert answer.status_code >= 500 or answer.status_code == 409, answer.text
            except httpx.TransportError:
                pass
            with self.lock:
                self.retries += 1
            time.sleep(0.05)
        raise AssertionError(f"QuestionnaireResponse/{qr_id} not taken within {GIVE_UP} s")

    def run(self) -> None:
        ids = list(self.bodies)
        with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
            chunks = [ids[i::self.threads] for i in range(self.threads)]
            list(pool.map(self.put_chunk, chunks))

    def put_chunk(self, ids: list[str]) -> None:
        with fhir_client(self.base_url) as fhir:
            for qr_id in ids:
                self.put(fhir, qr_id)


def settled(base_url: str, bodies: dict[str, bytes], quiet: float = 5.0, timeout: float = 300) -> bool:
    """Until the results on the server stop changing for `quiet` seconds: HAPI's notifications are handled.
    (HAPI says nothing about its delivery queue, so the store itself is watched.)"""
    deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        now = on_server(base_url).verdict(bodies)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
        time.sleep(1.0)
    return False


def test_fhir_server_killed_mid_stream_then_restarted_and_synced(tmp_path: Path, fault_report, killable_hapi):
    n = 60  # HAPI validates every write: enough to be killed mid-stream (8 portal threads), few enough to be quick
    server = killable_hapi
    with serving(tmp_path / "serve", "--fhir-base-url", server.base_url) as service:
        with fhir_client(server.base_url) as fhir:
            patients = new_patients(fhir, 20)
        subscribed = run_cli("subscribe", "--fhir-base-url", server.base_url, "--endpoint",
                             f"{service.base_url}/notify", home=tmp_path)
        assert subscribed.returncode == 0, subscribed.stderr
        bodies = responses(patients, n)
        portal = Portal(server.base_url, bodies)
        submitting = threading.Thread(target=portal.run)
        started = time.monotonic()
        submitting.start()
        assert wait_for(lambda: portal.accepted >= n * 2 // 5, timeout=300)
        server.kill()  # SIGKILL: no goodbye, notifications queued in it are gone
        accepted_before_kill = portal.accepted
        time.sleep(1.0)  # down for a moment: the portal and the plugin's write-backs meet a dead port
        server.start()  # same port, same data (its H2 file)
        restarted = time.monotonic()
        at_restart = on_server(server.base_url).verdict(bodies)
        submitting.join(timeout=GIVE_UP + 60)
        assert portal.accepted == n
        assert settled(server.base_url, bodies)
        before_sync = on_server(server.base_url).verdict(bodies)
        synced = sync(server.base_url, tmp_path)
        assert synced.returncode == 0, synced.stderr
        converged = time.monotonic()
        after = on_server(server.base_url).verdict(bodies)
    assert accepted_before_kill < n, "every response was in before the kill: nothing was killed mid-stream"
    assert after == {"exactly_one": n, "lost": 0, "duplicated": 0, "incomplete": 0}, after
    assert before_sync["duplicated"] == 0  # even before sync: nothing written twice
    fault_report("FHIR server SIGKILLed mid-stream, restarted, sync",
                 submitted=n, accepted_before_kill=accepted_before_kill,
                 complete_at_restart=at_restart["exactly_one"], portal_retries=portal.retries,
                 missing_before_sync=n - before_sync["exactly_one"], sync_wrote=orjson.loads(synced.stdout),
                 lost=after["lost"], duplicated=after["duplicated"],
                 seconds_restart_to_converged=round(converged - restarted, 1),
                 seconds_total=round(converged - started, 1))


# -- 2. `sync` killed with SIGKILL in the middle of its work -----------------------------------------------


def test_sync_killed_midway_then_rerun_completes_without_duplicates(tmp_path: Path, fault_report, fhir_base_url):
    n, page = 60, "30"  # two of sync's pages: killed in the second, it must not start again from zero
    server = Session(fhir_base_url)
    with fhir_client(server.base_url) as fhir:
        patients = new_patients(fhir, 10)
        bodies = responses(patients, n)
    since = server_now(server.base_url)  # this session's server holds other tests' responses: only ours
    put_all(server.base_url, bodies)
    state = tmp_path / "sync-state.json"
    with (tmp_path / "sync.log").open("wb") as log:
        first = subprocess.Popen([*CLI, "sync", "--fhir-base-url", server.base_url, "--state", str(state),
                                  "--since", since, "--page-size", page], cwd=ROOT, env=serve_env(tmp_path),
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    with fhir_client(server.base_url) as fhir:
        def written() -> int:
            return total(fhir, "Observation", subject=",".join(patients)) // 7

        # in the second page: the first page's watermark saved, transactions of the second in flight
        try:  # HAPI validates each transaction: a page takes a minute or two on a busy 2-core machine
            assert wait_for(lambda: state.exists() and written() >= n * 5 // 8, timeout=400, every=0.05)
        finally:
            kill_group(first)  # SIGKILL, holding the lock
        at_kill = on_server(server.base_url).verdict(bodies)
    started = time.monotonic()
    rerun = sync(server.base_url, tmp_path, None, "--page-size", page)
    seconds = time.monotonic() - started
    assert rerun.returncode == 0, rerun.stderr
    assert b"another sync is running" not in rerun.stderr  # the dead process's lock went with it
    counts = orjson.loads(rerun.stdout)
    after = on_server(server.base_url).verdict(bodies)
    assert at_kill["exactly_one"] < n
    assert after == {"exactly_one": n, "lost": 0, "duplicated": 0, "incomplete": 0}, after
    assert counts.get("written", 0) == n - at_kill["exactly_one"]  # each transaction is all or nothing
    assert sum(counts.values()) <= n - int(page)  # resumed from the saved watermark, not from the beginning
    fault_report("sync SIGKILLed mid-way, rerun", responses=n, complete_at_kill=at_kill["exactly_one"],
                 partial_at_kill=at_kill["incomplete"],
                 rerun=counts, rerun_seconds=round(seconds, 1), lost=after["lost"], duplicated=after["duplicated"])


# -- 3. a faulty network between the plugin and the FHIR server --------------------------------------------

# One request in four meets a fault (lose/cut: the server acted, then the answer was lost, so the retry must not
# write twice). Requests run concurrently, so a request's retries land anywhere in the script: one in about a
# thousand meets five faults in a row and gives up; the caller then retries (ingest) or sync is run again.
SCRIPT = ",".join(["pass,pass,pass,500", "pass,pass,pass,reset", "pass,pass,pass,429", "pass,pass,pass,lose",
                   "pass,pass,pass,cut", "pass,pass,pass,503"])


def ingest_until_taken(base_url: str, body: bytes, counts: Counter) -> int:
    """POSTs a response to `serve` until it is taken (a 5xx means: not written, try again later)."""
    deadline = time.monotonic() + GIVE_UP
    with httpx.Client(timeout=60) as http:
        while time.monotonic() < deadline:
            answer = http.post(f"{base_url}/QuestionnaireResponse", content=body, headers=JSON)
            if answer.status_code in (200, 201):
                return answer.status_code
            assert answer.status_code >= 500, answer.text  # a fault is never the caller's fault
            assert answer.json()["resourceType"] == "OperationOutcome"
            counts[answer.status_code] += 1
            time.sleep(0.2)
    raise AssertionError(f"not taken within {GIVE_UP} s")


def test_latency_errors_and_resets_between_the_plugin_and_the_server(tmp_path: Path, fault_report, fhir_base_url):
    n = 40  # each way: over 100 requests through the proxy, so each of its six faults comes round several times
    server = Session(fhir_base_url)
    with fault_proxy(server.base_url, SCRIPT, "--latency", "50-200") as proxy, \
            serving(tmp_path / "serve", "--fhir-base-url", proxy) as service:
        with fhir_client(server.base_url) as fhir:
            patients = new_patients(fhir, 6)
        ingested, synced_bodies = responses(patients, n), responses(patients, n)
        refused: Counter = Counter()
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            statuses = Counter(pool.map(lambda body: ingest_until_taken(service.base_url, body, refused),
                                        ingested.values()))
        ingest_seconds = time.monotonic() - started
        served_ingest = faults(proxy)

        since = server_now(server.base_url)
        put_all(server.base_url, synced_bodies)  # reached the server, the plugin never heard
        started, runs = time.monotonic(), 0
        while runs < 5:
            runs += 1
            if sync(proxy, tmp_path, since).returncode == 0:
                break
        sync_seconds = time.monotonic() - started
        served = faults(proxy)
        tally = on_server(server.base_url)
    assert tally.verdict(ingested) == {"exactly_one": n, "lost": 0, "duplicated": 0, "incomplete": 0}
    assert tally.verdict(synced_bodies) == {"exactly_one": n, "lost": 0, "duplicated": 0, "incomplete": 0}
    assert runs < 5
    for step in ("500", "503", "429", "reset", "lose", "cut"):
        assert served_ingest[step] > 0 and served[step] > served_ingest[step], served
    fault_report("proxy: 50-200 ms latency, 500/503, 429, resets, lost answers",
                 ingested=n, ingest_statuses=dict(statuses), ingest_5xx_then_retried=dict(refused),
                 ingest_seconds=round(ingest_seconds, 1), synced=n, sync_runs=runs,
                 sync_seconds=round(sync_seconds, 1), faults_injected={k: v for k, v in served.items()
                                                                       if k not in ("pass", "after_429")},
                 requests_passed=served["pass"], lost=0, duplicated=0)


def test_a_429_storm_is_waited_out_as_retry_after_asks(tmp_path: Path, fault_report, fhir_base_url):
    server = Session(fhir_base_url)
    with fault_proxy(server.base_url, "429,429,429,pass", "--retry-after", "1") as proxy:
        with fhir_client(server.base_url) as fhir:
            (patient,) = new_patients(fhir, 1)
        bodies = responses([patient], 1)
        started = time.monotonic()
        for body in bodies.values():  # one request at a time: each gap after a 429 is the client's own wait
            done = run_cli("submit", "-", "--fhir-base-url", proxy, stdin=body, home=tmp_path)
            assert done.returncode == 0, done.stderr
        seconds = time.monotonic() - started
        served = faults(proxy)
        tally = on_server(server.base_url)
    waits = served["after_429"]
    assert served["429"] >= 3 and len(waits) == served["429"]
    assert min(waits) >= 0.95, waits  # Retry-After: 1 honoured (the backoff alone would retry within 0.2 s)
    assert tally.verdict(bodies) == {"exactly_one": 1, "lost": 0, "duplicated": 0, "incomplete": 0}
    fault_report("proxy: 429 storm with Retry-After: 1", submitted=1, answered_429=served["429"],
                 waited_after_429_min_s=min(waits), waited_after_429_max_s=max(waits),
                 seconds=round(seconds, 1), lost=0, duplicated=0)


def test_a_429_storm_on_concurrent_write_backs_is_waited_out(tmp_path: Path, fault_report, fhir_base_url):
    """Every request answered 429 (Retry-After: 1) for 2.5 s while 6 callers ingest through `serve`: the
    plugin's requests then come at most once a second each, and every response is written once."""
    n, storm, callers = 30, 2.5, 6
    server = Session(fhir_base_url)
    with fault_proxy(server.base_url, "pass", "--retry-after", "1") as proxy, \
            serving(tmp_path / "serve", "--fhir-base-url", proxy) as service:
        with fhir_client(server.base_url) as fhir:
            bodies = responses(new_patients(fhir, 3), n)
        refused: Counter = Counter()
        # The storm starts before the first caller: on a quiet machine all 30 are written within a second.
        httpx.put(f"{proxy}/__faults", params={"script": "429"}, timeout=10)
        with concurrent.futures.ThreadPoolExecutor(callers) as pool:
            ingesting = [pool.submit(ingest_until_taken, service.base_url, body, refused) for body in bodies.values()]
            time.sleep(storm)
            httpx.put(f"{proxy}/__faults", params={"script": "pass"}, timeout=10)
            assert all(f.result(timeout=120) in (200, 201) for f in ingesting)
        served = faults(proxy)
        tally = on_server(server.base_url)
    assert tally.verdict(bodies) == {"exactly_one": n, "lost": 0, "duplicated": 0, "incomplete": 0}
    # honoured: each of the (at most `callers`) requests in flight asks again after 1 s, not within 0.2 s
    assert 0 < served["429"] <= callers * (storm + 1) + callers, served
    fault_report("proxy: 2.5 s 429 storm under 6 concurrent callers", written=n, answered_429=served["429"],
                 bound_if_honoured=int(callers * (storm + 1) + callers), callers_saw_5xx=dict(refused),
                 lost=0, duplicated=0)


# -- 4. the same response submitted 20 times at once ---------------------------------------------------------


SUBMITS = 6  # `submit` processes at once: each costs a Python start (about 1 s of CPU), so fewer than 20


def stampede(url: str, body: bytes, n: int = 20) -> list[httpx.Response]:
    start = threading.Barrier(n)

    def post(_: int) -> httpx.Response:
        with httpx.Client(timeout=60) as http:
            start.wait()
            return http.post(url, content=body, headers={**JSON, "Prefer": "return=OperationOutcome"})

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(post, range(n)))


def summary(answers: list[httpx.Response]) -> tuple[Counter, set]:
    """The statuses, and the distinct sets of places callers were told their response and results are.

    A caller whose read found everything already lists the response, its Observations and Task; one whose
    transaction ran also lists the Device and Provenance that transaction matched: those two are left out.
    """
    statuses = Counter(a.status_code for a in answers)
    told = [written_locations(a.json()) for a in answers if a.status_code in (200, 201)]
    locations = {tuple(sorted(x for x in places if not x.startswith(("Device/", "Provenance/")))) for places in told}
    return statuses, locations


def test_twenty_at_once_on_the_embedded_store_with_two_workers(tmp_path: Path, fault_report):
    with serving(tmp_path, "--store", str(tmp_path / "store.sqlite3"), "--workers", "2") as service:
        wait_for(lambda: httpx.get(f"{service.base_url}/readyz", timeout=5).status_code == 200, timeout=30)
        body = for_patient("qr-refer-asas.json", "Patient/stampede")
        statuses, locations = summary(stampede(f"{service.base_url}/QuestionnaireResponse", body))
    verdict = in_store(tmp_path / "store.sqlite3").verdict([orjson.loads(body)["id"]])
    assert verdict == {"exactly_one": 1, "lost": 0, "duplicated": 0, "incomplete": 0}
    assert statuses == {201: 1, 200: 19}, statuses
    assert len(locations) == 1  # every caller is told the same places
    fault_report("20 identical submissions at once, embedded store, 2 workers",
                 statuses=dict(statuses), distinct_location_sets=len(locations), lost=0, duplicated=0)


def test_twenty_at_once_on_the_fhir_server_through_serve_and_through_submit(
        tmp_path: Path, fault_report, fhir_base_url):
    server = Session(fhir_base_url)
    with serving(tmp_path / "serve", "--fhir-base-url", server.base_url) as svc:
        with fhir_client(server.base_url) as fhir:
            (patient,) = new_patients(fhir, 1)
        body = for_patient("qr-emergency.json", patient)
        statuses, locations = summary(stampede(f"{svc.base_url}/QuestionnaireResponse", body))
        again = for_patient("qr-emergency.json", patient)
        processes = [subprocess.Popen([*CLI, "submit", "-", "--fhir-base-url",
                                       server.base_url], cwd=ROOT, env=serve_env(tmp_path), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(SUBMITS)]
        for process in processes:  # all started (importing takes longer than this), then all fed at once
            process.stdin.write(again)
        for process in processes:
            process.stdin.close()
        outputs = [(process.wait(timeout=120), process.stdout.read()) for process in processes]
        tally = on_server(server.base_url)
    ids = [orjson.loads(body)["id"], orjson.loads(again)["id"]]
    assert tally.verdict(ids) == {"exactly_one": 2, "lost": 0, "duplicated": 0, "incomplete": 0}
    assert statuses == {201: 1, 200: 19}, statuses
    assert len(locations) == 1
    assert [code for code, _ in outputs] == [0] * SUBMITS
    created = sum(any(w["status"] == "201" for w in orjson.loads(out)["written"]) for _, out in outputs)
    assert created >= 1
    fault_report(f"20 identical submissions at once through serve, {SUBMITS} submit processes, FHIR server",
                 serve_statuses=dict(statuses), serve_distinct_location_sets=len(locations),
                 submit_processes_ok=sum(code == 0 for code, _ in outputs), submit_that_created=created,
                 lost=0, duplicated=0)
