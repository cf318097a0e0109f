"""The fake upstream's pure parts: its control parameters, Anthropic's wire format, its ledger.

The ledger is the ground truth the gateway's concurrency caps are judged by, so every
count that goes up in ``Ledger.enter`` goes down exactly once in ``Ledger.leave``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Final, Literal

import msgspec

MAX_BODY: Final = 64 * 1024 * 1024

Seconds = Annotated[float, msgspec.Meta(ge=0, le=3600)]


class Behaviour(msgspec.Struct, frozen=True, kw_only=True):
    events: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 5
    delay: Seconds = 0.0
    eager: bool = False
    first_delay: Seconds = 0.0
    stall_before_headers: Seconds = 0.0
    stall: Seconds = 0.0
    status: Annotated[int, msgspec.Meta(ge=400, le=599)] | None = None
    retry_after: Seconds | None = None
    cut_after: Annotated[int, msgspec.Meta(ge=0)] | None = None
    redirect: str | None = None
    set_cookie: bool = False
    body_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_BODY)] = 0
    fail_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    cut_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    input_tokens: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] | None = None
    cache_creation: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 0
    cache_read: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 0


BEHAVIOUR_HELP: Final = {
    "events": "text deltas in a stream; words in a non-streamed message",
    "delay": "seconds to pause before each text delta (a stream lasts about events x delay)",
    "eager": "1 sends the first text delta with message_start, at once; delay paces the rest",
    "first_delay": "seconds to pause before the response headers",
    "stall_before_headers": "the same pause as first_delay, named for a stalled upstream",
    "stall": "seconds to stall after the headers and the first event "
    "(non-streamed: after the headers, before the body)",
    "status": "answer with this status (400-599) and an Anthropic error envelope",
    "retry_after": "add retry-after: S and x-should-retry: true",
    "cut_after": "send K events (non-streamed: K bytes of the body, never all of it), "
    "then drop the TCP connection without ending the body",
    "redirect": "answer 307 with this location",
    "set_cookie": "1 adds a set-cookie header",
    "body_bytes": "pad a non-streamed message with a padding field to about N bytes",
    "fail_rate": "answer this share (0..1) of requests, at random, with a 500 error",
    "cut_rate": "cut this share (0..1) of answers, at random, as cut_after=2 would",
    "input_tokens": "the usage's input_tokens (default: the request body's length / 4)",
    "cache_creation": "the usage's cache_creation_input_tokens",
    "cache_read": "the usage's cache_read_input_tokens",
}
_BEHAVIOUR_FIELDS: Final = frozenset(Behaviour.__struct_fields__)


def behaviour_from_query(query: Mapping[str, str], defaults: Behaviour) -> Behaviour:
    """Lay the known control parameters over ``defaults``; unknown ones (``beta``) pass.

    Raises ``msgspec.ValidationError`` naming the parameter when a value is unusable.
    """
    given = {name: value for name, value in query.items() if name in _BEHAVIOUR_FIELDS}
    if not given:
        return defaults
    return msgspec.convert(msgspec.structs.asdict(defaults) | given, Behaviour, strict=False)


# Anthropic's wire format ---------------------------------------------------------------

ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
RATE_LIMIT_HEADERS: Final = {
    "anthropic-ratelimit-requests-limit": "4000",
    "anthropic-ratelimit-requests-remaining": "3999",
    "anthropic-ratelimit-tokens-limit": "400000",
    "anthropic-ratelimit-tokens-remaining": "399000",
}
MODELS: Final = tuple(
    {"type": "model", "id": model_id, "display_name": name, "created_at": created}
    for model_id, name, created in (
        ("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
        ("claude-sonnet-4-20250514", "Claude Sonnet 4", "2025-05-22T00:00:00Z"),
        ("claude-3-7-sonnet-20250219", "Claude Sonnet 3.7", "2025-02-24T00:00:00Z"),
        ("claude-3-5-haiku-20241022", "Claude Haiku 3.5", "2024-10-22T00:00:00Z"),
    )
)
WORDS: Final = ("Hello", "from", "the", "fake", "upstream.")


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def error_envelope(status: int, message: str) -> dict[str, object]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def sse_frame(event: str, data: object) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


def text_of(events: int) -> str:
    return "".join(f"{WORDS[i % len(WORDS)]} " for i in range(events))


_DELTA_FRAMES: Final = tuple(
    sse_frame(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}},
    )
    for w in (f"{word} " for word in WORDS)
)
_BLOCK_START: Final = sse_frame(
    "content_block_start",
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
)
_PING: Final = sse_frame("ping", {"type": "ping"})
_BLOCK_STOP: Final = sse_frame("content_block_stop", {"type": "content_block_stop", "index": 0})
_MESSAGE_STOP: Final = sse_frame("message_stop", {"type": "message_stop"})
FRAMES_BEFORE_DELTAS: Final = 3  # message_start, content_block_start, ping
FRAMES_AFTER_DELTAS: Final = 3  # content_block_stop, message_delta, message_stop


def usage_of(
    *, input_tokens: int, output_tokens: int, cache_creation: int = 0, cache_read: int = 0
) -> dict[str, int]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_creation,
        "cache_read_input_tokens": cache_read,
        "output_tokens": output_tokens,
    }


def stream_frames(
    *,
    msg_id: str,
    model: str,
    input_tokens: int,
    events: int,
    cache_creation: int = 0,
    cache_read: int = 0,
) -> list[bytes]:
    """The whole event sequence of one streamed message, in order.

    Usage as Anthropic reports it: ``message_start`` with the input side and one output
    token, the closing ``message_delta`` cumulative (input side again, output = events).
    """
    cache = {"cache_creation": cache_creation, "cache_read": cache_read}
    start: dict[str, object] = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage_of(input_tokens=input_tokens, output_tokens=1, **cache),
    }
    end = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": usage_of(input_tokens=input_tokens, output_tokens=events, **cache),
    }
    return [
        sse_frame("message_start", {"type": "message_start", "message": start}),
        _BLOCK_START,
        _PING,
        *(_DELTA_FRAMES[i % len(WORDS)] for i in range(events)),
        _BLOCK_STOP,
        sse_frame("message_delta", end),
        _MESSAGE_STOP,
    ]


def message_body(
    *,
    msg_id: str,
    model: str,
    input_tokens: int,
    events: int,
    body_bytes: int,
    cache_creation: int = 0,
    cache_read: int = 0,
) -> bytes:
    message: dict[str, object] = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text_of(events)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage_of(
            input_tokens=input_tokens,
            output_tokens=events,
            cache_creation=cache_creation,
            cache_read=cache_read,
        ),
    }
    body = msgspec.json.encode(message)
    padding = body_bytes - len(body) - len(b',"padding":""')
    if padding > 0:
        message["padding"] = "x" * padding
        body = msgspec.json.encode(message)
    return body


def models_page(query: Mapping[str, str]) -> dict[str, object]:
    ids = [m["id"] for m in MODELS]
    start, stop = 0, len(MODELS)
    if (after := query.get("after_id")) in ids:
        start = ids.index(after) + 1
    if (before := query.get("before_id")) in ids:
        stop = ids.index(before)
    limit_text = query.get("limit", "")
    limit = min(max(int(limit_text), 1), 1000) if limit_text.isdigit() else 20
    page = MODELS[start:stop][:limit]
    return {
        "data": page,
        "has_more": start + len(page) < stop,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }


class MessagesRequest(msgspec.Struct):
    model: str = "claude-fake"
    stream: bool = False


def upstream_key(headers: Mapping[str, str]) -> str | None:
    """The key the caller sent: ``x-api-key``, or a bearer token as newer SDKs send it."""
    key = headers.get("x-api-key")
    if key is None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return key


def new_id(prefix: str) -> str:
    return f"{prefix}_{random.getrandbits(96):024x}"


# The ledger of what it saw ----------------------------------------------------------

# "failed" is a bug in the fake itself (aiohttp answers 500); the others are on purpose.
Outcome = Literal["in_flight", "complete", "closed_early", "cut", "failed"]


class Counters(msgspec.Struct, kw_only=True):
    in_flight: int = 0
    max_in_flight: int = 0
    total: int = 0
    closed_early: int = 0

    def enter(self) -> None:
        self.in_flight += 1
        self.total += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight

    def leave(self, outcome: Outcome) -> None:
        self.in_flight -= 1
        if outcome == "closed_early":
            self.closed_early += 1

    def restart(self) -> None:
        self.max_in_flight = self.in_flight
        self.total = 0
        self.closed_early = 0


class Seen(msgspec.Struct, kw_only=True):
    """One request as it arrived (raw path and query, lower-cased headers) and how it ended."""

    method: str
    path: str
    query: str
    key: str | None
    headers: dict[str, str]
    status: int | None = None
    outcome: Outcome = "in_flight"


class Ledger:
    def __init__(self, *, history: int = 200) -> None:
        self.all = Counters()
        self.keys: dict[str, Counters] = {}
        self.cut = 0
        self.recent: deque[Seen] = deque(maxlen=history)

    def enter(self, seen: Seen) -> None:
        self.all.enter()
        if seen.key is not None:
            counters = self.keys.get(seen.key)
            if counters is None:
                counters = self.keys[seen.key] = Counters()
            counters.enter()
        self.recent.append(seen)

    def leave(self, seen: Seen, outcome: Outcome) -> None:
        seen.outcome = outcome
        self.all.leave(outcome)
        if seen.key is not None:
            # reset() keeps every key with a request in flight, so the key is still here.
            self.keys[seen.key].leave(outcome)
        if outcome == "cut":
            self.cut += 1

    def reset(self) -> None:
        """Zero the totals; the most in flight restarts from what is in flight now."""
        self.all.restart()
        self.keys = {key: c for key, c in self.keys.items() if c.in_flight > 0}
        for counters in self.keys.values():
            counters.restart()
        self.cut = 0
        self.recent.clear()

    def snapshot(self) -> dict[str, Any]:
        return {
            "in_flight": self.all.in_flight,
            "max_in_flight": self.all.max_in_flight,
            "total": self.all.total,
            "closed_early": self.all.closed_early,
            "cut": self.cut,
            "keys": self.keys,
            "recent": list(self.recent),
        }


def lowered_headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Header names lower-cased; a repeated header's values joined with ", " as HTTP allows."""
    headers: dict[str, str] = {}
    for name, value in items:
        name = name.lower()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers
