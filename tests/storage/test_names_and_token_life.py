"""One rule for names and labels on both engines; token expiry and last use."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from storage import repository
from storage.engine import AnyEngine
from storage.errors import IntegrityViolation, InvalidValue
from storage.tables import GatewayToken, User
from storage.tokens import hash_token

BAD_NAMES = ["", "a b", "tab\there", "new\nline", "x" * 65, "x" * 300, "ünï", "semi;colon"]
GOOD_NAMES = ["a", "x" * 64, "frank.o-k_1@example.com"]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_the_repository_refuses_a_bad_name_naming_the_rule(db: AnyEngine, name: str) -> None:
    with pytest.raises(InvalidValue, match=r"name: must be 1\.\.64 characters"):
        await repository.create_user(name)
    assert await repository.list_users() == []


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_the_database_itself_refuses_a_bad_name(db: AnyEngine, name: str) -> None:
    # Around the repository, as another tool writing to the database would (Postgres's
    # column length speaks first for 300 characters).
    with pytest.raises(Exception, match=r"name must be 1\.\.64|users_name_rule|too long"):
        await User.insert(User(name=name, created_at=datetime.now(UTC))).run()
    assert await User.count().run() == 0


async def test_the_database_refuses_renaming_to_a_bad_name(db: AnyEngine) -> None:
    await repository.create_user("alice")
    with pytest.raises(Exception, match=r"name must be 1\.\.64|users_name_rule"):
        await User.update({User.name: "al ice"}).where(User.name == "alice").run()


@pytest.mark.parametrize("name", GOOD_NAMES)
async def test_good_names_pass_both_checks(db: AnyEngine, name: str) -> None:
    assert (await repository.create_user(name)).name == name


@pytest.mark.parametrize("label", ["tab\tlabel", "new\nline", "y" * 101])
async def test_bad_labels_are_refused_by_the_repository_and_the_database(
    db: AnyEngine, label: str
) -> None:
    alice = await repository.create_user("alice")
    with pytest.raises(InvalidValue, match="label: must be at most 100"):
        await repository.issue_token(alice.id, label=label)
    row = GatewayToken(
        user=alice.id, token_hash=uuid.uuid4().hex, label=label, created_at=datetime.now(UTC)
    )
    with pytest.raises(Exception, match=r"label must be at most 100|gateway_tokens_label_rule"):
        await GatewayToken.insert(row).run()


async def test_an_expired_token_is_refused_like_a_revoked_one(db: AnyEngine) -> None:
    alice = await repository.create_user("alice")
    now = datetime.now(UTC)
    _, live = await repository.issue_token(alice.id, expires_at=now + timedelta(days=90))
    record, dead = await repository.issue_token(alice.id, expires_at=now - timedelta(seconds=1))
    found = await repository.lookup_token(hash_token(live))
    assert found is not None and found.expires_at is not None
    assert abs(found.expires_at - (now + timedelta(days=90)).timestamp()) < 1e-3
    assert await repository.lookup_token(hash_token(dead)) is None
    listed = await repository.get_token(record.id)
    assert listed is not None and listed.expired(datetime.now(UTC))


async def test_last_use_is_recorded_at_most_once_per_interval(db: AnyEngine) -> None:
    alice = await repository.create_user("alice")
    record, token = await repository.issue_token(alice.id)
    assert (await repository.get_token(record.id)).last_used_at is None  # type: ignore[union-attr]
    t0 = datetime.now(UTC)
    minute = timedelta(minutes=1)
    assert await repository.record_token_use([hash_token(token)], at=t0, every=minute) == 1
    # Another worker, 30 s later: within the minute, nothing written.
    later = t0 + timedelta(seconds=30)
    assert await repository.record_token_use([hash_token(token)], at=later, every=minute) == 0
    stored = await repository.get_token(record.id)
    assert stored is not None and stored.last_used_at == t0
    after = t0 + timedelta(seconds=61)
    assert await repository.record_token_use([hash_token(token)], at=after, every=minute) == 1
    stored = await repository.get_token(record.id)
    assert stored is not None and stored.last_used_at == after


async def test_sample_stored_key_names_its_user(db: AnyEngine) -> None:
    assert await repository.sample_stored_key() is None
    alice = await repository.create_user("alice")
    await repository.upsert_key(
        alice.id, ciphertext=b"c", nonce=b"n" * 12, key_id="0123abcd", max_concurrent=None
    )
    sample = await repository.sample_stored_key()
    assert sample == repository.StoredKeySample(
        user_id=alice.id, user_name="alice", ciphertext=b"c", nonce=b"n" * 12, key_id="0123abcd"
    )


def test_invalid_value_is_an_integrity_violation() -> None:
    assert issubclass(InvalidValue, IntegrityViolation)
