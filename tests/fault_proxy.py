"""A fault-injecting HTTP proxy, run as its own process in front of a FHIR server.

    python -m tests.fault_proxy UPSTREAM --script 500,pass,429,lose,pass [--port 0]
                                [--latency 50-200] [--retry-after 1]

Each request takes the next step of the script (cyclically):
  pass    forward it and return the server's answer
  500     answer 500 with an OperationOutcome; the server never sees it (502, 503, 504 alike)
  429     answer 429 with Retry-After (--retry-after seconds, default 1); the server never sees it
  lose    forward it (the server acts on it), then answer 502: the caller's answer is lost
  reset   reset the connection (TCP RST) without answering; the server never sees it
  cut     forward it (the server acts on it), then reset the connection: the answer is lost mid-way
  slow    wait two seconds, then forward it
--latency MIN-MAX adds a random wait of MIN to MAX milliseconds before every step.
GET /__faults reports how many of each were served, and under "after_429" how long (seconds) passed
between each 429 and the next request to arrive: with one client at a time, the wait it honoured.
PUT /__faults?script=a,b answers 200 and switches to that script (e.g. a storm, then calm).
The port is printed on the first line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import httpx

OUTCOME = json.dumps({"resourceType": "OperationOutcome",
                      "issue": [{"severity": "error", "code": "transient", "diagnostics": "injected fault"}]}).encode()
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


class Proxy(BaseHTTPRequestHandler):
    upstream: str
    steps: itertools.cycle
    served: Counter
    lock = threading.Lock()
    client: httpx.Client
    latency: tuple[float, float] = (0.0, 0.0)  # seconds
    retry_after = "1"
    last_429: float | None = None  # when the last 429 was answered (monotonic)
    after_429: ClassVar[list[float]] = []

    def log_message(self, *args: object) -> None:  # quiet: the tests read /__faults instead
        pass

    def handle_any(self) -> None:
        if urlsplit(self.path).path == "/__faults":
            return self.faults()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.lock:
            step = next(self.steps)
            self.served[step] += 1
            if Proxy.last_429 is not None:
                Proxy.after_429.append(round(time.monotonic() - Proxy.last_429, 3))
                Proxy.last_429 = None
        time.sleep(random.uniform(*self.latency))
        if step in ("500", "502", "503", "504"):
            return self.reply(int(step), OUTCOME, {"Content-Type": "application/fhir+json"})
        if step == "429":
            self.reply(429, OUTCOME, {"Content-Type": "application/fhir+json", "Retry-After": self.retry_after})
            Proxy.last_429 = time.monotonic()
            return None
        if step == "reset":
            return self.reset()
        if step == "slow":
            time.sleep(2)
        answer = self.forward(body)
        if step == "cut":
            return self.reset()
        if step == "lose":
            return self.reply(502, OUTCOME, {"Content-Type": "application/fhir+json"})
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
        return self.reply(answer.status_code, answer.content, headers)

    def faults(self) -> None:
        if self.command == "PUT":
            script = parse_qs(urlsplit(self.path).query).get("script", ["pass"])[0]
            with self.lock:
                Proxy.steps = itertools.cycle(script.split(","))
        report = {**self.served, "after_429": self.after_429}
        self.reply(200, json.dumps(report).encode(), {"Content-Type": "application/json"})

    def reset(self) -> None:
        """Closes the connection with a TCP RST (SO_LINGER 0), as a crashed peer or a middlebox does."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def forward(self, body: bytes) -> httpx.Response:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        return self.client.request(self.command, self.upstream + self.path, content=body or None, headers=headers)

    def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any


def main() -> None:
    parser = argparse.ArgumentParser(description="fault-injecting HTTP proxy for the tests")
    parser.add_argument("upstream")
    parser.add_argument("--script", default="pass")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", default="0-0", help="MIN-MAX milliseconds added before every step")
    parser.add_argument("--retry-after", default="1", help="the Retry-After of a 429, in seconds")
    args = parser.parse_args()
    low, _, high = args.latency.partition("-")
    Proxy.latency = (float(low) / 1000, float(high or low) / 1000)
    Proxy.retry_after = args.retry_after
    Proxy.upstream = args.upstream.rstrip("/")
    Proxy.steps = itertools.cycle(args.script.split(","))
    Proxy.served = Counter()
    Proxy.client = httpx.Client(timeout=30)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Proxy)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
