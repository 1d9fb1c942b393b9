"""`batch` over Bulk Data NDJSON: partitions, manifests and gzip, uploading, re-scoring after a rule change, SIGKILL.

Uploads run on the embedded store and on the session's HAPI FHIR server; the
rule change is a copy of mappings/ with a new version and a changed
threshold, loaded in this process (the CLI reads the shipped rules).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx
import orjson
import pytest

from plugin.fhir.client import FhirClient, RetryPolicy
from plugin.jobs import batch
from plugin.jobs.batch import Report
from plugin.jobs.bulk import Partition, expand, owned
from plugin.jobs.upload import FAILED, NOTHING, UNCHANGED, WRITTEN, upload
from plugin.screening import data, systems
from plugin.screening.pipeline import Screener, Settings
from plugin.stores.sqlite import SqliteStore
from plugin.stores.store import Store
from plugin.stores.writeback import prepare
from tests.fault_processes import fault_proxy
from tests.fhir_helpers import CLI, EXAMPLES, ROOT, free_port, total

T = TypeVar("T")
LIMIT = 1 << 20
SCREENING = "back-pain-screening-rules"
TAG_A, TAG_B = f"{SCREENING}-1.1.0", f"{SCREENING}-2.0.0"
# Under rule set B the axSpA pathway applies only to pain that began before 30 (A: 45), which changes these:
CHANGED_BY_B = {"qr-nice-test-hla-b27.json": "not-applicable", "qr-indeterminate.json": "not-applicable",
                "qr-no-referral.json": "not-applicable"}
EXAMPLE_NAMES = sorted(p.name for p in EXAMPLES.glob("qr-*.json"))


def response(name: str, patient: str, rid: str | None = None) -> dict:
    qr = orjson.loads((EXAMPLES / name).read_bytes())
    qr["id"] = rid or f"bulk-{uuid.uuid4()}"
    qr["subject"] = {"reference": patient}
    return qr


def ndjson(path: Path, items: list[dict | bytes]) -> Path:
    path.write_bytes(b"".join((i if isinstance(i, bytes) else orjson.dumps(i)) + b"\n" for i in items))
    return path


def run(work: Awaitable[T]) -> T:
    return asyncio.run(work)


# -- partitions --------------------------------------------------------------------------------------------


def test_partition_is_checked():
    assert Partition.parse("3/4") == Partition(3, 4)
    for bad in ("4/4", "-1/4", "0/0", "1", "a/b", "1/2/3", ""):
        with pytest.raises(ValueError, match="0 <= i < n"):
            Partition.parse(bad)


def test_partitions_are_disjoint_cover_everything_and_follow_the_response(tmp_path: Path):
    """Every line is owned by exactly one of n partitions; a response's versions and copies by the same one,
    whatever the order of the lines (a re-export)."""
    qrs = [response(EXAMPLE_NAMES[i % len(EXAMPLE_NAMES)], f"Patient/p{i % 7}", f"r{i}") for i in range(300)]
    amended = [{**qr, "status": "amended"} for qr in qrs[:40]]
    no_id = [{k: v for k, v in qr.items() if k != "id"} for qr in qrs[40:60]]
    bad = [b"{not json", b"", b'{"resourceType": "Patient"}', b"[1, 2]", b'{"resourceType": "QuestionnaireResponse"}']
    items: list[dict | bytes] = [*qrs, *amended, *no_id, *bad]
    in_order = ndjson(tmp_path / "a.ndjson", items)
    shuffled = items[:]
    random.Random(3).shuffle(shuffled)
    reordered = ndjson(tmp_path / "b.ndjson", shuffled)
    for n in (1, 2, 3, 8):
        owners: dict[int, int] = {}
        by_key: dict[str, int] = {}
        for i in range(n):
            for line in owned([str(in_order)], LIMIT, Partition(i, n)):
                assert line.ordinal not in owners, "two partitions own one line"
                owners[line.ordinal] = i
                if rid := _id(line.text):
                    assert by_key.setdefault(rid, i) == i  # an amended version goes where its first one went
            for line in owned([str(reordered)], LIMIT, Partition(i, n)):
                if rid := _id(line.text):
                    assert by_key[rid] == i
        assert sorted(owners) == list(range(len(items))), "some line is in no partition"
        if n > 1:
            sizes = Counter(owners.values())
            assert min(sizes.values()) > len(items) / n / 2, sizes  # a hash spreads them


def _id(text: bytes | None) -> str | None:
    try:
        return orjson.loads(text or b"").get("id")
    except (orjson.JSONDecodeError, AttributeError):
        return None


# -- Bulk Data input and NDJSON output ----------------------------------------------------------------------


def test_manifest_gzip_and_partitions_score_each_response_once(tmp_path: Path):
    """A Bulk Data export: a manifest naming a gzipped file (relative) and a plain one (file: URL), and a
    Patient file that is not read; two partitions of it score every response exactly once between them."""
    export = tmp_path / "export"
    export.mkdir()
    qrs = [response(EXAMPLE_NAMES[i % len(EXAMPLE_NAMES)], f"Patient/p{i}") for i in range(60)]
    with gzip.open(export / "QuestionnaireResponse.1.ndjson.gz", "wb") as zipped:
        zipped.write(b"".join(orjson.dumps(qr) + b"\n" for qr in qrs[:30]))
    ndjson(export / "QuestionnaireResponse.2.ndjson", [*qrs[30:], b"{broken"])
    ndjson(export / "Patient.ndjson", [{"resourceType": "Patient", "id": "p1"}])
    manifest = {"transactionTime": "2026-11-21T08:00:00Z", "request": "https://ehr.example/$export",
                "requiresAccessToken": False, "error": [],
                "output": [{"type": "QuestionnaireResponse", "url": "QuestionnaireResponse.1.ndjson.gz"},
                           {"type": "Patient", "url": "Patient.ndjson"},
                           {"type": "QuestionnaireResponse",
                            "url": (export / "QuestionnaireResponse.2.ndjson").as_uri()}]}
    (export / "manifest.json").write_bytes(orjson.dumps(manifest))
    inputs, other = expand([str(export / "manifest.json")])
    assert other == 1 and len(inputs) == 2
    seen: Counter = Counter()
    problems = []
    for i in range(2):
        sink = io.BytesIO()
        report = Report(io.StringIO())
        batch.run_batch(owned(inputs, LIMIT, Partition(i, 2)), sink, Settings(), report=report)
        for out in sink.getvalue().splitlines():
            found = orjson.loads(out)
            if found["resourceType"] == "Bundle" and found.get("entry"):
                seen.update(e["resource"]["id"] for e in found["entry"]
                            if e["resource"]["resourceType"] == "QuestionnaireResponse")
        problems.append(report.stream.getvalue())
    writable = {qr["id"] for qr in qrs if qr["status"] != "in-progress"}
    assert set(seen) == writable and set(seen.values()) == {1}
    reported = "".join(problems)
    assert reported.count("QuestionnaireResponse.2.ndjson:31: not scored: The body is not valid JSON") == 1


def test_a_truncated_gzip_input_is_reported_and_the_rest_still_scored(tmp_path: Path):
    """A download cut short: what could be read of it, and every other input, is scored; exit status 2."""
    qrs = [response("qr-refer-asas.json", f"Patient/p{i}") for i in range(300)]
    zipped = gzip.compress(b"".join(orjson.dumps(qr) + b"\n" for qr in qrs[:200]))
    (tmp_path / "cut.ndjson.gz").write_bytes(zipped[:len(zipped) // 2])
    whole = ndjson(tmp_path / "whole.ndjson", qrs[200:])
    for flags in (["-o", str(tmp_path / "out.ndjson")], ["--upload", "--store", str(tmp_path / "s.sqlite3")]):
        done = subprocess.run([*CLI, "batch", str(tmp_path / "cut.ndjson.gz"), str(whole), *flags],
                              capture_output=True, cwd=ROOT, timeout=120, check=False, text=True)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        read = int(done.stderr.split("cut.ndjson.gz past line ")[1].split(":")[0])
        assert 0 < read < 200 and f"{read + 100} responses" in done.stderr, done.stderr
    assert len((tmp_path / "out.ndjson").read_bytes().splitlines()) == read + 100


def test_output_on_a_full_disk_is_a_clear_error(tmp_path: Path):
    path = ndjson(tmp_path / "in.ndjson", [response("qr-urgent.json", "Patient/p1")])
    done = subprocess.run([*CLI, "batch", str(path), "-o", "/dev/full"], capture_output=True, cwd=ROOT, timeout=60,
                          check=False, text=True)  # /dev/full: every write fails with ENOSPC
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "cannot write /dev/full: No space left on device; the output is incomplete" in done.stderr


def test_cli_partitions_from_standard_input_and_bad_flags(tmp_path: Path):
    qrs = [response("qr-refer-asas.json", f"Patient/p{i}") for i in range(40)]
    body = gzip.compress(b"".join(orjson.dumps(qr) + b"\n" for qr in qrs))
    ids: list[str] = []
    for i in range(2):
        done = subprocess.run([*CLI, "batch", "-", "--partition", f"{i}/2"], input=body, capture_output=True,
                              cwd=ROOT, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        ids += [orjson.loads(line)["entry"][1]["resource"]["id"] for line in done.stdout.splitlines()]
    assert sorted(ids) == sorted(qr["id"] for qr in qrs)
    for flags in (["--partition", "2/2"], ["--upload", "-o", "x"], ["--workers", "0"]):
        done = subprocess.run([*CLI, "batch", "-", *flags], input=b"", capture_output=True, cwd=ROOT,
                              timeout=60, check=False)
        assert done.returncode == 2 and b"Traceback" not in done.stderr, done.stderr


# -- uploading, and re-scoring after a rule change ------------------------------------------------------------


@pytest.fixture
def rules_b(tmp_path: Path) -> Path:
    """A copy of mappings/ as rule set 2.0.0, whose axSpA pathway applies to pain that began before 30."""
    rules = tmp_path / "mappings-b"
    shutil.copytree(data.mappings_dir(), rules)
    screening = rules / "back-pain-screening.yaml"
    text = screening.read_text(encoding="utf-8")
    assert "  version: 1.1.0" in text and "{item: onset-age, lt: 45}" in text
    screening.write_text(text.replace("  version: 1.1.0", "  version: 2.0.0", 1)
                         .replace("{item: onset-age, lt: 45}", "{item: onset-age, lt: 30}", 1), encoding="utf-8")
    return rules


def upload_file(store: Callable[[], Store], path: Path, workers: int = 1) -> Report:
    report = Report(io.StringIO())

    async def go() -> None:
        async with store() as opened:
            await upload(owned([str(path)], LIMIT), opened, Settings(), workers=workers, report=report)

    run(go())
    return report


def rescore_and_check(store: Callable[[], Store], path: Path, qrs: dict[str, dict], rules_b: Path,
                      monkeypatch: pytest.MonkeyPatch, *, replaces_tags: bool = True) -> None:
    """Writes `qrs` (example name -> response) under rule set A, then B; checks B updated A's results in place.

    `replaces_tags`: the store keeps only the tags an update sends (HAPI keeps the earlier ones too)."""
    first = upload_file(store, path)
    writable = len(qrs) - 1  # the in-progress one writes nothing
    assert first.writes == Counter({WRITTEN: writable, NOTHING: 1}), first.stream.getvalue()
    jobs_a = {name: prepare(Screener(), qr) for name, qr in qrs.items()}
    before = run(_stored(store, jobs_a))
    assert all(_rule_tag(o) in (TAG_A, "basdai-rules-1.0.0") for o in before.values())

    monkeypatch.setattr(data, "mappings_dir", lambda: rules_b)
    second = upload_file(store, path)
    # every screening response is rewritten (its results now name rule set B); BASDAI's rules did not change
    assert second.writes == Counter({WRITTEN: writable - 1, UNCHANGED: 1, NOTHING: 1}), second.stream.getvalue()
    screener_b = Screener()
    jobs_b = {name: prepare(screener_b, qr) for name, qr in qrs.items()}
    assert {n: j.observation_keys for n, j in jobs_b.items()} == {n: j.observation_keys for n, j in jobs_a.items()}
    after = run(_stored(store, jobs_b))  # _stored fails on a missing or duplicated identifier
    assert after.keys() == before.keys()
    for name, job in jobs_b.items():
        for key in job.observation_keys:
            old, new = before[key], after[key]
            assert old["id"] == new["id"]  # updated in place, not added
            assert _rule_tag(new) == ("basdai-rules-1.0.0" if name == "qr-basdai.json" else TAG_B)
            if replaces_tags:
                assert len([t for t in new["meta"]["tag"] if t["system"] == systems.RULE_SET_TAG]) == 1
            changed = old.get("valueCodeableConcept") != new.get("valueCodeableConcept")
            assert new["status"] == ("amended" if changed else "final"), (name, new["code"])
            assert changed == (name in CHANGED_BY_B and new["code"]["coding"][0]["code"] in
                               ("referral-asas-2015", "screening-outcome"))
        if name in CHANGED_BY_B:
            outcome = next(after[k] for k in job.observation_keys
                           if after[k]["code"]["coding"][0]["code"] == "screening-outcome")
            assert outcome["valueCodeableConcept"]["coding"][0]["code"] == CHANGED_BY_B[name]
    run(_check_b_is_named(store, after, jobs_b))
    third = upload_file(store, path)  # a rerun under B: nothing left to do
    assert third.writes == Counter({UNCHANGED: writable, NOTHING: 1})


def _rule_tag(resource: dict) -> str:
    """The rule set a result names (the newest: HAPI carries earlier tags forward on update)."""
    tags = [t["code"] for t in resource["meta"]["tag"] if t["system"] == systems.RULE_SET_TAG]
    return max(tags, key=lambda tag: [int(part) for part in tag.rsplit("-", 1)[1].split(".")])


async def _stored(store: Callable[[], Store], jobs: dict) -> dict[str, dict]:
    """Each result by its identifier; fails if one is missing or stored twice."""
    keys = [k for job in jobs.values() for k in job.observation_keys]
    found: dict[str, dict] = {}
    async with store() as opened:
        for start in range(0, len(keys), 40):
            part = keys[start:start + 40]
            params = {"identifier": ",".join(f"{systems.SID_OBSERVATION}|{k}" for k in part), "_count": "100"}
            async for obs in opened.search("Observation", params):
                key = next(i["value"] for i in obs["identifier"] if i["system"] == systems.SID_OBSERVATION)
                assert key not in found, f"two Observations with identifier {key}"
                found[key] = obs
    assert sorted(found) == sorted(keys)
    return found


async def _check_b_is_named(store: Callable[[], Store], after: dict[str, dict], jobs: dict) -> None:
    """The Device of the screening results and a Provenance of each response name rule set B; the Task that
    no longer applies is cancelled."""
    async with store() as opened:
        screening = [o for o in after.values() if _rule_tag(o) == TAG_B]
        devices = {o["device"]["reference"] for o in screening}
        assert len(devices) == 1
        device = await opened.read(devices.pop())
        assert {"type": {"text": "rule set"}, "value": f"{SCREENING} 2.0.0"} in device["version"]
        for name, job in jobs.items():
            if name == "qr-basdai.json" or not job.observation_keys:
                continue
            target = f"QuestionnaireResponse/{job.qr['id']}"
            provenances = [p async for p in opened.search("Provenance", {"target": target})]
            policies = [p["policy"][0] for p in provenances]
            assert len(provenances) == 2 and policies[-1] != policies[0], policies  # one per rule set
            assert {p.rsplit("|", 1)[1] for p in policies} == {"1.1.0", "2.0.0"}
            named = next(p for p in provenances if p["policy"][0].endswith("|2.0.0"))
            assert named["agent"][0]["who"]["reference"] == f"Device/{device['id']}"
            stored_tasks = [t async for t in opened.search("Task", {"identifier": ",".join(
                f"{systems.SID_TASK}|{k}" for k in job.task_keys)})]
            statuses = sorted(t["status"] for t in stored_tasks)
            if name == "qr-nice-test-hla-b27.json":
                assert statuses == ["cancelled"]  # the referral no longer applies under B
            elif name not in CHANGED_BY_B and name != "qr-not-applicable.json":
                assert statuses == ["requested"]


def test_rescore_after_a_rule_change_on_the_embedded_store(tmp_path: Path, rules_b: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    db = tmp_path / "store.sqlite3"
    qrs = {name: response(name, f"Patient/{uuid.uuid4()}") for name in EXAMPLE_NAMES}
    path = ndjson(tmp_path / "in.ndjson", list(qrs.values()))
    rescore_and_check(lambda: SqliteStore(db), path, qrs, rules_b, monkeypatch)


def test_rescore_after_a_rule_change_on_a_fhir_server(tmp_path: Path, rules_b: Path, fhir_base_url: str,
                                                      patient: str, monkeypatch: pytest.MonkeyPatch):
    qrs = {name: response(name, patient) for name in EXAMPLE_NAMES}
    path = ndjson(tmp_path / "in.ndjson", list(qrs.values()))
    rescore_and_check(lambda: FhirClient(fhir_base_url), path, qrs, rules_b, monkeypatch,
                      replaces_tags=False)  # HAPI carries earlier tags forward


def test_upload_reports_each_failed_line_and_exits_non_zero(tmp_path: Path, fhir_base_url: str, patient: str):
    """A response whose patient the server does not know is not written: named by line, never by content."""
    unknown = f"Patient/{uuid.uuid4()}"
    lines: list[dict | bytes] = [response("qr-urgent.json", patient), response("qr-urgent.json", unknown),
                                 {"resourceType": "Patient", "id": "skipped"}, b"{",
                                 response("qr-no-referral.json", patient)]
    path = ndjson(tmp_path / "in.ndjson", lines)
    done = subprocess.run([*CLI, "batch", str(path), "--upload", "--fhir-base-url", fhir_base_url],
                          capture_output=True, cwd=ROOT, timeout=120, check=False, text=True)
    assert done.returncode == 1, done.stderr
    assert "in.ndjson:2: not written: " in done.stderr and "in.ndjson:4: not scored: " in done.stderr
    assert "written 2, unchanged 0, failed 1, invalid 1" in done.stderr
    assert "1 lines of other resource types skipped" in done.stderr
    assert "rf-" not in done.stderr and "urgent" not in done.stderr.split("outcomes:")[0]  # no answers


def test_upload_to_a_store_that_cannot_be_opened_says_so_in_one_line(tmp_path: Path):
    """As submit and sync do: exit status 1 and the store's own reason, not a traceback."""
    path = ndjson(tmp_path / "in.ndjson", [response("qr-urgent.json", "Patient/p1")])
    (tmp_path / "a-file").write_bytes(b"")
    done = subprocess.run([*CLI, "batch", str(path), "--upload", "--store", str(tmp_path / "a-file" / "s.sqlite3")],
                          capture_output=True, cwd=ROOT, timeout=60, check=False, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "The embedded store cannot use" in done.stderr and "Nothing was written" in done.stderr


def test_upload_stops_when_the_store_keeps_failing(tmp_path: Path):
    """A dead server: the batch stops after a run of failed writes instead of trying a million lines."""
    path = ndjson(tmp_path / "in.ndjson", [response("qr-urgent.json", f"Patient/p{i}") for i in range(300)])
    report = Report(io.StringIO())
    dead = FhirClient(f"http://127.0.0.1:{free_port()}", retry=RetryPolicy(attempts=1))

    async def go() -> None:
        async with dead:
            await upload(owned([str(path)], LIMIT), dead, Settings(), concurrency=4, report=report)

    run(go())
    assert report.halted and "20 writes in a row failed" in report.halted
    assert 20 <= report.writes[FAILED] < 100 and not report.writes[WRITTEN]
    assert "in.ndjson:1: not written: The FHIR server at" in report.stream.getvalue()


def test_upload_stops_when_the_server_keeps_answering_429(tmp_path: Path):
    """Overloaded for good (429 after every retry) is no better than dead: a million lines would take days."""
    path = ndjson(tmp_path / "in.ndjson", [response("qr-urgent.json", f"Patient/p{i}") for i in range(300)])
    report = Report(io.StringIO())

    async def go(proxy: str) -> None:
        async with FhirClient(proxy, retry=RetryPolicy(attempts=1)) as busy:
            await upload(owned([str(path)], LIMIT), busy, Settings(), concurrency=4, report=report)

    with fault_proxy(f"http://127.0.0.1:{free_port()}", "429") as proxy:  # never forwards: no server needed
        run(go(proxy))
    assert report.halted and "20 writes in a row failed" in report.halted
    assert 20 <= report.writes[FAILED] < 100 and not report.writes[WRITTEN]


# -- SIGKILL in the middle of an upload -----------------------------------------------------------------------


def test_sigkill_mid_upload_then_rerun_leaves_one_result_set_each(tmp_path: Path, fhir: httpx.Client,
                                                                 fhir_base_url: str):
    patients = []
    for _ in range(10):
        created = fhir.post("/Patient", content=orjson.dumps({"resourceType": "Patient", "active": True}))
        patients.append(f"Patient/{created.json()['id']}")
    names = [n for n in EXAMPLE_NAMES if n != "qr-in-progress.json"]
    # HAPI validates each transaction: 80 are enough to be killed midway
    qrs = [response(names[i % len(names)], patients[i % len(patients)]) for i in range(80)]
    path = ndjson(tmp_path / "in.ndjson", qrs)
    command = [*CLI, "batch", str(path), "--upload", "--fhir-base-url", fhir_base_url, "--workers", "2"]
    baseline = total(fhir, "Provenance")
    killed = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 90
    while total(fhir, "Provenance") - baseline < 20 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "the upload finished before it could be killed"
    workers = [int(pid) for pid in Path(f"/proc/{killed.pid}/task/{killed.pid}/children").read_text().split()]
    try:
        os.kill(killed.pid, signal.SIGKILL)  # the batch process alone: its scoring workers must notice and end
        killed.wait()
        time.sleep(0.5)  # requests the server took before the kill finish
        assert len(workers) == 2
        assert _all_gone(workers, within=10), "scoring workers outlived their batch process"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(killed.pid, signal.SIGKILL)  # whatever is left of the process group this test started
    before = total(fhir, "Provenance") - baseline
    assert 20 <= before < len(qrs)

    rerun = subprocess.run(command, capture_output=True, cwd=ROOT, timeout=180, check=False, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"written {len(qrs) - before}, unchanged {before}, failed 0" in rerun.stderr, rerun.stderr
    screener = Screener()
    jobs = {str(i): prepare(screener, qr) for i, qr in enumerate(qrs)}
    stored = run(_stored(lambda: FhirClient(fhir_base_url), jobs))  # every result, each once
    task_ids = Counter(next(i["value"] for i in t["identifier"] if i["system"] == systems.SID_TASK)
                       for t in run(_search(fhir_base_url, "Task", {"patient": ",".join(patients)})))
    provenances = total(fhir, "Provenance") - baseline
    print(f"\nSIGKILL: {before} of {len(qrs)} responses written before the kill; the rerun wrote "
          f"{len(qrs) - before} and found {before} done; {len(stored)} Observations, each identifier once; "
          f"{sum(task_ids.values())} Tasks, duplicates {sum(n - 1 for n in task_ids.values())}; "
          f"{provenances} Provenances")
    assert set(task_ids.values()) <= {1}
    assert provenances == len(qrs)  # one per response: the killed run's and the rerun's together


def _all_gone(pids: list[int], within: float) -> bool:
    deadline = time.monotonic() + within
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


async def _search(base_url: str, resource_type: str, params: dict[str, str]) -> list[dict]:
    async with FhirClient(base_url) as client:
        return [r async for r in client.search(resource_type, {**params, "_count": "200"})]
