"""Key encryption under the master key, and the master key file."""

from __future__ import annotations

import base64
import stat
import uuid
from pathlib import Path

import pytest

from storage.crypto import MasterKey, load_or_create_master_key_file
from storage.errors import CryptoError, DecryptionError, MasterKeyError, StorageError

SECRET = "sk-ant-api03-" + "x" * 80


def test_round_trip(master_key: MasterKey) -> None:
    user_id = uuid.uuid4()
    ciphertext, nonce = master_key.encrypt(SECRET, user_id=user_id)
    assert len(nonce) == 12
    assert SECRET.encode() not in ciphertext
    assert master_key.decrypt(ciphertext, nonce, user_id=user_id) == SECRET


def test_wrong_master_key_fails(master_key: MasterKey) -> None:
    user_id = uuid.uuid4()
    ciphertext, nonce = master_key.encrypt(SECRET, user_id=user_id)
    with pytest.raises(DecryptionError):
        MasterKey.generate().decrypt(ciphertext, nonce, user_id=user_id)


def test_wrong_user_id_fails(master_key: MasterKey) -> None:
    # The user id is associated data: a ciphertext copied to another user's row is useless.
    ciphertext, nonce = master_key.encrypt(SECRET, user_id=uuid.uuid4())
    with pytest.raises(DecryptionError):
        master_key.decrypt(ciphertext, nonce, user_id=uuid.uuid4())


def test_tampered_ciphertext_fails(master_key: MasterKey) -> None:
    user_id = uuid.uuid4()
    ciphertext, nonce = master_key.encrypt(SECRET, user_id=user_id)
    tampered = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    with pytest.raises(DecryptionError):
        master_key.decrypt(tampered, nonce, user_id=user_id)
    with pytest.raises(DecryptionError):
        master_key.decrypt(ciphertext[:-1], nonce, user_id=user_id)


def test_tampered_nonce_fails(master_key: MasterKey) -> None:
    user_id = uuid.uuid4()
    ciphertext, nonce = master_key.encrypt(SECRET, user_id=user_id)
    with pytest.raises(DecryptionError):
        master_key.decrypt(ciphertext, bytes([nonce[0] ^ 1]) + nonce[1:], user_id=user_id)
    with pytest.raises(DecryptionError):
        master_key.decrypt(ciphertext, nonce[:8], user_id=user_id)


def test_decryption_error_reveals_nothing(master_key: MasterKey) -> None:
    user_id = uuid.uuid4()
    ciphertext, nonce = master_key.encrypt(SECRET, user_id=user_id)
    with pytest.raises(DecryptionError) as caught:
        MasterKey.generate().decrypt(ciphertext, nonce, user_id=user_id)
    message = str(caught.value)
    assert SECRET not in message
    assert master_key.to_base64() not in message
    assert isinstance(caught.value, CryptoError)
    assert isinstance(caught.value, StorageError)


def test_nonces_never_repeat(master_key: MasterKey) -> None:
    user_id = uuid.uuid4()
    encryptions = [master_key.encrypt(SECRET, user_id=user_id) for _ in range(5000)]
    assert len({nonce for _, nonce in encryptions}) == len(encryptions)
    assert len({ciphertext for ciphertext, _ in encryptions}) == len(encryptions)


def test_base64_round_trip_and_hidden_repr(master_key: MasterKey) -> None:
    text = master_key.to_base64()
    assert len(base64.b64decode(text)) == 32
    again = MasterKey.from_base64(text + "\n")
    user_id = uuid.uuid4()
    assert again.decrypt(*master_key.encrypt("k", user_id=user_id), user_id=user_id) == "k"
    assert text not in repr(master_key)
    assert text not in str(master_key)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        pytest.param("not base64 at all!", "not valid base64", id="not-base64"),
        pytest.param(base64.b64encode(b"k" * 16).decode(), "got 16 bytes", id="16-bytes"),
        pytest.param(base64.b64encode(b"k" * 33).decode(), "got 33 bytes", id="33-bytes"),
        pytest.param("", "empty", id="empty"),
        pytest.param("   \n", "empty", id="blank"),
    ],
)
def test_bad_master_key_formats(text: str, complaint: str) -> None:
    with pytest.raises(MasterKeyError) as caught:
        MasterKey.from_base64(text)
    assert complaint in str(caught.value)
    assert "gateway keygen" in str(caught.value)


def test_key_file_is_created_0600_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "data" / "master.key"
    created_key, created = load_or_create_master_key_file(path)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == created_key.to_base64() + "\n"
    read_key, created_again = load_or_create_master_key_file(path)
    assert not created_again
    assert read_key.to_base64() == created_key.to_base64()
    assert [p.name for p in path.parent.iterdir()] == ["master.key"]  # no temporary left


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("garbage\n", id="not-base64"),
        pytest.param(base64.b64encode(b"k" * 16).decode() + "\n", id="16-bytes"),
        pytest.param("", id="empty"),
    ],
)
def test_bad_key_file_names_the_path(tmp_path: Path, content: str) -> None:
    path = tmp_path / "master.key"
    path.write_text(content)
    with pytest.raises(MasterKeyError) as caught:
        load_or_create_master_key_file(path)
    assert str(path) in str(caught.value)
    assert path.read_text() == content  # never overwritten
