"""A lean HTTP/1.1 httpx transport: asyncio protocols, httptools' parser, a keep-alive pool.

The gateway sends one request per connection at a time and streams the answer back, so
it needs none of what a general client carries: no cookies, no redirects, no
decompression, no connection limit (the gates are the limits). Over aiohttp's client this
saves a quarter to a third of the worker's CPU per proxied request, about 10 MB of imports
per worker and about 10 KiB per open stream (``loadtests/RESULTS.md``). httpx's API is
kept: requests and responses are httpx's, errors are httpx's, and the body is an
``httpx.AsyncByteStream`` of the bytes exactly as they came (chunked framing removed,
nothing decoded).

Every connection is closed unless its response was read to the end and the upstream
allows keep-alive; a half-read stream (a client that left) closes its connection, which
is also what tells the upstream to stop generating.
"""

from __future__ import annotations

import asyncio
import collections
import re
import ssl
import time
from collections.abc import AsyncIterator
from typing import Final, cast

import httptools
import httpx

_HIGH_WATER: Final = 256 * 1024  # stop reading the socket while this much waits unread
# The status line and headers (h11, under httpx: 16 KiB); the same bound holds for what
# comes after the head without a byte of body (chunk framing, trailer fields), since
# httptools gathers a field in memory until it ends.
MAX_RESPONSE_HEAD: Final = 64 * 1024
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})
_TOKEN: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_METHOD: Final = re.compile(_TOKEN)
# Every header line a token, a colon and a value without CR, LF or NUL: checked over the
# whole block at once, so nothing a client or a stored value holds can split the request.
_HEADER_BLOCK: Final = re.compile(rb"(?:" + _TOKEN + rb": [^\r\n\0]*\r\n)*\r\n")
# The request target as sent (``request.extensions["target"]``, else the URL's path and
# query): visible ASCII, so nothing in it can end the request line early.
_TARGET: Final = re.compile(rb"[!-~]+")

Origin = tuple[bytes, str, int]


class _Connection(asyncio.Protocol):
    """One upstream connection and the one exchange on it at a time."""

    __slots__ = (
        "_body",
        "_buffered",
        "_complete",
        "_desynced",
        "_drain",
        "_eof_body",
        "_error",
        "_head_bytes",
        "_head_only",
        "_headers",
        "_loop",
        "_parser",
        "_paused",
        "_received",
        "_status",
        "_waiter",
        "closed",
        "idle",
        "idle_since",
        "keep_alive",
        "origin",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: Origin) -> None:
        self._loop = loop
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle = False
        self.idle_since = 0.0
        self._drain: asyncio.Future[None] | None = None
        self._reset(head_only=False)

    def _reset(self, *, head_only: bool) -> None:
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._complete = False
        self._eof_body = False
        self._desynced = False
        self._head_bytes = 0
        self._head_only = head_only
        self._received = False
        self._error: httpx.TransportError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.keep_alive = False

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if self.idle or self._desynced or parser is None:
            # Nothing was asked: whatever this is, the connection can no longer be trusted.
            self.close()
            return
        self._received = True
        buffered = self._buffered
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("upstream switched protocols unasked"))
            self.close()
        except httptools.HttpParserError as exc:
            if self._desynced:
                return  # the response before the stray bytes stands; the connection is closed
            self._fail(httpx.RemoteProtocolError(f"invalid HTTP response from upstream: {exc}"))
            self.close()
            return
        if self._buffered != buffered or self._complete:
            self._head_bytes = 0  # body bytes came (flow control bounds those)
            return
        # httptools gathers a header or trailer field in memory until it ends, without a
        # limit: bound the head, and what follows it without a byte of body, alike.
        self._head_bytes += len(data)
        if self._head_bytes > MAX_RESPONSE_HEAD:
            self._fail(
                httpx.RemoteProtocolError(
                    "upstream response head or trailer fields are too large"
                    if self._status
                    else "upstream response head is too large"
                )
            )
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        # First: a writer waiting to drain must not wait out its timeout for a connection
        # that is gone (an upstream that answers 413 early and resets mid-upload).
        self.resume_writing()
        try:
            self._ended(exc)
        finally:
            # The parser holds this protocol's bound methods (and the last error a callback
            # raised): a cycle that only the cyclic GC would free, and with it the buffers of
            # a cut stream. Nothing parses after the connection is gone.
            self._parser = None
            self.transport = None

    def _ended(self, exc: Exception | None) -> None:
        if self._complete:
            return
        if self._status and self._eof_body and exc is None:
            self.on_message_complete()  # a body delimited by the end of the connection
            return
        if exc is None:
            error: httpx.TransportError = httpx.RemoteProtocolError(
                "upstream closed the connection before the response was complete"
                if self._status
                else "upstream closed the connection without a response"
            )
        else:
            error = httpx.ReadError(str(exc) or type(exc).__name__)
        self._fail(error)

    def pause_writing(self) -> None:
        self._drain = self._loop.create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._status:
            # A second response on one request (stray bytes after a whole one, a body on a
            # 204): stop parsing before it can touch the first, and never reuse the socket.
            self._desynced = True
            self.close()
            raise _Desynced

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._status:
            # Fields after the head are trailers: dropped, so they can neither grow the
            # headers nor, arriving in the head's read, pass for response headers.
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # called from inside feed_data
        status = parser.get_status_code()
        if not 100 <= status <= 599:
            # Status 000 would read as "no status yet" and merge two responses into one.
            self._fail(httpx.RemoteProtocolError(f"upstream answered with status {status:03d}"))
            raise _Refused
        if status < 200:
            self._headers = []  # an interim response (103 Early Hints): wait for the real one
            return
        self._status = status
        self.resume_writing()  # an early answer (413 mid-upload): stop waiting to write
        self._eof_body = body_ends_with_connection(status, self._headers)
        if self._head_only:
            # httptools cannot be told the request was HEAD: it would wait for a body that
            # never comes. The response ends here and the connection is not reused.
            self._complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self._status:
            return  # the end of an interim response
        if not self._head_only and self._parser is not None:
            self.keep_alive = self._parser.should_keep_alive()
        self._complete = True
        self._wake()

    # -- the exchange ------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: httpx.TransportError) -> None:
        if self._error is None:
            self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(_fresh(error))

    async def _wait(self, read_timeout: float | None) -> None:
        # A timer on a future rather than asyncio.timeout(): this runs once per chunk of
        # every stream, and a bare TimerHandle is the cheapest timeout asyncio has.
        if self._error is not None:
            raise _fresh(self._error)
        waiter = self._waiter = self._loop.create_future()
        timer = (
            None
            if read_timeout is None
            else self._loop.call_later(read_timeout, _expire, waiter, "upstream read timed out")
        )
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
            # A failed future holds its exception, whose traceback holds this frame: a
            # cycle (through ``self``, the connection) unless the frame lets go of it.
            del waiter

    async def send(
        self, head: bytes, body: bytes, *, head_only: bool, write_timeout: float | None
    ) -> None:
        self._reset(head_only=head_only)
        transport = self.transport
        if transport is None or transport.is_closing():
            raise _NotSent("upstream connection closed before the request")
        if body:
            transport.writelines((head, body))
        else:
            transport.write(head)
        drain = self._drain
        if drain is not None:
            timer = (
                None
                if write_timeout is None
                else self._loop.call_later(write_timeout, _expire_write, drain)
            )
            try:
                await drain
            finally:
                if timer is not None:
                    timer.cancel()

    async def response_head(
        self, read_timeout: float | None
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        while not self._status:
            await self._wait(read_timeout)
        return self._status, self._headers

    async def body(self, read_timeout: float | None) -> AsyncIterator[bytes]:
        while True:
            if self._body:
                data = self._body[0] if len(self._body) == 1 else b"".join(self._body)
                self._body.clear()
                self._buffered = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                yield data
            elif self._complete:
                return
            else:
                await self._wait(read_timeout)

    @property
    def reusable(self) -> bool:
        return (
            self._complete
            and self.keep_alive
            and not self.closed
            and not self._body
            # The whole request went out (an early answer can come before it has).
            and self.transport is not None
            and not self.transport.get_write_buffer_size()
        )

    @property
    def received_nothing(self) -> bool:
        return not self._received

    def close(self) -> None:
        """At once: ``close()`` would first flush what is still buffered (a cancelled
        upload's body), keeping the memory and leaving the upstream uninformed."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _NotSent(httpx.RemoteProtocolError):
    """The connection was found closed before a byte of the request was written."""


class _Desynced(Exception):
    """Raised inside a parser callback to stop httptools at a second response."""


class _Refused(Exception):
    """Raised inside a parser callback to stop httptools at a response it must not take."""


def _fresh(error: httpx.TransportError) -> httpx.TransportError:
    """A new exception like ``error`` for each raise: the stored one would collect the
    traceback of every frame it passes through, and those frames hold the connection."""
    return type(error)(str(error))


def body_ends_with_connection(status: int, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a response body is delimited by the end of the connection.

    httptools does not expose llhttp's framing flags, so this is llhttp's rule (RFC 9112
    section 6.3) read from the same headers: chunked only when ``chunked`` is the last
    transfer coding of all ``transfer-encoding`` fields (``xchunked`` or ``chunked, gzip``
    is read to the end of the connection), else a content-length, else the connection's
    end. llhttp refuses a response with both. The tests hold this to the parser.
    """
    if status in (204, 304):
        return False
    codings: bytes | None = None
    length = False
    for name, value in headers:
        lower = name.lower()
        if lower == b"transfer-encoding":
            codings = value if codings is None else codings + b"," + value
        elif lower == b"content-length":
            length = True
    if codings is not None:
        return codings.rpartition(b",")[2].strip(b" \t").lower() != b"chunked"
    return not length


def _expire(waiter: asyncio.Future[None], message: str) -> None:
    if not waiter.done():
        waiter.set_exception(httpx.ReadTimeout(message))


def _expire_write(drain: asyncio.Future[None]) -> None:
    if not drain.done():
        drain.set_exception(httpx.WriteTimeout("upstream write timed out"))


class _ResponseStream(httpx.AsyncByteStream):
    __slots__ = ("_connection", "_pool", "_read_timeout")

    def __init__(
        self, pool: H1Transport, connection: _Connection, read_timeout: float | None
    ) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self._read_timeout = read_timeout

    def __aiter__(self) -> AsyncIterator[bytes]:
        # The connection's own generator: one frame per open stream, not two.
        if self._connection is None:
            raise httpx.StreamClosed()
        return self._connection.body(self._read_timeout)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool.release(connection)


class H1Transport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 to any number of origins; no limit on connections.

    Idle connections are reused most-recent first and closed after ``keepalive_expiry``
    seconds. A request on a reused connection that the upstream had already closed is
    retried once on a new connection, but only for idempotent methods: a POST the
    upstream may have seen is never sent twice.
    """

    def __init__(
        self, *, keepalive_expiry: float = 30.0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._idle: dict[Origin, collections.deque[_Connection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.TransportError("the transport is closed")
        url = request.url
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        origin: Origin = (scheme, url.raw_host.decode("ascii"), url.port or _default_port(scheme))
        timeout = request.extensions.get("timeout", {})
        method = request.method.encode("ascii")
        # The gateway passes the client's path and query as they came: httpx.URL would
        # have normalised them (``/v1/./x`` to ``/v1/x``).
        target = request.extensions.get("target", url.raw_path)
        head = _request_head(method, target, request.headers.raw)
        body = (
            request.content
            if isinstance(request.stream, httpx.ByteStream)
            else await request.aread()
        )
        head_only = method == b"HEAD"
        while True:
            connection, reused = self._take_idle(origin), True
            if connection is None:
                connection, reused = await self._connect(origin, timeout.get("connect")), False
            try:
                await connection.send(
                    head, body, head_only=head_only, write_timeout=timeout.get("write")
                )
                status, headers = await connection.response_head(timeout.get("read"))
            except _NotSent:
                connection.close()
                continue  # nothing went out: safe to send again, whatever the method
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                connection.close()
                if reused and connection.received_nothing and method in _IDEMPOTENT:
                    continue
                raise
            except BaseException:
                connection.close()
                raise
            return httpx.Response(
                status_code=status,
                headers=headers,
                stream=_ResponseStream(self, connection, timeout.get("read")),
                extensions={"http_version": b"HTTP/1.1"},
            )

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            transport = connection.transport
            if not connection.closed and transport is not None and not transport.is_closing():
                connection.idle = False
                return connection
        return None

    async def _connect(self, origin: Origin, connect_timeout: float | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        context = self._tls() if scheme == b"https" else None
        try:
            async with asyncio.timeout(connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop, origin),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"connecting to {host}:{port}: {exc}") from exc
        return connection

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            # Loaded on first use: plain-HTTP upstreams (tests, a local relay) never pay it.
            self._ssl_context = httpx.create_ssl_context()
            self._ssl_context.set_alpn_protocols(["http/1.1"])
        return self._ssl_context

    def release(self, connection: _Connection) -> None:
        if self._closed or not connection.reusable:
            connection.close()
            return
        connection.idle = True
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.origin, collections.deque()).append(connection)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._expiry, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than the expiry (oldest sit at the left)."""
        self._sweeper = None
        deadline = time.monotonic() - self._expiry
        for origin, idle in list(self._idle.items()):
            while idle and (idle[0].closed or idle[0].idle_since <= deadline):
                idle.popleft().close()
            if not idle:
                del self._idle[origin]
        if self._idle:
            oldest = min(idle[0].idle_since for idle in self._idle.values())
            delay = max(oldest + self._expiry - time.monotonic(), 0.05)
            self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def idle_connections(self) -> int:
        return sum(1 for idle in self._idle.values() for c in idle if not c.closed)

    async def aclose(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


def _default_port(scheme: bytes) -> int:
    return 443 if scheme == b"https" else 80


def _request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    if not _METHOD.fullmatch(method):
        raise httpx.LocalProtocolError(f"illegal request method {method!r}")
    if not _TARGET.fullmatch(target):
        raise httpx.LocalProtocolError("illegal byte in the request target")
    lines: list[bytes] = []
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    block = b"".join(lines)
    # The grammar alone would pass a value that carries a whole extra "\r\nname: value":
    # the line count catches that.
    if not _HEADER_BLOCK.fullmatch(block) or block.count(b"\n") != len(headers) + 1:
        raise httpx.LocalProtocolError("illegal byte in a request header name or value")
    return b"%s %s HTTP/1.1\r\n%s" % (method, target, block)
