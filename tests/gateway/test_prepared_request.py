"""The upstream request built directly is the one httpx.Request would build."""

from __future__ import annotations

import httpx
import pytest

from gateway.upstream import PreparedRequest

HEADERS = [
    [],
    [(b"content-type", b"application/json"), (b"x-api-key", b"sk-ant-test-k")],
    [(b"User-Agent", b"\xe2\x9c\x93 client"), (b"Accept", b"*/*"), (b"accept", b"text/plain")],
]


@pytest.mark.parametrize("url", ["http://127.0.0.1:9999", "https://relay.example:8443/anthropic"])
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "post"])
@pytest.mark.parametrize("body", [b"", b"{}", b"x" * 70_000])
@pytest.mark.parametrize("headers", HEADERS)
def test_same_as_httpx(
    url: str, method: str, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    base = httpx.URL(url)
    extensions = {"timeout": {"read": 1.0}, "target": b"/v1/messages?beta=true"}
    expected = httpx.Request(method, base, headers=headers, content=body, extensions=extensions)
    made = PreparedRequest(method, base, base.netloc, headers, body, extensions)
    assert made.method == expected.method
    assert made.url == expected.url
    assert made.headers.raw == expected.headers.raw
    assert list(made.headers.multi_items()) == list(expected.headers.multi_items())
    assert made.headers.get("content-length") == expected.headers.get("content-length")
    assert made.content == expected.content == body
    assert type(made.stream) is type(expected.stream)
    assert made.extensions == expected.extensions
