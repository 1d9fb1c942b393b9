"""The processes the fault suite and the load benchmark start, kill and restart.

Each is a real process on 127.0.0.1: a HAPI FHIR JPA server of its own on an
H2 database file (so a server killed with SIGKILL comes back with what it had
committed), `backpain-screen serve`, and the fault-injecting proxy. Every one is started in its own process group and
stopped by its own id.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from tests.fhir_helpers import CLI, ROOT, START_TIMEOUT, free_port, wait_until_ready
from tests.hapi_helpers import HapiServer

NOTIFY_SECRET = "fault-suite-notify-secret"


def kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """`sig` to the process and everything it started (it leads its own group); waits for it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


class FhirServer(HapiServer):
    """HAPI on a fixed port with its data in an H2 file under `home`: kill -9 it, start it again."""

    def __init__(self, home: Path) -> None:
        (home / "hapi").mkdir(parents=True, exist_ok=True)
        super().__init__(database=home / "hapi" / "fhir")


def serve_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without settings that would point `serve` elsewhere, plus the test's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKPAIN_", "FHIR_"))}
    env.update({"XDG_STATE_HOME": str(home / "state"), "BACKPAIN_NOTIFY_SECRET": NOTIFY_SECRET,
                "BACKPAIN_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1", **extra})
    return env


class Service:
    """`backpain-screen serve` in its own process group."""

    def __init__(self, home: Path, *flags: str, preexec: Callable[[], None] | None = None, **env: str) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home, self.port = home, free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = home / "serve.log"
        command = [*CLI, "serve", "--port", str(self.port), *flags]
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(command, cwd=ROOT, env=serve_env(home, **env), stdout=sink,
                                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec)
        wait_until_ready(f"{self.base_url}/healthz", self.process, START_TIMEOUT, self.log.read_text)


@contextlib.contextmanager
def serving(home: Path, *flags: str, preexec: Callable[[], None] | None = None, **env: str) -> Iterator[Service]:
    service = Service(home, *flags, preexec=preexec, **env)
    try:
        yield service
    finally:
        kill_group(service.process, signal.SIGTERM)


@contextlib.contextmanager
def fault_proxy(upstream: str, script: str, *options: str) -> Iterator[str]:
    """tests/fault_proxy.py in front of `upstream`; its base URL."""
    proxy = subprocess.Popen([sys.executable, "-m", "tests.fault_proxy", upstream, "--script", script, *options],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield proxy.stdout.readline().split()[-1] if proxy.stdout else ""
    finally:
        kill_group(proxy, signal.SIGTERM)


def faults(proxy_url: str) -> dict:
    return httpx.get(f"{proxy_url}/__faults", timeout=10).json()


def run_cli(*args: str, home: Path, stdin: bytes | None = None, timeout: float = 300,
            preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, cwd=ROOT,
                          env=serve_env(home), timeout=timeout, check=False, preexec_fn=preexec)


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_for(check: Callable[[], object], timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return False
