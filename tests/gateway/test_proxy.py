"""The proxy path against a real `gateway serve` (two workers) and the fake upstream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

import anthropic
import httpx
import pytest

from ipc.namespace import usage
from loadtests.fake_upstream import FakeUpstream
from loadtests.procs import rss_mib
from tests.fixtures.gateway import GatewayProcess

MESSAGE = {
    "model": "claude-test",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.fixture(scope="module")
def user(shared_gateway: GatewayProcess) -> tuple[str, str]:
    """(gateway token, upstream key) of a user with a key and cap 8."""
    return shared_gateway.user_with_key(f"u{uuid.uuid4().hex[:6]}")


def fresh_user(gateway: GatewayProcess, *, cap: int | None = None) -> tuple[str, str]:
    return gateway.user_with_key(f"u{uuid.uuid4().hex[:6]}", cap=cap)


def seen_for(upstream: FakeUpstream, key: str) -> list[dict[str, Any]]:
    return [r for r in upstream.stats()["recent"] if r["key"] == key]


def credential_in_use(gateway: GatewayProcess) -> dict[str, int]:
    return {row.name: row.in_use for row in usage(gateway.namespace) if row.scope == "credential"}


def wait_all_free(gateway: GatewayProcess, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = usage(gateway.namespace)
        if all(row.in_use == 0 for row in rows):
            assert all(row.free == row.cap for row in rows)
            return
        time.sleep(0.05)
    raise AssertionError(f"permits still held: {usage(gateway.namespace)}")


def post(gateway: GatewayProcess, token: str, query: str = "", **kwargs: Any) -> httpx.Response:
    headers = {"x-api-key": token, "anthropic-version": "2023-06-01", **kwargs.pop("headers", {})}
    return httpx.post(
        f"{gateway.url}/v1/messages{query}",
        json=kwargs.pop("json", MESSAGE),
        headers=headers,
        timeout=30,
        **kwargs,
    )


# -- forwarding -------------------------------------------------------------------------


def test_json_is_forwarded_with_the_users_key(
    shared_gateway: GatewayProcess, user: tuple[str, str], fake_upstream: FakeUpstream
) -> None:
    token, key = user
    response = post(shared_gateway, token, headers={"anthropic-beta": "tools-2024"})
    assert response.status_code == 200
    assert response.json()["type"] == "message"
    assert response.headers["request-id"].startswith("req_")
    seen = seen_for(fake_upstream, key)[-1]
    assert seen["headers"]["x-api-key"] == key
    assert seen["headers"]["anthropic-version"] == "2023-06-01"
    assert seen["headers"]["anthropic-beta"] == "tools-2024"
    wait_all_free(shared_gateway)


def test_bearer_token_authenticates_too(
    shared_gateway: GatewayProcess, user: tuple[str, str]
) -> None:
    token, _ = user
    response = httpx.post(
        f"{shared_gateway.url}/v1/messages",
        json=MESSAGE,
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 200


def test_sse_is_relayed_byte_for_byte_and_incrementally(
    shared_gateway: GatewayProcess, user: tuple[str, str], fake_upstream: FakeUpstream
) -> None:
    token, _ = user
    body = {**MESSAGE, "stream": True}
    query = "?events=5&delay=0.3"
    direct = httpx.post(
        f"{fake_upstream.url}/v1/messages{query}",
        json=body,
        headers={"x-api-key": "sk-ant-test-direct"},
        timeout=30,
    ).content
    arrivals = []
    chunks = []
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{shared_gateway.url}/v1/messages{query}",
        json=body,
        headers={"x-api-key": token},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for chunk in response.iter_raw():
            arrivals.append(time.monotonic() - started)
            chunks.append(chunk)
    relayed = b"".join(chunks)
    # Same bytes but for the ids the fake makes up per response.
    assert _without_ids(relayed) == _without_ids(direct)
    total = arrivals[-1]
    assert total >= 5 * 0.3 * 0.9
    assert arrivals[0] < total / 2, "the first event must not wait for the end of the stream"
    wait_all_free(shared_gateway)


def raw_get(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    import socket

    lines = [f"GET {path} HTTP/1.1", "host: 127.0.0.1", "connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _without_ids(body: bytes) -> bytes:
    import re

    return re.sub(rb'"msg_[0-9a-f]+"', b'"msg_"', body)


@pytest.mark.parametrize("status", [400, 429, 500, 529])
def test_upstream_errors_pass_through_verbatim(
    shared_gateway: GatewayProcess,
    user: tuple[str, str],
    fake_upstream: FakeUpstream,
    status: int,
) -> None:
    token, _ = user
    query = f"?status={status}&retry_after=7"
    direct = httpx.post(
        f"{fake_upstream.url}/v1/messages{query}",
        json=MESSAGE,
        headers={"x-api-key": "sk-ant-test-direct"},
        timeout=10,
    )
    response = post(shared_gateway, token, query)
    assert response.status_code == status
    assert response.json() == direct.json()
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-should-retry"] == "true"
    wait_all_free(shared_gateway)


def test_path_and_query_are_forwarded_verbatim(
    shared_gateway: GatewayProcess, user: tuple[str, str]
) -> None:
    token, _ = user
    response = httpx.get(
        f"{shared_gateway.url}/v1/files/a%3Fb%2Fc/content?x=%2F&y=a+b&z=%3F",
        headers={"x-api-key": token},
        timeout=10,
    )
    assert response.status_code == 200
    echoed = response.json()
    assert echoed["path"] == "/v1/files/a%3Fb%2Fc/content"
    assert echoed["query"] == "x=%2F&y=a+b&z=%3F"


def test_forbidden_headers_never_reach_the_upstream(
    shared_gateway: GatewayProcess, user: tuple[str, str], fake_upstream: FakeUpstream
) -> None:
    token, key = user
    response = httpx.post(
        f"{shared_gateway.url}/v1/messages?set_cookie=1",
        json=MESSAGE,
        headers={
            "x-api-key": token,
            "authorization": "Bearer something-else",
            "cookie": "session=abc",
            "x-forwarded-for": "10.0.0.1",
            "x-forwarded-host": "evil",
            "x-custom": "nope",
            "user-agent": "test-agent/1",
        },
        timeout=10,
    )
    assert response.status_code == 200
    assert "set-cookie" not in response.headers
    assert "connection" not in {k.lower() for k in response.headers if k.lower() == "keep-alive"}
    headers = seen_for(fake_upstream, key)[-1]["headers"]
    assert headers["x-api-key"] == key
    for name in ("authorization", "cookie", "x-forwarded-for", "x-forwarded-host", "x-custom"):
        assert name not in headers
    assert headers["user-agent"] == "test-agent/1"


def test_cookies_set_by_the_upstream_are_never_replayed(
    shared_gateway: GatewayProcess, fake_upstream: FakeUpstream
) -> None:
    token_a, _ = fresh_user(shared_gateway)
    token_b, key_b = fresh_user(shared_gateway)
    for _ in range(3):  # both workers see the cookie
        assert post(shared_gateway, token_a, "?set_cookie=1").status_code == 200
    assert post(shared_gateway, token_b).status_code == 200
    assert "cookie" not in seen_for(fake_upstream, key_b)[-1]["headers"]


def test_a_4_mb_body_is_accepted_and_above_32_mib_is_413(
    shared_gateway: GatewayProcess, user: tuple[str, str], fake_upstream: FakeUpstream
) -> None:
    token, _ = user
    big = {**MESSAGE, "messages": [{"role": "user", "content": "x" * (4 * 1024 * 1024)}]}
    assert post(shared_gateway, token, json=big).status_code == 200
    too_big = b"x" * (32 * 1024 * 1024 + 1)
    response = httpx.post(
        f"{shared_gateway.url}/v1/messages",
        content=too_big,
        headers={"x-api-key": token, "content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["type"] == "error"
    wait_all_free(shared_gateway)


@pytest.mark.parametrize(
    "path", ["/v1/../admin", "/v1/%2e%2e/admin", "/v1/messages/%2E%2E%2Fx", "/v1/a/%252e%252e/b"]
)
def test_traversal_is_refused_before_the_upstream(
    shared_gateway: GatewayProcess,
    user: tuple[str, str],
    fake_upstream: FakeUpstream,
    path: str,
) -> None:
    token, key = user
    before = fake_upstream.stats()["keys"].get(key, {}).get("total", 0)
    # httpx (like most clients) normalises dot segments, so send the request line by hand.
    status, body = raw_get(shared_gateway.port, path, {"x-api-key": token})
    assert status == 400, body
    assert b'"invalid_request_error"' in body
    assert fake_upstream.stats()["keys"].get(key, {}).get("total", 0) == before


def test_redirects_are_not_followed(
    shared_gateway: GatewayProcess, user: tuple[str, str], fake_upstream: FakeUpstream
) -> None:
    token, key = user
    before = fake_upstream.stats()["keys"][key]["total"]
    response = post(shared_gateway, token, f"?redirect={fake_upstream.url}/v1/models")
    assert response.status_code == 307
    assert fake_upstream.stats()["keys"][key]["total"] == before + 1


# -- authentication ---------------------------------------------------------------------


def test_missing_unknown_and_revoked_tokens_are_401(shared_gateway: GatewayProcess) -> None:
    def auth_error(headers: dict[str, str]) -> str:
        response = httpx.post(
            f"{shared_gateway.url}/v1/messages", json=MESSAGE, headers=headers, timeout=10
        )
        assert response.status_code == 401
        body = response.json()
        assert body["type"] == "error"
        assert body["error"]["type"] == "authentication_error"
        return str(body["error"]["message"])

    assert "Missing" in auth_error({})
    assert "Invalid" in auth_error({"x-api-key": "gwt_unknown"})
    token, _ = fresh_user(shared_gateway)
    assert post(shared_gateway, token).status_code == 200
    tokens = shared_gateway.cli("tokens", "list", "--json").stdout.splitlines()
    token_id = str(json.loads(tokens[-1])["id"])
    shared_gateway.cli("tokens", "revoke", token_id)
    for _ in range(4):  # every worker refuses it on its next request
        assert "revoked" in auth_error({"x-api-key": token})


def test_user_without_a_key_is_told_how_to_set_one(shared_gateway: GatewayProcess) -> None:
    token = shared_gateway.create_user(f"nokey{uuid.uuid4().hex[:6]}")
    response = post(shared_gateway, token)
    assert response.status_code == 401
    assert "PUT /api/v1/me/anthropic-key" in response.json()["error"]["message"]


# -- the body lifecycle: permits come back exactly once ---------------------------------


async def test_permit_released_when_client_disconnects_mid_sse(
    shared_gateway: GatewayProcess, fake_upstream: FakeUpstream
) -> None:
    token, key = fresh_user(shared_gateway, cap=2)
    async with httpx.AsyncClient(timeout=30) as client, client.stream(
        "POST",
        f"{shared_gateway.url}/v1/messages?events=50&delay=0.5",
        json={**MESSAGE, "stream": True},
        headers={"x-api-key": token},
    ) as response:
        assert response.status_code == 200
        async for _ in response.aiter_raw():
            break  # the first event arrived; now leave
        assert sum(credential_in_use(shared_gateway).values()) == 1
    left = time.monotonic()
    while fake_upstream.stats()["keys"][key]["in_flight"]:
        assert time.monotonic() - left < 1.5, "the upstream connection was not closed"
        await asyncio.sleep(0.05)
    assert fake_upstream.stats()["keys"][key]["closed_early"] == 1
    wait_all_free(shared_gateway)


def test_permit_released_after_upstream_cut_mid_stream(
    shared_gateway: GatewayProcess, user: tuple[str, str]
) -> None:
    token, _ = user
    response = post(shared_gateway, token, "?cut_after=2", json={**MESSAGE, "stream": True})
    assert response.status_code == 200
    events = response.text.split("\n\n")
    # The relayed events, then one well-formed Anthropic error event, not a truncated body.
    assert events[-2].startswith("event: error\ndata: ")
    assert '"type":"api_error"' in events[-2]
    assert "message_stop" not in response.text
    wait_all_free(shared_gateway)


def test_a_whole_body_keeps_its_length_and_a_cut_one_is_seen_as_cut(
    shared_gateway: GatewayProcess, user: tuple[str, str]
) -> None:
    token, _ = user
    whole = post(shared_gateway, token, "?body_bytes=20000")
    assert whole.status_code == 200
    assert whole.headers["content-length"] == str(len(whole.content))
    assert "transfer-encoding" not in whole.headers
    whole.json()
    # The upstream drops the connection 100 bytes into a body it declared longer: the
    # client must see an incomplete body, never a short one passed off as whole.
    with pytest.raises(httpx.RemoteProtocolError):
        post(shared_gateway, token, "?cut_after=100&body_bytes=20000")
    wait_all_free(shared_gateway)


def test_permit_released_after_upstream_error_status(
    shared_gateway: GatewayProcess, user: tuple[str, str]
) -> None:
    token, _ = user
    assert post(shared_gateway, token, "?status=529").status_code == 529
    wait_all_free(shared_gateway)


def test_sdk_messages_create_stream_and_count_tokens(
    shared_gateway: GatewayProcess, user: tuple[str, str]
) -> None:
    token, _ = user
    client = anthropic.Anthropic(base_url=shared_gateway.url, api_key=token, max_retries=0)
    message = client.messages.create(**MESSAGE)  # type: ignore[call-overload]
    assert message.content[0].type == "text"
    arrivals = []
    started = time.monotonic()
    with client.messages.stream(
        **MESSAGE,
        extra_query={"events": "4", "delay": "0.25"},  # type: ignore[arg-type]
    ) as stream:
        for text in stream.text_stream:
            arrivals.append((time.monotonic() - started, text))
    assert len(arrivals) == 4
    assert arrivals[0][0] < arrivals[-1][0] - 0.5, "text deltas must arrive as they are sent"
    count = client.messages.count_tokens(model="claude-test", messages=MESSAGE["messages"])  # type: ignore[arg-type]
    assert count.input_tokens > 0
    bad = anthropic.Anthropic(base_url=shared_gateway.url, api_key="gwt_nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(**MESSAGE)  # type: ignore[call-overload]
    wait_all_free(shared_gateway)


async def test_request_bodies_do_not_live_as_long_as_their_streams(
    start_gateway: Any, fake_upstream: FakeUpstream
) -> None:
    """An agent's request carries its whole context; a proxy that kept it for the life of
    the stream would hold streams x context. 48 open streams of 1 MiB requests: held,
    that is 48 MiB or more in the worker; dropped once sent, it is a few MiB."""
    gateway = start_gateway(workers=1)
    token, _ = gateway.user_with_key("longcontext", cap=64)
    body = {**MESSAGE, "stream": True, "messages": [{"role": "user", "content": "x" * 2**20}]}
    # A first round, so the worker's buffers and pools are warm before the baseline.
    assert post(gateway, token, json=body).status_code == 200
    (worker,) = gateway.worker_pids()
    before = rss_mib(worker)
    async with httpx.AsyncClient(timeout=30) as client, contextlib.AsyncExitStack() as stack:

        async def open_stream() -> None:
            response = await stack.enter_async_context(
                client.stream(
                    "POST",
                    f"{gateway.url}/v1/messages?events=1&stall=30",
                    json=body,
                    headers={"x-api-key": token},
                )
            )
            assert response.status_code == 200
            iterator = response.aiter_raw()
            opened.append(iterator)  # a collected iterator would close its stream
            await iterator.__anext__()

        opened: list[Any] = []
        for _ in range(48):
            await open_stream()
        grown = rss_mib(worker) - before
    assert grown < 24, f"the worker grew {grown:.0f} MiB with 48 streams open"
