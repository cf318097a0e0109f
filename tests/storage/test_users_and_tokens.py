"""Users and gateway tokens in the repository, on SQLite and Postgres."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from storage import repository
from storage.engine import AnyEngine
from storage.errors import AlreadyExists, IntegrityViolation
from storage.tables import GatewayToken
from storage.tokens import hash_token


async def test_create_get_list_delete_user(db: AnyEngine) -> None:
    bob = await repository.create_user("bob")
    alice = await repository.create_user("alice")
    assert isinstance(bob.id, uuid.UUID)
    assert bob.id != alice.id
    assert bob.created_at.utcoffset() == timedelta(0)
    assert await repository.get_user("bob") == bob
    assert await repository.get_user("carol") is None
    assert await repository.list_users() == [alice, bob]
    assert await repository.delete_user("bob") is True
    assert await repository.delete_user("bob") is False
    assert await repository.list_users() == [alice]


async def test_duplicate_user_name_raises_already_exists(db: AnyEngine) -> None:
    await repository.create_user("alice")
    with pytest.raises(AlreadyExists) as caught:
        await repository.create_user("alice")
    assert isinstance(caught.value, IntegrityViolation)
    assert "alice" in str(caught.value)
    assert len(await repository.list_users()) == 1


async def test_user_ids_are_not_reused(db: AnyEngine) -> None:
    first = await repository.create_user("alice")
    await repository.delete_user("alice")
    second = await repository.create_user("alice")
    assert second.id != first.id


async def test_issue_then_lookup_token(db: AnyEngine) -> None:
    alice = await repository.create_user("alice")
    record, token = await repository.issue_token(alice.id, label="laptop")
    assert token.startswith("gwt_")
    assert record.user_id == alice.id
    assert record.user_name == "alice"
    assert record.label == "laptop"
    assert record.revoked_at is None
    found = await repository.lookup_token(hash_token(token))
    assert found == repository.TokenLookup(user_id=alice.id, credential=None)
    assert await repository.lookup_token(hash_token("gwt_unknown")) is None


async def test_only_the_token_hash_is_stored(db: AnyEngine) -> None:
    alice = await repository.create_user("alice")
    _, token = await repository.issue_token(alice.id)
    rows = await GatewayToken.select().run()
    assert rows[0]["token_hash"] == hash_token(token)
    assert all(token not in str(value) for value in rows[0].values())


async def test_revoked_token_stops_at_once(db: AnyEngine) -> None:
    alice = await repository.create_user("alice")
    record, token = await repository.issue_token(alice.id)
    _, other = await repository.issue_token(alice.id)
    assert await repository.revoke_token(record.id) is True
    assert await repository.lookup_token(hash_token(token)) is None
    assert await repository.lookup_token(hash_token(other)) is not None
    assert await repository.revoke_token(record.id) is False  # already revoked
    assert await repository.revoke_token(999_999) is False  # unknown
    (revoked,) = [r for r in await repository.list_tokens(alice.id) if r.id == record.id]
    assert revoked.revoked_at is not None
    assert revoked.revoked_at >= revoked.created_at


async def test_list_tokens_all_and_per_user(db: AnyEngine) -> None:
    alice = await repository.create_user("alice")
    bob = await repository.create_user("bob")
    a1, _ = await repository.issue_token(alice.id, label="one")
    b1, _ = await repository.issue_token(bob.id)
    a2, _ = await repository.issue_token(alice.id, label="two")
    assert await repository.list_tokens() == [a1, b1, a2]
    assert await repository.list_tokens(alice.id) == [a1, a2]
    assert await repository.list_tokens(uuid.uuid4()) == []


async def test_token_for_unknown_user_is_refused(db: AnyEngine) -> None:
    with pytest.raises(IntegrityViolation):
        await repository.issue_token(uuid.uuid4())
    assert await repository.list_tokens() == []


async def test_lookup_token_returns_the_credential_in_one_call(db: AnyEngine) -> None:
    alice = await repository.create_user("alice")
    _, token = await repository.issue_token(alice.id)
    change = await repository.upsert_key(
        alice.id, ciphertext=b"cipher", nonce=b"n" * 12, key_id=None, max_concurrent=3
    )
    assert change.current is not None
    found = await repository.lookup_token(hash_token(token))
    assert found == repository.TokenLookup(
        user_id=alice.id,
        credential=repository.Credential(
            user_id=alice.id,
            ciphertext=b"cipher",
            nonce=b"n" * 12,
            max_concurrent=3,
            cap_version=change.current.cap_version,
            key_id=None,
        ),
    )
    assert found.credential == await repository.get_credential(alice.id)


async def test_deleting_a_user_cascades_to_tokens_and_key(db: AnyEngine) -> None:
    alice = await repository.create_user("alice")
    bob = await repository.create_user("bob")
    _, token = await repository.issue_token(alice.id)
    _, bob_token = await repository.issue_token(bob.id)
    await repository.upsert_key(
        alice.id, ciphertext=b"c", nonce=b"n", key_id=None, max_concurrent=None
    )
    await repository.upsert_key(
        bob.id, ciphertext=b"c", nonce=b"n", key_id=None, max_concurrent=None
    )
    assert await repository.delete_user("alice") is True
    assert await repository.lookup_token(hash_token(token)) is None
    assert await repository.list_tokens(alice.id) == []
    assert await repository.get_credential(alice.id) is None
    assert not (await repository.key_status(alice.id)).configured
    # Bob is untouched.
    assert await repository.lookup_token(hash_token(bob_token)) is not None
    assert await repository.get_credential(bob.id) is not None
