"""What was written for each response, counted from the store itself: lost, duplicated, complete.

A response's result set is its 7 Observations (`derivedFrom` the response,
one per result code), its Provenance (`entity` source: the response) and at
most one Task (`focus`). Counted from every resource of those types in the
store, so nothing the plugin did can hide from the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from plugin.stores.sqlite import SqliteStore

OBSERVATIONS_PER_RESPONSE = 7


@dataclass
class Tally:
    observations: Counter = field(default_factory=Counter)  # response id -> Observations derived from it
    codes: defaultdict = field(default_factory=lambda: defaultdict(set))  # response id -> their result codes
    provenances: Counter = field(default_factory=Counter)
    tasks: Counter = field(default_factory=Counter)

    def verdict(self, ids: Iterable[str]) -> dict[str, int]:
        """How many of `ids` have exactly one complete result set; how many none (lost), more (duplicated),
        or a part (incomplete: results without their Provenance, or fewer than 7)."""
        counts = Counter()
        for qr in ids:
            obs, prov = self.observations[qr], self.provenances[qr]
            if obs == 0 and prov == 0:
                counts["lost"] += 1
            elif obs > OBSERVATIONS_PER_RESPONSE or prov > 1 or self.tasks[qr] > 1:
                counts["duplicated"] += 1
            elif obs < OBSERVATIONS_PER_RESPONSE or prov == 0 or len(self.codes[qr]) != obs:
                counts["incomplete"] += 1
            else:
                counts["exactly_one"] += 1
        return {key: counts[key] for key in ("exactly_one", "lost", "duplicated", "incomplete")}


def _qr_id(reference: str | None) -> str | None:
    if reference and reference.startswith("QuestionnaireResponse/"):
        return reference.split("/")[1]
    return None


def tally(observations: Iterable[dict], provenances: Iterable[dict], tasks: Iterable[dict]) -> Tally:
    found = Tally()
    for obs in observations:
        for derived in obs.get("derivedFrom", []):
            if qr := _qr_id(derived.get("reference")):
                found.observations[qr] += 1
                found.codes[qr].add(obs["code"]["coding"][0]["code"])
    for prov in provenances:
        for entity in prov.get("entity", []):
            if entity.get("role") == "source" and (qr := _qr_id(entity["what"].get("reference"))):
                found.provenances[qr] += 1
    for task in tasks:
        if qr := _qr_id(task.get("focus", {}).get("reference")):
            found.tasks[qr] += 1
    return found


def every(fhir: httpx.Client, resource_type: str) -> Iterator[dict]:
    """Every resource of a type on a FHIR server, following its `next` links."""
    url: str | None = f"/{resource_type}?_count=200"
    while url:
        page = fhir.get(url)
        assert page.status_code == 200, page.text
        bundle = page.json()
        yield from (entry["resource"] for entry in bundle.get("entry", []))
        url = next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)


def on_server(base_url: str) -> Tally:
    with httpx.Client(base_url=base_url, timeout=60, headers={"Accept": "application/fhir+json"}) as fhir:
        return tally(every(fhir, "Observation"), every(fhir, "Provenance"), every(fhir, "Task"))


def in_store(path: Path) -> Tally:
    async def read() -> Tally:
        async with SqliteStore(path) as store:
            kinds = [[r async for r in store.search(kind, {})] for kind in ("Observation", "Provenance", "Task")]
            return tally(*kinds)

    return asyncio.run(read())


def integrity(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
