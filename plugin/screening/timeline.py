"""FHIR dates on the timeline: the instants a date, dateTime or instant covers, in UTC.

Every date the service reads (a response's `authored`, a prefetched
result's `effectiveDateTime`, feedback's `outcomeTimestamp`, the embedded
store's date index) goes through `date_range`. A value at the calendar's
edge whose zone takes it off the timeline (`0001-01-01T00:00:00+14:00` is
in year 0 in UTC, `9999-12-31T23:59:59-12:00` in year 10000) has no range:
the caller refuses it (400) or ignores it, and never crashes on it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

DATE_SHAPE = re.compile(r"(\d{4})(?:-(\d\d)(?:-(\d\d)(?:T(\d\d):(\d\d)(?::(\d\d)(?:\.(\d+))?)?"
                        r"(Z|[+-]\d\d:\d\d)?)?)?)?")


LAST_INSTANT = "9999-12-31T23:59:59.999Z"


def instant(moment: datetime) -> str:
    """FHIR instant in UTC with milliseconds: fixed width, so instants sort and compare as text."""
    m = moment.astimezone(UTC)  # by hand: strftime does not pad years before 1000 to four digits
    return (f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}."
            f"{m.microsecond // 1000:03d}Z")


def date_range(text: str) -> tuple[str, str] | None:
    """The instants a FHIR date, dateTime or instant covers, at its precision; None if it is not one."""
    found = DATE_SHAPE.fullmatch(text)
    low = _first(found) if found else None
    if low is None:
        return None
    _, month, day, hour, _, second, fraction, _ = found.groups()  # type: ignore[union-attr]
    start = instant(low)
    try:
        return start, instant(_end(low, month, day, hour, second, fraction))
    except (ValueError, OverflowError):  # a period that ends with the calendar (9999, 9999-12-31)
        return (start, LAST_INSTANT) if start <= LAST_INSTANT else None


def _first(found: re.Match) -> datetime | None:
    """The first instant of a matched value, in its own zone; None when it is not on the timeline in UTC."""
    year, month, day, hour, minute, second, fraction, zone = found.groups()
    try:
        zone_info = _zone(zone) if hour else UTC
        low = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                       int(second or 0), int((fraction or "0")[:3].ljust(3, "0")) * 1000, zone_info)
        low.astimezone(UTC)  # e.g. 0001-01-01T00:00:00+14:00: before the first instant in UTC
    except (ValueError, OverflowError):
        return None
    return low


def _zone(zone: str | None) -> timezone:
    if not zone or zone == "Z":
        return UTC  # a time without a zone is taken as UTC, the store's own
    hours, minutes = int(zone[1:3]), int(zone[4:6])
    offset = timedelta(hours=hours, minutes=minutes)
    return timezone(-offset if zone[0] == "-" else offset)


def _end(low: datetime, month: str | None, day: str | None, hour: str | None, second: str | None,
         fraction: str | None) -> datetime:
    """The last millisecond of the period a value of this precision names."""
    if not month:
        following = low.replace(year=low.year + 1)
    elif not day:
        following = (low.replace(day=28) + timedelta(days=4)).replace(day=1)
    elif not hour:
        following = low + timedelta(days=1)
    elif not second:
        following = low + timedelta(minutes=1)
    else:
        following = low + (timedelta(milliseconds=1) if fraction else timedelta(seconds=1))
    return following - timedelta(milliseconds=1)


def on_timeline(text: object) -> bool:
    """Whether a FHIR date, dateTime or instant names instants that exist in UTC."""
    # date_range without formatting the two instants: every response's `authored` is asked this.
    found = DATE_SHAPE.fullmatch(text) if isinstance(text, str) else None
    return found is not None and _first(found) is not None
