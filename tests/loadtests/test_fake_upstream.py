"""The fake Anthropic upstream, driven over loopback HTTP the way the gateway's tests drive it."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import anthropic
import httpx
import msgspec
import pytest

from loadtests.fake_upstream import (
    Behaviour,
    FakeUpstream,
    FakeUpstreamError,
    behaviour_from_query,
    make_app,
    serving,
)

KEY_A = "sk-fake-a"
KEY_B = "sk-fake-b"
WORDS = ["Hello ", "from ", "the ", "fake ", "upstream. "]
STREAM_BODY = {"model": "claude-test", "max_tokens": 16, "stream": True, "messages": []}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream.start(events=5) as fake:
        yield fake


@pytest.fixture
def fake(upstream: FakeUpstream) -> FakeUpstream:
    upstream.reset()
    return upstream


@pytest.fixture
def http(fake: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, headers={"x-api-key": KEY_A}, timeout=10) as client:
        yield client


@pytest.fixture
async def ahttp(fake: FakeUpstream) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, timeout=10) as client:
        yield client


@pytest.fixture
def sdk(fake: FakeUpstream) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(api_key=KEY_A, base_url=fake.url, max_retries=0) as client:
        yield client


async def wait_until(
    fake: FakeUpstream, check: Callable[[dict[str, Any]], bool], *, within: float
) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        stats = fake.stats()
        if check(stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.05)


async def hang_up(fake: FakeUpstream, query: str, *, wait_for: bytes | None) -> None:
    """Send a streamed request on a raw socket, read up to ``wait_for``, then close it."""
    host, port = fake.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps(STREAM_BODY).encode()
    writer.write(
        f"POST /v1/messages?{query} HTTP/1.1\r\nhost: {host}\r\nx-api-key: {KEY_A}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    if wait_for is None:
        await asyncio.sleep(0.3)
    else:
        await asyncio.wait_for(reader.readuntil(wait_for), timeout=5)
    writer.close()
    await writer.wait_closed()


def test_message_is_shaped_like_anthropics(http: httpx.Client) -> None:
    response = http.post("/v1/messages", json={"model": "claude-test", "messages": []})

    assert response.status_code == 200
    assert response.headers["request-id"].startswith("req_")
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()
    assert message["id"].startswith("msg_")
    assert message["type"] == "message"
    assert message["role"] == "assistant"
    assert message["model"] == "claude-test"
    assert message["content"] == [{"type": "text", "text": "".join(WORDS)}]
    assert message["stop_reason"] == "end_turn"
    assert message["stop_sequence"] is None
    assert message["usage"]["input_tokens"] > 0
    assert message["usage"]["output_tokens"] == 5


def test_sdk_reads_a_message(fake: FakeUpstream, sdk: anthropic.Anthropic) -> None:
    message = sdk.messages.create(
        model="claude-test",
        max_tokens=16,
        messages=[{"role": "user", "content": "hi"}],
        extra_query={"events": 3},
    )

    assert message.model == "claude-test"
    assert message.content[0].type == "text"
    assert message.content[0].text == "".join(WORDS[:3])
    assert message.usage.output_tokens == 3
    # This SDK sends its key as a bearer token; the fake counts it as the upstream key.
    assert fake.stats()["keys"][KEY_A]["total"] == 1


def test_sdk_streams_text_as_it_comes(sdk: anthropic.Anthropic) -> None:
    arrivals: list[tuple[float, str]] = []
    with sdk.messages.stream(
        model="claude-test",
        max_tokens=16,
        messages=[{"role": "user", "content": "hi"}],
        extra_query={"events": 5, "delay": 0.2},
    ) as stream:
        for text in stream.text_stream:
            arrivals.append((time.monotonic(), text))
        final = stream.get_final_message()
        ended = time.monotonic()

    assert [text for _, text in arrivals] == WORDS
    # Four pauses of 0.2 s lie between the first delta and the last: the first came early.
    assert ended - arrivals[0][0] > 0.4
    assert arrivals[0][0] < arrivals[-1][0]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 5


def test_eager_sends_the_first_delta_with_message_start(sdk: anthropic.Anthropic) -> None:
    started = time.monotonic()
    arrivals: list[float] = []
    with sdk.messages.stream(
        model="claude-test",
        max_tokens=16,
        messages=[{"role": "user", "content": "hi"}],
        extra_query={"events": 2, "delay": 1.0, "eager": 1},
    ) as stream:
        for _ in stream.text_stream:
            arrivals.append(time.monotonic() - started)

    # Only the second delta waits its pause: the first is out before a pause has passed.
    assert len(arrivals) == 2
    assert arrivals[0] < 0.9 < arrivals[1]


def test_sdk_counts_tokens_and_pages_models(sdk: anthropic.Anthropic) -> None:
    counted = sdk.messages.count_tokens(
        model="claude-test", messages=[{"role": "user", "content": "hello there"}]
    )
    first_page = sdk.models.list(limit=2)
    every_model = [model.id for model in sdk.models.list(limit=2)]

    assert counted.input_tokens > 0
    assert first_page.has_more is True
    assert first_page.first_id == every_model[0]
    assert first_page.last_id == every_model[1]
    assert len(every_model) == len(set(every_model)) >= 3
    assert sdk.models.retrieve(every_model[-1]).id == every_model[-1]


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (529, "overloaded_error"),
    ],
)
def test_status_answers_with_its_error_envelope(http: httpx.Client, status: int, kind: str) -> None:
    response = http.post(f"/v1/messages?status={status}&retry_after=2", json={})

    assert response.status_code == status
    envelope = response.json()
    assert envelope["type"] == "error"
    assert envelope["error"]["type"] == kind
    assert envelope["error"]["message"]
    assert response.headers["retry-after"] == "2"
    assert response.headers["x-should-retry"] == "true"


def test_a_request_without_key_is_refused(fake: FakeUpstream) -> None:
    response = httpx.post(f"{fake.url}/v1/messages", json={})

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_an_unusable_control_parameter_is_a_400_naming_it(http: httpx.Client) -> None:
    response = http.post("/v1/messages?events=many", json={})

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "events" in response.json()["error"]["message"]


def test_stall_holds_the_stream_after_its_first_event(http: httpx.Client) -> None:
    started = time.monotonic()
    with http.stream("POST", "/v1/messages?stall=0.6", json=STREAM_BODY) as response:
        chunks = [(time.monotonic(), chunk) for chunk in response.iter_raw()]

    assert chunks[0][1].startswith(b"event: message_start\n")
    assert b"message_stop" not in chunks[0][1]
    assert chunks[-1][0] - started >= 0.5
    assert b"event: message_stop" in chunks[-1][1]


def test_stall_before_headers_delays_the_headers(http: httpx.Client) -> None:
    started = time.monotonic()
    with http.stream("POST", "/v1/messages?stall_before_headers=0.5", json={}) as response:
        headers_at = time.monotonic()
        response.read()

    assert headers_at - started >= 0.4
    assert response.json()["type"] == "message"


async def test_a_stalled_stream_trips_a_read_timeout_and_the_close_is_counted(
    fake: FakeUpstream, ahttp: httpx.AsyncClient
) -> None:
    timeout = httpx.Timeout(5, read=0.3)
    with pytest.raises(httpx.ReadTimeout):
        async with ahttp.stream(
            "POST",
            "/v1/messages?stall=30",
            json=STREAM_BODY,
            headers={"x-api-key": KEY_A},
            timeout=timeout,
        ) as response:
            async for _ in response.aiter_raw():
                pass

    stats = await wait_until(fake, lambda s: s["in_flight"] == 0, within=1.0)
    assert stats["in_flight"] == 0
    assert stats["closed_early"] == 1


def test_cut_after_drops_a_stream_without_its_end(fake: FakeUpstream, http: httpx.Client) -> None:
    received = b""
    with (
        pytest.raises(httpx.RemoteProtocolError),
        http.stream("POST", "/v1/messages?cut_after=4", json=STREAM_BODY) as response,
    ):
        for chunk in response.iter_raw():
            received += chunk

    assert response.status_code == 200
    assert received.count(b"event: ") <= 4
    assert b"message_stop" not in received
    assert fake.stats()["recent"][-1]["outcome"] == "cut"


def test_cut_after_drops_a_message_short_of_its_length(
    fake: FakeUpstream, http: httpx.Client
) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        http.post("/v1/messages?cut_after=20", json={})

    assert fake.stats()["cut"] == 1


def test_redirect_answers_307_with_location(http: httpx.Client) -> None:
    response = http.post("/v1/messages?redirect=http://127.0.0.1:9/elsewhere", json={})

    assert response.status_code == 307
    assert response.headers["location"] == "http://127.0.0.1:9/elsewhere"


def test_set_cookie_and_body_bytes(http: httpx.Client) -> None:
    response = http.post("/v1/messages?set_cookie=1&body_bytes=5000", json={})

    assert "fake_upstream_session=" in response.headers["set-cookie"]
    assert 4900 <= len(response.content) <= 5100
    assert response.json()["type"] == "message"


def test_other_paths_echo_what_arrived(fake: FakeUpstream, http: httpx.Client) -> None:
    response = http.request(
        "PUT",
        "/v1/some/where?b=2&a=%2F&a=1",
        content=b"0123456789",
        headers={"anthropic-beta": "x-1", "X-Custom": "Yes"},
    )

    echoed = response.json()
    assert echoed["method"] == "PUT"
    assert echoed["path"] == "/v1/some/where"
    assert echoed["query"] == "b=2&a=%2F&a=1"
    assert echoed["headers"]["anthropic-beta"] == "x-1"
    assert echoed["headers"]["x-custom"] == "Yes"
    assert echoed["headers"]["x-api-key"] == KEY_A
    assert echoed["body_length"] == 10
    seen = fake.stats()["recent"][-1]
    assert (seen["path"], seen["query"], seen["key"]) == ("/v1/some/where", echoed["query"], KEY_A)
    assert seen["headers"]["x-custom"] == "Yes"


async def test_in_flight_counts_per_key_while_streams_are_held(
    fake: FakeUpstream, ahttp: httpx.AsyncClient
) -> None:
    async with AsyncExitStack() as streams:
        responses = [
            await streams.enter_async_context(
                ahttp.stream(
                    "POST",
                    "/v1/messages?events=2&delay=0.5",
                    json=STREAM_BODY,
                    headers={"x-api-key": key},
                )
            )
            for key in (KEY_A, KEY_A, KEY_A, KEY_B, KEY_B)
        ]
        held = fake.stats()
        await asyncio.gather(*(response.aread() for response in responses))

    assert held["in_flight"] == 5
    assert held["keys"][KEY_A]["in_flight"] == 3
    assert held["keys"][KEY_B]["in_flight"] == 2
    done = await wait_until(fake, lambda s: s["in_flight"] == 0, within=1.0)
    assert done["in_flight"] == 0
    assert done["max_in_flight"] == 5
    assert done["keys"][KEY_A] == {
        "in_flight": 0,
        "max_in_flight": 3,
        "total": 3,
        "closed_early": 0,
    }
    assert done["keys"][KEY_B] == {
        "in_flight": 0,
        "max_in_flight": 2,
        "total": 2,
        "closed_early": 0,
    }
    assert all(
        response.text.endswith('event: message_stop\ndata: {"type":"message_stop"}\n\n')
        for response in responses
    )


@pytest.mark.parametrize(
    ("query", "wait_for"),
    [("events=3&delay=30", b"event: ping"), ("first_delay=30", None)],
    ids=["mid-stream", "before-headers"],
)
async def test_a_client_that_hangs_up_is_counted_within_a_second(
    fake: FakeUpstream, query: str, wait_for: bytes | None
) -> None:
    await hang_up(fake, query, wait_for=wait_for)

    stats = await wait_until(fake, lambda s: s["in_flight"] == 0, within=1.0)
    assert stats["in_flight"] == 0
    assert stats["closed_early"] == 1
    assert stats["keys"][KEY_A]["closed_early"] == 1
    assert stats["recent"][-1]["outcome"] == "closed_early"


async def test_reset_zeroes_totals_and_keeps_what_is_in_flight(
    fake: FakeUpstream, ahttp: httpx.AsyncClient
) -> None:
    await ahttp.get("/v1/models", headers={"x-api-key": KEY_B})
    async with ahttp.stream(
        "POST", "/v1/messages?delay=30", json=STREAM_BODY, headers={"x-api-key": KEY_A}
    ):
        fake.reset()
        after_reset = fake.stats()

    assert after_reset["total"] == 0
    assert after_reset["in_flight"] == after_reset["max_in_flight"] == 1
    assert after_reset["recent"] == []
    assert list(after_reset["keys"]) == [KEY_A]
    assert after_reset["keys"][KEY_A]["total"] == 0
    stats = await wait_until(fake, lambda s: s["in_flight"] == 0, within=1.0)
    assert stats["keys"][KEY_A]["in_flight"] == 0


def test_control_parameters_lie_over_the_defaults() -> None:
    defaults = Behaviour(events=7, delay=0.5)

    assert behaviour_from_query({"beta": "true"}, defaults) is defaults
    assert behaviour_from_query({"events": "2", "set_cookie": "1"}, defaults) == Behaviour(
        events=2, delay=0.5, set_cookie=True
    )
    with pytest.raises(msgspec.ValidationError, match="status"):
        behaviour_from_query({"status": "200"}, defaults)


async def test_the_app_serves_in_process() -> None:
    async with serving(make_app(events=2)) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/v1/messages", json={}, headers={"x-api-key": KEY_A})

    assert response.json()["content"][0]["text"] == "".join(WORDS[:2])


def test_start_fails_clearly_and_stop_ends_the_process() -> None:
    with pytest.raises(FakeUpstreamError, match="exited with code 2"):
        FakeUpstream.start(events=-1)

    with FakeUpstream.start(delay=0.01) as fake:
        assert httpx.get(f"{fake.url}/_fake/health").status_code == 200
    with pytest.raises(ProcessLookupError):
        os.kill(fake.pid, 0)
