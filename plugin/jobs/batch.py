"""Scores NDJSON in bulk: one line out per line in, same order, bounded memory.

Lines are read in chunks; with several workers, at most a few chunks per
worker are in flight, so memory does not grow with the input. A bad line
becomes an OperationOutcome line and never stops the batch; its file and
line number (never its content) are reported on standard error.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
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
NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EBADF, errno.ESPIPE, errno.EOPNOTSUPP}  # copy by hand instead


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

# A chunk's output lines (each with its newline), their labels, and why each bad line was bad. Lines, not one
# joined blob: a blob of megabytes is a fresh mapping to fault in each time, in the worker and in the batch process.
Scored = tuple[list[bytes], list[str], list[str | None]]


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
    """The chunk's output lines, labels and problems: three lists to hand back, not a tuple per line."""
    results, labels, whys = [], [], []
    process_body = screener().process_body
    for text in texts:
        try:
            if text is None:
                raise invalid("too-costly", TOO_LONG)
            outcome = process_body(text, "application/fhir+json")
        except InvalidInput as error:
            results.append(orjson.dumps(error.to_fhir(), option=orjson.OPT_APPEND_NEWLINE))
            labels.append(INVALID)
            whys.append(error.summary())
            continue
        results.append(orjson.dumps(outcome.bundle, option=orjson.OPT_APPEND_NEWLINE))
        labels.append(label_of(response_questionnaire(outcome.bundle), outcome.label))
        whys.append(None)
    return results, labels, whys


def score_chunk_to_file(texts: list[bytes | None], directory: str) -> tuple[str, list[str], list[str | None]]:
    """In a pool worker: the chunk's output lines go to a file of their own, for the batch process to append.

    Handing megabytes back through the pool's pipe cost more than scoring them (pickled, piped, unpickled,
    each a fresh mapping to fault in); a file is appended to the output by the kernel (`os.sendfile`).
    """
    results, labels, whys = score_chunk(texts)
    handle, path = tempfile.mkstemp(dir=directory, suffix=".ndjson")
    with open(handle, "wb") as out:
        out.writelines(results)
    return path, labels, whys


def append_file(sink: BinaryIO, path: str) -> None:
    """Appends a chunk's file to the output and removes it (the kernel copies it where it can)."""
    with open(path, "rb") as chunk:
        os.unlink(path)
        sink.flush()
        if not _sendfile(sink, chunk):
            shutil.copyfileobj(chunk, sink)


def _sendfile(sink: BinaryIO, chunk: BinaryIO) -> bool:
    """Whether the kernel appended the whole file; False when the output is not one it can send to."""
    try:
        out = sink.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation: an in-memory sink
        return False
    size, sent = os.fstat(chunk.fileno()).st_size, 0
    try:
        while sent < size:
            sent += os.sendfile(out, chunk.fileno(), sent, size - sent)
    except OSError as error:
        if sent or error.errno not in NO_SENDFILE:
            raise  # a full disk, a closed pipe: as a write would
        return False
    return True


def run_batch(lines: Iterable[Line], sink: BinaryIO, settings: Settings, workers: int = 1,
              progress: bool = False, report: Report | None = None) -> Counter:
    """Scores every line into `sink`; returns the counts by outcome."""
    report = report or Report()
    bar = progress_bar(progress)

    def count(chunk: list[Line], labels: list[str], whys: list[str | None]) -> None:
        report.counts.update(labels)
        for line, why in zip(chunk, whys):
            if why:
                report.problem(line, f"not scored: {why}")
        bar.update(len(chunk))

    start_worker(settings)  # before the pool: forked workers inherit it instead of each loading the rules again
    if workers <= 1:
        for chunk in chunks(lines):
            results, labels, whys = score_chunk([line.text for line in chunk])
            sink.writelines(results)
            count(chunk, labels, whys)
    else:
        for chunk, (path, labels, whys) in _pooled(lines, settings, workers):
            append_file(sink, path)
            count(chunk, labels, whys)
    bar.close()
    sink.flush()
    return report.counts


def _pooled(lines: Iterable[Line], settings: Settings, workers: int) -> Iterator[tuple[list[Line], tuple]]:
    """Each chunk with what a pool worker made of it, in order; a few chunks in flight per worker."""
    from concurrent.futures import ProcessPoolExecutor

    with (tempfile.TemporaryDirectory(prefix="backpain-batch-") as directory,
          ProcessPoolExecutor(workers, initializer=start_pool_worker, initargs=(settings, True)) as pool):
        pending: deque[tuple[list[Line], Future]] = deque()
        for chunk in chunks(lines):
            pending.append((chunk, pool.submit(score_chunk_to_file, [line.text for line in chunk], directory)))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


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
