"""Every query the gateway runs: users, tokens and keys, with typed frozen results."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec
from piccolo.engine.base import BaseTransaction
from piccolo.engine.sqlite import SQLiteEngine, TransactionType
from piccolo.query.methods.select import Select

from storage.errors import AlreadyExists, IntegrityViolation, InvalidValue, translate_errors
from storage.names import label_problem, name_problem
from storage.tables import DEFAULT_MAX_CONCURRENT, GatewayToken, User, UserAnthropicKey
from storage.tokens import hash_token, new_token

_ONE_MICROSECOND: Final = timedelta(microseconds=1)


class UserRecord(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    created_at: datetime


class TokenRecord(msgspec.Struct, frozen=True):
    id: int
    user_id: uuid.UUID
    user_name: str
    label: str
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None = None
    last_used_at: datetime | None = None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


class Credential(msgspec.Struct, frozen=True):
    user_id: uuid.UUID
    ciphertext: bytes
    nonce: bytes
    max_concurrent: int
    cap_version: int
    key_id: str | None  # the master key that made the ciphertext; None: before key ids


class TokenLookup(msgspec.Struct, frozen=True):
    user_id: uuid.UUID
    credential: Credential | None
    # Seconds since the epoch after which the token is refused like a revoked one.
    expires_at: float | None = None


class StoredKeySample(msgspec.Struct, frozen=True):
    """One stored key, for the launcher to prove the master key on."""

    user_id: uuid.UUID
    user_name: str
    ciphertext: bytes
    nonce: bytes
    key_id: str | None  # None: stored before key ids


class CapState(msgspec.Struct, frozen=True):
    cap_version: int
    max_concurrent: int


class KeyChange(msgspec.Struct, frozen=True):
    """A key or cap change; ``previous`` names the semaphore the gateway must retire."""

    user_id: uuid.UUID
    previous: CapState | None
    current: CapState | None


class KeyCap(msgspec.Struct, frozen=True):
    """A stored key's cap, with its owner's name (for operators and the launcher)."""

    user_id: uuid.UUID
    user_name: str
    max_concurrent: int
    cap_version: int


class StoredCiphertext(msgspec.Struct, frozen=True):
    """One stored key as the master-key rotation sees it."""

    user_id: uuid.UUID
    ciphertext: bytes
    nonce: bytes
    key_id: str | None


class Reencrypted(msgspec.Struct, frozen=True):
    """What one batch of a master-key rotation did."""

    rewritten: int
    failed: list[uuid.UUID]  # rows that did not decrypt: left as they are
    last_user: uuid.UUID | None  # where the next batch starts; None: nothing was left


class KeyStatus(msgspec.Struct, frozen=True):
    configured: bool
    configured_at: datetime | None  # the key itself last stored
    max_concurrent: int | None
    updated_at: datetime | None = None  # the key or its cap last changed


# ---------------------------------------------------------------------------- users


async def create_user(name: str) -> UserRecord:
    """A new user; ``AlreadyExists`` when the name is taken, ``InvalidValue`` when it
    breaks the name rule (checked here and, as a backstop, by the database)."""
    problem = name_problem(name)
    if problem is not None:
        raise InvalidValue(problem)
    user = User(name=name, created_at=_now())
    try:
        with translate_errors(duplicate=AlreadyExists):
            rows = await User.insert(user).returning(*User.all_columns()).run()
    except AlreadyExists as exc:
        raise AlreadyExists(f"a user named {name!r} exists already") from exc
    return _user(rows[0])


async def user_name(user_id: uuid.UUID) -> str | None:
    with translate_errors():
        row = await User.select(User.name).where(User.id == user_id).first().run()
    return None if row is None else str(row["name"])


async def get_user(name: str) -> UserRecord | None:
    with translate_errors():
        row = await User.select(*User.all_columns()).where(User.name == name).first().run()
    return None if row is None else _user(row)


async def list_users() -> list[UserRecord]:
    with translate_errors():
        rows = await User.select(*User.all_columns()).order_by(User.name).run()
    return [_user(row) for row in rows]


async def delete_user(name: str) -> bool:
    """Delete the user; the database cascades to their tokens and key. False if unknown."""
    with translate_errors():
        rows = await User.delete().where(User.name == name).returning(User.id).run()
    return bool(rows)


# --------------------------------------------------------------------------- tokens


async def issue_token(
    user_id: uuid.UUID, *, label: str = "", expires_at: datetime | None = None
) -> tuple[TokenRecord, str]:
    """A new token for the user: its record and, this once, its plaintext."""
    problem = label_problem(label)
    if problem is not None:
        raise InvalidValue(problem)
    token = new_token()
    row = GatewayToken(
        user=user_id,
        token_hash=hash_token(token),
        label=label,
        created_at=_now(),
        expires_at=expires_at,
    )
    with translate_errors():
        async with _write_transaction():
            inserted = await GatewayToken.insert(row).returning(GatewayToken.id).run()
            records = await _select_tokens().where(GatewayToken.id == inserted[0]["id"]).run()
    return _token(records[0]), token


async def revoke_token(token_id: int) -> bool:
    """Revoke at once; False if the token is unknown or already revoked."""
    with translate_errors():
        rows = (
            await GatewayToken.update({GatewayToken.revoked_at: _now()})
            .where((GatewayToken.id == token_id) & GatewayToken.revoked_at.is_null())
            .returning(GatewayToken.id)
            .run()
        )
    return bool(rows)


async def get_token(token_id: int) -> TokenRecord | None:
    with translate_errors():
        rows = await _select_tokens().where(GatewayToken.id == token_id).run()
    return _token(rows[0]) if rows else None


async def record_token_use(token_hashes: list[str], *, at: datetime, every: timedelta) -> int:
    """Mark these tokens used ``at``, each at most once per ``every`` (a token another
    worker marked within it is left alone); the number of rows written."""
    if not token_hashes:
        return 0
    with translate_errors():
        rows = (
            await GatewayToken.update({GatewayToken.last_used_at: at})
            .where(
                GatewayToken.token_hash.is_in(token_hashes)
                & (GatewayToken.last_used_at.is_null() | (GatewayToken.last_used_at < at - every))
            )
            .returning(GatewayToken.id)
            .run()
        )
    return len(rows)


async def list_tokens(user_id: uuid.UUID | None = None) -> list[TokenRecord]:
    query = _select_tokens().order_by(GatewayToken.id)
    if user_id is not None:
        query = query.where(GatewayToken.user == user_id)
    with translate_errors():
        rows = await query.run()
    return [_token(row) for row in rows]


# The proxy's hot path on a cache miss: one round trip from token hash to the user and
# their credential, so it is written out rather than built.
_LOOKUP_TOKEN_SQL: Final = """
    SELECT t."user" AS user_id, t.expires_at AS expires_at, k.ciphertext AS ciphertext,
           k.nonce AS nonce, k.key_id AS key_id, k.max_concurrent AS max_concurrent,
           k.cap_version AS cap_version
    FROM gateway_tokens AS t
    LEFT JOIN user_anthropic_keys AS k ON k."user" = t."user"
    WHERE t.token_hash = {} AND t.revoked_at IS NULL
"""


async def lookup_token(token_hash: str) -> TokenLookup | None:
    """The user of a valid (unrevoked, unexpired) token and their credential, in one
    query; ``expires_at`` tells a cache when to stop trusting it."""
    with translate_errors():
        rows = await GatewayToken.raw(_LOOKUP_TOKEN_SQL, token_hash).run()
    if not rows:
        return None
    row = rows[0]
    expires_at = None if row["expires_at"] is None else _utc(row["expires_at"]).timestamp()
    if expires_at is not None and expires_at <= time.time():
        return None
    user_id = _uuid(row["user_id"])
    credential = None if row["cap_version"] is None else _credential(user_id, row)
    return TokenLookup(user_id=user_id, credential=credential, expires_at=expires_at)


# ----------------------------------------------------------------------------- keys


async def upsert_key(
    user_id: uuid.UUID,
    *,
    ciphertext: bytes,
    nonce: bytes,
    key_id: str,
    max_concurrent: int | None,
) -> KeyChange:
    """Store or rotate the user's key. Without a cap a new row gets 8 and a rotation
    keeps the stored cap; with one, it replaces it. Always bumps the cap version."""
    with translate_errors():
        async with _write_transaction():
            stored = await _lock_key_row(user_id)
            now = _now()
            if stored is None:
                current = CapState(
                    cap_version=_next_cap_version(None),
                    max_concurrent=(
                        DEFAULT_MAX_CONCURRENT if max_concurrent is None else max_concurrent
                    ),
                )
                row = UserAnthropicKey(
                    user=user_id,
                    ciphertext=ciphertext,
                    nonce=nonce,
                    key_id=key_id,
                    max_concurrent=current.max_concurrent,
                    cap_version=current.cap_version,
                    created_at=now,
                    updated_at=now,
                    key_stored_at=now,
                )
                await UserAnthropicKey.insert(row).run()
                return KeyChange(user_id=user_id, previous=None, current=current)
            previous, updated_at = stored
            current = CapState(
                cap_version=_next_cap_version(previous.cap_version),
                max_concurrent=(
                    previous.max_concurrent if max_concurrent is None else max_concurrent
                ),
            )
            stored_at = _advance(updated_at, now)
            await _update_key(
                user_id,
                current,
                stored_at,
                {
                    UserAnthropicKey.ciphertext: ciphertext,
                    UserAnthropicKey.nonce: nonce,
                    UserAnthropicKey.key_id: key_id,
                    UserAnthropicKey.key_stored_at: stored_at,
                },
            )
    return KeyChange(user_id=user_id, previous=previous, current=current)


async def update_cap(user_id: uuid.UUID, max_concurrent: int) -> KeyChange | None:
    """Change only the cap (bumping the version); None when the user has no key."""
    with translate_errors():
        async with _write_transaction():
            stored = await _lock_key_row(user_id)
            if stored is None:
                return None
            previous, updated_at = stored
            current = CapState(
                cap_version=_next_cap_version(previous.cap_version),
                max_concurrent=max_concurrent,
            )
            await _update_key(user_id, current, _advance(updated_at, _now()), {})
    return KeyChange(user_id=user_id, previous=previous, current=current)


async def delete_key(user_id: uuid.UUID) -> KeyChange:
    """Forget the user's key; idempotent (``previous`` is None when nothing was stored)."""
    with translate_errors():
        rows = (
            await UserAnthropicKey.delete()
            .where(UserAnthropicKey.user == user_id)
            .returning(UserAnthropicKey.cap_version, UserAnthropicKey.max_concurrent)
            .run()
        )
    previous = _cap_state(rows[0]) if rows else None
    return KeyChange(user_id=user_id, previous=previous, current=None)


async def key_status(user_id: uuid.UUID) -> KeyStatus:
    with translate_errors():
        row = (
            await UserAnthropicKey.select(
                UserAnthropicKey.updated_at,
                UserAnthropicKey.key_stored_at,
                UserAnthropicKey.max_concurrent,
            )
            .where(UserAnthropicKey.user == user_id)
            .first()
            .run()
        )
    if row is None:
        return KeyStatus(configured=False, configured_at=None, max_concurrent=None)
    updated_at = _utc(row["updated_at"])
    stored_at = row["key_stored_at"]
    return KeyStatus(
        configured=True,
        configured_at=updated_at if stored_at is None else _utc(stored_at),
        max_concurrent=row["max_concurrent"],
        updated_at=updated_at,
    )


async def sample_stored_key() -> StoredKeySample | None:
    """Any one stored key (the most recently changed), or None when none is stored."""
    with translate_errors():
        row = (
            await UserAnthropicKey.select(
                UserAnthropicKey.user.as_alias("user_id"),
                UserAnthropicKey.user.name.as_alias("user_name"),
                UserAnthropicKey.ciphertext,
                UserAnthropicKey.nonce,
                UserAnthropicKey.key_id,
            )
            .order_by(UserAnthropicKey.updated_at, ascending=False)
            .first()
            .run()
        )
    if row is None:
        return None
    return StoredKeySample(
        user_id=_uuid(row["user_id"]),
        user_name=row["user_name"],
        ciphertext=bytes(row["ciphertext"]),
        nonce=bytes(row["nonce"]),
        key_id=row["key_id"],
    )


async def list_key_caps() -> list[KeyCap]:
    """Every stored key's cap and cap version, by user name."""
    with translate_errors():
        rows = (
            await UserAnthropicKey.select(
                UserAnthropicKey.user.as_alias("user_id"),
                UserAnthropicKey.user.name.as_alias("user_name"),
                UserAnthropicKey.max_concurrent,
                UserAnthropicKey.cap_version,
            )
            .order_by(UserAnthropicKey.user.name)
            .run()
        )
    return [
        KeyCap(
            user_id=_uuid(row["user_id"]),
            user_name=row["user_name"],
            max_concurrent=row["max_concurrent"],
            cap_version=row["cap_version"],
        )
        for row in rows
    ]


async def latest_cap_version() -> int:
    """The highest cap version stored (0 with no key): every change raises it, since a
    new version is at least the current time in microseconds."""
    with translate_errors():
        rows = await UserAnthropicKey.raw(
            "SELECT MAX(cap_version) AS latest FROM user_anthropic_keys"
        ).run()
    return int(rows[0]["latest"] or 0) if rows else 0


async def get_credential(user_id: uuid.UUID) -> Credential | None:
    with translate_errors():
        row = (
            await UserAnthropicKey.select(
                UserAnthropicKey.ciphertext,
                UserAnthropicKey.nonce,
                UserAnthropicKey.key_id,
                UserAnthropicKey.max_concurrent,
                UserAnthropicKey.cap_version,
            )
            .where(UserAnthropicKey.user == user_id)
            .first()
            .run()
        )
    return None if row is None else _credential(user_id, row)


# ------------------------------------------------------------ master-key rotation


async def count_keys_by_key_id() -> dict[str | None, int]:
    """How many stored keys each master key id made (None: made before key ids)."""
    with translate_errors():
        rows = await UserAnthropicKey.raw(
            "SELECT key_id, COUNT(*) AS n FROM user_anthropic_keys GROUP BY key_id"
        ).run()
    return {row["key_id"]: int(row["n"]) for row in rows}


# Rows not yet under the target key, in user order from a starting point (keyset
# pagination: a row that cannot be re-encrypted is passed over, never met again). On
# Postgres the batch's rows are locked until its commit, so a key stored meanwhile by a
# settings PUT waits, then lands on top (never overwritten with the old plaintext);
# SQLite's BEGIN IMMEDIATE already keeps every other writer out.
_ROTATION_BATCH_SQL: Final = """
    SELECT "user" AS user_id, ciphertext, nonce, key_id
    FROM user_anthropic_keys
    WHERE (key_id IS NULL OR key_id <> {{}}) {after}
    ORDER BY "user"
    LIMIT {limit}{lock}
"""


async def reencrypt_batch(
    *,
    target_key_id: str,
    after: uuid.UUID | None,
    limit: int,
    reencrypt: Callable[[StoredCiphertext], tuple[bytes, bytes, str] | None],
) -> Reencrypted:
    """In one write transaction: up to ``limit`` stored keys (by user id, after ``after``)
    not under ``target_key_id``, each rewritten with what ``reencrypt`` returns
    (ciphertext, nonce, key id), or left alone and reported when it returns None.

    Only the ciphertext, nonce and key id change: not the cap version (nothing about the
    credential's gate changed) nor ``updated_at`` (the user changed nothing).
    """
    postgres = not isinstance(User._meta.db, SQLiteEngine)
    sql = _ROTATION_BATCH_SQL.format(
        after="" if after is None else 'AND "user" > {}',
        limit=int(limit),
        lock=" FOR UPDATE" if postgres else "",
    )
    args: list[object] = [target_key_id] if after is None else [target_key_id, after]
    rewritten, failed = 0, []
    last: uuid.UUID | None = None
    with translate_errors():
        async with _write_transaction():
            rows = await UserAnthropicKey.raw(sql, *args).run()
            for row in rows:
                stored = StoredCiphertext(
                    user_id=_uuid(row["user_id"]),
                    ciphertext=bytes(row["ciphertext"]),
                    nonce=bytes(row["nonce"]),
                    key_id=row["key_id"],
                )
                last = stored.user_id
                result = reencrypt(stored)
                if result is None:
                    failed.append(stored.user_id)
                    continue
                ciphertext, nonce, key_id = result
                await UserAnthropicKey.update(
                    {
                        UserAnthropicKey.ciphertext: ciphertext,
                        UserAnthropicKey.nonce: nonce,
                        UserAnthropicKey.key_id: key_id,
                    }
                ).where(UserAnthropicKey.user == stored.user_id).run()
                rewritten += 1
    return Reencrypted(rewritten=rewritten, failed=failed, last_user=last)


# -------------------------------------------------------------------------- helpers


def _next_cap_version(previous: int | None) -> int:
    # Semaphores are named from (user id, cap version), and a reused name would join a
    # new counter to an old one. Microseconds since the epoch cannot repeat a version
    # after a DELETE then a PUT (when the old row and its last version are gone), and
    # max(old + 1, now) keeps versions rising when two changes share a microsecond or
    # the clock steps back.
    now = time.time_ns() // 1000
    return now if previous is None else max(previous + 1, now)


def _write_transaction() -> BaseTransaction:
    engine = User._meta.db
    if isinstance(engine, SQLiteEngine):
        # Take the write lock up front: a deferred transaction that reads, then writes,
        # fails with SQLITE_BUSY at once when another worker wrote in between.
        return engine.transaction(transaction_type=TransactionType.immediate)
    transaction: BaseTransaction = engine.transaction()
    return transaction


# On Postgres the user's row is locked for the rest of the transaction, which serialises
# every key change of one user, including the first insert (a lock on the key row would
# leave two concurrent inserts racing). The lock is its own statement: in READ COMMITTED
# a statement that waited for a row lock still sees the other, joined rows as they were
# when it started, so the key row is read by a second statement, after the wait.
# SQLite's BEGIN IMMEDIATE already serialises writers.
_LOCK_USER_SQL: Final = "SELECT id FROM users WHERE id = {} FOR NO KEY UPDATE"
_KEY_ROW_SQL: Final = """
    SELECT u.id AS user_id, k.cap_version AS cap_version,
           k.max_concurrent AS max_concurrent, k.updated_at AS updated_at
    FROM users AS u
    LEFT JOIN user_anthropic_keys AS k ON k."user" = u.id
    WHERE u.id = {}
"""


async def _lock_key_row(user_id: uuid.UUID) -> tuple[CapState, datetime] | None:
    """Inside a write transaction: the stored cap state and updated_at, or None."""
    if not isinstance(User._meta.db, SQLiteEngine):
        await User.raw(_LOCK_USER_SQL, user_id).run()
    rows = await User.raw(_KEY_ROW_SQL, user_id).run()
    if not rows:
        raise IntegrityViolation(f"no user with id {user_id}")
    row = rows[0]
    if row["cap_version"] is None:
        return None
    return _cap_state(row), _utc(row["updated_at"])


async def _update_key(
    user_id: uuid.UUID, current: CapState, updated_at: datetime, extra: dict[Any, Any]
) -> None:
    values = {
        UserAnthropicKey.max_concurrent: current.max_concurrent,
        UserAnthropicKey.cap_version: current.cap_version,
        UserAnthropicKey.updated_at: updated_at,
        **extra,
    }
    await UserAnthropicKey.update(values).where(UserAnthropicKey.user == user_id).run()


def _select_tokens() -> Select[GatewayToken]:
    return GatewayToken.select(
        GatewayToken.id,
        GatewayToken.user.as_alias("user_id"),
        GatewayToken.user.name.as_alias("user_name"),
        GatewayToken.label,
        GatewayToken.created_at,
        GatewayToken.revoked_at,
        GatewayToken.expires_at,
        GatewayToken.last_used_at,
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _advance(previous: datetime, now: datetime) -> datetime:
    # updated_at is what clients see as "configured at": it must move on every change.
    return max(now, previous + _ONE_MICROSECOND)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _uuid(value: Any) -> uuid.UUID:
    # asyncpg returns its own UUID subclass; SQLite may return text. Normalise both.
    return value if type(value) is uuid.UUID else uuid.UUID(str(value))


def _user(row: dict[str, Any]) -> UserRecord:
    return UserRecord(id=_uuid(row["id"]), name=row["name"], created_at=_utc(row["created_at"]))


def _token(row: dict[str, Any]) -> TokenRecord:
    revoked_at, expires_at, last_used_at = (
        row["revoked_at"],
        row["expires_at"],
        row["last_used_at"],
    )
    return TokenRecord(
        id=row["id"],
        user_id=_uuid(row["user_id"]),
        user_name=row["user_name"],
        label=row["label"],
        created_at=_utc(row["created_at"]),
        revoked_at=None if revoked_at is None else _utc(revoked_at),
        expires_at=None if expires_at is None else _utc(expires_at),
        last_used_at=None if last_used_at is None else _utc(last_used_at),
    )


def _cap_state(row: dict[str, Any]) -> CapState:
    return CapState(cap_version=row["cap_version"], max_concurrent=row["max_concurrent"])


def _credential(user_id: uuid.UUID, row: dict[str, Any]) -> Credential:
    return Credential(
        user_id=user_id,
        ciphertext=bytes(row["ciphertext"]),
        nonce=bytes(row["nonce"]),
        max_concurrent=row["max_concurrent"],
        cap_version=row["cap_version"],
        key_id=row["key_id"],
    )
