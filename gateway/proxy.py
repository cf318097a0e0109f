"""The proxy path: a raw ASGI handler for every ``/v1/*`` request.

Raw ASGI rather than a handler returning ``Stream``: the permit must ride with the body,
and here the whole life of the response is one coroutine whose ``finally`` we own. A
watcher task reads ``receive()`` for ``http.disconnect`` (``send`` never fails after a
disconnect) and, when the client leaves, releases the permit at once and cancels the
relay.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any, Final

import httpx

from gateway.access_log import ACCESS
from gateway.credentials import CredentialCache, ResolvedCredential
from gateway.errors import (
    AuthenticationFailed,
    CoordinationUnavailable,
    GatewayError,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServerFault,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
)
from gateway.headers import (
    client_response_headers,
    gateway_token,
    is_sendable_key,
    upstream_request_headers,
)
from gateway.metrics.catalog import CLIENT_CLOSED_STATUS
from gateway.metrics.tally import RequestTally
from gateway.paths import upstream_target
from gateway.sse import event_end, tail
from gateway.upstream import Upstream
from gateway.usage.meter import MAX_METERED_BODY, Meter
from gateway.usage.recorder import UsageTally
from ipc.caps import CredentialGate
from ipc.errors import CredentialGone, GatesUnavailable, LedgerFull
from ipc.gates import Gatekeeper, Permit, Rejected
from ipc.queue import Queue

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("gateway.proxy")

_JSON_HEADERS: Final = [(b"content-type", b"application/json")]
OVERLOAD_SCOPE_HEADER: Final = "x-gateway-overloaded-scope"
GLOBAL_CAP_MESSAGE: Final = "Server is at capacity. Retry shortly."
COORDINATION_MESSAGE: Final = "The gateway's coordination store is unavailable; retry shortly."
CREDENTIAL_CAP_MESSAGE: Final = (
    "Too many concurrent requests against this credential (cap: {cap}). Retry shortly."
)
# An SSE relay holds at most this much of an event while it waits for the event's end;
# past it the bytes go out as they are (an upstream that never ends an event).
MAX_HELD_EVENT: Final = 1024 * 1024
# The one path whose answers report token usage (count_tokens and the rest: requests only).
METERED_PATH: Final = "/v1/messages"


class ClientGone(Exception):
    """The client disconnected before the request body was read."""


class ProxyRuntime:
    """What the proxy needs from its worker, filled in by the lifespan."""

    credentials: CredentialCache
    gatekeeper: Gatekeeper
    upstream: Upstream
    queue: Queue | None  # the waiting lines, when GATEWAY_QUEUE_TIMEOUT is set
    metrics: RequestTally | None = None  # None: the launcher's metrics endpoint is off
    usage: UsageTally | None = None  # None: GATEWAY_USAGE_FLUSH_INTERVAL=0, nothing counted


class Proxy:
    def __init__(
        self,
        runtime: ProxyRuntime,
        *,
        max_body: int,
        retry_after: int,
        read_timeout: float,
        body_timeout: float,
        queue_timeout: float = 0.0,
    ) -> None:
        self.runtime = runtime
        self.max_body = max_body
        self.retry_after = str(retry_after)
        self.read_timeout = read_timeout
        self.body_timeout = body_timeout
        self.queue_timeout = queue_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        path = raw_path.decode("latin-1")
        headers = scope["headers"]
        user_id = None
        waited = 0.0
        try:
            target = upstream_target(raw_path, scope.get("query_string", b""))
            token = gateway_token(headers)
            if token is None:
                raise AuthenticationFailed(
                    "Missing gateway token: send it as x-api-key or Authorization: Bearer."
                )
            credential = await self.runtime.credentials.resolve(token)
            user_id = credential.user_id
            self._refuse_declared_too_large(headers)
            # Admitted before the body is read: an upload in progress holds its permits, so
            # the caps bound uploads too (a cap-1 user cannot have four open at once).
            queue = self.runtime.queue
            reading: asyncio.Task[bytes] | None = None
            queued = False
            try:
                gate = credential.gate
                if isinstance(gate, CredentialGate):  # POSIX gates: synchronous, no await
                    if queue is None:
                        admitted = self.runtime.gatekeeper.admit(gate)
                    else:
                        admitted = self.runtime.gatekeeper.admit_unless_queued(gate, queue)
                        if isinstance(admitted, Rejected):
                            queued = True
                            admitted, reading, waited = await self._wait_in_line(
                                self.runtime.gatekeeper.admit_waiting(
                                    gate, queue, within=self.queue_timeout
                                ),
                                receive,
                            )
                elif self.queue_timeout > 0:
                    # Shared gates with the wait queue: polls Redis while over a cap.
                    found: list[ResolvedCredential] = []
                    queued = True
                    admitted, reading, waited = await self._wait_in_line(
                        self._admit_shared(token, credential, found), receive
                    )
                    credential = found[-1] if found else credential
                else:
                    # Shared gates (Redis): one round trip; a credential cached before a
                    # change committed on any host is read again first (maybe another key).
                    credential, admitted = await self.runtime.credentials.admit_shared(
                        token, credential
                    )
            except CredentialGone:
                # Its user was deleted while this request was on its way.
                raise AuthenticationFailed(
                    "Invalid, unknown, expired or revoked gateway token."
                ) from None
            except LedgerFull:
                log.error("this worker's ledger is full; refusing a request")
                if self.runtime.metrics is not None:
                    self.runtime.metrics.rejected("worker", str(user_id))
                if self.runtime.usage is not None:
                    self.runtime.usage.rejected(credential.user_id)
                raise Overloaded(
                    GLOBAL_CAP_MESSAGE, headers=self._retry_headers("worker")
                ) from None
            except GatesUnavailable:
                # Fail closed: never a silent fall back to per-host counting. Logged once
                # per outage by the gates.
                raise CoordinationUnavailable(
                    COORDINATION_MESSAGE, headers={"retry-after": self.retry_after}
                ) from None
            if queued and self.runtime.metrics is not None:
                if not isinstance(admitted, Rejected):
                    self.runtime.metrics.waited(waited, timed_out_at=None)
                elif admitted.waited is not None:  # timed out in line, not a full line
                    self.runtime.metrics.waited(waited, timed_out_at=admitted.scope)
            if isinstance(admitted, Rejected):
                if self.runtime.usage is not None:
                    self.runtime.usage.rejected(credential.user_id)
                raise self._overloaded(admitted, user_id=str(user_id), path=path)
            admitted_at = time.perf_counter()
            try:
                body = await (reading if reading is not None else self._read_body(receive))
                request = self.runtime.upstream.request(
                    method,
                    target,
                    headers=upstream_request_headers(headers, api_key=credential.api_key),
                    body=body,
                )
            except BaseException:
                # Every way out between the admit and the relay gives the permits back
                # (a deadline, a client gone, a body too large, a cancel).
                admitted.release()
                raise
        except ClientGone:
            self._answered("client_disconnected", CLIENT_CLOSED_STATUS)
            _access(method, path, user_id, 0, started, 0, "client_disconnected", waited)
            return
        except GatewayError as err:
            await _send_error(send, err)
            self._answered(err.outcome, err.status)
            _access(method, path, user_id, err.status, started, 0, err.outcome, waited)
            return
        except Exception:
            # Logged with its trace here; the client gets no trace, key or token.
            log.exception("unexpected error before forwarding")
            fault = ServerFault("Internal server error.")
            await _send_error(send, fault)
            self._answered(fault.outcome, fault.status)
            _access(method, path, user_id, fault.status, started, 0, fault.outcome)
            return
        relay = self._relay(
            send,
            receive,
            permit=admitted,
            request=request,
            method=method,
            path=path,
            user_id=credential.user_id,
            started=started,
            waited=waited,
            admitted_at=admitted_at,
        )
        # An agent's request body is its whole context (often hundreds of KiB); held here
        # it would live as long as the stream. The relay drops it once it is sent.
        del request, body
        await relay

    async def _admit_shared(
        self, token: str, credential: ResolvedCredential, found: list[ResolvedCredential]
    ) -> Permit | Rejected:
        """Shared gates, waiting in line: the admission, and in ``found`` the credential it
        was made with (read again if a change was committed anywhere meanwhile)."""
        fresh, admitted = await self.runtime.credentials.admit_shared(
            token, credential, within=self.queue_timeout
        )
        found.append(fresh)
        return admitted

    async def _wait_in_line(
        self, admission: Coroutine[Any, Any, Permit | Rejected], receive: Receive
    ) -> tuple[Permit | Rejected, asyncio.Task[bytes] | None, float]:
        """Wait for a slot (``GATEWAY_QUEUE_TIMEOUT``) while the body arrives, and leave the
        line at once if the client goes. Returns the admission, the body still being read
        (the caller awaits it, holding the permit) and the seconds waited."""
        started = time.perf_counter()
        waiting = asyncio.create_task(admission)
        reading: asyncio.Task[bytes] = asyncio.create_task(self._read_body(receive))
        watching: asyncio.Future[Message] | None = None
        try:
            await asyncio.wait((waiting, reading), return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                reading.result()  # the body failed (client gone, too large, late): it raises
                # The whole body is in: go on waiting, watching for the client to leave.
                watching = asyncio.ensure_future(receive())
                await asyncio.wait((waiting, watching), return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    raise ClientGone
            admitted = waiting.result()
        except BaseException:
            _abandon(waiting)
            reading.cancel()
            raise
        finally:
            if watching is not None:
                watching.cancel()
        if isinstance(admitted, Rejected):
            reading.cancel()
            return admitted, None, admitted.waited or 0.0
        return admitted, reading, time.perf_counter() - started

    def _refuse_declared_too_large(self, headers: list[tuple[bytes, bytes]]) -> None:
        """A declared length above the limit is refused before admission and before a
        byte of the body is read."""
        for name, value in headers:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                raise self._too_large()

    async def _read_body(self, receive: Receive) -> bytes:
        """The whole request body, within ``body_timeout`` seconds of the first byte asked."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:
                        raise self._too_large()
                    if not message.get("more_body", False):
                        return chunk if not chunks else b"".join((*chunks, chunk))
                    chunks.append(chunk)
        except TimeoutError:
            # The body is not read to its end, so the connection cannot carry another
            # request: say so, and the server closes it after the answer.
            raise RequestTimeout(
                f"The request body did not arrive within {self.body_timeout:g} s.",
                headers={"connection": "close"},
            ) from None

    def _answered(self, outcome: str, status: int) -> None:
        if self.runtime.metrics is not None:
            self.runtime.metrics.answered(outcome, status)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"Request body exceeds the gateway's limit of {self.max_body} bytes."
        )

    def _overloaded(self, rejected: Rejected, *, user_id: str, path: str) -> Overloaded:
        reason = "global_cap" if rejected.scope == "global" else "per_credential_cap"
        if self.runtime.metrics is not None:
            self.runtime.metrics.rejected(rejected.scope, user_id)
        log.warning(
            "request rejected over a concurrency cap",
            extra={"reason": reason, "cap_value": rejected.cap, "user_id": user_id, "path": path},
        )
        message = (
            GLOBAL_CAP_MESSAGE
            if rejected.scope == "global"
            else CREDENTIAL_CAP_MESSAGE.format(cap=rejected.cap)
        )
        if rejected.waited is not None:
            message += f" (waited {rejected.waited:.1f} s)"
        return Overloaded(message, headers=self._retry_headers(rejected.scope))

    def _retry_headers(self, scope: str) -> dict[str, str]:
        return {
            "retry-after": self.retry_after,
            "x-should-retry": "true",
            OVERLOAD_SCOPE_HEADER: scope,
        }

    async def _relay(
        self,
        send: Send,
        receive: Receive,
        *,
        permit: Permit,
        request: httpx.Request,
        method: str,
        path: str,
        user_id: uuid.UUID,
        started: float,
        waited: float,
        admitted_at: float,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        client_left = False

        async def watch_disconnect() -> None:
            nonlocal client_left
            while (await receive())["type"] != "http.disconnect":
                pass
            client_left = True
            permit.release()  # at once and synchronously, before anything else runs
            task.cancel()

        # Watched from the start (a timer that started it later saved ~5 µs a request,
        # but a client that aborts and resends at once was refused by its own request's
        # permit for up to that delay).
        watcher = asyncio.create_task(watch_disconnect())
        response: httpx.Response | None = None
        status = 0
        tally = _Tally()
        # Replaced by how the relay ended; stays only if something unforeseen escapes.
        outcome = "internal_error"
        sse = False
        usage = self.runtime.usage
        meter: Meter | None = None
        body: list[bytes] | None = None  # a non-streamed answer kept to read its usage
        headers_at = 0.0
        sent_at = time.perf_counter()
        try:
            try:
                response = await self.runtime.upstream.send(request)
            except httpx.TimeoutException as exc:
                raise UpstreamTimeout(
                    f"The upstream did not answer within {self.read_timeout:g} s."
                ) from exc
            except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as exc:
                raise _unsendable(request, exc) from exc
            except httpx.HTTPError as exc:
                raise UpstreamUnavailable(
                    f"The upstream is unreachable ({type(exc).__name__})."
                ) from exc
            headers_at = time.perf_counter()
            del request  # sent: the body is not kept for the life of the stream
            status = response.status_code
            headers = client_response_headers(response.headers.raw)
            # Sent with the first byte of the body, not before: an upstream that fails
            # before one gets the client an Anthropic error, not a bare 500 of the server's.
            start = {"type": "http.response.start", "status": status, "headers": headers}
            # Each relay ends the response itself and gives the slot back just before the
            # client can see that end, so a client that sends its next request the moment
            # this one ends is never refused by its own finished stream.
            sse = _relayed_as_events(headers)
            if usage is not None and status == 200 and path == METERED_PATH:
                meter = Meter()
            if sse:
                outcome = await _relay_sse(response, send, tally, permit, start, meter)
            else:
                length = _declared_length(response, method)
                if length is not None:
                    headers.append((b"content-length", b"%d" % length))
                if meter is not None and _is_json(headers):
                    body = []  # not an SSE stream whose encoding hides its events
                outcome = await _relay_raw(response, send, tally, permit, start, length, body)
        except GatewayError as err:
            status, outcome = err.status, err.outcome
            permit.release()
            try:
                await _send_error(send, err)
            except asyncio.CancelledError:
                if not client_left:
                    raise
                task.uncancel()
                outcome = "client_disconnected"
        except asyncio.CancelledError:
            if not client_left:
                raise
            task.uncancel()
            outcome = "client_disconnected"
        finally:
            permit.release()
            watcher.cancel()
            if usage is not None:
                try:
                    if body is not None and meter is not None and outcome == "ok":
                        _read_body_usage(meter, body, response)
                    usage.relayed(user_id, meter)
                except Exception:  # accounting must never keep the upstream response open
                    log.exception("usage of a request could not be counted")
            metrics = self.runtime.metrics
            if metrics is not None:
                metrics.relayed(
                    outcome,
                    # No status was sent: the client left first (nginx's 499), or something
                    # unforeseen escaped, which the server answers with a 500.
                    status or (CLIENT_CLOSED_STATUS if outcome == "client_disconnected" else 500),
                    streamed=sse,
                    admitted_at=admitted_at,
                    sent_at=sent_at,
                    headers_at=headers_at,
                    ended=time.perf_counter(),
                )
            if response is not None:
                # Shielded: a second cancel must not leave the upstream connection open.
                await asyncio.shield(response.aclose())
            _access(method, path, user_id, status, started, tally.sent, outcome, waited)


def _abandon(waiting: asyncio.Task[Permit | Rejected]) -> None:
    """Stop waiting: the line is left and anything taken given back, also when the
    permit arrived just as the client left."""
    if not waiting.done():
        waiting.cancel()  # admit_waiting leaves the line and gives back what it took
    elif not waiting.cancelled() and waiting.exception() is None:
        result = waiting.result()
        if isinstance(result, Permit):
            result.release()


class _Tally:
    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = 0


def _body(response: httpx.Response) -> httpx.AsyncByteStream:
    """The transport's own byte stream: ``aiter_raw()`` would wrap it in two more layers
    (a chunker and a context manager) held for the life of every stream. The transports
    map their errors to httpx's themselves; the relay closes the response in ``finally``."""
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    return stream


def _declared_length(response: httpx.Response, method: str) -> int | None:
    """The upstream's content-length, passed on so the client gets a fixed-length body
    instead of a chunked one, and can tell a cut body from a whole one."""
    value = response.headers.get("content-length")
    if value is None or not value.isdigit() or method == "HEAD":
        return None
    if response.status_code in (204, 304):
        return None
    return int(value)


def _relayed_as_events(headers: list[tuple[bytes, bytes]]) -> bool:
    """An SSE body is relayed event by event. With a content-encoding it is not: no event
    boundary can be seen in compressed bytes, so they go out untouched as they come."""
    sse = False
    for name, value in headers:
        if name == b"content-type":
            sse = value[:17].lower() == b"text/event-stream"
        elif name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return False
    return sse


def _unsendable(request: httpx.Request, exc: httpx.HTTPError) -> GatewayError:
    """A request the transport refused to write: the gateway's own failure, never the
    upstream's (nothing was sent). The message names no value: the key may be the cause."""
    log.error("the upstream request could not be written: %s", type(exc).__name__)
    key = request.headers.get("x-api-key", "")
    if not is_sendable_key(key):
        return ServerFault(
            "The stored Anthropic key holds characters that cannot be sent in an HTTP "
            "header (only visible ASCII is allowed); store the key again with "
            "PUT /api/v1/me/anthropic-key."
        )
    return ServerFault(
        "The gateway could not write this request as valid HTTP/1.1; nothing was sent "
        f"upstream ({type(exc).__name__})."
    )


def _failed_before_body(exc: httpx.HTTPError) -> GatewayError:
    """The upstream's body broke off before a byte of it reached the client."""
    log.warning("upstream body failed before its first byte: %s", type(exc).__name__)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"The upstream stopped sending its response ({type(exc).__name__}).")
    return UpstreamUnavailable(
        f"The upstream's response broke off before its body ({type(exc).__name__})."
    )


async def _end(send: Send, permit: Permit, last: bytes = b"") -> None:
    permit.release()
    await send({"type": "http.response.body", "body": last, "more_body": False})


async def _relay_raw(
    response: httpx.Response,
    send: Send,
    tally: _Tally,
    permit: Permit,
    start: Message | None,
    length: int | None,
    kept: list[bytes] | None = None,
) -> str:
    """``kept``: a list the chunks are also appended to (up to ``MAX_METERED_BODY``; past
    it the list is emptied and left alone), to read the answer's usage after it is sent."""
    try:
        async for chunk in _body(response):
            tally.sent += len(chunk)
            if kept is not None:
                if tally.sent <= MAX_METERED_BODY:
                    kept.append(chunk)
                else:
                    kept.clear()
                    kept = None
            if start is not None:
                await send(start)
                start = None
            if tally.sent == length:
                await _end(send, permit, chunk)  # the declared body is whole: end with it
                return "ok"
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except httpx.HTTPError as exc:
        if start is not None:
            raise _failed_before_body(exc) from exc
        # No end is sent: the server then closes the connection, and the client knows the
        # body is incomplete (a clean end would pass a truncated body off as whole).
        log.warning("upstream body failed after %d bytes: %s", tally.sent, type(exc).__name__)
        return _failure_outcome(exc)
    if start is not None:
        await send(start)
    await _end(send, permit)
    return "ok"


async def _relay_sse(
    response: httpx.Response,
    send: Send,
    tally: _Tally,
    permit: Permit,
    start: Message | None,
    meter: Meter | None = None,
) -> str:
    """Relay whole events as they arrive; on an upstream failure end with ``event: error``.

    Bytes go out unchanged and in order, cut after the last blank line of each chunk (in
    any line ending SSE allows). Only the start of an event still arriving waits, so that
    a failure can end the stream on an event boundary with a well-formed error event; it
    waits for at most ``MAX_HELD_EVENT`` bytes, past which they go as they are and a later
    failure ends the body short instead (no frame can be well-formed inside an event).

    ``meter`` reads the usage of the whole events just sent, after they are sent.
    """
    held: list[bytes] = []  # the event still arriving, in the chunks it came in
    held_size = 0
    before = b""  # the last bytes seen: a blank line can straddle two chunks
    whole = True  # what went out so far ends on an event boundary
    sending: bytes | None = None  # events being sent, not yet metered
    try:
        async for chunk in _body(response):
            size = len(chunk)
            cut = event_end(chunk, before)
            before = tail(before, chunk)
            if cut:
                done = chunk if cut == size else chunk[:cut]
                if held:
                    held.append(done)
                    done = b"".join(held)
                    held.clear()
                if cut < size:
                    held.append(chunk[cut:])
                held_size = size - cut
                whole = True
            elif not whole:
                done = chunk  # inside an event too long to hold: nothing to wait for
            else:
                held.append(chunk)
                held_size += size
                if held_size <= MAX_HELD_EVENT:
                    continue
                done = b"".join(held)
                held.clear()
                held_size = 0
                whole = False
            tally.sent += len(done)
            if start is not None:
                await send(start)
                start = None
            sending = done
            await send({"type": "http.response.body", "body": done, "more_body": True})
            if meter is not None:
                meter.events(done)
            sending = None
    except asyncio.CancelledError:
        # The client left while these events were being sent: count what was relayed.
        if meter is not None and sending is not None:
            meter.events(sending)
        raise
    except httpx.HTTPError as exc:
        if start is not None:
            raise _failed_before_body(exc) from exc
        log.warning("upstream stream failed after %d bytes: %s", tally.sent, type(exc).__name__)
        if not whole:
            return _failure_outcome(exc)  # no end: the client sees the body cut short
        frame = (
            b"event: error\ndata: "
            + error_body(
                "api_error", "The upstream stream ended unexpectedly; the response is incomplete."
            )
            + b"\n\n"
        )
        await send({"type": "http.response.body", "body": frame, "more_body": True})
        await _end(send, permit)
        return _failure_outcome(exc)
    rest = b"".join(held)
    tally.sent += len(rest)
    if start is not None:
        await send(start)
    await _end(send, permit, rest)
    if meter is not None and rest:
        meter.events(rest)  # whole events only: a tail without its blank line is not one
    return "ok"


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value[:16].lower() == b"application/json"
    return False


def _read_body_usage(meter: Meter, body: list[bytes], response: httpx.Response | None) -> None:
    """The usage of a whole non-streamed answer, read after its last byte went out."""
    if not body or response is None:
        return
    data = body[0] if len(body) == 1 else b"".join(body)
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding in ("gzip", "deflate"):
        data = _inflate(data, gzip=encoding == "gzip")
    elif encoding not in ("", "identity"):
        return  # br, zstd: not read (the request still counts)
    meter.body(data)


def _inflate(data: bytes, *, gzip: bool) -> bytes:
    inflater = zlib.decompressobj(wbits=31 if gzip else 15)
    try:
        return inflater.decompress(data, MAX_METERED_BODY)
    except zlib.error:
        return b""


def _failure_outcome(exc: httpx.HTTPError) -> str:
    """A body the upstream stopped sending: cut, or silent past the read-idle timeout."""
    return "upstream_timeout" if isinstance(exc, httpx.TimeoutException) else "upstream_cut"


async def _send_error(send: Send, err: GatewayError) -> None:
    headers = [*_JSON_HEADERS, *((k.encode(), v.encode()) for k, v in err.headers.items())]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": err.body(), "more_body": False})


def _access(
    method: str,
    path: str,
    user_id: object,
    status: int,
    started: float,
    sent: int,
    outcome: str,
    waited: float = 0.0,
) -> None:
    if ACCESS.enabled:
        ACCESS.line(
            method, path, user_id, status, time.perf_counter() - started, sent, outcome, waited
        )
