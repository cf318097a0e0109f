"""The master keyring: key ids, several keys, and a key file read again when it changes."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from storage.crypto import MasterKey
from storage.errors import DecryptionError, MasterKeyError, UnknownKeyId
from storage.keyring import Keyring, KeyringSource, read_keyring_file

SECRET = "sk-ant-test-keyring-0123456789"


def test_a_key_id_is_a_short_stable_fingerprint_that_reveals_nothing() -> None:
    key = MasterKey.generate()
    again = MasterKey.from_base64(key.to_base64())
    assert key.key_id == again.key_id
    assert len(key.key_id) == 8 and int(key.key_id, 16) >= 0
    assert key.key_id != MasterKey.generate().key_id
    assert key.key_id not in key.to_base64()
    assert key.to_base64() not in repr(key)


def test_the_first_key_encrypts_and_each_decrypts_what_it_made() -> None:
    new, old = MasterKey.generate(), MasterKey.generate()
    user_id = uuid.uuid4()
    old_ciphertext, old_nonce = old.encrypt(SECRET, user_id=user_id)
    ring = Keyring.parse(f"{new.to_base64()}, {old.to_base64()}", where="test")
    assert ring.key_ids == (new.key_id, old.key_id)
    ciphertext, nonce, key_id = ring.encrypt(SECRET, user_id=user_id)
    assert key_id == new.key_id
    assert new.decrypt(ciphertext, nonce, user_id=user_id) == SECRET
    assert ring.decrypt(ciphertext, nonce, key_id=new.key_id, user_id=user_id) == SECRET
    assert ring.decrypt(old_ciphertext, old_nonce, key_id=old.key_id, user_id=user_id) == SECRET
    # The id picks the key: the wrong one named is a failure, not a search.
    with pytest.raises(DecryptionError):
        ring.decrypt(old_ciphertext, old_nonce, key_id=new.key_id, user_id=user_id)


def test_an_unknown_key_id_is_named_and_a_moved_ciphertext_still_fails() -> None:
    key, outsider = MasterKey.generate(), MasterKey.generate()
    ring = Keyring([key])
    user_id = uuid.uuid4()
    ciphertext, nonce = outsider.encrypt(SECRET, user_id=user_id)
    with pytest.raises(UnknownKeyId) as caught:
        ring.decrypt(ciphertext, nonce, key_id=outsider.key_id, user_id=user_id)
    assert caught.value.key_id == outsider.key_id
    assert outsider.key_id in str(caught.value) and key.key_id in str(caught.value)
    mine, my_nonce, key_id = ring.encrypt(SECRET, user_id=user_id)
    with pytest.raises(DecryptionError):
        ring.decrypt(mine, my_nonce, key_id=key_id, user_id=uuid.uuid4())


def test_ciphertexts_made_before_key_ids_are_tried_under_every_key() -> None:
    new, old = MasterKey.generate(), MasterKey.generate()
    user_id = uuid.uuid4()
    legacy, nonce = old.encrypt(SECRET, user_id=user_id)
    assert Keyring([new, old]).decrypt(legacy, nonce, key_id=None, user_id=user_id) == SECRET
    with pytest.raises(DecryptionError, match="made before key ids"):
        Keyring([new]).decrypt(legacy, nonce, key_id=None, user_id=user_id)
    with pytest.raises(DecryptionError):
        Keyring([new, old]).decrypt(legacy, nonce, key_id=None, user_id=uuid.uuid4())


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "holds no master key"),
        ("  ,\n # only a comment\n", "holds no master key"),
        ("not-base64!", "not valid base64"),
        (f"{MasterKey.generate().to_base64()},bm9wZQ==", "key 2 of test"),
    ],
)
def test_bad_keyrings_are_refused_naming_the_key(text: str, complaint: str) -> None:
    with pytest.raises(MasterKeyError, match=complaint):
        Keyring.parse(text, where="test")


def test_a_key_listed_twice_is_refused() -> None:
    key = MasterKey.generate().to_base64()
    with pytest.raises(MasterKeyError, match="listed twice"):
        Keyring.parse(f"{key}\n{key}\n", where="test")


def test_a_key_file_holds_one_key_a_line_with_comments(tmp_path: Path) -> None:
    new, old = MasterKey.generate(), MasterKey.generate()
    path = tmp_path / "master.key"
    path.write_text(f"# new, since 2026-12-01\n{new.to_base64()}\n\n{old.to_base64()}  # old\n")
    assert read_keyring_file(path).key_ids == (new.key_id, old.key_id)


def test_a_key_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    old, new = MasterKey.generate(), MasterKey.generate()
    path = tmp_path / "master.key"
    path.write_text(old.to_base64() + "\n")
    source = KeyringSource.from_file(path)
    first = source.current()
    assert first.key_ids == (old.key_id,)
    assert source.current() is first  # unchanged file: nothing read

    # Replaced the way the README says (a new file moved into place).
    staged = tmp_path / "master.key.new"
    staged.write_text(f"{new.to_base64()}\n{old.to_base64()}\n")
    staged.replace(path)
    assert source.current().key_ids == (new.key_id, old.key_id)

    # A file caught half written keeps the ring held, and is read again next time.
    path.write_text(new.to_base64()[:20])
    assert source.current().key_ids == (new.key_id, old.key_id)
    path.write_text(new.to_base64() + "\n")
    assert source.current().key_ids == (new.key_id,)
