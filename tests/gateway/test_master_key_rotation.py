"""Replacing the master key of a running gateway, on SQLite and on Postgres, following the
README's steps while requests flow through two workers; and what a key that no worker
can decrypt looks like to its client."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from storage.crypto import MasterKey
from tests.fixtures.databases import _run_in_thread
from tests.fixtures.gateway import GatewayProcess, run_cli

pytestmark = pytest.mark.slow

KEY_PATH = "/api/v1/me/anthropic-key"
TRACE_MARKERS = ("Traceback", 'File "')


@pytest.fixture
def gateway_database_url(database_url: str) -> str:
    """Every test here runs on SQLite and on a fresh Postgres database."""
    return database_url


def run_sql(database_url: str, statement: str, *args: Any) -> None:
    """A statement straight on the database, as someone with access to it would run it
    (``?`` placeholders; ``$n`` on Postgres)."""
    if database_url.startswith("sqlite:///"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///"), timeout=10) as db:
            db.execute(statement, args)
        return
    numbered = statement
    for index in range(1, len(args) + 1):
        numbered = numbered.replace("?", f"${index}", 1)

    async def execute() -> None:
        connection = await asyncpg.connect(database_url, timeout=5)
        try:
            await connection.execute(numbered, *args)
        finally:
            await connection.close()

    _run_in_thread(execute())


def write_keyring(path: Path, *keys: MasterKey) -> None:
    """The README's way: a whole new file (mode 0600) moved into place in one step."""
    staged = path.with_name(f".{path.name}.new")
    staged.touch(mode=0o600)
    staged.write_text("".join(f"{key.to_base64()}\n" for key in keys))
    staged.replace(path)


def key_status(env: dict[str, str]) -> dict[str | None, int]:
    out = run_cli(env, "keys", "status", "--json").stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {row["key_id"]: row["stored_keys"] for row in rows if row["stored_keys"]}


class Traffic:
    """Requests through the gateway until stopped, each on a new connection (so both
    workers serve), checking each answer carries its user's own key; beside them a
    stream of cap changes and key re-stores, each of which makes every worker drop its
    cached credentials and decrypt again on its next request."""

    def __init__(
        self, gateway: GatewayProcess, users: dict[str, str], *, restored: list[str]
    ) -> None:
        self.gateway = gateway
        self.users = users  # token -> upstream key
        self.restored = restored  # the tokens whose keys are stored again now and then
        self.ok = 0
        self.changes = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self.streams = 0
        self._threads = [
            threading.Thread(target=self._requests, args=(seed,)) for seed in range(3)
        ] + [threading.Thread(target=self._changes), threading.Thread(target=self._streams)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _requests(self, seed: int) -> None:
        chooser = random.Random(seed)
        tokens = list(self.users)
        while not self._stop.is_set():
            token = chooser.choice(tokens)
            try:
                response = httpx.get(
                    f"{self.gateway.url}/v1/echo", headers={"x-api-key": token}, timeout=10
                )
            except httpx.HTTPError as exc:
                self.failures.append(f"request: {exc!r}")
                continue
            if response.status_code != 200:
                self.failures.append(f"{response.status_code}: {response.text}")
            elif response.json()["headers"].get("x-api-key") != self.users[token]:
                self.failures.append("the upstream got another key")
            else:
                self.ok += 1

    def _streams(self) -> None:
        """SSE streams of about two seconds each, one after another: some stream is always
        in flight, across every step, and must end whole."""
        token = next(iter(self.users))
        body = {"model": "claude-test", "max_tokens": 16, "stream": True, "messages": []}
        while not self._stop.is_set():
            try:
                with httpx.stream(
                    "POST",
                    f"{self.gateway.url}/v1/messages?events=40&delay=0.05",
                    json=body,
                    headers={"x-api-key": token},
                    timeout=30,
                ) as response:
                    raw = b"".join(response.iter_raw())
            except httpx.HTTPError as exc:
                self.failures.append(f"stream: {exc!r}")
                continue
            if response.status_code != 200 or b"event: message_stop" not in raw:
                self.failures.append(f"stream {response.status_code}: {raw[-200:]!r}")
            else:
                self.streams += 1

    def _changes(self) -> None:
        chooser = random.Random(99)
        tokens = list(self.users)
        while not self._stop.wait(0.15):
            token = chooser.choice(tokens)
            body: dict[str, Any] = {"max_concurrent": chooser.choice((8, 9))}
            if token in self.restored and chooser.random() < 0.5:
                body["key"] = self.users[token]  # stored again: encrypted under the ring's first
            try:
                response = httpx.put(
                    f"{self.gateway.url}{KEY_PATH}",
                    json=body,
                    headers={"authorization": f"Bearer {token}"},
                    timeout=10,
                )
            except httpx.HTTPError as exc:
                self.failures.append(f"change: {exc!r}")
                continue
            if response.status_code != 204:
                self.failures.append(f"change {response.status_code}: {response.text}")
            else:
                self.changes += 1

    def wait_for_more(self, *, requests: int, changes: int, timeout: float = 60.0) -> None:
        """Until this many more requests succeeded and changes landed (each change makes
        both workers decrypt again)."""
        ok, changed = self.ok + requests, self.changes + changes
        deadline = time.monotonic() + timeout
        while self.ok < ok or self.changes < changed:
            assert not self.failures, self.failures[:5]
            assert time.monotonic() < deadline, "traffic stalled"
            time.sleep(0.05)


def test_rotating_the_master_key_while_requests_flow(
    start_gateway: Callable[..., GatewayProcess], gateway_database_url: str, tmp_path: Path
) -> None:
    old, new = MasterKey.generate(), MasterKey.generate()
    keyring_file = tmp_path / "secrets" / "master.key"
    keyring_file.parent.mkdir()
    write_keyring(keyring_file, old)
    gateway = start_gateway(
        workers=2, GATEWAY_MASTER_KEY="", GATEWAY_MASTER_KEY_FILE=str(keyring_file)
    )
    names = [f"rot{index}{uuid.uuid4().hex[:6]}" for index in range(7)]
    users = dict(gateway.user_with_key(name) for name in names)
    # Some keys stored before key ids existed (the column's rows from before its
    # migration are NULL): they go on working, and are rotated too.
    for name in names[:3]:
        run_sql(
            gateway_database_url,
            'UPDATE user_anthropic_keys SET key_id = NULL WHERE "user" = '
            "(SELECT id FROM users WHERE name = ?)",
            name,
        )
    assert key_status(gateway.env) == {old.key_id: 4, None: 3}

    tokens = list(users)
    # Two users store their keys again now and then; the other five are left to the
    # rotation (three of them from before key ids).
    with Traffic(gateway, users, restored=tokens[5:]) as traffic:
        traffic.wait_for_more(requests=30, changes=2)

        # 1. The new key goes first in the key file, the old one after it. No restart:
        #    a worker reads the file again when it changed (before encrypting, and on
        #    meeting a key id it does not hold).
        write_keyring(keyring_file, new, old)
        traffic.wait_for_more(requests=30, changes=3)

        # 2. Rotate, in batches of 3, while everything goes on.
        rotated = run_cli(
            gateway.env,
            "keys",
            "rotate-master",
            "--new-key-file",
            str(keyring_file),
            "--batch-size",
            "3",
        )
        assert f"under master key id {new.key_id}" in rotated.stdout
        # 3 keys a transaction; keys stored again since step 1 are under the new key already.
        assert "batch 2:" in rotated.stdout
        rewritten = int(rotated.stdout.split("re-encrypted ")[-1].split()[0])
        assert 5 <= rewritten <= 7
        assert key_status(gateway.env) == {new.key_id: 7}
        traffic.wait_for_more(requests=30, changes=3)

        # 3. The old key leaves the file; every worker decrypts again with the new alone.
        write_keyring(keyring_file, new)
        traffic.wait_for_more(requests=60, changes=4)

    assert not traffic.failures, traffic.failures[:5]
    assert traffic.streams >= 2
    assert key_status(gateway.env) == {new.key_id: 7}
    # The workers picked the new keyrings up from the file on their own.
    reloaded = [
        record.get("key_ids")
        for record in gateway.log_records()
        if record.get("msg") == "master keyring reloaded"
    ]
    assert [new.key_id, old.key_id] in reloaded and [new.key_id] in reloaded, reloaded
    for token, key in users.items():
        assert key not in gateway.logs()
        assert token not in gateway.logs()


def test_a_key_no_worker_can_decrypt_is_a_clear_500(
    start_gateway: Callable[..., GatewayProcess], gateway_database_url: str
) -> None:
    gateway = start_gateway(workers=2)
    (alice, bob, carol) = (f"{who}{uuid.uuid4().hex[:6]}" for who in ("alice", "bob", "carol"))
    alice_token, _ = gateway.user_with_key(alice)
    bob_token, _ = gateway.user_with_key(bob)
    carol_token, carol_key = gateway.user_with_key(carol)

    # Alice's key names a master key id the keyring does not hold.
    run_sql(
        gateway_database_url,
        "UPDATE user_anthropic_keys SET key_id = 'deadbeef' WHERE \"user\" = "
        "(SELECT id FROM users WHERE name = ?)",
        alice,
    )
    # Carol's ciphertext, nonce and key id copied onto Bob's row: bound to Carol's id.
    run_sql(
        gateway_database_url,
        "UPDATE user_anthropic_keys SET "
        "ciphertext = (SELECT k.ciphertext FROM user_anthropic_keys AS k "
        '  JOIN users AS u ON u.id = k."user" WHERE u.name = ?), '
        "nonce = (SELECT k.nonce FROM user_anthropic_keys AS k "
        '  JOIN users AS u ON u.id = k."user" WHERE u.name = ?), '
        "key_id = (SELECT k.key_id FROM user_anthropic_keys AS k "
        '  JOIN users AS u ON u.id = k."user" WHERE u.name = ?) '
        'WHERE "user" = (SELECT id FROM users WHERE name = ?)',
        carol,
        carol,
        carol,
        bob,
    )
    for _ in range(4):  # each on a new connection: both workers
        response = httpx.get(
            f"{gateway.url}/v1/models", headers={"x-api-key": alice_token}, timeout=10
        )
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["type"] == "api_error"
        assert "could not be decrypted" in error["message"]
        assert "key id deadbeef" in error["message"]
        moved = httpx.get(f"{gateway.url}/v1/models", headers={"x-api-key": bob_token}, timeout=10)
        assert moved.status_code == 500, moved.text
        assert "could not be decrypted" in moved.json()["error"]["message"]
        for marker in TRACE_MARKERS:
            assert marker not in response.text and marker not in moved.text
        assert carol_key not in moved.text
        # Carol's own row is untouched.
        mine = httpx.get(f"{gateway.url}/v1/echo", headers={"x-api-key": carol_token}, timeout=10)
        assert mine.json()["headers"]["x-api-key"] == carol_key
    assert carol_key not in gateway.logs()
    # The operator's view names the stray key id.
    status = run_cli(gateway.env, "keys", "status").stdout
    assert "deadbeef" in status and "NOT in the keyring" in status


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_keyring_in_the_environment_rotates_across_restarts(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    """GATEWAY_MASTER_KEY is read once per process: the keyring changes with a restart
    (on several hosts, one host at a time behind the balancer)."""
    old, new = MasterKey.generate(), MasterKey.generate()
    first = start_gateway(workers=2, GATEWAY_MASTER_KEY=old.to_base64())
    token, key = first.user_with_key(f"env{uuid.uuid4().hex[:6]}")
    assert first.stop() == 0

    both = f"{new.to_base64()},{old.to_base64()}"
    second = start_gateway(workers=2, GATEWAY_MASTER_KEY=both, NEW_MASTER_KEY=new.to_base64())
    # The new key must lead the ring the command line reads, or nothing is done.
    refused = run_cli(
        {**second.env, "GATEWAY_MASTER_KEY": old.to_base64()},
        "keys",
        "rotate-master",
        "--new-key-env",
        "NEW_MASTER_KEY",
        check=False,
    )
    assert refused.returncode == 1
    assert "not in the gateway's keyring" in refused.stderr
    assert key_status(second.env) == {old.key_id: 1}
    run_cli(second.env, "keys", "rotate-master", "--new-key-env", "NEW_MASTER_KEY")
    assert key_status(second.env) == {new.key_id: 1}
    for _ in range(4):
        echoed = httpx.get(f"{second.url}/v1/echo", headers={"x-api-key": token}, timeout=10)
        assert echoed.json()["headers"]["x-api-key"] == key
    assert second.stop() == 0

    third = start_gateway(workers=2, GATEWAY_MASTER_KEY=new.to_base64())
    for _ in range(4):
        echoed = httpx.get(f"{third.url}/v1/echo", headers={"x-api-key": token}, timeout=10)
        assert echoed.json()["headers"]["x-api-key"] == key
