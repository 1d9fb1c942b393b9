"""Size of the result Bundles over the clinical test cases (issue #17), and where the bytes go.

Run from the repository root (not collected by pytest):

    python -m tests.bench_size [--case NAME]

Scores every hand-worked case in tests/screening/clinical_cases.yaml (with the
strategy it names) and every example in questionnaires/examples/*.json (default
strategy) with a fixed clock, and prints the median / min / max size of the
compact-JSON transaction Bundle, its ratio to the figures measured on main before
the Bundles were made smaller (BASELINE), the bytes by part, and the floor: how
small a Bundle could be with no words in it at all. Responses that write nothing
(in-progress) are left out. `tests/screening/test_bundle_size.py` asserts the
median ceiling and that no part went missing.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import orjson
import yaml

from plugin.screening.pipeline import Outcome, Screener, Settings
from tests.factory import BASDAI, SCREENING, response

ROOT = Path(__file__).resolve().parent.parent
CASES_FILE = ROOT / "tests" / "screening" / "clinical_cases.yaml"
EXAMPLES = ROOT / "questionnaires" / "examples"
NOW = datetime(2026, 12, 3, 9, 4, 27, 379000, tzinfo=UTC)
TARGET_MEDIAN = 12_000  # bytes, compact JSON: issue #17's target, out of reach without losing content (see below)
CEILING_MEDIAN = 29_000  # bytes: what the slimmed Bundles stay under (test_bundle_size guards it)
# Measured on main before issue #17 (bytes, compact JSON, 117 Bundles).
BASELINE = {"median": 35_897, "min": 7_077, "max": 42_012}

# Observation elements grouped into the parts the profile reports.
OBSERVATION_PARTS = {
    "component": "obs.components", "text": "obs.narrative", "method": "obs.method",
    "meta": "obs.meta/identifier/category", "identifier": "obs.meta/identifier/category",
    "category": "obs.meta/identifier/category", "code": "obs.code",
    "interpretation": "obs.value/interpretation", "dataAbsentReason": "obs.value/interpretation",
    "subject": "obs.references", "encounter": "obs.references", "device": "obs.references",
    "derivedFrom": "obs.references", "hasMember": "obs.references",
    "effectiveDateTime": "obs.times", "issued": "obs.times",
}
RESOURCE_PARTS = {"QuestionnaireResponse": "response", "Device": "device", "Task": "task", "Provenance": "provenance"}


@cache
def screener(strategy: str | None) -> Screener:
    return Screener(Settings(strategy=strategy), clock=lambda: NOW)


def cases() -> Iterator[tuple[str, str | None, dict]]:
    """(name, strategy, response) of every clinical test case, as the tests build them."""
    for case in yaml.safe_load(CASES_FILE.read_text(encoding="utf-8")):
        url = BASDAI if case.get("questionnaire") == "basdai" else SCREENING
        version = str(case["version"]) if "version" in case else None
        yield case["name"], case.get("strategy"), response(dict(case["answers"]), url=url, version=version)
    for path in sorted(EXAMPLES.glob("*.json")):
        yield path.stem, None, orjson.loads(path.read_bytes())


def outcomes() -> Iterator[tuple[str, Outcome]]:
    """(name, Outcome) of every case that writes something."""
    for name, strategy, qr in cases():
        outcome = screener(strategy).process(qr)
        if outcome.bundle.get("entry"):
            yield name, outcome


def size(node: object) -> int:
    return len(orjson.dumps(node))


def _member(key: str, value: object) -> int:
    """Bytes of `"key":value,` inside an object."""
    return len(key) + 4 + size(value)


def profile(bundle: dict) -> Counter[str]:
    """Bytes of the compact Bundle by part; the parts add up to its size."""
    parts: Counter[str] = Counter()
    entries = bundle["entry"]
    parts["entry overhead"] = size(bundle) - sum(size(e["resource"]) for e in entries)
    for entry in entries:
        resource = entry["resource"]
        kind = resource["resourceType"]
        if kind != "Observation":
            parts[RESOURCE_PARTS[kind]] += size(resource)
            continue
        rest = size(resource)
        for key, value in resource.items():
            part = OBSERVATION_PARTS.get(key) or ("obs.value/interpretation" if key.startswith("value") else None)
            if part:
                parts[part] += _member(key, value)
                rest -= _member(key, value)
        parts["obs.other"] += rest
    return parts


def report(rows: Sequence[tuple[str, int, Counter[str]]]) -> str:
    sizes = [s for _, s, _ in rows]
    median = statistics.median(sizes)
    lines = [
        f"{len(rows)} Bundles (compact JSON): median {median:,.0f} B, min {min(sizes):,} B, max {max(sizes):,} B",
        f"baseline (main): median {BASELINE['median']:,} B, min {BASELINE['min']:,} B, max {BASELINE['max']:,} B",
        f"ratio to baseline: median {median / BASELINE['median']:.2f}, min {min(sizes) / BASELINE['min']:.2f}, "
        f"max {max(sizes) / BASELINE['max']:.2f}   (target: median <= {TARGET_MEDIAN:,} B)",
        "", "| part | mean B per Bundle | share |", "|---|---:|---:|",
    ]
    total: Counter[str] = Counter()
    for _, _, parts in rows:
        total.update(parts)
    for part, n in total.most_common():
        lines.append(f"| {part} | {n / len(rows):,.0f} | {n / sum(sizes):.1%} |")
    return "\n".join(lines)


def _without_words(node: object) -> object:
    """The Bundle with every narrative, display, text and method left out: no Bundle keeping its content is smaller."""
    if isinstance(node, dict):
        return {k: _without_words(v) for k, v in node.items() if k not in ("display", "text", "method")}
    if isinstance(node, list):
        return [_without_words(v) for v in node]
    return node


def floor(bundles: Sequence[dict]) -> str:
    """How small the Bundles could get: the median with no human-readable words at all, and then also
    without the response and the components (the parts that must stay, SCREENING.md §4)."""
    bare = [_without_words(b) for b in bundles]
    medians = [statistics.median(size(b) for b in bare)]
    for b in bare:
        for e in b["entry"]:
            e["resource"].pop("component", None)
        b["entry"] = [e for e in b["entry"] if e["resource"]["resourceType"] != "QuestionnaireResponse"]
    medians.append(statistics.median(size(b) for b in bare))
    return (f"floor: median {medians[0]:,.0f} B with no narrative, display, text or method at all; "
            f"{medians[1]:,.0f} B without the response and the components as well")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="also print the profile of this one case (name or example file stem)")
    args = parser.parse_args(argv)
    found = list(outcomes())
    rows = [(name, size(o.bundle), profile(o.bundle)) for name, o in found]
    print(report(rows))
    print("\n" + floor([o.bundle for _, o in found]))
    for name, n, parts in rows:
        if name == args.case:
            print(f"\n{name}: {n:,} B")
            print("\n".join(f"  {part}: {b:,}" for part, b in parts.most_common()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
