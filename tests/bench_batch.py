"""Benchmark: `backpain-screen batch` over many responses, memory and throughput.

    python -m tests.bench_batch [--n 1000000] [--workers 1]

Responses are generated on the fly and piped into `batch - -o /dev/null`, so
neither the input nor the output ever sits on disk or in this process. The
peak RSS (VmHWM, since exec) of the batch process and of each of its worker
processes is polled from /proc until it exits.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from tests.bench_pipeline import make_bodies


def sample_lines(count: int, seed: int = 7) -> list[bytes]:
    """A pool of plausible responses (the pipeline benchmark's), reused with fresh ids."""
    from plugin.pipeline import Screener

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "plugin.cli", "batch", "-", "-o", os.devnull, "--workers", str(args.workers)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    writer = threading.Thread(target=feed, args=(proc.stdin, args.n), daemon=True)
    writer.start()
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        for pid in [proc.pid, *children(proc.pid)]:
            peaks[pid] = max(peaks.get(pid, 0), peak_rss_kb(pid))
        time.sleep(0.2)
    elapsed = time.perf_counter() - start
    summary = proc.stderr.read().decode().strip().splitlines()[-1]
    main_mb = peaks.pop(proc.pid, 0) / 1024
    worker_mb = [v / 1024 for v in peaks.values()]
    print(f"responses: {args.n:,}  workers: {args.workers}  exit: {proc.returncode}")
    print(f"elapsed: {elapsed:.1f} s  throughput: {args.n / elapsed:,.0f} QR/s (including start-up)")
    print(f"peak RSS: batch process {main_mb:.0f} MB; workers {', '.join(f'{m:.0f}' for m in worker_mb) or '-'} MB; "
          f"all together {main_mb + sum(worker_mb):.0f} MB")
    print(summary)


if __name__ == "__main__":
    main()
