"""Every way in gives the same result: `score`, `batch` (one worker or a pool), `serve`'s `$extract`.

Run in this process with one fixed clock, so the Bundles can be compared byte for byte: `batch`
and `$extract` write compact JSON, `score` pretty-prints it (compared once re-serialised).
Also what makes `batch` fast must not change what it writes: chunk files appended by the kernel.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from starlette.testclient import TestClient

from plugin.app import create_app
from plugin.jobs import batch, cli
from plugin.screening import pipeline
from plugin.settings import service_settings
from plugin.stores import sync

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "questionnaires" / "examples"
NOW = datetime(2026, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
NAMES = [p.name for p in sorted(EXAMPLES.glob("qr-*.json")) if "in-progress" not in p.name]


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline.Screener.__init__, "__defaults__", (None, lambda: NOW))


def batch_lines(tmp_path: Path, capsysbinary: pytest.CaptureFixture, workers: int) -> list[bytes]:
    source, out = tmp_path / "in.ndjson", tmp_path / f"out-{workers}.ndjson"
    lines = [orjson.dumps(orjson.loads((EXAMPLES / name).read_bytes())) for name in NAMES]
    source.write_bytes(b"\n".join(lines * 150 + [b"{not json"]) + b"\n")  # several chunks, and a bad line
    assert cli.main(["batch", str(source), "-o", str(out), "--workers", str(workers)]) == 0
    capsysbinary.readouterr()
    written = out.read_bytes().split(b"\n")
    assert written[-1] == b"" and len(written) == len(lines) * 150 + 2
    assert orjson.loads(written[-2])["resourceType"] == "OperationOutcome"
    return written[:len(NAMES)]


@pytest.mark.usefixtures("fixed_clock")
def test_score_batch_and_extract_give_the_same_bundle(tmp_path: Path, capsysbinary: pytest.CaptureFixture) -> None:
    one, pool = batch_lines(tmp_path, capsysbinary, 1), batch_lines(tmp_path, capsysbinary, 2)
    assert one == pool
    settings = service_settings({"BACKPAIN_STORE": str(tmp_path / "store.sqlite3")})
    with TestClient(create_app(settings)) as client:
        for name, line in zip(NAMES, one):
            assert cli.main(["score", str(EXAMPLES / name)]) == 0
            scored = capsysbinary.readouterr().out
            assert orjson.dumps(orjson.loads(scored)) == line, name
            answer = client.post("/QuestionnaireResponse/$extract", content=(EXAMPLES / name).read_bytes(),
                                 headers={"Content-Type": "application/fhir+json"})
            assert answer.status_code == 200 and answer.content == line, name


def test_a_chunk_file_is_sent_to_the_output_by_the_kernel_and_removed(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    chunk, out = tmp_path / "chunk.ndjson", tmp_path / "out.ndjson"
    body = b"".join(b'{"n":%d}\n' % i for i in range(50_000))
    chunk.write_bytes(body)
    monkeypatch.setattr(shutil, "copyfileobj", lambda *_: pytest.fail("copied by hand"))
    with out.open("wb") as sink:
        sink.write(b"first\n")  # buffered: it must land before the chunk
        batch.append_file(sink, str(chunk))
        sink.write(b"last\n")
    assert out.read_bytes() == b"first\n" + body + b"last\n"
    assert not chunk.exists()


def test_a_chunk_file_is_copied_into_an_output_with_no_file_descriptor(tmp_path: Path) -> None:
    chunk = tmp_path / "chunk.ndjson"
    chunk.write_bytes(b"one\ntwo\n")
    sink = io.BytesIO()
    batch.append_file(sink, str(chunk))  # type: ignore[arg-type]
    assert sink.getvalue() == b"one\ntwo\n" and not chunk.exists()


def test_a_full_output_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    chunk = tmp_path / "chunk.ndjson"
    chunk.write_bytes(b"x" * 1000)
    with open("/dev/full", "wb", buffering=0) as sink, pytest.raises(OSError) as raised:
        batch.append_file(sink, str(chunk))
    assert raised.value.errno == 28  # ENOSPC, as the CLI reports it


def test_the_parser_names_the_sync_loops_page_size() -> None:
    assert cli.SYNC_PAGE == sync.PAGE


def test_batch_imports_only_what_it_runs(tmp_path: Path) -> None:
    """The start-up a batch pays: no HTTP client, web framework or event loop; the FHIR models only the first
    time a given set of definitions is validated (then the user's cache remembers them)."""
    source = tmp_path / "in.ndjson"
    source.write_bytes(orjson.dumps(orjson.loads((EXAMPLES / "qr-urgent.json").read_bytes())) + b"\n")
    code = ("import sys; from plugin.jobs.cli import main; main(['batch', sys.argv[1], '-o', sys.argv[2]]); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'httpx', 'starlette', 'asyncio', 'tqdm', "
            "'concurrent'}), 'fhir.resources.R4B' in sys.modules)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", code, str(source), str(tmp_path / "out")], cwd=ROOT, env=env,
                           capture_output=True, text=True, check=True).stdout.strip() for _ in range(2)]
    assert runs == ["[] True", "[] False"], runs


def test_submit_validates_the_definitions_once_then_trusts_the_cache(tmp_path: Path) -> None:
    """Scripts run `submit` once a response: the second start skips the FHIR models, as `batch` does."""
    code = ("import sys; from plugin.jobs.cli import main; main(['submit', sys.argv[1], '--store', sys.argv[2]]); "
            "print('fhir.resources.R4B' in sys.modules, file=sys.stderr)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("FHIR_BASE_URL", None)
    runs = [subprocess.run([sys.executable, "-c", code, str(EXAMPLES / "qr-urgent.json"), str(tmp_path / "s.db")],
                           cwd=ROOT, env=env, capture_output=True, text=True, check=True) for _ in range(2)]
    assert [run.stderr.splitlines()[-1] for run in runs] == ["True", "False"], [run.stderr for run in runs]
    assert [orjson.loads(run.stdout)["outcome"] for run in runs] == ["urgent-assessment"] * 2
