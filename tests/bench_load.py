"""Sustained load on `serve`: minutes of ingest, with the embedded store and with a HAPI FHIR JPA server.

Run from the repository root (not collected by pytest):

    python -m tests.bench_load [--minutes 3] [--concurrency 4] [--rate 0] [--only embedded|fhir]

For each store in turn it starts `backpain-screen serve` (one worker) on 127.0.0.1 (the FHIR store: the
a HAPI FHIR JPA server, in memory, in front), then a load generator in its own process POSTs distinct
completed responses to `POST /QuestionnaireResponse` (every outcome in turn, each a new id and so a real
write) from `--concurrency` keep-alive connections, at most `--rate` per second if given, for
`--minutes`. Every 5 s the resident memory (VmRSS, /proc) of the serve process is sampled.
Reported per store: requests, throughput, p50/p99/max latency, errors by status, RSS at start/middle/end
and its slope over the second half (KiB per minute: memory that does not grow stays near 0), written to
tests/artifacts/bench-load.json and printed as a table.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.fault_processes import rss_kib, serving
from tests.fhir_helpers import EXAMPLES, ROOT
from tests.hapi_helpers import HapiServer

NAMES = ["qr-refer-asas.json", "qr-no-referral.json", "qr-not-applicable.json", "qr-emergency.json",
         "qr-urgent.json", "qr-indeterminate.json", "qr-nice-test-hla-b27.json"]
REPORT = ROOT / "tests" / "artifacts" / "bench-load.json"
SAMPLE_EVERY = 5.0


# -- the load generator (its own process) --------------------------------------------------------------


async def _drive(url: str, patients: list[str], seconds: float, concurrency: int, rate: float) -> dict:
    examples = [orjson.loads((EXAMPLES / name).read_bytes()) for name in NAMES]
    turn = itertools.count()
    latencies: list[float] = []
    statuses: Counter = Counter()
    deadline = time.monotonic() + seconds
    started = time.monotonic()

    def next_body() -> bytes:
        n = next(turn)
        qr = {**examples[n % len(examples)], "id": f"load-{uuid.uuid4()}",
              "subject": {"reference": patients[n % len(patients)]}}
        return orjson.dumps(qr)

    async def worker(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            body = next_body()
            if rate:  # paced: request n is not sent before started + n / rate
                await asyncio.sleep(max(0.0, started + len(latencies) / rate - time.monotonic()))
            sent = time.perf_counter()
            try:
                answer = await http.post(url, content=body, headers={"Content-Type": "application/fhir+json"})
                statuses[answer.status_code] += 1
            except httpx.HTTPError as error:
                statuses[type(error).__name__] += 1
            latencies.append(time.perf_counter() - sent)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return {"seconds": time.monotonic() - started, "latencies": latencies, "statuses": dict(statuses)}


def _generate(url: str, patients: list[str], seconds: float, concurrency: int, rate: float, out: Any) -> None:
    out.put(asyncio.run(_drive(url, patients, seconds, concurrency, rate)))


# -- one store under load --------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """VmRSS of a process every SAMPLE_EVERY seconds until stopped: [(seconds since start, KiB)]."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples = pid, []
        self.done = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        while True:
            self.samples.append((round(time.monotonic() - start, 1), rss_kib(self.pid)))
            if self.done.wait(SAMPLE_EVERY):
                return


def slope_kib_per_minute(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over the second half of the run (the first half includes warming up)."""
    half = samples[len(samples) // 2:]
    if len(half) < 2:
        return 0.0
    return statistics.linear_regression([t for t, _ in half], [kib for _, kib in half]).slope * 60


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load(name: str, service_pid: int, url: str, patients: list[str], args: argparse.Namespace) -> dict:
    out = multiprocessing.get_context("spawn").Queue()
    generator = multiprocessing.get_context("spawn").Process(
        target=_generate, args=(url, patients, args.minutes * 60, args.concurrency, args.rate, out))
    sampler = Sampler(service_pid)
    sampler.start()
    generator.start()
    result = out.get(timeout=args.minutes * 60 + 600)
    generator.join(timeout=30)
    sampler.done.set()
    sampler.join()
    latencies, samples = result["latencies"], sampler.samples
    ok = sum(n for status, n in result["statuses"].items() if status in (200, 201))
    return {
        "store": name, "minutes": args.minutes, "concurrency": args.concurrency, "rate_limit": args.rate or None,
        "requests": len(latencies), "written": ok, "per_second": round(ok / result["seconds"], 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 1), "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "errors": {str(k): v for k, v in result["statuses"].items() if k not in (200, 201)},
        "rss_mib": {"start": mib(samples[0][1]), "middle": mib(samples[len(samples) // 2][1]),
                    "end": mib(samples[-1][1]), "peak": mib(max(kib for _, kib in samples))},
        "rss_slope_kib_per_minute_second_half": round(slope_kib_per_minute(samples), 1),
        "rss_samples": samples,
    }


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


def embedded(home: Path, args: argparse.Namespace) -> dict:
    with serving(home / "embedded", "--store", str(home / "embedded" / "store.sqlite3")) as service:
        httpx.get(f"{service.base_url}/readyz", timeout=30)
        patients = [f"Patient/load-{n}" for n in range(50)]  # the clinic's own: taken as given
        result = load("embedded SQLite", service.process.pid, f"{service.base_url}/QuestionnaireResponse",
                      patients, args)
    store = home / "embedded" / "store.sqlite3"
    result["store_mib"] = mib(sum(p.stat().st_size for p in store.parent.glob("store.sqlite3*")) // 1024)
    return result


def fhir(home: Path, args: argparse.Namespace) -> dict:
    (home / "fhir").mkdir()
    server = HapiServer()  # in memory
    server.start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            patients = [f"Patient/{client.post('/Patient', json={'resourceType': 'Patient'}).json()['id']}"
                        for _ in range(50)]
        with serving(home / "fhir" / "serve", "--fhir-base-url", server.base_url) as service:
            result = load("HAPI FHIR JPA server", service.process.pid, f"{service.base_url}/QuestionnaireResponse",
                          patients, args)
        result["fhir_server_rss_mib_end"] = mib(rss_kib(server.process.pid)) if server.process else None
        return result
    finally:
        server.stop()


def table(results: list[dict]) -> str:
    rows = ["| store | written | per s | p50 ms | p99 ms | errors | RSS start → middle → end MiB | "
            "slope, 2nd half, KiB/min |", "|---|---:|---:|---:|---:|---|---|---:|"]
    for r in results:
        rss = r["rss_mib"]
        rows.append(f"| {r['store']} | {r['written']:,} | {r['per_second']} | {r['p50_ms']} | {r['p99_ms']} | "
                    f"{sum(r['errors'].values()) or 0} | {rss['start']} → {rss['middle']} → {rss['end']} | "
                    f"{r['rss_slope_kib_per_minute_second_half']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description="sustained ingest load on serve")
    parser.add_argument("--minutes", type=float, default=3.0, help="per store (default 3)")
    parser.add_argument("--concurrency", type=int, default=4, help="connections at once (default 4)")
    parser.add_argument("--rate", type=float, default=0.0, help="at most this many requests/s (default: unpaced)")
    parser.add_argument("--only", choices=["embedded", "fhir"])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in (("embedded", embedded), ("fhir", fhir)):
            if args.only in (None, name):
                results.append(run(Path(tmp), args))
                print(table(results[-1:]), flush=True)
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(orjson.dumps({"results": results}, option=orjson.OPT_INDENT_2).decode() + "\n")
    print(f"\n{table(results)}\n\n(also in {REPORT.relative_to(ROOT)})")


if __name__ == "__main__":
    main()
