"""Benchmark: the plugin's write-back against a plain loop POSTing the same transaction Bundles.

    python -m tests.bench_writeback [--n 1000] [--fhir-base-url URL]

Without a URL a HAPI FHIR JPA server is started (tests/hapi_server/). In one
run, on fresh responses each time (so all three create the same resources):
  loop    one httpx client POSTing, one after another, the transaction Bundles the
          plugin builds for the responses (built before the clock starts);
  submit  the plugin's `submit` for other responses: score, read what the
          server holds (one batch), plan, write (one transaction);
  sync    other responses put on the server beforehand, then one `sync` run over them.
The three take turns, a block of responses each, so each writes to a store of
the same size (a server slows as it fills: measuring one after the other
would charge the later ones for what the earlier ones stored).
The ratio to the loop is the plugin's overhead; the target is at most 1.5x.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import orjson

from plugin.fhir.client import FhirClient
from plugin.screening.pipeline import Screener
from plugin.stores.sync import sync
from plugin.stores.writeback import submit
from tests.bench_pipeline import make_bodies
from tests.hapi_helpers import hapi_server

BLOCK = 50  # responses per turn
HEADERS = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


def responses(screener: Screener, n: int, patient: str, seed: int) -> list[dict]:
    """N plausible completed responses about `patient`, each with its own id."""
    found = []
    for body in make_bodies(screener, n, seed):
        qr = orjson.loads(body)
        qr.update(id=f"bench-{uuid.uuid4()}", subject={"reference": patient}, status="completed")
        found.append(qr)
    return found


def plain_loop(base_url: str, bundles: list[dict]) -> float:
    with httpx.Client(base_url=base_url, headers=HEADERS, timeout=60) as client:
        start = time.perf_counter()
        for bundle in bundles:
            client.post("/", content=orjson.dumps(bundle)).raise_for_status()
        return time.perf_counter() - start


async def plugin_submit(base_url: str, screener: Screener, qrs: list[dict]) -> float:
    async with FhirClient(base_url) as client:
        start = time.perf_counter()
        for qr in qrs:
            await submit(client, screener, qr)
        return time.perf_counter() - start


async def plugin_sync(base_url: str, screener: Screener, qrs: list[dict]) -> float:
    with httpx.Client(base_url=base_url, headers=HEADERS, timeout=60) as client:
        stored = [client.put(f"/QuestionnaireResponse/{qr['id']}", content=orjson.dumps(qr)) for qr in qrs]
    since = min(answer.raise_for_status().json()["meta"]["lastUpdated"] for answer in stored)  # the server's clock
    with tempfile.TemporaryDirectory() as state:
        async with FhirClient(base_url) as client:
            start = time.perf_counter()
            counts = await sync(client, screener, Path(state) / "state.json", since)
            elapsed = time.perf_counter() - start
    assert counts["written"] == len(qrs) and not counts["up-to-date"], counts  # these, and only these
    return elapsed


def run(base_url: str, n: int) -> None:
    screener = Screener()
    with httpx.Client(base_url=base_url, headers=HEADERS, timeout=60) as client:
        created = client.post("/Patient", content=orjson.dumps({"resourceType": "Patient"}))
        created.raise_for_status()
        patient = f"Patient/{created.json()['id']}"
    bundles = [screener.process(qr).bundle for qr in responses(screener, n, patient, seed=1)]
    submitted, synced = responses(screener, n, patient, seed=2), responses(screener, n, patient, seed=3)
    print(f"{n:,} responses, one after another, against {base_url}\n", flush=True)
    took = {"loop": 0.0, "submit": 0.0, "sync": 0.0}
    for start in range(0, n, BLOCK):
        block = slice(start, start + BLOCK)
        took["loop"] += plain_loop(base_url, bundles[block])
        took["submit"] += asyncio.run(plugin_submit(base_url, screener, submitted[block]))
        took["sync"] += asyncio.run(plugin_sync(base_url, screener, synced[block]))
    loop = took["loop"]
    print("| way | seconds | responses/s | ratio to the loop |\n|---|---:|---:|---:|")
    for name, key in (("plain httpx loop POSTing the Bundles", "loop"), ("`submit`", "submit"), ("`sync`", "sync")):
        row(name, took[key], n, loop)
    verdict = "PASS" if took["submit"] / loop <= 1.5 else "FAIL"
    print(f"\n{verdict}: submit within 1.5x of the loop (got {took['submit'] / loop:.2f}x)")


def row(name: str, seconds: float, n: int, loop: float) -> None:
    print(f"| {name} | {seconds:.2f} | {n / seconds:,.1f} | {seconds / loop:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--fhir-base-url")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        base_url = args.fhir_base_url or stack.enter_context(hapi_server()).base_url
        run(base_url.rstrip("/"), args.n)


if __name__ == "__main__":
    main()
