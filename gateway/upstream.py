"""The worker's one upstream client: no cookie jar, no redirects, a read-idle timeout."""

from __future__ import annotations

from http.cookiejar import CookieJar, DefaultCookiePolicy

import aiohttp
import httpx

from gateway.aiohttp_transport import AiohttpTransport
from gateway.settings import Settings


def _no_cookies() -> CookieJar:
    # The real API sits behind a CDN that sets cookies; a shared client must never
    # replay one user's cookies on another user's request.
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def make_upstream_client(settings: Settings) -> httpx.AsyncClient:
    """Build inside the worker's event loop (aiohttp binds its session to the loop)."""
    timeout = httpx.Timeout(
        connect=settings.upstream_connect_timeout,
        read=settings.upstream_read_timeout,
        write=settings.upstream_read_timeout,
        pool=settings.upstream_connect_timeout,
    )
    transport: httpx.AsyncBaseTransport
    if settings.upstream_transport == "aiohttp":
        session = aiohttp.ClientSession(
            # limit=0: no connection cap here; the gates are the caps, and aiohttp's
            # default of 100 would queue long streams silently.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            cookie_jar=aiohttp.DummyCookieJar(),
            # Forward the client's own accept-encoding and user-agent, or none.
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Accept", "Content-Type"),
            auto_decompress=False,
        )
        transport = AiohttpTransport(session)
    else:
        transport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=1000)
        )
    client = httpx.AsyncClient(
        transport=transport,
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        cookies=_no_cookies(),
    )
    # httpx adds Accept, Accept-Encoding, Connection and User-Agent to every request;
    # we forward only what the client sent.
    for name in list(client.headers):
        del client.headers[name]
    return client
