"""Every card field built from data is escaped for Markdown (issue #14 item 8), and odd shapes never crash.

A prefetched Task comes from the CDS Client, so its `authoredOn`,
`description`, `code.text` and `priority` are data, not trusted text.
"""

from __future__ import annotations

import copy
import re

import pytest

from tests.ehr.test_cds_hooks import (  # noqa: F401 (fixtures)
    call,
    cards_of,
    example,
    hook,
    ingest,
    jwks,
    keys,
    make_client,
    prefetched,
)

HOSTILE_TEXT = {
    "link": "[open](https://evil.example/steal)",
    "image": "![x](https://evil.example/pixel.png)",
    "html": "<img src=x onerror=alert(1)><script>alert(1)</script>",
    "autolink": "see https://evil.example/steal or www.evil.example",
    "angle autolink": "<https://evil.example>",
    "reference link": "[a][1]\n\n[1]: https://evil.example",
    "list and heading": "- one\n# Heading",
    "entity": "&lt;script&gt;",
    "emphasis and code": "**loud** `code` ~~gone~~",
}
LINK = re.compile(r"(?<!\\)\]\(|(?<!\\)<[a-z/!]|(?<![\\\u2060])://|(?<!\\)!\[|^\s*\[\d+\]:", re.M)


def hostile_tasks(prefetch: dict, text: str) -> dict:
    changed = copy.deepcopy(prefetch)
    for entry in changed["tasks"]["entry"]:
        task = entry["resource"]
        task["authoredOn"] = text
        task["description"] = text
        task["code"]["text"] = text
    return changed


@pytest.mark.parametrize("name", sorted(HOSTILE_TEXT))
def test_task_fields_in_a_card_are_escaped(make_client, keys, tmp_path, name):  # noqa: F811
    with make_client() as client:
        ingest(client, example("qr-emergency.json", "Patient/p1"))
        prefetch = hostile_tasks(prefetched(tmp_path / "store.sqlite3", "p1"), HOSTILE_TEXT[name])
        cards = cards_of(client, keys, hook(prefetch=prefetch))
    assert cards
    for card in cards:
        assert not LINK.search(card["detail"]), card["detail"]
        assert "\n#" not in card["detail"] and "\n- one" not in card["detail"]
        assert len(card["summary"]) < 140


@pytest.mark.parametrize("odd", [
    {"authoredOn": 20261120}, {"authoredOn": None}, {"authoredOn": "[x](y)"}, {"description": {"x": 1}},
    {"description": 7}, {"priority": {"x": 1}}, {"priority": ["stat"]}, {"code": {"text": ["x"], "coding": None}},
    {"reasonReference": "Observation/1"}, {"reasonReference": {"reference": 5}}, {"focus": 5},
    {"focus": {"reference": ["x"]}}, {"for": "Patient/p1"},
])
def test_task_fields_of_the_wrong_type_make_no_500(make_client, keys, tmp_path, odd):  # noqa: F811
    with make_client() as client:
        ingest(client, example("qr-emergency.json", "Patient/p1"))
        prefetch = copy.deepcopy(prefetched(tmp_path / "store.sqlite3", "p1"))
        for entry in prefetch["tasks"]["entry"]:
            entry["resource"].update(copy.deepcopy(odd))
        answer = call(client, keys, hook(prefetch=prefetch))
    assert answer.status_code < 500, (odd, answer.text)
