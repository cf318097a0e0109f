"""The database itself keeps max_concurrent within 1..256, whoever writes the row."""

from __future__ import annotations

import uuid

import pytest
from piccolo.querystring import QueryString

from storage import repository
from storage.engine import AnyEngine
from storage.errors import IntegrityViolation, translate_errors

OUT_OF_RANGE = [0, 257, -1]

INSERT = """
    INSERT INTO user_anthropic_keys ("user", ciphertext, nonce, max_concurrent, cap_version)
    VALUES ({}, {}, {}, {}, 1)
"""
UPDATE = 'UPDATE user_anthropic_keys SET max_concurrent = {} WHERE "user" = {}'


async def _user() -> uuid.UUID:
    return (await repository.create_user(f"user-{uuid.uuid4().hex[:8]}")).id


@pytest.mark.parametrize("cap", OUT_OF_RANGE)
async def test_raw_insert_out_of_range_is_refused(db: AnyEngine, cap: int) -> None:
    user_id = await _user()
    with pytest.raises(IntegrityViolation), translate_errors():
        await db.run_querystring(QueryString(INSERT, user_id, b"c", b"n", cap))
    assert await repository.get_credential(user_id) is None


@pytest.mark.parametrize("cap", OUT_OF_RANGE)
async def test_raw_update_out_of_range_is_refused(db: AnyEngine, cap: int) -> None:
    user_id = await _user()
    await repository.upsert_key(user_id, ciphertext=b"c", nonce=b"n", key_id=None, max_concurrent=4)
    with pytest.raises(IntegrityViolation), translate_errors():
        await db.run_querystring(QueryString(UPDATE, cap, user_id))
    assert (await repository.key_status(user_id)).max_concurrent == 4


@pytest.mark.parametrize("cap", [1, 256])
async def test_raw_writes_at_the_bounds_are_accepted(db: AnyEngine, cap: int) -> None:
    user_id = await _user()
    await db.run_querystring(QueryString(INSERT, user_id, b"c", b"n", cap))
    assert (await repository.key_status(user_id)).max_concurrent == cap
    await db.run_querystring(QueryString(UPDATE, 257 - cap, user_id))
    assert (await repository.key_status(user_id)).max_concurrent == 257 - cap


@pytest.mark.parametrize("cap", OUT_OF_RANGE)
async def test_repository_writes_out_of_range_are_refused_and_rolled_back(
    db: AnyEngine, cap: int
) -> None:
    user_id = await _user()
    with pytest.raises(IntegrityViolation):
        await repository.upsert_key(
            user_id, ciphertext=b"c", nonce=b"n", key_id=None, max_concurrent=cap
        )
    assert await repository.get_credential(user_id) is None
    stored = await repository.upsert_key(
        user_id, ciphertext=b"c", nonce=b"n", key_id=None, max_concurrent=4
    )
    with pytest.raises(IntegrityViolation):
        await repository.update_cap(user_id, cap)
    with pytest.raises(IntegrityViolation):
        await repository.upsert_key(
            user_id, ciphertext=b"x", nonce=b"y", key_id=None, max_concurrent=cap
        )
    credential = await repository.get_credential(user_id)
    assert credential is not None
    assert stored.current is not None
    assert (credential.ciphertext, credential.max_concurrent, credential.cap_version) == (
        b"c",
        4,
        stored.current.cap_version,
    )
