"""Benchmark: `backpain-screen batch` over many responses, memory and throughput, for 1 and 2 workers.

    python -m tests.bench_batch --speed [--n 20000] [--repeat 3]
    python -m tests.bench_batch [--n 1000000] [--workers 1,2] [--partition 0/1]
    python -m tests.bench_batch --upload 400

With --speed (issue #17's rows), N responses are written to a file first, so
no generator competes for the cores, and each repetition runs, back to back,
whole processes from exec to exit:

  (a) the floor: `python -c` that imports orjson, reads the input file line
      by line, `orjson.loads` each line, and `orjson.dumps` the result
      Bundle of that line, written to an output file (1 MiB buffer) with its
      newline. The Bundles are the plugin's own output for the same lines,
      made before the timed runs; the floor process loads them (the 500
      distinct ones) first and reports how long that took, which is
      subtracted: what is timed is start-up, reading, parsing the inputs,
      serialising the outputs and writing them;
  (b) `batch FILE -o OUT --workers 1`;
  (c) `batch FILE -o OUT --workers 2`.

(a) and (b) are pinned to one core, (c) to two. The table gives each row's
median over the repetitions (seconds, responses/s, ratio to the floor of the
same repetition, peak RSS) and the load average before each run.


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


DEFAULT_N = 1_000_000
POOL = 500  # distinct responses, cycled to make N lines
# The floor process: what batch cannot do less than (see the module's docstring). argv: input, outputs, output.
FLOOR = """
import sys, time
import orjson
loads, dumps = orjson.loads, orjson.dumps
start = time.perf_counter()
with open(sys.argv[2], "rb") as made:
    bundles = [loads(line) for line in made]
untimed = time.perf_counter() - start
with open(sys.argv[1], "rb") as source, open(sys.argv[3], "wb", buffering=1 << 20) as out:
    for i, line in enumerate(source):
        loads(line)
        out.write(dumps(bundles[i % len(bundles)]))
        out.write(b"\\n")
print(untimed)  # seconds spent loading the Bundles: not timed
"""


@dataclass(frozen=True)
class Timed:
    """One whole process: wall seconds (less any untimed set-up it reports), peak RSS, CPU."""

    seconds: float
    peak_mb: float  # the process itself
    worker_mb: list[float]  # its children (batch's pool workers)
    cpu_seconds: float
    load: float  # 1-minute load average just before


def timed_process(cmd: list[str], cpus: set[int], stdout: int | None = None) -> tuple[Timed, bytes]:
    """Runs cmd pinned to `cpus`, polling the peak RSS of it and its children until it exits."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    peaks: dict[int, int] = {}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        for child in [proc.pid, *children(proc.pid)]:
            peaks[child] = max(peaks.get(child, 0), peak_rss_kb(child))
        time.sleep(0.02)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{cmd[2:4]} exited with {proc.returncode}: {err.decode()[-500:]}")
    main_kb = max(peaks.pop(proc.pid, 0), usage.ru_maxrss)
    return Timed(elapsed, main_kb / 1024, [v / 1024 for v in peaks.values()], usage.ru_utime + usage.ru_stime,
                 load), out


def speed_runs(n: int, repeat: int) -> None:
    """Issue #17's batch rows: the floor, one worker and two, over one file, `repeat` times in turn."""
    import statistics
    import tempfile

    cores = sorted(os.sched_getaffinity(0))
    one, two = {cores[-1]}, set(cores[-2:])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source, made, out = work / "in.ndjson", work / "made.ndjson", work / "out.ndjson"
        pool = sample_lines(POOL)
        with source.open("wb") as handle:
            for i in range(n):
                handle.write(pool[i % POOL] + b"\n")
        batch = [sys.executable, "-m", "plugin.jobs.cli", "batch", str(source), "-o", str(out), "--workers"]
        timed_process([*batch, "1"], one)  # warm-up (caches), and the Bundles the floor serialises
        with out.open("rb") as results, made.open("wb") as first:
            for _ in range(POOL):
                first.write(results.readline())
        sizes = source.stat().st_size / n, out.stat().st_size / n
        rows: dict[str, list[Timed]] = {"floor": [], "1": [], "2": []}
        for turn in range(repeat):
            floor, printed = timed_process([sys.executable, "-c", FLOOR, str(source), str(made), str(out)], one)
            rows["floor"].append(Timed(floor.seconds - float(printed), floor.peak_mb, [], floor.cpu_seconds,
                                       floor.load))
            for workers in ("1", "2"):
                run, _ = timed_process([*batch, workers], one if workers == "1" else two)
                lines = sum(1 for _ in out.open("rb"))
                if lines != n:
                    raise SystemExit(f"--workers {workers} wrote {lines} lines, not {n}")
                rows[workers].append(run)
            out.unlink()
            floor_s, one_s, two_s = (rows[key][-1].seconds for key in rows)
            print(f"turn {turn + 1}: floor {floor_s:.2f} s, 1 worker {one_s:.2f} s ({one_s / floor_s:.2f}x), "
                  f"2 workers {two_s:.2f} s ({one_s / two_s:.2f}x faster); load "
                  f"{', '.join(f'{r[-1].load:.2f}' for r in rows.values())}", file=sys.stderr)

    def median(values: list[float]) -> float:
        return statistics.median(values)

    floors = [r.seconds for r in rows["floor"]]
    print(f"{n:,} responses ({sizes[0] / 1000:.1f} kB in, {sizes[1] / 1000:.1f} kB out each), {repeat} repetitions, "
          f"medians; cores {cores}\n")
    print("| process | seconds | responses/s | ratio to the floor | CPU s | peak RSS MB (workers) | load before |")
    print("|---|---:|---:|---:|---:|---:|---|")
    names = {"floor": "(a) floor: orjson loads the inputs, dumps the outputs, writes them",
             "1": "(b) `batch FILE -o OUT --workers 1`", "2": "(c) `batch FILE -o OUT --workers 2` (2 cores)"}
    for key, runs in rows.items():
        ratio = median([r.seconds / f for r, f in zip(runs, floors)])
        workers = [max(r.worker_mb[i] for r in runs) for i in range(min(len(r.worker_mb) for r in runs))]
        print(f"| {names[key]} | {median([r.seconds for r in runs]):.2f} | {median([n / r.seconds for r in runs]):,.0f}"
              f" | {ratio:.2f} | {median([r.cpu_seconds for r in runs]):.2f} | {max(r.peak_mb for r in runs):.0f}"
              f"{' (' + ', '.join(f'{m:.0f}' for m in workers) + ')' if workers else ''}"
              f" | {', '.join(f'{r.load:.2f}' for r in runs)} |")
    scaling = median([a.seconds / b.seconds for a, b in zip(rows["1"], rows["2"])])
    print(f"\n2 workers vs 1: {scaling:.2f}x faster (median of the per-repetition ratios)")


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
        # a cold HAPI takes seconds over its first writes (validation warms up)
        with httpx.Client(base_url=base_url, headers={"Content-Type": "application/fhir+json"}, timeout=60) as fhir:
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
    parser.add_argument("--n", type=int, default=DEFAULT_N)
    parser.add_argument("--workers", default="1,2", help="worker counts to run in turn (default 1,2)")
    parser.add_argument("--partition", default="0/1", help="passed to batch (a partition reads every line)")
    parser.add_argument("--upload", type=int, metavar="N", help="measure batch --upload of N responses instead")
    parser.add_argument("--speed", action="store_true", help="issue #17's rows over a file (default --n 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions with --speed (default 3)")
    args = parser.parse_args()
    if args.speed:
        speed_runs(args.n if args.n != DEFAULT_N else 20_000, args.repeat)
        return
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
