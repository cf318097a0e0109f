"""Token usage per user, UTC hour and model: the workers' additive upserts and the reads."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from piccolo.engine.base import BaseTransaction
from piccolo.engine.sqlite import SQLiteEngine, TransactionType

from storage.errors import translate_errors
from storage.tables import UsageHourly, User

COUNTS: Final = (
    "requests",
    "rejected",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
# Rows per INSERT: 9 values each stays under SQLite's oldest limit of 999 parameters.
_CHUNK: Final = 100


class UsageDelta(msgspec.Struct, frozen=True):
    """Counts to add to one (user, hour, model) row."""

    user_id: uuid.UUID
    hour: datetime
    model: str
    requests: int = 0
    rejected: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class UsageRecord(msgspec.Struct, frozen=True):
    """One stored row, with its user's name."""

    user_id: uuid.UUID
    user_name: str
    hour: datetime
    model: str
    requests: int
    rejected: int
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


_COLUMNS: Final = ('"user"', "hour", "model", *COUNTS)
_UPSERT_HEAD: Final = f"INSERT INTO usage_hourly ({', '.join(_COLUMNS)}) VALUES "  # noqa: S608 - constant names
_UPSERT_TAIL: Final = ' ON CONFLICT ("user", hour, model) DO UPDATE SET ' + ", ".join(
    f"{name} = usage_hourly.{name} + excluded.{name}" for name in COUNTS
)
_ROW: Final = "(" + ", ".join(["{}"] * len(_COLUMNS)) + ")"


async def add_usage(deltas: Sequence[UsageDelta]) -> int:
    """Add ``deltas`` to their rows in one short transaction; returns the rows written.

    Additive (``x = x + excluded.x``), so workers flushing at once add up and never
    overwrite. Rows of users deleted meanwhile are dropped (their usage went with them).
    Rows are written in key order, so two Postgres transactions never wait on each other
    in a cycle.
    """
    if not deltas:
        return 0
    ordered = sorted(deltas, key=lambda d: (str(d.user_id), d.hour, d.model))
    with translate_errors():
        async with _write_transaction():
            known = await _existing_users({d.user_id for d in ordered})
            kept = [d for d in ordered if d.user_id in known]
            for start in range(0, len(kept), _CHUNK):
                chunk = kept[start : start + _CHUNK]
                values: list[Any] = []
                for d in chunk:
                    values += (d.user_id, d.hour, d.model)
                    values += (getattr(d, name) for name in COUNTS)
                sql = _UPSERT_HEAD + ", ".join([_ROW] * len(chunk)) + _UPSERT_TAIL
                await UsageHourly.raw(sql, *values).run()
    return len(kept)


async def usage_between(
    since: datetime, until: datetime, *, user_id: uuid.UUID | None = None
) -> list[UsageRecord]:
    """Rows whose hour is in [since, until), of one user or of all, oldest first."""
    where = (UsageHourly.hour >= since) & (UsageHourly.hour < until)
    if user_id is not None:
        where &= UsageHourly.user == user_id
    query = (
        UsageHourly.select(
            UsageHourly.user.as_alias("user_id"),
            UsageHourly.user.name.as_alias("user_name"),
            UsageHourly.hour,
            UsageHourly.model,
            *(UsageHourly._meta.get_column_by_name(name) for name in COUNTS),
        )
        .where(where)
        .order_by(UsageHourly.hour, UsageHourly.model)
    )
    with translate_errors():
        rows = await query.run()
    return [_record(row) for row in rows]


async def _existing_users(ids: set[uuid.UUID]) -> set[uuid.UUID]:
    rows = await User.select(User.id).where(User.id.is_in(list(ids))).run()
    return {_uuid(row["id"]) for row in rows}


def _write_transaction() -> BaseTransaction:
    engine = UsageHourly._meta.db
    if isinstance(engine, SQLiteEngine):
        # The write lock up front (a read, then writes): see repository._write_transaction.
        return engine.transaction(transaction_type=TransactionType.immediate)
    transaction: BaseTransaction = engine.transaction()
    return transaction


def _uuid(value: Any) -> uuid.UUID:
    return value if type(value) is uuid.UUID else uuid.UUID(str(value))


def _record(row: dict[str, Any]) -> UsageRecord:
    hour: datetime = row["hour"]
    hour = hour.replace(tzinfo=UTC) if hour.tzinfo is None else hour.astimezone(UTC)
    return UsageRecord(
        user_id=_uuid(row["user_id"]),
        user_name=row["user_name"],
        hour=hour,
        model=row["model"],
        **{name: int(row[name]) for name in COUNTS},
    )
