"""Benchmark of the HTTP service: `POST /QuestionnaireResponse/$extract` on one uvicorn worker.

Run from the repository root (not collected by pytest):

    python -m tests.bench_service [--requests 20000] [--connections 50] [--rounds 3] [--json out.json]

In one run it starts two servers, each uvicorn with uvloop and httptools and ONE worker:

  (a) the floor: a trivial Starlette app whose one endpoint only parses the JSON body
      (orjson.loads) and answers a small JSON;
  (b) the plugin, exactly as deployed: `python -m plugin.jobs.cli serve` (embedded store);

and loads each in turn, in alternating rounds, with the same bounded number of POSTs of
questionnaires/examples/qr-refer-asas.json to `/QuestionnaireResponse/$extract`. The load
generator is a separate process (a raw HTTP/1.1 keep-alive client on uvloop, a fixed number of
connections, each sending its next request as soon as the answer is in), so it shares no core
with the server: when the machine has 2 or more cores, the servers are pinned to one core and the
load generator to another. The generator's own CPU use and the floor's rate show it is not the
bottleneck. Reported per server: requests/s, the time per request (one worker: 1 / rate), its CPU per
request, p50, p99 and max latency (the median round, by rate), and the ratio of the plugin's
time per request to the floor's. Targets for (b) (issue #17), with 50 concurrent clients: at
most 2x the floor's time per request, and p99 under 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

import orjson

from tests.fhir_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "questionnaires" / "examples" / "qr-refer-asas.json"
PATH = "/QuestionnaireResponse/$extract"
TARGET_RATIO = 2.0  # the plugin's time per request over the floor's
TARGET_P99_MS = 10.0
WARM_UP = 1_000


# -- (a) the floor app -------------------------------------------------------------------------------------------


def floor_app():
    """uvicorn factory for the floor server (imported there only: the load generator does not pay for Starlette)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def parse_only(request: Request) -> Response:
        resource = orjson.loads(await request.body())
        return Response(orjson.dumps({"resourceType": resource.get("resourceType"), "ok": True}),
                        media_type="application/json")

    return Starlette(routes=[Route(PATH, parse_only, methods=["POST"])])


# -- the load generator (its own process) --------------------------------------------------------------------------


class Connection(asyncio.Protocol):
    """One keep-alive connection: send a request, read the whole answer, time it, send the next."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.buffer = bytearray()
        self.need: int | None = None  # bytes of the answer in flight (head + body), once its head is in
        self.status = 0
        self.started = 0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        if self.run.remaining <= 0:
            assert self.transport is not None
            self.transport.close()
            return
        self.run.remaining -= 1
        self.started = time.perf_counter_ns()
        assert self.transport is not None
        self.transport.write(self.run.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.need is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buffer[:end]).lower()
                self.status = int(head[9:12])
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                               if line.startswith(b"content-length:")), None)
                if length is None:
                    raise RuntimeError("an answer without Content-Length: this client cannot read it")
                self.need = end + 4 + length
            if len(self.buffer) < self.need:
                return
            self.run.latencies.append(time.perf_counter_ns() - self.started)
            if self.status != 200:
                self.run.errors += 1
            del self.buffer[:self.need]
            self.need = None
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class Run:
    def __init__(self, request: bytes, total: int) -> None:
        self.request = request
        self.remaining = total
        self.latencies = array("q")
        self.errors = 0


async def load(host: str, port: int, body: bytes, total: int, connections: int) -> dict:
    request = (f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/fhir+json\r\n"
               f"Accept: application/fhir+json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    run = Run(request, total)
    loop = asyncio.get_running_loop()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    made = [await loop.create_connection(lambda: Connection(run), host, port) for _ in range(connections)]
    for sock in (t.get_extra_info("socket") for t, _ in made):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await asyncio.gather(*(protocol.closed for _, protocol in made))
    elapsed = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    latencies = sorted(run.latencies)
    done = len(latencies)

    def percentile(p: float) -> float:
        return latencies[min(done - 1, int(p * done))] / 1e6 if done else float("nan")

    return {"requests": done, "errors": run.errors + (total - done), "seconds": elapsed, "rps": done / elapsed,
            "p50_ms": percentile(0.50), "p99_ms": percentile(0.99), "max_ms": latencies[-1] / 1e6 if done else 0,
            "mean_ms": statistics.fmean(latencies) / 1e6 if done else 0, "client_cpu": cpu / elapsed}


def load_main(args: argparse.Namespace) -> None:
    import uvloop

    body = EXAMPLE.read_bytes()
    result = uvloop.run(load(args.host, args.port, body, args.requests, args.connections))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


# -- the orchestrator ---------------------------------------------------------------------------------------------


def cores() -> tuple[set[int] | None, set[int] | None]:
    """(server cores, load-generator cores): one each when there are two or more, else no pinning."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(available) < 2:
        return None, None
    return {available[0]}, {available[1]}


def pinned(cpus: set[int] | None):
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), 0 where unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


class Server:
    def __init__(self, name: str, command: list[str], env: dict[str, str], cpus: set[int] | None, log: Path) -> None:
        self.name = name
        self.port = int(command[command.index("--port") + 1])
        self.log = log
        with log.open("wb") as sink:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                            preexec_fn=pinned(cpus), start_new_session=True)

    def wait_ready(self, body: bytes, timeout: float = 60) -> bytes:
        """Waits until the server answers the benchmark request with 200; that answer."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited:\n{self.log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.post(f"http://127.0.0.1:{self.port}{PATH}", content=body, timeout=5,
                                    headers={"Content-Type": "application/fhir+json"})
                if answer.status_code == 200:
                    return answer.content
                raise SystemExit(f"{self.name} answered {answer.status_code}: {answer.text[:500]}")
            time.sleep(0.1)
        raise SystemExit(f"{self.name} did not start in {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


def run_load(server: Server, requests: int, connections: int, cpus: set[int] | None) -> dict:
    command = [sys.executable, "-m", "tests.bench_service", "--load", "--port", str(server.port),
               "--requests", str(requests), "--connections", str(connections)]
    before = cpu_seconds(server.process.pid)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, check=False, preexec_fn=pinned(cpus), timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"the load generator failed:\n{done.stderr.decode()}")
    result = orjson.loads(done.stdout)
    result["server_cpu"] = (cpu_seconds(server.process.pid) - before) / result["seconds"]
    return result


def median_round(rounds: list[dict]) -> dict:
    return sorted(rounds, key=lambda r: r["rps"])[len(rounds) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round and server")
    parser.add_argument("--connections", type=int, default=50,
                        help="keep-alive connections of the load generator: concurrent clients (default 50)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)  # internal: be the load generator
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        load_main(args)
        return 0

    server_cpus, load_cpus = cores()
    body = EXAMPLE.read_bytes()
    with tempfile.TemporaryDirectory(prefix="bench-service-") as scratch:
        home = Path(scratch)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKPAIN_", "FHIR_"))}
        env.update({"XDG_STATE_HOME": str(home / "state"), "PYTHONHASHSEED": "0"})
        uvicorn = ["--loop", "uvloop", "--http", "httptools", "--workers", "1"]
        servers = {
            "floor": Server("floor", [sys.executable, "-m", "uvicorn", "--factory", "tests.bench_service:floor_app",
                                      "--port", str(free_port()), *uvicorn, "--no-access-log", "--log-level",
                                      "warning"], env, server_cpus, home / "floor.log"),
            "plugin": Server("plugin", [sys.executable, "-m", "plugin.jobs.cli", "serve", "--port", str(free_port()),
                                        "--store", str(home / "store.sqlite3"), "--workers", "1"], env, server_cpus,
                             home / "plugin.log"),
        }
        try:
            answers = {name: server.wait_ready(body) for name, server in servers.items()}
            bundle = orjson.loads(answers["plugin"])
            assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction", "not a result Bundle"
            print(f"backpain-screen service benchmark: {platform.python_implementation()} {platform.python_version()}"
                  f", {os.cpu_count()} cores; servers pinned to {sorted(server_cpus) if server_cpus else 'any'}, "
                  f"load generator (separate process) to {sorted(load_cpus) if load_cpus else 'any'}; "
                  f"{args.connections} keep-alive connections; {args.requests:,} requests per round; "
                  f"body {len(body):,} B in, plugin answer {len(answers['plugin']):,} B out.", flush=True)
            for server in servers.values():
                run_load(server, WARM_UP, args.connections, load_cpus)
            rounds: dict[str, list[dict]] = {name: [] for name in servers}
            for number in range(1, args.rounds + 1):
                for name, server in servers.items():  # alternate, so both see the same machine
                    result = run_load(server, args.requests, args.connections, load_cpus)
                    rounds[name].append(result)
                    print(f"  round {number} {name:6}: {result['rps']:8,.0f} req/s  p50 {result['p50_ms']:6.2f} ms"
                          f"  p99 {result['p99_ms']:6.2f} ms  max {result['max_ms']:7.2f} ms  errors "
                          f"{result['errors']}  server CPU {result['server_cpu']:.0%}  load generator CPU "
                          f"{result['client_cpu']:.0%}", flush=True)
        finally:
            for server in servers.values():
                server.stop()

    floor, plugin = median_round(rounds["floor"]), median_round(rounds["plugin"])
    ratio = floor["rps"] / plugin["rps"]  # one worker: time per request is 1 / rate
    print()
    print("| server (uvicorn, 1 worker, uvloop + httptools) | req/s | ms per request | CPU ms per request "
          "| p50 ms | p99 ms | max ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in (("(a) floor: Starlette, `orjson.loads` of the body, small JSON answer", floor),
                     ("(b) plugin: `POST /QuestionnaireResponse/$extract`", plugin)):
        print(f"| {label} | {r['rps']:,.0f} | {1000 / r['rps']:.3f} | {1000 * r['server_cpu'] / r['rps']:.3f} "
              f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} | {r['errors']} |")
    print()
    print(f"median of {args.rounds} rounds, {args.connections} concurrent clients, load average "
          f"{os.getloadavg()[0]:.2f}. Time per request, (b)/(a): {ratio:.2f}x; p99 (b)/(a): "
          f"{plugin['p99_ms'] / floor['p99_ms']:.2f}x. Load generator CPU at most "
          f"{max(r['client_cpu'] for rs in rounds.values() for r in rs):.0%} of a core (not the bottleneck while "
          f"well under 100%).")
    met_ratio, met_p99 = ratio <= TARGET_RATIO, plugin["p99_ms"] < TARGET_P99_MS
    passed = met_ratio and met_p99 and plugin["errors"] == 0
    print(f"target (b) <= {TARGET_RATIO:g}x the floor's time per request: {'met' if met_ratio else 'NOT met'} "
          f"({ratio:.2f}x); p99 < {TARGET_P99_MS:g} ms: {'met' if met_p99 else 'NOT met'} "
          f"({plugin['p99_ms']:.2f} ms); errors: {plugin['errors']}")
    print("PASS" if passed else "FAIL")
    if args.json:
        args.json.write_bytes(orjson.dumps({"floor": rounds["floor"], "plugin": rounds["plugin"],
                                            "connections": args.connections, "requests": args.requests,
                                            "passed": passed}, option=orjson.OPT_INDENT_2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
