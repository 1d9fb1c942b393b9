"""A fault-injecting HTTP proxy, run as its own process in front of a FHIR server.

    python -m tests.fault_proxy UPSTREAM --script 500,pass,429,lose,pass [--port 0]

Each request takes the next step of the script (cyclically):
  pass    forward it and return the server's answer
  500     answer 500 with an OperationOutcome; the server never sees it
  429     answer 429 with Retry-After: 1; the server never sees it
  lose    forward it (the server acts on it), then answer 502: the caller's answer is lost
  reset   close the connection without answering; the server never sees it
  slow    wait two seconds, then forward it
GET /__faults reports how many of each were served. The port is printed on the first line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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

    def log_message(self, *args: object) -> None:  # quiet: the tests read /__faults instead
        pass

    def handle_any(self) -> None:
        if self.path == "/__faults":
            return self.reply(200, json.dumps(self.served).encode(), {"Content-Type": "application/json"})
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.lock:
            step = next(self.steps)
            self.served[step] += 1
        if step == "500":
            return self.reply(500, OUTCOME, {"Content-Type": "application/fhir+json"})
        if step == "429":
            return self.reply(429, OUTCOME, {"Content-Type": "application/fhir+json", "Retry-After": "1"})
        if step == "reset":
            self.close_connection = True
            return None
        if step == "slow":
            time.sleep(2)
        answer = self.forward(body)
        if step == "lose":
            return self.reply(502, OUTCOME, {"Content-Type": "application/fhir+json"})
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
        return self.reply(answer.status_code, answer.content, headers)

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
    args = parser.parse_args()
    Proxy.upstream = args.upstream.rstrip("/")
    Proxy.steps = itertools.cycle(args.script.split(","))
    Proxy.served = Counter()
    Proxy.client = httpx.Client(timeout=30)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Proxy)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
