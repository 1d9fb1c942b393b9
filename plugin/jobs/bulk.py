"""FHIR Bulk Data input for `batch`: NDJSON files (gzip or not), an export manifest, standard input; partitions.

Lines are streamed, never held: each is yielded with the file it came from
and its line number there, so a problem can be reported as `file:line`
without repeating the line (which holds patient data).

A partition `i/n` owns a line by a hash of the response's key (its patient
and identifier or id, as `identity.response_key` makes it), not by the
line's position: every version or copy of one response lands in the same
partition, so two processes never write the same response's results at
once, and a re-export in another order or split into other files keeps
each response in the partition it was in. A line that is not a readable
response has no key: it goes by its position among all input lines, so
it is reported by exactly one partition. Owning a line costs one JSON
parse in the reading process (about 10 µs; scoring costs 20 times more).
"""

from __future__ import annotations

import gzip
import io
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import orjson

from plugin.screening.identity import response_key

READ_BLOCK = 1 << 16
GZIP_MAGIC = b"\x1f\x8b"
RESPONSE_TYPE = "QuestionnaireResponse"


class BadInput(Exception):
    """An input that cannot be read at all (missing file, unreadable manifest): nothing is scored."""


@dataclass(frozen=True, slots=True)
class Line:
    where: str  # the file name (or "-" for standard input)
    number: int  # 1-based, in that file
    ordinal: int  # 0-based, among every line of every input: the same in every partition's reading
    text: bytes | None  # without its newline; None for a line over the size limit (skipped, not held)


@dataclass(frozen=True, slots=True)
class Partition:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Partition:
        """`i/n` with 0 <= i < n (a Kubernetes Indexed Job passes `$(JOB_COMPLETION_INDEX)/N`)."""
        index, slash, count = text.partition("/")
        try:
            i, n = int(index), int(count)
        except ValueError:
            i = n = -1
        if not slash or n < 1 or not 0 <= i < n:
            raise ValueError(f"--partition must be i/n with 0 <= i < n, such as 0/4; not {text!r}")
        return cls(i, n)

    def owns(self, line: Line) -> bool:
        if self.count == 1:
            return True
        key = line_key(line.text)
        slot = zlib.crc32(key.encode()) if key is not None else line.ordinal
        return slot % self.count == self.index


WHOLE = Partition(0, 1)


def line_key(text: bytes | None) -> str | None:
    """The response key of a line, or None when the line is not a response one can key."""
    if not text:
        return None
    try:
        qr = orjson.loads(text)
        return response_key(qr) if isinstance(qr, dict) and qr.get("resourceType") == RESPONSE_TYPE else None
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None


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


def expand(names: list[str]) -> tuple[list[str], int]:
    """The NDJSON inputs named: files and `-` as given, a manifest's QuestionnaireResponse outputs in its
    order. Also how many of the manifests' outputs were of other types (not read)."""
    inputs: list[str] = []
    other = 0
    for name in names:
        if name != "-" and Path(name).suffix.lower() == ".json":
            files, skipped = manifest_files(Path(name))
            inputs += files
            other += skipped
        else:
            inputs.append(name)
    return inputs, other


def manifest_files(path: Path) -> tuple[list[str], int]:
    """A Bulk Data export manifest's QuestionnaireResponse files (local paths or file: URLs, relative to it)."""
    try:
        manifest = orjson.loads(path.read_bytes())
        outputs = manifest["output"]
        wanted = [o["url"] for o in outputs if o.get("type") == RESPONSE_TYPE]
    except OSError as error:
        raise BadInput(f"cannot read {path}: {error.strerror}") from None
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise BadInput(f"{path} is not a Bulk Data export manifest (a JSON object with an output list)") from None
    files = []
    for url in wanted:
        parts = urlsplit(url)
        if parts.scheme in ("http", "https"):
            raise BadInput(f"{path} names files on a server; download them first (a Bulk Data client "
                           "does) and give the files or a manifest that points at them")
        local = Path(unquote(parts.path)) if parts.scheme == "file" else Path(url)
        files.append(str(local if local.is_absolute() else path.parent / local))
    return files, len(outputs) - len(wanted)


def lines(inputs: list[str], limit: int, unreadable: list[str] | None = None) -> Iterator[Line]:
    """Every line of every input, in order.

    An input that breaks off (a truncated or corrupt gzip, a read error) raises BadInput; given a list
    `unreadable`, it is said there instead and the next input is read, so every line that could be read
    is scored (a partial download of one export file does not stop the others).
    """
    ordinal = 0
    for name in inputs:
        number = 0
        try:
            with _open(name) as source:
                for number, text in enumerate(read_lines(source, limit), start=1):
                    yield Line(name, number, ordinal, text)
                    ordinal += 1
        except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
            problem = f"cannot read {name} past line {number}: {getattr(error, 'strerror', None) or error}"
            if unreadable is None:
                raise BadInput(problem) from None
            unreadable.append(problem)


def owned(inputs: list[str], limit: int, partition: Partition = WHOLE,
          unreadable: list[str] | None = None) -> Iterator[Line]:
    return (line for line in lines(inputs, limit, unreadable) if partition.owns(line))


def check_readable(inputs: list[str]) -> None:
    """Fails before anything is scored if an input file is missing or unreadable."""
    for name in inputs:
        if name != "-":
            try:
                with open(name, "rb"):
                    pass
            except OSError as error:
                raise BadInput(f"cannot read {name}: {error.strerror}") from None


@contextmanager
def _open(name: str) -> Iterator[BinaryIO]:
    """A file or standard input, gunzipped when it is gzip (by its first bytes, whatever its name)."""
    if name == "-":
        stdin: io.BufferedReader = sys.stdin.buffer  # type: ignore[assignment]
        yield gzip.GzipFile(fileobj=stdin, mode="rb") if stdin.peek(2)[:2] == GZIP_MAGIC else stdin  # type: ignore[misc]
        return
    with open(name, "rb") as probe:
        zipped = probe.read(2) == GZIP_MAGIC
    with gzip.open(name, "rb") if zipped else open(name, "rb", buffering=1 << 20) as handle:
        yield handle  # type: ignore[misc]
