"""Master-key rotation in the database, on SQLite and Postgres: batches, key ids, and the
user id still bound to every ciphertext."""

from __future__ import annotations

import uuid

import pytest

from gateway.rotation import RotationError, check_new_key, rotate
from storage import repository
from storage.crypto import MasterKey
from storage.engine import AnyEngine
from storage.errors import DecryptionError
from storage.keyring import Keyring
from storage.tables import UserAnthropicKey


def secret_of(user_id: uuid.UUID) -> str:
    return f"sk-ant-test-{user_id.hex}"


async def store(user_id: uuid.UUID, key: MasterKey, *, key_id: str | None) -> None:
    ciphertext, nonce = key.encrypt(secret_of(user_id), user_id=user_id)
    await repository.upsert_key(
        user_id, ciphertext=ciphertext, nonce=nonce, key_id=key_id, max_concurrent=3
    )


async def new_user() -> uuid.UUID:
    return (await repository.create_user(f"u{uuid.uuid4().hex[:10]}")).id


async def test_rotation_moves_every_decryptable_key_to_the_new_key(db: AnyEngine) -> None:
    old, new, outsider = MasterKey.generate(), MasterKey.generate(), MasterKey.generate()
    legacy = [await new_user() for _ in range(6)]  # stored before key ids: NULL
    under_old = [await new_user() for _ in range(7)]
    under_new = [await new_user() for _ in range(2)]
    unknown, early_new = await new_user(), await new_user()
    for user_id in legacy:
        await store(user_id, old, key_id=None)
    for user_id in under_old:
        await store(user_id, old, key_id=old.key_id)
    for user_id in under_new:
        await store(user_id, new, key_id=new.key_id)
    await store(unknown, outsider, key_id=outsider.key_id)
    await store(early_new, new, key_id=None)  # NULL, made by the second key of the ring
    before = {
        row["user"]: row
        for row in await UserAnthropicKey.select(
            UserAnthropicKey.user, UserAnthropicKey.cap_version, UserAnthropicKey.updated_at
        ).run()
    }
    assert await repository.count_keys_by_key_id() == {
        None: 7,
        old.key_id: 7,
        new.key_id: 2,
        outsider.key_id: 1,
    }

    batches = []
    ring = Keyring([new, old])
    report = await rotate(
        ring, batch_size=4, progress=lambda batch, done: batches.append((batch, done))
    )
    assert report.key_id == new.key_id
    assert report.rewritten == len(legacy) + len(under_old) + 1
    # A key id outside the ring cannot be rotated: reported, and left as it is.
    assert report.failed == [str(unknown)]
    # 15 rows to look at in the first pass (4 a batch), then a pass with nothing to do.
    assert [batch for batch, _ in batches][:4] == [1, 2, 3, 4]
    assert batches[3][1] == report.rewritten
    assert await repository.count_keys_by_key_id() == {new.key_id: 16, outsider.key_id: 1}

    only_new = Keyring([new])
    for user_id in [*legacy, *under_old, *under_new, early_new]:
        credential = await repository.get_credential(user_id)
        assert credential is not None and credential.key_id == new.key_id
        assert only_new.decrypt(
            credential.ciphertext, credential.nonce, key_id=new.key_id, user_id=user_id
        ) == secret_of(user_id)
    # Neither the caps' version nor "configured at" moved: the users changed nothing.
    after = {
        row["user"]: row
        for row in await UserAnthropicKey.select(
            UserAnthropicKey.user, UserAnthropicKey.cap_version, UserAnthropicKey.updated_at
        ).run()
    }
    assert after == before

    # Run again: nothing left to do.
    again = await rotate(ring, batch_size=4)
    assert (again.rewritten, again.failed) == (0, [str(unknown)])


async def test_a_rotated_ciphertext_moved_to_another_users_row_fails(db: AnyEngine) -> None:
    old, new = MasterKey.generate(), MasterKey.generate()
    alice, bob = await new_user(), await new_user()
    await store(alice, old, key_id=old.key_id)
    await store(bob, old, key_id=old.key_id)
    await rotate(Keyring([new, old]), batch_size=10)
    stolen = await repository.get_credential(alice)
    assert stolen is not None and stolen.key_id == new.key_id
    await (
        UserAnthropicKey.update(
            {
                UserAnthropicKey.ciphertext: stolen.ciphertext,
                UserAnthropicKey.nonce: stolen.nonce,
                UserAnthropicKey.key_id: stolen.key_id,
            }
        )
        .where(UserAnthropicKey.user == bob)
        .run()
    )
    moved = await repository.get_credential(bob)
    assert moved is not None and moved.ciphertext == stolen.ciphertext
    with pytest.raises(DecryptionError):
        Keyring([new]).decrypt(moved.ciphertext, moved.nonce, key_id=moved.key_id, user_id=bob)


def test_the_new_key_must_lead_the_keyring() -> None:
    old, new = MasterKey.generate(), MasterKey.generate()
    with pytest.raises(RotationError, match="not in the gateway's keyring"):
        check_new_key(Keyring([old]), new, source="test")
    with pytest.raises(RotationError, match="must come first"):
        check_new_key(Keyring([old, new]), new, source="test")
    check_new_key(Keyring([new, old]), new, source="test")
