"""Encryption of users' Anthropic keys under the gateway's master key (AES-256-GCM)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import uuid
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from storage.errors import DecryptionError, MasterKeyError

KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12  # 96 bits, the size GCM is designed for
# A key id is a keyed hash of the key itself, cut to 8 hex digits: enough to tell a few
# keys in a ring apart, and nothing an attacker could use to recover or test a key.
KEY_ID_HEX: Final = 8
_KEY_ID_LABEL: Final = b"gateway master key id v1"
_HOW_TO_MAKE_ONE: Final = "make one with `gateway keygen`"


class MasterKey:
    """The 32-byte key that encrypts every stored Anthropic key; never printed."""

    __slots__ = ("_aead", "_key", "key_id")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise MasterKeyError(
                f"the master key must be {KEY_BYTES} bytes, got {len(key)}; {_HOW_TO_MAKE_ONE}"
            )
        self._aead = AESGCM(key)
        self._key = key
        self.key_id = hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:KEY_ID_HEX]

    @classmethod
    def from_base64(cls, text: str) -> MasterKey:
        """Parse standard base64 of exactly 32 bytes (surrounding whitespace allowed)."""
        stripped = text.strip()
        if not stripped:
            raise MasterKeyError(f"the master key is empty; {_HOW_TO_MAKE_ONE}")
        try:
            key = base64.b64decode(stripped, validate=True)
        except (binascii.Error, ValueError):
            raise MasterKeyError(
                f"the master key is not valid base64; {_HOW_TO_MAKE_ONE}"
            ) from None
        if len(key) != KEY_BYTES:
            raise MasterKeyError(
                f"the master key must be base64 of {KEY_BYTES} bytes, got {len(key)} bytes; "
                f"{_HOW_TO_MAKE_ONE}"
            )
        return cls(key)

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    def to_base64(self) -> str:
        return base64.b64encode(self._key).decode("ascii")

    def __repr__(self) -> str:
        return f"MasterKey(key_id={self.key_id!r})"

    def encrypt(self, plaintext: str, *, user_id: uuid.UUID) -> tuple[bytes, bytes]:
        """Return (ciphertext, nonce); the user id is bound as associated data."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return self._aead.encrypt(nonce, plaintext.encode("utf-8"), user_id.bytes), nonce

    def decrypt(self, ciphertext: bytes, nonce: bytes, *, user_id: uuid.UUID) -> str:
        """The plaintext, or DecryptionError if key, user id, nonce or ciphertext differ."""
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, user_id.bytes)
        except (InvalidTag, ValueError):
            # ValueError: a nonce of the wrong length. Neither message carries a secret,
            # but ours says what the operator can act on.
            raise DecryptionError(
                f"the stored Anthropic key of user {user_id} does not decrypt under this "
                "master key (wrong master key, or the row was altered)"
            ) from None
        return plaintext.decode("utf-8")


def load_or_create_master_key_file(path: Path) -> tuple[MasterKey, bool]:
    """Read the master key from ``path``, creating it (mode 0600) if absent.

    Returns the key and whether this call created the file. The new file is written in
    full under a temporary name, then hard-linked into place, which fails if ``path``
    exists (like O_EXCL): two processes starting at once agree on one key, and no reader
    ever sees a half-written file.
    """
    if path.exists():
        return _read_master_key_file(path), False
    key = MasterKey.generate()
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as file:
            os.fchmod(file.fileno(), 0o600)  # exact, whatever the umask
            file.write(key.to_base64() + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return _read_master_key_file(path), False
    except OSError as exc:
        raise MasterKeyError(f"cannot create the master key file {path}: {exc}") from exc
    finally:
        temporary.unlink(missing_ok=True)
    return key, True


def _read_master_key_file(path: Path) -> MasterKey:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise MasterKeyError(f"cannot read the master key file {path}: {exc}") from exc
    try:
        return MasterKey.from_base64(text)
    except MasterKeyError as exc:
        raise MasterKeyError(f"the master key file {path} is unusable: {exc}") from None
