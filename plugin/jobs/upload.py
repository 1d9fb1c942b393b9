"""`batch --upload`: writes each response with its results as `submit` does, a bounded number at a time.

Responses are scored in worker processes (or here, with one worker) and
written from this process by `concurrency` writers on one event loop: for
each, what the store holds is read, planned against and written in one
transaction (`writeback.save`), so a rerun after a crash or a kill writes
only what is missing and never a second copy. Two things are never written
at once: two lines of the same response (they would race each other's
conditional creates), and the first use of a Device (every transaction
creates it conditionally; the first one does it alone, the others wait).
Memory stays bounded: a few chunks are scored ahead, and the writers' queue is short.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass

import orjson

from plugin.fhir.client import FhirError
from plugin.jobs.batch import (
    IN_FLIGHT_PER_WORKER,
    INVALID,
    TOO_LONG,
    Report,
    chunks,
    screener,
    start_pool_worker,
    start_worker,
)
from plugin.jobs.bulk import RESPONSE_TYPE, Line
from plugin.jobs.summary import label_of, table
from plugin.screening import systems
from plugin.screening.identity import response_key
from plugin.screening.outcome import InvalidInput
from plugin.screening.parsing import parse_body
from plugin.screening.pipeline import Outcome, Settings
from plugin.screening.reconcile import stored_key
from plugin.stores.store import Store
from plugin.stores.writeback import Job, prepare, save

CHUNK = 32  # scored Bundles are ~35 kB: smaller chunks than for NDJSON output keep memory low
SKIPPED = "skipped"  # another resource type (a Bulk Data export holds many)
WRITTEN, UNCHANGED, FAILED, NOTHING = "written", "unchanged", "failed", "nothing to write"
GIVE_UP = 20  # writes failing in a row (after the client's retries) that stop the batch; at least 2 x concurrency


@dataclass(frozen=True, slots=True)
class Scored:
    """What a worker made of one line: a label, and either why it failed or the job as bytes to write."""

    label: str
    why: str | None = None
    qr: bytes | None = None
    bundle: bytes | None = None
    observation_keys: tuple[str, ...] = ()
    task_keys: tuple[str, ...] = ()

    def job(self) -> Job:
        assert self.qr is not None and self.bundle is not None
        outcome = Outcome(orjson.loads(self.bundle), self.label, None)
        return Job(orjson.loads(self.qr), outcome, list(self.observation_keys), list(self.task_keys))


def score_for_upload(texts: list[bytes | None]) -> list[Scored]:
    return [_score(text) for text in texts]


def _score(text: bytes | None) -> Scored:
    if text is None:
        return Scored(INVALID, TOO_LONG)
    try:
        qr = parse_body(text, "application/fhir+json", screener().settings.max_body_bytes)
        if isinstance(qr, dict) and isinstance(qr.get("resourceType"), str) and qr["resourceType"] != RESPONSE_TYPE:
            return Scored(SKIPPED)
        job = prepare(screener(), qr)
    except InvalidInput as error:
        return Scored(INVALID, error.summary())
    if not job.outcome.bundle.get("entry"):
        return Scored(job.outcome.label)  # in-progress or stopped: nothing to write
    label, why = label_of(job.qr.get("questionnaire"), job.outcome.label), None  # BASDAI's apart
    if job.refused is not None:  # counted and named as invalid, and its red flags written all the same
        label, why = INVALID, f"{job.refused.summary()} Its red flags are written all the same."
    return Scored(label, why, orjson.dumps(job.qr), orjson.dumps(job.outcome.bundle),
                  tuple(job.observation_keys), tuple(job.task_keys))


async def upload(lines: Iterable[Line], store: Store, settings: Settings, *, workers: int = 1,
                 concurrency: int = 8, report: Report, progress=None) -> Report:
    """Scores and writes every line; `report` counts the outcomes, and what was written."""
    queue: asyncio.Queue[tuple[Line, Scored] | None] = asyncio.Queue(maxsize=concurrency * 2)
    gate = _Gate()
    breaker = _Breaker(max(GIVE_UP, 2 * concurrency))

    async def writer() -> None:
        while (item := await queue.get()) is not None:
            line, scored = item
            outcome = FAILED if breaker.tripped else await _write(store, line, scored, gate, report, breaker)
            report.writes[outcome] += 1
            if progress is not None:
                progress.update(1)

    writers = [asyncio.create_task(writer()) for _ in range(concurrency)]
    try:
        async with aclosing(_scored(lines, settings, workers)) as scored_lines:
            async for line, scored in scored_lines:
                if breaker.tripped:
                    report.halted = (f"stopped after {breaker.limit} writes in a row failed (the store unreachable, "
                                     f"failing or overloaded); the rest of the input was not read")
                    break
                if _to_write(line, scored, report):
                    await queue.put((line, scored))
        for _ in writers:
            await queue.put(None)
        await asyncio.gather(*writers)
    finally:
        for task in writers:
            task.cancel()
    return report


def _to_write(line: Line, scored: Scored, report: Report) -> bool:
    """Counts a scored line; whether it has results to write."""
    if scored.label == SKIPPED:
        report.writes[SKIPPED] += 1
        return False
    report.count(scored.label)  # the screening outcome, as NDJSON output counts it
    if scored.why:
        report.problem(line, f"not scored: {scored.why}")
        report.writes[INVALID] += 1
    elif scored.qr is None:
        report.writes[NOTHING] += 1
    return scored.qr is not None


async def _scored(lines: Iterable[Line], settings: Settings, workers: int):
    """Each owned line with what scoring it gave, in order; at most a few chunks ahead of the writers."""
    if workers <= 1:
        start_worker(settings)
        for chunk in chunks(lines, CHUNK):
            for line, scored in zip(chunk, score_for_upload([line.text for line in chunk])):
                yield line, scored
            await asyncio.sleep(0)  # let the writers run between chunks
        return
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(workers, initializer=start_pool_worker, initargs=(settings,)) as pool:
        pending: deque[tuple[list[Line], asyncio.Future]] = deque()
        for chunk in chunks(lines, CHUNK):
            pending.append((chunk, _submit(loop, pool, chunk)))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                for item in await _next(pending):
                    yield item
        while pending:
            for item in await _next(pending):
                yield item


def _submit(loop: asyncio.AbstractEventLoop, pool: Executor, chunk: list[Line]) -> asyncio.Future:
    return loop.run_in_executor(pool, score_for_upload, [line.text for line in chunk])


async def _next(pending: deque[tuple[list[Line], asyncio.Future]]) -> Iterator[tuple[Line, Scored]]:
    chunk, future = pending.popleft()
    return zip(chunk, await future)


async def _write(store: Store, line: Line, scored: Scored, gate: _Gate, report: Report, breaker: _Breaker) -> str:
    job = scored.job()
    try:
        async with gate.hold(response_key(job.qr), _device_key(job.outcome.bundle)):
            written = await save(store, job)
    except InvalidInput as error:  # e.g. the patient is not on the server: nothing of it was written
        report.problem(line, f"not written: {error.summary()}")
        breaker.answered()
        return FAILED
    except FhirError as error:  # refused, or unreachable after the client's retries: the rerun writes it
        report.problem(line, f"not written: {error}")
        breaker.failed(error.status)
        return FAILED
    breaker.answered()
    return WRITTEN if any(w.changed for w in written) else UNCHANGED


class _Breaker:
    """Stops a batch whose store keeps failing: a million lines each retried against a dead server would
    take days to report what the first few already show. Refusals of single responses do not count."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_row = 0
        self.tripped = False

    def answered(self) -> None:
        self.in_row = 0

    def failed(self, status: int | None) -> None:
        if status is None or status == 429 or status >= 500:  # unreachable, failing, or overloaded for good
            self.in_row += 1
            self.tripped = self.tripped or self.in_row >= self.limit
        else:
            self.in_row = 0


def _device_key(bundle: dict) -> str:
    device = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Device")
    return stored_key(device, systems.SID_DEVICE) or ""


class _Gate:
    """One writer per response at a time; a Device's first transaction alone (conditional creates race)."""

    def __init__(self) -> None:
        self.busy: dict[str, asyncio.Event] = {}  # response key -> set when its writer is done
        self.creating: dict[str, asyncio.Lock] = {}  # device key -> held by the transaction that creates it
        self.ready: set[str] = set()  # devices a transaction of this run has written or found

    def hold(self, key: str, device: str) -> _Held:
        return _Held(self, key, device)


class _Held:
    def __init__(self, gate: _Gate, key: str, device: str) -> None:
        self.gate, self.key, self.device = gate, key, device
        self.creator: asyncio.Lock | None = None

    async def __aenter__(self) -> None:
        while (busy := self.gate.busy.get(self.key)) is not None:
            await busy.wait()
        self.gate.busy[self.key] = asyncio.Event()
        while self.device not in self.gate.ready:
            lock = self.gate.creating.setdefault(self.device, asyncio.Lock())
            if not lock.locked():
                await lock.acquire()
                self.creator = lock
                return
            async with lock:  # wait for the one creating it; if it failed, the loop makes this one try
                pass

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.gate.busy.pop(self.key).set()
        if self.creator is not None:
            if kind is None:
                self.gate.ready.add(self.device)
            self.creator.release()


def upload_summary(report: Report) -> str:
    writes = report.writes
    responses = sum(report.counts.values())
    line = (f"{responses} responses: {WRITTEN} {writes[WRITTEN]}, {UNCHANGED} {writes[UNCHANGED]}, "
            f"{FAILED} {writes[FAILED]}, {INVALID} {writes[INVALID]}, {NOTHING} {writes[NOTHING]}")
    if writes[SKIPPED]:
        line += f"; {writes[SKIPPED]} lines of other resource types skipped"
    line += f"; {report.halted}" if report.halted else ""
    return "\n".join(part for part in (line, table(report.counts)) if part)
