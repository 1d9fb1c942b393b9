"""The backpain-screen command line, run as a user runs it (a real subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.factory import response

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "questionnaires" / "examples"
CLI = [sys.executable, "-m", "plugin.jobs.cli"]


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, cwd=ROOT, timeout=120, check=False)


def outcome_of(bundle: dict) -> str:
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Observation" and resource["code"]["coding"][0]["code"] == "screening-outcome":
            return resource["valueCodeableConcept"]["coding"][0]["code"]
    raise AssertionError("no screening-outcome Observation")


def test_score_json_file_prints_the_bundle():
    done = run("score", str(EXAMPLES / "qr-emergency.json"))
    assert done.returncode == 0, done.stderr
    bundle = orjson.loads(done.stdout)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    assert outcome_of(bundle) == "emergency-assessment"


def test_score_xml_and_stdin_agree_with_json():
    from_xml = run("score", str(EXAMPLES / "qr-refer-asas.xml"))
    from_stdin = run("score", "-", stdin=(EXAMPLES / "qr-refer-asas.json").read_bytes())
    assert from_xml.returncode == from_stdin.returncode == 0
    assert outcome_of(orjson.loads(from_xml.stdout)) == outcome_of(orjson.loads(from_stdin.stdout))
    assert outcome_of(orjson.loads(from_stdin.stdout)) == "refer-rheumatology"


def test_strategy_flag_changes_the_decision():
    path = str(EXAMPLES / "qr-nice-test-hla-b27.json")
    assert outcome_of(orjson.loads(run("score", path).stdout)) == "refer-rheumatology"
    assert outcome_of(orjson.loads(run("score", path, "--strategy", "nice-ng65").stdout)) == "test-hla-b27"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"this is not json", "not valid JSON"),
        (b'{"resourceType": "Patient"}', "Expected a QuestionnaireResponse"),
        (orjson.dumps(response({"onset-age": 200})), "between 0 and 120"),
    ],
)
def test_bad_input_exits_2_with_outcome_on_stdout_and_one_sentence_on_stderr(body, words):
    done = run("score", "-", stdin=body)
    assert done.returncode == 2
    outcome = orjson.loads(done.stdout)
    assert outcome["resourceType"] == "OperationOutcome"
    assert words in outcome["issue"][0]["diagnostics"]
    err = done.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and err.endswith(".") and "Traceback" not in err


def test_missing_file_is_a_clear_error():
    done = run("score", "no-such-file.json")
    assert done.returncode == 2
    assert orjson.loads(done.stdout)["issue"][0]["code"] == "not-found"
    assert "no-such-file.json" in done.stderr.decode()


def test_oversized_body_is_refused_without_reading_it_all():
    done = run("score", "-", stdin=b"{" + b" " * (2 * 1024 * 1024) + b"}")
    assert done.returncode == 2
    assert orjson.loads(done.stdout)["issue"][0]["code"] == "too-costly"


def _ndjson(n: int) -> bytes:
    examples = [orjson.loads(p.read_bytes()) for p in sorted(EXAMPLES.glob("qr-*.json"))]
    lines = []
    for i in range(n):
        qr = dict(examples[i % len(examples)])
        qr["id"] = f"batch-{i}"
        lines.append(orjson.dumps(qr))
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_batch_keeps_order_and_survives_bad_lines(tmp_path, workers):
    good = _ndjson(600).splitlines()
    lines = [*good[:300], b"{not json", b"", b'{"resourceType": "Patient"}', *good[300:]]
    source = tmp_path / "in.ndjson"
    source.write_bytes(b"\n".join(lines) + b"\n")
    done = run("batch", str(source), "-o", str(tmp_path / "out.ndjson"), "--workers", workers)
    assert done.returncode == 0, done.stderr
    out = (tmp_path / "out.ndjson").read_bytes().splitlines()
    assert len(out) == len(lines)
    for line_in, line_out in zip(lines, out):
        result = orjson.loads(line_out)
        if line_in in good:
            qr = orjson.loads(line_in)
            assert result["resourceType"] == "Bundle"
            if qr["status"] == "completed" and "screening" in qr["questionnaire"]:
                qr_entry = next(e for e in result["entry"] if e["resource"]["resourceType"] == "QuestionnaireResponse")
                assert qr_entry["resource"]["id"] == qr["id"]  # same order: line i answers line i
        else:
            assert result["resourceType"] == "OperationOutcome"
    summary = done.stderr.decode()
    scored = sum(b'"completed"' in line for line in good)
    assert f"{len(lines)} responses: {scored} scored, 3 invalid, {len(good) - scored} not finished" in summary


def test_batch_line_over_the_limit_is_one_outcome_line(tmp_path):
    source = tmp_path / "in.ndjson"
    huge = b'{"resourceType": "QuestionnaireResponse", "x": "' + b"a" * (3 * 1024 * 1024) + b'"}'
    source.write_bytes(_ndjson(2) + huge + b"\n" + _ndjson(1))
    done = run("batch", str(source), "-o", "-")
    out = done.stdout.splitlines()
    assert len(out) == 4
    assert [orjson.loads(x)["resourceType"] for x in out] == ["Bundle", "Bundle", "OperationOutcome", "Bundle"]


def _peak_rss_mb(args: list[str]) -> float:
    """Peak RSS of a command since its exec (VmHWM), polled until it exits.

    ru_maxrss from wait4 would also count the test process's pages that the
    fork carried until exec, so it is not used.
    """
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(status.split("VmHWM:")[1].split()[0]))
        except (OSError, IndexError):
            pass  # between exec and exit the file may be briefly unreadable
        time.sleep(0.02)
    assert proc.returncode == 0
    return peak / 1024


def test_batch_memory_stays_flat(tmp_path):
    """The peak RSS of 20,000 responses is that of 2,000 plus a small margin, far under 200 MB: a leak of a third
    of a KiB a response (6 MiB over 18,000; a Bundle is 29 kB) would fail it. `tests/bench_batch.py` measures a
    million."""
    peaks = {}
    for n in (2_000, 20_000):
        source = tmp_path / f"in-{n}.ndjson"
        with source.open("wb") as out:
            for _ in range(n // 400):
                out.write(_ndjson(400))
        peaks[n] = _peak_rss_mb([*CLI, "batch", str(source), "-o", os.devnull])
    assert peaks[20_000] < 200, peaks
    assert peaks[20_000] - peaks[2_000] < 6, peaks  # measured 0.3 MiB


def test_batch_into_a_closed_pipe_stops_quietly(tmp_path):
    source = tmp_path / "in.ndjson"
    source.write_bytes(_ndjson(400))
    reader = subprocess.Popen(["head", "-c", "10"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    done = subprocess.run([*CLI, "batch", str(source), "-o", "-"], stdout=reader.stdin, stderr=subprocess.PIPE,
                          cwd=ROOT, timeout=120, check=False)
    reader.stdin.close()
    reader.wait()
    assert done.returncode == 0
    assert b"Traceback" not in done.stderr


def test_batch_summary_as_json_keeps_basdai_and_invalid_apart(tmp_path):
    examples = ROOT / "questionnaires" / "examples"
    lines = [orjson.dumps(orjson.loads((examples / name).read_bytes()))
             for name in ("qr-emergency.json", "qr-urgent.json", "qr-basdai.json", "qr-in-progress.json")]
    source = tmp_path / "in.ndjson"
    source.write_bytes(b"\n".join([*lines, b"{not json"]) + b"\n")
    done = run("batch", str(source), "-o", str(tmp_path / "out.ndjson"), "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {
        "responses": 5, "scored": 3, "invalid": 1, "not_finished": {"in-progress": 1},
        "outcomes": {"back-pain-screening": {"emergency-assessment": 1, "urgent-assessment": 1},
                     "basdai": {"positive": 1}}}
    assert "5 responses: 3 scored, 1 invalid, 1 not finished" in done.stderr.decode()
    mixed = run("batch", str(source), "--json")  # the results go to standard output: the JSON would mix in
    assert mixed.returncode == 2 and b"use it with -o FILE or --upload" in mixed.stderr and not mixed.stdout
