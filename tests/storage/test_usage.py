"""usage_hourly: additive upserts, reads by range, uniqueness and cascade, on both engines."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from storage import repository
from storage.engine import AnyEngine
from storage.errors import IntegrityViolation
from storage.tables import UsageHourly
from storage.usage import UsageDelta, add_usage, usage_between

HOUR = datetime(2026, 11, 30, 14, tzinfo=UTC)


async def test_upserts_add_up_and_never_overwrite(db: AnyEngine) -> None:
    alice = await repository.create_user("alice")
    one = UsageDelta(
        alice.id, HOUR, "claude-x", requests=1, input_tokens=10, output_tokens=5,
        cache_creation_input_tokens=3, cache_read_input_tokens=7,
    )  # fmt: skip
    assert await add_usage([one]) == 1
    assert await add_usage([one, UsageDelta(alice.id, HOUR, "", rejected=2)]) == 2
    rows = await usage_between(HOUR, HOUR + timedelta(hours=1))
    assert [(r.model, r.requests, r.rejected, r.input_tokens, r.output_tokens) for r in rows] == [
        ("", 0, 2, 0, 0),
        ("claude-x", 2, 0, 20, 10),
    ]
    assert rows[1].cache_creation_input_tokens == 6
    assert rows[1].cache_read_input_tokens == 14
    assert rows[1].user_name == "alice"
    assert rows[1].user_id == alice.id
    assert rows[1].hour == HOUR


async def test_concurrent_flushes_add_up(db: AnyEngine) -> None:
    """Several writers on one row at once (as several workers flush): every count kept."""
    alice = await repository.create_user("alice")
    delta = UsageDelta(alice.id, HOUR, "m", requests=1, output_tokens=3)
    await asyncio.gather(*(add_usage([delta]) for _ in range(20)))
    (row,) = await usage_between(HOUR, HOUR + timedelta(hours=1))
    assert (row.requests, row.output_tokens) == (20, 60)


async def test_range_and_user_filter(db: AnyEngine) -> None:
    alice = await repository.create_user("alice")
    bob = await repository.create_user("bob")
    earlier = HOUR - timedelta(hours=5)
    await add_usage(
        [
            UsageDelta(alice.id, earlier, "m", requests=1),
            UsageDelta(alice.id, HOUR, "m", requests=2),
            UsageDelta(bob.id, HOUR, "m", requests=4),
        ]
    )
    rows = await usage_between(HOUR, HOUR + timedelta(hours=1))
    assert sorted((r.user_name, r.requests) for r in rows) == [("alice", 2), ("bob", 4)]
    mine = await usage_between(earlier, HOUR + timedelta(hours=1), user_id=alice.id)
    assert [(r.hour, r.requests) for r in mine] == [(earlier, 1), (HOUR, 2)]


async def test_rows_of_deleted_users_are_dropped_and_cascade(db: AnyEngine) -> None:
    alice = await repository.create_user("alice")
    bob = await repository.create_user("bob")
    await add_usage([UsageDelta(alice.id, HOUR, "m", requests=1)])
    await repository.delete_user("alice")
    assert await UsageHourly.count().run() == 0  # cascaded with the user
    written = await add_usage(
        [UsageDelta(alice.id, HOUR, "m", requests=1), UsageDelta(bob.id, HOUR, "m", requests=1)]
    )
    assert written == 1
    assert [r.user_name for r in await usage_between(HOUR, HOUR + timedelta(hours=1))] == ["bob"]


async def test_user_hour_model_is_unique(db: AnyEngine) -> None:
    alice = await repository.create_user("alice")
    row = {UsageHourly.user: alice.id, UsageHourly.hour: HOUR, UsageHourly.model: "m"}
    await UsageHourly.insert(UsageHourly(**{c._meta.name: v for c, v in row.items()})).run()
    with pytest.raises(IntegrityViolation):
        from storage.errors import translate_errors

        with translate_errors():
            await UsageHourly.insert(UsageHourly(**{c._meta.name: v for c, v in row.items()})).run()
