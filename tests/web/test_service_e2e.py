"""The service as it is deployed: `backpain-screen serve` in its own process, spoken to over real HTTP.

Each server is started with `python -m plugin.jobs.cli serve --port <free> --store <tmp>` (uvicorn with uvloop
and httptools), waited for on /readyz, and always stopped, its worker processes with it. The tests
look at the embedded store directly, from this process, to see what the server wrote.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import orjson
import pytest
from lxml import etree

from plugin.stores.sqlite import SqliteStore
from tests.fhir_helpers import free_port, wait_until_ready, written_locations

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "questionnaires" / "examples"
FHIR_NS = "http://hl7.org/fhir"
NS = {"f": FHIR_NS}
FORM_SECRET = "e2e-form-secret"
JSON_BODY = {"Content-Type": "application/fhir+json"}
START_TIMEOUT = 60.0


def server_env(home: Path) -> dict[str, str]:
    """This environment without any setting that would point the server elsewhere, plus the test's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKPAIN_", "FHIR_"))}
    env.update({"XDG_STATE_HOME": str(home / "state"), "BACKPAIN_FORM_SECRET": FORM_SECRET,
                "BACKPAIN_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"})
    return env


class Server:
    def __init__(self, base_url: str, store: Path, log: Path, process: subprocess.Popen) -> None:
        self.base_url = base_url
        self.store = store
        self.log = log
        self.process = process
        self.stopped_cleanly: bool | None = None  # after the end: did SIGTERM stop every process of the group?

    def log_lines(self) -> list[dict]:
        """The service's own log lines (JSON); uvicorn's plain lines are left out."""
        lines = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    lines.append(orjson.loads(line))
        return lines


@contextlib.contextmanager
def serving(home: Path, *flags: str) -> Iterator[Server]:
    home.mkdir(parents=True, exist_ok=True)
    port, store, log = free_port(), home / "store.sqlite3", home / "server.log"
    command = [sys.executable, "-m", "plugin.jobs.cli", "serve", "--port", str(port), "--store", str(store), *flags]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=server_env(home), stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own process group: the workers stop with it
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{base_url}/readyz", process, START_TIMEOUT, log.read_text)
        running = Server(base_url, store, log, process)
        yield running
    finally:
        stopped_cleanly = stop(process)
    running.stopped_cleanly = stopped_cleanly


def group_alive(group: int) -> bool:
    """Whether any live (not zombie) process is left in the process group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group and fields[0] != "Z":
                return True
    return False


def stop(process: subprocess.Popen) -> bool:
    """SIGTERM to the server's process group, then SIGKILL to what is left; whether SIGTERM was enough."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    deadline = time.monotonic() + 10
    while group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    clean = process.returncode is not None and not group_alive(process.pid)
    if not clean:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
    return clean


def in_store(path: Path, work) -> object:
    async def run() -> object:
        async with SqliteStore(path) as store:
            return await work(store)

    return asyncio.run(run())


def new_patient(path: Path) -> str:
    created = in_store(path, lambda store: store.create({"resourceType": "Patient", "active": True}))
    return f"Patient/{created['id']}"  # type: ignore[index]


def count(path: Path, resource_type: str) -> int:
    async def total(store: SqliteStore) -> int:
        return (await store.search_page(resource_type, {"_summary": "count"}))["total"]

    return in_store(path, total)  # type: ignore[return-value]


def stored(path: Path, resource_type: str) -> list[dict]:
    async def everything(store: SqliteStore) -> list[dict]:
        return [r async for r in store.search(resource_type, {})]

    return in_store(path, everything)  # type: ignore[return-value]


def example(name: str, subject: str | None = None, **changes: object) -> dict:
    qr = orjson.loads((EXAMPLES / name).read_bytes())
    if subject:
        qr["subject"] = {"reference": subject}
    qr.update(changes)
    return qr


def expected_outcome(name: str) -> str:
    for line in (EXAMPLES / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] == f"`{name}`":
            return cells[2].strip("`")
    raise AssertionError(f"{name} is not in the examples' README")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("e2e")
    # The server answers POSTs only for patients the store knows: the first one is made before it starts.
    (home / "one").mkdir()
    first_patient = new_patient(home / "one" / "store.sqlite3")
    with serving(home / "one") as running:
        running.first_patient = first_patient  # type: ignore[attr-defined]
        yield running


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield client


# -- one worker --------------------------------------------------------------------------------------------------


def test_metadata_over_http(http):
    as_json = http.get("/metadata")
    assert as_json.status_code == 200
    assert as_json.json()["fhirVersion"] == "4.0.1"
    assert as_json.json()["implementation"]["url"] == str(http.base_url).rstrip("/")
    as_xml = http.get("/metadata", headers={"Accept": "application/fhir+xml"})
    assert as_xml.headers["content-type"].startswith("application/fhir+xml")
    root = etree.fromstring(as_xml.content)
    assert root.find("f:fhirVersion", NS).get("value") == "4.0.1"
    assert "server" not in as_json.headers  # uvicorn's banner is off


def test_post_writes_and_replay_writes_nothing(server, http):
    qr = example("qr-refer-asas.json", server.first_patient, id="e2e-refer")
    told = {**JSON_BODY, "Prefer": "return=OperationOutcome"}  # where each result went
    first = http.post("/QuestionnaireResponse", content=orjson.dumps(qr), headers=told)
    assert first.status_code == 201, first.text
    assert first.headers["location"].startswith(f"{server.base_url}/QuestionnaireResponse/e2e-refer/_history/")
    locations = set(written_locations(first.json()))
    held = {t: count(server.store, t) for t in ("QuestionnaireResponse", "Observation", "Task", "Provenance")}
    assert held["QuestionnaireResponse"] >= 1 and held["Observation"] > 0
    assert {f"Observation/{o['id']}" for o in stored(server.store, "Observation")
            if o["subject"]["reference"] == server.first_patient} <= locations
    again = http.post("/QuestionnaireResponse", content=orjson.dumps(qr), headers=told)
    assert again.status_code == 200, again.text
    assert again.headers["location"] == first.headers["location"]
    assert set(written_locations(again.json())) <= locations  # the results; no new Provenance, nothing written
    assert {t: count(server.store, t) for t in held} == held
    scored = [line for line in server.log_lines() if line.get("event") == "scored"
              and line.get("response") == "QuestionnaireResponse/e2e-refer"]
    assert scored and scored[0]["outcome"] == expected_outcome("qr-refer-asas.json")
    log = server.log.read_text()
    assert "1y-5y" not in log and "1 to 5 years" not in log  # answers never reach the log


def test_new_patient_written_while_serving(server, http):
    """The store is shared with other processes (a sync, an operator): what they add, the server sees."""
    patient = new_patient(server.store)
    qr = example("qr-emergency.json", patient, id="e2e-emergency")
    answer = http.post("/QuestionnaireResponse", content=orjson.dumps(qr), headers=JSON_BODY)
    assert answer.status_code == 201, answer.text
    results = http.get("/results/e2e-emergency")
    codes = {e["resource"]["code"]["coding"][0]["code"]: e["resource"] for e in results.json()["entry"]
             if e["resource"]["resourceType"] == "Observation"}
    outcome = codes["screening-outcome"]["valueCodeableConcept"]["coding"][0]["code"]
    assert outcome == expected_outcome("qr-emergency.json")


def test_extract_in_xml_over_http(server, http):
    before = count(server.store, "Observation")
    answer = http.post("/QuestionnaireResponse/$extract", content=(EXAMPLES / "qr-refer-asas.xml").read_bytes(),
                       headers={"Content-Type": "application/fhir+xml", "Accept": "application/fhir+xml"})
    assert answer.status_code == 200, answer.text
    root = etree.fromstring(answer.content)
    assert root.tag == f"{{{FHIR_NS}}}Bundle"
    outcome = root.xpath("f:entry/f:resource/f:Observation[f:code/f:coding/f:code/@value='screening-outcome']"
                         "/f:valueCodeableConcept/f:coding/f:code/@value", namespaces=NS)
    assert outcome == [expected_outcome("qr-refer-asas.xml")]
    assert count(server.store, "Observation") == before


class Form(HTMLParser):
    """The form's action, hidden fields and the radio values on offer, as a browser sees them."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.action = ""
        self.hidden: dict[str, str] = {}
        self.options: dict[str, set[str]] = {}
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.action = values.get("action", "")
        elif tag == "input" and values.get("type") == "hidden":
            self.hidden[values["name"]] = values.get("value", "")
        elif tag == "input" and values.get("type") == "radio":
            self.options.setdefault(values["name"], set()).add(values["value"])


def test_patient_form_round_trip(server, http):
    patient = new_patient(server.store)
    sig = hmac.new(FORM_SECRET.encode(), patient.encode(), hashlib.sha256).hexdigest()
    browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    page = http.get("/", params={"patient": patient, "sig": sig}, headers=browser)
    assert page.status_code == 200
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    form = Form(page.text)
    form_id = form.hidden.pop("form-id")  # the opened form's own id: sent twice, it is still one response
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", form_id)
    assert form.hidden == {"patient": patient, "sig": sig}
    assert "true" in form.options["rf-saddle-numbness"]
    # Like a patient would: numbness between the legs, no to every other warning sign, an age typed in.
    answers = {name: "false" for name, values in form.options.items() if name.startswith("rf-") and "false" in values}
    answers.update({"rf-saddle-numbness": "true", "onset-age": "30"})
    sent = http.post(form.action, data={**form.hidden, **answers}, headers=browser)
    assert sent.status_code == 200, sent.text
    icon = r'(<span[^>]*aria-hidden="true"[^>]*>!</span> )?'  # a picture for the eye, silent for a screen reader
    assert re.search(rf'role="alert"[^>]*>\s*<h1>{icon}Seek urgent care now</h1>', sent.text)
    assert "sent to your care team" in sent.text
    saved = [qr for qr in stored(server.store, "QuestionnaireResponse") if qr["subject"]["reference"] == patient]
    assert len(saved) == 1
    results = http.get(f"/results/{saved[0]['id']}", headers=browser)
    assert results.status_code == 200
    assert "Emergency assessment today" in results.text and "<code>emergency-assessment</code>" in results.text
    forged = http.post(form.action, data={**form.hidden, "sig": "0" * 64, **answers})
    assert forged.status_code == 403
    assert len([qr for qr in stored(server.store, "QuestionnaireResponse")
                if qr["subject"]["reference"] == patient]) == 1


# -- two workers -------------------------------------------------------------------------------------------------


def worker_fingerprint(base_url: str) -> str | None:
    """Which worker answered, on a connection of its own: each worker process has its own metrics registry, so the
    moment it first served /metrics (a series' `_created` time) tells them apart."""
    answer = httpx.get(f"{base_url}/metrics", headers={"Connection": "close"}, timeout=10)
    assert answer.status_code == 200
    found = re.search(r'backpain_http_request_seconds_created\{route="/metrics"\} (\S+)', answer.text)
    return found.group(1) if found else None


def test_two_workers_both_answer_and_write(tmp_path):
    (tmp_path / "two").mkdir()
    store = tmp_path / "two" / "store.sqlite3"
    patients = [new_patient(store) for _ in range(6)]
    with serving(tmp_path / "two", "--workers", "2") as running:
        seen: set[str] = set()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for _ in range(10):
                seen |= {f for f in pool.map(worker_fingerprint, [running.base_url] * 16) if f}
                if len(seen) >= 2:
                    break
        assert len(seen) == 2, f"answers came from {len(seen)} worker(s)"

        def post(i: int) -> int:
            qr = example("qr-refer-asas.json", patients[i], id=f"two-workers-{i}")
            with httpx.Client(timeout=30, headers={"Connection": "close"}) as client:
                return client.post(f"{running.base_url}/QuestionnaireResponse", content=orjson.dumps(qr),
                                   headers=JSON_BODY).status_code

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            assert list(pool.map(post, range(6))) == [201] * 6
        assert count(store, "QuestionnaireResponse") == 6
        per_response = len([o for o in stored(store, "Observation")
                            if o["subject"]["reference"] == patients[0]])
        assert per_response > 0 and count(store, "Observation") == 6 * per_response
        assert running.process.poll() is None
    assert running.stopped_cleanly  # SIGTERM stopped the supervisor and both workers
