"""Figures of the fault tests: each records what it measured; all are written to
tests/artifacts/fault-report.json and shown as a table at the end of the run."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parent / "artifacts" / "fault-report.json"
FIGURES: dict[str, dict] = {}


@pytest.fixture(scope="session")
def fault_report() -> Callable[..., None]:
    """`fault_report("scenario", submitted=500, lost=0, …)`: records one scenario's figures."""

    def record(scenario: str, **figures: object) -> None:
        FIGURES[scenario] = figures

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("fault injection: figures")
    for scenario, figures in FIGURES.items():
        line = ", ".join(f"{key} {value}" for key, value in figures.items())
        terminalreporter.write_line(f"{scenario}: {line}")
    try:
        REPORT.parent.mkdir(exist_ok=True)
        REPORT.write_text(json.dumps({"ci": bool(os.environ.get("CI")), "scenarios": FIGURES}, indent=2) + "\n")
        terminalreporter.write_line(f"(also in tests/artifacts/{REPORT.name})")
    except OSError as error:  # a read-only checkout: the figures above are all there is
        terminalreporter.write_line(f"(not saved: {error.strerror})")
