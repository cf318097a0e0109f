"""How a load generator judges the gateway's answers: a 429's shape, SSE frames, back-off.

Pure functions without Locust, so that the rules are unit-tested in any process and shared
by the locustfile and the capacity check.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Final

OVERLOADED_TYPE: Final = "overloaded_error"
SCOPE_HEADER: Final = "x-gateway-overloaded-scope"


def overload_problem(headers: Mapping[str, str], body: bytes) -> str | None:
    """What is wrong with a 429, or None for a well-formed Anthropic ``overloaded_error``.

    ``headers`` have lower-case names. Well-formed means a ``retry-after`` of a
    non-negative number of seconds and the body
    ``{"type": "error", "error": {"type": "overloaded_error", "message": "..."}}``.
    """
    retry_after = headers.get("retry-after")
    if retry_after is None:
        return "no retry-after header"
    if retry_after_seconds(retry_after) is None:
        return f"retry-after is not a number of seconds: {retry_after[:40]!r}"
    try:
        data = json.loads(body)
    except ValueError:
        return f"body is not JSON: {body[:80]!r}"
    if not isinstance(data, dict) or data.get("type") != "error":
        return f'body is not an Anthropic error envelope ("type": "error"): {body[:80]!r}'
    error = data.get("error")
    if not isinstance(error, dict):
        return "body has no error object"
    if error.get("type") != OVERLOADED_TYPE:
        return f"error.type is {error.get('type')!r}, not {OVERLOADED_TYPE!r}"
    message = error.get("message")
    if not isinstance(message, str) or not message:
        return "error.message is missing or empty"
    return None


def retry_after_seconds(value: str) -> float | None:
    """``retry-after`` as seconds; None unless it is a finite number >= 0 (dates unsupported)."""
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def retry_wait(retry_after: str | None, *, longest: float, jitter: float) -> float:
    """Seconds to back off after a 429: ``retry-after`` scaled by ``jitter``, at most ``longest``.

    ``jitter`` in [0.5, 1] spreads the retries of many clients rejected at the same moment.
    """
    seconds = retry_after_seconds(retry_after) if retry_after is not None else None
    return min(seconds if seconds is not None else 1.0, longest) * jitter


def sse_event(frame: bytes) -> tuple[str, bytes]:
    """The event name and data of one SSE frame (``event:`` defaults to ``message``)."""
    name = "message"
    data: list[bytes] = []
    for line in frame.splitlines():
        field, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if field == b"event":
            name = value.decode("utf-8", "replace")
        elif field == b"data":
            data.append(value)
    return name, b"\n".join(data)


def stream_problem(*, first: str | None, last: str | None, error: bytes | None) -> str | None:
    """What is wrong with a finished Anthropic stream, from its first and last event names."""
    if error is not None:
        return f"stream carried an error event: {error[:160]!r}"
    if first is None:
        return "stream ended before any event"
    if first != "message_start":
        return f"stream began with {first!r}, not 'message_start'"
    if last != "message_stop":
        return f"stream ended with {last!r}, not 'message_stop'"
    return None
