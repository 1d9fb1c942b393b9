"""Reads the red flags of a response that cannot be scored as a whole (SCREENING.md §7).

A patient who ticked "numbness in the saddle area" and then closed the portal,
or whose response is refused for an unrelated mistake (an age of 200, an
unknown code elsewhere), has still reported a red flag: it must reach a
clinician. This reads every answer that is itself well-formed, wherever it
sits in the item tree, and ignores the rest; the red-flag rules are then
evaluated on those answers as on any others.
"""

from __future__ import annotations

from typing import Any

from plugin.screening.questionnaire import SLOW, CompiledQuestionnaire

MAX_NODES = 5000  # a response is ~50 items; a hostile body is not walked further than this


def lenient_facts(qr: dict, q: CompiledQuestionnaire) -> dict[str, Any]:
    """The well-formed answers of a response (linkId -> value), whatever else is wrong with it.

    An item given twice, or with several answers, counts as `true` if any of its answers is
    `true`: a reported red flag is never outweighed by a contradicting copy.
    """
    facts: dict[str, Any] = {}
    stack, seen = [qr.get("item")], 0
    while stack and seen < MAX_NODES:
        items = stack.pop()
        for item in items if isinstance(items, list) else []:
            seen += 1
            if not isinstance(item, dict):
                continue
            stack.append(item.get("item"))
            spec = q.items.get(item["linkId"]) if isinstance(item.get("linkId"), str) else None
            if spec is None or spec.accept is None or not isinstance(item.get("answer"), list):
                continue
            for answer in item["answer"]:
                value = spec.accept(answer.get(spec.answer_key)) if isinstance(answer, dict) else SLOW
                if value is not SLOW and facts.get(spec.link_id) is not True:
                    facts[spec.link_id] = value
    return facts
