"""What clients see when a part fails: the database, the master key, the upstream.

Each test starts its own `gateway serve` (two workers) on a database of its own, on
SQLite and on Postgres, and breaks one part for real.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from storage.crypto import MasterKey
from tests.fixtures.databases import _run_in_thread
from tests.fixtures.gateway import GatewayProcess, free_port

pytestmark = pytest.mark.slow

KEY_PATH = "/api/v1/me/anthropic-key"
TRACE_MARKERS = ("Traceback", 'File "', "line ", ".py")


@pytest.fixture
def gateway_database_url(database_url: str) -> str:
    """Every test here runs on SQLite and on a fresh Postgres database."""
    return database_url


# -- helpers ----------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def proxied(gateway: GatewayProcess, token: str) -> httpx.Response:
    """A proxied request on a new connection (so successive calls reach both workers)."""
    return httpx.get(f"{gateway.url}/v1/models", headers={"x-api-key": token}, timeout=10)


def error_of(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body == {"type": "error", "error": {"type": kind, "message": body["error"]["message"]}}
    return str(body["error"]["message"])


def assert_no_trace(text: str) -> None:
    for marker in TRACE_MARKERS:
        assert marker not in text, text


def wait_for(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def healthz(gateway: GatewayProcess) -> httpx.Response:
    return httpx.get(f"{gateway.url}/healthz", timeout=10)


# -- making the database unreachable, and bringing it back ------------------------------


@contextmanager
def database_unreachable(database_url: str) -> Iterator[None]:
    """The database is gone while the block runs: on Postgres renamed (its sessions
    ended), on SQLite moved away with a directory in the file's place."""
    if database_url.startswith("sqlite:///"):
        with _sqlite_unreachable(Path(database_url.removeprefix("sqlite:///"))):
            yield
        return
    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    hidden = f"{name}_away"
    admin_url = parts._replace(path="/postgres").geturl()
    _run_in_thread(_rename_database(admin_url, name, hidden, allow=False))
    try:
        yield
    finally:
        _run_in_thread(_rename_database(admin_url, hidden, name, allow=True))


async def _rename_database(admin_url: str, old: str, new: str, *, allow: bool) -> None:
    """Rename ``old``; ``allow``: whether it takes connections afterwards. The gateway's
    pools reconnect on demand (as the superuser), so new sessions are refused first
    (ALLOW_CONNECTIONS false holds for superusers too), then the open ones ended: on a
    loaded machine a reconnect used to win the race against the rename."""
    connection = await asyncpg.connect(admin_url, timeout=5)
    try:
        await connection.execute(f'ALTER DATABASE "{old}" WITH ALLOW_CONNECTIONS false')
        deadline = time.monotonic() + 10
        while True:
            await connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                old,
            )
            try:
                await connection.execute(f'ALTER DATABASE "{old}" RENAME TO "{new}"')
                break
            except asyncpg.ObjectInUseError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        if allow:
            await connection.execute(f'ALTER DATABASE "{new}" WITH ALLOW_CONNECTIONS true')
    finally:
        await connection.close()


@contextmanager
def _sqlite_unreachable(path: Path) -> Iterator[None]:
    away = path.parent / "away"
    away.mkdir()
    moved = [p for p in path.parent.iterdir() if p.name.startswith(path.name)]
    for file in moved:
        file.rename(away / file.name)
    path.mkdir()  # every new connection now fails to open the database
    try:
        yield
    finally:
        path.rmdir()
        for file in moved:
            (away / file.name).rename(file)
        shutil.rmtree(away)


# -- the database is down ---------------------------------------------------------------


def test_storage_down_is_503_database_unavailable_and_healthz_503(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2)
    used, _ = gateway.user_with_key(unique("used"))
    # Created and given a key before the outage, never proxied before it: no worker has
    # this token cached, so its next request must go to the database.
    fresh, fresh_key = gateway.user_with_key(unique("fresh"))
    assert proxied(gateway, used).status_code == 200
    database_url = gateway.env["GATEWAY_DATABASE_URL"]

    with database_unreachable(database_url):
        for _ in range(4):  # each on a new connection: both workers
            response = healthz(gateway)
            assert response.status_code == 503
            assert response.json()["type"] == "error"
            assert response.json()["error"]["type"] == "api_error"
            assert "database" in response.json()["error"]["message"]

            message = error_of(proxied(gateway, fresh), 503, "api_error")
            assert "database" in message
            assert "unavailable" in message
            assert "upstream" not in message.lower()

            settings = httpx.get(
                f"{gateway.url}{KEY_PATH}", headers={"x-api-key": fresh}, timeout=10
            )
            assert "database" in error_of(settings, 503, "api_error")

            put = gateway.put_key(fresh, cap=5)
            assert "database" in error_of(put, 503, "api_error")
        for text in (response.text, settings.text, put.text):
            assert_no_trace(text)
            assert fresh not in text

    # Back again: no restart needed.
    wait_for(lambda: healthz(gateway).status_code == 200, "healthz to recover")
    for _ in range(4):
        assert proxied(gateway, fresh).status_code == 200
    assert gateway.process.poll() is None
    log = gateway.log_path.read_text(errors="replace")
    assert fresh not in log
    assert fresh_key not in log


# -- the master key is not the one the keys were stored under ---------------------------


def test_wrong_master_key_is_500_without_secrets_or_trace(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    """A stored key under a master key the gateway no longer holds (the old key removed
    before every row was rotated): its requests are a clear 500, nothing else fails. (A
    gateway none of whose keys decrypts the newest stored key refuses to start instead:
    test_operator_edges.)"""
    key_a, key_b = MasterKey.generate().to_base64(), MasterKey.generate().to_base64()
    first = start_gateway(workers=2, GATEWAY_MASTER_KEY=key_a)
    token, upstream_key = first.user_with_key(unique("mk"))
    assert proxied(first, token).status_code == 200
    assert first.stop() == 0
    # Key b added in front of a; another user's key is stored (under b, the newest row).
    both = start_gateway(workers=2, GATEWAY_MASTER_KEY=f"{key_b},{key_a}")
    other, _ = both.user_with_key(unique("mk"))
    assert proxied(both, token).status_code == 200
    assert both.stop() == 0

    second = start_gateway(workers=2, GATEWAY_MASTER_KEY=key_b)  # a removed too soon
    assert proxied(second, other).status_code == 200
    secrets = (key_a, key_b, upstream_key, token)
    for _ in range(4):  # each on a new connection: both workers
        response = proxied(second, token)
        message = error_of(response, 500, "api_error")
        assert "could not be decrypted" in message
        assert "master key" in message
        for secret in secrets:
            assert secret not in response.text
            for value in response.headers.values():
                assert secret not in value
        assert_no_trace(response.text)
    # The settings API still answers: the key is stored, just not readable.
    status = httpx.get(f"{second.url}{KEY_PATH}", headers={"x-api-key": token}, timeout=10)
    assert status.json()["configured"] is True

    # The way out the message names: store the key again, under the new master key.
    assert second.put_key(token, key=upstream_key).status_code == 204
    for _ in range(4):
        assert proxied(second, token).status_code == 200
    for gateway in (first, both, second):
        log = gateway.log_path.read_text(errors="replace")
        for secret in secrets:
            assert secret not in log


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_malformed_master_key_stops_the_gateway_with_a_clear_message(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    bad = "not-a-master-key-" + uuid.uuid4().hex
    gateway = start_gateway(workers=1, wait=False, GATEWAY_MASTER_KEY=bad)
    try:
        gateway.process.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the gateway kept running with a malformed master key:\n{gateway.logs()}")
    assert gateway.process.returncode != 0
    log = gateway.logs()
    assert "Error: GATEWAY_MASTER_KEY: the master key is not valid" in log, log
    assert "gateway keygen" in log
    assert_no_trace(log.split("Error:", 1)[1])
    assert bad not in log


# -- the upstream is down ---------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_upstream_down_is_502_and_not_a_database_error(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2, GATEWAY_UPSTREAM_URL=f"http://127.0.0.1:{free_port()}")
    token, key = gateway.user_with_key(unique("up"))
    for _ in range(4):
        response = proxied(gateway, token)
        message = error_of(response, 502, "api_error")
        assert "upstream" in message.lower()
        assert "database" not in message
        assert key not in response.text
        assert_no_trace(response.text)
    assert healthz(gateway).status_code == 200
