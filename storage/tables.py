"""Piccolo tables: users, their gateway tokens, their encrypted Anthropic keys, their usage."""

from __future__ import annotations

from piccolo.columns import (
    UUID,
    BigInt,
    BigSerial,
    Bytea,
    ForeignKey,
    Integer,
    OnDelete,
    Serial,
    Timestamptz,
    Varchar,
)
from piccolo.table import Table

DEFAULT_MAX_CONCURRENT = 8
MIN_MAX_CONCURRENT = 1
MAX_MAX_CONCURRENT = 256


class User(Table, tablename="users"):
    id = UUID(
        primary_key=True,
        help_text="Random (uuid4), never reused: semaphore names and key encryption use it.",
    )
    name = Varchar(
        length=100,
        unique=True,
        null=False,
        help_text="Unique login-style name: 1..64 of letters, digits, . _ - @ (storage.names; "
        "checked by the database).",
    )
    created_at = Timestamptz(help_text="When the user was created (UTC).")


class GatewayToken(Table, tablename="gateway_tokens"):
    id = Serial(primary_key=True, help_text="Small id the command line uses to revoke a token.")
    user = ForeignKey(
        references=User,
        on_delete=OnDelete.cascade,
        null=False,
        index=True,
        help_text="Owner; tokens go with their user.",
    )
    token_hash = Varchar(
        length=64,
        unique=True,
        null=False,
        help_text="Hex SHA-256 of the token; the token itself is never stored.",
    )
    label = Varchar(
        length=200,
        default="",
        help_text="Text to tell tokens apart: at most 100 characters, no control characters.",
    )
    created_at = Timestamptz(help_text="When the token was issued (UTC).")
    revoked_at = Timestamptz(
        null=True, default=None, help_text="When the token was revoked; NULL while valid."
    )
    expires_at = Timestamptz(
        null=True, default=None, help_text="When the token stops working; NULL: never."
    )
    last_used_at = Timestamptz(
        null=True,
        default=None,
        help_text="Last use, recorded at most about once a minute per token (NULL: never).",
    )


class UserAnthropicKey(Table, tablename="user_anthropic_keys"):
    # The user id is this table's primary key (one key per user) and a foreign key.
    user = ForeignKey(
        references=User,
        primary_key=True,
        on_delete=OnDelete.cascade,
        null=False,
        help_text="Owner and primary key: one Anthropic key per user.",
    )
    ciphertext = Bytea(help_text="AES-256-GCM ciphertext of the key; associated data = user id.")
    nonce = Bytea(help_text="The 96-bit GCM nonce, random per encryption.")
    key_id = Varchar(
        length=16,
        null=True,
        default=None,
        help_text="Id of the master key that made the ciphertext; NULL: made before key ids "
        "(tried under every key of the ring).",
    )
    max_concurrent = Integer(
        default=DEFAULT_MAX_CONCURRENT,
        null=False,
        help_text="Concurrent requests allowed on this key, 1..256 (enforced by the database).",
    )
    cap_version = BigInt(
        null=False,
        help_text="Bumped on every change of key or cap, never repeated; names the semaphore.",
    )
    created_at = Timestamptz(help_text="When the key was first stored (UTC).")
    updated_at = Timestamptz(help_text="When the key or its cap last changed (UTC).")
    key_stored_at = Timestamptz(
        null=True,
        default=None,
        help_text="When the key itself was last stored or rotated (UTC); a cap change "
        "leaves it.",
    )


class UsageHourly(Table, tablename="usage_hourly"):
    # Unique on (user, hour, model): a unique index of its own migration, since Piccolo
    # has no composite unique column option. Workers add to a row, never overwrite it.
    id = BigSerial(primary_key=True)
    user = ForeignKey(
        references=User,
        on_delete=OnDelete.cascade,
        null=False,
        index=False,  # the unique index on (user, hour, model) leads with it
        help_text="Whose requests; their usage goes with them.",
    )
    hour = Timestamptz(help_text="The UTC hour the requests ended in (minutes and seconds 0).")
    model = Varchar(
        length=200,
        null=False,
        default="",
        help_text="The model the upstream named in its answer; '' when none was read.",
    )
    requests = BigInt(null=False, default=0, help_text="Requests forwarded upstream.")
    rejected = BigInt(null=False, default=0, help_text="Requests refused with a 429 over a cap.")
    input_tokens = BigInt(null=False, default=0)
    output_tokens = BigInt(null=False, default=0)
    cache_creation_input_tokens = BigInt(null=False, default=0)
    cache_read_input_tokens = BigInt(null=False, default=0)


TABLES: tuple[type[Table], ...] = (User, GatewayToken, UserAnthropicKey, UsageHourly)
