"""The worker's one upstream connection pool: no cookie jar, no redirects, an idle timeout.

Requests go straight to an httpx transport. ``httpx.AsyncClient`` would add redirect,
auth and cookie handling on every request: the gateway wants none of them (a shared
client must never replay one user's cookies on another's request, and redirects are
never followed), and skipping that layer saves about a tenth of the proxy's CPU.

Three transports, chosen by ``GATEWAY_UPSTREAM_TRANSPORT``: ``h1`` (the default, our lean
HTTP/1.1 transport), ``aiohttp`` (httpx's API over aiohttp's client) and ``httpx``
(httpx's own). ``python -m loadtests.benchmark --only json --transport h1 --transport aiohttp``
measures them side by side.

The request target (the client's path and query) rides in the request's ``target``
extension, exactly as the client sent it, and every transport sends it as it is: the h1
and aiohttp transports read it themselves, httpx's passes it to httpcore, which honours the
same extension. ``httpx.URL`` would normalise it (``/v1/./x`` to ``/v1/x``), so the URL of
every request is only the upstream base, parsed once.
"""

from __future__ import annotations

from typing import Any, Final

import httpx

from gateway.h1_transport import H1Transport
from gateway.settings import Settings

KEEPALIVE_EXPIRY = 30.0


def build_transport(kind: str) -> httpx.AsyncBaseTransport:
    """Build inside the worker's event loop (aiohttp binds its session to the loop)."""
    if kind == "h1":
        return H1Transport(keepalive_expiry=KEEPALIVE_EXPIRY)
    if kind == "aiohttp":
        # Imported only when chosen: aiohttp costs each worker about 10 MB of imports.
        import aiohttp

        from gateway.aiohttp_transport import AiohttpTransport

        session = aiohttp.ClientSession(
            # limit=0: no connection cap here; the gates are the caps, and aiohttp's
            # default of 100 would queue long streams silently.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_EXPIRY),
            # The real API sits behind a CDN that sets cookies: keep none.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Forward only what the client sent, and nothing aiohttp would add.
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Accept", "Content-Type"),
            auto_decompress=False,
        )
        return AiohttpTransport(session)
    return httpx.AsyncHTTPTransport(
        limits=httpx.Limits(
            max_connections=None,
            max_keepalive_connections=1000,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        )
    )


_EMPTY_BODY_LENGTH: Final = frozenset({"POST", "PUT", "PATCH"})


class PreparedRequest(httpx.Request):
    """What ``httpx.Request(method, url, headers=..., content=body)`` builds, built directly.

    ``httpx.Request.__init__`` costs a proxied request ~7-13 µs of worker CPU (a URL copy,
    header normalising, ``encode_request``, ``_prepare`` rebuilding the headers twice);
    the gateway's headers are already bytes. The same object comes out: ``Host`` first,
    the headers in order, ``Content-Length`` last for a body (or ``0`` right after ``Host``
    for an empty POST/PUT/PATCH), a ``ByteStream`` of the body, read. A test holds it
    equal to ``httpx.Request`` over methods, bodies and headers, so an httpx upgrade that
    changes either side fails there, not on the wire.
    """

    def __init__(
        self,
        method: str,
        url: httpx.URL,
        host: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        extensions: dict[str, Any],
    ) -> None:
        method = method.upper()
        self.method = method
        self.url = url
        listed = [(b"Host", b"host", host)]
        if body:
            listed += [(name, name.lower(), value) for name, value in headers]
            listed.append((b"Content-Length", b"content-length", b"%d" % len(body)))
        else:
            if method in _EMPTY_BODY_LENGTH:
                listed.append((b"Content-Length", b"content-length", b"0"))
            listed += [(name, name.lower(), value) for name, value in headers]
        prepared = httpx.Headers.__new__(httpx.Headers)
        prepared._list = listed
        prepared._encoding = None
        self.headers = prepared
        self.extensions = extensions
        self.stream = httpx.ByteStream(body)
        self._content = body


class Upstream:
    def __init__(self, settings: Settings) -> None:
        self._timeout = httpx.Timeout(
            connect=settings.upstream_connect_timeout,
            read=settings.upstream_read_timeout,
            write=settings.upstream_read_timeout,
            pool=settings.upstream_connect_timeout,
        ).as_dict()
        self.transport = build_transport(settings.upstream_transport)
        self.base = httpx.URL(settings.upstream_url)
        # A base URL with a path (a relay at https://relay/anthropic) prefixes every target.
        self._prefix = self.base.raw_path.partition(b"?")[0].rstrip(b"/")
        self._host = self.base.netloc

    def request(
        self, method: str, target: bytes, *, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> httpx.Request:
        """``target``: the path and query as the client sent them, sent on unchanged."""
        return PreparedRequest(
            method,
            self.base,
            self._host,
            headers,
            body,
            {"timeout": self._timeout, "target": self._prefix + target},
        )

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Headers in; the body streams from the returned response until it is closed."""
        return await self.transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self.transport.aclose()
