"""Reading token usage out of a response the relay already forwarded: SSE events or JSON.

Streamed: ``message_start`` names the model and the usage so far, each ``message_delta``
carries a cumulative ``usage`` (the latest value of each field wins, never a sum). Only
events of those two types are decoded, into small Structs; the relay hands over whole
events it already cut on their boundaries, after it sent them. Non-streamed: the body's
``model`` and ``usage``.
"""

from __future__ import annotations

from typing import Final

import msgspec

_START: Final = b"message_start"
_DELTA: Final = b"message_delta"
_BOTH: Final[tuple[bytes, ...]] = (_START, _DELTA)
_DELTA_ONLY: Final[tuple[bytes, ...]] = (_DELTA,)
# The largest non-streamed body read for its usage; a bigger one counts as a request only.
MAX_METERED_BODY: Final = 8 * 1024 * 1024


class Usage(msgspec.Struct, frozen=True):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Message(msgspec.Struct, frozen=True):
    model: str = ""
    usage: Usage | None = None


class _MessageStart(msgspec.Struct, frozen=True):
    message: _Message


class _MessageDelta(msgspec.Struct, frozen=True):
    usage: Usage | None = None


_decode_start = msgspec.json.Decoder(_MessageStart).decode
_decode_delta = msgspec.json.Decoder(_MessageDelta).decode
_decode_message = msgspec.json.Decoder(_Message).decode


class Meter:
    """What one response reported: the model and the latest value of each token count."""

    __slots__ = (
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "input_tokens",
        "model",
        "output_tokens",
        "started",
    )

    def __init__(self) -> None:
        self.model = ""
        self.input_tokens = 0
        self.output_tokens = 0
        self.cache_creation_input_tokens = 0
        self.cache_read_input_tokens = 0
        self.started = False  # a message_start was read: a stream has one, first

    def events(self, data: bytes) -> None:
        """Whole SSE events, as relayed; only ``message_start``/``message_delta`` decoded.

        A substring search decides for most chunks (text deltas) that there is nothing to
        read (two until the stream's ``message_start`` was read); an event that only
        mentions those names in its text is looked into and skipped.
        """
        if self.started:
            if _DELTA not in data:
                return
            markers = _DELTA_ONLY
        elif _START in data or _DELTA in data:
            markers = _BOTH
        else:
            return
        found = _events(data) if b"\r" in data else _lf_events(data, markers)
        for kind, payload in found:
            self._event(kind, payload)

    def body(self, data: bytes) -> None:
        """A whole non-streamed ``/v1/messages`` JSON body."""
        try:
            message = _decode_message(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        self.model = message.model
        if message.usage is not None:
            self._usage(message.usage)

    def _event(self, kind: bytes, payload: bytes) -> None:
        try:
            if kind == _START:
                start = _decode_start(payload)
                self.started = True
                self.model = start.message.model
                usage = start.message.usage
            else:
                usage = _decode_delta(payload).usage
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if usage is not None:
            self._usage(usage)

    def _usage(self, usage: Usage) -> None:
        # Cumulative: a field present replaces what was seen; an absent one keeps it.
        if usage.input_tokens is not None:
            self.input_tokens = usage.input_tokens
        if usage.output_tokens is not None:
            self.output_tokens = usage.output_tokens
        if usage.cache_creation_input_tokens is not None:
            self.cache_creation_input_tokens = usage.cache_creation_input_tokens
        if usage.cache_read_input_tokens is not None:
            self.cache_read_input_tokens = usage.cache_read_input_tokens


def _lf_events(data: bytes, markers: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    """``_events`` for the usual stream, whose lines all end in LF: each mention of one of
    ``markers`` is looked into, between the blank lines around it (a few C-level
    searches, however many other events the chunk holds); one message_start at most."""
    found: list[tuple[int, bytes, bytes]] = []
    for marker in markers:
        at = data.find(marker)
        while at >= 0:
            end = data.find(b"\n\n", at)
            if end < 0:
                break  # not ended by a blank line
            begin = data.rfind(b"\n\n", 0, at) + 2
            if begin < 2:
                begin = 0
            event = _framed_as_anthropic(data, begin, end) or _event_of(
                data[begin:end].split(b"\n")
            )
            if event is not None:
                found.append((begin, *event))
                if marker is _START:
                    break
            at = data.find(marker, end)
    if len(found) > 1:
        found.sort()  # in stream order: the latest value wins
    return [(kind, payload) for _, kind, payload in found]


def _events(data: bytes) -> list[tuple[bytes, bytes]]:
    """The ``message_start``/``message_delta`` events in ``data``: (type, data field).

    SSE's rules: lines end in CRLF, LF or CR; a blank line ends an event; ``event:`` names
    its type, ``data:`` lines join with LF; one space after the colon is dropped. An event
    not ended by a blank line within ``data`` is left out (the relay only hands over
    whole events; the tail of a stream cut mid-event is incomplete).
    """
    found: list[tuple[bytes, bytes]] = []
    lines: list[bytes] = []
    for line in data.splitlines(keepends=True):
        if line in (b"\n", b"\r", b"\r\n"):
            event = _event_of(lines)
            if event is not None:
                found.append(event)
            lines = []
        else:
            lines.append(line.rstrip(b"\r\n"))
    return found


_FRAMES: Final = (b"event: message_start\ndata: ", b"event: message_delta\ndata: ")


def _framed_as_anthropic(data: bytes, begin: int, end: int) -> tuple[bytes, bytes] | None:
    """The event in ``data[begin:end]`` when it is framed as Anthropic frames it (its type
    line, then one data line): read without splitting it into lines."""
    for frame, kind in zip(_FRAMES, _BOTH, strict=True):
        if data.startswith(frame, begin):
            start = begin + len(frame)
            if data.find(b"\n", start, end) < 0:
                return kind, data[start:end]
            return None
    return None


def _event_of(lines: list[bytes]) -> tuple[bytes, bytes] | None:
    """The type and data of one event's lines, when its type is one of ours."""
    kind = b""
    payload: list[bytes] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        if value[:1] == b" ":
            value = value[1:]
        if name == b"event":
            kind = value
        elif name == b"data":
            payload.append(value)
    if kind in (_START, _DELTA) and payload:
        return kind, b"\n".join(payload)
    return None
