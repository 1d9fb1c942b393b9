"""Hostile XML cannot stall the service (issue #14 item 4).

The limits refuse each hostile shape in milliseconds, before the costly
conversion; what passes them is converted in a worker thread, so the event
loop keeps answering: `/healthz` within 100 ms while ten hostile (or
heavy but acceptable) bodies are in flight against a real `serve` process.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from plugin.screening.outcome import InvalidInput
from plugin.screening.parsing import parse_body
from tests.fault_processes import serving
from tests.security.hostile_xml import HOSTILE, heavy_inside_the_limits, long_text

XML = "application/fhir+xml"
HEALTH_WITHIN = 0.100
# This machine's 2 cores are shared (load average 5-7 while these ran): a probe now and then waits for a core,
# whatever the service does. So 9 probes in 10 must answer within 100 ms, and none may take a second (before
# the fix, each hostile body held the event loop for 0.5-5.6 s and every probe waited it out).
WORST_WITHIN = 1.0


def assert_responsive(latencies: list[float]) -> None:
    ordered = sorted(latencies)
    assert ordered[int(len(ordered) * 0.9) - 1] < HEALTH_WITHIN, ordered
    assert ordered[-1] < WORST_WITHIN, ordered


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_shape_is_refused_before_the_conversion(name):
    started = time.perf_counter()
    with pytest.raises(InvalidInput) as refused:
        parse_body(HOSTILE[name], XML)
    assert refused.value.status in (400, 413)
    assert time.perf_counter() - started < 0.2  # measured: under 10 ms each; the conversion took up to 5.6 s


def test_a_long_text_run_in_a_narrative_is_parsed_linearly():
    started = time.perf_counter()
    parse_body(long_text(), XML)
    assert time.perf_counter() - started < 0.5


def _health_while(base_url: str, bodies: list[bytes]) -> tuple[list[float], list[int]]:
    """Posts the bodies at once and polls /healthz until all are answered: probe latencies, body statuses."""
    latencies: list[float] = []
    with httpx.Client(base_url=base_url, timeout=60) as probe, ThreadPoolExecutor(len(bodies)) as pool:
        probe.get("/healthz")  # connection open: only the service's own latency is measured
        posts = [pool.submit(httpx.post, f"{base_url}/QuestionnaireResponse", content=body,
                             headers={"Content-Type": XML}, timeout=60) for body in bodies]
        while not all(p.done() for p in posts):
            started = time.perf_counter()
            assert probe.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
        return latencies, [p.result().status_code for p in posts]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    home = tmp_path_factory.mktemp("hostile")
    with serving(home, "--store", str(home / "store.sqlite3")) as running:
        yield running


def test_healthz_answers_within_100_ms_while_ten_hostile_bodies_are_refused(service):
    bodies = [HOSTILE[name] for name in sorted(HOSTILE)] * 2
    latencies, statuses = _health_while(service.base_url, bodies[:10])
    assert set(statuses) <= {400, 413}, statuses
    assert len(latencies) >= 3, latencies
    assert_responsive(latencies)


def test_healthz_answers_within_100_ms_while_ten_heavy_bodies_are_converted(service):
    latencies, statuses = _health_while(service.base_url, [heavy_inside_the_limits()] * 10)
    assert set(statuses) <= {400, 413}, statuses  # not a response to the screening; 413 past the time budget
    assert len(latencies) >= 5, latencies  # the conversions took a while: the probe ran throughout
    assert_responsive(latencies)
