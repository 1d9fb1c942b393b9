"""Settings of a scoring run; every one has a safe default."""

from __future__ import annotations

from dataclasses import dataclass

MAX_BODY_BYTES = 1024 * 1024  # 1 MiB: a screening response is ~3 kB


@dataclass(frozen=True, slots=True)
class Settings:
    strategy: str | None = None  # referral strategy option; None = the rule set's default
    max_body_bytes: int = MAX_BODY_BYTES
