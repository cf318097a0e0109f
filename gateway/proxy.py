"""The proxy path: a raw ASGI handler for every ``/v1/*`` request.

Raw ASGI rather than a handler returning ``Stream``: the permit must ride with the body,
and here the whole life of the response is one coroutine whose ``finally`` we own. A
watcher task reads ``receive()`` for ``http.disconnect`` (``send`` never fails after a
disconnect) and, when the client leaves, releases the permit at once and cancels the relay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

import httpx

from gateway.credentials import CredentialCache
from gateway.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
    ServerFault,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_body,
)
from gateway.headers import client_response_headers, gateway_token, upstream_request_headers
from gateway.metrics.catalog import CLIENT_CLOSED_STATUS
from gateway.metrics.tally import RequestTally
from gateway.paths import upstream_url
from gateway.upstream import Upstream
from ipc.errors import LedgerFull
from ipc.gates import Gatekeeper, Permit, Rejected

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("gateway.proxy")
access_log = logging.getLogger("gateway.access")

_JSON_HEADERS: Final = [(b"content-type", b"application/json")]
OVERLOAD_SCOPE_HEADER: Final = "x-gateway-overloaded-scope"
GLOBAL_CAP_MESSAGE: Final = "Server is at capacity. Retry shortly."
CREDENTIAL_CAP_MESSAGE: Final = (
    "Too many concurrent requests against this credential (cap: {cap}). Retry shortly."
)


class ClientGone(Exception):
    """The client disconnected before the request body was read."""


class ProxyRuntime:
    """What the proxy needs from its worker, filled in by the lifespan."""

    credentials: CredentialCache
    gatekeeper: Gatekeeper
    upstream: Upstream
    metrics: RequestTally | None = None  # None: the launcher's metrics endpoint is off


class Proxy:
    def __init__(
        self,
        runtime: ProxyRuntime,
        *,
        upstream_base: str,
        max_body: int,
        retry_after: int,
        read_timeout: float,
    ) -> None:
        self.runtime = runtime
        self.upstream_base = upstream_base
        self.max_body = max_body
        self.retry_after = str(retry_after)
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        path = raw_path.decode("latin-1")
        headers = scope["headers"]
        user_id = None
        try:
            url = upstream_url(self.upstream_base, raw_path, scope.get("query_string", b""))
            token = gateway_token(headers)
            if token is None:
                raise AuthenticationFailed(
                    "Missing gateway token: send it as x-api-key or Authorization: Bearer."
                )
            credential = await self.runtime.credentials.resolve(token)
            user_id = credential.user_id
            body = await self._read_body(receive, headers)
            try:
                # Built before admission: nothing between the admit and the relay can raise.
                request = self.runtime.upstream.request(
                    method,
                    url,
                    headers=upstream_request_headers(headers, api_key=credential.api_key),
                    body=body,
                )
            except httpx.InvalidURL as exc:
                raise InvalidRequest(f"The request path is not a valid URL path: {exc}") from None
            try:
                admitted = self.runtime.gatekeeper.admit(credential.gate)
            except LedgerFull:
                log.error("this worker's ledger is full; refusing a request")
                if self.runtime.metrics is not None:
                    self.runtime.metrics.rejected("worker", str(user_id))
                raise Overloaded(
                    GLOBAL_CAP_MESSAGE, headers=self._retry_headers("worker")
                ) from None
            if isinstance(admitted, Rejected):
                raise self._overloaded(admitted, user_id=str(user_id), path=path)
        except ClientGone:
            self._answered("client_disconnected", CLIENT_CLOSED_STATUS)
            _access(method, path, user_id, 0, started, 0, "client_disconnected")
            return
        except GatewayError as err:
            await _send_error(send, err)
            self._answered(err.outcome, err.status)
            _access(method, path, user_id, err.status, started, 0, err.outcome)
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
            user_id=str(user_id),
            started=started,
        )
        # An agent's request body is its whole context (often hundreds of KiB); held here
        # it would live as long as the stream. The relay drops it once it is sent.
        del request, body
        await relay

    async def _read_body(self, receive: Receive, headers: list[tuple[bytes, bytes]]) -> bytes:
        for name, value in headers:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                raise self._too_large()
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

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
        user_id: str,
        started: float,
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

        watcher = asyncio.create_task(watch_disconnect())
        response: httpx.Response | None = None
        status = 0
        tally = _Tally()
        # Replaced by how the relay ended; stays only if something unforeseen escapes.
        outcome = "internal_error"
        sse = False
        headers_at = 0.0
        sent_at = time.perf_counter()
        try:
            try:
                response = await self.runtime.upstream.send(request)
                headers_at = time.perf_counter()
                del request  # sent: the body is not kept for the life of the stream
            except httpx.TimeoutException as exc:
                raise UpstreamTimeout(
                    f"The upstream did not answer within {self.read_timeout:g} s."
                ) from exc
            except httpx.HTTPError as exc:
                raise UpstreamUnavailable(
                    f"The upstream is unreachable ({type(exc).__name__})."
                ) from exc
            status = response.status_code
            headers = client_response_headers(response.headers.raw)
            sse = response.headers.get("content-type", "").startswith("text/event-stream")
            length = None if sse else _declared_length(response, method)
            if length is not None:
                headers.append((b"content-length", b"%d" % length))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            # Each relay ends the response itself and gives the slot back just before the
            # client can see that end, so a client that sends its next request the moment
            # this one ends is never refused by its own finished stream.
            if sse:
                outcome = await _relay_sse(response, send, tally, permit)
            else:
                outcome = await _relay_raw(response, send, tally, permit, length)
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
            metrics = self.runtime.metrics
            if metrics is not None:
                metrics.relayed(
                    outcome,
                    # No status was sent: the client left first (nginx's 499), or something
                    # unforeseen escaped, which the server answers with a 500.
                    status or (CLIENT_CLOSED_STATUS if outcome == "client_disconnected" else 500),
                    streamed=sse,
                    sent_at=sent_at,
                    headers_at=headers_at,
                    ended=time.perf_counter(),
                )
            if response is not None:
                # Shielded: a second cancel must not leave the upstream connection open.
                await asyncio.shield(response.aclose())
            _access(method, path, user_id, status, started, tally.sent, outcome)


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


async def _end(send: Send, permit: Permit, last: bytes = b"") -> None:
    permit.release()
    await send({"type": "http.response.body", "body": last, "more_body": False})


async def _relay_raw(
    response: httpx.Response, send: Send, tally: _Tally, permit: Permit, length: int | None
) -> str:
    try:
        async for chunk in _body(response):
            tally.sent += len(chunk)
            if tally.sent == length:
                await _end(send, permit, chunk)  # the declared body is whole: end with it
                return "ok"
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except httpx.HTTPError as exc:
        # No end is sent: the server then closes the connection, and the client knows the
        # body is incomplete (a clean end would pass a truncated body off as whole).
        log.warning("upstream body failed after %d bytes: %s", tally.sent, type(exc).__name__)
        return _failure_outcome(exc)
    await _end(send, permit)
    return "ok"


async def _relay_sse(response: httpx.Response, send: Send, tally: _Tally, permit: Permit) -> str:
    """Relay events as they arrive; on an upstream failure end with an ``event: error``.

    Bytes go out unchanged and in order; only a trailing partial event of a chunk waits
    for the rest of it, so that a failure mid-event can end the stream on an event
    boundary with a well-formed error event instead of a truncated one.
    """
    pending = b""
    try:
        async for chunk in _body(response):
            data = pending + chunk if pending else chunk
            cut = data.rfind(b"\n\n") + 2
            if cut == 1:  # no complete event yet
                pending = data
                continue
            pending = data[cut:]
            tally.sent += cut
            await send({"type": "http.response.body", "body": data[:cut], "more_body": True})
    except httpx.HTTPError as exc:
        log.warning("upstream stream failed after %d bytes: %s", tally.sent, type(exc).__name__)
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
    if pending:
        tally.sent += len(pending)
    await _end(send, permit, pending)
    return "ok"


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
) -> None:
    if access_log.isEnabledFor(logging.INFO):
        access_log.info(
            "proxied",
            extra={
                "user_id": None if user_id is None else str(user_id),
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                "bytes": sent,
                "outcome": outcome,
            },
        )
