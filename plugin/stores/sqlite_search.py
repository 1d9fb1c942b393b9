"""Search for the embedded store: the parameters it knows, what it indexes, and the SQL a query becomes.

Like a FHIR server, it refuses what it does not understand (an unknown
parameter, a modifier, a chain, a bad value) with 400 instead of ignoring
it: a search that quietly matched more than was asked for could make a
conditional create pick the wrong resource. Error messages name parameters,
never the values searched for (they may be patient identifiers).
"""

from __future__ import annotations

import base64
import re
import sqlite3
from dataclasses import dataclass, field
from typing import Any

import orjson

from plugin.fhir.client import FhirError
from plugin.screening import references
from plugin.screening.outcome import Issue, operation_outcome
from plugin.screening.timeline import date_range

TOKEN, REFERENCE, URI, DATE = "token", "reference", "uri", "date"
DEFAULT_COUNT = 50
MAX_COUNT = 1000
CONTROL = frozenset({"_count", "_sort", "_summary", "_total", "_cursor"})  # _cursor: our own `next` links
ID = references.ID  # FHIR ids, less . and .. (one rule for the whole plugin)
REFERENCE_SHAPE = re.compile(r"(?:.*/)?([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?")
# A target's range [lo, hi] against the search value's range, as FHIR defines each prefix:
# the SQL, and which bounds of the search value (0 low, 1 high) its placeholders take.
DATE_TESTS = {
    "eq": ("({lo} >= ? AND {hi} <= ?)", (0, 1)), "ne": ("NOT ({lo} >= ? AND {hi} <= ?)", (0, 1)),
    "gt": ("{hi} > ?", (1,)), "lt": ("{lo} < ?", (0,)), "ge": ("{hi} >= ?", (0,)), "le": ("{lo} <= ?", (1,)),
    "sa": ("{lo} > ?", (1,)), "eb": ("{hi} < ?", (0,)),
}


def refused(status: int, code: str, diagnostics: str, expression: str | None = None) -> FhirError:
    """What a FHIR server answers: an HTTP status and an OperationOutcome."""
    outcome = operation_outcome([Issue(code, diagnostics, expression)])
    return FhirError(f"The embedded store answered HTTP {status}: {diagnostics}", status, outcome)


def bad_search(diagnostics: str) -> FhirError:
    return refused(400, "invalid", diagnostics)


@dataclass(frozen=True, slots=True)
class Param:
    kind: str
    paths: tuple[tuple[str, ...], ...]
    target: str | None = None  # a reference parameter that only means this type (`patient`)
    # Few resources share a value (identifiers, references, urls): the query starts from the matches.
    # Otherwise (status, code, ...) each candidate is probed, so a `_lastUpdated` scan can stop at `_count`.
    selective: bool = False


def _p(kind: str, *paths: str, target: str | None = None, selective: bool = False) -> Param:
    return Param(kind, tuple(tuple(p.split(".")) for p in paths), target, selective or kind == REFERENCE)


_IDENTIFIER, _STATUS = _p(TOKEN, "identifier", selective=True), _p(TOKEN, "status")
_CANONICAL = {"identifier": _IDENTIFIER, "status": _STATUS, "url": _p(URI, "url", selective=True),
              "version": _p(TOKEN, "version")}
# The FHIR R4 parameters the plugin searches on (and will), per type; _id and _lastUpdated are columns.
PARAMS: dict[str, dict[str, Param]] = {
    "Patient": {"identifier": _IDENTIFIER},
    "Device": {"identifier": _IDENTIFIER, "status": _STATUS},
    "Observation": {"identifier": _IDENTIFIER, "status": _STATUS, "code": _p(TOKEN, "code"),
                    "subject": _p(REFERENCE, "subject"), "patient": _p(REFERENCE, "subject", target="Patient"),
                    "date": _p(DATE, "effectiveDateTime", "effectiveInstant", "effectivePeriod")},
    "Task": {"identifier": _IDENTIFIER, "status": _STATUS, "code": _p(TOKEN, "code"),
             "subject": _p(REFERENCE, "for"), "patient": _p(REFERENCE, "for", target="Patient"),
             "focus": _p(REFERENCE, "focus")},
    "QuestionnaireResponse": {"identifier": _IDENTIFIER, "status": _STATUS, "subject": _p(REFERENCE, "subject"),
                              "patient": _p(REFERENCE, "subject", target="Patient"),
                              "questionnaire": _p(URI, "questionnaire"), "authored": _p(DATE, "authored")},
    "Provenance": {"target": _p(REFERENCE, "target"), "patient": _p(REFERENCE, "target", target="Patient")},
    "Questionnaire": _CANONICAL,
    "CodeSystem": _CANONICAL,
    "StructureDefinition": _CANONICAL,
    "OperationDefinition": _CANONICAL,
}
COMMON = {"_tag": _p(TOKEN, "meta.tag", selective=True)}


def params_of(resource_type: str) -> dict[str, Param]:
    return {**COMMON, **PARAMS.get(resource_type, {})}


# -- what a resource is indexed under ------------------------------------------------


def index_rows(resource: dict) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(param, system, value) tokens and (param, low, high) dates to index a resource under."""
    tokens: list[tuple[str, str, str]] = []
    dates: list[tuple[str, str, str]] = []
    for name, param in params_of(resource["resourceType"]).items():
        for leaf in (leaf for path in param.paths for leaf in _leaves(resource, path)):
            if param.kind == DATE:
                span = _date_leaf(leaf)
                if span:
                    dates.append((name, *span))
            else:
                tokens.extend((name, system, value) for system, value in _token_leaf(param, leaf))
    return tokens, dates


def _leaves(node: Any, path: tuple[str, ...]) -> list[Any]:
    if not path:
        return node if isinstance(node, list) else [node]
    if isinstance(node, list):
        return [leaf for item in node for leaf in _leaves(item, path)]
    return _leaves(node[path[0]], path[1:]) if isinstance(node, dict) and path[0] in node else []


def _token_leaf(param: Param, leaf: Any) -> list[tuple[str, str]]:
    if param.kind == REFERENCE:
        found = literal_reference(leaf.get("reference")) if isinstance(leaf, dict) else None
        return [found] if found and param.target in (None, found[0]) else []
    if isinstance(leaf, str):  # code, uri, canonical: a versioned canonical matches its bare url too
        return [("", leaf), ("", leaf.split("|")[0])] if param.kind == URI and "|" in leaf else [("", leaf)]
    if not isinstance(leaf, dict):
        return []
    if "coding" in leaf:
        return [pair for coding in leaf["coding"] for pair in _token_leaf(param, coding)]
    value = leaf.get("code", leaf.get("value"))  # a Coding, or an Identifier
    return [(leaf.get("system") or "", value)] if isinstance(value, str) else []


def _date_leaf(leaf: Any) -> tuple[str, str] | None:
    if isinstance(leaf, dict):  # a Period
        start = date_range(leaf["start"]) if isinstance(leaf.get("start"), str) else None
        end = date_range(leaf["end"]) if isinstance(leaf.get("end"), str) else None
        return (start[0] if start else "", end[1] if end else "~") if start or end else None
    return date_range(leaf) if isinstance(leaf, str) else None


def literal_reference(reference: Any) -> tuple[str, str] | None:
    """(type, id) of a relative literal reference `Type/id[/_history/n]`; None for anything else."""
    if not isinstance(reference, str) or ":" in reference or reference.startswith("#"):
        return None
    found = REFERENCE_SHAPE.fullmatch(reference)
    return (found[1], found[2]) if found else None


# -- a query ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sort:
    key: str  # SQL over `r`
    descending: bool


@dataclass(slots=True)
class Query:
    resource_type: str
    pairs: list[tuple[str, str]]  # what was asked, without the cursor: for the `next` link
    where: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)
    sort: Sort | None = None
    count: int = DEFAULT_COUNT
    summary: bool = False
    accurate_total: bool = False  # `_total=accurate`; otherwise a total only when it costs nothing
    cursor: tuple[Any, int] | None = None


def parse_query(resource_type: str, pairs: list[tuple[str, str]]) -> Query:
    """The SQL a FHIR search becomes; FhirError 400 for anything this store does not understand."""
    query = Query(resource_type, [(k, v) for k, v in pairs if k != "_cursor"])
    known = params_of(resource_type)
    for name, value in pairs:
        if name in CONTROL:
            _control(query, name, value, known)
        elif ":" in name or "." in name:
            raise bad_search(f"Search modifiers and chains are not supported by the embedded store: {name}.")
        elif not value:
            continue  # as HAPI does (the plugin sends `identifier=&_count=0` when it has no keys to look up)
        elif name == "_id":
            ids = [unescape(part) for part in split_escaped(value, ",")]
            query.where.append(f"r.id IN ({','.join('?' * len(ids))})")
            query.args.extend(ids)
        elif name == "_lastUpdated":
            sql, args = _date_tests(name, value, "r.last_updated", "r.last_updated")
            query.where.append(f"({sql})")
            query.args.extend(args)
        elif name in known:
            _param_filter(query, name, value, known[name])
        else:
            valid = ", ".join(sorted({"_id", "_lastUpdated", *known}))
            raise bad_search(f"Unknown search parameter {name} for resource type {resource_type}. "
                             f"Valid search parameters for this search are: {valid}.")
    return query


def _control(query: Query, name: str, value: str, known: dict[str, Param]) -> None:
    if name == "_count":
        if not value.isdigit():
            raise bad_search("_count must be a whole number.")
        query.count = min(int(value), MAX_COUNT)
    elif name == "_summary":
        if value not in ("count", "false"):
            raise bad_search("_summary is supported as count or false only.")
        query.summary = value == "count"
    elif name == "_sort":
        query.sort = _sort(value, known)
    elif name == "_total":
        if value not in ("none", "estimate", "accurate"):
            raise bad_search("_total is none, estimate or accurate.")
        query.accurate_total = value == "accurate"
    else:
        query.cursor = _read_cursor(value)


def _sort(value: str, known: dict[str, Param]) -> Sort:
    descending, key = value.startswith("-"), value.removeprefix("-")
    if key in ("_lastUpdated", "_id"):
        return Sort(f"r.{'last_updated' if key == '_lastUpdated' else 'id'}", descending)
    param = known.get(key)
    if param and param.kind == DATE:  # a missing date sorts last either way; key is one of ours, not input
        missing = "''" if descending else "'~'"
        return Sort(f"coalesce((SELECT min(d.low) FROM dates d WHERE d.pid = r.pid AND d.param = '{key}'), "
                    f"{missing})", descending)
    raise bad_search("_sort is supported on _lastUpdated, _id and date parameters, one key, optionally with -.")


def _param_filter(query: Query, name: str, value: str, param: Param) -> None:
    if param.kind == DATE:
        sql, args = _date_tests(name, value, "d.low", "d.high")
        query.where.append(f"EXISTS (SELECT 1 FROM dates d WHERE d.pid = r.pid AND d.param = ? AND ({sql}))")
        query.args.extend([name, *args])
        return
    alternatives = _alternatives([_token_value(param, name, part) for part in split_escaped(value, ",")])
    if param.selective:  # an index lookup per value, then the matches by pid
        selects = [f"SELECT t.pid FROM tokens t WHERE t.type = ? AND t.param = ? AND {sql}" for sql, _ in alternatives]
        query.where.append(f"r.pid IN ({' UNION '.join(selects)})")
        for _, values in alternatives:
            query.args.extend([query.resource_type, name, *values])
    else:  # a probe per candidate resource
        tests = " OR ".join(f"({sql})" for sql, _ in alternatives)
        query.where.append(f"EXISTS (SELECT 1 FROM tokens t WHERE t.pid = r.pid AND t.param = ? AND ({tests}))")
        query.args.extend([name, *(x for _, values in alternatives for x in values)])


def _alternatives(wanted: list[tuple[str | None, str | None]]) -> list[tuple[str, list[str]]]:
    """SQL (and its arguments) matching any of the (system, value) pairs: one IN list per system, so a search
    for hundreds of identifiers stays one index lookup per system (SQLite allows 500 UNION terms)."""
    by_system: dict[str | None, list[str]] = {}
    for system, code in wanted:
        if code is not None:
            by_system.setdefault(system, []).append(code)
    found = [(f"t.value IN ({','.join('?' * len(codes))})" + (" AND t.system = ?" if system is not None else ""),
              codes + ([system] if system is not None else [])) for system, codes in by_system.items()]
    return found + [("t.system = ?", [system]) for system, code in wanted if code is None and system is not None]


def _token_value(param: Param, name: str, text: str) -> tuple[str | None, str | None]:
    """(system, value) to match; None matches anything."""
    if param.kind == REFERENCE:
        if ID.fullmatch(text):
            return param.target, text
        found = REFERENCE_SHAPE.fullmatch(text)  # Type/id, or an absolute URL ending in it
        if not found or param.target not in (None, found[1]):
            raise bad_search(f"The {name} parameter needs a reference Type/id or an id.")
        return found[1], found[2]
    if param.kind == URI:
        return None, unescape(text)
    parts = [unescape(part) for part in split_escaped(text, "|")]
    if len(parts) == 1:
        return None, parts[0]
    if len(parts) > 2:
        raise bad_search(f"The {name} parameter takes system|code, system|, |code or code.")
    return parts[0], parts[1] or None


def _date_tests(name: str, value: str, lo: str, hi: str) -> tuple[str, list[str]]:
    """SQL testing a target range [lo, hi] against each comma-separated value (OR), and its arguments."""
    tests, args = [], []
    for part in split_escaped(value, ","):
        prefix, text = (part[:2], part[2:]) if part[:2] in DATE_TESTS else ("eq", part)
        span = date_range(text)
        if span is None:
            raise bad_search(f"The {name} parameter needs a FHIR date, dateTime or instant, after an optional "
                             f"prefix ({', '.join(DATE_TESTS)}).")
        sql, bounds = DATE_TESTS[prefix]
        tests.append(sql.format(lo=lo, hi=hi))
        args.extend(span[b] for b in bounds)
    return " OR ".join(tests), args


def split_escaped(text: str, separator: str) -> list[str]:
    """Splits a search value on separators not escaped with a backslash; the parts keep their escapes."""
    if "\\" not in text:
        return text.split(separator)
    parts, current, escaped = [], [], False
    for char in text:
        if char == separator and not escaped:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
        escaped = char == "\\" and not escaped
    parts.append("".join(current))
    return parts


def unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


# -- running it -----------------------------------------------------------------------


def make_cursor(key: Any, pid: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([key, pid])).decode()


def _read_cursor(value: str) -> tuple[Any, int]:
    try:
        key, pid = orjson.loads(base64.urlsafe_b64decode(value.encode()))
    except (ValueError, TypeError):
        raise bad_search("The _cursor parameter is not one this store made.") from None
    if not isinstance(pid, int):
        raise bad_search("The _cursor parameter is not one this store made.")
    return key, pid


def _where(query: Query, with_cursor: bool) -> tuple[str, list[Any]]:
    # With a selective filter, `+` keeps SQLite from walking every resource of the type by its index:
    # the filter's few pids are looked up instead, so a conditional create costs the same in a full store.
    by_pid = any(w.startswith("r.pid IN") for w in query.where)
    where, args = ["+r.type = ?" if by_pid else "r.type = ?", *query.where], [query.resource_type, *query.args]
    if with_cursor and query.cursor:
        key, pid = query.cursor
        if query.sort:
            where.append(f"({query.sort.key}, r.pid) {'<' if query.sort.descending else '>'} (?, ?)")
            args += [key, pid]
        else:
            where.append("r.pid > ?")
            args.append(pid)
    return " AND ".join(where), args


def page(conn: sqlite3.Connection, query: Query) -> tuple[list[tuple[int, str, Any]], bool]:
    """(pid, json, sort key) of one page in order, and whether more follow (keyset paging on the sort key, pid)."""
    where, args = _where(query, with_cursor=True)
    key, order = "NULL", "r.pid"
    if query.sort:
        direction = "DESC" if query.sort.descending else "ASC"
        key, order = query.sort.key, f"{query.sort.key} {direction}, r.pid {direction}"
    sql = f"SELECT r.pid, r.json, {key} FROM resources r WHERE {where} ORDER BY {order} LIMIT ?"
    rows = conn.execute(sql, [*args, query.count + 1]).fetchall()
    return rows[:query.count], len(rows) > query.count


def total(conn: sqlite3.Connection, query: Query) -> int:
    where, args = _where(query, with_cursor=False)
    return conn.execute(f"SELECT count(*) FROM resources r WHERE {where}", args).fetchone()[0]


def matching_ids(conn: sqlite3.Connection, resource_type: str, pairs: list[tuple[str, str]], what: str) -> list[str]:
    """Ids of up to two resources a conditional create or update matches (two: enough to refuse it)."""
    query = parse_query(resource_type, pairs)
    if not query.where:
        raise bad_search(f"The {what} has no search parameters to match on.")
    where, args = _where(query, with_cursor=False)
    return [row[0] for row in conn.execute(f"SELECT r.id FROM resources r WHERE {where} LIMIT 2", args)]
