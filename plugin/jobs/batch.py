"""Scores NDJSON in bulk: one line out per line in, same order, bounded memory.

Lines are read in chunks; with several workers, at most a few chunks per
worker are in flight, so memory does not grow with the input. A bad line
becomes an OperationOutcome line and never stops the batch; its file and
line number (never its content) are reported on standard error.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, BinaryIO, TextIO

import orjson

if TYPE_CHECKING:
    from concurrent.futures import Future

from plugin.jobs.bulk import Line
from plugin.jobs.summary import headline, label_of, response_questionnaire, table
from plugin.screening.outcome import InvalidInput, invalid
from plugin.screening.pipeline import Screener, Settings

CHUNK = 128  # lines per task: enough to amortise inter-process overhead, few enough to keep memory low
IN_FLIGHT_PER_WORKER = 2
ORPHAN_CHECK = 1.0  # seconds between a worker's looks at whether its batch process is still there
SHOWN = 50  # problems reported line by line; past that, only counted
INVALID = "invalid"
TOO_LONG = "This line is over the size limit."


class Report:
    """Counts by label, and the first few problems by file and line number (no patient data)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.counts: Counter = Counter()  # by screening outcome (or invalid)
        self.writes: Counter = Counter()  # uploading: written, unchanged, failed, ...
        self.halted: str | None = None  # why the batch stopped before the end of its input
        self.problems = 0
        self.stream = stream or sys.stderr

    def count(self, label: str) -> None:
        self.counts[label] += 1

    def problem(self, line: Line, message: str) -> None:
        self.problems += 1
        if self.problems <= SHOWN:
            print(f"backpain-screen: {line.where}:{line.number}: {message}", file=self.stream)
        elif self.problems == SHOWN + 1:
            print(f"backpain-screen: more problems follow; only the first {SHOWN} are shown.", file=self.stream)


def chunks(items: Iterable, size: int = CHUNK) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_screener: Screener | None = None  # one per process, made once (a forked worker inherits its parent's)

Scored = tuple[bytes, list[str], list[str | None]]  # a chunk's output lines, each line's label, why it was bad


def start_worker(settings: Settings) -> None:
    global _screener
    _screener = Screener(settings)


def start_pool_worker(settings: Settings, inherited: bool = False) -> None:
    """A pool worker: also ends itself when the batch process is gone (killed, even by SIGKILL).

    `inherited`: the pool's parent made its screener just before the pool forked this worker; use it.
    """
    if not (inherited and _screener is not None and _screener.settings == settings):  # (not forked: spawned)
        start_worker(settings)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_CHECK)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def screener() -> Screener:
    assert _screener is not None, "worker not started"
    return _screener


def score_chunk(texts: list[bytes | None]) -> Scored:
    """The chunk's output as one blob (one line per input line): one object to hand back, not one per line."""
    results, labels, whys = [], [], []
    process_body = screener().process_body
    for text in texts:
        try:
            if text is None:
                raise invalid("too-costly", TOO_LONG)
            outcome = process_body(text, "application/fhir+json")
        except InvalidInput as error:
            results.append(orjson.dumps(error.to_fhir()))
            labels.append(INVALID)
            whys.append(error.summary())
            continue
        results.append(orjson.dumps(outcome.bundle))
        labels.append(label_of(response_questionnaire(outcome.bundle), outcome.label))
        whys.append(None)
    results.append(b"")  # the last line's newline
    return b"\n".join(results), labels, whys


def run_batch(lines: Iterable[Line], sink: BinaryIO, settings: Settings, workers: int = 1,
              progress: bool = False, report: Report | None = None) -> Counter:
    """Scores every line into `sink`; returns the counts by outcome."""
    report = report or Report()
    bar = progress_bar(progress)

    def emit(chunk: list[Line], scored: Scored) -> None:
        blob, labels, whys = scored
        sink.write(blob)
        report.counts.update(labels)
        for line, why in zip(chunk, whys):
            if why:
                report.problem(line, f"not scored: {why}")
        bar.update(len(chunk))

    batches = chunks(lines)
    start_worker(settings)  # before the pool: forked workers inherit it instead of each loading the rules again
    if workers <= 1:
        for chunk in batches:
            emit(chunk, score_chunk([line.text for line in chunk]))
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, initializer=start_pool_worker, initargs=(settings, True)) as pool:
            pending: deque[tuple[list[Line], Future]] = deque()
            for chunk in batches:
                pending.append((chunk, pool.submit(score_chunk, [line.text for line in chunk])))
                if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                    done, future = pending.popleft()
                    emit(done, future.result())
            while pending:
                done, future = pending.popleft()
                emit(done, future.result())
    bar.close()
    sink.flush()
    return report.counts


class NoBar:
    """What progress_bar gives when it is off (tqdm is not even imported)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool):  # returns a tqdm bar, imported lazily
    if not enabled:
        return NoBar()
    from tqdm import tqdm

    return tqdm(unit=" QR", file=sys.stderr, mininterval=0.5)


def summary(counts: Counter) -> str:
    """The counts for a person: one line, then each questionnaire's outcomes as a table."""
    return "\n".join(part for part in (headline(counts), table(counts)) if part)
