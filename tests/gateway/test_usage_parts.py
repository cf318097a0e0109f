"""The pure parts of usage: reading SSE events and JSON bodies, and the report's ranges."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

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
