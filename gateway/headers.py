"""Which headers cross the gateway, in each direction. Pure functions over raw ASGI headers."""

from __future__ import annotations

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


def upstream_request_headers(client_headers: RawHeaders, *, api_key: str) -> list[tuple[str, str]]:
    """The allow-listed client headers plus the user's own Anthropic key."""
    out = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in client_headers
        if name.lower() in REQUEST_ALLOW
    ]
    out.append(("x-api-key", api_key))
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
