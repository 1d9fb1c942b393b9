"""The embedded store notices its file deleted, replaced or made read-only under it (issue #14 item 11).

Writes then fail with 503 (the caller keeps the response and retries),
`/readyz` says not ready, and nothing is acknowledged that is not durable.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from plugin.stores.sqlite import SqliteStore
from tests.factory import response
from tests.fault_processes import Service, serving
from tests.test_faults_disk import Disk, _mount, disk  # noqa: F401 (a fixture)

JSON = {"Content-Type": "application/fhir+json"}


def post(service: Service, patient: str) -> httpx.Response:
    qr = response({"rf-saddle-numbness": True}) | {"subject": {"reference": patient}}
    return httpx.post(f"{service.base_url}/QuestionnaireResponse", content=orjson.dumps(qr), headers=JSON, timeout=30)


def remove(store: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store}{suffix}").unlink(missing_ok=True)


def replace(store: Path) -> None:
    other = store.with_name("other.sqlite3")
    import asyncio

    async def make() -> None:
        async with SqliteStore(other):
            pass

    asyncio.run(make())
    remove(store)
    shutil.copy(other, store)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Service, Path]]:
    store = tmp_path / "store.sqlite3"
    with serving(tmp_path, "--store", str(store)) as service:
        yield service, store


@pytest.mark.parametrize("change", [remove, replace], ids=["deleted", "replaced"])
def test_a_store_file_deleted_or_replaced_under_the_service(running, change: Callable[[Path], None]):
    service, store = running
    assert post(service, "Patient/before").status_code == 201
    change(store)
    for patient in ("Patient/after-1", "Patient/after-2"):
        answer = post(service, patient)
        assert answer.status_code == 503, answer.text
        assert answer.headers.get("Retry-After")
    assert httpx.get(f"{service.base_url}/readyz").status_code == 503
    assert "deleted or replaced" in service.log.read_text()


def test_a_store_on_a_disk_turned_read_only(disk: Disk, tmp_path: Path):  # noqa: F811
    if disk.how != "tmpfs":
        pytest.skip("root ignores file modes and this machine cannot mount: no way to make a disk read-only")
    store = disk.path / "store.sqlite3"
    with serving(tmp_path / "home", "--store", str(store)) as service:
        assert post(service, "Patient/rw").status_code == 201
        if not _mount("-o", "remount,ro", str(disk.path)):
            pytest.skip("the kernel refuses to remount a disk read-only while the store's file is open for writing "
                        "(EBUSY), so this machine cannot make it happen under a running service")
        try:
            assert post(service, "Patient/ro").status_code == 503
            assert httpx.get(f"{service.base_url}/readyz").status_code == 503
        finally:
            disk.writable()
        assert httpx.get(f"{service.base_url}/readyz").status_code == 200
        assert post(service, "Patient/rw-again").status_code == 201
