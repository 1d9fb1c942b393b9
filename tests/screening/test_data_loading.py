"""Loading the definitions and rules at start-up, quickly and without giving anything up.

Definitions that passed validation are remembered by digest in the user's cache; a changed one is
validated again, and refused if it is not valid FHIR R4. The mappings are read by libyaml's parser:
the same data as PyYAML's own. `on_timeline`, which skips formatting the instants, agrees with
`date_range`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from plugin.screening import data, timeline


@pytest.fixture
def definitions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of questionnaires/ to edit, and an empty cache; the process's own definitions afterwards."""
    copy = tmp_path / "questionnaires"
    shutil.copytree(data.questionnaires_dir(), copy)
    monkeypatch.setattr(data, "questionnaires_dir", lambda: copy)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_cache_validation", True)  # as `score` and `batch` ask
    data._published.cache_clear()
    yield copy
    data._published.cache_clear()


def test_valid_definitions_are_validated_once(definitions: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = data._published()
    assert len(list((definitions.parent / "cache" / "backpain-screen").glob("definitions-*.valid"))) == 1
    data._published.cache_clear()
    monkeypatch.setattr(data, "_validate", lambda *_: pytest.fail("validated again"))
    assert data._published() == first


def test_without_asking_nothing_is_written_and_every_start_validates(definitions: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The service (a read-only root filesystem in its image) never asks: it writes no marker."""
    monkeypatch.setattr(data, "_cache_validation", False)
    validated: list[str] = []
    monkeypatch.setattr(data, "_validate", lambda path, resource: validated.append(path.name))
    data._published()
    data._published.cache_clear()
    data._published()
    assert not (definitions.parent / "cache").exists()
    assert len(validated) == 2 * len(list(definitions.glob("*.json")))


def test_an_edited_definition_is_validated_again_and_refused(definitions: Path) -> None:
    data._published()
    data._published.cache_clear()
    path = next(definitions.glob("*.json"))
    resource = orjson.loads(path.read_bytes())
    resource["date"] = "the day before yesterday"
    path.write_bytes(orjson.dumps(resource))
    with pytest.raises(ValueError, match="is not a valid FHIR R4 resource"):
        data._published()


def test_no_cache_directory_still_validates(definitions: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (definitions.parent / "cache").write_text("a file where the directory would go")
    validated: list[str] = []
    monkeypatch.setattr(data, "_validate", lambda path, resource: validated.append(path.name))
    data._published()
    data._published.cache_clear()
    data._published()
    assert len(validated) == 2 * len(list(definitions.glob("*.json")))


def test_libyaml_reads_the_mappings_as_pyyaml_does() -> None:
    paths = [p for p in sorted(data.mappings_dir().glob("*.yaml")) if p.name not in data.REFERENCE_FILES]
    assert data.rule_files() == [yaml.safe_load(p.read_text(encoding="utf-8")) for p in paths]


EDGES = ["2026", "2026-02", "2026-02-29", "2024-02-29", "0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00-14:00",
         "9999-12-31T23:59:59-12:00", "9999-12-31T23:59:59+12:00", "9999", "2026-01-01T24:00:00Z",
         "2026-01-01T10:00:00.1234+99:00", "2026-01-01T10:00", "x", "", "0000-01-01", "2026-13-01"]


@pytest.mark.parametrize("text", EDGES)
def test_on_timeline_is_date_range_without_the_formatting(text: str) -> None:
    assert timeline.on_timeline(text) == (timeline.date_range(text) is not None)


@given(st.from_regex(timeline.DATE_SHAPE, fullmatch=True))
def test_on_timeline_agrees_with_date_range_on_any_date_shape(text: str) -> None:
    assert timeline.on_timeline(text) == (timeline.date_range(text) is not None)
