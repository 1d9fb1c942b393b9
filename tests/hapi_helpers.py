"""The HAPI FHIR JPA server of the integration tests (tests/hapi_server/): built with Maven on first use (and
again when its sources change), started on 127.0.0.1 on a free port, stopped by its own process id.

Java 17 and Maven are needed; the Maven local repository is Maven's default (~/.m2), so CI and a developer's
machine keep the downloaded artefacts between runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.fhir_helpers import ROOT, free_port, wait_until_ready
from tests.prerequisites import program

HAPI_DIR = Path(__file__).resolve().parent / "hapi_server"
JAR = HAPI_DIR / "target" / "hapi-test-server.jar"
START_TIMEOUT = 400  # seconds: 35 s on a quiet 2-core machine, over 2 minutes while other work loads it
# Small thread stacks and heap. The JIT is left at its default (tiered, C2 included): on this 2-core machine HAPI
# started as fast as with C1 only (-XX:TieredStopAtLevel=1, 25-26 s either way), and then validated and stored
# transactions about a third faster (40 screening transactions: 5.2 s against 8.2 s), which is most of what
# the HAPI tests wait for.
JVM_FLAGS = ["-Xss512k", "-Xms256m", "-Xmx1g", "-XX:+UseSerialGC"]


def _stale() -> bool:
    if not JAR.exists():
        return True
    built = JAR.stat().st_mtime
    sources = [HAPI_DIR / "pom.xml", *(HAPI_DIR / "src").rglob("*")]
    return any(path.stat().st_mtime > built for path in sources if path.is_file())


def build_hapi() -> None:
    """`mvn -q -B package -DskipTests` unless the jar is newer than its sources."""
    if not _stale():
        return
    program("java", "openjdk-17-jdk-headless")
    program("mvn", "maven")
    subprocess.run(["mvn", "-q", "-B", "package", "-DskipTests"], cwd=HAPI_DIR, check=True, timeout=1800)


class HapiServer:
    """HAPI on its own port; with `database` (a path without suffix) H2 keeps its data in that file, so a server
    killed with SIGKILL comes back with what it had committed. `env` may set AUTH_ISSUER (SMART, see
    tests/README.md)."""

    def __init__(self, *, database: Path | None = None, port: int | None = None, **env: str) -> None:
        build_hapi()
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/fhir"
        self.database, self.env = database, env
        self.log = (database.parent / "hapi.log") if database else None
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        url = f"jdbc:h2:file:{self.database};WRITE_DELAY=0" if self.database else "jdbc:h2:mem:hapi;DB_CLOSE_DELAY=-1"
        classpath = f"{JAR}{os.pathsep}{JAR.parent / 'lib' / '*'}"
        return ["java", *JVM_FLAGS, f"-Dbackpain.definitions={ROOT / 'questionnaires'}", "-cp", classpath,
                "org.backpainscreen.hapi.HapiTestServer", f"--server.port={self.port}",
                f"--spring.datasource.url={url}"]

    def launch(self) -> None:
        """Starts the process and returns at once (the session starts HAPI while the unit tests run)."""
        sink = self.log.open("ab") if self.log else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(self.command(), cwd=HAPI_DIR, env={**os.environ, **self.env},
                                            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if self.log:
                sink.close()

    def wait_ready(self) -> None:
        assert self.process, "launch() first"
        said = self.log.read_text if self.log else (lambda: "(see tests/hapi_server; start it by hand to see its log)")
        wait_until_ready(f"{self.base_url}/metadata", self.process, START_TIMEOUT, said)

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@contextlib.contextmanager
def hapi_server(*, database: Path | None = None, port: int | None = None, **env: str) -> Iterator[HapiServer]:
    server = HapiServer(database=database, port=port, **env)
    server.start()
    try:
        yield server
    finally:
        server.stop()
