"""Catch-up sync: finds responses on the FHIR server that lack current results, and writes them.

What makes a lost notification harmless. Responses of the plugin's
Questionnaires are read in `_lastUpdated` order from a watermark kept in a
state file; each is planned like `submit` (only what is missing or changed is
written), so running it again, or two at once, writes nothing twice. The
state file is locked while a sync runs: a second sync started meanwhile (a
slow cron run overlapping the next) stops at once and says so. The
watermark moves only past responses that were handled, so an interrupted
sync resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson

from plugin.screening import data
from plugin.screening.outcome import InvalidInput
from plugin.screening.pipeline import Screener
from plugin.stores.store import Store
from plugin.stores.writeback import prepare, read_states, write

PAGE = 200  # responses read per query; the watermark moves on after each page
GROUP = 8  # responses read in one batch and then written concurrently: fewer round trips, a bounded load
# Every status: a response still in progress, or stopped, may report a red flag (SCREENING.md §7).
STATUSES = "completed,amended,entered-in-error,in-progress,stopped"
RECORDED = "red flags recorded"  # a refused response whose red flags were written all the same


class SyncBusy(Exception):
    """Another sync holds the state file."""


def default_state_file() -> Path:
    state_home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state_home) / "backpain-screen" / "sync-state.json"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Holds `<state file>.lock` (a separate file, so the state itself can be replaced atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SyncBusy(f"another sync is running (it holds {path.name}.lock); nothing to do.") from None
        yield


def _states(path: Path) -> dict:
    """Every store's state in the file: base URL -> {watermark, seen}. A damaged file counts as empty:
    sync then starts from the beginning, which costs time but, everything being idempotent, nothing else."""
    try:
        states = orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {}
    return states if isinstance(states, dict) else {}


def read_state(path: Path, base_url: str) -> dict:
    return _states(path).get(base_url, {"watermark": None, "seen": []})


def write_state(path: Path, base_url: str, state: dict) -> None:
    """Written to a temporary file and renamed over the old one: a crash leaves the old state or the new."""
    states = _states(path)
    states[base_url] = state
    temporary = path.with_name(path.name + ".new")
    with open(temporary, "wb") as handle:
        handle.write(orjson.dumps(states, option=orjson.OPT_INDENT_2))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


async def sync(client: Store, screener: Screener, state_file: Path, since: str | None = None,
               page: int = PAGE) -> Counter:
    """Handles every response updated since the watermark (or `since`), `page` responses at a time (the
    watermark is saved after each); returns counts of what happened."""
    counts: Counter = Counter()
    with locked(state_file):
        state = read_state(state_file, client.base_url)
        if since:
            state = {"watermark": since, "seen": []}
        for url in screener.questionnaires:
            state = await _sync_questionnaire(client, screener, url, state, counts, page,
                                              lambda s: write_state(state_file, client.base_url, s))
    return counts


async def _sync_questionnaire(client: Store, screener: Screener, url: str, state: dict, counts: Counter,
                              page: int, save: Callable[[dict], None]) -> dict:
    """One pass over the responses since the watermark, following the server's pages, handled a page at a time.

    Following the pages (rather than asking again from the new watermark) is
    what gets past more than a page of responses stamped with one instant.
    """
    # A response names its Questionnaire with or without a version: every published form of the canonical.
    params = {"questionnaire": data.canonical_forms(url), "status": STATUSES, "_sort": "_lastUpdated",
              "_count": str(page)}
    if state["watermark"]:
        params["_lastUpdated"] = f"ge{state['watermark']}"
    seen = {tuple(x) for x in state["seen"]}
    batch: list[dict] = []
    async for qr in client.search("QuestionnaireResponse", params):
        if (qr["id"], qr.get("meta", {}).get("versionId")) not in seen:
            batch.append(qr)
        if len(batch) == page:
            state = await _handle(client, screener, batch, state, counts)
            save(state)
            batch = []
    if batch:
        state = await _handle(client, screener, batch, state, counts)
        save(state)
    return state


async def _handle(client: Store, screener: Screener, fresh: list[dict], state: dict, counts: Counter) -> dict:
    """Writes what the responses lack; the state that moves the watermark past them."""
    for start in range(0, len(fresh), GROUP):
        counts.update(await _group(client, screener, fresh[start:start + GROUP]))
    last = max(qr["meta"]["lastUpdated"] for qr in fresh)
    at_last = [[qr["id"], qr["meta"].get("versionId")] for qr in fresh if qr["meta"]["lastUpdated"] == last]
    previous = state["seen"] if last == state["watermark"] else []
    return {"watermark": last, "seen": previous + at_last}


async def _group(client: Store, screener: Screener, qrs: list[dict]) -> list[str]:
    """Handles a few responses: one read for all of them, then a transaction each, concurrently."""
    jobs, labels = [], []
    for qr in qrs:
        try:
            job = prepare(screener, qr)
        except InvalidInput:
            labels.append("invalid")  # a response the plugin cannot score: counted, never retried in a loop
            continue
        if job.refused is not None:  # refused, but it reports a red flag: that is written all the same
            labels += ["invalid", RECORDED]
        if job.outcome.bundle.get("entry"):
            jobs.append(job)
        else:
            labels.append("up-to-date")  # e.g. in progress with no red flag: nothing to write
    states = await read_states(client, jobs, with_responses=False)
    try:
        async with asyncio.TaskGroup() as group:  # one failing cancels the others, and all are awaited
            tasks = [group.create_task(write(client, job, state, stored_response=job.qr))
                     for job, state in zip(jobs, states)]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None  # the first failure is what the caller reports
    return labels + ["written" if any(w.changed for w in task.result()) else "up-to-date"
                     for job, task in zip(jobs, tasks) if job.refused is None]
