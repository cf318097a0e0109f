"""Where SSE events end, chunk by chunk, held to a plain reading of the SSE grammar."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.sse import event_end, tail


def blank_line_end(stream: bytes) -> int:
    """The reference: end of the last blank line in ``stream`` (0 if none), reading line
    endings one by one (CRLF, CR or LF); a CR that ends ``stream`` ends its line there."""
    end, previous_end, i = 0, -1, 0
    while i < len(stream):
        byte = stream[i : i + 1]
        if byte not in (b"\r", b"\n"):
            i += 1
            continue
        start = i
        i += 2 if stream[i : i + 2] == b"\r\n" else 1
        if start == previous_end:
            end = i  # this line ending directly follows another: a blank line
        previous_end = i
    return end


def relayed_ends(chunks: list[bytes]) -> list[int]:
    """How far a relay that cuts where ``event_end`` says has got after each chunk."""
    out, relayed, offset, before = [], 0, 0, b""
    for chunk in chunks:
        cut = event_end(chunk, before)
        before = tail(before, chunk)
        if cut:
            relayed = offset + cut
        offset += len(chunk)
        out.append(relayed)
    return out


@pytest.mark.parametrize(
    ("chunks", "ends"),
    [
        ([b"data: a\n\n"], [9]),
        ([b"data: a\r\n\r\n"], [11]),
        ([b"data: a\r\r"], [9]),
        ([b"data: a\n\r\n"], [10]),
        ([b"data: a\r\n", b"\r\n"], [0, 11]),
        ([b"data: a\n", b"\n"], [0, 9]),
        ([b"data: a\r", b"\n"], [0, 0]),  # one CRLF: a line, not a blank line
        ([b"data: a\r", b"\ndata: b"], [0, 0]),
        ([b"data: a\n\r", b"\n"], [9, 10]),  # the CR ended the blank line; its LF follows
        ([b"data: a\r\r", b"\ndata: b\n"], [9, 10]),
        ([b"data: a\r", b"\r", b"\n"], [0, 9, 10]),
        ([b"data: a\n\r", b"", b"\n"], [9, 9, 10]),
        ([b"\n\n"], [2]),
        ([b"x\n\ny"], [3]),
        ([b"data: a\n\ndata: b\r\n\r\ndata: c"], [20]),
    ],
)
def test_blank_lines_in_every_line_ending(chunks: list[bytes], ends: list[int]) -> None:
    assert relayed_ends(chunks) == ends
    for k in range(len(chunks)):
        assert ends[k] == blank_line_end(b"".join(chunks[: k + 1]))


_piece = st.sampled_from([b"\r", b"\n", b"\r\n", b"data: x", b"event: y", b":", b"a"])


@given(st.lists(st.lists(_piece, max_size=8).map(b"".join), min_size=1, max_size=12))
def test_every_blank_line_is_found_the_moment_it_arrives(chunks: list[bytes]) -> None:
    """However a stream is cut into chunks, the relay has sent everything up to its last
    blank line after each chunk, and nothing past it."""
    expected = [blank_line_end(b"".join(chunks[: k + 1])) for k in range(len(chunks))]
    assert relayed_ends(chunks) == expected
