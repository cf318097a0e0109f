"""Users' Anthropic keys and their caps in the repository, on SQLite and Postgres."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from storage import repository
from storage.crypto import MasterKey
from storage.engine import AnyEngine
from storage.errors import IntegrityViolation
from storage.repository import CapState
from storage.tables import UserAnthropicKey

SECRET = "sk-ant-api03-" + "s3cr3t" * 15


async def _user() -> uuid.UUID:
    return (await repository.create_user(f"user-{uuid.uuid4().hex[:8]}")).id


async def _put(user_id: uuid.UUID, *, cap: int | None = None, key: bytes = b"c") -> CapState:
    change = await repository.upsert_key(
        user_id, ciphertext=key, nonce=b"n" * 12, key_id=None, max_concurrent=cap
    )
    assert change.current is not None
    return change.current


async def test_round_trip_through_encryption(db: AnyEngine, master_key: MasterKey) -> None:
    user_id = await _user()
    ciphertext, nonce = master_key.encrypt(SECRET, user_id=user_id)
    await repository.upsert_key(
        user_id, ciphertext=ciphertext, nonce=nonce, key_id=None, max_concurrent=None
    )
    credential = await repository.get_credential(user_id)
    assert credential is not None
    assert (credential.user_id, credential.ciphertext, credential.nonce) == (
        user_id,
        ciphertext,
        nonce,
    )
    assert master_key.decrypt(credential.ciphertext, credential.nonce, user_id=user_id) == SECRET


async def test_stored_row_does_not_contain_the_plaintext(
    db: AnyEngine, database_url: str, master_key: MasterKey, tmp_path: Path
) -> None:
    user_id = await _user()
    ciphertext, nonce = master_key.encrypt(SECRET, user_id=user_id)
    await repository.upsert_key(
        user_id, ciphertext=ciphertext, nonce=nonce, key_id=None, max_concurrent=None
    )
    rows = await UserAnthropicKey.select().run()
    assert len(rows) == 1
    stored = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in rows[0].values())
    assert SECRET.encode() not in stored
    assert b"s3cr3t" not in stored
    if database_url.startswith("sqlite"):
        # Nothing on disk either: the database file and its write-ahead log.
        for path in tmp_path.glob("gateway.sqlite3*"):
            assert b"s3cr3t" not in path.read_bytes(), path


async def test_missing_key_gives_none(db: AnyEngine) -> None:
    user_id = await _user()
    assert await repository.get_credential(user_id) is None
    assert await repository.key_status(user_id) == repository.KeyStatus(
        configured=False, configured_at=None, max_concurrent=None
    )


async def test_new_key_defaults_to_cap_8(db: AnyEngine) -> None:
    user_id = await _user()
    change = await repository.upsert_key(
        user_id, ciphertext=b"c", nonce=b"n", key_id=None, max_concurrent=None
    )
    assert change.previous is None
    assert change.current is not None
    assert change.current.max_concurrent == 8
    status = await repository.key_status(user_id)
    assert status.configured
    assert status.max_concurrent == 8
    assert status.configured_at is not None
    assert status.configured_at.utcoffset() == timedelta(0)


async def test_new_key_with_explicit_cap(db: AnyEngine) -> None:
    user_id = await _user()
    assert (await _put(user_id, cap=3)).max_concurrent == 3
    credential = await repository.get_credential(user_id)
    assert credential is not None
    assert credential.max_concurrent == 3


async def test_rotation_replaces_the_key(db: AnyEngine) -> None:
    user_id = await _user()
    first = await _put(user_id, key=b"old")
    change = await repository.upsert_key(
        user_id, ciphertext=b"new", nonce=b"m" * 12, key_id=None, max_concurrent=None
    )
    assert change.previous == first
    credential = await repository.get_credential(user_id)
    assert credential is not None
    assert (credential.ciphertext, credential.nonce) == (b"new", b"m" * 12)


async def test_rotation_without_cap_keeps_the_cap(db: AnyEngine) -> None:
    user_id = await _user()
    await _put(user_id, cap=5)
    assert (await _put(user_id, key=b"rotated")).max_concurrent == 5
    assert (await repository.key_status(user_id)).max_concurrent == 5


async def test_rotation_with_cap_replaces_the_cap(db: AnyEngine) -> None:
    user_id = await _user()
    await _put(user_id, cap=5)
    assert (await _put(user_id, cap=12, key=b"rotated")).max_concurrent == 12
    assert (await repository.key_status(user_id)).max_concurrent == 12


async def test_updated_at_advances_on_every_change(db: AnyEngine) -> None:
    user_id = await _user()
    await _put(user_id)
    statuses = [await repository.key_status(user_id)]
    await _put(user_id, key=b"rotated")
    statuses.append(await repository.key_status(user_id))
    await repository.update_cap(user_id, 9)
    statuses.append(await repository.key_status(user_id))
    times = [status.updated_at for status in statuses]
    assert None not in times
    assert times == sorted(times)  # type: ignore[type-var]
    assert len(set(times)) == 3


async def test_configured_at_moves_with_the_key_and_not_with_a_cap_change(
    db: AnyEngine,
) -> None:
    user_id = await _user()
    await _put(user_id)
    first = await repository.key_status(user_id)
    await repository.update_cap(user_id, 9)
    after_cap = await repository.key_status(user_id)
    assert after_cap.configured_at == first.configured_at
    assert after_cap.updated_at is not None and first.updated_at is not None
    assert after_cap.updated_at > first.updated_at
    await _put(user_id, key=b"rotated")
    rotated = await repository.key_status(user_id)
    assert rotated.configured_at is not None and first.configured_at is not None
    assert rotated.configured_at > first.configured_at
    assert rotated.configured_at == rotated.updated_at


async def test_cap_only_update(db: AnyEngine) -> None:
    user_id = await _user()
    first = await _put(user_id, key=b"kept", cap=4)
    change = await repository.update_cap(user_id, 20)
    assert change is not None
    assert change.previous == first
    assert change.current is not None
    assert change.current.max_concurrent == 20
    credential = await repository.get_credential(user_id)
    assert credential is not None
    assert (credential.ciphertext, credential.max_concurrent) == (b"kept", 20)
    assert credential.cap_version == change.current.cap_version


async def test_cap_update_without_a_key_gives_none(db: AnyEngine) -> None:
    user_id = await _user()
    assert await repository.update_cap(user_id, 20) is None
    assert await repository.get_credential(user_id) is None


async def test_delete_key_and_delete_again(db: AnyEngine) -> None:
    user_id = await _user()
    stored = await _put(user_id, cap=6)
    change = await repository.delete_key(user_id)
    assert change == repository.KeyChange(user_id=user_id, previous=stored, current=None)
    assert await repository.get_credential(user_id) is None
    assert not (await repository.key_status(user_id)).configured
    again = await repository.delete_key(user_id)
    assert again == repository.KeyChange(user_id=user_id, previous=None, current=None)


async def test_key_for_unknown_user_is_refused(db: AnyEngine) -> None:
    with pytest.raises(IntegrityViolation):
        await repository.upsert_key(
            uuid.uuid4(), ciphertext=b"c", nonce=b"n", key_id=None, max_concurrent=None
        )


async def test_cap_version_bumps_on_every_change_and_never_repeats(db: AnyEngine) -> None:
    user_id = await _user()
    versions = [(await _put(user_id)).cap_version]
    versions.append((await _put(user_id, key=b"rotated")).cap_version)
    versions.append((await _put(user_id, cap=3)).cap_version)
    change = await repository.update_cap(user_id, 3)  # same value: still a new version
    assert change is not None and change.current is not None
    versions.append(change.current.cap_version)
    deleted = await repository.delete_key(user_id)
    assert deleted.previous is not None
    assert deleted.previous.cap_version == versions[-1]
    # The row and its last version are gone; the next insert must still not reuse one.
    versions.append((await _put(user_id)).cap_version)
    await repository.delete_key(user_id)
    versions.append((await _put(user_id)).cap_version)
    assert versions == sorted(versions)
    assert len(set(versions)) == len(versions)


async def test_concurrent_changes_get_distinct_versions(db: AnyEngine) -> None:
    user_id = await _user()
    first = await _put(user_id)
    changes = await asyncio.gather(*(repository.update_cap(user_id, cap) for cap in range(1, 11)))
    currents = [c.current for c in changes if c is not None and c.current is not None]
    assert len(currents) == 10
    assert len({c.cap_version for c in currents}) == 10
    # The changes form one chain: each saw exactly the state the one before it left.
    previous = sorted(c.previous.cap_version for c in changes if c and c.previous)
    assert previous == sorted([first.cap_version] + [c.cap_version for c in currents])[:-1]
    credential = await repository.get_credential(user_id)
    assert credential is not None
    assert credential.cap_version == max(c.cap_version for c in currents)


async def test_concurrent_first_stores_make_one_row_and_one_chain(db: AnyEngine) -> None:
    user_id = await _user()
    changes = await asyncio.gather(
        *(
            repository.upsert_key(
                user_id, ciphertext=bytes([i]), nonce=b"n", key_id=None, max_concurrent=i
            )
            for i in range(1, 11)
        )
    )
    assert sum(c.previous is None for c in changes) == 1  # exactly one insert
    currents = sorted(c.current.cap_version for c in changes if c.current is not None)
    previous = sorted(c.previous.cap_version for c in changes if c.previous is not None)
    assert len(set(currents)) == 10
    assert previous == currents[:-1]
