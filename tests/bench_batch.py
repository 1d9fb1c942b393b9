"""Benchmark: `backpain-screen batch` over many responses, memory and throughput, for 1 and 2 workers.

    python -m tests.bench_batch [--n 1000000] [--workers 1,2] [--partition 0/1]
    python -m tests.bench_batch --upload 400


Responses are generated on the fly and piped into `batch - -o /dev/null`, so
neither the input nor the output ever sits on disk or in this process. The
peak RSS (VmHWM, since exec) of the batch process and of each of its worker
processes is polled from /proc until it exits. Each worker count is run in
turn over the same responses; the throughput ratio of the last to the first
and the load average around each run (the machine is shared) are printed.

With --upload N, N example responses (fresh ids, 20 patients) are written
with `batch --upload` to a HAPI FHIR JPA server and to the embedded
store, with several --workers/--concurrency settings (new responses each
run), and once more unchanged: where uploading spends its time.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.bench_pipeline import make_bodies


def sample_lines(count: int, seed: int = 7) -> list[bytes]:
    """A pool of plausible responses (the pipeline benchmark's), reused with fresh ids."""
    from plugin.screening.pipeline import Screener

    return make_bodies(Screener(), count, seed)


def feed(pipe: IO[bytes], n: int) -> None:
    pool = sample_lines(500)
    with pipe:
        for i in range(n):
            line = pool[i % len(pool)]
            pipe.write(line + b"\n")


def peak_rss_kb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0])
    except (OSError, IndexError):
        return 0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@dataclass(frozen=True)
class Run:
    workers: int
    seconds: float
    main_mb: float
    worker_mb: list[float]
    summary: str
    load: tuple[float, float]  # 1-minute load average before and after
    cpu_seconds: float  # user + system of the batch process and its workers: what noise from others cannot inflate

    def rate(self, n: int) -> float:
        return n / self.seconds


def run_once(n: int, workers: int, partition: str) -> Run:
    cmd = [sys.executable, "-m", "plugin.jobs.cli", "batch", "-", "-o", os.devnull, "--workers", str(workers),
           "--partition", partition]
    load_before = os.getloadavg()[0]
    cpu_before = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    writer = threading.Thread(target=feed, args=(proc.stdin, n), daemon=True)
    writer.start()
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        for pid in [proc.pid, *children(proc.pid)]:
            peaks[pid] = max(peaks.get(pid, 0), peak_rss_kb(pid))
        time.sleep(0.2)
    elapsed = time.perf_counter() - start
    summary = proc.stderr.read().decode().strip().splitlines()[-1] if proc.stderr else ""
    if proc.returncode:
        raise SystemExit(f"batch exited with {proc.returncode}: {summary}")
    main_mb = peaks.pop(proc.pid, 0) / 1024
    return Run(workers, elapsed, main_mb, [v / 1024 for v in peaks.values()], summary,
               (load_before, os.getloadavg()[0]), _children_cpu() - cpu_before)


def _children_cpu() -> float:
    """CPU seconds of the waited-for children (the pool's workers are joined by batch, so they count too)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


UPLOAD_SETTINGS = (("1", "1"), ("1", "8"), ("2", "8"), ("1", "16"))  # (workers, concurrency)


def upload_runs(n: int) -> None:
    import tempfile

    import httpx
    import orjson

    from tests.fhir_helpers import CLI, EXAMPLES, ROOT
    from tests.hapi_helpers import hapi_server

    names = [p.name for p in sorted(EXAMPLES.glob("qr-*.json")) if "in-progress" not in p.name]

    def responses(path: Path, patients: list[str]) -> Path:
        with path.open("wb") as out:
            for i in range(n):
                qr = orjson.loads((EXAMPLES / names[i % len(names)]).read_bytes())
                qr["id"] = f"bench-{uuid.uuid4()}"
                qr["subject"] = {"reference": patients[i % len(patients)]}
                out.write(orjson.dumps(qr) + b"\n")
        return path

    def timed(label: str, args: list[str]) -> None:
        cpu = _children_cpu()
        start = time.perf_counter()
        done = subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - start
        cpu = _children_cpu() - cpu
        summary = done.stderr.strip().splitlines()[-1].split(";")[0] if done.stderr.strip() else ""
        print(f"| {label} | {elapsed:.1f} | {n / elapsed:,.1f} | {cpu:.1f} "
              f"| {summary.removeprefix('backpain-screen: ')} | {os.getloadavg()[0]:.1f} |")

    print(f"| {n:,} responses | seconds | responses/s (incl. start-up) | batch CPU s (incl. workers) | summary "
          "| load |\n|---|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as tmp, hapi_server() as hapi:
        work, base_url = Path(tmp), hapi.base_url
        body = orjson.dumps({"resourceType": "Patient", "active": True})
        with httpx.Client(base_url=base_url, headers={"Content-Type": "application/fhir+json"}) as fhir:
            patients = [f"Patient/{fhir.post('/Patient', content=body).json()['id']}" for _ in range(20)]
        for store, flags in (("FHIR server", ["--fhir-base-url", base_url]),
                             ("embedded store", ["--store", str(work / "store.sqlite3")])):
            for turn in (1, 2):  # settings take turns, twice: a server slows as it fills, and others' load varies
                for workers, concurrency in UPLOAD_SETTINGS:
                    path = responses(work / f"in-{store[0]}{turn}{workers}{concurrency}.ndjson", patients)
                    timed(f"{store}, --workers {workers} --concurrency {concurrency} (turn {turn})",
                          ["batch", str(path), "--upload", *flags, "--workers", workers, "--concurrency", concurrency])
            timed(f"{store}, the last again (all unchanged)", ["batch", str(path), "--upload", *flags])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--workers", default="1,2", help="worker counts to run in turn (default 1,2)")
    parser.add_argument("--partition", default="0/1", help="passed to batch (a partition reads every line)")
    parser.add_argument("--upload", type=int, metavar="N", help="measure batch --upload of N responses instead")
    args = parser.parse_args()
    if args.upload:
        upload_runs(args.upload)
        return
    runs = [run_once(args.n, int(w), args.partition) for w in args.workers.split(",")]
    print(f"responses: {args.n:,}  partition: {args.partition}  cores: {os.cpu_count()}")
    for r in runs:
        total_mb = r.main_mb + sum(r.worker_mb)
        print(f"workers {r.workers}: {r.seconds:.1f} s, {r.rate(args.n):,.0f} QR/s (including start-up); "
              f"peak RSS batch {r.main_mb:.0f} MB, workers {', '.join(f'{m:.0f}' for m in r.worker_mb) or '-'} MB, "
              f"all together {total_mb:.0f} MB; CPU {r.cpu_seconds / args.n * 1e6:.0f} µs per QR; "
              f"load average {r.load[0]:.1f} -> {r.load[1]:.1f}")
        print(f"  {r.summary}")
    if len(runs) > 1:
        print(f"throughput ratio, {runs[-1].workers} workers to {runs[0].workers}: "
              f"{runs[-1].rate(args.n) / runs[0].rate(args.n):.2f}")


if __name__ == "__main__":
    main()
