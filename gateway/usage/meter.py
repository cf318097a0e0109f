"""Reading token usage out of a response the relay already forwarded: SSE events or JSON.

Streamed: ``message_start`` names the model and the usage so far, each ``message_delta``
carries a cumulative ``usage`` (the latest value of each field wins, never a sum). Only
events of those two types are decoded, into small Structs; the relay hands over whole
events it already cut on their boundaries, after it sent them. Non-streamed: the body's
``model`` and ``usage``.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

_START: Final = b"message_start"
_DELTA: Final = b"message_delta"
# Anthropic's framing: each event its type line then one data line, a blank line after.
_START_EVENT: Final = b"event: message_start\ndata: "
_DELTA_EVENT: Final = b"event: message_delta\ndata: "
_START_AT: Final = len(_START_EVENT)
_DELTA_AT: Final = len(_DELTA_EVENT)
# The largest non-streamed body read for its usage; a bigger one counts as a request only.
MAX_METERED_BODY: Final = 8 * 1024 * 1024


# What an answer's usage cannot be read from: not JSON, not the shape, a count out of range,
# or nesting deep enough that msgspec gives up (RecursionError). The upstream writes these
# bytes; nothing it sends may end the client's stream.
_UNREADABLE: Final = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)
# A count the database stores (a signed 64-bit column) and Prometheus adds (never negative).
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Usage(msgspec.Struct, frozen=True):
    input_tokens: Count | None = None
    output_tokens: Count | None = None
    cache_creation_input_tokens: Count | None = None
    cache_read_input_tokens: Count | None = None


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


class Meter(msgspec.Struct, gc=False):
    """What one response reported: the model and the latest value of each token count.

    A Struct (made in C, without an ``__init__`` frame): one is made for each metered
    request.
    """

    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    started: bool = False  # a message_start was read: a stream has one, first
    opened: bool = False  # a chunk was read (the first one decides the framing)
    # Its message_start began its first chunk, framed as Anthropic frames its events (the
    # type line, one data line, a blank line; LF only): its events are looked for so.
    framed: bool = False

    def events(self, data: bytes) -> None:
        """Whole SSE events, as relayed; only ``message_start``/``message_delta`` decoded.

        A stream that begins as Anthropic's do (``event: message_start``, one ``data:``
        line, a blank line, no CR) is read in that framing: its later chunks are searched
        from their end for ``event: message_delta\\ndata:`` (text deltas pass at C speed;
        a delta that gives all four counts ends the search, the latest value winning), and
        a chunk where such an event is framed otherwise (a field before it, its data over
        several lines) goes to the general parser. Any other stream is read by the
        general SSE parser, ``_events``, chunk by chunk. (``bytes.find``, never ``in``:
        the operator first tries its argument as an int, at the price of an exception.)
        """
        if self.framed:
            at = data.rfind(_DELTA_EVENT)
            if at < 0:
                return  # most chunks: text deltas
            self._deltas(data, at, 0)
        elif self.started or self.opened:
            if data.find(_START) >= 0 or data.find(_DELTA) >= 0:
                self._general(data)
        elif data[:_START_AT] == _START_EVENT:
            self.opened = True
            end = data.find(b"\n", _START_AT)
            if data[end : end + 2] != b"\n\n" or data.find(b"\r") >= 0:
                self._general(data)
                return
            try:
                message = _decode_start(data[_START_AT:end]).message
            except _UNREADABLE:
                self._general(data)  # not the stream's message_start after all
                return
            self.started = self.framed = True
            self.model = message.model
            if message.usage is not None:
                self._usage(message.usage)
            offset = end + 2
            at = data.rfind(_DELTA_EVENT, offset)
            if at >= 0:
                self._deltas(data, at, offset)
        else:
            self.opened = True
            if data.find(_START) >= 0 or data.find(_DELTA) >= 0:
                self._general(data)

    def _deltas(self, data: bytes, at: int, offset: int) -> None:
        """The message_delta events of a framed stream's chunk, the last at ``at``; the
        chunk's events begin at ``offset``. Read from the last back, until one gives all
        four counts (what came before it is overwritten), then applied in stream order."""
        later: list[Usage] = []  # read so far, the last first
        while True:
            if at != offset and data[at - 2 : at] != b"\n\n":
                self._general(data[offset:] if offset else data)  # a field before its type
                return
            begin = at + _DELTA_AT
            end = data.find(b"\n", begin)
            if data[end : end + 2] != b"\n\n":
                self._general(data[offset:] if offset else data)  # more lines after its data
                return
            try:
                usage = _decode_delta(data[begin:end]).usage
            except _UNREADABLE:
                usage = None
            if usage is not None:
                if (
                    usage.input_tokens is not None
                    and usage.output_tokens is not None
                    and usage.cache_creation_input_tokens is not None
                    and usage.cache_read_input_tokens is not None
                ):
                    self.input_tokens = usage.input_tokens
                    self.output_tokens = usage.output_tokens
                    self.cache_creation_input_tokens = usage.cache_creation_input_tokens
                    self.cache_read_input_tokens = usage.cache_read_input_tokens
                    break
                later.append(usage)
            if at == offset:
                break
            at = data.rfind(_DELTA_EVENT, offset, at)
            if at < 0:
                break
        for usage in reversed(later):
            self._usage(usage)

    def body(self, data: bytes) -> None:
        """A whole non-streamed ``/v1/messages`` JSON body."""
        try:
            message = _decode_message(data)
        except _UNREADABLE:
            return
        self.model = message.model
        if message.usage is not None:
            self._usage(message.usage)

    def _general(self, data: bytes) -> None:
        for kind, payload in _events(data):
            if kind == _DELTA or not self.started:
                self._event(kind, payload)

    def _event(self, kind: bytes, payload: bytes) -> None:
        try:
            if kind == _START:
                start = _decode_start(payload)
                self.started = True
                self.model = start.message.model
                usage = start.message.usage
            else:
                usage = _decode_delta(payload).usage
        except _UNREADABLE:
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
