"""Slow and vanishing clients (issue #14 items 9 and 10), against a real `serve` process.

Headers that trickle in are cut off after BACKPAIN_HEADER_SECONDS, a body
that stalls is a 408 after BACKPAIN_BODY_GAP_SECONDS, idle keep-alive
connections are closed after BACKPAIN_KEEP_ALIVE_SECONDS, and a caller that
hangs up mid-request is logged as such, never as a crash or a 500. The service
runs with limits shorter than the defaults (so the suite waits less) and two
workers (so the limits are seen to reach uvicorn's worker processes).
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from plugin.settings import ServiceSettings
from tests.fault_processes import Service, serving

HEADER_SECONDS, BODY_GAP_SECONDS, BODY_SECONDS, KEEP_ALIVE_SECONDS = 4, 3, 6, 1
MARGIN = 4.0  # seconds of slack on this shared machine
# Each limit is asserted within a window that ends before its default: the configured value must be the one used
DEFAULT = ServiceSettings()


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("slow")
    limits = {"BACKPAIN_HEADER_SECONDS": str(HEADER_SECONDS), "BACKPAIN_BODY_GAP_SECONDS": str(BODY_GAP_SECONDS),
              "BACKPAIN_BODY_SECONDS": str(BODY_SECONDS),
              "BACKPAIN_KEEP_ALIVE_SECONDS": str(KEEP_ALIVE_SECONDS)}
    with serving(home, "--store", str(home / "store.sqlite3"), "--workers", "2", BACKPAIN_LOG_LEVEL="info",
                 **limits) as running:
        yield running


# A POST whose head promises 5000 bytes of body: the body tests send only its first few
UNFINISHED_POST = (b"POST /QuestionnaireResponse HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
                   b"Content-Length: 5000\r\n\r\n")


def connect(service: Service) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=HEADER_SECONDS + MARGIN + 5)
    return sock


def read_answer(sock: socket.socket) -> bytes:
    """One whole HTTP answer, read by the standard library's parser (its body may come in a later packet than
    its head): the status line, then the body."""
    answer = http.client.HTTPResponse(sock)
    answer.begin()
    return b"HTTP/1.1 %d %s\r\n\r\n" % (answer.status, answer.reason.encode()) + answer.read()


def closed_after(sock: socket.socket, started: float, trickle: bytes | None = None) -> float:
    """Seconds until the server closes the connection (reading; sending `trickle` every second meanwhile)."""
    sock.settimeout(1.0)
    while time.monotonic() - started < HEADER_SECONDS + MARGIN + 5:
        try:
            if trickle:
                sock.sendall(trickle)
            data = sock.recv(65536)
            if not data or b"HTTP/1.1 408" in data or b" 408 " in data:
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    return float("inf")


def test_trickling_headers_are_cut_off_and_the_service_still_answers(service):
    slow = [connect(service) for _ in range(20)]
    started = time.monotonic()
    for sock in slow:
        sock.sendall(b"POST /QuestionnaireResponse HTTP/1.1\r\nHost: x\r\n")
    assert httpx.get(f"{service.base_url}/healthz", timeout=2).status_code == 200  # not held by the 20
    took = closed_after(slow[0], started, trickle=b"X-Slow: 1\r\n")
    assert HEADER_SECONDS - 1 <= took <= DEFAULT.header_seconds - 0.5, took
    for sock in slow:
        sock.close()


def test_a_stalled_body_is_a_408(service):
    sock = connect(service)
    started = time.monotonic()
    sock.sendall(UNFINISHED_POST + b'{"resourceType":')
    sock.settimeout(DEFAULT.body_gap_seconds)
    answer = read_answer(sock)
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"OperationOutcome" in answer
    assert BODY_GAP_SECONDS - 1 <= took <= DEFAULT.body_gap_seconds - 0.5, took
    sock.close()


def test_a_body_that_crawls_is_a_408_when_its_whole_time_is_up(service):
    """A byte a second never stalls BODY_GAP_SECONDS, but the body as a whole may take only BODY_SECONDS."""
    sock = connect(service)
    started = time.monotonic()
    sock.sendall(UNFINISHED_POST + b"{")
    sock.settimeout(1.0)
    answer = b""
    while not answer and time.monotonic() - started < BODY_SECONDS + 2 * MARGIN:
        try:
            answer = read_answer(sock)
        except TimeoutError:
            sock.sendall(b" ")
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408") and b"OperationOutcome" in answer, answer[:200]
    assert BODY_SECONDS - 1 <= took <= BODY_SECONDS + 2 * MARGIN, took  # not the gap (3 s), not the default (30)
    sock.close()


def test_an_idle_keep_alive_connection_is_closed(service):
    sock = connect(service)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(5)
    assert read_answer(sock).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    took = closed_after(sock, started)
    assert KEEP_ALIVE_SECONDS - 0.5 <= took <= DEFAULT.keep_alive_seconds - 0.5, took
    sock.close()


def test_a_client_that_hangs_up_mid_request_is_logged_as_such(service):
    before = service.log.read_text()
    for _ in range(3):
        sock = connect(service)
        sock.sendall(UNFINISHED_POST + b'{"resourceType":')
        time.sleep(0.3)
        sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and service.log.read_text().count("client disconnected") < before.count(
            "client disconnected") + 3:
        time.sleep(0.1)
    log = service.log.read_text()[len(before):]
    assert log.count('"event":"client-disconnected"') == 3, log
    assert "unexpected error" not in log and "Traceback" not in log
    metrics = httpx.get(f"{service.base_url}/metrics").text
    assert 'route="/QuestionnaireResponse",status="500"' not in metrics
    assert 'route="/QuestionnaireResponse",status="499"' in metrics
