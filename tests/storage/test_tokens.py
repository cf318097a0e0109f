"""Gateway tokens: shape, randomness and hashing."""

from __future__ import annotations

import hashlib
import re

from storage.tokens import TOKEN_PREFIX, hash_token, new_token


def test_new_token_has_prefix_and_256_random_bits() -> None:
    token = new_token()
    assert token.startswith(TOKEN_PREFIX)
    body = token.removeprefix(TOKEN_PREFIX)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", body)  # 32 bytes, URL-safe base64


def test_new_tokens_differ() -> None:
    assert len({new_token() for _ in range(1000)}) == 1000


def test_hash_token_is_hex_sha256() -> None:
    token = new_token()
    assert hash_token(token) == hashlib.sha256(token.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", hash_token(token))
    assert hash_token(token) == hash_token(token)
    assert hash_token(token) != hash_token(new_token())
