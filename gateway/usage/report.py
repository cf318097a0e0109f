"""Usage rows added up by hour, day, model or user, with totals: for the API and the CLI."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Final, Literal

import msgspec

from storage.usage import COUNTS, UsageRecord

GroupBy = Literal["hour", "day", "model", "user"]
GROUPS: Final = ("hour", "day", "model", "user")
DEFAULT_DAYS: Final = 7
# The longest range one question may cover (a year and a day).
MAX_RANGE: Final = timedelta(days=366)
_RELATIVE = re.compile(r"^(\d{1,4})([dh])$")


class RangeError(ValueError):
    """A time range or grouping that cannot be used; the message names the parameter."""


class Totals(msgspec.Struct, kw_only=True):
    requests: int = 0
    rejected: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    def add(self, record: UsageRecord | Totals) -> None:
        self.requests += record.requests
        self.rejected += record.rejected
        self.input_tokens += record.input_tokens
        self.output_tokens += record.output_tokens
        self.cache_creation_input_tokens += record.cache_creation_input_tokens
        self.cache_read_input_tokens += record.cache_read_input_tokens


class UsageRow(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One group: exactly one of hour, day, model, user names it (the others are left out)."""

    hour: datetime | None = None
    day: date | None = None
    model: str | None = None
    user: str | None = None
    requests: int
    rejected: int
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class UsageReport(msgspec.Struct, kw_only=True):
    rows: list[UsageRow]
    totals: Totals


def summarize(records: Iterable[UsageRecord], group_by: GroupBy) -> UsageReport:
    """Rows per group (in time order for hour and day, by name otherwise) and the totals."""
    groups: dict[object, Totals] = {}
    totals = Totals()
    for record in records:
        key: object
        if group_by == "hour":
            key = record.hour
        elif group_by == "day":
            key = record.hour.date()
        elif group_by == "model":
            key = record.model
        else:
            key = record.user_name
        group = groups.get(key)
        if group is None:
            group = groups[key] = Totals()
        group.add(record)
        totals.add(record)
    rows = [
        UsageRow(**{group_by: key}, **msgspec.structs.asdict(groups[key]))  # type: ignore[arg-type]
        for key in sorted(groups, key=str)
    ]
    return UsageReport(rows=rows, totals=totals)


def floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def default_range(now: datetime) -> tuple[datetime, datetime]:
    """The last 7 days: today (UTC) and the six before it, up to the end of this hour."""
    until = floor_hour(now) + timedelta(hours=1)
    since = until.replace(hour=0) - timedelta(days=DEFAULT_DAYS - 1)
    return since, until


def parse_instant(raw: str, name: str, *, up: bool = False) -> datetime:
    """An ISO-8601 date or date-time (UTC when it names no offset), to the hour below
    (``up``: the hour above, so a range's end takes in the hour it falls in)."""
    try:
        moment = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise RangeError(
            f"{name}: must be an ISO-8601 date or date-time (2026-11-01 or "
            f"2026-11-01T09:00:00Z), got {raw!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    hour = floor_hour(moment)
    return hour + timedelta(hours=1) if up and hour != moment else hour


def parse_since(raw: str, now: datetime, name: str = "since") -> datetime:
    """``7d``, ``24h`` (back from now, to the hour below) or an ISO-8601 date or date-time."""
    match = _RELATIVE.match(raw.strip())
    if match is None:
        return parse_instant(raw, name)
    amount, unit = int(match.group(1)), match.group(2)
    span = timedelta(days=amount) if unit == "d" else timedelta(hours=amount)
    return floor_hour(now - span)


def check_range(since: datetime, until: datetime, *, names: tuple[str, str]) -> None:
    if since >= until:
        raise RangeError(f"{names[0]}: must be before {names[1]}")
    if until - since > MAX_RANGE:
        raise RangeError(f"{names[0]}: the range may cover at most {MAX_RANGE.days} days")


def parse_group(raw: str, *, allowed: tuple[str, ...], name: str = "group_by") -> GroupBy:
    if raw not in allowed:
        raise RangeError(f"{name}: must be one of {', '.join(allowed)}, got {raw!r}")
    return raw  # type: ignore[return-value]


__all__ = ["COUNTS", "GROUPS", "UsageReport", "UsageRow", "summarize"]
