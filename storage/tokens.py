"""Gateway tokens: random 256-bit secrets, stored only as their SHA-256."""

from __future__ import annotations

import hashlib
import secrets
from typing import Final

TOKEN_PREFIX: Final = "gwt_"


def new_token() -> str:
    """A fresh token: ``gwt_`` and 32 random bytes, URL-safe base64 (43 characters)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Hex SHA-256: what the database stores and looks tokens up by.

    A plain hash suffices (no salt, no slow KDF) because tokens carry 256 random bits.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
