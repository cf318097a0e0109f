"""What an operator meets: one gateway per port, settings checked before the banner, the
master key proven at start, the running gateway's database found from anywhere, SIGHUP,
the serve flags, `status`, `--version`, token expiry and last use, the audit trail."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.address import AddressClaim, address_lock_path
from storage import repository
from storage.crypto import MasterKey
from storage.engine import connected
from tests.fixtures.gateway import (
    ROOT,
    GatewayProcess,
    free_port,
    fresh_namespace,
    run_cli,
)

KEY_PATH = "/api/v1/me/anthropic-key"
BANNER = "LLM gateway on"


def serve_once(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`gateway serve` that is expected to refuse to start: its exit and output."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def assert_refused(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 1, result.stderr
    assert BANNER not in result.stderr
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result)
    for fragment in fragments:
        assert fragment in line, line
    return line


# -- one gateway per port ---------------------------------------------------------------


def test_a_second_gateway_on_the_same_port_refuses_to_start(
    start_gateway: Callable[..., GatewayProcess], gateway_env: dict[str, str], tmp_path: Path
) -> None:
    first = start_gateway()
    token = first.create_user(f"u{uuid.uuid4().hex[:8]}")
    with fresh_namespace() as namespace:
        second_env = {
            **gateway_env,
            "GATEWAY_DATA_DIR": str(tmp_path / "second"),
            "GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'second' / 'gateway.sqlite3'}",
            "GATEWAY_IPC_NAMESPACE": namespace,
            "GATEWAY_METRICS_PORT": "0",
        }
        result = serve_once(second_env, "--workers", "1", "--port", str(first.port))
    line = assert_refused(result, f"127.0.0.1:{first.port}", "another gateway", str(first.pid))
    assert line.startswith("Error: GATEWAY_PORT: ")
    # Every request still reaches the first gateway's database.
    for _ in range(12):
        response = httpx.get(f"{first.url}{KEY_PATH}", headers={"x-api-key": token}, timeout=10)
        assert response.status_code == 200, response.text


def test_a_port_another_program_listens_on_is_refused(gateway_env: dict[str, str]) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = serve_once(
            {**gateway_env, "GATEWAY_METRICS_PORT": "0"}, "--workers", "1", "--port", str(port)
        )
    assert_refused(result, f"127.0.0.1:{port}", "another program", "Address already in use")
    assert not address_lock_path("127.0.0.1", port).exists()  # nothing left in /dev/shm


def test_a_killed_launchers_claim_is_swept_and_a_live_ones_kept() -> None:
    """A launcher SIGKILLed leaves its claim file (nobody holds its lock); the next claim
    removes it. A file whose lock is held is a live gateway's and stays."""
    stale_port, held_port, our_port = free_port(), free_port(), free_port()
    stale = address_lock_path("127.0.0.1", stale_port)
    stale.write_text("999999\n")
    held = address_lock_path("127.0.0.1", held_port)
    fd = os.open(held, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with AddressClaim("127.0.0.1", our_port):
            assert not stale.exists()
            assert held.exists()
            assert address_lock_path("127.0.0.1", our_port).exists()
        assert not address_lock_path("127.0.0.1", our_port).exists()
    finally:
        held.unlink(missing_ok=True)
        os.close(fd)
        stale.unlink(missing_ok=True)


# -- settings checked before the banner ---------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("GATEWAY_LOG_LEVEL", "verbose", "GATEWAY_LOG_LEVEL: must be one of"),
        ("GATEWAY_UPSTREAM_URL", "not-a-url", "GATEWAY_UPSTREAM_URL: must be an http"),
        ("GATEWAY_UPSTREAM_URL", "ftp://example.com", "GATEWAY_UPSTREAM_URL: must be an http"),
        ("GATEWAY_UPSTREAM_URL", "http://", "GATEWAY_UPSTREAM_URL: must be an http"),
        ("GATEWAY_PORT", "eighty", "GATEWAY_PORT: must be an integer, got 'eighty'"),
        ("GATEWAY_PORT", "70000", "GATEWAY_PORT: must be at most 65535, got 70000"),
        ("GATEWAY_WORKERS", "0", "GATEWAY_WORKERS: must be at least 1, got 0"),
        ("GATEWAY_WORKERS", "many", "GATEWAY_WORKERS: must be an integer"),
        ("GATEWAY_HOST", "bad host", "GATEWAY_HOST: must be an IP address or host name"),
        ("GATEWAY_UPSTREAM_READ_TIMEOUT", "-1", "GATEWAY_UPSTREAM_READ_TIMEOUT: must be"),
        ("GATEWAY_UPSTREAM_TRANSPORT", "curl", "GATEWAY_UPSTREAM_TRANSPORT: must be one of"),
        ("GATEWAY_DATABASE_URL", "mysql://x/y", "GATEWAY_DATABASE_URL: must start with"),
        ("GATEWAY_MASTER_KEY", "c2hvcnQ=", "GATEWAY_MASTER_KEY"),
        ("GATEWAY_TOKEN_USE_INTERVAL", "0", "GATEWAY_TOKEN_USE_INTERVAL: must be positive"),
    ],
)
def test_an_invalid_setting_is_one_error_line_and_status_1_before_the_banner(
    gateway_env: dict[str, str], variable: str, value: str, fragment: str
) -> None:
    env = {**gateway_env, "GATEWAY_METRICS_PORT": "0", variable: value}
    # A flag wins over its variable: give none for the variable under test.
    args = [] if variable == "GATEWAY_PORT" else ["--port", str(free_port())]
    args += [] if variable == "GATEWAY_WORKERS" else ["--workers", "1"]
    result = serve_once(env, *args, timeout=30)
    assert_refused(result, fragment)


def test_the_serve_flags_are_checked_like_the_environment(gateway_env: dict[str, str]) -> None:
    env = {**gateway_env, "GATEWAY_METRICS_PORT": "0"}
    result = serve_once(
        env, "--workers", "1", "--port", str(free_port()), "--upstream-url", "localhost:8080"
    )
    assert_refused(result, "GATEWAY_UPSTREAM_URL: must be an http", "localhost:8080")


def _store_key(database_url: str, key: MasterKey, name: str) -> None:
    async def work() -> None:
        async with connected(database_url):
            user = await repository.create_user(name)
            ciphertext, nonce = key.encrypt("sk-ant-test-stored", user_id=user.id)
            await repository.upsert_key(
                user.id, ciphertext=ciphertext, nonce=nonce, key_id=key.key_id, max_concurrent=None
            )

    asyncio.run(work())


def test_a_wrong_master_key_refuses_to_start(gateway_env: dict[str, str]) -> None:
    right = MasterKey.from_base64(gateway_env["GATEWAY_MASTER_KEY"])
    _store_key(gateway_env["GATEWAY_DATABASE_URL"], right, "alice")
    env = {
        **gateway_env,
        "GATEWAY_METRICS_PORT": "0",
        "GATEWAY_MASTER_KEY": MasterKey.generate().to_base64(),
    }
    result = serve_once(env, "--workers", "1", "--port", str(free_port()))
    assert_refused(result, "GATEWAY_MASTER_KEY: must hold the key", "user 'alice'")


def test_a_missing_master_key_file_refuses_to_start(
    gateway_env: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "keyfile-data"
    env = {k: v for k, v in gateway_env.items() if k != "GATEWAY_MASTER_KEY"}
    env.update(
        GATEWAY_DATA_DIR=str(data),
        GATEWAY_DATABASE_URL=f"sqlite:///{data / 'gateway.sqlite3'}",
        GATEWAY_METRICS_PORT="0",
    )
    data.mkdir()
    _store_key(env["GATEWAY_DATABASE_URL"], MasterKey.generate(), "alice")
    result = serve_once(env, "--workers", "1", "--port", str(free_port()))
    assert_refused(result, "GATEWAY_MASTER_KEY", "master.key")
    assert not (data / "master.key").exists()  # no new, useless key file made


# -- the running gateway's database, from anywhere ------------------------------------------


def _without_database(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in ("GATEWAY_DATA_DIR", "GATEWAY_DATABASE_URL")}


def test_the_command_line_finds_the_running_gateways_database(
    start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    gateway = start_gateway()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _without_database(gateway.env)
    result = run_cli(env, "users", "create", "frank", cwd=elsewhere)
    token = result.stdout.strip().splitlines()[-1]
    assert "using the database of the running gateway" in result.stderr
    assert not (elsewhere / "gateway-data").exists()
    response = httpx.get(f"{gateway.url}{KEY_PATH}", headers={"x-api-key": token}, timeout=10)
    assert response.status_code == 200, response.text


def test_with_several_gateways_the_command_line_asks_which_and_the_namespace_chooses(
    start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    first = start_gateway()
    with fresh_namespace() as namespace:
        second = start_gateway(
            GATEWAY_DATA_DIR=str(tmp_path / "second"),
            GATEWAY_DATABASE_URL=f"sqlite:///{tmp_path / 'second' / 'gateway.sqlite3'}",
            GATEWAY_IPC_NAMESPACE=namespace,
            GATEWAY_METRICS_PORT="0",
        )
        try:
            _ask_and_choose(first, second, tmp_path / "elsewhere")
        finally:
            second.stop()


def _ask_and_choose(first: GatewayProcess, second: GatewayProcess, elsewhere: Path) -> None:
    elsewhere.mkdir()
    env = {k: v for k, v in _without_database(first.env).items() if k != "GATEWAY_IPC_NAMESPACE"}
    asked = run_cli(env, "users", "list", cwd=elsewhere, check=False)
    assert asked.returncode == 1
    assert "got none while several run with different databases" in asked.stderr
    for gateway in (first, second):  # (other gateways on this host may be listed too)
        assert f"namespace {gateway.namespace}," in asked.stderr
    assert not (elsewhere / "gateway-data").exists()
    made = run_cli(
        {**env, "GATEWAY_IPC_NAMESPACE": second.namespace},
        "users",
        "create",
        "grace",
        cwd=elsewhere,
    )
    assert f"namespace {second.namespace}," in made.stderr
    token = made.stdout.strip().splitlines()[-1]
    for gateway, status in ((second, 200), (first, 401)):
        response = httpx.get(f"{gateway.url}{KEY_PATH}", headers={"x-api-key": token}, timeout=10)
        assert response.status_code == status, response.text


def test_a_new_database_beside_a_running_gateway_is_announced_loudly(
    start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    gateway = start_gateway()
    env = {**gateway.env, "GATEWAY_DATA_DIR": str(tmp_path / "another")}
    env.pop("GATEWAY_DATABASE_URL")
    result = run_cli(env, "users", "list")
    assert "WARNING: creating a NEW database" in result.stderr
    assert str(gateway.port) in result.stderr
    # The second time the database exists: no warning.
    assert "WARNING" not in run_cli(env, "users", "list").stderr


def test_status_names_the_database_namespace_port_and_workers(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2)
    out = run_cli(gateway.env, "status", "--json").stdout
    entries = [json.loads(line) for line in out.splitlines()]
    (ours,) = [entry for entry in entries if entry["namespace"] == gateway.namespace]
    assert ours["url"] == gateway.url
    assert ours["workers"] == 2
    assert ours["launcher_pid"] == gateway.pid
    assert ours["database"] == gateway.env["GATEWAY_DATABASE_URL"]
    assert ours["data_dir"] == gateway.env["GATEWAY_DATA_DIR"]
    text = run_cli(gateway.env, "status").stdout
    assert f"gateway {gateway.url}" in text


def test_status_without_a_running_gateway_exits_1(gateway_env: dict[str, str]) -> None:
    # Another engineer's gateway may be running: only the exit of an empty host is asserted
    # where the host is empty.
    result = run_cli(gateway_env, "status", check=False)
    if result.returncode == 1:
        assert "no running gateway" in result.stderr
    else:
        assert result.stdout.startswith("gateway http://")


# -- signals, flags, version -------------------------------------------------------------------


def test_sighup_neither_stops_nor_breaks_the_gateway(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway()
    os.kill(gateway.pid, signal.SIGHUP)
    for _ in range(10):
        assert httpx.get(f"{gateway.url}/healthz", timeout=10).status_code == 200
        time.sleep(0.1)
    assert gateway.process.poll() is None


def test_serve_flags_set_the_data_folder_upstream_and_global_cap(
    gateway_env: dict[str, str], tmp_path: Path, fake_upstream: Any
) -> None:
    env = {
        k: v
        for k, v in gateway_env.items()
        if k not in ("GATEWAY_DATA_DIR", "GATEWAY_DATABASE_URL", "GATEWAY_UPSTREAM_URL")
    }
    data = tmp_path / "flag-data"
    port = free_port()
    log = tmp_path / "flags"
    log.mkdir()
    gateway = GatewayProcess(
        env,
        port,
        1,
        log / "gateway.log",
        args=(
            "--data-dir",
            str(data),
            "--upstream-url",
            fake_upstream.url,
            "--global-cap",
            "3",
        ),
        cwd=tmp_path,
    )
    try:
        gateway.wait_ready()
        assert (data / "gateway.sqlite3").exists()
        assert not (tmp_path / "gateway-data").exists()
        flag_env = {**env, "GATEWAY_DATA_DIR": str(data)}
        token = run_cli(flag_env, "users", "create", "flagged").stdout.strip().splitlines()[-1]
        gateway.env = flag_env
        assert gateway.put_key(token, key="sk-ant-test-flag").status_code == 204
        response = httpx.post(
            f"{gateway.url}/v1/messages",
            json={"model": "claude-test", "max_tokens": 4, "messages": []},
            headers={"x-api-key": token},
            timeout=10,
        )
        assert response.status_code == 200, response.text  # the fake upstream answered
        rows = [
            json.loads(line)
            for line in run_cli(flag_env, "caps", "--json").stdout.splitlines()
            if line.strip()
        ]
        assert [row["cap"] for row in rows if row["scope"] == "global"] == [3]
    finally:
        gateway.stop()


def test_version() -> None:
    result = run_cli({**os.environ}, "--version")
    assert result.stdout.startswith("gateway, version ")


# -- token expiry and last use -------------------------------------------------------------------


def _tokens(env: dict[str, str], name: str) -> dict[int, dict[str, Any]]:
    out = run_cli(env, "tokens", "list", name, "--json").stdout
    return {row["id"]: row for row in map(json.loads, out.splitlines())}


def test_an_expired_token_is_refused_like_a_revoked_one_even_when_cached(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=1)
    name = f"x{uuid.uuid4().hex[:8]}"
    gateway.user_with_key(name)
    out = run_cli(gateway.env, "tokens", "issue", name, "--expires", "3s").stdout
    token = out.strip().splitlines()[-1]
    assert "valid until" in out
    body = {"model": "claude-test", "max_tokens": 4, "messages": []}
    send = lambda: httpx.post(  # noqa: E731
        f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": token}, timeout=10
    )
    assert send().status_code == 200  # now cached by the worker
    deadline = time.monotonic() + 30
    while (response := send()).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert response.status_code == 401
    assert response.json()["error"]["message"] == (
        "Invalid, unknown, expired or revoked gateway token."
    )
    settings = httpx.get(f"{gateway.url}{KEY_PATH}", headers={"x-api-key": token}, timeout=10)
    assert settings.status_code == 401
    rows = _tokens(gateway.env, name)
    assert [row["state"] for row in rows.values()] == ["active", "expired"]
    assert (
        run_cli(gateway.env, "tokens", "issue", name, "--expires", "soon", check=False).returncode
        == 1
    )


def test_last_use_is_recorded_off_the_request_path(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2, GATEWAY_TOKEN_USE_INTERVAL="0.5")
    name = f"l{uuid.uuid4().hex[:8]}"
    token, _key = gateway.user_with_key(name)
    unused = run_cli(gateway.env, "tokens", "issue", name).stdout.strip().splitlines()[-1]
    assert unused
    (first_id, second_id) = sorted(_tokens(gateway.env, name))
    assert _tokens(gateway.env, name)[first_id]["last_used_at"] is None
    body = {"model": "claude-test", "max_tokens": 4, "messages": []}
    for _ in range(4):
        response = httpx.post(
            f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": token}, timeout=10
        )
        assert response.status_code == 200
    deadline = time.monotonic() + 30
    while _tokens(gateway.env, name)[first_id]["last_used_at"] is None:
        assert time.monotonic() < deadline, "last use never recorded"
        time.sleep(0.3)
    rows = _tokens(gateway.env, name)
    assert rows[second_id]["last_used_at"] is None
    assert rows[first_id]["created_at"] <= rows[first_id]["last_used_at"]


def test_users_list_shows_key_cap_and_token_count(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=1)
    keyed, bare = f"k{uuid.uuid4().hex[:8]}", f"b{uuid.uuid4().hex[:8]}"
    gateway.user_with_key(keyed, cap=5)
    gateway.create_user(bare)
    run_cli(gateway.env, "tokens", "issue", keyed)
    rows = {
        row["name"]: row
        for row in map(
            json.loads, run_cli(gateway.env, "users", "list", "--json").stdout.split("\n")[:-1]
        )
    }
    assert (rows[keyed]["key"], rows[keyed]["cap"], rows[keyed]["tokens"]) == (True, 5, 2)
    assert (rows[bare]["key"], rows[bare]["cap"], rows[bare]["tokens"]) == (False, None, 1)
    table = run_cli(gateway.env, "users", "list").stdout.splitlines()
    assert table[0].split() == ["name", "key", "cap", "tokens", "created", "id"]
    (line,) = [line for line in table if line.startswith(keyed)]
    assert line.split()[:4] == [keyed, "yes", "5", "2"]


# -- the audit trail -------------------------------------------------------------------------------


def _audit_lines(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        if line.startswith("{") and '"audit":true' in line.replace(" ", ""):
            found.append(json.loads(line))
    return found


def test_every_change_leaves_one_audit_line_without_secrets(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2)
    name = f"a{uuid.uuid4().hex[:8]}"
    cli_lines: list[dict[str, Any]] = []

    def cli(*args: str) -> str:
        result = run_cli(gateway.env, *args)
        cli_lines.extend(_audit_lines(result.stderr))
        return result.stdout

    token = cli("users", "create", name).strip().splitlines()[-1]
    first_key, second_key = "sk-ant-test-audit-one", "sk-ant-test-audit-two"
    assert gateway.put_key(token, key=first_key).status_code == 204
    assert gateway.put_key(token, key=second_key, cap=4).status_code == 204
    assert gateway.put_key(token, cap=6).status_code == 204
    cli("users", "set-cap", name, "7")
    second = cli("tokens", "issue", name, "--label", "ci")
    second_id = int(second.split()[2])
    cli("tokens", "revoke", str(second_id))
    auth = {"authorization": f"Bearer {token}"}
    assert httpx.delete(f"{gateway.url}{KEY_PATH}", headers=auth, timeout=10).status_code == 204
    cli("users", "delete", name)

    api_lines: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while len(api_lines) < 4 and time.monotonic() < deadline:
        api_lines = [r for r in gateway.log_records() if r.get("audit") and r.get("user") == name]
        time.sleep(0.1)
    events = [(r["event"], r["source"], r.get("old_cap"), r.get("new_cap")) for r in api_lines]
    assert events == [
        ("key_stored", "api", None, 8),
        ("key_rotated", "api", 8, 4),
        ("cap_changed", "api", 4, 6),
        ("key_removed", "api", 7, None),
    ]
    assert [(r["event"], r["source"]) for r in cli_lines] == [
        ("user_created", "cli"),
        ("token_issued", "cli"),
        ("cap_changed", "cli"),
        ("token_issued", "cli"),
        ("token_revoked", "cli"),
        ("user_deleted", "cli"),
    ]
    assert (cli_lines[2]["old_cap"], cli_lines[2]["new_cap"]) == (6, 7)
    assert cli_lines[4]["token_id"] == second_id
    assert all(r["user"] == name for r in cli_lines)
    everything = gateway.logs() + json.dumps(cli_lines)
    for secret in (first_key, second_key, token, second.strip().splitlines()[-1]):
        assert secret not in everything
