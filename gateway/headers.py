"""Which headers cross the gateway, in each direction. Pure functions over raw ASGI headers."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

RawHeaders = Iterable[tuple[bytes, bytes]]

# What an Anthropic client legitimately sends. Everything else (authorization, cookie,
# x-forwarded-*, the client's own x-api-key, hop-by-hop headers) stays here.
REQUEST_ALLOW: Final = frozenset(
    {
        b"accept",
        b"accept-encoding",
        b"anthropic-version",
        b"anthropic-beta",
        b"anthropic-dangerous-direct-browser-access",
        b"content-type",
        b"user-agent",
        # The SDKs' retry bookkeeping; harmless and useful in upstream logs.
        b"x-stainless-retry-count",
    }
)

RESPONSE_ALLOW: Final = frozenset(
    {
        b"content-type",
        b"content-encoding",
        b"cache-control",
        b"request-id",
        b"retry-after",
        b"x-should-retry",
    }
)


# An Anthropic key goes out as a header value: visible ASCII only, so that no transport
# refuses it and none can be made to write a second header line with it.
_SENDABLE_KEY: Final = re.compile(r"[!-~]+")


def is_sendable_key(key: str) -> bool:
    """Whether ``key`` is visible ASCII (0x21..0x7E), all a key ever holds."""
    return _SENDABLE_KEY.fullmatch(key) is not None


def upstream_request_headers(
    client_headers: RawHeaders, *, api_key: str
) -> list[tuple[bytes, bytes]]:
    """The allow-listed client headers, as raw as they came, plus the user's own key.

    Raw bytes: a value outside ASCII (``User-Agent: \u2713 client`` in UTF-8) goes upstream
    unchanged instead of failing to encode.
    """
    out = [(name, value) for name, value in client_headers if name.lower() in REQUEST_ALLOW]
    out.append((b"x-api-key", api_key.encode()))
    return out


def client_response_headers(upstream_headers: RawHeaders) -> list[tuple[bytes, bytes]]:
    """Allow-listed upstream response headers: content, request id, retry hints, anthropic-*."""
    out = []
    for name, value in upstream_headers:
        lower = name.lower()
        if lower in RESPONSE_ALLOW or lower.startswith(b"anthropic-"):
            out.append((lower, value))
    return out


def gateway_token(client_headers: RawHeaders) -> str | None:
    """The gateway token from ``x-api-key`` or ``Authorization: Bearer``."""
    bearer = None
    for name, value in client_headers:
        lower = name.lower()
        if lower == b"x-api-key":
            token = value.decode("latin-1").strip()
            if token:
                return token
        elif lower == b"authorization":
            scheme, _, rest = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                bearer = rest.strip()
    return bearer
