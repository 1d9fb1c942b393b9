"""OperationOutcome: how every problem with a caller's input is reported."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem: FHIR issue-type `code`, a plain sentence, and where (FHIRPath)."""

    code: str
    diagnostics: str
    expression: str | None = None
    severity: str = "error"

    def to_fhir(self) -> dict:
        issue = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            issue["expression"] = [self.expression]
        return issue


class InvalidInput(Exception):
    """Raised with every problem found in one input, so callers can fix all at once."""

    def __init__(self, issues: list[Issue], status: int = 400) -> None:
        super().__init__(issues[0].diagnostics if issues else "invalid input")
        self.issues = issues
        self.status = status
        self.rescued: Any = None  # pipeline.Outcome: what the refused response's red flags call for

    def summary(self) -> str:
        """One plain sentence for a terminal or a log line (no answer values)."""
        first = self.issues[0].diagnostics.rstrip(".")
        more = len(self.issues) - 1
        return f"{first}." if not more else f"{first} (and {more} more problem{'s' * (more > 1)})."

    def to_fhir(self) -> dict:
        return operation_outcome(self.issues)


def operation_outcome(issues: list[Issue]) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


def invalid(code: str, diagnostics: str, expression: str | None = None, status: int = 400) -> InvalidInput:
    """Shorthand for the common case of a single problem."""
    return InvalidInput([Issue(code, diagnostics, expression)], status)


def model_issue(resource_type: str, error: Any, fields: set[str]) -> Issue:
    """A pydantic error as an Issue; fhir.resources locates some only by element name: a path only when real."""
    loc = error["loc"]
    path = resource_type + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    message = f"{str(error['msg']).rstrip('.')}."
    return Issue("structure", message, path if loc and loc[0] in fields else None)
