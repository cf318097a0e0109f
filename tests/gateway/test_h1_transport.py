"""The lean HTTP/1.1 transport against scripted servers on loopback, on asyncio and uvloop.

Each server is a plain ``asyncio.start_server`` whose handler writes the exact bytes a
case needs (a truncated body, an interim response, a connection closed mid-request), so
every branch of the transport meets a real socket.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import httpx
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from gateway.h1_transport import H1Transport, _Connection, body_ends_with_connection

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


Run = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    """Each case on both loops: the workers run on uvloop, whose transports are not
    asyncio's classes."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        yield runner.run


@dataclass
class Server:
    url: str
    connections: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def serve(handler: Handler, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server(url="")

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        try:
            await handler(reader, writer, server)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        yield server
    finally:
        listener.close()


async def read_request(reader: asyncio.StreamReader, server: Server) -> tuple[bytes, bytes] | None:
    """One request (head, body) as the client sent it, or None at the end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length)
    server.requests.append((head, body))
    return head, body


async def wait_closed_by_client(reader: asyncio.StreamReader, server: Server) -> None:
    while await reader.read(65536):
        pass
    server.closed_by_client.set()


async def answers_nothing(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
) -> None:
    """Reads the request, then only waits for the client to hang up."""
    await read_request(reader, s)
    await wait_closed_by_client(reader, s)


async def sends_one_event_then_waits(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
) -> None:
    """Headers and one chunk of an SSE stream, no end; then waits for the client."""
    await read_request(reader, s)
    writer.write(chunked(b"event: first\n\n")[:-5])
    await wait_closed_by_client(reader, s)


def ok(body: bytes, *extra: bytes) -> bytes:
    headers = b"".join(h + b"\r\n" for h in extra)
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), headers, body)


def chunked(*parts: bytes) -> bytes:
    out = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    for part in parts:
        out += b"%x\r\n%s\r\n" % (len(part), part)
    return out + b"0\r\n\r\n"


def request(
    method: str, url: str, *, read: float = 5.0, body: bytes = b"", **headers: str
) -> httpx.Request:
    timeout = httpx.Timeout(5.0, read=read).as_dict()
    return httpx.Request(
        method, url, headers=headers, content=body, extensions={"timeout": timeout}
    )


async def fetch(transport: H1Transport, req: httpx.Request) -> tuple[httpx.Response, bytes]:
    response = await transport.handle_async_request(req)
    try:
        body = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
    finally:
        await response.aclose()
    return response, body


def test_keep_alive_reuses_one_connection_and_everything_goes_verbatim(run: Run) -> None:
    run(_keep_alive_reuses_one_connection_and_everything_goes_verbatim())


async def _keep_alive_reuses_one_connection_and_everything_goes_verbatim() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        while await read_request(reader, s) is not None:
            if len(s.requests) % 2:
                writer.write(ok(b"length-delimited", b"x-upstream: one"))
            else:
                writer.write(chunked(b"event: a\n\n", b"event: b\n\n"))

    transport = H1Transport()
    async with serve(handler) as server:
        first, body1 = await fetch(
            transport,
            request(
                "POST", f"{server.url}/v1/x%2Fy?q=%2F&b=1", body=b'{"a":1}', **{"x-api-key": "k"}
            ),
        )
        second, body2 = await fetch(transport, request("GET", f"{server.url}/v1/models"))
        _, body3 = await fetch(transport, request("GET", f"{server.url}/v1/models"))
    await transport.aclose()

    assert server.connections == 1
    assert (body1, body2, body3) == (
        b"length-delimited",
        b"event: a\n\nevent: b\n\n",
        b"length-delimited",
    )
    assert first.headers["x-upstream"] == "one"
    assert second.headers["content-type"] == "text/event-stream"
    head, sent = server.requests[0]
    assert head.startswith(b"POST /v1/x%2Fy?q=%2F&b=1 HTTP/1.1\r\n")
    assert b"\r\nx-api-key: k\r\n" in head and b"\r\nHost: 127.0.0.1:" in head
    assert sent == b'{"a":1}'


def test_a_body_ended_by_closing_the_connection_is_whole_and_not_reused(run: Run) -> None:
    run(_a_body_ended_by_closing_the_connection_is_whole_and_not_reused())


async def _a_body_ended_by_closing_the_connection_is_whole_and_not_reused() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await read_request(reader, s)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        await writer.drain()

    transport = H1Transport()
    async with serve(handler) as server:
        _, body = await fetch(transport, request("GET", server.url))
        _, again = await fetch(transport, request("GET", server.url))
    await transport.aclose()
    assert body == again == b"until the end"
    assert server.connections == 2


def test_a_half_read_stream_closes_its_connection(run: Run) -> None:
    run(_a_half_read_stream_closes_its_connection())


async def _a_half_read_stream_closes_its_connection() -> None:
    """A client that leaves mid-stream: the upstream must see the connection end at once."""
    transport = H1Transport()
    async with serve(sends_one_event_then_waits) as server:
        response = await transport.handle_async_request(request("POST", server.url))
        async for chunk in response.stream:  # type: ignore[union-attr]
            assert chunk == b"event: first\n\n"
            break
        await response.aclose()
        await asyncio.wait_for(server.closed_by_client.wait(), 5)
    assert transport.idle_connections() == 0
    await transport.aclose()


def test_read_timeouts_before_the_headers_and_between_chunks(run: Run) -> None:
    run(_read_timeouts_before_the_headers_and_between_chunks())


async def _read_timeouts_before_the_headers_and_between_chunks() -> None:
    transport = H1Transport()
    async with serve(answers_nothing) as server:
        with pytest.raises(httpx.ReadTimeout):
            await transport.handle_async_request(request("POST", server.url, read=0.2))
        await asyncio.wait_for(server.closed_by_client.wait(), 5)
    async with serve(sends_one_event_then_waits) as server:
        response = await transport.handle_async_request(request("POST", server.url, read=0.2))
        chunks = []
        with pytest.raises(httpx.ReadTimeout):
            async for chunk in response.stream:  # type: ignore[union-attr]
                chunks.append(chunk)
        await response.aclose()
        assert chunks == [b"event: first\n\n"]
        await asyncio.wait_for(server.closed_by_client.wait(), 5)
    await transport.aclose()


def test_a_refused_connection_is_a_connect_error(run: Run) -> None:
    run(_a_refused_connection_is_a_connect_error())


async def _a_refused_connection_is_a_connect_error() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    transport = H1Transport()
    with pytest.raises(httpx.ConnectError):
        await transport.handle_async_request(request("GET", f"http://127.0.0.1:{port}/"))
    await transport.aclose()


def test_an_idle_connection_the_upstream_closed_is_not_used(run: Run) -> None:
    run(_an_idle_connection_the_upstream_closed_is_not_used())


async def _an_idle_connection_the_upstream_closed_is_not_used() -> None:
    async def answers_once(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await read_request(reader, s)
        writer.write(ok(b"once"))
        await writer.drain()  # then the handler returns and the server closes

    transport = H1Transport()
    async with serve(answers_once) as server:
        await fetch(transport, request("GET", server.url))
        for _ in range(100):  # until the close has reached the client
            if transport.idle_connections() == 0:
                break
            await asyncio.sleep(0.01)
        _, body = await fetch(transport, request("POST", server.url, body=b"x"))
    await transport.aclose()
    assert body == b"once" and server.connections == 2


def test_an_idle_connection_that_speaks_unasked_is_dropped(run: Run) -> None:
    run(_an_idle_connection_that_speaks_unasked_is_dropped())


async def _an_idle_connection_that_speaks_unasked_is_dropped() -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server) -> None:
        await read_request(reader, s)
        writer.write(ok(b"asked"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(ok(b"never asked"))  # must not become the answer to the next request
        await wait_closed_by_client(reader, s)

    transport = H1Transport()
    async with serve(chatty) as server:
        await fetch(transport, request("GET", server.url))
        await asyncio.wait_for(server.closed_by_client.wait(), 5)
        _, body = await fetch(transport, request("GET", server.url))
    await transport.aclose()
    assert body == b"asked" and server.connections == 2


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("POST", False)])
def test_a_request_lost_on_a_reused_connection_is_retried_only_if_idempotent(
    run: Run, method: str, retried: bool
) -> None:
    run(_a_request_lost_on_a_reused_connection_is_retried_only_if_idempotent(method, retried))


async def _a_request_lost_on_a_reused_connection_is_retried_only_if_idempotent(
    method: str, retried: bool
) -> None:
    """The upstream closes a kept-alive connection just as the next request arrives."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await read_request(reader, s)
        if s.connections == 1:
            writer.write(ok(b"first"))
            await writer.drain()
            await read_request(reader, s)  # read, then hang up without a word
        else:
            writer.write(ok(b"second try"))
            await writer.drain()

    transport = H1Transport()
    async with serve(handler) as server:
        await fetch(transport, request(method, server.url))
        if retried:
            _, body = await fetch(transport, request(method, server.url))
            assert body == b"second try"
            assert server.connections == 2
        else:
            with pytest.raises(httpx.RemoteProtocolError):
                await fetch(transport, request(method, server.url, body=b"bill me once"))
            assert server.connections == 1  # never sent twice
            assert [body for _, body in server.requests].count(b"bill me once") == 1
    await transport.aclose()


def test_head_ends_at_the_headers_and_interim_responses_are_skipped(run: Run) -> None:
    run(_head_ends_at_the_headers_and_interim_responses_are_skipped())


async def _head_ends_at_the_headers_and_interim_responses_are_skipped() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        head, _ = await read_request(reader, s) or (b"", b"")
        if head.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a>; rel=preload\r\n\r\n" + ok(b"ok"))
        await wait_closed_by_client(reader, s)

    transport = H1Transport()
    async with serve(handler) as server:
        head, body = await fetch(transport, request("HEAD", server.url, read=2))
        assert (head.status_code, head.headers["content-length"], body) == (200, "100", b"")
        final, body = await fetch(transport, request("GET", server.url, read=2))
        assert (final.status_code, body) == (200, b"ok")
        assert "link" not in final.headers
    await transport.aclose()


def test_truncated_and_malformed_responses_are_protocol_errors(run: Run) -> None:
    run(_truncated_and_malformed_responses_are_protocol_errors())


async def _truncated_and_malformed_responses_are_protocol_errors() -> None:
    async def truncated(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await read_request(reader, s)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await writer.drain()

    async def garbage(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await read_request(reader, s)
        writer.write(b"THIS IS NOT HTTP\r\n\r\n")
        await wait_closed_by_client(reader, s)

    transport = H1Transport()
    async with serve(truncated) as server:
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(transport, request("GET", server.url))
    async with serve(garbage) as server:
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(transport, request("GET", server.url))
    assert transport.idle_connections() == 0
    await transport.aclose()


def test_a_slow_reader_holds_the_upstream_back_instead_of_buffering(run: Run) -> None:
    run(_a_slow_reader_holds_the_upstream_back_instead_of_buffering())


async def _a_slow_reader_holds_the_upstream_back_instead_of_buffering() -> None:
    """64 MiB the client is not reading yet must wait in the upstream, not in the worker."""
    total = 64 << 20
    block = b"x" * (1 << 20)
    written = 0

    async def firehose(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        nonlocal written
        await read_request(reader, s)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        while written < total:
            writer.write(block)
            await writer.drain()
            written += len(block)

    transport = H1Transport()
    async with serve(firehose) as server:
        response = await transport.handle_async_request(request("GET", server.url))
        await asyncio.sleep(1.0)
        assert written < total // 4  # held back by the paused socket, not swallowed
        received = 0
        async for chunk in response.stream:  # type: ignore[union-attr]
            received += len(chunk)
        await response.aclose()
    await transport.aclose()
    assert received == total


def test_a_large_request_body_goes_whole(run: Run) -> None:
    run(_a_large_request_body_goes_whole())


async def _a_large_request_body_goes_whole() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        _, body = await read_request(reader, s) or (b"", b"")
        writer.write(ok(str(len(body)).encode()))
        await writer.drain()

    transport = H1Transport()
    async with serve(handler) as server:
        _, body = await fetch(transport, request("POST", server.url, body=b"y" * (24 << 20)))
    await transport.aclose()
    assert body == str(24 << 20).encode()
    assert server.requests[0][1] == b"y" * (24 << 20)


def test_a_header_that_would_split_the_request_is_refused_before_connecting(run: Run) -> None:
    run(_a_header_that_would_split_the_request_is_refused_before_connecting())


async def _a_header_that_would_split_the_request_is_refused_before_connecting() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await read_request(reader, s)

    transport = H1Transport()
    async with serve(handler) as server:
        for name, value in (
            ("x-api-key", "sk-ant-test-a\r\nx-evil: 1"),
            ("x-api-key", "sk-ant-test-a\nx-evil: 1"),
            ("x-api-key", "sk-ant-test-a\0"),
            ("x api key", "sk-ant-test-a"),
        ):
            bad = request("GET", server.url)
            bad.headers[name] = value
            with pytest.raises(httpx.LocalProtocolError):
                await transport.handle_async_request(bad)
        with pytest.raises(httpx.LocalProtocolError):
            await transport.handle_async_request(request("GET\r\nx-evil: 1", server.url))
    await transport.aclose()
    assert server.connections == 0


def test_cancelling_before_the_response_closes_the_connection(run: Run) -> None:
    run(_cancelling_before_the_response_closes_the_connection())


async def _cancelling_before_the_response_closes_the_connection() -> None:
    transport = H1Transport()
    async with serve(answers_nothing) as server:
        task = asyncio.create_task(transport.handle_async_request(request("POST", server.url)))
        while not server.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed_by_client.wait(), 5)
    assert transport.idle_connections() == 0
    await transport.aclose()


def test_idle_connections_expire_and_close_closes_the_rest(run: Run) -> None:
    run(_idle_connections_expire_and_close_closes_the_rest())


async def _idle_connections_expire_and_close_closes_the_rest() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        while await read_request(reader, s) is not None:
            writer.write(ok(b"ok"))
        s.closed_by_client.set()

    transport = H1Transport(keepalive_expiry=0.2)
    async with serve(handler) as server:
        await fetch(transport, request("GET", server.url))
        assert transport.idle_connections() == 1
        await asyncio.wait_for(server.closed_by_client.wait(), 5)  # expired and closed
        assert transport.idle_connections() == 0

    kept = H1Transport(keepalive_expiry=60)
    async with serve(handler) as server:
        await fetch(kept, request("GET", server.url))
        await kept.aclose()
        await asyncio.wait_for(server.closed_by_client.wait(), 5)
        with pytest.raises(httpx.TransportError):
            await kept.handle_async_request(request("GET", server.url))


def test_tls_verifies_the_upstream_certificate(run: Run, tmp_path: Path) -> None:
    run(_tls_verifies_the_upstream_certificate(tmp_path))


async def _tls_verifies_the_upstream_certificate(tmp_path: Path) -> None:
    cert_pem, key_pem = _self_signed_for_loopback()
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    trusting = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        while await read_request(reader, s) is not None:
            writer.write(ok(b"over tls"))

    async with serve(handler, tls=server_side) as server:
        transport = H1Transport(ssl_context=trusting)
        _, body = await fetch(transport, request("GET", server.url))
        _, again = await fetch(transport, request("GET", server.url))
        await transport.aclose()
        assert body == again == b"over tls" and server.connections == 1

        default = H1Transport()  # the system's roots: a self-signed upstream is refused
        with pytest.raises(httpx.ConnectError):
            await default.handle_async_request(request("GET", server.url))
        await default.aclose()


def _self_signed_for_loopback() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway test upstream")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@pytest.mark.parametrize("then", [0.2, 30.0], ids=["hangs-up", "holds-on"])
def test_an_early_answer_mid_upload_is_passed_on_not_timed_out(run: Run, then: float) -> None:
    run(_an_early_answer_mid_upload_is_passed_on_not_timed_out(then))


async def _an_early_answer_mid_upload_is_passed_on_not_timed_out(then: float) -> None:
    """The upstream refuses a large body after its head, leaves the body unread, and hangs
    up soon after or holds the connection open: either way the answer comes through."""

    async def refuses(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\n"
            b"too large"
        )
        await writer.drain()
        await asyncio.sleep(then)

    transport = H1Transport()
    async with serve(refuses) as server:
        upload = request("POST", server.url, body=b"x" * (64 << 20))
        upload.extensions["timeout"]["write"] = 30.0
        response, body = await asyncio.wait_for(fetch(transport, upload), 15)
    await transport.aclose()
    assert (response.status_code, body) == (413, b"too large")


def test_an_abandoned_upload_is_dropped_at_once(run: Run) -> None:
    run(_an_abandoned_upload_is_dropped_at_once())


async def _an_abandoned_upload_is_dropped_at_once() -> None:
    """The client leaves while most of the body still waits in the worker's buffer: that
    is dropped with the socket, not sent on to an upstream that no longer needs it."""
    total = 64 << 20
    received = 0

    async def reads_head_only(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        nonlocal received
        await reader.readuntil(b"\r\n\r\n")
        s.requests.append((b"head", b""))
        await asyncio.sleep(1.0)  # the client gives up meanwhile
        while chunk := await reader.read(1 << 20):
            received += len(chunk)
        s.closed_by_client.set()

    transport = H1Transport()
    async with serve(reads_head_only) as server:
        task = asyncio.create_task(
            transport.handle_async_request(request("POST", server.url, body=b"x" * total))
        )
        while not server.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed_by_client.wait(), 10)
    await transport.aclose()
    assert received < total // 2  # only what the kernel already held went out


def test_a_second_response_cannot_rewrite_the_first(run: Run) -> None:
    run(_a_second_response_cannot_rewrite_the_first())


async def _a_second_response_cannot_rewrite_the_first() -> None:
    async def smuggles(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        while await read_request(reader, s) is not None:
            writer.write(
                ok(b"ok", b"x-a: first")
                + b"HTTP/1.1 500 Evil\r\ncontent-length: 4\r\nx-b: smuggled\r\n\r\nAAAA"
            )

    transport = H1Transport()
    async with serve(smuggles) as server:
        response, body = await fetch(transport, request("GET", server.url))
        again, body2 = await fetch(transport, request("GET", server.url))
    await transport.aclose()
    assert (response.status_code, body, response.headers.get("x-b")) == (200, b"ok", None)
    assert response.headers["x-a"] == "first"
    assert (again.status_code, body2) == (200, b"ok")
    assert server.connections == 2  # the desynchronised connection was not reused


def test_an_endless_head_or_an_upgrade_is_a_protocol_error(run: Run) -> None:
    run(_an_endless_head_or_an_upgrade_is_a_protocol_error())


async def _an_endless_head_or_an_upgrade_is_a_protocol_error() -> None:
    async def endless(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await read_request(reader, s)
        writer.write(b"HTTP/1.1 200 OK\r\nx-big: ")
        for _ in range(1024):  # 64 MiB of one header value, unless the client hangs up
            writer.write(b"a" * 65536)
            await writer.drain()

    async def upgrades(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await read_request(reader, s)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: Upgrade\r\n\r\nxx"
        )
        await wait_closed_by_client(reader, s)

    unhandled: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: unhandled.append(ctx))
    transport = H1Transport()
    for handler, message in ((endless, "too large"), (upgrades, "switched protocols")):
        async with serve(handler) as server:
            with pytest.raises(httpx.RemoteProtocolError, match=message):
                await fetch(transport, request("GET", server.url))
    await transport.aclose()
    assert unhandled == []


# -- hostile and unusual upstreams --------------------------------------------------------


def test_trailers_never_become_headers_even_in_the_heads_read(run: Run) -> None:
    run(_trailers_never_become_headers_even_in_the_heads_read())


async def _trailers_never_become_headers_even_in_the_heads_read() -> None:
    """A trailer arriving in the same read as the head must not pass for a header (a
    trailing ``content-type: text/event-stream`` would switch the relay to SSE)."""

    async def with_trailers(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        while await read_request(reader, s) is not None:
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
                b"2\r\n{}\r\n0\r\ncontent-type: text/event-stream\r\nx-trailer: 1\r\n\r\n"
            )

    transport = H1Transport()
    async with serve(with_trailers) as server:
        for _ in range(2):  # and the connection stays usable
            response, body = await fetch(transport, request("GET", server.url))
            assert body == b"{}"
            assert response.headers.get_list("content-type") == ["application/json"]
            assert "x-trailer" not in response.headers
    await transport.aclose()
    assert server.connections == 1


def test_endless_trailers_are_a_protocol_error_not_memory(run: Run) -> None:
    run(_endless_trailers_are_a_protocol_error_not_memory())


async def _endless_trailers_are_a_protocol_error_not_memory() -> None:
    written = 0

    async def endless_trailer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        nonlocal written
        await read_request(reader, s)
        writer.write(chunked(b"event: a\n\n")[:-2] + b"x-big: ")
        for _ in range(1024):  # 64 MiB of one trailer value, unless the client hangs up
            writer.write(b"a" * 65536)
            await writer.drain()
            written += 65536

    transport = H1Transport()
    async with serve(endless_trailer) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="trailer fields are too large"):
            await fetch(transport, request("GET", server.url))
    await transport.aclose()
    assert written < 16 << 20


@pytest.mark.parametrize(
    ("coding", "framed_by_close"),
    [
        (b"xchunked", True),
        (b"chunked, gzip", True),
        (b"chunked,", True),
        (b"identity", True),
        (b"gzip, chunked", False),
        (b"Chunked ", False),
    ],
)
def test_body_framing_is_the_parsers(run: Run, coding: bytes, framed_by_close: bool) -> None:
    run(_body_framing_is_the_parsers(coding, framed_by_close))


async def _body_framing_is_the_parsers(coding: bytes, framed_by_close: bool) -> None:
    """``b"chunked" in value`` took ``xchunked`` for chunked, and a body the parser reads to
    the end of the connection came out as an error."""
    wire = b"5\r\nhello\r\n0\r\n\r\n"

    async def framed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server) -> None:
        await read_request(reader, s)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: " + coding + b"\r\n\r\n" + wire)
        await writer.drain()  # then the handler returns and the server closes

    transport = H1Transport()
    async with serve(framed) as server:
        _, body = await fetch(transport, request("GET", server.url))
    await transport.aclose()
    assert body == (wire if framed_by_close else b"hello")


_te_token = st.sampled_from(
    [b"chunked", b"Chunked", b"CHUNKED", b"gzip", b"xchunked", b"chunkedx", b"identity", b""]
)
_ows = st.sampled_from([b"", b" ", b"\t", b"  "])


@st.composite
def _transfer_encodings(draw: st.DrawFn) -> list[bytes]:
    fields = []
    for _ in range(draw(st.integers(1, 3))):
        tokens = draw(st.lists(_te_token, min_size=1, max_size=3))
        fields.append(b",".join(draw(_ows) + t + draw(_ows) for t in tokens).strip(b" \t"))
    return fields


@given(
    fields=_transfer_encodings(),
    status=st.sampled_from([200, 201, 204, 304, 404]),
    close=st.booleans(),
)
def test_the_framing_rule_agrees_with_llhttp(
    fields: list[bytes], status: int, close: bool
) -> None:
    """What llhttp does with the body (dechunks it, or hands it over raw until the end)
    is what ``body_ends_with_connection`` says, for any mix of transfer codings."""

    class Seen:
        def __init__(self) -> None:
            self.headers: list[tuple[bytes, bytes]] = []
            self.body = b""
            self.complete = False

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.complete = True

    seen = Seen()
    parser = httptools.HttpResponseParser(seen)
    head = b"HTTP/1.1 %d X\r\n" % status
    head += b"".join(b"transfer-encoding: " + f + b"\r\n" for f in fields)
    head += b"connection: close\r\n" if close else b""
    try:
        parser.feed_data(head + b"\r\n5\r\nhello\r\n0\r\n\r\n")
    except httptools.HttpParserError:
        return  # refused outright (say, chunked twice): no framing to agree on
    until_close = body_ends_with_connection(status, seen.headers)
    if until_close:
        assert not seen.complete and seen.body == b"5\r\nhello\r\n0\r\n\r\n"
    else:
        assert seen.complete and seen.body in (b"hello", b"")


@pytest.mark.parametrize("status", [b"000", b"600", b"999"])
def test_a_status_outside_100_to_599_is_a_protocol_error(run: Run, status: bytes) -> None:
    run(_a_status_outside_100_to_599_is_a_protocol_error(status))


async def _a_status_outside_100_to_599_is_a_protocol_error(status: bytes) -> None:
    """Status 000 read as "no status yet": the next response's head and body were merged
    into it."""

    async def odd_status(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await read_request(reader, s)
        writer.write(
            b"HTTP/1.1 " + status + b" Odd\r\ncontent-length: 2\r\nx-a: first\r\n\r\nok"
            b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nx-b: smuggled\r\n\r\nevil"
        )
        await wait_closed_by_client(reader, s)

    transport = H1Transport()
    async with serve(odd_status) as server:
        with pytest.raises(httpx.RemoteProtocolError, match=f"status {status.decode()}"):
            await fetch(transport, request("GET", server.url))
    assert transport.idle_connections() == 0
    await transport.aclose()


def test_failed_connections_are_freed_without_the_cyclic_gc(run: Run) -> None:
    run(_failed_connections_are_freed_without_the_cyclic_gc())


async def _failed_connections_are_freed_without_the_cyclic_gc() -> None:
    """A cut stream's connection (and its buffers) goes when its last reference does, not
    at the next run of the cyclic GC: the parser's bound methods and a stored exception's
    traceback held it in cycles."""

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server) -> None:
        await read_request(reader, s)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 50000)
        await writer.drain()

    async def garbage(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await read_request(reader, s)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
        await wait_closed_by_client(reader, s)

    async def smuggles(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        await read_request(reader, s)
        writer.write(ok(b"ok") + b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil")
        await wait_closed_by_client(reader, s)

    async def one_case(handler: Handler, read: float = 5.0) -> None:
        transport = H1Transport()
        async with serve(handler) as server:
            with suppress(httpx.HTTPError):
                await fetch(transport, request("GET", server.url, read=read))
            await transport.aclose()
        for _ in range(10):  # connection_lost runs from the loop, soon after the close
            await asyncio.sleep(0)

    gc.collect()
    gc.disable()
    try:
        for handler in (cut, garbage, smuggles):
            await one_case(handler)
        await one_case(sends_one_event_then_waits, read=0.1)  # a read timeout mid-stream
        await one_case(answers_nothing, read=0.1)  # and before the head
        left = [o for o in gc.get_objects() if isinstance(o, _Connection)]
    finally:
        gc.enable()
    assert left == []


def test_the_target_goes_out_exactly_as_given(run: Run) -> None:
    run(_the_target_goes_out_exactly_as_given())


async def _the_target_goes_out_exactly_as_given() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: Server
    ) -> None:
        while await read_request(reader, s) is not None:
            writer.write(ok(b"ok"))

    transport = H1Transport()
    async with serve(handler) as server:
        verbatim = request("GET", server.url)
        verbatim.extensions["target"] = b"/v1/./x//y/%2e/z?q=%2F&r=./"
        await fetch(transport, verbatim)
        for bad in (b"/v1/a b", b"/v1/\xc3\xa9", b"/v1/a\r\nx-evil: 1", b""):
            refused = request("GET", server.url)
            refused.extensions["target"] = bad
            with pytest.raises(httpx.LocalProtocolError):
                await transport.handle_async_request(refused)
    await transport.aclose()
    assert [head.split(b"\r\n")[0] for head, _ in server.requests] == [
        b"GET /v1/./x//y/%2e/z?q=%2F&r=./ HTTP/1.1"
    ]
