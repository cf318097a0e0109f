"""Piccolo tables: users, their gateway tokens, and their encrypted Anthropic keys."""

from __future__ import annotations

from piccolo.columns import (
    UUID,
    BigInt,
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


TABLES: tuple[type[Table], ...] = (User, GatewayToken, UserAnthropicKey)
