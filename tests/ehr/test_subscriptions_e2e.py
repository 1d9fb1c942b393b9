"""`backpain-screen subscribe` end to end, with real processes only.

The session's HAPI FHIR JPA server, which delivers the rest-hook notifications
itself, and `backpain-screen serve` writing to it, with a notification secret.
`publish`, `subscribe` and `sync` run as an operator runs them, through the CLI. Responses are written straight to the
FHIR server, as an EHR or a portal would, and the tests wait for the results
the server's rest-hook notification makes the plugin write there.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from plugin.ehr.subscribe import TAG_SYSTEM, check_endpoint, differences, merged, subscription
from plugin.jobs.cli import EXIT_BAD_INPUT, main
from plugin.screening.data import canonical_forms
from tests.conftest import fhir_client
from tests.fhir_helpers import (
    CLI,
    ROOT,
    for_patient,
    free_port,
    results,
    tasks,
    total,
    wait_until_ready,
)
from tests.stores.test_writeback import amend
from tests.web.test_service_e2e import server_env, stop

SECRET = "e2e-notify-secret-one"
ROTATED = "e2e-notify-secret-two"
BOUND = 10.0  # seconds from a response written on the FHIR server to its results written there
RESULT_SET = 7  # Observations per screening response
SCREENING = "https://backpain-screen.org/fhir/Questionnaire/back-pain-screening"
QUESTIONNAIRES = {SCREENING, "https://backpain-screen.org/fhir/Questionnaire/basdai"}
START_TIMEOUT = 60.0
ACTIVATION = 90.0  # seconds HAPI may take to activate a new Subscription (its loader runs in the background)


class Plugin:
    def __init__(self, fhir_url: str, base_url: str, home: Path) -> None:
        self.fhir_url = fhir_url
        self.base_url = base_url
        self.endpoint = f"{base_url}/notify"
        self.home = home

    def cli(self, *args: str, secret: str | None = SECRET) -> subprocess.CompletedProcess:
        env = {**server_env(self.home), **({"BACKPAIN_NOTIFY_SECRET": secret} if secret else {})}
        return subprocess.run([*CLI, *args, "--fhir-base-url", self.fhir_url], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=120, check=False)

    def subscribe(self, *flags: str, secret: str = SECRET) -> dict:
        """`subscribe`, then (unless a dry run) until HAPI has activated what it wrote: HAPI stores a
        Subscription as `requested` and activates it a moment later, in the background."""
        done = self.cli("subscribe", "--endpoint", self.endpoint, *flags, secret=secret)
        assert done.returncode == 0, done.stderr
        assert secret not in done.stdout + done.stderr  # never printed
        said = orjson.loads(done.stdout)
        if "--dry-run" not in flags:
            with fhir_client(self.fhir_url) as fhir:
                seconds = wait_for(lambda: all(s["status"] == "active" for s in ours(fhir).values()), ACTIVATION,
                                   "HAPI activating the Subscriptions")
            print(f"Subscriptions active {seconds:.1f} s after subscribe")
        return said

    def refused_notifications(self) -> int:
        """How many notifications the service answered 401 (from its Prometheus metrics)."""
        metrics = httpx.get(f"{self.base_url}/metrics").text
        found = re.findall(r'backpain_http_requests_total\{[^}]*route="/notify/QuestionnaireResponse/\{id\}"'
                           r'[^}]*status="401"[^}]*\} (\d+)', metrics)
        return sum(int(float(n)) for n in found)


@pytest.fixture(scope="module")
def fhir_url(fhir_base_url: str) -> Iterator[str]:
    """The session's HAPI; the Subscriptions these tests make go when they are done, so no other test's
    responses are notified to a service that is gone."""
    yield fhir_base_url
    with fhir_client(fhir_base_url) as fhir:
        for sub in ours(fhir).values():
            fhir.delete(f"/Subscription/{sub['id']}")


@pytest.fixture
def fhir(fhir_url: str) -> Iterator[httpx.Client]:
    """This module's FHIR server (conftest's `patient` makes its Patients here too)."""
    with fhir_client(fhir_url) as client:
        yield client


@pytest.fixture(scope="module")
def plugin(fhir_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plugin]:
    """`backpain-screen serve` on a free port, writing to the FHIR server, with the notification secret."""
    home = tmp_path_factory.mktemp("subscriptions")
    port, log = free_port(), home / "server.log"
    env = {**server_env(home), "FHIR_BASE_URL": fhir_url, "BACKPAIN_NOTIFY_SECRET": SECRET}
    with log.open("wb") as sink:
        process = subprocess.Popen([*CLI, "serve", "--port", str(port)], cwd=ROOT, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        running = Plugin(fhir_url, f"http://127.0.0.1:{port}", home)
        wait_until_ready(f"{running.base_url}/readyz", process, START_TIMEOUT, log.read_text)
        published = running.cli("publish")
        assert published.returncode == 0, published.stderr
        yield running
    finally:
        stop(process)


def ours(fhir: httpx.Client) -> dict[str, dict]:
    """The plugin's Subscriptions on the server, by the Questionnaire their criteria name."""
    found = fhir.get("/Subscription", params={"_count": "100"}).json().get("entry", [])
    subs = [e["resource"] for e in found
            if any(t.get("system") == TAG_SYSTEM for t in e["resource"].get("meta", {}).get("tag", []))]
    by_questionnaire = {re.search(r"questionnaire=([^&,]+)", s["criteria"]).group(1): s for s in subs}
    assert len(by_questionnaire) == len(subs), "two Subscriptions for one Questionnaire"
    return by_questionnaire


def wait_for(condition: Callable[[], object], timeout: float = BOUND, what: str = "") -> float:
    """Polls until `condition` is true; the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def write_response(fhir: httpx.Client, body: bytes) -> dict:
    """Writes a response straight to the FHIR server (PUT to its own id), as an EHR or a portal would."""
    qr = orjson.loads(body)
    answer = fhir.put(f"/QuestionnaireResponse/{qr['id']}", content=body)
    assert answer.status_code in (200, 201), answer.text
    return qr


def result_set_written(fhir: httpx.Client, patient: str, qr_id: str) -> bool:
    return (total(fhir, "Observation", subject=patient) == RESULT_SET
            and total(fhir, "Provenance", target=f"QuestionnaireResponse/{qr_id}") >= 1)


# -- subscribe: create, leave alone, update ----------------------------------------------------------------------


def test_subscribe_makes_one_subscription_per_questionnaire_and_a_second_run_changes_nothing(
        plugin: Plugin, fhir: httpx.Client):
    for sub in ours(fhir).values():  # a clean start, whatever ran before
        assert fhir.delete(f"/Subscription/{sub['id']}").status_code in (200, 204)

    first = plugin.subscribe()
    assert {c["questionnaire"] for c in first["created"]} == QUESTIONNAIRES
    assert first["updated"] == first["unchanged"] == []
    subs = ours(fhir)
    assert set(subs) == QUESTIONNAIRES
    for url, sub in subs.items():
        assert sub["status"] == "active"  # made `requested`; the server activated it
        assert sub["criteria"] == (f"QuestionnaireResponse?questionnaire={canonical_forms(url)}"
                                   "&status=completed,amended,entered-in-error,in-progress,stopped")
        assert sub["channel"] == {"type": "rest-hook", "endpoint": plugin.endpoint, "payload": "application/fhir+json",
                                  "header": [f"X-Notification-Secret: {SECRET}"]}
        assert sub["reason"]
    assert {c["subscription"] for c in first["created"]} == {f"Subscription/{s['id']}" for s in subs.values()}

    again = plugin.subscribe()
    assert again["created"] == again["updated"] == []
    assert {c["subscription"] for c in again["unchanged"]} == {f"Subscription/{s['id']}" for s in subs.values()}
    assert {u: s["meta"]["versionId"] for u, s in ours(fhir).items()} == \
           {u: s["meta"]["versionId"] for u, s in subs.items()}  # not even rewritten


def test_dry_run_says_what_would_change_and_writes_nothing(plugin: Plugin, fhir: httpx.Client):
    plugin.subscribe()
    before = ours(fhir)
    dry = plugin.subscribe("--dry-run", secret=ROTATED)
    assert dry["dry_run"] is True and {c["changed"][0] for c in dry["updated"]} == {"channel.header"}
    assert all(s["channel"]["header"] == ["X-Notification-Secret: (hidden)"] for s in dry["subscriptions"])
    assert ours(fhir) == before


def test_a_response_written_on_the_fhir_server_gets_its_results_within_seconds(
        plugin: Plugin, fhir: httpx.Client, patient: str):
    plugin.subscribe()
    qr = write_response(fhir, for_patient("qr-emergency.json", patient))
    seconds = wait_for(lambda: result_set_written(fhir, patient, qr["id"]) and tasks(fhir, patient),
                       what="results of a response written on the FHIR server")
    print(f"\nnotification -> results on the FHIR server: {seconds:.2f} s")
    before = results(fhir, patient)
    assert before["screening-outcome"]["valueCodeableConcept"]["coding"][0]["code"] == "emergency-assessment"
    (review,) = tasks(fhir, patient)
    assert review["status"] == "requested"

    amended = amend(orjson.dumps(qr), "amended", **{"rf-saddle-numbness": False})
    write_response(fhir, amended)
    seconds = wait_for(lambda: results(fhir, patient)["screening-outcome"]["status"] == "amended",
                       what="results of an amended response")
    print(f"amended response -> results updated: {seconds:.2f} s")
    wait_for(lambda: tasks(fhir, patient)[0]["status"] == "cancelled", what="the Task no longer indicated")
    after = results(fhir, patient)
    assert after["screening-outcome"]["valueCodeableConcept"]["coding"][0]["code"] == "not-applicable"
    assert {k: v["id"] for k, v in after.items()} == {k: v["id"] for k, v in before.items()}  # in place
    assert total(fhir, "Observation", subject=patient) == RESULT_SET and len(tasks(fhir, patient)) == 1


def test_a_notification_without_payload_makes_serve_catch_up(plugin: Plugin, fhir: httpx.Client, patient: str):
    """HAPI POSTs an empty body to the endpoint of a Subscription without `payload`; serve then syncs."""
    plugin.subscribe()
    bare = {**subscription({"url": SCREENING, "title": "no payload"}, plugin.endpoint, SECRET), "status": "requested"}
    bare["channel"].pop("payload")
    bare.pop("meta")  # not tagged: not one of the plugin's own
    created = fhir.post("/Subscription", content=orjson.dumps(bare))
    assert created.status_code == 201, created.text
    try:
        for sub in ours(fhir).values():  # only the one without payload notifies
            assert fhir.put(f"/Subscription/{sub['id']}", content=orjson.dumps({**sub, "status": "off"})).is_success
        wait_for(lambda: fhir.get(f"/Subscription/{created.json()['id']}").json()["status"] == "active", ACTIVATION)
        qr = write_response(fhir, for_patient("qr-refer-asas.json", patient))
        seconds = wait_for(lambda: result_set_written(fhir, patient, qr["id"]), BOUND * 2,
                           "results written by the catch-up sync a bare notification started")
        print(f"\nnotification without payload -> results on the FHIR server: {seconds:.2f} s")
    finally:
        fhir.delete(f"/Subscription/{created.json()['id']}")
        plugin.subscribe()


def test_a_rotated_secret_updates_in_place_and_a_wrong_one_is_refused(
        plugin: Plugin, fhir: httpx.Client, patient: str):
    plugin.subscribe()
    before = ours(fhir)
    try:
        rotated = plugin.subscribe(secret=ROTATED)  # the service still expects SECRET
        assert rotated["created"] == rotated["unchanged"] == []
        assert {(c["subscription"], tuple(c["changed"])) for c in rotated["updated"]} == \
               {(f"Subscription/{s['id']}", ("channel.header",)) for s in before.values()}
        after = ours(fhir)
        for url, sub in after.items():
            assert sub["id"] == before[url]["id"]
            assert int(sub["meta"]["versionId"]) > int(before[url]["meta"]["versionId"])
            assert sub["channel"]["header"] == [f"X-Notification-Secret: {ROTATED}"]

        refused = plugin.refused_notifications()
        qr = write_response(fhir, for_patient("qr-refer-asas.json", patient))
        wait_for(lambda: plugin.refused_notifications() > refused, what="the service refusing the notification")
        time.sleep(1.0)  # HAPI's retries of the refused delivery
        # HAPI keeps a Subscription whose deliveries fail `active` (no `error` status, unlike some servers)
        assert fhir.get(f"/Subscription/{after[SCREENING]['id']}").json()["status"] == "active"
        assert total(fhir, "Observation", subject=patient) == 0 and tasks(fhir, patient) == []
        assert total(fhir, "Provenance", target=f"QuestionnaireResponse/{qr['id']}") == 0
    finally:
        restored = plugin.subscribe()  # the right secret again, and `error` made `requested` (then active)
    changed = {c["questionnaire"]: set(c["changed"]) for c in restored["updated"]}
    assert changed[SCREENING] == {"channel.header"}
    assert {url: sub["status"] for url, sub in ours(fhir).items()} == dict.fromkeys(QUESTIONNAIRES, "active")


def test_with_notifications_lost_sync_catches_up(plugin: Plugin, fhir: httpx.Client, patient: str,
                                                 tmp_path: Path):
    """Notifications lost: the Subscriptions switched `off` (as an operator might) while a response is written."""
    plugin.subscribe()
    try:
        for sub in ours(fhir).values():
            assert fhir.put(f"/Subscription/{sub['id']}", content=orjson.dumps({**sub, "status": "off"})).is_success
        qr = write_response(fhir, for_patient("qr-refer-asas.json", patient))
        time.sleep(2.0)  # a notification, had one been sent, would have been handled by now (see the bound above)
        assert total(fhir, "Observation", subject=patient) == 0
    finally:
        assert {c["questionnaire"] for c in plugin.subscribe()["updated"]} == QUESTIONNAIRES  # `off`: made active

    state = tmp_path / "sync-state.json"
    for _ in range(2):  # the second run finds nothing more to write
        done = plugin.cli("sync", "--state", str(state))
        assert done.returncode == 0, done.stderr
        assert result_set_written(fhir, patient, qr["id"])
        assert total(fhir, "Observation", subject=patient) == RESULT_SET and len(tasks(fhir, patient)) == 1
    assert orjson.loads(done.stdout).get("written", 0) == 0


# -- refused before the server is asked anything -------------------------------------------------------------------


@pytest.mark.parametrize(("environ", "flags", "says"), [
    ({}, ["--endpoint", "https://plugin.example.org/notify"], "BACKPAIN_NOTIFY_SECRET is not set"),
    ({"BACKPAIN_NOTIFY_SECRET": "bad\nsecret"}, ["--endpoint", "https://plugin.example.org/notify"], "printable"),
    ({"BACKPAIN_NOTIFY_SECRET": SECRET}, ["--endpoint", "http://plugin.example.org/notify"], "--allow-http"),
    ({"BACKPAIN_NOTIFY_SECRET": SECRET}, ["--endpoint", "/notify"], "absolute http(s) URL"),
    ({"BACKPAIN_NOTIFY_SECRET": SECRET}, ["--endpoint", "ftp://plugin.example.org/notify"], "absolute http(s)"),
    ({"BACKPAIN_NOTIFY_SECRET": SECRET}, ["--endpoint", "https://u:p@plugin.example.org/notify"], "credentials"),
    ({"BACKPAIN_NOTIFY_SECRET": SECRET}, ["--endpoint", "https://plugin.example.org/notify?x=1"], "no query"),
    ({"BACKPAIN_NOTIFY_SECRET": SECRET}, [], "--endpoint"),
])
def test_bad_settings_are_refused_with_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                              environ: dict, flags: list, says: str):
    for name in ("BACKPAIN_NOTIFY_SECRET", "BACKPAIN_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert main(["subscribe", "--fhir-base-url", "http://127.0.0.1:9", *flags]) == EXIT_BAD_INPUT
    said = capsys.readouterr()
    assert says in said.err and said.out == ""
    assert "bad\nsecret" not in said.err and SECRET not in said.err


def test_without_a_fhir_server_subscribe_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.delenv("FHIR_BASE_URL", raising=False)
    monkeypatch.setenv("BACKPAIN_NOTIFY_SECRET", SECRET)
    assert main(["subscribe", "--endpoint", "https://plugin.example.org/notify"]) == EXIT_BAD_INPUT
    assert "needs a FHIR server" in capsys.readouterr().err


def test_the_subscription_compares_only_what_the_plugin_sets():
    questionnaire = {"url": SCREENING, "title": "Back pain screening"}
    want = subscription(questionnaire, "https://plugin.example.org/notify", SECRET)
    # as HAPI stores it: activated, its own tag added, versioned
    stored = {**want, "id": "7", "status": "active", "meta": {"versionId": "3", "tag": [
        {"system": "http://hapifhir.io/fhir/StructureDefinition/subscription-matching-strategy", "code": "IN_MEMORY"},
        *want["meta"]["tag"]]}}
    assert differences(stored, want) == ()
    assert differences({**stored, "status": "error", "error": "HTTP 401"}, want) == ("status",)
    moved = {**stored, "channel": {**stored["channel"], "endpoint": "https://elsewhere.example.org/notify"}}
    assert differences(moved, want) == ("channel.endpoint",)
    gateway = {**stored, "channel": {**stored["channel"], "header": ["X-Gateway-Key: k", *want["channel"]["header"]]}}
    assert differences(gateway, want) == ()  # a header someone else added is theirs
    rotated = {**moved, "channel": {**moved["channel"], "header": ["X-Gateway-Key: k", "x-notification-secret: old"]}}
    assert differences(rotated, want) == ("channel.endpoint", "channel.header")
    put = merged({**rotated, "end": "2030-01-01T00:00:00Z", "error": "HTTP 401"}, want)
    assert put["channel"]["header"] == ["X-Gateway-Key: k", f"X-Notification-Secret: {SECRET}"]
    assert put["id"] == "7" and put["end"] == "2030-01-01T00:00:00Z" and "error" not in put
    assert put["channel"]["endpoint"] == "https://plugin.example.org/notify" and put["status"] == "requested"
    assert {t["code"] for t in put["meta"]["tag"]} == {"IN_MEMORY", "back-pain-screening"}


@pytest.mark.parametrize(("endpoint", "allow_http", "warned"), [
    ("https://plugin.example.org/notify/", False, False),  # the trailing slash goes
    ("http://127.0.0.1:8000/notify", False, False),
    ("http://localhost:8000/notify", False, False),
    ("http://[::1]:8000/notify", False, False),
    ("http://plugin:8000/notify", False, True),  # a compose service
    ("http://backpain-screen.clinic.svc:8000/notify", False, True),  # a Kubernetes service
    ("http://10.1.2.3:8000/notify", False, True),
    ("http://plugin.example.org/notify", True, True),
])
def test_plain_http_is_quiet_only_to_this_machine(endpoint: str, allow_http: bool, warned: bool):
    checked, warning = check_endpoint(endpoint, allow_http)
    assert checked == endpoint.rstrip("/") and bool(warning) == warned
