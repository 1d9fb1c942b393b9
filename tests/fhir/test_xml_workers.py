"""The XML worker processes never outlive the service that started them (a killed `serve` leaves no orphans)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Starts the workers as the service does at start-up, waits until both have warmed up, prints their ids, waits.
STARTER = """
import os, sys, time
from plugin.fhir import formats
pool = formats._xml_parsers()
formats.start_xml_workers()
for _ in range(2):
    pool.submit(time.sleep, 0.1).result(timeout=120)
print(" ".join(str(pid) for pid in pool._processes), flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_workers_end_when_their_service_is_killed():
    service = subprocess.Popen([sys.executable, "-c", STARTER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert service.stdout is not None
    workers = [int(pid) for pid in service.stdout.readline().split()]
    assert workers and all(alive(pid) for pid in workers)
    os.kill(service.pid, signal.SIGKILL)  # no shutdown code runs: only the workers' own watch can end them
    service.wait()
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "XML workers outlived their service"
