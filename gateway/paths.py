"""The upstream request target of a proxied request: raw path and query kept verbatim,
traversal refused."""

from __future__ import annotations

from urllib.parse import unquote

from gateway.errors import InvalidRequest


def _fully_unquoted(text: str) -> str:
    # Decode until stable, so a double-encoded %252e%252e is seen as the '..' it becomes
    # in any layer that decodes twice.
    for _ in range(4):
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    return text


def has_traversal(raw_path: bytes) -> bool:
    """A ``..`` segment, raw or percent-encoded (also hidden behind %2F or a backslash)."""
    if b"." not in raw_path and b"%" not in raw_path:
        return False  # the common case, decided without decoding
    decoded = _fully_unquoted(raw_path.decode("latin-1")).replace("\\", "/")
    return any(segment == ".." for segment in decoded.split("/"))


def upstream_target(raw_path: bytes, query_string: bytes) -> bytes:
    """The client's path exactly as sent (not percent-decoded, ``.`` segments and empty
    ones kept) and its query: the request target the upstream receives."""
    if has_traversal(raw_path):
        raise InvalidRequest("path traversal ('..' segment) is not allowed in the request path")
    target = raw_path + b"?" + query_string if query_string else raw_path
    if not target.isascii():
        # The server passes such bytes on raw; sent on, they would be rewritten or refused
        # depending on the transport. Refused here, the same for every transport.
        raise InvalidRequest(
            "the request path and query must be ASCII: percent-encode any other byte"
        )
    return target
