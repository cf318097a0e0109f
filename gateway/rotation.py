"""Master-key rotation: every stored Anthropic key re-encrypted under the keyring's new key.

Run by ``gateway keys rotate-master`` while the gateway serves. Rows are rewritten in
batches, one write transaction each (so workers and settings changes wait at most one
batch for the database), with the user id still the associated data. The rotation
changes neither the cap version nor ``updated_at``: a cached credential stays valid (its
key in clear did not change), and a worker reading a rewritten row finds the new key id
in its keyring (see ``storage.keyring``).
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from storage import repository
from storage.crypto import MasterKey
from storage.errors import DecryptionError
from storage.keyring import Keyring

# Passes over the table: a key stored under an older key while a pass ran (a worker that
# had not yet read the new keyring) is caught by the next one.
MAX_PASSES = 5


class RotationError(Exception):
    """The rotation cannot start as asked (the message says what to do first)."""


class RotationReport(msgspec.Struct, frozen=True):
    key_id: str
    rewritten: int
    batches: int
    failed: list[str]  # user ids whose stored key decrypts under no key of the ring


def check_new_key(keyring: Keyring, new_key: MasterKey, *, source: str) -> None:
    """The new key must already lead the keyring the workers read: otherwise a worker
    could meet a key it cannot decrypt, or store new keys under the old one."""
    if new_key.key_id not in keyring:
        raise RotationError(
            f"the new master key (id {new_key.key_id}) is not in the gateway's keyring "
            f"{source} (ids {', '.join(keyring.key_ids)}): add it there first, in front of "
            "the old one, and let the workers pick it up (README: 'Rotate the master "
            "key'); nothing was changed"
        )
    if keyring.primary.key_id != new_key.key_id:
        raise RotationError(
            f"the new master key (id {new_key.key_id}) must come first in the keyring "
            f"{source} (it encrypts keys stored from now on), but {keyring.primary.key_id} "
            "does; nothing was changed"
        )


async def rotate(
    keyring: Keyring,
    *,
    batch_size: int,
    progress: Callable[[int, int], None] = lambda batch, rewritten: None,
) -> RotationReport:
    """Re-encrypt every stored key not under the keyring's first key with it."""
    new_key = keyring.primary

    def reencrypt(stored: repository.StoredCiphertext) -> tuple[bytes, bytes, str] | None:
        try:
            plaintext = keyring.decrypt(
                stored.ciphertext, stored.nonce, key_id=stored.key_id, user_id=stored.user_id
            )
        except DecryptionError:
            return None
        ciphertext, nonce = new_key.encrypt(plaintext, user_id=stored.user_id)
        return ciphertext, nonce, new_key.key_id

    rewritten = batches = 0
    failed: dict[str, None] = {}
    for _ in range(MAX_PASSES):
        in_pass = 0
        after = None
        while True:
            batch = await repository.reencrypt_batch(
                target_key_id=new_key.key_id, after=after, limit=batch_size, reencrypt=reencrypt
            )
            if batch.last_user is None:
                break
            batches += 1
            in_pass += batch.rewritten
            rewritten += batch.rewritten
            failed.update((str(user_id), None) for user_id in batch.failed)
            progress(batches, rewritten)
            after = batch.last_user
        if in_pass == 0:
            break
    return RotationReport(
        key_id=new_key.key_id, rewritten=rewritten, batches=batches, failed=list(failed)
    )
