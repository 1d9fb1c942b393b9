"""Property tests of the three-valued logic (SCREENING.md §2) and of the pipeline's robustness.

Responses are drawn over the screening items as the Questionnaire defines them
(types, answer codes, minValue/maxValue, enableWhen): each item is either
absent or a valid answer, and the two night sub-items are answered only when
`night-pain` is true. A "completion" fills every unanswered item except the
clinician ones (an unanswered clinician item is a test not done, not a
missing answer, §2) with valid values, again respecting enableWhen.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import yaml
from fhir.resources.R4B.operationoutcome import OperationOutcome
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from plugin.screening.outcome import InvalidInput
from plugin.screening.pipeline import Screener, Settings
from plugin.screening.scoring import Scores
from plugin.screening.systems import ANSWERS
from tests.factory import SCREENING, questionnaire, response

ROOT = Path(__file__).resolve().parents[2]
MAPPING = yaml.safe_load((ROOT / "mappings" / "back-pain-screening.yaml").read_text(encoding="utf-8"))

MODEST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The robustness properties run with a fixed seed so that a regression fails
# them deterministically, never by the luck of the draw.
ROBUST = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow])

SCREENERS = {"asas-2015": Screener(), "nice-ng65": Screener(Settings(strategy="nice-ng65"))}
DEFAULT = SCREENERS["asas-2015"]

COUNT_INSTRUMENTS = ("asas-ibp", "berlin-ibp", "spa-features", "mechanical-pattern")
THRESHOLD_INSTRUMENTS = ("asas-ibp", "berlin-ibp")  # those with a positive / negative reading

STRATEGY_RESULT = {"asas-2015": "referral-asas-2015", "nice-ng65": "referral-nice-ng65"}

# SCREENING.md §3.E
EMERGENCY_FLAGS = ("rf-saddle-numbness", "rf-bladder-bowel", "rf-leg-weakness")
URGENT_FLAGS = ("rf-fever", "rf-immunosuppression", "rf-weight-loss", "rf-cancer-history",
                "rf-night-pain-unrelieved", "rf-trauma")
FLAG_ITEMS = EMERGENCY_FLAGS + URGENT_FLAGS
OLD_ONSET = 50  # new onset at 50 or over is an urgent flag
CHRONIC = ("3m-1y", "1y-5y", "gt-5y")  # §3


# --------------------------------------------------------------------------- the Questionnaire


def _items() -> dict[str, dict]:
    found: dict[str, dict] = {}

    def walk(items: list[dict], group: str | None) -> None:
        for item in items:
            if item["type"] == "group":
                walk(item.get("item", []), item["linkId"])
            else:
                found[item["linkId"]] = {**item, "group": group}

    walk(questionnaire(SCREENING)["item"], None)
    return found


ITEMS = _items()
LINK_IDS = tuple(ITEMS)
CLINICIAN = tuple(k for k, v in ITEMS.items() if v["group"] == "clinician")
MIN_VALUE = "http://hl7.org/fhir/StructureDefinition/minValue"
MAX_VALUE = "http://hl7.org/fhir/StructureDefinition/maxValue"


def _bounds(item: dict) -> tuple[int, int]:
    ext = {e["url"]: e for e in item.get("extension", [])}
    return ext[MIN_VALUE]["valueInteger"], ext[MAX_VALUE]["valueInteger"]


def _domain(link_id: str) -> list:
    item = ITEMS[link_id]
    if item["type"] == "boolean":
        return [True, False]
    if item["type"] == "choice":
        return [o["valueCoding"]["code"] for o in item["answerOption"]]
    lo, hi = _bounds(item)
    return list(range(lo, hi + 1))


DOMAINS = {k: _domain(k) for k in LINK_IDS}
# the thresholds the rules use, so that boundaries are drawn often
INTERESTING_INTEGERS = (0, 1, 29, 30, 31, 34, 35, 39, 40, 44, 45, 49, 50, 51, 120)


def value_of(link_id: str, lean: int = 5) -> st.SearchStrategy:
    """A valid answer; booleans are true `lean` times in 10, so that rarer decisions come up."""
    item = ITEMS[link_id]
    if item["type"] == "boolean":
        return st.booleans() if lean == 5 else st.sampled_from([True] * lean + [False] * (10 - lean))
    if item["type"] == "choice":
        return st.sampled_from(DOMAINS[link_id])
    lo, hi = _bounds(item)
    edges = [v for v in INTERESTING_INTEGERS if lo <= v <= hi] + [hi]
    young = st.integers(lo, min(hi, 44))  # the axSpA pathway needs onset before 45
    return st.one_of(st.integers(lo, hi), st.sampled_from(edges), young, young)


def enabled(link_id: str, answers: dict[str, Any]) -> bool:
    """FHIR enableWhen (only `=` is used by this Questionnaire): an unanswered question disables."""
    conditions = ITEMS[link_id].get("enableWhen", [])
    if not conditions:
        return True
    results = []
    for c in conditions:
        assert c["operator"] == "=", c
        (key, wanted), = ((k, v) for k, v in c.items() if k.startswith("answer"))
        wanted = wanted["code"] if key == "answerCoding" else wanted
        results.append(answers.get(c["question"]) is not None and answers.get(c["question"]) == wanted)
    return all(results) if ITEMS[link_id].get("enableBehavior", "all") == "all" else any(results)


def only_enabled(answers: dict[str, Any]) -> dict[str, Any]:
    """Drops answers to disabled items (in Questionnaire order, so controllers come first)."""
    out = {k: v for k, v in answers.items() if v is not None}
    for link_id in LINK_IDS:
        if link_id in out and not enabled(link_id, out):
            del out[link_id]
    return out


def _example_answers() -> list[dict[str, Any]]:
    found = []
    for path in sorted((ROOT / "questionnaires" / "examples").glob("qr-*.json")):
        qr = orjson.loads(path.read_bytes())
        if qr.get("questionnaire", "").split("|")[0] == SCREENING:
            found.append(DEFAULT.check(qr)[1])
    return found


EXAMPLE_ANSWERS = _example_answers()


@st.composite
def answer_sets(draw: Callable) -> dict[str, Any]:
    """Valid answers to the screening: each item absent or a valid value, enableWhen respected.

    Either drawn item by item, or one of the hand-made examples with some answers taken away.
    """
    if draw(st.integers(0, 3)) == 0:
        values = dict(draw(st.sampled_from(EXAMPLE_ANSWERS)))
    else:
        lean = draw(st.sampled_from([5, 1, 2, 3, 7, 9]))
        values = {k: draw(value_of(k, lean)) for k in LINK_IDS}
        if draw(st.booleans()):  # "no red flags" is the case that lets the axSpA decision through
            values.update(dict.fromkeys(FLAG_ITEMS, False))
        if draw(st.booleans()):  # chronic, onset before 45: the axSpA pathway applies (§3.F)
            values["pain-duration"] = draw(st.sampled_from(CHRONIC))
            values["onset-age"] = draw(st.integers(0, 44))
    missing = draw(st.sampled_from(["none", "few", "few", "each", "each", "any", "most"]))
    if missing == "none":
        dropped: set[str] = set()
    elif missing == "few":
        dropped = draw(st.sets(st.sampled_from(LINK_IDS), min_size=1, max_size=4))
    elif missing == "each":  # every item left out with the same small chance
        one_in = draw(st.sampled_from([4, 8]))
        dropped = {k for k in LINK_IDS if draw(st.integers(1, one_in)) == 1}
    elif missing == "any":
        dropped = draw(st.sets(st.sampled_from(LINK_IDS)))
    else:
        dropped = set(LINK_IDS) - draw(st.sets(st.sampled_from(LINK_IDS), max_size=8))
    return only_enabled({k: v for k, v in values.items() if k not in dropped})


def completion(answers: dict[str, Any]) -> st.SearchStrategy:
    """Every way of filling in the missing (non-clinician) answers, enableWhen respected."""
    missing = [k for k in LINK_IDS if k not in answers and k not in CLINICIAN]
    return st.fixed_dictionaries({k: value_of(k) for k in missing}).map(lambda fill: only_enabled({**fill,
                                                                                                   **answers}))


def is_complete(answers: dict[str, Any]) -> bool:
    return all(k in answers for k in LINK_IDS if k not in CLINICIAN and enabled(k, answers))


def scores(answers: dict[str, Any], strategy: str = "asas-2015") -> Scores:
    outcome = SCREENERS[strategy].process(response(answers))
    assert outcome.scores is not None
    return outcome.scores


TRUTH_RANK = {False: 0, None: 1, True: 2}


# --------------------------------------------------------------------------- the generator itself


@MODEST
@given(answer_sets())
def test_generated_responses_are_accepted_and_read_back(answers):
    _, facts = DEFAULT.check(response(answers))
    assert facts == answers


# --------------------------------------------------------------------------- monotonicity

_TESTS: dict[str, Callable[[Any, Any], bool]] = {
    "is": lambda v, ref: v == ref,
    "lt": lambda v, ref: v < ref,
    "le": lambda v, ref: v <= ref,
    "gt": lambda v, ref: v > ref,
    "ge": lambda v, ref: v >= ref,
    "in": lambda v, ref: v in ref,
    "not_in": lambda v, ref: v not in ref,
}


def _mentions(rule: Any) -> set[str]:
    if isinstance(rule, dict):
        found = {rule["item"]} if "item" in rule else set()
        for value in rule.values():
            found |= _mentions(value)
        return found
    if isinstance(rule, list):
        return set().union(*(_mentions(r) for r in rule)) if rule else set()
    return set()


def _single_item_criteria() -> list[tuple[str, int, str, tuple, tuple, bool]]:
    """(instrument, criterion index, item, values making it true, values making it false, alone)."""
    found = []
    for result in MAPPING["results"]:
        if result["code"] not in COUNT_INSTRUMENTS:
            continue
        criteria = result["criteria"]
        for index, criterion in enumerate(criteria):
            rule = criterion["rule"]
            if "item" not in rule or len(rule) != 2:
                continue
            item = rule["item"]
            if ITEMS[item].get("enableWhen") or any(
                c["question"] == item for other in ITEMS.values() for c in other.get("enableWhen", [])
            ):
                continue  # changing it would change which items may be answered
            (op, ref), = ((k, v) for k, v in rule.items() if k != "item")
            true = tuple(v for v in DOMAINS[item] if _TESTS[op](v, ref))
            false = tuple(v for v in DOMAINS[item] if not _TESTS[op](v, ref))
            alone = not any(item in _mentions(c["rule"]) for j, c in enumerate(criteria) if j != index)
            found.append((result["code"], index, item, true, false, alone))
    return found


SINGLE_ITEM_CRITERIA = _single_item_criteria()


def test_every_count_instrument_has_single_item_criteria():
    assert {c[0] for c in SINGLE_ITEM_CRITERIA} == set(COUNT_INSTRUMENTS)
    assert all(c[3] for c in SINGLE_ITEM_CRITERIA), "every criterion can be made true"
    # the ones SCREENING.md §3 names
    names = {(c[0], c[2]) for c in SINGLE_ITEM_CRITERIA}
    assert {("asas-ibp", "onset-age"), ("asas-ibp", "better-with-rest"), ("berlin-ibp", "buttock-pain"),
            ("berlin-ibp", "morning-stiffness-minutes"), ("spa-features", "hla-b27"),
            ("mechanical-pattern", "leg-pain-below-knee")} <= names


@MODEST
@given(answer_sets(), st.sampled_from(SINGLE_ITEM_CRITERIA), st.data())
def test_known_true_count_never_drops_when_a_criterion_becomes_true(answers, criterion, data):
    code, index, item, true_values, false_values, alone = criterion
    before_value = data.draw(st.one_of(st.none(), st.sampled_from(false_values)) if false_values else st.none())
    after_value = data.draw(st.sampled_from(true_values))
    before = only_enabled({**answers, item: before_value})
    after = only_enabled({**answers, item: after_value})
    for strategy in SCREENERS:
        rb = scores(before, strategy).results[code]
        ra = scores(after, strategy).results[code]
        assert rb.criteria[index] is not True
        assert ra.criteria[index] is True
        assert ra.value >= rb.value, (code, item, before_value, after_value)
        if alone:
            assert ra.value == rb.value + 1
        assert TRUTH_RANK[ra.truth] >= TRUTH_RANK[rb.truth]
        for also_b, also_a in zip(rb.also, ra.also):
            assert TRUTH_RANK[also_a] >= TRUTH_RANK[also_b]
        if code == "asas-ibp":  # ASAS-IBP positive is itself an SpA feature
            sb = scores(before, strategy).results["spa-features"]
            sa = scores(after, strategy).results["spa-features"]
            assert sa.value >= sb.value


@MODEST
@given(answer_sets())
def test_count_reads_agree_with_the_k_of_n_rule(answers):
    """§2: positive at known-true >= k, negative when known-true + unknown < k, else indeterminate."""
    result_specs = {r["code"]: r for r in MAPPING["results"]}
    s = scores(answers)
    for code in THRESHOLD_INSTRUMENTS:
        r = s.results[code]
        k = result_specs[code]["positive_at_least"]
        true, unknown = r.criteria.count(True), r.criteria.count(None)
        assert r.value == true
        if r.applies is True:
            expected = True if true >= k else False if true + unknown < k else None
            assert r.truth is expected


# --------------------------------------------------------------------------- no false negative


COMPLETIONS = 6


@MODEST
@given(answer_sets(), st.data())
def test_no_false_negative_under_any_completion(answers, data):
    base = {strategy: scores(answers, strategy) for strategy in SCREENERS}
    fills = [data.draw(completion(answers)) for _ in range(COMPLETIONS)]
    for fill in fills:
        assert is_complete(fill)
        for strategy, before in base.items():
            after = scores(fill, strategy)
            for code in COUNT_INSTRUMENTS:
                rb, ra = before.results[code], after.results[code]
                known_true, unknown = rb.criteria.count(True), rb.criteria.count(None)
                # what is known stays known; the count can only grow into the unknowns
                assert known_true <= ra.value <= known_true + unknown, (code, answers, fill)
                for cb, ca in zip(rb.criteria, ra.criteria):
                    if cb is not None:
                        assert ca is cb, (code, answers, fill)
                if rb.truth is False:
                    assert ra.truth is False, (code, answers, fill)  # never POS (nor IND) once NEG
                if rb.truth is True:
                    assert ra.truth is True, (code, answers, fill)
            for code in (f"referral-{strategy}", "screening-outcome"):  # each strategy writes its own
                decided = before.results[code].value
                if decided == "indeterminate":
                    continue
                now = after.results[code].value
                if code == "screening-outcome" and decided == "urgent-assessment":
                    # §4: the outcome names the most severe flag *known* to be present; an unanswered
                    # cauda-equina flag may still raise it to emergency, never lower it.
                    assert now in ("urgent-assessment", "emergency-assessment"), (answers, fill)
                else:
                    assert now == decided, (strategy, code, answers, fill)
            # the outcome label is the screening-outcome decision
            assert base[strategy].outcome_label() == base[strategy].results["screening-outcome"].value


@FEW
@given(answer_sets())
def test_complete_responses_are_never_indeterminate(answers):
    """With every (enabled, non-clinician) item answered, nothing is left to decide."""
    fill = only_enabled({**{k: DOMAINS[k][0] for k in LINK_IDS if k not in CLINICIAN}, **answers})
    assert is_complete(fill)
    for strategy in SCREENERS:
        s = scores(fill, strategy)
        for code in (f"referral-{strategy}", "screening-outcome"):  # each strategy writes its own
            assert s.results[code].value != "indeterminate", (strategy, code, fill)
        for code in COUNT_INSTRUMENTS:
            assert None not in s.results[code].criteria, (code, fill)


@FEW
@given(answer_sets())
def test_night_sub_criteria_are_false_not_unknown_when_night_pain_is_false(answers):
    answers = only_enabled({**answers, "night-pain": False})
    s = scores(answers)
    night_asas = s.results["asas-ibp"].criteria[4]
    night_berlin = s.results["berlin-ibp"].criteria[2]
    assert night_asas is False
    assert night_berlin is False


# --------------------------------------------------------------------------- red flags


@MODEST
@given(answer_sets())
def test_red_flags(answers):
    flag_true = [k for k in FLAG_ITEMS if answers.get(k) is True]
    old_onset = answers.get("onset-age") is not None and answers["onset-age"] >= OLD_ONSET
    emergency = any(answers.get(k) is True for k in EMERGENCY_FLAGS)
    unanswered = [k for k in FLAG_ITEMS if k not in answers] + ([] if "onset-age" in answers else ["onset-age"])
    for strategy in SCREENERS:
        s = scores(answers, strategy)
        red = s.results["red-flags"]
        label = s.outcome_label()
        if red.value is False:
            assert all(answers.get(k) is False for k in FLAG_ITEMS), answers
            assert "onset-age" in answers and answers["onset-age"] < OLD_ONSET, answers
        if flag_true or old_onset:
            assert red.value is True
            assert label == ("emergency-assessment" if emergency else "urgent-assessment"), answers
        elif unanswered:
            assert red.value is None
            assert label == "indeterminate", answers  # one cannot say "no red flags"
        else:
            assert red.value is False
            # no red flag: the outcome is the selected strategy's decision
            assert label == s.results[STRATEGY_RESULT[strategy]].value
        if emergency:
            assert label == "emergency-assessment"


@FEW
@given(answer_sets(), st.sampled_from(EMERGENCY_FLAGS), st.sampled_from(URGENT_FLAGS))
def test_emergency_takes_precedence_over_urgent(answers, emergency_flag, urgent_flag):
    answers = {**answers, emergency_flag: True, urgent_flag: True}
    for strategy in SCREENERS:
        assert scores(answers, strategy).outcome_label() == "emergency-assessment"


@FEW
@given(answer_sets(), st.sampled_from(URGENT_FLAGS))
def test_urgent_flag_without_emergency_flag(answers, urgent_flag):
    answers = {**answers, urgent_flag: True, **dict.fromkeys(EMERGENCY_FLAGS, False)}
    for strategy in SCREENERS:
        assert scores(answers, strategy).outcome_label() == "urgent-assessment"


# --------------------------------------------------------------------------- robustness

ISSUE_TYPES = frozenset({
    "invalid", "structure", "required", "value", "invariant", "security", "login", "unknown", "expired",
    "forbidden", "suppressed", "processing", "not-supported", "duplicate", "multiple-matches", "not-found",
    "deleted", "too-long", "code-invalid", "extension", "too-costly", "business-rule", "conflict", "transient",
    "lock-error", "no-store", "exception", "timeout", "incomplete", "throttled", "informational",
})

VOCABULARY = (
    "resourceType", "QuestionnaireResponse", "questionnaire", SCREENING, SCREENING + "|1.0.0", "status",
    "completed", "in-progress", "amended", "subject", "reference", "Patient/example", "item", "linkId",
    "answer", "valueBoolean", "valueInteger", "valueCoding", "valueString", "valueDecimal", "system", "code",
    "authored", "2026-11-20T09:30:00Z", "id", "identifier", "value", "encounter", "text", *LINK_IDS,
    *{c for d in DOMAINS.values() for c in d if isinstance(c, str)}, "pain", "history", "clinician", "red-flags",
)
# JSON numbers the JSON codec can write back (see test_integer_beyond_64_bits_* for bigger ones)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20), st.sampled_from(VOCABULARY),
)
keys = st.one_of(st.sampled_from(VOCABULARY), st.text(max_size=12))
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(keys, children, max_size=6)),
    max_leaves=30,
)


def _check_never_raises_else(screener: Screener, qr: Any) -> None:
    """process(qr) and process_body(json) either succeed or raise a well-formed InvalidInput."""
    attempts: list[Callable[[], Any]] = [lambda: screener.process(copy.deepcopy(qr))]
    try:
        body = orjson.dumps(qr)
    except TypeError:
        body = None
    if body is not None:
        attempts.append(lambda: screener.process_body(body, "application/fhir+json"))
        attempts.append(lambda: screener.process_body(body))
    for attempt in attempts:
        try:
            outcome = attempt()
        except InvalidInput as error:
            _check_outcome(error)
        else:
            assert outcome.bundle["resourceType"] == "Bundle"
            orjson.dumps(outcome.bundle)  # what was built can be written


def _check_outcome(error: InvalidInput) -> None:
    oo = error.to_fhir()
    OperationOutcome.model_validate(oo)
    assert oo["issue"]
    assert len(oo["issue"]) <= 100
    for issue in oo["issue"]:
        assert issue["code"] in ISSUE_TYPES
        assert issue["severity"] in ("fatal", "error", "warning", "information")
    assert isinstance(error.status, int) and 400 <= error.status < 500
    summary = error.summary()
    assert summary.endswith(".") and "\n" not in summary


@ROBUST
@given(json_values)
def test_pipeline_only_raises_invalid_input_on_arbitrary_json(value):
    _check_never_raises_else(DEFAULT, value)


@ROBUST
@given(st.dictionaries(keys, json_values, max_size=8))
@example({"status": []})
def test_pipeline_only_raises_invalid_input_on_arbitrary_qr_like_objects(extra):
    qr = {"resourceType": "QuestionnaireResponse", "questionnaire": SCREENING, "status": "completed",
          "subject": {"reference": "Patient/example"}, **extra}
    _check_never_raises_else(DEFAULT, qr)


def _paths(value: Any, path: tuple = ()) -> list[tuple]:
    """Every place inside a JSON value, as a path of keys / indexes."""
    found = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*path, i))
    return found


def _mutate(qr: Any, data: st.DataObject) -> Any:
    paths = _paths(qr)
    path = data.draw(st.sampled_from(paths[1:] or paths))
    if not path:
        return data.draw(json_values)
    parent = qr
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    op = data.draw(st.sampled_from(["replace", "delete", "rename", "duplicate", "insert"]))
    if op == "replace":
        parent[last] = data.draw(json_values)
    elif op == "delete":
        del parent[last]
    elif op == "rename" and isinstance(parent, dict):
        parent[data.draw(keys)] = parent.pop(last)
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(last, copy.deepcopy(parent[last]))
    elif op == "insert" and isinstance(parent, list):
        parent.insert(data.draw(st.integers(0, len(parent))), data.draw(json_values))
    elif isinstance(parent, dict):
        parent[data.draw(keys)] = data.draw(json_values)
    return qr


@ROBUST
@given(answer_sets(), st.integers(1, 4), st.data())
def test_pipeline_only_raises_invalid_input_on_mutated_responses(answers, mutations, data):
    qr = response(answers)
    for _ in range(mutations):
        qr = _mutate(qr, data)
    for screener in SCREENERS.values():
        _check_never_raises_else(screener, qr)


EXAMPLE_FILES = sorted((ROOT / "questionnaires" / "examples").glob("qr-*.json"))


@ROBUST
@given(st.sampled_from(EXAMPLE_FILES), st.integers(1, 3), st.data())
def test_pipeline_only_raises_invalid_input_on_mutated_examples(path, mutations, data):
    qr = orjson.loads(path.read_bytes())
    for _ in range(mutations):
        qr = _mutate(qr, data)
    _check_never_raises_else(DEFAULT, qr)


@ROBUST
@given(st.binary(max_size=200), st.sampled_from(["application/fhir+json", "application/fhir+xml", None]))
def test_pipeline_only_raises_invalid_input_on_arbitrary_bytes(body, content_type):
    try:
        DEFAULT.process_body(body, content_type)
    except InvalidInput as error:
        _check_outcome(error)


def _expected_fact(link_id: str, value: Any) -> Any:
    """The fact a valid answer value gives (None if the value is not a valid answer), from the Questionnaire."""
    item = ITEMS[link_id]
    if item["type"] == "boolean":
        return value if type(value) is bool else None
    if item["type"] == "integer":
        lo, hi = _bounds(item)
        return value if type(value) is int and lo <= value <= hi else None
    options = {o["valueCoding"]["code"]: o["valueCoding"].get("system") for o in item["answerOption"]}
    if type(value) is not dict or type(value.get("code")) is not str or value["code"] not in options:
        return None
    return value["code"] if value.get("system", options[value["code"]]) == options[value["code"]] else None


ANSWER_KEY = {"boolean": "valueBoolean", "integer": "valueInteger", "choice": "valueCoding"}
SYSTEMS = (ANSWERS, ANSWERS + "/", "http://snomed.info/sct", "")
codings = st.fixed_dictionaries(
    {"code": st.one_of(st.sampled_from(sorted({c for d in DOMAINS.values() for c in d if isinstance(c, str)})),
                       scalars)},
    optional={"system": st.sampled_from(SYSTEMS), "display": st.text(max_size=10)},
)
answer_values = st.one_of(scalars, st.integers(-5, 1500), codings, st.sampled_from([True, False, 0, 1, 1.0, "true"]))


def _valid_value(link_id: str) -> st.SearchStrategy:
    if ITEMS[link_id]["type"] != "choice":
        return value_of(link_id)
    return st.builds(lambda code, system, display: {"code": code, **system, **display},
                     st.sampled_from(DOMAINS[link_id]), st.sampled_from([{}, {"system": ANSWERS}]),
                     st.sampled_from([{}, {"display": "Shown text"}]))


@ROBUST
@given(st.sampled_from(LINK_IDS), st.data(), st.sampled_from(["right", "right", "right", "other", "extra"]))
def test_checker_accepts_exactly_the_valid_answers(link_id, data, key_choice):
    """A single answer is accepted iff its value is valid for the item (type, range, code, system)."""
    value = data.draw(st.one_of(_valid_value(link_id), answer_values))
    key = ANSWER_KEY[ITEMS[link_id]["type"]]
    if key_choice == "other":
        key = next(k for k in ANSWER_KEY.values() if k != key)
    answer = {key: value} | ({"valueString": "x"} if key_choice == "extra" else {})
    answers = {"night-pain": True} if ITEMS[link_id].get("enableWhen") else {}
    qr = response(answers)
    group = ITEMS[link_id]["group"]
    groups = {g["linkId"]: g for g in qr["item"]}
    if group not in groups:
        groups[group] = {"linkId": group, "item": []}
        qr["item"].append(groups[group])
    groups[group]["item"].append({"linkId": link_id, "answer": [answer]})
    expected = _expected_fact(link_id, value) if key_choice == "right" else None
    try:
        _, facts = DEFAULT.check(qr)
    except InvalidInput as error:
        _check_outcome(error)
        assert expected is None, (link_id, answer, error.issues)
        assert len(error.issues) == 1
        assert error.issues[0].expression.startswith(f"QuestionnaireResponse.item[{qr['item'].index(groups[group])}]")
    else:
        assert expected is not None, (link_id, answer, facts)
        assert facts[link_id] == expected and type(facts[link_id]) is type(expected)


def test_integer_beyond_64_bits_in_an_unchecked_element():
    qr = response({"pain-duration": "1y-5y"}, extension=[{"url": "http://example.org/x", "valueInteger64": 2**64}])
    try:
        DEFAULT.process(qr)
    except InvalidInput as error:
        _check_outcome(error)


def test_lone_surrogate_in_an_unchecked_element():
    qr = response({"pain-duration": "1y-5y"}, text={"status": "generated", "div": "x"}, language="en\ud800")
    try:
        DEFAULT.process(qr)
    except InvalidInput as error:
        _check_outcome(error)
