"""An httpx transport over aiohttp's client: httpx's API, aiohttp's speed.

httpx's default transport is slow at high concurrency (a bare pass-through held 250
streams at our SLO where aiohttp held 1,000). The ``httpx-aiohttp`` package does the
same job but hands aiohttp the URL as a string, and yarl then decodes the query
(``x=%2F`` becomes ``x=/``): a gateway must forward the path and query verbatim, so this
small transport passes the URL pre-encoded (with the request's ``target`` extension as its
path and query, as httpcore honours it) and maps aiohttp's errors to httpx's.

aiohttp writes header values as text, encoded as UTF-8: a value that is valid UTF-8 goes
out byte for byte; one that is not is re-encoded (read as Latin-1), which the h1 and httpx
transports never do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
import httpx
from yarl import URL


@contextmanager
def _mapped_errors() -> Iterator[None]:
    """aiohttp's errors, translated once into httpx's tree where they enter."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timed out") from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out") from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc)) from exc
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
        raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
    except aiohttp.ClientError as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
    except ValueError as exc:
        # aiohttp's own refusal to write a request (a control byte in a header value).
        raise httpx.LocalProtocolError(str(exc)) from exc


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped_errors():
            # iter_any: whatever has arrived, at once; SSE events are not held back.
            async for chunk in self._response.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # back to the pool
        else:
            self._response.close()  # half-read: the connection cannot be reused


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        url = request.url
        target: bytes = request.extensions.get("target", url.raw_path)
        with _mapped_errors():
            response = await self._session.request(
                request.method,
                URL(
                    f"{url.scheme}://{url.netloc.decode('ascii')}{target.decode('ascii')}",
                    encoded=True,
                ),
                # Each value decoded on its own: httpx's multi_items() decodes them all
                # with one encoding, Latin-1 for all as soon as one is not UTF-8.
                headers=[(_text(name), _text(value)) for name, value in request.headers.raw],
                data=request.content or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            )
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response),
            # No request=: as httpx's own transports, so the response does not keep the
            # request body alive for as long as the stream lasts (the client sets it).
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        await self._session.close()
