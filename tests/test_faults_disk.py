"""The embedded store on a full disk and on a read-only one, through `serve` and the CLI as deployed.

What stands for the disk (the report says which was used):
- as root where mounting works: a real 1 MB tmpfs (full: ENOSPC; read-only: remounted `ro`);
- otherwise: a file-size limit (RLIMIT_FSIZE, 1 MB) on the plugin's processes (full: every write past it
  fails with EFBIG, which SQLite reports as an I/O error), and `chmod a-w` (read-only).
In each case: a 503 OperationOutcome with Retry-After from `serve`, exit status 1 and one clear sentence
from the CLI, nothing half written, `PRAGMA integrity_check` ok, and the same running service writing again
once space (or write access) is back (`FAULT_DISK=rlimit` uses the second way even where mounting works).
The store-level cases (`max_page_count`, `query_only`) are in
test_sqlite_store.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fault_processes import run_cli, serve_env, serving
from tests.fhir_helpers import CLI, ROOT, for_patient, free_port
from tests.result_sets import in_store, integrity

LIMIT = 1 << 20  # bytes: the whole "disk"
JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
NAMES = itertools.cycle(["qr-refer-asas.json", "qr-emergency.json", "qr-no-referral.json", "qr-urgent.json"])


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True, check=False).returncode == 0


def mounting_works() -> bool:
    if os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as probe:
        if not _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", probe):
            return False
        subprocess.run(["umount", probe], check=False)
    return True


@dataclass
class Disk:
    """Where the store lives, and how it is made full or read-only and given back."""

    path: Path
    how: str  # "tmpfs" or "rlimit+chmod"
    preexec: Callable[[], None] | None  # run in the plugin's processes (the file-size limit)

    def grow(self, pid: int) -> None:
        if self.how == "tmpfs":
            assert _mount("-o", "remount,size=64m", str(self.path))
        else:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    def read_only(self) -> None:
        if self.how == "tmpfs":
            assert _mount("-o", "remount,ro", str(self.path))
        else:
            for item in [*self.path.iterdir(), self.path]:
                item.chmod(item.stat().st_mode & 0o555)

    def writable(self) -> None:
        if self.how == "tmpfs":
            assert _mount("-o", "remount,rw", str(self.path))
        else:
            for item in [self.path, *self.path.iterdir()]:
                item.chmod(item.stat().st_mode | 0o200)


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    path = tmp_path / "disk"
    path.mkdir()
    if os.environ.get("FAULT_DISK") != "rlimit" and mounting_works():  # FAULT_DISK=rlimit: try the other way
        assert _mount("-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(path))
        try:
            yield Disk(path, "tmpfs", None)
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)
        return
    disk = Disk(path, "rlimit+chmod", _limit_file_size)
    yield disk
    with contextlib.suppress(OSError):
        disk.writable()


def post(base_url: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{base_url}/QuestionnaireResponse", content=body, headers=JSON, timeout=60)


def assert_clear_503(answer: httpx.Response) -> str:
    """The caller is told to keep the response and retry; the cause is for the operator (the CLI, the log)."""
    assert answer.status_code == 503, answer.text
    assert answer.headers.get("Retry-After")
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "transient"
    said = outcome["issue"][0]["diagnostics"]
    assert "nothing was written" in said and "Traceback" not in answer.text
    return said


def logged_store_errors(log: Path) -> list[dict]:
    lines = [orjson.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "store-error"]


def assert_clear_cli_failure(done: subprocess.CompletedProcess, *causes: str) -> str:
    said = done.stderr.decode()
    assert done.returncode == 1, said
    assert any(cause in said for cause in causes) and "Nothing was written" in said, said
    assert "Traceback" not in said
    return said.strip().splitlines()[-1]


def test_a_full_disk_is_a_clear_503_writes_nothing_and_recovers(disk: Disk, tmp_path: Path, fault_report):
    store = disk.path / "store.sqlite3"
    causes = ("the disk is full", "a disk I/O error")
    accepted: list[str] = []
    with serving(tmp_path / "serve", "--store", str(store), preexec=disk.preexec) as service:
        for _ in range(400):  # until the disk is full
            body = for_patient(next(NAMES), "Patient/disk-full")
            answer = post(service.base_url, body)
            if answer.status_code != 201:
                break
            accepted.append(orjson.loads(body)["id"])
        said = assert_clear_503(answer)
        refused_id = orjson.loads(body)["id"]
        cli = run_cli("submit", "-", "--store", str(store), stdin=for_patient(next(NAMES), "Patient/disk-full"),
                      home=tmp_path, preexec=disk.preexec)
        cli_said = assert_clear_cli_failure(cli, *causes)
        assert integrity(store) == "ok"
        while_full = in_store(store)
        assert while_full.verdict(accepted)["exactly_one"] == len(accepted)
        assert while_full.verdict([refused_id])["lost"] == 1  # refused whole: no result of it was written

        disk.grow(service.process.pid)
        assert post(service.base_url, body).status_code == 201  # the same service, space back: written
        (logged, *_) = logged_store_errors(service.log)
        assert any(cause in logged["reason"] for cause in causes)  # the operator reads why in the log
    assert integrity(store) == "ok"
    after = in_store(store).verdict([*accepted, refused_id])
    assert after == {"exactly_one": len(accepted) + 1, "lost": 0, "duplicated": 0, "incomplete": 0}
    fault_report("embedded store on a full disk", disk=disk.how, size_bytes=LIMIT,
                 accepted_before_full=len(accepted), serve_said=f"503: {said}", serve_logged=logged, cli_said=cli_said,
                 integrity_check="ok", recovered_without_restart=True, half_written=0)


def test_a_read_only_store_is_a_clear_error_and_recovers(disk: Disk, tmp_path: Path, fault_report):
    """A store that cannot be written: the CLI says so; `serve` will not start on it (it opens the store
    at startup, so a deployment fails at once, not at the first patient), and starts once it is writable."""
    if disk.how != "tmpfs" and os.geteuid() == 0:
        pytest.skip("root ignores file modes and this machine cannot mount: no way to make a file read-only")
    store = disk.path / "store.sqlite3"
    first = for_patient("qr-refer-asas.json", "Patient/read-only")
    made = run_cli("submit", "-", "--store", str(store), stdin=first, home=tmp_path)
    assert made.returncode == 0, made.stderr
    disk.read_only()
    causes = ("read-only", "cannot be opened", "access was denied")
    body = for_patient("qr-emergency.json", "Patient/read-only")
    try:
        cli_said = assert_clear_cli_failure(run_cli("submit", "-", "--store", str(store), stdin=body,
                                                    home=tmp_path), *causes)
        refused = subprocess.run([*CLI, "serve", "--port", str(free_port()),
                                  "--store", str(store)], cwd=ROOT, env=serve_env(tmp_path), capture_output=True,
                                 timeout=120, check=False)
        serve_said = refused.stderr.decode()
        assert refused.returncode != 0
        assert any(cause in serve_said for cause in causes), serve_said
        disk.writable()
    finally:
        with contextlib.suppress(AssertionError, OSError):
            disk.writable()
    with serving(tmp_path / "serve", "--store", str(store)) as service:
        assert post(service.base_url, body).status_code == 201
    assert integrity(store) == "ok"
    ids = [orjson.loads(first)["id"], orjson.loads(body)["id"]]
    assert in_store(store).verdict(ids) == {"exactly_one": 2, "lost": 0, "duplicated": 0, "incomplete": 0}
    cause = next(line for line in serve_said.splitlines() if any(c in line for c in causes))
    fault_report("embedded store read-only", disk=disk.how, cli_said=cli_said,
                 serve_exit_status=refused.returncode, serve_said=cause.strip()[-160:],
                 serve_log_has_traceback="Traceback" in serve_said, integrity_check="ok",
                 written_once_writable=True, half_written=0)
