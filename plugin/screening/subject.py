"""Which patient a response is about: the one rule every path uses (checking, and reading red flags)."""

from __future__ import annotations

import re
from typing import Any

PATIENT_REF = re.compile(r"(.*/)?Patient/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?|urn:uuid:[0-9a-f\-]{36}")


def patient_of(qr: Any) -> str | None:
    """The Patient reference of a response's subject, or None when it names no patient we accept."""
    subject = qr.get("subject") if isinstance(qr, dict) else None
    ref = subject.get("reference") if isinstance(subject, dict) else None
    return ref if isinstance(ref, str) and PATIENT_REF.fullmatch(ref) else None
