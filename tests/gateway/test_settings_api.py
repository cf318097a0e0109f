"""The settings REST API (`/api/v1/me/anthropic-key`) against a real `gateway serve`.

One two-worker server per engine (SQLite, then a fresh PostgreSQL database) is shared by
the module; every test works on users of its own, so the tests do not interfere.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from loadtests.fake_upstream import FakeUpstream
from storage import repository
from storage.crypto import MasterKey
from storage.engine import bind_engine, create_engine
from storage.tables import TABLES
from tests.fixtures.databases import (
    DEFAULT_POSTGRES_URL,
    _admin,
    _create_postgres_database,
    _run_in_thread,
)
from tests.fixtures.gateway import GatewayProcess, held_streams, module_gateway

PATH = "/api/v1/me/anthropic-key"
NOT_CONFIGURED = {
    "configured": False,
    "configured_at": None,
    "updated_at": None,
    "max_concurrent": None,
    "in_use": None,
}
# Strict RFC 3339 date-time: date, "T", time, optional fraction, and a zone.
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ],
)
def api_gateway(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    fake_upstream: FakeUpstream,
) -> Iterator[GatewayProcess]:
    """A two-worker gateway on a database of its own: a SQLite file, or a new Postgres one."""
    tmp = tmp_path_factory.mktemp(f"settings-{request.param}")
    dropped: list[str] = []
    if request.param == "sqlite":
        database_url = f"sqlite:///{tmp / 'gateway.sqlite3'}"
    else:
        server_url = os.environ.get("GATEWAY_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
        name = f"gwtest_{secrets.token_hex(6)}"
        _create_postgres_database(server_url, name)
        dropped.append(name)
        database_url = urlsplit(server_url)._replace(path=f"/{name}").geturl()
    try:
        with module_gateway(tmp, fake_upstream.url, database_url=database_url) as gateway:
            yield gateway
    finally:
        for name in dropped:
            _run_in_thread(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- helpers ----------------------------------------------------------------------------


def new_user(gateway: GatewayProcess, name: str | None = None) -> str:
    """A fresh user without a key; returns its gateway token.

    Made in-process through the repository, the same calls `gateway users create` makes:
    the command line costs a Python start per user, and these tests need many users.
    The command line itself is tested in test_cli.py.
    """
    return _run_in_thread(_create_user(gateway.env["GATEWAY_DATABASE_URL"], name))


async def _create_user(database_url: str, name: str | None) -> str:
    previous = [(table, table._meta.db) for table in TABLES]
    engine = create_engine(database_url)  # no pool: this thread's loop ends with the call
    bind_engine(engine)
    try:
        user = await repository.create_user(name or f"s{uuid.uuid4().hex[:10]}")
        _record, token = await repository.issue_token(user.id, label="settings test")
        return token
    finally:
        for table, db in previous:
            table._meta.db = db


def new_key(tag: str = "k") -> str:
    return f"sk-ant-test-{tag}-{uuid.uuid4().hex}"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def status_of(gateway: GatewayProcess, token: str) -> dict[str, Any]:
    response = httpx.get(f"{gateway.url}{PATH}", headers=bearer(token), timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"configured", "configured_at", "updated_at", "max_concurrent", "in_use"}
    if body["configured"]:
        # Above the cap only after a lowered one, while the requests admitted before drain.
        assert type(body["in_use"]) is int and body["in_use"] >= 0
    return body


def put_json(gateway: GatewayProcess, token: str, body: object) -> httpx.Response:
    return put_raw(gateway, token, json.dumps(body).encode(), "application/json")


def put_raw(
    gateway: GatewayProcess, token: str, content: bytes, content_type: str | None
) -> httpx.Response:
    headers = bearer(token)
    if content_type is not None:
        headers["content-type"] = content_type
    return httpx.put(f"{gateway.url}{PATH}", content=content, headers=headers, timeout=10)


def delete(gateway: GatewayProcess, token: str) -> httpx.Response:
    return httpx.delete(f"{gateway.url}{PATH}", headers=bearer(token), timeout=10)


def error_of(response: httpx.Response, status: int, kind: str) -> str:
    """The message of an Anthropic-shaped error response, after checking its shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["type"] == "error", body
    assert set(body) == {"type", "error"}, body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind, body
    message = body["error"]["message"]
    assert isinstance(message, str)
    return message


def parse_rfc3339(value: str) -> datetime:
    assert RFC3339.match(value), value
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.tzinfo is not None
    return parsed


def upstream_requests(upstream: FakeUpstream, key: str) -> int:
    counters = upstream.stats()["keys"].get(key)
    return 0 if counters is None else int(counters["total"])


def proxied_models(gateway: GatewayProcess, token: str) -> httpx.Response:
    return httpx.get(f"{gateway.url}/v1/models", headers={"x-api-key": token}, timeout=10)


def assert_upstream_sees(
    gateway: GatewayProcess, upstream: FakeUpstream, token: str, key: str, *, requests: int = 4
) -> None:
    """Several proxied requests (each on a new connection, so both workers) use ``key``."""
    before = upstream_requests(upstream, key)
    for _ in range(requests):
        response = proxied_models(gateway, token)
        assert response.status_code == 200, response.text
    assert upstream_requests(upstream, key) == before + requests


# -- the lifecycle ----------------------------------------------------------------------


def test_lifecycle_not_configured_put_cap_delete(
    api_gateway: GatewayProcess, fake_upstream: FakeUpstream
) -> None:
    token = new_user(api_gateway)
    assert status_of(api_gateway, token) == NOT_CONFIGURED

    key = new_key("life")
    before_put = datetime.now(UTC)
    assert put_json(api_gateway, token, {"key": key}).status_code == 204
    stored = status_of(api_gateway, token)
    assert stored["configured"] is True
    assert stored["max_concurrent"] == 8  # the default for a new key
    configured_at = parse_rfc3339(stored["configured_at"])
    slack = timedelta(seconds=5)
    assert before_put - slack <= configured_at <= datetime.now(UTC) + slack
    assert_upstream_sees(api_gateway, fake_upstream, token, key)

    response = put_json(api_gateway, token, {"max_concurrent": 3})
    assert response.status_code == 204
    assert response.content == b""
    capped = status_of(api_gateway, token)
    assert capped["configured"] is True
    assert capped["max_concurrent"] == 3
    # The key was not stored again: configured_at stays, updated_at moves.
    assert parse_rfc3339(capped["configured_at"]) == configured_at
    assert parse_rfc3339(capped["updated_at"]) > parse_rfc3339(stored["updated_at"])
    assert parse_rfc3339(stored["updated_at"]) == configured_at
    assert_upstream_sees(api_gateway, fake_upstream, token, key)  # the key is unchanged

    assert delete(api_gateway, token).status_code == 204
    assert status_of(api_gateway, token) == NOT_CONFIGURED
    for _ in range(4):  # every worker forgets the key at once
        response = proxied_models(api_gateway, token)
        assert "PUT /api/v1/me/anthropic-key" in error_of(response, 401, "authentication_error")


def test_delete_is_idempotent(api_gateway: GatewayProcess) -> None:
    token = new_user(api_gateway)
    assert delete(api_gateway, token).status_code == 204  # nothing stored yet
    assert put_json(api_gateway, token, {"key": new_key()}).status_code == 204
    for _ in range(3):
        response = delete(api_gateway, token)
        assert response.status_code == 204
        assert response.content == b""
    assert status_of(api_gateway, token) == NOT_CONFIGURED


def test_x_api_key_authenticates_the_settings_api_too(api_gateway: GatewayProcess) -> None:
    token = new_user(api_gateway)
    headers = {"x-api-key": token}
    response = httpx.put(
        f"{api_gateway.url}{PATH}", json={"key": new_key()}, headers=headers, timeout=10
    )
    assert response.status_code == 204
    response = httpx.get(f"{api_gateway.url}{PATH}", headers=headers, timeout=10)
    assert response.json()["configured"] is True
    assert httpx.delete(f"{api_gateway.url}{PATH}", headers=headers, timeout=10).status_code == 204


def test_users_see_only_their_own_key(api_gateway: GatewayProcess) -> None:
    alice, bob = new_user(api_gateway), new_user(api_gateway)
    assert put_json(api_gateway, alice, {"key": new_key(), "max_concurrent": 5}).status_code == 204
    assert status_of(api_gateway, bob) == NOT_CONFIGURED
    assert delete(api_gateway, bob).status_code == 204
    assert status_of(api_gateway, alice)["max_concurrent"] == 5


# -- rotation and caps ------------------------------------------------------------------


def test_rotation_without_a_cap_keeps_it_and_with_a_cap_replaces_it(
    api_gateway: GatewayProcess, fake_upstream: FakeUpstream
) -> None:
    token = new_user(api_gateway)
    first, second, third = new_key("first"), new_key("second"), new_key("third")
    assert put_json(api_gateway, token, {"key": first, "max_concurrent": 5}).status_code == 204
    assert status_of(api_gateway, token)["max_concurrent"] == 5
    assert_upstream_sees(api_gateway, fake_upstream, token, first)
    at_first = parse_rfc3339(status_of(api_gateway, token)["configured_at"])

    assert put_json(api_gateway, token, {"key": second}).status_code == 204
    rotated = status_of(api_gateway, token)
    assert rotated["max_concurrent"] == 5
    at_second = parse_rfc3339(rotated["configured_at"])
    assert at_second > at_first
    assert_upstream_sees(api_gateway, fake_upstream, token, second)

    assert put_json(api_gateway, token, {"key": third, "max_concurrent": 7}).status_code == 204
    replaced = status_of(api_gateway, token)
    assert replaced["max_concurrent"] == 7
    assert parse_rfc3339(replaced["configured_at"]) > at_second
    assert_upstream_sees(api_gateway, fake_upstream, token, third)
    assert upstream_requests(fake_upstream, first) == 4
    assert upstream_requests(fake_upstream, second) == 4


def test_a_cap_alone_with_a_null_key_changes_only_the_cap(api_gateway: GatewayProcess) -> None:
    token = new_user(api_gateway)
    assert put_json(api_gateway, token, {"key": new_key()}).status_code == 204
    assert put_json(api_gateway, token, {"key": None, "max_concurrent": 2}).status_code == 204
    assert status_of(api_gateway, token)["max_concurrent"] == 2


@pytest.mark.parametrize("caps", [(1, 256), (256, 1)], ids=["1-then-256", "256-then-1"])
def test_the_cap_bounds_are_accepted(api_gateway: GatewayProcess, caps: tuple[int, int]) -> None:
    token = new_user(api_gateway)
    low_or_high, other = caps
    body = {"key": new_key(), "max_concurrent": low_or_high}
    assert put_json(api_gateway, token, body).status_code == 204
    assert status_of(api_gateway, token)["max_concurrent"] == low_or_high
    assert put_json(api_gateway, token, {"max_concurrent": other}).status_code == 204
    assert status_of(api_gateway, token)["max_concurrent"] == other


def test_an_integral_number_is_an_integer_as_json_schema_says(
    api_gateway: GatewayProcess,
) -> None:
    token = new_user(api_gateway)
    assert (
        put_raw(
            api_gateway,
            token,
            b'{"key": "sk-ant-test-f", "max_concurrent": 8.0}',
            "application/json",
        ).status_code
        == 204
    )
    assert status_of(api_gateway, token)["max_concurrent"] == 8


def test_options_lists_every_method_of_the_resource(api_gateway: GatewayProcess) -> None:
    response = httpx.options(f"{api_gateway.url}{PATH}", timeout=10)
    assert response.status_code == 204
    allowed = set(response.headers["allow"].replace(" ", "").split(","))
    assert allowed == {"GET", "PUT", "DELETE", "OPTIONS"}


def test_the_key_is_trimmed_before_it_is_stored(
    api_gateway: GatewayProcess, fake_upstream: FakeUpstream
) -> None:
    token = new_user(api_gateway)
    key = new_key("trim")
    assert put_json(api_gateway, token, {"key": f" \t{key}\n "}).status_code == 204
    assert_upstream_sees(api_gateway, fake_upstream, token, key)


def test_a_key_of_exactly_256_characters_is_accepted(
    api_gateway: GatewayProcess, fake_upstream: FakeUpstream
) -> None:
    token = new_user(api_gateway)
    stem = new_key("long")
    key = stem + "x" * (256 - len(stem))
    # Surrounding blanks do not count: the length is checked after trimming.
    assert put_json(api_gateway, token, {"key": f"  {key}  "}).status_code == 204
    assert_upstream_sees(api_gateway, fake_upstream, token, key, requests=2)


def test_content_type_parameters_are_accepted(api_gateway: GatewayProcess) -> None:
    token = new_user(api_gateway)
    body = json.dumps({"key": new_key()}).encode()
    response = put_raw(api_gateway, token, body, "Application/JSON; charset=utf-8")
    assert response.status_code == 204
    assert status_of(api_gateway, token)["configured"] is True


# -- bad input: 400 naming the field and the rule, before anything is written -----------

TOO_LONG = "sk-ant-" + "x" * 250  # 257 characters

INVALID_BODIES = [
    pytest.param({}, "body:", "at least one of key, max_concurrent", id="empty-object"),
    pytest.param(
        {"max_concurrent": None}, "body:", "at least one of key, max_concurrent", id="null-cap"
    ),
    pytest.param(
        {"key": None, "max_concurrent": None}, "body:", "at least one of", id="both-null"
    ),
    pytest.param({"max_concurrent": 0}, "max_concurrent:", "between 1 and 256", id="cap-0"),
    pytest.param({"max_concurrent": 257}, "max_concurrent:", "between 1 and 256", id="cap-257"),
    pytest.param({"max_concurrent": -1}, "max_concurrent:", "between 1 and 256", id="cap-neg"),
    pytest.param(
        {"max_concurrent": 10**30}, "max_concurrent:", "between 1 and 256", id="cap-huge"
    ),
    pytest.param({"max_concurrent": "8"}, "max_concurrent:", "integer", id="cap-string"),
    pytest.param({"max_concurrent": 300.0}, "max_concurrent:", "integer", id="cap-float-over"),
    pytest.param({"max_concurrent": 8.5}, "max_concurrent:", "integer", id="cap-fraction"),
    pytest.param({"max_concurrent": True}, "max_concurrent:", "integer", id="cap-true"),
    pytest.param({"max_concurrent": [8]}, "max_concurrent:", "integer", id="cap-list"),
    pytest.param({"key": 12345}, "key:", "string", id="key-number"),
    pytest.param({"key": ""}, "key:", "must not be empty", id="key-empty"),
    pytest.param({"key": " \t\n "}, "key:", "must not be empty", id="key-blank"),
    pytest.param({"key": TOO_LONG}, "key:", "at most 256 characters", id="key-257"),
    pytest.param({"key": "sk-abc123"}, "key:", "must start with 'sk-ant-'", id="key-prefix"),
    pytest.param({"key": "SK-ANT-abc"}, "key:", "must start with 'sk-ant-'", id="key-case"),
    # It goes out as a header value: what could never be sent, or would write a header
    # of its own, is refused here rather than stored.
    pytest.param({"key": "sk-ant-x\r\nX-Evil: 1"}, "key:", "only visible ASCII", id="key-crlf"),
    pytest.param({"key": "sk-ant-x\nX-Evil: 1"}, "key:", "only visible ASCII", id="key-lf"),
    pytest.param({"key": "sk-ant-x\u0000y"}, "key:", "only visible ASCII", id="key-nul"),
    pytest.param({"key": "sk-ant-caf\u00e9"}, "key:", "only visible ASCII", id="key-e-acute"),
    pytest.param({"key": "sk-ant-x\u2028y"}, "key:", "only visible ASCII", id="key-u2028"),
    pytest.param({"key": "sk-ant-a b"}, "key:", "only visible ASCII", id="key-space"),
    pytest.param({"key": "sk-ant-a\tb"}, "key:", "only visible ASCII", id="key-tab"),
    pytest.param({"key": "sk-ant-a\u007fb"}, "key:", "only visible ASCII", id="key-del"),
    pytest.param({"key": "sk-ant-x", "extra": 1}, "extra:", "unknown field", id="unknown-field"),
    pytest.param({"Key": "sk-ant-x"}, "Key:", "unknown field", id="unknown-field-case"),
    pytest.param([], "body:", "JSON object", id="array"),
    pytest.param("sk-ant-x", "body:", "JSON object", id="string"),
    pytest.param(None, "body:", "JSON object", id="null"),
    # The documented order: the cap is checked before the key.
    pytest.param({"key": "nope", "max_concurrent": 0}, "max_concurrent:", "between 1 and 256",
                 id="cap-before-key"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "field", "rule"), INVALID_BODIES)
def test_invalid_bodies_are_400_naming_field_and_rule(
    api_gateway: GatewayProcess, body: object, field: str, rule: str
) -> None:
    token = new_user(api_gateway)
    message = error_of(put_json(api_gateway, token, body), 400, "invalid_request_error")
    assert message.startswith(field), message
    assert rule in message, message
    assert status_of(api_gateway, token) == NOT_CONFIGURED


@pytest.mark.parametrize("body", [{"max_concurrent": 4}, {"key": None, "max_concurrent": 4}])
def test_a_cap_without_a_stored_key_is_409(api_gateway: GatewayProcess, body: object) -> None:
    # Valid input the current state cannot take: a conflict, not a bad request (the
    # schema says the body is valid; schemathesis holds the API to it).
    token = new_user(api_gateway)
    message = error_of(put_json(api_gateway, token, body), 409, "invalid_request_error")
    assert message == "max_concurrent: no Anthropic key configured yet; send key as well"
    assert status_of(api_gateway, token) == NOT_CONFIGURED


@pytest.mark.parametrize(
    "content", [b"{", b'{"key": "sk-ant-x",}', b"", b"\xff\xfe", b"{'key': 'sk-ant-x'}"]
)
def test_malformed_json_is_400(api_gateway: GatewayProcess, content: bytes) -> None:
    token = new_user(api_gateway)
    response = put_raw(api_gateway, token, content, "application/json")
    assert error_of(response, 400, "invalid_request_error") == "body: malformed JSON"


def test_a_bad_put_leaves_a_stored_key_and_cap_alone(
    api_gateway: GatewayProcess, fake_upstream: FakeUpstream
) -> None:
    token = new_user(api_gateway)
    key = new_key("kept")
    assert put_json(api_gateway, token, {"key": key, "max_concurrent": 6}).status_code == 204
    before = status_of(api_gateway, token)
    for body in (
        {"key": new_key("rejected"), "max_concurrent": 0},
        {"key": new_key("rejected"), "max_concurrent": "6"},
        {"key": new_key("rejected"), "extra": True},
        {"key": "sk-bad", "max_concurrent": 9},
    ):
        assert put_json(api_gateway, token, body).status_code == 400
    assert status_of(api_gateway, token) == before
    assert_upstream_sees(api_gateway, fake_upstream, token, key, requests=2)


# -- 401, 413, 415, 405 -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({}, "Missing", id="missing"),
        pytest.param({"authorization": "Bearer"}, "Missing", id="empty-bearer"),
        pytest.param({"authorization": "Basic dXNlcjpwYXNz"}, "Missing", id="basic-scheme"),
        pytest.param({"x-api-key": "gwt_unknown"}, "Invalid", id="unknown-x-api-key"),
        pytest.param({"authorization": "Bearer gwt_unknown"}, "Invalid", id="unknown-bearer"),
    ],
)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_missing_and_unknown_tokens_are_401(
    api_gateway: GatewayProcess, method: str, headers: dict[str, str], expected: str
) -> None:
    response = httpx.request(
        method,
        f"{api_gateway.url}{PATH}",
        headers={**headers, "content-type": "application/json"},
        content=b'{"key": "sk-ant-whatever"}' if method == "PUT" else None,
        timeout=10,
    )
    assert expected in error_of(response, 401, "authentication_error")


def test_a_revoked_token_is_401_while_the_other_token_works(api_gateway: GatewayProcess) -> None:
    name = f"s{uuid.uuid4().hex[:10]}"
    kept = api_gateway.create_user(name)
    second = api_gateway.cli("tokens", "issue", name, "--label", "to-revoke").stdout
    revoked = second.strip().splitlines()[-1]
    token_id = re.search(r"issued token (\d+)", second)
    assert token_id is not None, second
    assert put_json(api_gateway, revoked, {"key": new_key()}).status_code == 204
    api_gateway.cli("tokens", "revoke", token_id.group(1))
    for method in ("GET", "PUT", "DELETE", "GET", "PUT", "DELETE"):
        response = httpx.request(
            method,
            f"{api_gateway.url}{PATH}",
            headers=bearer(revoked),
            json={"max_concurrent": 3} if method == "PUT" else None,
            timeout=10,
        )
        assert "revoked" in error_of(response, 401, "authentication_error")
    # Nothing changed through the revoked token; the user's other token still works.
    assert status_of(api_gateway, kept)["max_concurrent"] == 8
    assert put_json(api_gateway, kept, {"max_concurrent": 4}).status_code == 204


def test_authentication_comes_before_body_checks(api_gateway: GatewayProcess) -> None:
    # A stranger learns nothing about the body rules, and no 413/415 leaks past auth.
    for content, content_type in ((b"{", "application/json"), (b"{}", "text/plain")):
        response = put_raw(api_gateway, "gwt_unknown", content, content_type)
        error_of(response, 401, "authentication_error")


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_a_body_that_is_not_json_is_415(
    api_gateway: GatewayProcess, content_type: str | None
) -> None:
    token = new_user(api_gateway)
    body = json.dumps({"key": new_key()}).encode()
    response = put_raw(api_gateway, token, body, content_type)
    message = error_of(response, 415, "invalid_request_error")
    assert message.startswith("content-type:"), message
    assert "application/json" in message
    assert status_of(api_gateway, token) == NOT_CONFIGURED


def _padded_body(size: int) -> bytes:
    """A valid JSON body of exactly ``size`` bytes (blanks are legal JSON whitespace)."""
    core = json.dumps({"key": new_key("pad")}).encode()
    return core + b" " * (size - len(core))


def test_a_body_of_64_kib_is_accepted(api_gateway: GatewayProcess) -> None:
    token = new_user(api_gateway)
    assert (
        put_raw(api_gateway, token, _padded_body(64 * 1024), "application/json").status_code == 204
    )


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_64_kib_is_413(api_gateway: GatewayProcess, chunked: bool) -> None:
    token = new_user(api_gateway)
    body = _padded_body(64 * 1024 + 1)
    headers = {**bearer(token), "content-type": "application/json"}
    content: bytes | Iterator[bytes] = iter([body[:1000], body[1000:]]) if chunked else body
    response = httpx.put(f"{api_gateway.url}{PATH}", content=content, headers=headers, timeout=10)
    assert response.status_code == 413, response.text
    body_json = response.json()
    assert body_json["type"] == "error"
    assert body_json["error"]["type"] == "request_too_large"
    assert body_json["error"]["message"] == "body: must be at most 64 KiB (65536 bytes)"
    assert status_of(api_gateway, token) == NOT_CONFIGURED


def test_an_unsupported_method_is_405_with_an_error_envelope(api_gateway: GatewayProcess) -> None:
    token = new_user(api_gateway)
    response = httpx.post(f"{api_gateway.url}{PATH}", json={}, headers=bearer(token), timeout=10)
    error_of(response, 405, "invalid_request_error")
    assert set(response.headers["allow"].replace(" ", "").split(",")) >= {"GET", "PUT", "DELETE"}
    health = httpx.post(f"{api_gateway.url}/healthz", timeout=10)
    error_of(health, 405, "invalid_request_error")
    assert "GET" in health.headers["allow"] and "HEAD" in health.headers["allow"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"key": "sk-ant-test-a", "key": "sk-ant-test-b"}', "key"),
        (b'{"max_concurrent": 3, "max_concurrent": 4}', "max_concurrent"),
        (b'{"max_concurrent": 3, "key": "sk-ant-test-a", "max_concurrent": 3}', "max_concurrent"),
    ],
)
def test_a_duplicate_key_in_the_body_is_400(
    api_gateway: GatewayProcess, body: bytes, field: str
) -> None:
    token = new_user(api_gateway)
    message = error_of(
        put_raw(api_gateway, token, body, "application/json"), 400, "invalid_request_error"
    )
    assert message == f"{field}: must appear once, got a duplicate key"
    assert status_of(api_gateway, token) == NOT_CONFIGURED


# -- secrets stay secret ----------------------------------------------------------------


def _stored_bytes(database_url: str) -> bytes:
    """Everything the database holds for our tables, as raw as we can read it."""
    if database_url.startswith("sqlite:///"):
        path = Path(database_url.removeprefix("sqlite:///"))
        # WAL mode: recent writes live in the -wal file until a checkpoint.
        return b"".join(p.read_bytes() for p in path.parent.glob(f"{path.name}*"))

    async def dump() -> bytes:
        connection = await asyncpg.connect(database_url, timeout=5)
        try:
            out = []
            for table in ("users", "gateway_tokens", "user_anthropic_keys"):
                # A row cast to text shows bytea as hex; raw columns come back as bytes.
                for row in await connection.fetch(f"SELECT t::text AS r, t.* FROM {table} AS t"):
                    for value in row.values():
                        out.append(value if isinstance(value, bytes) else str(value).encode())
            return b"\n".join(out)
        finally:
            await connection.close()

    return _run_in_thread(dump())


def _assert_absent(secret: str, haystack: bytes, where: str) -> None:
    raw = secret.encode()
    assert raw not in haystack, f"{where} holds the secret in clear"
    assert raw.hex().encode() not in haystack.lower(), f"{where} holds the secret as hex"


def test_the_database_holds_no_plaintext_key_or_token(api_gateway: GatewayProcess) -> None:
    name = f"s{uuid.uuid4().hex[:10]}"
    token = new_user(api_gateway, name)
    first, second = new_key("stored"), new_key("rotated")
    url = api_gateway.env["GATEWAY_DATABASE_URL"]
    assert put_json(api_gateway, token, {"key": first}).status_code == 204
    after_first = _stored_bytes(url)
    assert put_json(api_gateway, token, {"key": second}).status_code == 204
    after_second = _stored_bytes(url)
    # The check can see what it looks for: the user's name is stored in clear.
    assert name.encode() in after_first
    assert name.encode() in after_second
    for stored in (after_first, after_second):
        for secret in (first, second, token):
            _assert_absent(secret, stored, url.split(":", 1)[0])


def test_the_log_never_contains_a_key_or_a_token(api_gateway: GatewayProcess) -> None:
    name = f"s{uuid.uuid4().hex[:10]}"
    created = api_gateway.cli("users", "create", name).stdout
    token = created.strip().splitlines()[-1]
    user_id = re.search(r"\(([0-9a-f-]{36})\)", created)
    assert user_id is not None, created
    key = new_key("logged")
    # Every path a secret could take: good and bad PUTs, reads, proxying, revocation.
    assert put_json(api_gateway, token, {"key": key}).status_code == 204
    assert put_json(api_gateway, token, {"key": key, "max_concurrent": 0}).status_code == 400
    assert put_json(api_gateway, token, {"key": "sk-x" + key}).status_code == 400
    assert put_json(api_gateway, token, {"key": key + "x" * 300}).status_code == 400
    assert put_json(api_gateway, token, {"key": key, "max_concurrent": 8}).status_code == 204
    put_raw(api_gateway, token, key.encode(), "application/json")
    put_raw(api_gateway, token, key.encode(), "text/plain")
    status_of(api_gateway, token)
    marker = f"/v1/files/logcheck-{uuid.uuid4().hex}"
    assert httpx.get(f"{api_gateway.url}{marker}", headers={"x-api-key": token}).status_code == 200
    for header in ("x-api-key", "authorization"):
        value = f"{token}x" if header == "x-api-key" else f"Bearer {token}x"
        assert httpx.get(f"{api_gateway.url}{PATH}", headers={header: value}).status_code == 401

    # The proxied request's access line is written once its response has gone out;
    # wait for it, so that everything before it has reached the log too.
    deadline = time.monotonic() + 10
    while not any(r.get("path") == marker for r in api_gateway.log_records()):
        assert time.monotonic() < deadline, "the proxied request was never logged"
        time.sleep(0.05)
    access = next(r for r in api_gateway.log_records() if r.get("path") == marker)
    assert access["user_id"] == user_id.group(1)
    text = api_gateway.log_path.read_text(errors="replace")
    for secret in (key, token):
        assert secret not in text
        assert secret[8:-4] not in text  # nor a recognisable slice of it
    assert api_gateway.env["GATEWAY_MASTER_KEY"] not in text


def test_no_response_ever_echoes_the_key(api_gateway: GatewayProcess) -> None:
    token = new_user(api_gateway)
    key = new_key("echo")
    responses = [
        put_json(api_gateway, token, {"key": key}),
        httpx.get(f"{api_gateway.url}{PATH}", headers=bearer(token), timeout=10),
        put_json(api_gateway, token, {"key": key, "max_concurrent": 0}),
        put_json(api_gateway, token, {"key": "x" + key}),
        put_json(api_gateway, token, {"key": key + "y" * 300}),
        put_json(api_gateway, token, {"key": key, "unknown": key}),
        put_raw(api_gateway, token, key.encode(), "application/json"),
    ]
    for response in responses:
        assert key not in response.text
        assert token not in response.text
        for name, value in response.headers.items():
            assert key not in value and token not in value, name


# -- requests in flight -----------------------------------------------------------------


def test_in_use_is_the_keys_live_request_count_across_workers(api_gateway: GatewayProcess) -> None:
    token = new_user(api_gateway)
    assert status_of(api_gateway, token)["in_use"] is None  # no key, nothing to count
    response = put_json(api_gateway, token, {"key": new_key("busy"), "max_concurrent": 4})
    assert response.status_code == 204
    assert status_of(api_gateway, token)["in_use"] == 0  # before any request used the key
    with held_streams(api_gateway, token, 2):
        for _ in range(4):  # each read on a new connection: whichever worker answers
            assert status_of(api_gateway, token)["in_use"] == 2
        with held_streams(api_gateway, token, 1):
            assert status_of(api_gateway, token)["in_use"] == 3
            # A lowered cap: the requests admitted under the old one still count.
            assert put_json(api_gateway, token, {"max_concurrent": 1}).status_code == 204
            lowered = status_of(api_gateway, token)
            assert (lowered["max_concurrent"], lowered["in_use"]) == (1, 3)
    deadline = time.monotonic() + 10
    while (in_use := status_of(api_gateway, token)["in_use"]) != 0:
        assert time.monotonic() < deadline, f"still {in_use} in use after the streams ended"
        time.sleep(0.05)
    other = new_user(api_gateway)  # another user's key is counted apart
    assert put_json(api_gateway, other, {"key": new_key("idle")}).status_code == 204
    with held_streams(api_gateway, token, 1):
        assert status_of(api_gateway, other)["in_use"] == 0
        assert status_of(api_gateway, token)["in_use"] == 1


async def _user_with_a_stored_key(database_url: str, master_key: str, key: str) -> str:
    """A user whose key went into the database without the API's checks (as keys stored
    before the API refused unsendable ones did); returns the user's gateway token."""
    previous = [(table, table._meta.db) for table in TABLES]
    engine = create_engine(database_url)  # no pool: this thread's loop ends with the call
    bind_engine(engine)
    try:
        user = await repository.create_user(f"s{uuid.uuid4().hex[:10]}")
        _record, token = await repository.issue_token(user.id, label="settings test")
        ciphertext, nonce = MasterKey.from_base64(master_key).encrypt(key, user_id=user.id)
        await repository.upsert_key(
            user.id, ciphertext=ciphertext, nonce=nonce, key_id=None, max_concurrent=2
        )
        return token
    finally:
        for table, db in previous:
            table._meta.db = db


def test_a_stored_key_that_cannot_be_sent_is_reported_as_the_gateways_fault(
    api_gateway: GatewayProcess, fake_upstream: FakeUpstream
) -> None:
    """Never "the upstream is unreachable" for a request that never left: a 500 that says
    what is wrong and how to mend it, without the key."""
    key = "sk-ant-test-x\r\nX-Evil: 1"
    token = _run_in_thread(
        _user_with_a_stored_key(
            api_gateway.env["GATEWAY_DATABASE_URL"], api_gateway.env["GATEWAY_MASTER_KEY"], key
        )
    )
    for _ in range(4):  # each on a new connection: both workers
        response = proxied_models(api_gateway, token)
        message = error_of(response, 500, "api_error")
        assert "stored Anthropic key" in message and "visible ASCII" in message, message
        assert "PUT /api/v1/me/anthropic-key" in message
        assert "unreachable" not in message
        assert "X-Evil" not in response.text
    # Stored again through the API, it works.
    assert put_json(api_gateway, token, {"key": new_key()}).status_code == 204
    assert proxied_models(api_gateway, token).status_code == 200


# -- the schema and health --------------------------------------------------------------


def test_openapi_schema_describes_the_settings_api(api_gateway: GatewayProcess) -> None:
    response = httpx.get(f"{api_gateway.url}/schema/openapi.json", timeout=10)
    assert response.status_code == 200
    schema = response.json()
    operations = schema["paths"][PATH]
    assert {"get", "put", "delete"} <= set(operations)
    body = operations["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["type"] == "object"
    assert body["additionalProperties"] is False
    cap, null = body["properties"]["max_concurrent"]["oneOf"]
    assert (cap["type"], cap["minimum"], cap["maximum"], null["type"]) == (
        "integer",
        1,
        256,
        "null",
    )
    key, null = body["properties"]["key"]["oneOf"]
    assert (key["maxLength"], key["pattern"], null["type"]) == (256, "^sk-ant-[!-~]*$", "null")
    assert [alternative["required"] for alternative in body["anyOf"]] == [
        ["key"],
        ["max_concurrent"],
    ]
    assert "204" in operations["put"]["responses"]
    status_ref = operations["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    status_schema = schema["components"]["schemas"][status_ref["$ref"].rsplit("/", 1)[-1]]
    assert set(status_schema["properties"]) == {
        "configured",
        "configured_at",
        "updated_at",
        "max_concurrent",
        "in_use",
    }
    in_use = status_schema["properties"]["in_use"]
    assert {"integer", "null"} == {kind["type"] for kind in in_use["oneOf"]}
    assert "in flight" in in_use["description"]
    assert "204" in operations["delete"]["responses"]
    schemes = schema["components"]["securitySchemes"]
    assert schemes["gatewayToken"]["scheme"] == "bearer"
    assert (schemes["apiKey"]["type"], schemes["apiKey"]["in"], schemes["apiKey"]["name"]) == (
        "apiKey",
        "header",
        "x-api-key",
    )
    assert operations["get"]["security"] == [{"gatewayToken": []}, {"apiKey": []}]
    assert body["minProperties"] == 1
    # Every answer the API gives itself is documented, with the error envelope.
    documented = {
        method: set(operations[method]["responses"]) for method in ("get", "put", "delete")
    }
    assert documented["put"] >= {"204", "400", "401", "413", "415", "503"}
    assert documented["get"] >= {"200", "401", "503"}
    assert documented["delete"] >= {"204", "401", "503"}
    error_ref = operations["put"]["responses"]["400"]["content"]["application/json"]["schema"]
    error_schema = schema["components"]["schemas"][error_ref["$ref"].rsplit("/", 1)[-1]]
    assert set(error_schema["properties"]) == {"type", "error"}
    # /healthz answers an object, and says so; the pass-through is described.
    health = schema["paths"]["/healthz"]
    ok_ref = health["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    ok_schema = schema["components"]["schemas"][ok_ref["$ref"].rsplit("/", 1)[-1]]
    assert ok_schema["type"] == "object" and "status" in ok_schema["properties"]
    assert "503" in health["get"]["responses"] and "head" in health
    proxy = schema["paths"]["/v1/{path}"]
    assert {"get", "post"} <= set(proxy)
    assert "byte for byte" in proxy["post"]["description"]


def test_the_docs_pages_are_off_and_the_schema_is_served_locally(
    api_gateway: GatewayProcess,
) -> None:
    for page in ("/schema/swagger", "/schema/redoc", "/schema/elements", "/schema/rapidoc"):
        assert httpx.get(f"{api_gateway.url}{page}", timeout=10).status_code == 404
    root = httpx.get(f"{api_gateway.url}/schema", timeout=10)
    assert root.status_code == 200
    assert "cdn" not in root.text.lower() and "<script" not in root.text
    assert root.json()["openapi"].startswith("3.")


def test_head_healthz_answers_like_get_without_a_body(api_gateway: GatewayProcess) -> None:
    response = httpx.head(f"{api_gateway.url}/healthz", timeout=10)
    assert response.status_code == 200
    assert response.content == b""


def test_healthz_is_200_while_the_database_answers(api_gateway: GatewayProcess) -> None:
    for _ in range(4):
        response = httpx.get(f"{api_gateway.url}/healthz", timeout=10)
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}
