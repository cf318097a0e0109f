"""Where a process's master keyring comes from: the environment, or a key file."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.resources import resolve_keyring
from gateway.settings import Settings, SettingsError
from storage.crypto import MasterKey
from storage.errors import MasterKeyError

POSTGRES_URL = "postgresql://gateway@127.0.0.1:5432/nowhere"


def settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"GATEWAY_DATA_DIR": str(tmp_path / "data"), **env})


def test_the_environment_may_list_several_keys_new_first(tmp_path: Path) -> None:
    new, old = MasterKey.generate(), MasterKey.generate()
    source = resolve_keyring(
        settings(tmp_path, GATEWAY_MASTER_KEY=f" {new.to_base64()} ,{old.to_base64()}\n")
    )
    assert source.path is None
    assert source.current().key_ids == (new.key_id, old.key_id)
    assert new.to_base64() not in repr(settings(tmp_path, GATEWAY_MASTER_KEY=new.to_base64()))


def test_a_named_key_file_serves_any_database_and_is_never_created(tmp_path: Path) -> None:
    key = MasterKey.generate()
    path = tmp_path / "master.key"
    with pytest.raises(MasterKeyError, match="cannot read the master key file"):
        resolve_keyring(
            settings(tmp_path, GATEWAY_DATABASE_URL=POSTGRES_URL, GATEWAY_MASTER_KEY_FILE=str(path))
        )
    assert not path.exists()
    path.write_text(key.to_base64() + "\n")
    source = resolve_keyring(
        settings(tmp_path, GATEWAY_DATABASE_URL=POSTGRES_URL, GATEWAY_MASTER_KEY_FILE=str(path))
    )
    assert source.path == path
    assert source.current().key_ids == (key.key_id,)


def test_postgres_needs_a_key_and_sqlite_makes_its_own(tmp_path: Path) -> None:
    with pytest.raises(MasterKeyError, match="GATEWAY_MASTER_KEY_FILE is required"):
        resolve_keyring(settings(tmp_path, GATEWAY_DATABASE_URL=POSTGRES_URL))
    # The command line reads the file; only the server makes it.
    with pytest.raises(MasterKeyError, match="cannot read the master key file"):
        resolve_keyring(settings(tmp_path), create=False)
    assert not (tmp_path / "data" / "master.key").exists()
    source = resolve_keyring(settings(tmp_path))
    assert source.path == tmp_path / "data" / "master.key"
    assert (source.path.stat().st_mode & 0o777) == 0o600
    assert resolve_keyring(settings(tmp_path)).current().key_ids == source.current().key_ids


def test_one_place_for_the_keyring_and_tls_needs_both_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not both"):
        settings(
            tmp_path,
            GATEWAY_MASTER_KEY=MasterKey.generate().to_base64(),
            GATEWAY_MASTER_KEY_FILE=str(tmp_path / "k"),
        )
    with pytest.raises(SettingsError, match="GATEWAY_TLS_KEY"):
        settings(tmp_path, GATEWAY_TLS_CERT=str(tmp_path / "c.pem"))
    both = settings(
        tmp_path, GATEWAY_TLS_CERT=str(tmp_path / "c.pem"), GATEWAY_TLS_KEY=str(tmp_path / "k")
    )
    assert both.tls and both.scheme == "https"
    assert settings(tmp_path).scheme == "http"
