"""The pure parts of usage: reading SSE events and JSON bodies, and the report's ranges."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.usage.meter import Meter
from gateway.usage.report import (
    RangeError,
    check_range,
    default_range,
    parse_instant,
    parse_since,
    summarize,
)
from loadtests._fake_parts import message_body, stream_frames
from storage.usage import UsageRecord


def frames(newline: bytes = b"\n") -> bytes:
    raw = b"".join(
        stream_frames(
            msg_id="m", model="claude-x", input_tokens=40, events=3, cache_creation=2, cache_read=5
        )
    )
    return raw.replace(b"\n", newline)


def read(meter: Meter) -> tuple[str, int, int, int, int]:
    return (
        meter.model,
        meter.input_tokens,
        meter.output_tokens,
        meter.cache_creation_input_tokens,
        meter.cache_read_input_tokens,
    )


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_a_whole_stream_in_any_line_ending(newline: bytes) -> None:
    meter = Meter()
    meter.events(frames(newline))
    # message_delta's cumulative values win over message_start's; never a sum.
    assert read(meter) == ("claude-x", 40, 3, 2, 5)


def test_event_by_event_as_the_relay_hands_them_over() -> None:
    meter = Meter()
    for frame in stream_frames(msg_id="m", model="claude-x", input_tokens=40, events=3):
        meter.events(frame)
    assert read(meter) == ("claude-x", 40, 3, 0, 0)


def test_latest_value_of_each_field_wins_and_absent_fields_keep() -> None:
    meter = Meter()
    start = {
        "type": "message_start",
        "message": {"model": "m", "usage": {"input_tokens": 9, "output_tokens": 1}},
    }
    meter.events(b"event: message_start\ndata: " + msgspec.json.encode(start) + b"\n\n")
    for output in (5, 8):
        delta = {"type": "message_delta", "usage": {"output_tokens": output}}
        meter.events(b"event: message_delta\ndata: " + msgspec.json.encode(delta) + b"\n\n")
    assert read(meter) == ("m", 9, 8, 0, 0)


def test_only_message_start_and_delta_events_are_read() -> None:
    meter = Meter()
    # A text delta that quotes the names (and a usage) is not a usage event.
    text = {
        "type": "content_block_delta",
        "delta": {"type": "text_delta", "text": 'message_delta "usage": {"output_tokens": 99}'},
    }
    meter.events(b"event: content_block_delta\ndata: " + msgspec.json.encode(text) + b"\n\n")
    meter.events(b"event: message_delta\ndata: {not json\n\n")
    meter.events(b'event: message_delta\ndata: {"usage": {"output_tokens": "many"}}\n\n')
    assert read(meter) == ("", 0, 0, 0, 0)


def test_an_event_without_its_blank_line_is_not_counted() -> None:
    meter = Meter()
    meter.events(b'event: message_delta\ndata: {"usage": {"output_tokens": 7}}\n')
    assert meter.output_tokens == 0


def test_data_split_over_several_lines() -> None:
    meter = Meter()
    meter.events(b'event: message_delta\ndata: {"usage":\ndata: {"output_tokens": 7}}\n\n')
    assert meter.output_tokens == 7


def test_a_json_body() -> None:
    meter = Meter()
    meter.body(
        message_body(
            msg_id="m", model="claude-y", input_tokens=11, events=4, body_bytes=0, cache_read=3
        )
    )
    assert read(meter) == ("claude-y", 11, 4, 0, 3)
    broken = Meter()
    broken.body(b'{"model": "x", "usage": ')
    assert read(broken) == ("", 0, 0, 0, 0)


NOW = datetime(2026, 11, 30, 14, 25, tzinfo=UTC)


def test_ranges() -> None:
    since, until = default_range(NOW)
    assert until == datetime(2026, 11, 30, 15, tzinfo=UTC)
    assert since == datetime(2026, 11, 24, tzinfo=UTC)  # today and the six days before
    assert parse_since("24h", NOW) == datetime(2026, 11, 29, 14, tzinfo=UTC)
    assert parse_since("7d", NOW) == datetime(2026, 11, 23, 14, tzinfo=UTC)
    assert parse_since("2026-11-01", NOW) == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_instant("2026-11-01T09:30:00+02:00", "from") == datetime(
        2026, 11, 1, 7, tzinfo=UTC
    )
    assert parse_instant("2026-11-01T09:30:00Z", "to", up=True) == datetime(
        2026, 11, 1, 10, tzinfo=UTC
    )
    assert parse_instant("2026-11-01T09:00:00Z", "to", up=True) == datetime(
        2026, 11, 1, 9, tzinfo=UTC
    )
    with pytest.raises(RangeError, match=r"^since:"):
        parse_since("a week", NOW)
    with pytest.raises(RangeError, match=r"^from: must be before to"):
        check_range(NOW, NOW, names=("from", "to"))
    with pytest.raises(RangeError, match=r"^from: the range"):
        check_range(NOW - timedelta(days=400), NOW, names=("from", "to"))


def test_summaries() -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    hour = datetime(2026, 11, 30, 23, tzinfo=UTC)
    records = [
        UsageRecord(alice, "alice", hour, "m1", 1, 0, 10, 1, 0, 0),
        UsageRecord(alice, "alice", hour + timedelta(hours=1), "m1", 2, 0, 20, 2, 1, 1),
        UsageRecord(bob, "bob", hour, "", 0, 3, 0, 0, 0, 0),
    ]
    by_day = summarize(records, "day")
    assert [(str(r.day), r.requests, r.rejected) for r in by_day.rows] == [
        ("2026-11-30", 1, 3),
        ("2026-12-01", 2, 0),
    ]
    assert by_day.totals.input_tokens == 30
    assert [(r.user, r.requests) for r in summarize(records, "user").rows] == [
        ("alice", 3),
        ("bob", 0),
    ]
    assert [r.model for r in summarize(records, "model").rows] == ["", "m1"]
    encoded = msgspec.json.decode(msgspec.json.encode(summarize(records, "model").rows[0]))
    assert "hour" not in encoded and encoded["model"] == "" and encoded["requests"] == 0


def test_fields_in_any_order_and_other_fields_beside_them() -> None:
    meter = Meter()
    meter.events(
        b'data: {"type": "message_start", "message": {"model": "m", "usage": '
        b'{"input_tokens": 3}}}\nevent: message_start\nid: 1\n\n'
        b'event:message_delta\nretry: 5\ndata: {"usage": {"output_tokens": 4}}\n\n'
    )
    assert read(meter) == ("m", 3, 4, 0, 0)


def test_only_the_first_message_start_counts() -> None:
    meter = Meter()
    for model in (b"first", b"second"):
        meter.events(
            b'event: message_start\ndata: {"message": {"model": "' + model + b'", "usage": '
            b'{"input_tokens": 3}}}\n\n'
        )
    assert meter.model == "first"


def test_the_flush_interval_setting() -> None:
    from gateway.settings import Settings, SettingsError

    assert Settings.from_env({}).usage_flush_interval == 2.0
    assert Settings.from_env({"GATEWAY_USAGE_FLUSH_INTERVAL": "0"}).usage_flush_interval == 0
    assert Settings.from_env({"GATEWAY_USAGE_FLUSH_INTERVAL": "0.5"}).usage_flush_interval == 0.5
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(SettingsError, match="GATEWAY_USAGE_FLUSH_INTERVAL"):
            Settings.from_env({"GATEWAY_USAGE_FLUSH_INTERVAL": bad})


# -- the meter's fast reading of Anthropic's framing against the general SSE parser -------

_COUNTS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def _reference(stream: bytes) -> tuple[str, int, int, int, int]:
    """What a stream reported, read by the general parser alone: the first message_start,
    then every message_delta in order, the latest value of each field winning."""
    from gateway.usage.meter import _events

    seen = {"model": "", **dict.fromkeys(_COUNTS, 0)}
    started = False
    for kind, payload in _events(stream):
        try:
            decoded = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            continue
        if not isinstance(decoded, dict):
            continue
        if kind == b"message_start":
            if started or not isinstance(decoded.get("message"), dict):
                continue
            message = decoded["message"]
            if not isinstance(message.get("model", ""), str):
                continue
            usage = message.get("usage")
            if usage is not None and not _valid_usage(usage):
                continue
            started = True
            seen["model"] = message.get("model", "")
        else:
            usage = decoded.get("usage")
            if usage is not None and not _valid_usage(usage):
                continue
        for name in _COUNTS:
            if usage is not None and usage.get(name) is not None:
                seen[name] = usage[name]
    return (seen["model"], *(int(seen[name]) for name in _COUNTS))  # type: ignore[return-value]


def _valid_usage(usage: object) -> bool:
    return isinstance(usage, dict) and all(
        usage.get(name) is None or type(usage.get(name)) is int for name in _COUNTS
    )


def _usage_strategy() -> st.SearchStrategy[dict[str, int]]:
    return st.dictionaries(st.sampled_from(_COUNTS), st.integers(0, 10**6), max_size=4)


def _event_strategy() -> st.SearchStrategy[tuple[str, bytes]]:
    text = st.sampled_from(["hi", "message_delta", "message_start", 'usage {"output_tokens": 9}'])
    return st.one_of(
        st.builds(
            lambda model, usage: ("message_start", msgspec.json.encode(
                {"type": "message_start", "message": {"model": model, "usage": usage}}
            )),
            st.sampled_from(["m1", "m2"]), _usage_strategy(),
        ),
        st.builds(
            lambda usage: ("message_delta", msgspec.json.encode(
                {"type": "message_delta", "delta": {}, "usage": usage}
            )),
            _usage_strategy(),
        ),
        st.builds(
            lambda t: ("content_block_delta", msgspec.json.encode(
                {"type": "content_block_delta", "delta": {"type": "text_delta", "text": t}}
            )),
            text,
        ),
        st.builds(
            lambda usage: ("message_delta", msgspec.json.encode({"usage": usage})),
            _usage_strategy(),
        ),
        st.just(("message_delta", b"{not json")),
        st.just(("ping", b'{"type": "ping"}')),
    )  # fmt: skip


def _framed(kind: str, payload: bytes, style: int) -> bytes:
    if style == 0:  # as Anthropic frames it
        return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"
    if style == 1:  # other fields, no space after the colon
        return b"id: 1\nevent:" + kind.encode() + b"\ndata:" + payload + b"\n\n"
    if style == 2:  # the data over two lines
        half = len(payload) // 2
        return (
            b"event: "
            + kind.encode()
            + b"\ndata: "
            + payload[:half]
            + b"\ndata: "
            + (payload[half:] + b"\n\n")
        )
    return b"event: " + kind.encode() + b"\r\ndata: " + payload + b"\r\n\r\n"  # CRLF


_START_FIRST = st.builds(
    lambda model, usage: ("message_start", msgspec.json.encode(
        {"type": "message_start", "message": {"model": model, "usage": usage}}
    )),
    st.sampled_from(["m1", "m2"]), _usage_strategy(),
)  # fmt: skip
_STYLES = st.sampled_from([0, 0, 0, 0, 0, 1, 2, 3])


@given(
    # Most streams as Anthropic sends them: a message_start first, framed its way.
    first=st.one_of(st.tuples(_START_FIRST, st.just(0)), st.tuples(_event_strategy(), _STYLES)),
    events=st.lists(st.tuples(_event_strategy(), _STYLES), max_size=12),
    cuts=st.lists(st.booleans(), min_size=13, max_size=13),
)
@settings(max_examples=1500, deadline=None)
def test_the_fast_reading_agrees_with_the_general_parser(
    first: tuple[tuple[str, bytes], int],
    events: list[tuple[tuple[str, bytes], int]],
    cuts: list[bool],
) -> None:
    """Any stream, handed over in chunks of whole events, reads as the general SSE parser
    reads it whole. A stream that begins as Anthropic's do is framed that way throughout
    (the meter looks for its later events in that framing); any other may mix framings."""
    (kind, _), style = first
    if kind == "message_start" and style == 0:
        events = [(event, 0) for event, _ in events]
    events = [first, *events]
    framed = [_framed(kind, payload, style) for (kind, payload), style in events]
    # Handed over in chunks of whole events, as the relay cuts them.
    chunks: list[bytes] = []
    for index, frame in enumerate(framed):
        if chunks and not cuts[index]:
            chunks[-1] += frame
        else:
            chunks.append(frame)
    meter = Meter()
    for chunk in chunks:
        meter.events(chunk)
    assert read(meter) == _reference(b"".join(framed)), chunks


def test_several_deltas_in_one_chunk_the_latest_wins() -> None:
    start = (
        b'event: message_start\ndata: {"message": {"model": "m", "usage": {"input_tokens": 3}}}\n\n'
    )
    deltas = b"".join(
        b'event: message_delta\ndata: {"usage": ' + usage + b"}\n\n"
        for usage in (
            b'{"output_tokens": 1, "cache_read_input_tokens": 4}',
            b'{"output_tokens": 2}',
        )
    )
    text = b'event: content_block_delta\ndata: {"delta": {"text": "event: message_delta"}}\n\n'
    for stream in (start + deltas, start + deltas + text, start + text + deltas):
        meter = Meter()
        meter.events(stream)
        assert read(meter) == ("m", 3, 2, 0, 4)
        # The same events over two chunks: the start, then the rest.
        meter = Meter()
        meter.events(start)
        meter.events(stream[len(start) :])
        assert read(meter) == ("m", 3, 2, 0, 4)


def test_a_later_message_start_in_another_line_ending_is_not_read() -> None:
    meter = Meter()
    meter.events(b'event: message_start\ndata: {"message": {"model": "first"}}\n\n')
    meter.events(b'event: message_start\r\ndata: {"message": {"model": "second"}}\r\n\r\n')
    assert meter.model == "first"


def test_anthropics_framing_is_read_without_the_general_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gateway.usage.meter as meter_module

    def general(data: bytes) -> list[tuple[bytes, bytes]]:
        raise AssertionError(f"read by the general parser: {data[:60]!r}")

    monkeypatch.setattr(meter_module, "_events", general)
    whole = Meter()
    whole.events(frames())
    assert read(whole) == ("claude-x", 40, 3, 2, 5)
    each = Meter()
    for frame in stream_frames(
        msg_id="m", model="claude-x", input_tokens=40, events=3, cache_creation=2, cache_read=5
    ):
        each.events(frame)
    assert read(each) == ("claude-x", 40, 3, 2, 5)


def test_the_tally_counts_each_request_in_the_utc_hour_it_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gateway.usage.recorder as recorder

    def at(hour: int, minute: int, second: float) -> float:
        return datetime(2026, 11, 30, hour, minute, tzinfo=UTC).timestamp() + second

    clock = [0.0]
    monkeypatch.setattr(recorder.time, "time", lambda: clock[0])
    tally, user = recorder.UsageTally(), uuid.uuid4()
    meter = Meter(model="m", input_tokens=2, output_tokens=3)
    # The hour's last second, the next two hours, then the clock set back.
    for clock[0] in (at(13, 59, 59), at(13, 59, 59.5), at(14, 0, 0.5), at(15, 0, 1), at(12, 30, 0)):
        tally.relayed(user, meter)
    tally.rejected(user)
    hours = {
        (datetime.fromtimestamp(hour, UTC).hour, model): row
        for (_, hour, model), row in tally.take().items()
    }
    assert hours == {
        (13, "m"): [2, 0, 4, 6, 0, 0],
        (14, "m"): [1, 0, 2, 3, 0, 0],
        (15, "m"): [1, 0, 2, 3, 0, 0],
        (12, "m"): [1, 0, 2, 3, 0, 0],
        (12, ""): [0, 1, 0, 0, 0, 0],
    }


START = b'event: message_start\ndata: {"message": {"model": "m", "usage": {"input_tokens": 3}}}\n\n'


def test_nothing_the_upstream_sends_raises_out_of_the_meter() -> None:
    # msgspec gives up on deep nesting with a RecursionError, not a DecodeError: it must
    # not escape into the relay (it would end the client's stream).
    deep = b'{"usage": {"output_tokens": 5}, "x": ' + b"[" * 1200 + b"]" * 1200 + b"}"
    framed = Meter()
    framed.events(START + b"event: message_delta\ndata: " + deep + b"\n\n")
    framed.events(b"event: message_delta\ndata: " + deep + b"\n\n")
    general = Meter()
    general.events(b"event: message_start\r\ndata: " + deep + b"\r\n\r\n")
    general.events(b"id: 1\nevent: message_delta\ndata: " + deep + b"\n\n")
    body = Meter()
    body.body(deep)
    assert read(framed) == ("m", 3, 0, 0, 0)
    assert read(general) == read(body) == ("", 0, 0, 0, 0)


def test_counts_out_of_range_are_not_read() -> None:
    meter = Meter()
    meter.events(START)
    meter.events(b'event: message_delta\ndata: {"usage": {"output_tokens": 4}}\n\n')
    for count in (b"-5", b"9223372036854775808", b"99999999999999999999999"):
        meter.events(
            b'event: message_delta\ndata: {"usage": {"output_tokens": ' + count + b"}}\n\n"
        )
    assert read(meter) == ("m", 3, 4, 0, 0)
    meter.events(
        b'event: message_delta\ndata: {"usage": {"output_tokens": 9223372036854775807}}\n\n'
    )
    assert read(meter) == ("m", 3, 2**63 - 1, 0, 0)


def test_a_framed_streams_unfinished_or_otherwise_framed_delta() -> None:
    # A tail without its blank line (the relay's rest after an upstream cut) is not an event.
    cut = Meter()
    cut.events(START + b'event: message_delta\ndata: {"usage": {"output_tokens": 9}}\n')
    assert read(cut) == ("m", 3, 0, 0, 0)
    # A field before its type line, or the chunk beginning mid-line: the general parser.
    fields = Meter()
    fields.events(START)
    fields.events(b'id: 7\nevent: message_delta\ndata: {"usage": {"output_tokens": 4}}\n\n')
    fields.events(b'\nevent: message_delta\ndata: {"usage": {"output_tokens": 6}}\n\n')
    assert read(fields) == ("m", 3, 6, 0, 0)
    # A data line before the type line joins the event's data: not JSON, nothing read.
    fields.events(b'data: {}\nevent: message_delta\ndata: {"usage": {"output_tokens": 8}}\n\n')
    assert read(fields) == ("m", 3, 6, 0, 0)
