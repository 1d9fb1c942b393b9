"""Scores NDJSON in bulk: one line out per line in, same order, bounded memory.

Lines are read in chunks; with several workers, at most a few chunks per
worker are in flight, so memory does not grow with the input. A bad line
becomes an OperationOutcome line and never stops the batch.
"""

from __future__ import annotations

import sys
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import BinaryIO

import orjson

from plugin.outcome import invalid
from plugin.pipeline import Screener
from plugin.settings import Settings

CHUNK = 128  # lines per task: enough to amortise inter-process overhead, few enough to keep memory low
IN_FLIGHT_PER_WORKER = 2
READ_BLOCK = 1 << 16


def read_lines(source: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """Yields each line without its newline, or None for a line over `limit` bytes (skipped, not held)."""
    while True:
        line = source.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := source.readline(READ_BLOCK)) and not rest.endswith(b"\n"):
                pass
            yield None
            continue
        yield line.rstrip(b"\r\n")


def chunks(lines: Iterator[bytes | None], size: int = CHUNK) -> Iterator[list[bytes | None]]:
    chunk: list[bytes | None] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_screener: Screener | None = None  # one per worker process, made once


def _start_worker(settings: Settings) -> None:
    global _screener
    _screener = Screener(settings)


def score_chunk(lines: list[bytes | None]) -> tuple[list[bytes], Counter]:
    assert _screener is not None, "worker not started"
    out: list[bytes] = []
    counts: Counter = Counter()
    too_long = orjson.dumps(invalid("too-costly", "This line is over the size limit.").to_fhir())
    for line in lines:
        result, label = (too_long, "invalid") if line is None else _screener.process_line(line)
        out.append(result)
        counts[label] += 1
    return out, counts


def run_batch(
    source: BinaryIO, sink: BinaryIO, settings: Settings, workers: int = 1, progress: bool = False
) -> Counter:
    """Scores every line of `source` into `sink`; returns the counts by outcome."""
    totals: Counter = Counter()
    bar = _progress_bar(progress)
    batches = chunks(read_lines(source, settings.max_body_bytes))

    def emit(lines: list[bytes], counts: Counter) -> None:
        sink.write(b"\n".join(lines) + b"\n")
        totals.update(counts)
        bar.update(len(lines))

    if workers <= 1:
        _start_worker(settings)
        for chunk in batches:
            emit(*score_chunk(chunk))
    else:
        with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(settings,)) as pool:
            pending: deque[Future] = deque()
            for chunk in batches:
                pending.append(pool.submit(score_chunk, chunk))
                if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                    emit(*pending.popleft().result())
            while pending:
                emit(*pending.popleft().result())
    bar.close()
    sink.flush()
    return totals


def _progress_bar(enabled: bool):  # returns a tqdm bar, imported lazily
    from tqdm import tqdm

    return tqdm(unit=" QR", file=sys.stderr, disable=not enabled, mininterval=0.5)


def summary(counts: Counter) -> str:
    total = sum(counts.values())
    parts = ", ".join(f"{label} {n}" for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{total} responses scored: {parts}" if total else "0 responses: the input was empty"
