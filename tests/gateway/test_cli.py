"""The `gateway` command line through its real entry point (`python -m gateway`).

Commands that only touch the database run against a database of their own, on SQLite and
on Postgres; commands whose effect a running gateway must see share one two-worker
gateway (SQLite, with a global cap so that `caps` has both scopes to show).
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import click
import httpx
import pytest

from gateway.cli import main as cli_main
from loadtests.fake_upstream import FakeUpstream
from tests.fixtures.databases import _run_in_thread
from tests.fixtures.gateway import GatewayProcess, base_env, module_gateway, run_cli

GLOBAL_CAP = 64
KEY_PATH = "/api/v1/me/anthropic-key"


@pytest.fixture(scope="module")
def cli_gateway(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    with module_gateway(
        tmp_path_factory.mktemp("cli-gateway"),
        fake_upstream.url,
        PROXY_MAX_GLOBAL_CONCURRENT=str(GLOBAL_CAP),
    ) as gateway:
        yield gateway


@pytest.fixture
def db_env(database_url: str, tmp_path: Path, ipc_namespace: str) -> dict[str, str]:
    """The environment of an operator whose database (SQLite or Postgres) is empty."""
    return base_env(
        tmp_path / "data",
        database_url=database_url,
        namespace=ipc_namespace,
        upstream_url="http://127.0.0.1:9",  # nothing is proxied here
    )


# -- helpers ----------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def create_user(env: dict[str, str], name: str) -> tuple[str, str]:
    """`gateway users create NAME`: (user id, token) from its output."""
    out = run_cli(env, "users", "create", name).stdout
    lines = out.strip().splitlines()
    found = re.search(rf"created user {re.escape(name)} \(([0-9a-f-]{{36}})\)", out)
    assert found is not None, out
    return found.group(1), lines[-1]


def issue_token(env: dict[str, str], name: str, label: str) -> tuple[int, str]:
    """`gateway tokens issue NAME --label L`: (token id, token)."""
    out = run_cli(env, "tokens", "issue", name, "--label", label).stdout
    found = re.search(rf"issued token (\d+) for {re.escape(name)}", out)
    assert found is not None, out
    return int(found.group(1)), out.strip().splitlines()[-1]


def token_rows(env: dict[str, str], *args: str) -> dict[int, list[str]]:
    """`gateway tokens list --json`: id -> [user, *label words, state (, revoked at)]."""
    rows = {}
    for line in run_cli(env, "tokens", "list", *args, "--json").stdout.splitlines():
        row = json.loads(line)
        rows[int(row["id"])] = [
            row["user"],
            *(row["label"].split() or ["-"]),
            row["state"],
            *([row["revoked_at"]] if row["revoked_at"] else []),
        ]
    return rows


def user_names(env: dict[str, str]) -> list[str]:
    out = run_cli(env, "users", "list", "--json").stdout
    return [json.loads(line)["name"] for line in out.splitlines()]


def assert_fails(result: Any, *fragments: str) -> None:
    """A clean refusal: non-zero exit, the message on stderr, no traceback."""
    assert result.returncode != 0, result.stdout
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def store_key(gateway: GatewayProcess, token: str, *, cap: int | None = None) -> str:
    key = f"sk-ant-test-{uuid.uuid4().hex}"
    response = gateway.put_key(token, key=key, cap=cap)
    assert response.status_code == 204, response.text
    return key


def answers_by_worker(gateway: GatewayProcess, marker: str) -> dict[int, set[int]]:
    """Statuses each worker pid logged for proxied paths that start with ``marker``."""
    out: dict[int, set[int]] = {}
    for record in gateway.log_records():
        if str(record.get("path", "")).startswith(marker):
            out.setdefault(int(record["pid"]), set()).add(int(record["status"]))
    return out


def until_every_worker_answered(
    gateway: GatewayProcess,
    token: str,
    expected_status: int,
    *,
    timeout: float = 20.0,
    at_least: int = 8,
) -> None:
    """Proxied requests, each on a new connection, four at a time (so the token's cap
    must be at least 4), until every worker has answered one (per the workers' own
    access logs) and at least ``at_least`` were sent; every answer must have
    ``expected_status``."""
    marker = f"/v1/files/{uuid.uuid4().hex}"
    sent = 0

    def one(index: int) -> int:
        response = httpx.get(f"{gateway.url}{marker}-{index}", headers={"x-api-key": token})
        return response.status_code

    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(max_workers=4) as pool:
        while True:
            statuses = list(pool.map(one, range(sent, sent + 4)))
            sent += 4
            assert statuses == [expected_status] * 4, statuses
            seen = answers_by_worker(gateway, marker)
            if sent >= at_least and len(seen) >= gateway.workers:
                assert all(s == {expected_status} for s in seen.values()), seen
                return
            assert time.monotonic() < deadline, f"not every worker answered: {seen}"


# -- help, keygen, migrate --------------------------------------------------------------


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            paths += _command_paths(command, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


COMMAND_PATHS = _command_paths(cli_main)


def test_every_documented_command_exists() -> None:
    expected = {
        (),
        ("serve",),
        ("migrate",),
        ("keygen",),
        ("caps",),
        ("users",),
        ("users", "create"),
        ("users", "list"),
        ("users", "delete"),
        ("tokens",),
        ("tokens", "issue"),
        ("tokens", "list"),
        ("tokens", "revoke"),
        ("users", "set-cap"),
        ("status",),
    }
    assert expected <= set(COMMAND_PATHS)


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "gateway")
def test_help_works_on_every_command_and_group(
    path: tuple[str, ...], tmp_path: Path, ipc_namespace: str
) -> None:
    env = base_env(
        tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'never-created.sqlite3'}",
        namespace=ipc_namespace,
        upstream_url="http://127.0.0.1:9",
    )
    result = run_cli(env, *path, "--help")
    assert result.stdout.startswith(f"Usage: python -m gateway {' '.join(path)}".rstrip())
    assert "--help" in result.stdout
    assert not (tmp_path / "never-created.sqlite3").exists(), "--help touched the database"


def test_keygen_prints_base64_of_32_random_bytes(tmp_path: Path, ipc_namespace: str) -> None:
    env = base_env(
        tmp_path, database_url="sqlite:///unused", namespace=ipc_namespace, upstream_url=""
    )
    keys = []
    for _ in range(2):
        out = run_cli(env, "keygen").stdout
        assert out.endswith("\n")
        assert len(out.splitlines()) == 1, out
        key = out.strip()
        assert len(base64.b64decode(key, validate=True)) == 32
        keys.append(key)
    assert keys[0] != keys[1]


def _migrations_applied(database_url: str) -> list[str]:
    if database_url.startswith("sqlite:///"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as connection:
            rows = connection.execute("SELECT name FROM migration ORDER BY name").fetchall()
        return [str(row[0]) for row in rows]

    async def names() -> list[str]:
        connection = await asyncpg.connect(database_url, timeout=5)
        try:
            rows = await connection.fetch("SELECT name FROM migration ORDER BY name")
            return [str(row["name"]) for row in rows]
        finally:
            await connection.close()

    return _run_in_thread(names())


def test_migrate_is_idempotent(db_env: dict[str, str]) -> None:
    url = db_env["GATEWAY_DATABASE_URL"]
    first = run_cli(db_env, "migrate")
    assert first.stdout.strip() == "database is up to date"
    applied = _migrations_applied(url)
    assert len(applied) >= 2
    second = run_cli(db_env, "migrate")
    assert second.stdout.strip() == "database is up to date"
    assert _migrations_applied(url) == applied
    # Migrating again keeps what is stored.
    name = unique("m")
    create_user(db_env, name)
    run_cli(db_env, "migrate")
    assert name in user_names(db_env)


def test_migrate_creates_the_data_folder_for_sqlite(tmp_path: Path, ipc_namespace: str) -> None:
    data_dir = tmp_path / "new" / "data"
    env = base_env(
        data_dir,
        database_url=f"sqlite:///{data_dir / 'gateway.sqlite3'}",
        namespace=ipc_namespace,
        upstream_url="http://127.0.0.1:9",
    )
    run_cli(env, "migrate")
    assert (data_dir / "gateway.sqlite3").is_file()


# -- users and tokens, database only ----------------------------------------------------


def test_users_create_list_and_delete(db_env: dict[str, str]) -> None:
    alice, bob = unique("alice"), unique("bob")
    alice_id, token = create_user(db_env, alice)
    assert re.fullmatch(r"gwt_[A-Za-z0-9_-]{43}", token), token
    create_user(db_env, bob)
    assert user_names(db_env) == sorted([alice, bob])
    listed = run_cli(db_env, "users", "list").stdout.splitlines()
    assert listed[0].split() == ["name", "key", "cap", "tokens", "created", "id"]
    (line,) = [line for line in listed if line.startswith(alice)]
    assert line.split()[:4] == [alice, "no", "-", "1"] and line.endswith(alice_id)

    result = run_cli(db_env, "users", "delete", alice)
    assert result.stdout.strip() == f"deleted user {alice}"
    assert user_names(db_env) == [bob]
    assert token_rows(db_env) and all(row[0] == bob for row in token_rows(db_env).values())


def test_a_duplicate_user_name_is_refused_clearly(db_env: dict[str, str]) -> None:
    name = unique("dup")
    create_user(db_env, name)
    result = run_cli(db_env, "users", "create", name, check=False)
    assert_fails(result, f"a user named {name!r} exists already")
    assert "gwt_" not in result.stdout  # no token was issued
    assert user_names(db_env) == [name]
    assert len(token_rows(db_env)) == 1


@pytest.mark.parametrize(
    "name", ["", "a b", "tab\there", "new\nline", "x" * 65, "x" * 300, "\u00e9t\u00e9"]
)
def test_a_name_breaking_the_rule_is_refused_on_both_engines(
    db_env: dict[str, str], name: str
) -> None:
    result = run_cli(db_env, "users", "create", name, check=False)
    assert result.returncode == 1
    assert_fails(result, "Error: name: must be 1..64 characters of letters, digits and . _ - @")
    assert len(result.stderr.strip().splitlines()) == 1
    assert user_names(db_env) == []


def test_a_label_breaking_the_rule_is_refused(db_env: dict[str, str]) -> None:
    name = unique("lab")
    create_user(db_env, name)
    for label in ("a\tb", "two\nlines", "y" * 101):
        result = run_cli(db_env, "tokens", "issue", name, "--label", label, check=False)
        assert_fails(result, "Error: label: must be at most 100 characters")
    assert len(token_rows(db_env, name)) == 1


def test_deleting_an_unknown_user_fails(db_env: dict[str, str]) -> None:
    assert_fails(run_cli(db_env, "users", "delete", "nobody", check=False), "no user named")


def test_tokens_issue_list_and_revoke(db_env: dict[str, str]) -> None:
    name = unique("tok")
    create_user(db_env, name)
    token_id, token = issue_token(db_env, name, "laptop")
    assert re.fullmatch(r"gwt_[A-Za-z0-9_-]{43}", token), token
    rows = token_rows(db_env, name)
    assert len(rows) == 2
    first_id = min(rows)
    assert rows[first_id] == [name, "first", "token", "active"]
    assert rows[token_id] == [name, "laptop", "active"]

    result = run_cli(db_env, "tokens", "revoke", str(token_id))
    assert result.stdout.strip() == f"revoked token {token_id}"
    rows = token_rows(db_env)
    assert rows[token_id][:3] == [name, "laptop", "revoked"]
    assert rows[first_id][-1] == "active"
    # Revoking it again, or an id never issued, is refused.
    again = run_cli(db_env, "tokens", "revoke", str(token_id), check=False)
    assert_fails(again, f"no active token with id {token_id}")
    unknown = run_cli(db_env, "tokens", "revoke", "999999", check=False)
    assert_fails(unknown, "no active token with id 999999")


def test_token_commands_refuse_unknown_users_and_ids(db_env: dict[str, str]) -> None:
    assert_fails(run_cli(db_env, "tokens", "issue", "nobody", check=False), "no user named")
    assert_fails(run_cli(db_env, "tokens", "list", "nobody", check=False), "no user named")
    not_a_number = run_cli(db_env, "tokens", "revoke", "abc", check=False)
    assert not_a_number.returncode == 2
    assert "is not a valid integer" in not_a_number.stderr


# -- against a running gateway ----------------------------------------------------------


def test_users_create_prints_a_token_that_works(
    cli_gateway: GatewayProcess, fake_upstream: FakeUpstream
) -> None:
    name = unique("run")
    result = cli_gateway.cli("users", "create", name)
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("gwt_")
    assert token not in result.stderr
    status = httpx.get(f"{cli_gateway.url}{KEY_PATH}", headers={"authorization": f"Bearer {token}"})
    assert status.status_code == 200
    assert status.json()["configured"] is False
    key = store_key(cli_gateway, token)
    response = httpx.get(f"{cli_gateway.url}/v1/models", headers={"x-api-key": token})
    assert response.status_code == 200
    assert fake_upstream.stats()["keys"][key]["total"] == 1


def test_a_second_token_works_and_revocation_reaches_every_worker(
    cli_gateway: GatewayProcess,
) -> None:
    name = unique("rev")
    _, first = create_user(cli_gateway.env, name)
    store_key(cli_gateway, first)
    token_id, second = issue_token(cli_gateway.env, name, "ci")
    assert second != first
    assert {row[1] for row in token_rows(cli_gateway.env, name).values()} >= {"ci"}
    # Both tokens work, and every worker has the second one cached.
    until_every_worker_answered(cli_gateway, first, 200)
    until_every_worker_answered(cli_gateway, second, 200)

    cli_gateway.cli("tokens", "revoke", str(token_id))
    until_every_worker_answered(cli_gateway, second, 401)
    until_every_worker_answered(cli_gateway, first, 200)
    response = httpx.get(f"{cli_gateway.url}/v1/models", headers={"x-api-key": second})
    assert "revoked" in response.json()["error"]["message"]


def test_users_delete_locks_the_user_out_of_a_running_gateway(
    cli_gateway: GatewayProcess,
) -> None:
    name, other = unique("del"), unique("stay")
    _, token = create_user(cli_gateway.env, name)
    _, other_token = create_user(cli_gateway.env, other)
    store_key(cli_gateway, token)
    store_key(cli_gateway, other_token)
    until_every_worker_answered(cli_gateway, token, 200)

    cli_gateway.cli("users", "delete", name)
    until_every_worker_answered(cli_gateway, token, 401)
    until_every_worker_answered(cli_gateway, other_token, 200)
    settings = httpx.get(f"{cli_gateway.url}{KEY_PATH}", headers={"x-api-key": token})
    assert settings.status_code == 401
    assert name not in user_names(cli_gateway.env)
    assert all(row[0] != name for row in token_rows(cli_gateway.env).values())


def _caps_json(gateway: GatewayProcess) -> list[dict[str, Any]]:
    return gateway.caps()


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_caps_shows_every_gate_as_a_table_and_as_json(cli_gateway: GatewayProcess) -> None:
    name = unique("caps")
    user_id, token = create_user(cli_gateway.env, name)
    store_key(cli_gateway, token, cap=3)
    stream = {"model": "m", "max_tokens": 8, "stream": True, "messages": []}
    with httpx.stream(
        "POST",
        f"{cli_gateway.url}/v1/messages?events=200&delay=0.1",
        json=stream,
        headers={"x-api-key": token},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        # Keep the iterator: a collected one closes the response (a client disconnect).
        chunks = response.iter_raw()
        next(chunks)  # the stream is open and holds one permit

        rows = _caps_json(cli_gateway)
        for row in rows:
            assert {"scope", "cap", "in_use", "free"} <= set(row), row
            assert row["in_use"] + row["free"] == row["cap"]
        mine = [r for r in rows if r["scope"] == "credential" and r["user_id"] == user_id]
        assert len(mine) == 1, rows
        assert (mine[0]["cap"], mine[0]["in_use"], mine[0]["free"]) == (3, 1, 2)
        assert (mine[0]["user"], mine[0]["to_drain"]) == (name, 0)
        assert mine[0]["held_by_live_workers"] == 1
        glob = [r for r in rows if r["scope"] == "global"]
        assert len(glob) == 1, rows
        assert glob[0]["cap"] == GLOBAL_CAP
        assert glob[0]["in_use"] >= 1

        table = cli_gateway.cli("caps").stdout.splitlines()
        assert table[0].startswith(f"gateway namespace {cli_gateway.namespace} (launcher pid ")
        header = table[1]
        assert header.split() == ["scope", "user", "cap", "in", "use", "free", "to", "drain"]
        line = next(line for line in table if f" {name} " in line)
        assert line.split() == ["credential", name, "3", "1", "2", "-"]
        assert any(line.split()[0] == "global" for line in table[2:])
        # Columns line up: every value ends where its heading does.
        for heading in ("cap", "in use", "free", "to drain"):
            end = header.index(heading) + len(heading)
            gate_rows = [row for row in table[2:] if row.split()[0] in ("global", "credential")]
            assert all(row[end - 1] != " " for row in gate_rows if len(row) >= end)
        assert table[-1] == "drift repairs since start: 0 (global 0, credential 0)"

    def released() -> bool:
        row = next(r for r in _caps_json(cli_gateway) if r.get("user_id") == user_id)
        return bool(row["in_use"] == 0 and row["free"] == 3)

    _wait_for(released, "the permit to come back")


def test_caps_with_no_running_gateway_says_so(tmp_path: Path, ipc_namespace: str) -> None:
    env = base_env(
        tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'gateway.sqlite3'}",
        namespace=ipc_namespace,
        upstream_url="http://127.0.0.1:9",
    )
    for args in (("caps",), ("caps", "--json")):
        result = run_cli(env, *args, check=False)
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.strip() == (
            f"Error: no running gateway found ({ipc_namespace}); is it running?"
        )
    invalid = run_cli({**env, "GATEWAY_IPC_NAMESPACE": "no/such"}, "caps", check=False)
    assert invalid.returncode != 0


def test_caps_finds_a_gateway_whose_namespace_was_set_by_hand(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    gateway = start_gateway(workers=2)
    store_key(gateway, gateway.create_user("hand"), cap=5)
    env = {k: v for k, v in gateway.env.items() if k != "GATEWAY_IPC_NAMESPACE"}
    rows = [json.loads(line) for line in run_cli(env, "caps", "--json").stdout.splitlines()]
    assert {row["namespace"] for row in rows} == {gateway.namespace}
    assert [(r["user"], r["cap"]) for r in rows if r["scope"] == "credential"] == [("hand", 5)]


def test_revoke_reaches_a_gateway_whose_namespace_was_set_by_hand(
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    """The operator's shell lacks GATEWAY_IPC_NAMESPACE: the launcher's tag still finds it."""
    gateway = start_gateway(workers=2)
    token = gateway.create_user("nina")
    store_key(gateway, token)
    until_every_worker_answered(gateway, token, 200)  # both workers cache the credential
    token_id = str(min(token_rows(gateway.env, "nina")))
    env = {k: v for k, v in gateway.env.items() if k != "GATEWAY_IPC_NAMESPACE"}
    run_cli(env, "tokens", "revoke", token_id)
    until_every_worker_answered(gateway, token, 401)


def test_users_set_cap_applies_at_once_and_refuses_bad_input(cli_gateway: GatewayProcess) -> None:
    name = unique("setcap")
    _user_id, token = create_user(cli_gateway.env, name)
    assert_fails(
        run_cli(cli_gateway.env, "users", "set-cap", name, "3", check=False),
        f"user {name!r} has no Anthropic key stored",
    )
    store_key(cli_gateway, token, cap=8)
    until_every_worker_answered(cli_gateway, token, 200)  # both workers cache cap 8
    out = run_cli(cli_gateway.env, "users", "set-cap", name, "1").stdout
    assert out.strip() == f"cap of {name}: 8 -> 1"
    status = httpx.get(f"{cli_gateway.url}{KEY_PATH}", headers={"x-api-key": token}).json()
    assert status["max_concurrent"] == 1
    row = next(r for r in _caps_json(cli_gateway) if r.get("user") == name)
    assert (row["cap"], row["in_use"], row["free"]) == (1, 0, 1)
    for bad in ("0", "257", "two"):
        assert_fails(run_cli(cli_gateway.env, "users", "set-cap", name, bad, check=False), "CAP")
    assert_fails(
        run_cli(cli_gateway.env, "users", "set-cap", unique("ghost"), "2", check=False),
        "no user named",
    )
