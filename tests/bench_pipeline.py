"""Benchmark of the hot path: QR bytes in, transaction Bundle bytes out, on one core.

Run from the repository root (not collected by pytest):

    python -m tests.bench_pipeline [--n 5000] [--json out.json]

Over the same N seeded-random QuestionnaireResponses (about 2.4 kB of JSON
each), best of 3 repetitions after a warm-up (timed in interleaved chunks), it times

  (a) the floor: orjson.loads of the QR + orjson.dumps of that QR's output
      Bundle, built beforehand (no work but reading and writing equal sizes);
  (b) our pipeline: Screener.process_body + orjson.dumps, and each stage on
      its own (parse, check, score, build, serialize);
  (c) a naive pipeline through fhir.resources (R4B) models, on every 50th QR;
  (d) the same rules as FHIRPath with fhirpathpy, on every 20th QR;

prints a markdown table and the headline ratios, and checks the targets:
(b) at least 10,000 QR/s and at most 5x the floor.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import random
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from plugin.screening import data
from plugin.screening.parsing import parse_body
from plugin.screening.pipeline import Screener
from plugin.screening.questionnaire import ItemSpec
from plugin.screening.scoring import score
from tests import factory

TARGET_QR_PER_S = 10_000
TARGET_FLOOR_RATIO = 5.0
BUSY_LOAD = 0.5  # 1-minute load average above which other work may have shared our CPU
SEED = 20261121
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
STIFFNESS_MINUTES = (0, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180)


@dataclass(slots=True)
class Row:
    """One line of the table: seconds per QR over `qrs` responses."""

    stage: str
    seconds: float
    qrs: int
    floor: float = math.nan

    @property
    def us_per_qr(self) -> float:
        return self.seconds * 1e6

    @property
    def qr_per_s(self) -> float:
        return 1 / self.seconds

    @property
    def ratio(self) -> float:
        return self.seconds / self.floor

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "us_per_qr": self.us_per_qr, "qr_per_s": self.qr_per_s, "ratio_to_floor": self.ratio}


# -- inputs ----------------------------------------------------------------------


def random_answers(rng: random.Random, items: dict[str, ItemSpec]) -> dict[str, Any]:
    """Plausible answers: red flags rare, clinician items often not filled in, a few items skipped."""
    skip = rng.choice((0.0, 0.05, 0.1, 0.2, 0.3))
    age = rng.randint(18, 80)
    answers: dict[str, Any] = {}
    skips = {"clinician": 0.7, "red-flags": skip / 5}  # lab results often not in yet; red flags seldom skipped
    for link_id, spec in items.items():
        if spec.answer_key is None or rng.random() < skips.get(spec.parent or "", skip):
            continue
        if spec.type == "boolean":
            answers[link_id] = rng.random() < (0.02 if spec.parent == "red-flags" else 0.45)
        elif link_id == "age":
            answers[link_id] = age
        elif link_id == "onset-age":
            answers[link_id] = rng.randint(max(10, age - 40), age)
        elif link_id == "morning-stiffness-minutes":
            answers[link_id] = rng.choice(STIFFNESS_MINUTES)
        elif spec.type == "integer":
            answers[link_id] = rng.randint(int(spec.minimum or 0), int(spec.maximum or 100))
        elif spec.type == "choice":
            answers[link_id] = rng.choice(sorted(spec.codes or {}))
    return factory.drop_disabled(answers, items)


def random_response(rng: random.Random, items: dict[str, ItemSpec]) -> dict:
    """A QR as a portal would send it: a random id, subject and authored time, and random answers."""

    def ident() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    authored = (EPOCH + timedelta(seconds=rng.randrange(300 * 86400))).isoformat().replace("+00:00", "Z")
    return factory.response(
        random_answers(rng, items),
        status="amended" if rng.random() < 0.05 else "completed",
        id=ident(),
        subject={"reference": f"Patient/{ident()}"},
        authored=authored,
    )


def make_bodies(screener: Screener, n: int, seed: int) -> list[bytes]:
    """N seeded-random screening QRs as JSON bytes."""
    rng = random.Random(seed)
    items = screener.questionnaires[factory.SCREENING].items
    return [orjson.dumps(random_response(rng, items)) for _ in range(n)]


# -- timing ----------------------------------------------------------------------


Run = Callable[[int, int], object]  # runs the measured work over QRs [lo, hi)


def best_of(runs: dict[str, Run], count: int, repeat: int, chunks: int = 10) -> dict[str, float]:
    """Seconds per QR of each run over `count` QRs, the best of `repeat` repetitions.

    The QRs are timed in chunks and each chunk's best time counts, and every
    run takes its turn on a chunk before the next: a burst of load from
    elsewhere on the machine then spoils one chunk of one repetition, not a
    whole figure, and cannot skew one figure against another.
    """
    chunks = max(1, min(chunks, count))
    bounds = [(count * i // chunks, count * (i + 1) // chunks) for i in range(chunks)]
    best = {name: [math.inf] * chunks for name in runs}
    for _ in range(repeat):
        gc.collect()
        for i, (lo, hi) in enumerate(bounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run(lo, hi)
                best[name][i] = min(best[name][i], time.perf_counter() - start)
    return {name: sum(times) / count for name, times in best.items()}


def each(fn: Callable[..., object], inputs: Sequence[tuple]) -> Run:
    """A run that calls fn on each tuple of arguments and drops the results, as the pipeline does."""

    def run(lo: int, hi: int) -> None:
        for args in inputs[lo:hi]:
            fn(*args)

    return run


def progress(text: str) -> None:
    """What is being measured, on stderr so the table on stdout stays clean."""
    print(text, file=sys.stderr, flush=True)


def measure_ours(screener: Screener, bodies: Sequence[bytes], repeat: int) -> tuple[Row, Row, list[Row]]:
    """(a) the floor, (b) the pipeline, and (b) stage by stage."""
    dumps, loads = orjson.dumps, orjson.loads
    process_body, check, clock = screener.process_body, screener.check, screener.clock
    strategy, limit = screener.settings.strategy, screener.settings.max_body_bytes
    outputs = [screener.process_body(b).bundle for b in bodies]
    parsed = [parse_body(b, None, limit) for b in bodies]
    checked = [check(qr) for qr in parsed]
    rule_sets = [screener.rule_sets[q.url] for q, _ in checked]
    builders = [screener.builders[q.url] for q, _ in checked]
    scored = [score(r, facts, strategy) for r, (_, facts) in zip(rule_sets, checked)]
    built = [b.build(qr, s, clock()) for b, qr, s in zip(builders, parsed, scored)]

    def floor(lo: int, hi: int) -> None:
        for body, out in zip(bodies[lo:hi], outputs[lo:hi]):
            loads(body)
            dumps(out)

    def pipeline(lo: int, hi: int) -> None:
        for body in bodies[lo:hi]:
            dumps(process_body(body).bundle)

    stages = {
        "parse (`parse_body`)": each(parse_body, [(b, None, limit) for b in bodies]),
        "check (`Screener.check`)": each(check, [(qr,) for qr in parsed]),
        "score (`scoring.score`)": each(score, [(r, f, strategy) for r, (_, f) in zip(rule_sets, checked)]),
        "build (`BundleBuilder.build`)": each(lambda builder, qr, s: builder.build(qr, s, clock()),
                                              list(zip(builders, parsed, scored))),
        "serialize (`orjson.dumps`)": each(dumps, [(b,) for b in built]),
    }
    gc.collect()
    gc.freeze()  # the prepared inputs are not scanned by every collection while we time
    n = len(bodies)
    floor(0, n), pipeline(0, n)  # warm-up
    progress(f"(a) floor and (b) pipeline on {n} QRs, best of {repeat}")
    floor_name = "(a) floor: `orjson.loads` + `orjson.dumps` of an equal-size Bundle"
    pipeline_name = "(b) pipeline: `process_body` + `orjson.dumps`"
    runs = {floor_name: floor, pipeline_name: pipeline, **{f"(b) · {k}": v for k, v in stages.items()}}
    rows = [Row(name, seconds, n) for name, seconds in best_of(runs, n, repeat).items()]
    gc.unfreeze()
    return rows[0], rows[1], rows[2:]


def model_facts(model: Any) -> dict[str, Any]:
    """linkId -> first answer's value (a coding's code), walking the R4B model's nested items."""
    facts: dict[str, Any] = {}

    def walk(items: Sequence[Any] | None) -> None:
        for item in items or ():
            if item.answer:
                answer = item.answer[0]
                if answer.valueCoding is not None:
                    facts[item.linkId] = answer.valueCoding.code
                elif answer.valueBoolean is not None:
                    facts[item.linkId] = answer.valueBoolean
                elif answer.valueInteger is not None:
                    facts[item.linkId] = answer.valueInteger
                elif answer.valueDecimal is not None:
                    facts[item.linkId] = float(answer.valueDecimal)
            walk(item.item)

    walk(model.item)
    return facts


def measure_models(screener: Screener, bodies: Sequence[bytes], repeat: int) -> tuple[Row, list[Row]]:
    """(c) parse, score and build through fhir.resources R4B models, whole and by stage."""
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse

    strategy, clock = screener.settings.strategy, screener.clock

    def rules_of(model: Any) -> tuple[Any, Any]:
        url = model.questionnaire.partition("|")[0]
        return screener.rule_sets[url], screener.builders[url]

    def bundle_of(model: Any, scores: Any) -> dict:
        qr = model.model_dump(mode="json", by_alias=True, exclude_none=True)  # the QR entry of the Bundle
        return rules_of(model)[1].build(qr, scores, clock())

    def naive(body: bytes) -> str:
        model = QuestionnaireResponse.model_validate_json(body)
        scores = score(rules_of(model)[0], model_facts(model), strategy)
        return Bundle.model_validate(bundle_of(model, scores)).model_dump_json()

    n = len(bodies)
    for body in bodies[:3]:
        naive(body)  # warm-up: pydantic builds its validators lazily
    models = [QuestionnaireResponse.model_validate_json(b) for b in bodies]
    scored = [score(rules_of(m)[0], model_facts(m), strategy) for m in models]
    dicts = [bundle_of(m, s) for m, s in zip(models, scored)]
    bundles = [Bundle.model_validate(d) for d in dicts]
    stages = {
        "`QuestionnaireResponse.model_validate_json`": each(QuestionnaireResponse.model_validate_json,
                                                            [(b,) for b in bodies]),
        "walk the model + `scoring.score`": each(lambda m: score(rules_of(m)[0], model_facts(m), strategy),
                                                 [(m,) for m in models]),
        "`model_dump` of the QR + `BundleBuilder.build`": each(bundle_of, list(zip(models, scored))),
        "`Bundle.model_validate`": each(Bundle.model_validate, [(d,) for d in dicts]),
        "`Bundle.model_dump_json`": each(lambda bundle: bundle.model_dump_json(), [(b,) for b in bundles]),
    }
    progress(f"(c) fhir.resources models on {n} QRs, best of {repeat}")
    runs = {"(c) naive pipeline through fhir.resources (R4B) models": each(naive, [(b,) for b in bodies]),
            **{f"(c) · {k}": v for k, v in stages.items()}}
    rows = [Row(name, seconds, n) for name, seconds in best_of(runs, n, repeat).items()]
    return rows[0], rows[1:]


def measure_fhirpath(rules: dict, bodies: Sequence[bytes], repeat: int) -> Row:
    """(d) every criterion, condition and applies_when as FHIRPath, compiled once, run on each QR."""
    import fhirpathpy
    from fhirpathpy.models import models

    from tests.fhirpath_rules import RuleTranslator

    translator = RuleTranslator(rules)
    expressions = [*translator.criteria.values(), *translator.conditions.values(), *translator.applies.values()]
    compiled = [fhirpathpy.compile(e, models["r4"]) for e in expressions]
    loads = orjson.loads

    def run(lo: int, hi: int) -> None:
        for body in bodies[lo:hi]:
            qr = loads(body)
            for evaluate in compiled:
                evaluate(qr)

    n = len(bodies)
    for evaluate in compiled:
        evaluate(loads(bodies[0]))  # warm-up
    progress(f"(d) {len(compiled)} FHIRPath expressions on {n} QRs, best of {repeat}")
    name = f"(d) the rules as {len(compiled)} FHIRPath expressions (`fhirpathpy`)"
    return Row(name, best_of({name: run}, n, repeat)[name], n)


# -- report ----------------------------------------------------------------------


def table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table."""
    lines = ["| stage | QRs | µs per QR | QR/s | ratio to (a) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r.stage} | {r.qrs:,} | {r.us_per_qr:,.1f} | {r.qr_per_s:,.0f} | {r.ratio:,.2f} |" for r in rows]
    return "\n".join(lines)


def idlest_cpu(allowed: set[int], seconds: float = 0.3) -> int:
    """The allowed CPU with the most idle time over a short look at /proc/stat (the last one if unreadable)."""

    def idle() -> dict[int, int]:
        found = {}
        with open("/proc/stat") as stat:
            for line in stat:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit():
                    found[int(name[3:])] = int(fields[3]) + int(fields[4])  # idle + iowait
        return found

    try:
        before = idle()
        time.sleep(seconds)
        after = idle()
    except (OSError, ValueError, IndexError):
        return max(allowed)
    return max(sorted(allowed), key=lambda cpu: (after.get(cpu, 0) - before.get(cpu, 0), cpu))


def pin_to_one_cpu(cpu: int | None) -> int | None:
    """Pins this process to one CPU (the idlest allowed one unless told); None where not supported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    chosen = cpu if cpu is not None else idlest_cpu(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {chosen})
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    """Measures (a) to (d), prints the table, ratios and target checks; 1 on a missed target with --strict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="number of QRs (default 5000)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; the best counts (default 3)")
    parser.add_argument("--cpu", type=int, help="the CPU to pin to (default: the idlest one allowed)")
    parser.add_argument("--models-every", type=int, default=50, help="(c) runs on every k-th QR (default 50)")
    parser.add_argument("--fhirpath-every", type=int, default=20, help="(d) runs on every k-th QR (default 20)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args(argv)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan  # before we add to it
    cpu = pin_to_one_cpu(args.cpu)
    screener = Screener()
    rules = next(raw for raw in data.rule_files() if raw["questionnaire"] == factory.SCREENING)
    bodies = make_bodies(screener, args.n, args.seed)
    qr_bytes = sum(map(len, bodies)) / len(bodies)
    bundle_bytes = sum(len(orjson.dumps(screener.process_body(b).bundle)) for b in bodies) / len(bodies)

    a, b, b_parts = measure_ours(screener, bodies, args.repeat)
    c, c_parts = measure_models(screener, bodies[:: args.models_every], args.repeat)
    d = measure_fhirpath(rules, bodies[:: args.fhirpath_every], args.repeat)
    rows = [a, b, *b_parts, c, *c_parts, d]
    for row in rows:
        row.floor = a.seconds
    ratios = {"b_over_a": b.seconds / a.seconds, "c_over_b": c.seconds / b.seconds, "d_over_b": d.seconds / b.seconds}
    targets = {
        f"(b) >= {TARGET_QR_PER_S:,} QR/s on one core": (b.qr_per_s >= TARGET_QR_PER_S, f"{b.qr_per_s:,.0f} QR/s"),
        f"(b) <= {TARGET_FLOOR_RATIO:g}x (a)": (ratios["b_over_a"] <= TARGET_FLOOR_RATIO, f"{ratios['b_over_a']:.2f}x"),
    }

    print(f"\n{args.n:,} QRs, mean {qr_bytes:,.0f} B in, {bundle_bytes:,.0f} B out; CPU {cpu}; "
          f"Python {platform.python_version()}; best of {args.repeat}; load average at start {load:.2f}\n")
    if load > BUSY_LOAD:
        print(f"Note: the machine was busy at the start (load {load:.2f}); the figures may be high. "
              "Rerun when it is idle.\n")
    print(table(rows))
    print(f"\n(b)/(a) = {ratios['b_over_a']:.2f}   (c)/(b) = {ratios['c_over_b']:.1f}   "
          f"(d)/(b) = {ratios['d_over_b']:.1f}\n")
    for name, (ok, got) in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name} (got {got})")
    if args.json:
        figures = {
            "n": args.n, "repeat": args.repeat, "seed": args.seed, "cpu": cpu,
            "python": platform.python_version(), "machine": platform.machine(),
            "load_average": load, "qr_bytes_mean": qr_bytes, "bundle_bytes_mean": bundle_bytes,
            "rows": [r.as_dict() for r in rows], "ratios": ratios,
            "targets": {name: {"pass": ok, "got": got} for name, (ok, got) in targets.items()},
        }
        with open(args.json, "wb") as out:
            out.write(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    return 1 if args.strict and not all(ok for ok, _ in targets.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
