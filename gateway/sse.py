"""Where server-sent events end: the last blank line of a chunk, in any line ending SSE allows.

An event ends at a blank line: two line endings in a row, each CRLF, LF or CR. Every blank
line contains one of three byte pairs, and each of those pairs is a blank line wherever it
stands: ``\\n\\n``, ``\\r\\r`` and ``\\n\\r`` (a LF always ends a line ending, a CR always
starts one). ``\\r\\n`` alone is one CRLF line ending, never a blank line. So a chunk is
searched by itself, plus the last two bytes before it for a blank line that straddles two
chunks (``data: x\\n`` | ``\\n``, ``data: x\\r\\n`` | ``\\r\\n``, or ``\\n\\r`` | ``\\n``:
the LF of a CRLF whose CR already ended a blank line).
"""

from __future__ import annotations

from typing import Final

_LF: Final = 10
_CR: Final = 13
_ENDINGS: Final = (b"\n", b"\r")


def event_end(chunk: bytes, before: bytes = b"") -> int:
    """Offset in ``chunk`` just past its last blank line, or 0 when it holds none.

    ``before``: the last two bytes that came before ``chunk`` (fewer at the start). A
    blank line that ends with a CR ends there even when its LF is still to come (the CR
    already ended the line); a LF that follows in the same chunk is counted with it, and
    one that starts the next chunk is a blank line's end of its own.
    """
    end = chunk.rfind(b"\n\n") + 2
    if _CR in chunk:
        cr_end = max(chunk.rfind(b"\r\r"), chunk.rfind(b"\n\r")) + 2
        if cr_end > end:
            end = cr_end + 1 if cr_end < len(chunk) and chunk[cr_end] == _LF else cr_end
    if end > 1:
        return end
    if not before or not chunk:
        return 0
    last, first = before[-1], chunk[0]
    if first == _CR and last in (_LF, _CR):
        return 2 if chunk[1:2] == b"\n" else 1
    if first == _LF and (last == _LF or (last == _CR and before[-2:-1] in _ENDINGS)):
        return 1
    return 0


def tail(before: bytes, chunk: bytes) -> bytes:
    """The ``before`` of the chunk after ``chunk``."""
    return chunk[-2:] if len(chunk) >= 2 else (before + chunk)[-2:]
