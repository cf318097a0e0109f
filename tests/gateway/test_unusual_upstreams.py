"""The proxy path under unusual and hostile input, end to end: a real `gateway serve` (two
workers) in front of an upstream that writes exactly the bytes each case scripts.

SSE in every line ending the grammar allows, compressed streams, bodies that fail before
their first byte, header values and paths as clients really send them, and uploads that
are slow, abandoned or too large, with the permits checked after each.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from ipc.ledger import read_ledger
from ipc.namespace import usage
from ipc.naming import list_ledgers
from tests.fixtures.gateway import GatewayProcess, module_gateway
from tests.fixtures.scripted_upstream import Exchange, Gate, ScriptedUpstream, scripted_upstream

BODY_TIMEOUT = 2
READ_TIMEOUT = 3
LAST_CHUNK = b"0\r\n\r\n"


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with scripted_upstream() as scripted:
        yield scripted


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, upstream: ScriptedUpstream
) -> Iterator[GatewayProcess]:
    with module_gateway(
        tmp_path_factory.mktemp("unusual"),
        upstream.url,
        GATEWAY_REQUEST_BODY_TIMEOUT=str(BODY_TIMEOUT),
        GATEWAY_UPSTREAM_READ_TIMEOUT=str(READ_TIMEOUT),
    ) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def token(gateway: GatewayProcess) -> str:
    token, _ = gateway.user_with_key(f"u{uuid.uuid4().hex[:6]}")
    return token


def unique() -> str:
    return uuid.uuid4().hex[:10]


def sse_head(*extra: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        + b"".join(line + b"\r\n" for line in extra)
        + b"transfer-encoding: chunked\r\n\r\n"
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def held_in_ledgers(gateway: GatewayProcess) -> int:
    """Permits the workers' own ledgers say they hold."""
    snapshots = (read_ledger(name) for name in list_ledgers(gateway.namespace))
    return sum(h.count for s in snapshots if s is not None for h in s.holdings)


def wait_all_free(gateway: GatewayProcess, timeout: float = 5.0) -> None:
    """Every permit back: on the semaphores and in the workers' ledgers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = usage(gateway.namespace)
        if all(row.in_use == 0 for row in rows) and held_in_ledgers(gateway) == 0:
            assert all(row.free == row.cap for row in rows)
            return
        time.sleep(0.05)
    raise AssertionError(
        f"permits still held: {usage(gateway.namespace)}, {held_in_ledgers(gateway)} in ledgers"
    )


def wait_in_use(gateway: GatewayProcess, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = sum(r.in_use for r in usage(gateway.namespace) if r.scope == "credential")
        if held == count:
            return
        time.sleep(0.02)
    raise AssertionError(f"expected {count} permits in use: {usage(gateway.namespace)}")


def anthropic_error(status: int, body: bytes, kind: str) -> str:
    parsed = json.loads(body)
    assert parsed["type"] == "error", (status, body)
    assert parsed["error"]["type"] == kind, (status, body)
    return str(parsed["error"]["message"])


@asynccontextmanager
async def stream(gateway: GatewayProcess, token: str, name: str) -> AsyncIterator[Any]:
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream(
            "POST",
            f"{gateway.url}/v1/script/{name}",
            content=b'{"stream": true}',
            headers={"x-api-key": token, "content-type": "application/json"},
        ) as response,
    ):
        yield response


async def read_at_least(chunks: AsyncIterator[bytes], size: int, timeout: float = 5.0) -> bytes:
    """What the gateway has relayed, once it is ``size`` bytes or more; a relay that holds
    them back fails here."""
    received = b""
    while len(received) < size:
        try:
            received += await asyncio.wait_for(chunks.__anext__(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"only {len(received)} of {size} bytes were relayed; the rest was held back"
            ) from None
    return received


def raw_request(gateway: GatewayProcess, request: bytes, *, timeout: float = 15.0) -> bytes:
    """One request on a socket of its own, written as is; everything until the server
    closes (every request here says ``connection: close``)."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while received := sock.recv(65536):
            data += received
    return data


def head_and_body(response: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = dict(line.split(b": ", 1) for line in lines[1:])
    if fields.get(b"transfer-encoding") == b"chunked":
        body = _dechunked(body)
    return int(lines[0].split()[1]), fields, body


def _dechunked(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        if not int(size, 16):
            break
        out += body[: int(size, 16)]
        body = body[int(size, 16) + 2 :]
    return out


# -- SSE: every blank line the grammar allows ---------------------------------------------

BLANK_LINES = [
    pytest.param(b"\n", b"\n", id="lf"),
    pytest.param(b"\r\n", b"\r\n", id="crlf"),
    pytest.param(b"\r", b"\r", id="cr"),
    pytest.param(b"\n", b"\r\n", id="lf-then-crlf"),
    pytest.param(b"\r\n", b"\n", id="crlf-then-lf"),
    pytest.param(b"\r", b"\r\n", id="cr-then-crlf"),
]


def event(name: str, eol: bytes, blank: bytes) -> bytes:
    data = b'data: {"type":"' + name.encode() + b'"}'
    return b"event: " + name.encode() + eol + data + eol + blank


@pytest.mark.parametrize(("eol", "blank"), BLANK_LINES)
async def test_each_event_goes_out_when_its_blank_line_arrives(
    gateway: GatewayProcess, upstream: ScriptedUpstream, token: str, eol: bytes, blank: bytes
) -> None:
    """Cut only at ``\\n\\n``, a stream in CRLF or CR events was held to its end."""
    name, gate = unique(), Gate()
    first, second = event("message_start", eol, blank), event("message_stop", eol, blank)

    @upstream.script(name)
    async def _(exchange: Exchange) -> None:
        await exchange.send(sse_head() + chunk(first[:-1]))
        await asyncio.sleep(0.05)  # the blank line arrives in two reads
        await exchange.send(chunk(first[-1:]))
        await gate.passed()
        await exchange.send(chunk(second) + LAST_CHUNK)

    async with stream(gateway, token, name) as response:
        assert response.status_code == 200
        chunks = response.aiter_raw()
        relayed = await read_at_least(chunks, len(first))
        assert relayed == first
        gate.open()
        async for more in chunks:
            relayed += more
    assert relayed == first + second
    wait_all_free(gateway)


FAILURES = [
    *(pytest.param(*p.values, "cut", id=f"{p.id}-cut") for p in BLANK_LINES),
    # A stall waits out the read timeout: the two line endings \n\n missed are enough.
    pytest.param(b"\r\n", b"\r\n", "stall", id="crlf-stall"),
    pytest.param(b"\r", b"\r", "stall", id="cr-stall"),
]


@pytest.mark.parametrize(("eol", "blank", "failure"), FAILURES)
async def test_events_before_a_failure_are_kept_and_end_with_an_error_event(
    gateway: GatewayProcess,
    upstream: ScriptedUpstream,
    token: str,
    eol: bytes,
    blank: bytes,
    failure: str,
) -> None:
    """A cut or a stall mid-stream used to drop every CRLF event already received."""
    name = unique()
    whole = event("message_start", eol, blank) + event("content_block_start", eol, blank)
    partial = b"event: content_block_delta" + eol + b"data: {"

    @upstream.script(name)
    async def _(exchange: Exchange) -> None:
        await exchange.send(sse_head() + chunk(whole) + chunk(partial))
        if failure == "cut":
            exchange.cut()
        else:
            await exchange.wait_closed_by_client()  # the gateway's read timeout ends it

    async with stream(gateway, token, name) as response:
        relayed = await response.aread()
    assert relayed.startswith(whole)
    error = relayed[len(whole) :]
    assert error.startswith(b"event: error\ndata: ") and error.endswith(b"\n\n"), relayed
    assert anthropic_error(200, error[len(b"event: error\ndata: ") : -2], "api_error")
    wait_all_free(gateway)


async def test_an_event_that_never_ends_is_relayed_past_the_bound(
    gateway: GatewayProcess, upstream: ScriptedUpstream, token: str
) -> None:
    """Without a bound, 16 MB without a blank line grew the worker by as much."""
    name, gate = unique(), Gate()
    endless = bytes(range(32, 127)) * (3 * 2**20 // 95)  # 3 MiB, no line ending at all

    @upstream.script(name)
    async def _(exchange: Exchange) -> None:
        await exchange.send(sse_head())
        for start in range(0, len(endless), 65536):
            await exchange.send(chunk(endless[start : start + 65536]))
        await gate.passed()
        await exchange.send(chunk(b"\n\n") + LAST_CHUNK)

    async with stream(gateway, token, name) as response:
        chunks = response.aiter_raw()
        relayed = await read_at_least(chunks, 2 * 2**20)  # before the stream ends
        gate.open()
        async for more in chunks:
            relayed += more
    assert relayed == endless + b"\n\n"
    wait_all_free(gateway)


# -- compressed streams --------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["whole", "cut"])
async def test_a_compressed_stream_goes_out_untouched_as_it_comes(
    gateway: GatewayProcess, upstream: ScriptedUpstream, token: str, ending: str
) -> None:
    """No event boundary can be seen in gzip: the bytes were held to the end, and a cut
    appended a plain-text error event inside the compressed body."""
    name, gate = unique(), Gate()
    compressor = zlib.compressobj(wbits=31)  # gzip framing
    first = compressor.compress(event("message_start", b"\n", b"\n"))
    first += compressor.flush(zlib.Z_SYNC_FLUSH)
    rest = compressor.compress(event("message_stop", b"\n", b"\n")) + compressor.flush()

    @upstream.script(name)
    async def _(exchange: Exchange) -> None:
        await exchange.send(sse_head(b"content-encoding: gzip") + chunk(first))
        await gate.passed()
        if ending == "cut":
            exchange.cut()
        else:
            await exchange.send(chunk(rest) + LAST_CHUNK)

    async with stream(gateway, token, name) as response:
        assert response.headers["content-encoding"] == "gzip"
        chunks = response.aiter_raw()
        relayed = await read_at_least(chunks, len(first))
        gate.open()
        if ending == "cut":
            # Ended short, never with a clean end: the client knows the body is cut.
            with pytest.raises(httpx.RemoteProtocolError):
                async for more in chunks:
                    relayed += more
        else:
            async for more in chunks:
                relayed += more
    if ending == "cut":
        assert relayed == first
    else:
        assert relayed == first + rest
        assert gzip.decompress(relayed) == (
            event("message_start", b"\n", b"\n") + event("message_stop", b"\n", b"\n")
        )
    wait_all_free(gateway)


# -- a body that fails before its first byte -----------------------------------------------

BEFORE_THE_FIRST_BYTE = [
    pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n", id="length-then-close"),
    pytest.param(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk-size"
    ),
    pytest.param(sse_head() + chunk(b"event: message_start\ndata: {"), id="sse-no-whole-event"),
]


@pytest.mark.parametrize("response", BEFORE_THE_FIRST_BYTE)
def test_a_body_that_fails_before_a_byte_reached_the_client_is_an_anthropic_502(
    gateway: GatewayProcess, upstream: ScriptedUpstream, token: str, response: bytes
) -> None:
    """It was the server's own plain-text 500."""
    name = unique()

    @upstream.script(name)
    async def _(exchange: Exchange) -> None:
        await exchange.send(response)
        exchange.cut()

    answer = httpx.post(
        f"{gateway.url}/v1/script/{name}",
        json={"stream": True},
        headers={"x-api-key": token},
        timeout=30,
    )
    assert answer.status_code == 502, answer.text
    message = anthropic_error(502, answer.content, "api_error")
    assert "broke off before its body" in message
    wait_all_free(gateway)


# -- what clients send: header bytes and paths -----------------------------------------------


def forwarded_head(
    gateway: GatewayProcess, upstream: ScriptedUpstream, token: str, path: bytes, *lines: bytes
) -> bytes:
    name = unique()

    @upstream.script(name)
    async def _(exchange: Exchange) -> None:
        await exchange.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

    request = (
        b"GET /v1/script/" + name.encode() + path + b" HTTP/1.1\r\nhost: gateway\r\n"
        b"connection: close\r\nx-api-key: " + token.encode() + b"\r\n"
        + b"".join(line + b"\r\n" for line in lines)
        + b"\r\n"
    )
    status, _, body = head_and_body(raw_request(gateway, request))
    assert (status, body) == (200, b"{}"), body
    (head,) = upstream.heads(name)
    return head


NON_ASCII_VALUES = [
    b"user-agent: \xe2\x9c\x93 client",  # UTF-8
    b"anthropic-beta: caf\xc3\xa9",  # UTF-8
    b"anthropic-version: 2023-06-01 \xe9t\xe9",  # Latin-1: not UTF-8 at all
]


def test_header_values_outside_ascii_go_upstream_byte_for_byte(
    gateway: GatewayProcess, upstream: ScriptedUpstream, token: str
) -> None:
    """They were a 500 with a traceback (httpx could not encode them)."""
    head = forwarded_head(gateway, upstream, token, b"", *NON_ASCII_VALUES)
    for line in NON_ASCII_VALUES:
        assert b"\r\n" + line + b"\r\n" in head, head


VERBATIM_PATHS = [b"/./x", b"//a//b", b"/%2e/x", b"/a/./b/?q=./%2F&r=%2e", b"/x/."]


def test_paths_go_upstream_exactly_as_sent(
    gateway: GatewayProcess, upstream: ScriptedUpstream, token: str
) -> None:
    """httpx.URL normalised ``/v1/./x`` to ``/v1/x``; the README says verbatim."""
    for path in VERBATIM_PATHS:
        head = forwarded_head(gateway, upstream, token, path)
        assert head.split(b"\r\n")[0].endswith(path + b" HTTP/1.1"), head


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_the_other_transports_keep_paths_and_header_bytes_too(
    start_gateway: Callable[..., GatewayProcess], upstream: ScriptedUpstream, transport: str
) -> None:
    gateway = start_gateway(
        workers=1, GATEWAY_UPSTREAM_TRANSPORT=transport, GATEWAY_UPSTREAM_URL=upstream.url
    )
    token, _ = gateway.user_with_key(f"t{unique()}")
    for path in VERBATIM_PATHS:
        head = forwarded_head(gateway, upstream, token, path)
        assert head.split(b"\r\n")[0].endswith(path + b" HTTP/1.1"), head
    head = forwarded_head(gateway, upstream, token, b"", *NON_ASCII_VALUES)
    for line in NON_ASCII_VALUES[:2]:
        assert b"\r\n" + line + b"\r\n" in head, head
    latin = b"anthropic-version: 2023-06-01 \xe9t\xe9"
    # aiohttp writes header values as text in UTF-8 (the README says so); httpx's own
    # transport sends the bytes.
    sent = latin if transport == "httpx" else "2023-06-01 \u00e9t\u00e9".encode()
    assert b"\r\nanthropic-version: " + sent.removeprefix(b"anthropic-version: ") in head


def test_a_path_outside_ascii_is_400_naming_the_rule(
    gateway: GatewayProcess, upstream: ScriptedUpstream, token: str
) -> None:
    request = (
        b"GET /v1/script/x/caf\xc3\xa9 HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n"
        b"x-api-key: " + token.encode() + b"\r\n\r\n"
    )
    status, _, body = head_and_body(raw_request(gateway, request))
    assert status == 400
    assert "percent-encode" in anthropic_error(status, body, "invalid_request_error")


# -- uploads: admitted before they are read, within a deadline -------------------------------


def upload_head(name: str, token: str, *, length: int | None) -> bytes:
    framing = b"transfer-encoding: chunked" if length is None else b"content-length: %d" % length
    return (
        b"POST /v1/script/" + name.encode() + b" HTTP/1.1\r\nhost: gateway\r\n"
        b"x-api-key: " + token.encode() + b"\r\ncontent-type: application/json\r\n"
        + framing + b"\r\n\r\n"
    )


def answers_ok(upstream: ScriptedUpstream) -> str:
    name = unique()

    @upstream.script(name)
    async def _(exchange: Exchange) -> None:
        await exchange.send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

    return name


def test_an_upload_in_progress_holds_its_permit_and_a_slow_one_is_408(
    gateway: GatewayProcess, upstream: ScriptedUpstream
) -> None:
    """Read before admission and without a deadline, uploads held no permit: a cap-1 user
    kept four 8 MiB uploads open for 35 s and more."""
    token, _ = gateway.user_with_key(f"up{unique()}", cap=1)
    name = answers_ok(upstream)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as slow:
        slow.sendall(upload_head(name, token, length=1000) + b'{"messages": [')
        wait_in_use(gateway, 1)  # the upload holds the credential's one permit
        second = httpx.post(
            f"{gateway.url}/v1/script/{name}", json={}, headers={"x-api-key": token}, timeout=10
        )
        assert second.status_code == 429
        assert second.json()["error"]["type"] == "overloaded_error"
        started = time.monotonic()
        answer = b""
        while data := slow.recv(65536):  # the deadline answers, then the server closes
            answer += data
        waited = time.monotonic() - started
    status, fields, body = head_and_body(answer)
    assert status == 408
    assert fields[b"connection"] == b"close"
    message = anthropic_error(status, body, "invalid_request_error")
    assert f"within {BODY_TIMEOUT} s" in message
    assert waited < BODY_TIMEOUT + 10
    wait_all_free(gateway)
    assert upstream.heads(name) == []  # nothing of it went upstream


def test_a_client_gone_mid_upload_gives_the_permit_back(
    gateway: GatewayProcess, upstream: ScriptedUpstream
) -> None:
    token, _ = gateway.user_with_key(f"up{unique()}", cap=1)
    name = answers_ok(upstream)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as leaving:
        leaving.sendall(upload_head(name, token, length=10**6) + b"x" * 1000)
        wait_in_use(gateway, 1)
    wait_all_free(gateway)
    assert httpx.post(
        f"{gateway.url}/v1/script/{name}", json={}, headers={"x-api-key": token}, timeout=10
    ).status_code == 200


def test_an_upload_found_too_large_while_read_is_413_and_gives_the_permit_back(
    gateway: GatewayProcess, upstream: ScriptedUpstream
) -> None:
    token, _ = gateway.user_with_key(f"up{unique()}", cap=1)
    name = answers_ok(upstream)

    def body() -> Iterator[bytes]:  # no content-length: the size shows only while read
        for _ in range(33):
            yield b"x" * 2**20

    response = httpx.post(
        f"{gateway.url}/v1/script/{name}",
        content=body(),
        headers={"x-api-key": token, "content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"
    wait_all_free(gateway)
    assert upstream.heads(name) == []
