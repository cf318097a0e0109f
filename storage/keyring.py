"""The master keyring: several master keys, picked by key id, the first one encrypting.

Every stored ciphertext carries the key id of the master key that made it (a short
fingerprint, ``MasterKey.key_id``), so during a rotation a keyring holding the new key
and the old one decrypts both. Ciphertexts stored before key ids existed have none
(``NULL``): they are tried under each key of the ring in turn, so they keep working
until ``gateway keys rotate-master`` gives them one.

A keyring comes from ``GATEWAY_MASTER_KEY`` (keys separated by commas or whitespace) or
from a key file (one key per line, ``#`` comments allowed). A ``KeyringSource`` over a
file reads it again when it changed on disk, which is how running workers pick up a
new key without a restart.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable
from pathlib import Path

from storage.crypto import MasterKey, load_or_create_master_key_file
from storage.errors import DecryptionError, MasterKeyError, UnknownKeyId

log = logging.getLogger("storage.keyring")

_SEPARATORS = re.compile(r"[\s,]+")


class Keyring:
    """Master keys, newest first: the first encrypts, any decrypts what it made."""

    __slots__ = ("_by_id", "keys")

    def __init__(self, keys: Iterable[MasterKey]) -> None:
        self.keys = tuple(keys)
        if not self.keys:
            raise MasterKeyError("the master keyring is empty; make a key with `gateway keygen`")
        self._by_id: dict[str, MasterKey] = {}
        for key in self.keys:
            if key.key_id in self._by_id:
                raise MasterKeyError(f"the master key with id {key.key_id} is listed twice")
            self._by_id[key.key_id] = key

    @classmethod
    def parse(cls, text: str, *, where: str) -> Keyring:
        """Keys in base64, separated by commas, spaces or newlines; ``#`` starts a comment."""
        lines = (line.split("#", 1)[0] for line in text.splitlines())
        words = [word for line in lines for word in _SEPARATORS.split(line) if word]
        if not words:
            raise MasterKeyError(f"{where} holds no master key; make one with `gateway keygen`")
        keys = []
        for position, word in enumerate(words, 1):
            try:
                keys.append(MasterKey.from_base64(word))
            except MasterKeyError as exc:
                which = where if len(words) == 1 else f"key {position} of {where}"
                raise MasterKeyError(f"{exc} ({which})") from None
        try:
            return cls(keys)
        except MasterKeyError as exc:
            raise MasterKeyError(f"{where}: {exc}") from None

    @property
    def primary(self) -> MasterKey:
        return self.keys[0]

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(key.key_id for key in self.keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._by_id

    def __repr__(self) -> str:
        return f"Keyring(key_ids={list(self.key_ids)!r})"

    def encrypt(self, plaintext: str, *, user_id: uuid.UUID) -> tuple[bytes, bytes, str]:
        """(ciphertext, nonce, key id) under the first key; associated data = user id."""
        ciphertext, nonce = self.primary.encrypt(plaintext, user_id=user_id)
        return ciphertext, nonce, self.primary.key_id

    def decrypt(
        self, ciphertext: bytes, nonce: bytes, *, key_id: str | None, user_id: uuid.UUID
    ) -> str:
        """The plaintext under the key named by ``key_id`` (every key in turn when None);
        ``UnknownKeyId`` when the ring lacks that key, ``DecryptionError`` otherwise."""
        if key_id is not None:
            key = self._by_id.get(key_id)
            if key is None:
                raise UnknownKeyId(
                    f"the stored Anthropic key of user {user_id} was encrypted under master "
                    f"key id {key_id}, which is not in this gateway's keyring "
                    f"({', '.join(self.key_ids)})",
                    key_id=key_id,
                )
            return key.decrypt(ciphertext, nonce, user_id=user_id)
        for key in self.keys:
            try:
                return key.decrypt(ciphertext, nonce, user_id=user_id)
            except DecryptionError:
                continue
        raise DecryptionError(
            f"the stored Anthropic key of user {user_id} (made before key ids) does not "
            "decrypt under any master key of the keyring (wrong keys, or the row was altered)"
        )


class KeyringSource:
    """Where a process's keyring comes from; ``current()`` is the keyring to use now.

    From the environment the ring is fixed for the life of the process. From a file it
    is read again whenever the file changed (inode, size or modification time, one
    ``stat`` per call): a worker calls ``current()`` before encrypting and again after a
    key id it does not know, so a key added to the file is used without a restart. A file
    that does not parse (caught mid-write) keeps the previous ring, and is read again on
    the next call.
    """

    __slots__ = ("_keyring", "_seen", "path")

    def __init__(self, keyring: Keyring, *, path: Path | None = None) -> None:
        self._keyring = keyring
        self.path = path
        self._seen = _signature(path) if path is not None else None

    @classmethod
    def from_file(cls, path: Path) -> KeyringSource:
        signature = _signature(path)
        source = cls(read_keyring_file(path), path=path)
        source._seen = signature
        return source

    def current(self) -> Keyring:
        if self.path is None:
            return self._keyring
        signature = _signature(self.path)
        if signature == self._seen:
            return self._keyring
        try:
            keyring = read_keyring_file(self.path)
        except MasterKeyError as exc:
            log.warning("master key file not reloaded, keeping the keys held: %s", exc)
            return self._keyring
        if keyring.key_ids != self._keyring.key_ids:
            log.info(
                "master keyring reloaded",
                extra={"key_ids": list(keyring.key_ids), "path": str(self.path)},
            )
        self._keyring, self._seen = keyring, signature
        return keyring

    def __repr__(self) -> str:
        return f"KeyringSource(path={self.path!r}, {self._keyring!r})"


def read_keyring_file(path: Path) -> Keyring:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise MasterKeyError(f"cannot read the master key file {path}: {exc}") from None
    return Keyring.parse(text, where=f"the master key file {path}")


def open_keyring_file(path: Path, *, create: bool) -> tuple[KeyringSource, bool]:
    """The source over ``path`` and whether it was just created (a new single key,
    mode 0600) because ``create`` was asked and the file was absent."""
    created = False
    if create and not path.exists():
        _key, created = load_or_create_master_key_file(path)
    return KeyringSource.from_file(path), created


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
